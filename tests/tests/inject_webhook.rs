//! The injection webhook fed real `admission.k8s.io/v1` AdmissionReviews (pods as the API server
//! sends them: from a Deployment's pod template, from a Job, with probes, with bad annotations,
//! already injected). Each answer's JSONPatch is applied and the resulting pod checked, including
//! that the sidecar's arguments pass the sidecar's own config parser.
//!
//! With `MESHID_INJECT_OUT=DIR`, the injected pods are also written there as JSON, for
//! `scripts/k8s/check.sh` to validate against the Kubernetes schemas.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use meshid_identity::annotations::to_downward_api;
use meshid_injector::{InjectConfig, Scope, TrustBundle, apply_patch, review};
use meshid_sidecar::cli::run_config_from_args;
use serde_json::{Value, json};

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";

fn admission_review(namespace: &str, pod: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "uid": "a3d1", "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        }
    })
}

/// The API server's ServiceAccount admission adds this volume before webhooks run.
fn kube_api_access() -> Value {
    json!({"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
    ]}})
}

/// A pod as a ReplicaSet of `Deployment/backend` creates it.
fn deployment_pod(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "backend-7d4b9c8f6-",
            "namespace": "shop",
            "labels": {"app": "backend", "pod-template-hash": "7d4b9c8f6"},
            "annotations": annotations,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": "backend-7d4b9c8f6", "uid": "c1c4", "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {
            "serviceAccountName": "backend",
            "containers": [{
                "name": "app",
                "image": "registry.example/backend:1.4.2",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                "volumeMounts": [{"name": "kube-api-access-x7k2p", "readOnly": true,
                    "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent",
            }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler",
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                "effect": "NoExecute", "tolerationSeconds": 300}],
            "volumes": [kube_api_access()],
        }
    })
}

fn mesh_annotations() -> Value {
    json!({
        "meshid.io/inject": "enabled",
        "meshid.io/inbound": "8080=http",
        "meshid.io/allow-8080": format!("{FRONTEND}, spiffe://cluster.local/ns/ops/sa/*"),
        "meshid.io/outbound": "9001=payments.shop.svc:8080,spiffe://cluster.local/ns/shop/sa/payments,http",
    })
}

/// The injector's configuration, with a trust bundle of two roots (as during a rotation).
fn config() -> InjectConfig {
    let roots = [
        meshid_tests::pki::ForeignCa::new().root_der,
        meshid_tests::pki::ForeignCa::new().root_der,
    ];
    InjectConfig::new(TrustBundle::from_der(&roots).unwrap())
}

/// Runs the review; returns the response and, if there was a patch, the patched pod.
fn inject(scope: Scope, pod: &Value) -> (Value, Option<Value>) {
    let out = review(&config(), scope, &admission_review("shop", pod.clone()));
    assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(out["kind"], "AdmissionReview");
    let response = out["response"].clone();
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    let patched = response.get("patch").map(|p| {
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(p.as_str().unwrap())
            .unwrap();
        let ops: Vec<Value> = serde_json::from_slice(&bytes).unwrap();
        let mut pod = pod.clone();
        apply_patch(&mut pod, &ops).unwrap();
        pod
    });
    (response, patched)
}

fn save(name: &str, pod: &Value) {
    if let Ok(dir) = std::env::var("MESHID_INJECT_OUT") {
        std::fs::create_dir_all(&dir).unwrap();
        let path = Path::new(&dir).join(format!("{name}.json"));
        std::fs::write(path, serde_json::to_string_pretty(pod).unwrap()).unwrap();
    }
}

fn sidecar(pod: &Value) -> &Value {
    let init = pod["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(init[0]["name"], "meshid-sidecar", "the sidecar comes first");
    &init[0]
}

/// The injected arguments, with the kubelet's environment and the volumes' files, pass the
/// sidecar's own parser and yield the listeners the annotations declare.
fn check_sidecar_config(pod: &Value) -> meshid_sidecar::settings::RunConfig {
    let dir = tempfile::tempdir().unwrap();
    let c = sidecar(pod);
    assert_eq!(c["restartPolicy"], "Always");
    let mounts: BTreeMap<String, String> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["mountPath"].as_str().unwrap().to_owned(),
                m["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    // Every mount names a pod volume.
    let volumes: Vec<&str> = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    for name in mounts.values() {
        assert!(volumes.contains(&name.as_str()), "{name} not a volume");
    }
    let token = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "meshid-token")
        .unwrap();
    let sat = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(sat["audience"], "meshid-ca");
    assert!(sat["expirationSeconds"].as_u64().unwrap() >= 600);

    // Files as the volumes would hold them, under a temporary root.
    let annotations: BTreeMap<String, String> =
        serde_json::from_value(pod["metadata"]["annotations"].clone()).unwrap();
    let root = dir.path();
    for mount in mounts.keys() {
        std::fs::create_dir_all(root.join(mount.trim_start_matches('/'))).unwrap();
    }
    let file = |p: &str| root.join(p.trim_start_matches('/'));
    let args: Vec<String> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap();
            if a.starts_with('/') {
                file(a).to_string_lossy().into_owned()
            } else {
                a.to_owned()
            }
        })
        .collect();
    for (flag, content) in [
        ("--annotations", to_downward_api(&annotations)),
        ("--token-file", "header.claims.signature".to_owned()),
    ] {
        let i = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("{flag} missing"));
        std::fs::write(&args[i + 1], content).unwrap();
    }
    let mut argv = vec!["meshid-sidecar".to_owned()];
    argv.extend(args);
    // MESHID_SIDECAR_POD_IP comes from the downward API; the test passes it as its flag twin.
    let env = c["env"].as_array().unwrap();
    let pod_ip = env
        .iter()
        .find(|e| e["name"] == "MESHID_SIDECAR_POD_IP")
        .unwrap();
    assert_eq!(pod_ip["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    // Runtime workers from the sidecar's CPU limit, whole cores rounded up (500m: one).
    let workers = env
        .iter()
        .find(|e| e["name"] == "TOKIO_WORKER_THREADS")
        .expect("TOKIO_WORKER_THREADS");
    assert_eq!(
        workers["valueFrom"]["resourceFieldRef"],
        serde_json::json!({"resource": "limits.cpu", "divisor": "1"})
    );
    argv.extend(["--pod-ip".to_owned(), "10.244.1.17".to_owned()]);
    // The trust bundle travels in MESHID_SIDECAR_CA_BUNDLE_PEM (no volume, so no ConfigMap in the pod's
    // namespace); passed here as its flag twin.
    let bundle = env
        .iter()
        .find(|e| e["name"] == "MESHID_SIDECAR_CA_BUNDLE_PEM")
        .expect("MESHID_SIDECAR_CA_BUNDLE_PEM");
    let bundle = bundle["value"].as_str().expect("a literal value");
    assert_eq!(bundle.matches("-----BEGIN CERTIFICATE-----").count(), 2);
    assert!(
        !argv.iter().any(|a| a == "--ca-bundle"),
        "no bundle file: {argv:?}"
    );
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    assert!(
        volumes.iter().all(|v| v.get("configMap").is_none()),
        "no ConfigMap volume: {volumes:?}"
    );
    argv.extend(["--ca-bundle-pem".to_owned(), bundle.to_owned()]);
    // The bundle cache (MESHID_SIDECAR_BUNDLE_CACHE): on a writable emptyDir of the sidecar's, which
    // outlives its container, so a sidecar restarted after a CA rotation still reaches the CA.
    let cache = env
        .iter()
        .find(|e| e["name"] == "MESHID_SIDECAR_BUNDLE_CACHE")
        .expect("MESHID_SIDECAR_BUNDLE_CACHE")["value"]
        .as_str()
        .expect("a literal value");
    let (mount_path, volume_name) = mounts
        .iter()
        .find(|(path, _)| cache.starts_with(&format!("{path}/")))
        .expect("the bundle cache is on a mounted volume");
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == mount_path.as_str())
        .unwrap();
    assert_ne!(
        mount["readOnly"], true,
        "the bundle cache's volume is writable"
    );
    let volume = volumes
        .iter()
        .find(|v| v["name"] == volume_name.as_str())
        .unwrap();
    assert!(volume.get("emptyDir").is_some(), "{volume}");
    argv.extend([
        "--bundle-cache".to_owned(),
        file(cache).to_string_lossy().into_owned(),
    ]);
    let config =
        run_config_from_args(&argv).unwrap_or_else(|problems| panic!("{argv:?}: {problems:?}"));
    match &config.creds {
        meshid_sidecar::settings::CredSource::Ca(mode) => {
            assert_eq!(mode.bundle_cache.as_deref(), Some(file(cache).as_path()));
        }
        other => panic!("CA mode expected: {other:?}"),
    }
    config
}

#[test]
fn deployment_pod_gets_a_native_sidecar() {
    let pod = deployment_pod(mesh_annotations());
    let (response, patched) = inject(Scope::Pod, &pod);
    assert_eq!(response["allowed"], true);
    let patched = patched.expect("a patch");
    save("deployment-pod", &patched);
    assert_eq!(
        patched["metadata"]["annotations"]["meshid.io/injected"],
        "v1"
    );
    // The app and its own volume are untouched.
    assert_eq!(patched["spec"]["containers"], pod["spec"]["containers"]);
    assert_eq!(patched["spec"]["volumes"][0], kube_api_access());
    let c = sidecar(&patched);
    // Probes on the admin port, Prometheus on the stats port (`/metrics`, `/identity`).
    assert_eq!(
        c["ports"],
        json!([
            {"name": "meshid-admin", "containerPort": 15021, "protocol": "TCP"},
            {"name": "meshid-stats", "containerPort": 15020, "protocol": "TCP"},
        ])
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for pair in [
        ["--admin-listen", "0.0.0.0:15021"],
        ["--stats-listen", "0.0.0.0:15020"],
    ] {
        assert!(
            args.windows(2).any(|w| w == pair),
            "{pair:?} not in {args:?}"
        );
    }
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["port"], 15021, "{probe}");
    }
    // A CA outage of minutes while pods start does not get the sidecar killed (it retries the CA
    // itself): the startup probe allows 10 minutes.
    let startup = &c["startupProbe"];
    let allowed =
        startup["periodSeconds"].as_u64().unwrap() * startup["failureThreshold"].as_u64().unwrap();
    assert!(allowed >= 600, "the startup probe allows {allowed} s");
    assert_eq!(c["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    let config = check_sidecar_config(&patched);
    assert_eq!(config.inbound.len(), 1);
    assert_eq!(config.inbound[0].listen.to_string(), "10.244.1.17:8080");
    assert_eq!(config.inbound[0].target.to_string(), "127.0.0.1:8080");
    assert_eq!(config.outbound[0].local.to_string(), "127.0.0.1:9001");
    assert_eq!(config.outbound[0].remote, "payments.shop.svc:8080");
    assert!(
        config.policy.is_some(),
        "the annotations file is the policy"
    );
}

#[test]
fn job_pod_keeps_its_init_containers_after_the_sidecar() {
    let mut pod = deployment_pod(json!({
        "meshid.io/inject": "enabled",
        "meshid.io/outbound": "9001=payments.shop.svc:8080,spiffe://cluster.local/ns/shop/sa/payments",
    }));
    pod["metadata"]["generateName"] = json!("nightly-report-28937460-");
    pod["metadata"]["labels"] = json!({"batch.kubernetes.io/job-name": "nightly-report-28937460",
        "batch.kubernetes.io/controller-uid": "9e1f"});
    pod["metadata"]["ownerReferences"] = json!([{"apiVersion": "batch/v1", "kind": "Job",
        "name": "nightly-report-28937460", "uid": "9e1f", "controller": true, "blockOwnerDeletion": true}]);
    pod["spec"]["restartPolicy"] = json!("Never");
    pod["spec"]["containers"][0]["ports"] = json!([]);
    pod["spec"]["initContainers"] = json!([{"name": "migrate", "image": "registry.example/migrate:2",
        "command": ["/migrate", "--wait"]}]);
    let (response, patched) = inject(Scope::Pod, &pod);
    assert_eq!(response["allowed"], true, "{response}");
    let patched = patched.unwrap();
    save("job-pod", &patched);
    let init = patched["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(init.len(), 2);
    assert_eq!(init[1]["name"], "migrate");
    // A native sidecar: the Job completes when its app container does.
    assert_eq!(sidecar(&patched)["restartPolicy"], "Always");
    let config = check_sidecar_config(&patched);
    assert!(config.inbound.is_empty());
    assert_eq!(config.outbound.len(), 1);
}

#[test]
fn probes_on_inbound_ports_move_to_the_admin_port() {
    let mut pod = deployment_pod(mesh_annotations());
    let app = &mut pod["spec"]["containers"][0];
    app["readinessProbe"] = json!({"httpGet": {"path": "/ready", "port": "http",
        "httpHeaders": [{"name": "x-probe", "value": "1"}]}, "periodSeconds": 5});
    app["livenessProbe"] = json!({"httpGet": {"path": "/live", "port": 8080}});
    app["startupProbe"] = json!({"httpGet": {"path": "/metrics", "port": "metrics"}});
    let (response, patched) = inject(Scope::Pod, &pod);
    assert_eq!(response["allowed"], true, "{response}");
    let patched = patched.unwrap();
    save("probes-pod", &patched);
    let app = &patched["spec"]["containers"][0];
    assert_eq!(
        app["readinessProbe"]["httpGet"],
        json!({"path": "/app-health/app/readiness", "port": 15021, "scheme": "HTTP",
               "httpHeaders": [{"name": "x-probe", "value": "1"}]})
    );
    assert_eq!(app["readinessProbe"]["periodSeconds"], 5);
    assert_eq!(
        app["livenessProbe"]["httpGet"]["path"],
        "/app-health/app/liveness"
    );
    // Port 9090 is not an inbound port: the kubelet reaches it directly.
    assert_eq!(
        app["startupProbe"],
        pod["spec"]["containers"][0]["startupProbe"]
    );
    let moved: Value = serde_json::from_str(
        patched["metadata"]["annotations"]["meshid.io/app-probes"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(moved["app/readiness"]["port"], 8080);
    assert_eq!(moved["app/readiness"]["path"], "/ready");
    check_sidecar_config(&patched);

    // A gRPC probe on an inbound port cannot be forwarded: refused, by name.
    let mut pod = deployment_pod(mesh_annotations());
    pod["spec"]["containers"][0]["livenessProbe"] = json!({"grpc": {"port": 8080}});
    let (response, patched) = inject(Scope::Pod, &pod);
    assert!(patched.is_none());
    assert_eq!(response["allowed"], false);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(message.contains("gRPC livenessProbe"), "{message}");
}

/// The sidecar forwards moved probes over plain HTTP only: an HTTPS httpGet probe on an inbound
/// port would answer 502 for ever, so the pod is refused, naming the container and the probe. On a
/// port the sidecar does not take, the kubelet reaches the app directly: left as it is.
#[test]
fn https_probes_on_inbound_ports_are_refused_by_container_and_probe() {
    let mut pod = deployment_pod(mesh_annotations());
    let app = &mut pod["spec"]["containers"][0];
    app["readinessProbe"] =
        json!({"httpGet": {"path": "/ready", "port": "http", "scheme": "HTTPS"}});
    app["livenessProbe"] = json!({"httpGet": {"path": "/live", "port": 8080, "scheme": "HTTP"}});
    let (response, patched) = inject(Scope::Pod, &pod);
    assert!(patched.is_none(), "{response}");
    assert_eq!(response["allowed"], false);
    let message = response["status"]["message"].as_str().unwrap();
    for needle in [
        "container app",
        "readinessProbe",
        "HTTPS",
        "inbound port 8080",
    ] {
        assert!(message.contains(needle), "{needle:?} not in {message}");
    }
    assert!(!message.contains("livenessProbe"), "{message}");

    let mut pod = deployment_pod(mesh_annotations());
    pod["spec"]["containers"][0]["readinessProbe"] =
        json!({"httpGet": {"path": "/metrics", "port": "metrics", "scheme": "HTTPS"}});
    let (response, patched) = inject(Scope::Pod, &pod);
    assert_eq!(response["allowed"], true, "{response}");
    let patched = patched.unwrap();
    assert_eq!(
        patched["spec"]["containers"][0]["readinessProbe"],
        pod["spec"]["containers"][0]["readinessProbe"]
    );
    assert!(
        patched["metadata"]["annotations"]
            .get("meshid.io/app-probes")
            .is_none()
    );
}

/// Native sidecars (init containers with `restartPolicy: Always`) run beside the app and may have
/// probes: one on an inbound port moves to the admin port like an app container's (at its index
/// behind the injected sidecar), a gRPC one is refused.
#[test]
fn native_sidecar_probes_on_inbound_ports_move_too() {
    let mut pod = deployment_pod(mesh_annotations());
    pod["spec"]["initContainers"] = json!([
        {"name": "setup", "image": "setup:1"},
        {"name": "proxy", "image": "proxy:1", "restartPolicy": "Always",
         "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}},
         "livenessProbe": {"tcpSocket": {"port": 8080}}},
    ]);
    let (response, patched) = inject(Scope::Pod, &pod);
    assert_eq!(response["allowed"], true, "{response}");
    let patched = patched.unwrap();
    save("native-sidecar-probes-pod", &patched);
    let init = patched["spec"]["initContainers"].as_array().unwrap();
    let names: Vec<&str> = init.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["meshid-sidecar", "setup", "proxy"]);
    assert_eq!(
        init[2]["readinessProbe"]["httpGet"],
        json!({"path": "/app-health/proxy/readiness", "port": 15021, "scheme": "HTTP"})
    );
    assert_eq!(
        init[2]["livenessProbe"],
        json!({"tcpSocket": {"port": 8080}})
    );
    assert_eq!(init[1], pod["spec"]["initContainers"][0], "setup untouched");
    let moved: Value = serde_json::from_str(
        patched["metadata"]["annotations"]["meshid.io/app-probes"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        moved,
        json!({"proxy/readiness": {"port": 8080, "path": "/ready", "scheme": "HTTP"}})
    );
    let config = check_sidecar_config(&patched);
    drop(config);

    pod["spec"]["initContainers"][1]["startupProbe"] = json!({"grpc": {"port": 8080}});
    let (response, patched) = inject(Scope::Pod, &pod);
    assert!(patched.is_none());
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("container proxy") && message.contains("gRPC startupProbe"),
        "{message}"
    );
}

/// `meshid.io/app-probes` tells the sidecar which localhost ports and paths its admin port (open to
/// the network for the kubelet) forwards to, and `meshid.io/injected` says the injector did its
/// work: only the injector writes them. Preset at creation, app-probes is replaced by what the
/// injector moved or removed when it moved nothing, and injected is overwritten (a pod is injected
/// unless it runs the sidecar); an UPDATE may not add, change or remove either.
#[test]
fn injector_owned_annotations_cannot_be_preset_or_updated() {
    let forged = r#"{"app/readiness":{"port":6060,"path":"/debug/pprof/"}}"#;
    let mut annotations = mesh_annotations();
    annotations["meshid.io/app-probes"] = json!(forged);
    annotations["meshid.io/injected"] = json!("v1");
    let (response, patched) = inject(Scope::Pod, &deployment_pod(annotations.clone()));
    assert_eq!(response["allowed"], true, "{response}");
    let patched = patched.expect("injected despite the preset meshid.io/injected");
    sidecar(&patched);
    let set = &patched["metadata"]["annotations"];
    assert!(set.get("meshid.io/app-probes").is_none(), "{set}");
    assert_eq!(set["meshid.io/injected"], "v1");

    // With a probe moved: the recorded one, not the preset one.
    let mut pod = deployment_pod(annotations);
    pod["spec"]["containers"][0]["readinessProbe"] =
        json!({"httpGet": {"path": "/ready", "port": 8080}});
    let (_, patched) = inject(Scope::Pod, &pod);
    let recorded: Value = serde_json::from_str(
        patched.unwrap()["metadata"]["annotations"]["meshid.io/app-probes"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        recorded,
        json!({"app/readiness": {"port": 8080, "path": "/ready", "scheme": "HTTP"}})
    );

    // UPDATEs of an injected pod.
    let (_, injected) = inject(Scope::Pod, &deployment_pod(mesh_annotations()));
    let injected = injected.unwrap();
    let update = |new: &Value| {
        let mut r = admission_review("shop", new.clone());
        r["request"]["operation"] = json!("UPDATE");
        r["request"]["oldObject"] = injected.clone();
        review(&config(), Scope::Pod, &r)["response"].clone()
    };
    let with = |key: &str, value: Option<&str>| {
        let mut pod = injected.clone();
        let annotations = pod["metadata"]["annotations"].as_object_mut().unwrap();
        match value {
            Some(v) => annotations.insert(key.to_owned(), json!(v)),
            None => annotations.remove(key),
        };
        pod
    };
    for (key, value) in [
        ("meshid.io/app-probes", Some(forged)),
        ("meshid.io/injected", Some("v2")),
        ("meshid.io/injected", None),
    ] {
        let response = update(&with(key, value));
        assert_eq!(response["allowed"], false, "{key}={value:?}: {response}");
        let message = response["status"]["message"].as_str().unwrap();
        assert!(
            message.contains(key) && message.contains("set by the injector"),
            "{message}"
        );
    }
    // Changing the allow list and keeping the injector's annotations: admitted.
    let response = update(&with(
        "meshid.io/allow-8080",
        Some("spiffe://cluster.local/ns/ops/sa/*"),
    ));
    assert_eq!(response["allowed"], true, "{response}");
}

/// The sidecar's admin (15021) and stats (15020) ports are its own: a container that declares one
/// is refused by name, and so is a pod with more containers than any real pod has (its patch would
/// grow with each one).
#[test]
fn pods_taking_the_sidecar_ports_or_absurdly_many_containers_are_refused() {
    let mut pod = deployment_pod(mesh_annotations());
    pod["spec"]["containers"][0]["ports"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "admin", "containerPort": 15021, "protocol": "TCP"}));
    pod["spec"]["initContainers"] = json!([{"name": "agent", "image": "agent:1",
        "restartPolicy": "Always", "ports": [{"containerPort": 15020}]}]);
    let (response, patched) = inject(Scope::Pod, &pod);
    assert!(patched.is_none());
    let message = response["status"]["message"].as_str().unwrap();
    for needle in [
        "container app: declares port 15021, the sidecar's admin port",
        "container agent: declares port 15020, the sidecar's stats port",
    ] {
        assert!(message.contains(needle), "{needle:?} not in {message}");
    }

    let mut pod = deployment_pod(mesh_annotations());
    let app = pod["spec"]["containers"][0].clone();
    pod["spec"]["containers"] = Value::Array(
        (0..=meshid_injector::MAX_CONTAINERS)
            .map(|i| {
                let mut c = app.clone();
                c["name"] = json!(format!("app-{i}"));
                c
            })
            .collect(),
    );
    let (response, patched) = inject(Scope::Pod, &pod);
    assert!(patched.is_none());
    let message = response["status"]["message"].as_str().unwrap();
    assert!(message.contains("129 containers"), "{message}");
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .truncate(meshid_injector::MAX_CONTAINERS);
    assert_eq!(inject(Scope::Pod, &pod).0["allowed"], true);
}

#[test]
fn bad_annotations_deny_the_pod_naming_each_problem() {
    struct Case {
        name: &'static str,
        annotations: Value,
        expected: &'static [&'static str],
    }
    let cases = [
        Case {
            name: "unknown protocol",
            annotations: json!({"meshid.io/inject": "enabled", "meshid.io/inbound": "8080=udp"}),
            expected: &["meshid.io/inbound", "unknown protocol \"udp\""],
        },
        Case {
            name: "port declared twice",
            annotations: json!({"meshid.io/inject": "enabled", "meshid.io/inbound": "8080=http,8080=tcp"}),
            expected: &["meshid.io/inbound", "port 8080 is declared twice"],
        },
        Case {
            name: "malformed SPIFFE ID in an allow list",
            annotations: json!({"meshid.io/inject": "enabled", "meshid.io/inbound": "8080=http",
                "meshid.io/allow-8080": "spiffe://cluster.local/ns/shop/sa/front*end"}),
            expected: &["meshid.io/allow-8080"],
        },
        Case {
            name: "malformed upstream and mode together",
            annotations: json!({"meshid.io/inject": "enabled",
                "meshid.io/outbound": "9001=payments.shop.svc:8080,spiffe://cluster.local/ns/shop/sa/../x",
                "meshid.io/mode": "permissive"}),
            expected: &[
                "meshid.io/outbound",
                "not a SPIFFE ID",
                "meshid.io/mode",
                "permissive",
            ],
        },
        Case {
            name: "allow list for an undeclared port",
            annotations: json!({"meshid.io/inject": "enabled", "meshid.io/inbound": "8080",
                "meshid.io/allow-9000": FRONTEND}),
            expected: &["meshid.io/allow-9000", "not declared"],
        },
        Case {
            name: "the sidecar's admin port",
            annotations: json!({"meshid.io/inject": "enabled", "meshid.io/inbound": "15021=http"}),
            expected: &["meshid.io/inbound", "admin port"],
        },
        Case {
            name: "the sidecar's stats port",
            annotations: json!({"meshid.io/inject": "enabled", "meshid.io/inbound": "8080=http",
                "meshid.io/outbound": "15020=db.shop.svc:5432,spiffe://cluster.local/ns/shop/sa/db,tcp"}),
            expected: &[
                "meshid.io/outbound",
                "port 15020 is the sidecar's stats port",
            ],
        },
        Case {
            name: "bad inject value",
            annotations: json!({"meshid.io/inject": "yes"}),
            expected: &["meshid.io/inject", "\"yes\""],
        },
        Case {
            name: "nothing to do",
            annotations: json!({"meshid.io/inject": "enabled"}),
            expected: &["meshid.io/inject", "nothing to do"],
        },
        Case {
            name: "a misspelt name",
            annotations: json!({"meshid.io/inject": "enabled", "meshid.io/inbound": "8080=http",
                "meshid.io/alow-8080": FRONTEND}),
            expected: &["meshid.io/alow-8080", "no meshid annotation has this name"],
        },
    ];
    for case in cases {
        let (response, patched) = inject(Scope::Pod, &deployment_pod(case.annotations));
        assert!(patched.is_none(), "{}: no patch on a denial", case.name);
        assert_eq!(response["allowed"], false, "{}", case.name);
        assert_eq!(response["status"]["code"], 400);
        let message = response["status"]["message"].as_str().unwrap();
        for needle in case.expected {
            assert!(
                message.contains(needle),
                "{}: {needle:?} not in {message}",
                case.name
            );
        }
    }
}

/// A misspelt `meshid.io/*` name is refused, not passed over: in an opted-in namespace a pod whose
/// only port annotation is misspelt was admitted without a sidecar, and no word said. An update
/// that adds one is refused too; one a running pod already carried does not hold up its updates.
#[test]
fn misspelt_meshid_annotations_are_named() {
    let typo = json!({"meshid.io/inbond": "8080=http"});
    let (response, patched) = inject(Scope::Namespace, &deployment_pod(typo.clone()));
    assert!(patched.is_none());
    assert_eq!(response["allowed"], false);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("annotation meshid.io/inbond: no meshid annotation has this name")
            && message.contains("meshid.io/inbound"),
        "{message}"
    );
    // Thousands of them: eight named, the rest counted.
    let mut many = serde_json::Map::new();
    for i in 0..1_000 {
        many.insert(format!("meshid.io/x{i}"), json!("1"));
    }
    let (response, _) = inject(Scope::Namespace, &deployment_pod(Value::Object(many)));
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("992 more meshid.io/* annotations"),
        "{message}"
    );
    assert!(message.len() < 4_000, "{}", message.len());
    let update = |old: Value, new: Value| {
        let mut r = admission_review("shop", deployment_pod(new));
        r["request"]["operation"] = json!("UPDATE");
        r["request"]["oldObject"] = deployment_pod(old);
        review(&config(), Scope::Pod, &r)["response"].clone()
    };
    let mut with_typo = mesh_annotations();
    with_typo["meshid.io/inbond"] = json!("9000");
    assert_eq!(
        update(mesh_annotations(), with_typo.clone())["allowed"],
        false
    );
    let mut changed = with_typo.clone();
    changed["meshid.io/mode"] = json!("audit");
    assert_eq!(update(with_typo, changed)["allowed"], true);
}

/// Only the injector adds its sidecar: a pod that asks for injection and declares a container named
/// `meshid-sidecar` itself (a copy of an injected pod, or a fake sidecar with forged annotations,
/// which would look meshed while skipping every check) is refused, telling the user to drop it.
#[test]
fn pods_declaring_the_sidecar_are_refused_and_those_not_asking_are_left_alone() {
    let (_, patched) = inject(Scope::Pod, &deployment_pod(mesh_annotations()));
    let (response, again) = inject(Scope::Pod, &patched.unwrap());
    assert_eq!(response["allowed"], false, "a copy of an injected pod");
    assert!(again.is_none());
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains(
            "init container meshid-sidecar: the pod declares the injector's own container"
        ),
        "{message}"
    );

    // A fake sidecar (as an init container or an app container) beside forged annotations and a
    // hostNetwork spec the injector would refuse: refused by name, never admitted unchecked.
    for (list, what) in [
        ("initContainers", "init container"),
        ("containers", "container"),
    ] {
        let mut annotations = mesh_annotations();
        annotations["meshid.io/injected"] = json!("v1");
        annotations["meshid.io/app-probes"] = json!(r#"{"app/liveness":{"port":22}}"#);
        let mut pod = deployment_pod(annotations);
        pod["spec"]["hostNetwork"] = json!(true);
        let fake = json!({"name": "meshid-sidecar", "image": "registry.evil/sidecar:1",
            "restartPolicy": "Always"});
        match pod["spec"][list].as_array_mut() {
            Some(containers) => containers.push(fake),
            None => pod["spec"][list] = json!([fake]),
        }
        for scope in [Scope::Pod, Scope::Namespace] {
            let (response, patched) = inject(scope, &pod);
            assert!(patched.is_none(), "{list}");
            assert_eq!(response["allowed"], false, "{list}: {response}");
            assert_eq!(response["status"]["code"], 400);
            let message = response["status"]["message"].as_str().unwrap();
            for needle in [
                &format!("{what} meshid-sidecar"),
                "remove it from the pod spec and let the injector add it",
            ] {
                assert!(message.contains(needle), "{needle:?} not in {message}");
            }
        }
    }

    // No annotation at all: injected only when its namespace opted in.
    let mut pod = deployment_pod(json!({"meshid.io/inbound": "8080=http"}));
    assert!(inject(Scope::Pod, &pod).1.is_none());
    let (_, patched) = inject(Scope::Namespace, &pod);
    save("namespace-pod", patched.as_ref().unwrap());
    pod["metadata"]["annotations"]["meshid.io/inject"] = json!("disabled");
    assert!(inject(Scope::Namespace, &pod).1.is_none());

    // hostNetwork pods share the node's ports, and pods whose containers see the sidecar's
    // process (a shared process namespace, the node's) could stop it: refused, by name.
    for field in ["hostNetwork", "shareProcessNamespace", "hostPID"] {
        let mut pod = deployment_pod(mesh_annotations());
        pod["spec"][field] = json!(true);
        let (response, patched) = inject(Scope::Pod, &pod);
        assert_eq!(response["allowed"], false, "{field}");
        assert!(patched.is_none(), "{field}");
        assert!(
            response["status"]["message"]
                .as_str()
                .unwrap()
                .contains(field),
            "{field}: {response}"
        );
        // Set to false, the same pod is injected.
        pod["spec"][field] = json!(false);
        assert!(inject(Scope::Pod, &pod).1.is_some(), "{field}: false");
    }

    // In an opted-in namespace, a pod that declares no ports (here: no annotations at all) is
    // admitted unchanged; asked for explicitly, it is refused (see the bad-annotations cases).
    let mut pod = deployment_pod(json!({}));
    pod["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    let (response, patched) = inject(Scope::Namespace, &pod);
    assert_eq!(
        response["allowed"], true,
        "namespace-wide, but no ports: {response}"
    );
    assert!(patched.is_none());
}

#[test]
fn other_requests_pass_through() {
    // An UPDATE with valid meshid annotations: admitted, never patched (even without a sidecar).
    let mut r = admission_review("shop", deployment_pod(mesh_annotations()));
    r["request"]["operation"] = json!("UPDATE");
    r["request"]["oldObject"] = deployment_pod(json!({}));
    let out = review(&config(), Scope::Pod, &r);
    assert_eq!(out["response"]["allowed"], true);
    assert!(out["response"].get("patch").is_none());
    // Other operations are not looked at.
    for operation in ["DELETE", "CONNECT"] {
        let mut r = admission_review("shop", deployment_pod(json!({"meshid.io/inject": "yes"})));
        r["request"]["operation"] = json!(operation);
        let out = review(&config(), Scope::Pod, &r);
        assert_eq!(out["response"]["allowed"], true, "{operation}");
    }
    r["request"]["operation"] = json!("CREATE");
    r["request"]["subResource"] = json!("ephemeralcontainers");
    let out = review(&config(), Scope::Pod, &r);
    assert!(out["response"].get("patch").is_none());
    let out = review(&config(), Scope::Pod, &json!({"kind": "AdmissionReview"}));
    assert_eq!(out["response"]["allowed"], false);
}

/// An UPDATE of an injected pod as the API server sends it for `kubectl set image` (the chart's
/// matchCondition forwards image changes of pods that run the sidecar): the sidecar's image may
/// not change, the app's may.
#[test]
fn set_image_may_not_replace_the_injected_sidecar() {
    let (_, injected) = inject(Scope::Pod, &deployment_pod(mesh_annotations()));
    let old = injected.unwrap();
    let set_image = |container: &str, image: &str| {
        let mut pod = old.clone();
        for list in ["initContainers", "containers"] {
            for c in pod["spec"][list].as_array_mut().unwrap() {
                if c["name"] == container {
                    c["image"] = json!(image);
                }
            }
        }
        let mut r = admission_review("shop", pod);
        r["request"]["operation"] = json!("UPDATE");
        r["request"]["oldObject"] = old.clone();
        r["request"]["options"] = json!({"apiVersion": "meta.k8s.io/v1", "kind": "UpdateOptions"});
        r["request"]["userInfo"] =
            json!({"username": "tenant", "groups": ["system:authenticated"]});
        review(&config(), Scope::Pod, &r)["response"].clone()
    };
    let response = set_image("meshid-sidecar", "registry.evil/sidecar:1");
    assert_eq!(response["allowed"], false, "{response}");
    let message = response["status"]["message"].as_str().unwrap();
    for needle in [
        "init container meshid-sidecar",
        "may not change its image",
        "registry.evil/sidecar:1",
    ] {
        assert!(message.contains(needle), "{needle:?} not in {message}");
    }
    let response = set_image("app", "registry.example/backend:1.4.3");
    assert_eq!(response["allowed"], true, "{response}");
    assert!(response.get("patch").is_none());
}

/// `kubectl debug` as the API server sends it: an UPDATE of the `pods/ephemeralcontainers`
/// subresource whose object is the whole pod. An ephemeral container that mounts one of the
/// sidecar's volumes, takes its name or targets it is refused; a plain debugger is admitted.
#[test]
fn ephemeral_containers_may_not_mount_the_sidecars_volumes() {
    let (_, injected) = inject(Scope::Pod, &deployment_pod(mesh_annotations()));
    let old = injected.unwrap();
    let debug = |container: Value| {
        let mut pod = old.clone();
        pod["spec"]["ephemeralContainers"] = json!([container]);
        let mut r = admission_review("shop", pod);
        let request = &mut r["request"];
        request["name"] = json!("backend-7d4b9c8f6-x2x9q");
        request["operation"] = json!("UPDATE");
        request["subResource"] = json!("ephemeralcontainers");
        request["requestSubResource"] = json!("ephemeralcontainers");
        request["oldObject"] = old.clone();
        request["options"] = json!({"apiVersion": "meta.k8s.io/v1", "kind": "UpdateOptions"});
        review(&config(), Scope::Pod, &r)["response"].clone()
    };
    for volume in meshid_injector::RESERVED_VOLUMES {
        let response = debug(json!({"name": "debugger-abc12", "image": "busybox:1.36",
            "stdin": true, "tty": true, "terminationMessagePolicy": "File",
            "volumeMounts": [{"name": volume, "mountPath": "/mnt"}]}));
        assert_eq!(response["allowed"], false, "{volume}: {response}");
        assert_eq!(response["status"]["code"], 400);
        let message = response["status"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!(
                "ephemeral container debugger-abc12: mounts volume {volume}"
            )),
            "{message}"
        );
    }
    let response = debug(json!({"name": "meshid-sidecar", "image": "busybox:1.36"}));
    assert_eq!(response["allowed"], false, "{response}");
    let response = debug(json!({"name": "debugger-abc12", "image": "busybox:1.36",
        "targetContainerName": "meshid-sidecar"}));
    assert_eq!(response["allowed"], false, "{response}");
    let response = debug(json!({"name": "debugger-abc12", "image": "busybox:1.36",
        "targetContainerName": "app"}));
    assert_eq!(response["allowed"], true, "{response}");
    assert!(response.get("patch").is_none());
}

/// What the API server never sends is answered with an error naming what is wrong, never a patch:
/// a request without a uid (its answer could not be matched to it), an envelope whose top-level
/// kind is not AdmissionReview (or missing).
#[test]
fn reviews_without_a_uid_or_of_another_kind_are_refused() {
    let pod = deployment_pod(mesh_annotations());
    let mut no_uid = admission_review("shop", pod.clone());
    no_uid["request"].as_object_mut().unwrap().remove("uid");
    let mut empty_uid = admission_review("shop", pod.clone());
    empty_uid["request"]["uid"] = json!("");
    let mut other_kind = admission_review("shop", pod.clone());
    other_kind["kind"] = json!("Pod");
    let mut no_kind = admission_review("shop", pod);
    no_kind.as_object_mut().unwrap().remove("kind");
    for (r, needle) in [
        (no_uid, "no uid"),
        (empty_uid, "no uid"),
        (other_kind, "kind \"Pod\" is not AdmissionReview"),
        (no_kind, "kind (none) is not AdmissionReview"),
    ] {
        let out = review(&config(), Scope::Pod, &r);
        let response = &out["response"];
        assert_eq!(response["allowed"], false, "{needle}: {response}");
        assert_eq!(response["status"]["code"], 400);
        assert!(response.get("patch").is_none(), "{needle}");
        let message = response["status"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{needle:?} not in {message}");
    }
}

/// The chart's MutatingWebhookConfiguration, rendered by helm: both entries (namespace-wide and
/// per-pod) see pod CREATEs and UPDATEs, UPDATEs only when they touch a `meshid.io/*` annotation
/// or change an image of a pod running the sidecar (`kubectl set image`), and ephemeral containers
/// added to pods with meshid's volumes (`pods/ephemeralcontainers`, `kubectl debug`);
/// the per-pod entry CREATEs only of pods whose `meshid.io/inject` annotation asks for injection
/// (so an injector outage cannot block pods that never asked), with `injector.failurePolicy` as
/// set; two injector replicas spread softly with a PodDisruptionBudget; the injector's own
/// NetworkPolicy (webhook port from `injector.networkPolicy.webhookFrom`, any source by default;
/// admin port only from the metrics selectors; no egress), the shared policy admitting none of the
/// injector's ports; and the PrometheusRule warns about a sidecar that rejected its newest policy. Needs the tools of `scripts/k8s/install-tools.sh`; without them this test says
/// so and checks nothing, except under `scripts/k8s/check.sh` (which sets `MESHID_INJECT_OUT` and
/// installs them), where it fails.
#[test]
fn chart_webhook_sees_creates_meshid_updates_and_ephemeral_containers() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(
        &bundle,
        meshid_tests::pki::pem(&meshid_tests::pki::ForeignCa::new().root_der),
    )
    .unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, r#"{"keys":[]}"#).unwrap();
    let required = [
        "--set".to_owned(),
        "ca.existingSecret=meshid-ca".to_owned(),
        "--set-file".to_owned(),
        format!("ca.trustBundle={}", bundle.display()),
        "--set-file".to_owned(),
        format!("ca.jwks={}", jwks.display()),
    ];
    for (extra, policy) in [
        (&[][..], "Fail"),
        (
            &[
                "--set",
                "injector.failurePolicy=Ignore",
                "--set",
                "prometheusRule.enabled=true",
                "--set",
                "sidecar.logFormat=text",
                "--set-json",
                r#"injector.networkPolicy.webhookFrom=[{"ipBlock":{"cidr":"10.0.0.0/24"}}]"#,
            ][..],
            "Ignore",
        ),
    ] {
        let mut args: Vec<&str> = required.iter().map(String::as_str).collect();
        args.extend(extra);
        let Some(docs) = meshid_tests::tools::render_chart(&args) else {
            assert!(
                std::env::var_os("MESHID_INJECT_OUT").is_none(),
                "helm is missing: run scripts/k8s/install-tools.sh"
            );
            eprintln!("helm not installed (scripts/k8s/install-tools.sh): chart not checked");
            return;
        };
        let webhook = docs
            .iter()
            .find(|d| d["kind"] == "MutatingWebhookConfiguration")
            .expect("the webhook configuration");
        let entries = webhook["webhooks"].as_array().unwrap();
        let names: Vec<&str> = entries
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["namespace.inject.meshid.io", "pod.inject.meshid.io"]
        );
        for entry in entries {
            let name = &entry["name"];
            assert_eq!(entry["failurePolicy"], policy, "{name}");
            assert_eq!(
                entry["rules"],
                json!([{"operations": ["CREATE", "UPDATE"], "apiGroups": [""],
                    "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"},
                    {"operations": ["UPDATE"], "apiGroups": [""], "apiVersions": ["v1"],
                    "resources": ["pods/ephemeralcontainers", "pods/status"],
                    "scope": "Namespaced"}]),
                "{name}"
            );
            // Only UPDATEs that add, change or remove a meshid annotation, or change an image of
            // a pod running the sidecar, are sent: other pod updates never depend on the
            // injector (its failurePolicy does not apply to them). scripts/k8s/check.sh
            // evaluates these expressions on sample requests (scripts/k8s/match_conditions.py).
            let conditions = entry["matchConditions"].as_array().unwrap();
            assert_eq!(conditions[0]["name"], "create-or-meshid-update", "{name}");
            // Ephemeral containers only of pods with meshid's volumes.
            assert_eq!(
                conditions[1]["name"], "ephemeral-containers-of-meshid-pods",
                "{name}"
            );
            let expression = conditions[1]["expression"].as_str().unwrap();
            for needle in [
                "!has(request.subResource) || request.subResource != 'ephemeralcontainers' ||",
                "object.spec.volumes.exists(v, v.name.startsWith('meshid-'))",
            ] {
                assert!(
                    expression.contains(needle),
                    "{name}: {needle:?} not in {expression}"
                );
            }
            if name == "pod.inject.meshid.io" {
                // Outside opted-in namespaces, only pods that ask for injection are sent on
                // CREATE (ANDed with the UPDATE conditions, which let every CREATE through).
                assert_eq!(conditions.len(), 3, "{name}");
                assert_eq!(conditions[2]["name"], "create-only-when-asked");
                let expression = conditions[2]["expression"].as_str().unwrap();
                for needle in [
                    "request.operation != 'CREATE' ||",
                    "has(object.metadata.annotations)",
                    "'meshid.io/inject' in object.metadata.annotations",
                    "object.metadata.annotations['meshid.io/inject'] != 'disabled'",
                ] {
                    assert!(
                        expression.contains(needle),
                        "{name}: {needle:?} not in {expression}"
                    );
                }
            } else {
                // An opted-in namespace asked for every pod.
                assert_eq!(conditions.len(), 2, "{name}");
            }
            let expression = conditions[0]["expression"].as_str().unwrap();
            for needle in [
                "request.operation != 'UPDATE' ||",
                "(has(request.subResource) && request.subResource == 'ephemeralcontainers') ||",
                "k.startsWith('meshid.io/')",
                "oldObject.metadata.annotations[k] == object.metadata.annotations[k]",
                "k in object.metadata.annotations",
                "oldObject.spec.initContainers.exists(c, c.name == 'meshid-sidecar')",
                "object.spec.containers.map(c, c.name + '=' + c.image) !=",
                "object.spec.initContainers.map(c, c.name + '=' + c.image) !=",
            ] {
                assert!(
                    expression.contains(needle),
                    "{name}: {needle:?} not in {expression}"
                );
            }
        }
        check_injector_availability_and_network(&docs, policy == "Ignore");
        // Injected sidecars log in `sidecar.logFormat`, whatever the injector's own format.
        let args = docs
            .iter()
            .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "meshid-injector")
            .map(|d| d["spec"]["template"]["spec"]["containers"][0]["args"].to_string())
            .unwrap();
        let want = if policy == "Ignore" { "text" } else { "json" };
        assert!(
            args.contains(&format!("\"--sidecar-log-format={want}\"")),
            "{args}"
        );
        // The CA takes tokens of at most an hour (a copied one gets certificates until it
        // expires); the injected ones live 10 minutes.
        assert!(
            args.contains("\"--token-expiration-seconds=600\""),
            "{args}"
        );
        let ca_args = docs
            .iter()
            .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "meshid-ca")
            .map(|d| d["spec"]["template"]["spec"]["containers"][0]["args"].to_string())
            .unwrap();
        assert!(ca_args.contains("\"--max-token-lifetime=1h\""), "{ca_args}");
        let rule = docs
            .iter()
            .filter(|d| d["kind"] == "PrometheusRule")
            .flat_map(|d| d["spec"]["groups"].as_array().unwrap())
            .flat_map(|g| g["rules"].as_array().unwrap())
            .find(|r| r["alert"] == "MeshidSidecarPolicyRejected");
        if policy == "Fail" {
            assert!(rule.is_none(), "the PrometheusRule is opt-in");
            continue;
        }
        let rule = rule.expect("MeshidSidecarPolicyRejected");
        assert_eq!(rule["expr"], "meshid_sidecar_policy_rejected == 1");
        assert_eq!(rule["for"], "1m");
        assert_eq!(rule["labels"]["severity"], "warning");
        let text = rule["annotations"].to_string();
        for needle in ["not applied", "check-policy", "kubectl logs"] {
            assert!(text.contains(needle), "{needle:?} not in {text}");
        }
        let rule = docs
            .iter()
            .filter(|d| d["kind"] == "PrometheusRule")
            .flat_map(|d| d["spec"]["groups"].as_array().unwrap())
            .flat_map(|g| g["rules"].as_array().unwrap())
            .find(|r| r["alert"] == "MeshidCaDirectoryRejected")
            .expect("MeshidCaDirectoryRejected");
        assert_eq!(rule["expr"], "meshid_ca_directory_rejected == 1");
        assert_eq!(rule["for"], "1m");
        assert_eq!(rule["labels"]["severity"], "warning");
        let text = rule["annotations"].to_string();
        for needle in [
            "not applied",
            "stale copy",
            "kubectl logs",
            "every second",
            "older meshid",
        ] {
            assert!(text.contains(needle), "{needle:?} not in {text}");
        }
    }
}

/// The rendered chart's injector: two replicas spread softly across nodes and zones, a
/// PodDisruptionBudget keeping one up, and its own NetworkPolicy (`narrowed`: webhookFrom set to an
/// ipBlock).
fn check_injector_availability_and_network(docs: &[Value], narrowed: bool) {
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind} {name} not rendered"))
    };
    let injector_labels = json!({"app.kubernetes.io/name": "meshid",
        "app.kubernetes.io/instance": "meshid", "app.kubernetes.io/component": "injector"});
    let deployment = find("Deployment", "meshid-injector");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    let preferred =
        &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(
        preferred["podAffinityTerm"]["topologyKey"],
        "kubernetes.io/hostname"
    );
    assert_eq!(
        preferred["podAffinityTerm"]["labelSelector"]["matchLabels"],
        injector_labels
    );
    assert!(
        pod["affinity"]["podAntiAffinity"]
            .get("requiredDuringSchedulingIgnoredDuringExecution")
            .is_none(),
        "soft by default"
    );
    let spread = &pod["topologySpreadConstraints"][0];
    assert_eq!(spread["topologyKey"], "topology.kubernetes.io/zone");
    assert_eq!(spread["whenUnsatisfiable"], "ScheduleAnyway");
    let args = pod["containers"][0]["args"].to_string();
    for flag in [
        "--max-connections=512",
        "--max-connections-per-source=64",
        "--header-read-timeout=10s",
        "--request-timeout=10s",
        "--max-request-bytes=1048576",
        "--review-memory=50331648",
        "--review-wait=3s",
        "--shutdown-delay=5s",
        "--shutdown-grace=5s",
    ] {
        assert!(args.contains(flag), "{flag} not in {args}");
    }
    // The review memory, the process and its connections' buffers fit the memory limit; glibc
    // gives large blocks back (see the memory test in inject_binary.rs).
    assert_eq!(
        pod["containers"][0]["resources"]["limits"]["memory"],
        "128Mi"
    );
    assert!(
        pod["containers"][0]["env"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "MALLOC_MMAP_THRESHOLD_", "value": "131072"})),
        "{}",
        pod["containers"][0]["env"]
    );
    assert_eq!(pod["terminationGracePeriodSeconds"], 30);
    let pdb = find("PodDisruptionBudget", "meshid-injector");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], injector_labels);

    // The shared policy admits none of the injector's ports (policies add up: it would widen the
    // injector's own).
    let shared = find("NetworkPolicy", "meshid");
    let shared_ports = shared["spec"]["ingress"].to_string();
    for port in ["9443", "9444"] {
        assert!(
            !shared_ports.contains(port),
            "{port} in the shared policy: {shared_ports}"
        );
    }
    let policy = find("NetworkPolicy", "meshid-injector");
    let spec = &policy["spec"];
    assert_eq!(spec["podSelector"]["matchLabels"], injector_labels);
    assert_eq!(spec["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(spec["egress"], json!([]), "the injector calls nothing");
    let ingress = spec["ingress"].as_array().unwrap();
    assert_eq!(ingress.len(), 2, "{ingress:?}");
    assert_eq!(
        ingress[0]["ports"],
        json!([{"port": 9443, "protocol": "TCP"}])
    );
    if narrowed {
        assert_eq!(
            ingress[0]["from"],
            json!([{"ipBlock": {"cidr": "10.0.0.0/24"}}])
        );
    } else {
        // The API server's addresses are cluster-specific: any source, to this port only.
        assert!(ingress[0].get("from").is_none(), "{}", ingress[0]);
    }
    assert_eq!(
        ingress[1]["ports"],
        json!([{"port": 9444, "protocol": "TCP"}])
    );
    assert_eq!(
        ingress[1]["from"],
        json!([{"namespaceSelector": {},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}])
    );
}
