//! Playing kubelet's part: a Secret volume laid out and updated as kubelet's atomic writer does it
//! (files in a timestamped directory, `..data` pointing at it, one symlink per key pointing into
//! `..data`, an update written to a new directory and swapped in by renaming a new `..data` over
//! the old one), and injected pods run from their specs alone (the webhook's patch applied, the
//! sidecar started with the injected arguments, environment and volume files).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use meshid_identity::annotations::to_downward_api;
use meshid_injector::{InjectConfig, Scope, apply_patch, review};
use serde_json::{Value, json};

use crate::fake_cluster::FakeCluster;
use crate::process::Proc;
use crate::tools::workspace_bin;

/// A Secret volume mounted at `dir`.
pub struct SecretVolume {
    pub dir: PathBuf,
    generation: u32,
}

impl SecretVolume {
    /// An empty volume directory (nothing projected yet).
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("volume dir");
        Self {
            dir: dir.to_owned(),
            generation: 0,
        }
    }

    /// Projects `files` (key -> content) as kubelet does on a Secret update.
    pub fn apply(&mut self, files: &BTreeMap<String, Vec<u8>>) {
        self.generation += 1;
        let name = format!("..2026_12_02_08_00_00.{:09}", self.generation);
        let ts = self.dir.join(&name);
        std::fs::create_dir(&ts).expect("timestamped dir");
        for (key, content) in files {
            std::fs::write(ts.join(key), content).expect("write key");
        }
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        symlink(&name, &tmp).expect("..data_tmp");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap ..data");
        // Keys new in this version get their link after the swap; keys gone lose theirs.
        for key in files.keys() {
            let link = self.dir.join(key);
            if std::fs::symlink_metadata(&link).is_err() {
                symlink(format!("..data/{key}"), &link).expect("key link");
            }
        }
        for entry in std::fs::read_dir(&self.dir).expect("read volume").flatten() {
            let key = entry.file_name().to_string_lossy().into_owned();
            if !key.starts_with("..") && !files.contains_key(&key) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        if let Some(old) = old {
            let _ = std::fs::remove_dir_all(self.dir.join(old));
        }
    }

    /// Projects a Secret manifest (`data` of base64 values, as `meshid-ca secret` prints it and
    /// `kubectl apply` would store it).
    pub fn apply_manifest(&mut self, yaml: &str) {
        use base64::Engine;
        let mut files = BTreeMap::new();
        for line in yaml.lines().skip_while(|l| *l != "data:").skip(1) {
            let (key, value) = line.trim().split_once(": ").expect("data entry");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(value)
                .expect("base64");
            files.insert(key.to_owned(), bytes);
        }
        assert!(!files.is_empty(), "no data in the manifest: {yaml}");
        self.apply(&files);
    }
}

/// A pod of namespace `shop` running as service account `sa`, before injection.
pub fn pod(sa: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": format!("{sa}-6c9d-"), "namespace": "shop",
                     "labels": {"app": sa}, "annotations": annotations},
        "spec": {
            "serviceAccountName": sa,
            "containers": [{"name": "app", "image": format!("registry.example/{sa}:1")}],
        }
    })
}

/// The webhook's answer applied to `pod`.
pub fn inject(config: &InjectConfig, pod: &Value) -> Value {
    let review_in = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "1", "namespace": "shop", "operation": "CREATE",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "object": pod,
        }
    });
    let out = review(config, Scope::Pod, &review_in);
    let patch = out["response"]["patch"]
        .as_str()
        .unwrap_or_else(|| panic!("no patch: {out}"));
    let ops: Vec<Value> = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(patch)
            .unwrap(),
    )
    .unwrap();
    let mut pod = pod.clone();
    apply_patch(&mut pod, &ops).unwrap();
    pod
}

/// A pod's volumes on "this node": mount paths are re-rooted under `root`.
pub struct PodFiles {
    root: PathBuf,
    annotations_dir: PathBuf,
    generation: u32,
}

impl PodFiles {
    /// Where an absolute path of the pod lives here.
    pub fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    /// Writes the annotations as the kubelet does for a downward-API volume: a new timestamped
    /// directory, then `..data` swapped to it by rename; `annotations` links to `..data/annotations`.
    pub fn write_annotations(&mut self, annotations: &Value) {
        let map: BTreeMap<String, String> = serde_json::from_value(annotations.clone()).unwrap();
        self.generation += 1;
        let name = format!("..2026_11_22_10_00_00.{}", self.generation);
        let dir = self.annotations_dir.join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("annotations"), to_downward_api(&map)).unwrap();
        let tmp = self.annotations_dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.annotations_dir.join("..data")).unwrap();
        let link = self.annotations_dir.join("annotations");
        if !link.exists() {
            std::os::unix::fs::symlink("..data/annotations", &link).unwrap();
        }
    }
}

/// Starts the pod's injected sidecar as the kubelet would: its args, its env (with the downward-API
/// values resolved), its volumes' files in place. `admin` (probes) and `stats` (`/metrics`,
/// `/identity`) replace the injected `0.0.0.0:15021` and `0.0.0.0:15020`.
pub fn run_sidecar(
    pod: &Value,
    root: &Path,
    pod_ip: &str,
    cluster: &FakeCluster,
    admin: SocketAddr,
    stats: SocketAddr,
) -> (Proc, PodFiles) {
    let c = &pod["spec"]["initContainers"][0];
    assert_eq!(c["name"], "meshid-sidecar");
    assert_eq!(c["restartPolicy"], "Always");
    let mut files = PodFiles {
        root: root.to_owned(),
        annotations_dir: PathBuf::new(),
        generation: 0,
    };
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    let sa = pod["spec"]["serviceAccountName"].as_str().unwrap();
    for mount in c["volumeMounts"].as_array().unwrap() {
        let dir = files.path(mount["mountPath"].as_str().unwrap());
        std::fs::create_dir_all(&dir).unwrap();
        let volume = volumes.iter().find(|v| v["name"] == mount["name"]).unwrap();
        if let Some(projected) = volume.get("projected") {
            let sat = &projected["sources"][0]["serviceAccountToken"];
            assert_eq!(sat["audience"], "meshid-ca");
            let path = dir.join(sat["path"].as_str().unwrap());
            std::fs::write(path, cluster.token("shop", sa)).unwrap();
        } else if volume.get("downwardAPI").is_some() {
            files.annotations_dir = dir;
        } else if volume.get("emptyDir").is_some() {
            // Shared with the app containers (the Workload API socket's volume): an empty directory.
        } else {
            panic!("unexpected volume {volume}");
        }
    }
    files.write_annotations(&pod["metadata"]["annotations"]);

    let mut args: Vec<String> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap();
            match a.starts_with('/') {
                true => files.path(a).to_string_lossy().into_owned(),
                false => a.to_owned(),
            }
        })
        .collect();
    // Every pod has its own IP in a cluster; here they share loopback, so the admin and stats
    // ports move.
    for (flag, injected, here) in [
        ("--admin-listen", "0.0.0.0:15021", admin),
        ("--stats-listen", "0.0.0.0:15020", stats),
    ] {
        let i = args.iter().position(|a| a == flag).unwrap();
        assert_eq!(args[i + 1], injected, "{flag}");
        args[i + 1] = here.to_string();
    }
    assert!(
        !args.iter().any(|a| a == "--ca-bundle"),
        "the bundle is not a file: {args:?}"
    );
    let mut cmd = Command::new(workspace_bin("meshid-sidecar"));
    cmd.args(&args)
        .env("MESHID_LOG", "warn")
        .env_remove("MESHID_SIDECAR_CA_BUNDLE_PEM");
    let env = c["env"].as_array().unwrap();
    assert!(
        env.iter()
            .any(|e| e["name"] == "MESHID_SIDECAR_CA_BUNDLE_PEM"
                && e["value"]
                    .as_str()
                    .is_some_and(|v| v.contains("BEGIN CERTIFICATE"))),
        "the trust bundle is in the sidecar's environment: {env:?}"
    );
    for e in c["env"].as_array().unwrap() {
        let value = match (
            e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            &e["valueFrom"]["resourceFieldRef"],
        ) {
            (Some("status.podIP"), _) => pod_ip.to_owned(),
            (Some(other), _) => panic!("unexpected fieldRef {other}"),
            (None, serde_json::Value::Object(r)) => resource_field(c, r),
            (None, _) => e["value"].as_str().unwrap().to_owned(),
        };
        cmd.env(e["name"].as_str().unwrap(), value);
    }
    // The CA serves a certificate for "localhost" in this test (in a cluster: its Service name).
    cmd.env("MESHID_SIDECAR_CA_SERVER_NAME", "localhost");
    (Proc::spawn(&format!("sidecar {sa}"), &mut cmd), files)
}

/// A `resourceFieldRef` as the kubelet resolves it for container `c`: `limits.cpu` with a divisor
/// of 1, in whole cores rounded up (`500m` is 1). The only one the injector uses.
fn resource_field(c: &serde_json::Value, r: &serde_json::Map<String, serde_json::Value>) -> String {
    assert_eq!(r["resource"], "limits.cpu", "{r:?}");
    assert_eq!(r["divisor"], "1", "{r:?}");
    let limit = c["resources"]["limits"]["cpu"]
        .as_str()
        .expect("the sidecar has a CPU limit");
    let millis: u64 = match limit.strip_suffix('m') {
        Some(m) => m.parse().unwrap(),
        None => limit.parse::<u64>().unwrap() * 1000,
    };
    millis.div_ceil(1000).max(1).to_string()
}
