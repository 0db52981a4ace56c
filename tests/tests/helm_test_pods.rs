//! The chart rendered and checked without a cluster. Its `helm test` of the mesh: the server and
//! client carry annotations that the sidecar's own parser accepts, that wire the client's two
//! upstreams to the server's two ports through the test Service, and whose policy allows the client
//! on one port and denies it on the other, exactly what the test pod asserts (200, then 403). The
//! CA's NetworkPolicy: gRPC for every sidecar, the admin port only for the chosen peers. Needs the
//! tools of `scripts/k8s/install-tools.sh` (as `scripts/k8s/check.sh` runs it); without them it
//! says so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use meshid_identity::SpiffeId;
use meshid_identity::annotations::MeshAnnotations;
use meshid_tests::tools::render_chart;
use serde_json::Value;

fn annotations(v: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(v.clone()).unwrap()
}

/// The chart rendered with `extra` values, or `None` without helm (outside `scripts/k8s/check.sh`).
fn render(extra: &[&str]) -> Option<Vec<Value>> {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(
        &bundle,
        meshid_tests::pki::pem(&meshid_tests::pki::ForeignCa::new().root_der),
    )
    .unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, r#"{"keys":[]}"#).unwrap();
    let bundle_arg = format!("ca.trustBundle={}", bundle.display());
    let jwks_arg = format!("ca.jwks={}", jwks.display());
    let mut args = vec![
        "--set",
        "ca.existingSecret=meshid-ca",
        "--set-file",
        &bundle_arg,
        "--set-file",
        &jwks_arg,
    ];
    args.extend(extra);
    let objects = render_chart(&args);
    if objects.is_none() {
        assert!(
            std::env::var_os("MESHID_INJECT_OUT").is_none(),
            "helm is missing: run scripts/k8s/install-tools.sh"
        );
        eprintln!("helm is not installed (scripts/k8s/install-tools.sh): not checked here");
    }
    objects
}

#[test]
fn the_ca_admits_sidecars_to_grpc_and_only_chosen_peers_to_its_admin_port() {
    let Some(objects) = render(&[
        "--set-json",
        r#"ca.networkPolicy.adminFrom=[{"ipBlock":{"cidr":"10.1.2.0/24"}}]"#,
    ]) else {
        return;
    };
    let policy = objects
        .iter()
        .find(|o| o["kind"] == "NetworkPolicy" && o["metadata"]["name"] == "meshid")
        .expect("the CA's NetworkPolicy");
    let spec = &policy["spec"];
    assert_eq!(
        spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "ca"
    );
    let ingress = spec["ingress"].as_array().unwrap();
    assert_eq!(ingress.len(), 2, "{ingress:?}");
    assert_eq!(ingress[0]["ports"][0]["port"], 8443);
    assert!(
        ingress[0].get("from").is_none(),
        "every sidecar reaches gRPC: {ingress:?}"
    );
    assert_eq!(
        ingress[1]["ports"],
        serde_json::json!([{"port": 9090, "protocol": "TCP"}])
    );
    let from = ingress[1]["from"].as_array().unwrap();
    assert_eq!(
        from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "prometheus"
    );
    assert_eq!(
        from[1]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "test"
    );
    assert_eq!(from[2]["ipBlock"]["cidr"], "10.1.2.0/24");
    assert_eq!(
        from.len(),
        3,
        "nothing else reaches the admin port: {from:?}"
    );
}

#[test]
fn the_mesh_test_wires_an_allowed_and_a_denied_call() {
    let Some(objects) = render(&[]) else {
        return;
    };
    let find = |kind: &str, name: &str| -> Value {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
            .clone()
    };
    let ns = find("Namespace", "meshid-test");
    assert_eq!(ns["metadata"]["annotations"]["helm.sh/hook"], "test");
    let server = find("Deployment", "meshid-test-server");
    let client = find("Pod", "meshid-test-mesh");
    let service = find("Service", "meshid-test-server");
    for o in [&server, &client, &service] {
        assert_eq!(o["metadata"]["namespace"], "meshid-test");
        assert_eq!(o["metadata"]["annotations"]["helm.sh/hook"], "test");
    }
    let server_pod = &server["spec"]["template"];
    let server_sa = server_pod["spec"]["serviceAccountName"].as_str().unwrap();
    let client_sa = client["spec"]["serviceAccountName"].as_str().unwrap();
    for sa in [server_sa, client_sa] {
        find("ServiceAccount", sa);
    }
    let id = |sa: &str| {
        SpiffeId::parse(&format!("spiffe://cluster.local/ns/meshid-test/sa/{sa}")).unwrap()
    };

    let s = MeshAnnotations::from_map(&annotations(&server_pod["metadata"]["annotations"]))
        .unwrap_or_else(|e| panic!("server annotations: {e:?}"));
    let c = MeshAnnotations::from_map(&annotations(&client["metadata"]["annotations"]))
        .unwrap_or_else(|e| panic!("client annotations: {e:?}"));
    let ports: Vec<u16> = s.inbound.iter().map(|p| p.port).collect();
    assert_eq!(ports, [8080, 8081]);
    // The Service exposes both inbound ports (where the server's sidecar listens).
    let svc_ports: Vec<u64> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["targetPort"].as_u64().unwrap())
        .collect();
    assert_eq!(svc_ports, [8080, 8081]);
    // The client calls the server's identity on each port through the Service.
    let upstreams: BTreeMap<u16, (String, SpiffeId)> = c
        .outbound
        .iter()
        .map(|u| (u.local_port, (u.remote.clone(), u.expected.clone())))
        .collect();
    assert_eq!(
        upstreams,
        BTreeMap::from([
            (
                9001,
                (
                    "meshid-test-server.meshid-test.svc:8080".to_owned(),
                    id(server_sa)
                )
            ),
            (
                9002,
                (
                    "meshid-test-server.meshid-test.svc:8081".to_owned(),
                    id(server_sa)
                )
            ),
        ])
    );
    // The server's policy: the client is allowed on 8080 and denied on 8081, which the test pod's
    // script expects (200 through 9001, 403 through 9002).
    let policy = s.policy();
    assert!(
        policy
            .decide_request(8080, &id(client_sa), "GET", "/hostname")
            .allowed
    );
    assert!(
        !policy
            .decide_request(8081, &id(client_sa), "GET", "/hostname")
            .allowed
    );
    let script = client["spec"]["containers"][0]["command"][2]
        .as_str()
        .unwrap();
    assert!(
        script.contains("127.0.0.1:9001") && script.contains("= 200"),
        "{script}"
    );
    assert!(
        script.contains("127.0.0.1:9002") && script.contains("= 403"),
        "{script}"
    );
    // The app listens on localhost only: the sidecar is the way in.
    let app_cmd = server_pod["spec"]["containers"][0]["command"][2]
        .as_str()
        .unwrap();
    assert!(
        app_cmd.contains("127.0.0.1:8080") && app_cmd.contains("127.0.0.1:8081"),
        "{app_cmd}"
    );
}

/// Whether `labels` match a Kubernetes label selector (`matchLabels` and `matchExpressions`).
fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let by_label = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str());
    let by_expression = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let key = e["key"].as_str().unwrap();
            let values: Vec<&str> = e["values"]
                .as_array()
                .map(|v| v.iter().map(|s| s.as_str().unwrap()).collect())
                .unwrap_or_default();
            let value = labels.get(key).map(String::as_str);
            match e["operator"].as_str().unwrap() {
                "In" => value.is_some_and(|v| values.contains(&v)),
                "NotIn" => value.is_none_or(|v| !values.contains(&v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                other => panic!("operator {other}"),
            }
        });
    by_label && by_expression
}

/// A matchCondition of the chart's webhook evaluated for a pod CREATE. The chart's CEL expressions
/// are of three known forms (written out here); any other form fails the test, to be added.
/// (`scripts/k8s/match_conditions.py` evaluates them all, for updates too, with a CEL evaluator.)
fn condition_holds_on_create(expression: &str, pod: &Value) -> bool {
    let expression = expression.split_whitespace().collect::<Vec<_>>().join(" ");
    // Conditions on updates and on the ephemeral containers subresource: every pod CREATE passes.
    if expression.starts_with("request.operation != 'UPDATE' ||")
        || expression.starts_with(
            "!has(request.subResource) || request.subResource != 'ephemeralcontainers' ||",
        )
    {
        return true;
    }
    let asked = "request.operation != 'CREATE' || (has(object.metadata.annotations) && \
                 'meshid.io/inject' in object.metadata.annotations && \
                 object.metadata.annotations['meshid.io/inject'] != 'disabled')";
    assert_eq!(
        expression, asked,
        "a matchCondition this test cannot evaluate"
    );
    pod["metadata"]["annotations"]
        .get("meshid.io/inject")
        .is_some_and(|v| v != "disabled")
}

/// The webhook entries of the rendered chart that a pod CREATE in `namespace` (with the labels
/// of `namespace_labels`) is sent to: namespaceSelector, objectSelector and matchConditions.
fn entries_for(
    objects: &[Value],
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    pod: &Value,
) -> Vec<String> {
    let webhook = objects
        .iter()
        .find(|o| o["kind"] == "MutatingWebhookConfiguration")
        .expect("the webhook configuration");
    let mut ns_labels = namespace_labels.clone();
    ns_labels.insert(
        "kubernetes.io/metadata.name".to_owned(),
        namespace.to_owned(),
    );
    let pod_labels: BTreeMap<String, String> =
        serde_json::from_value(pod["metadata"]["labels"].clone()).unwrap_or_default();
    webhook["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| {
            selects(&entry["namespaceSelector"], &ns_labels)
                && selects(&entry["objectSelector"], &pod_labels)
                && entry["matchConditions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|c| condition_holds_on_create(c["expression"].as_str().unwrap(), pod))
        })
        .map(|entry| entry["name"].as_str().unwrap().to_owned())
        .collect()
}

/// `helm test` needs its server and client injected: the webhook as rendered (its namespace and
/// object selectors, its matchConditions) sends both to the per-pod entry, and the injector
/// injects them. The CA and injector pods are sent to neither entry in the release namespace, and
/// no label (theirs included) keeps a pod elsewhere from the webhook.
#[test]
fn the_webhook_injects_the_test_pods_and_no_label_keeps_a_pod_from_it() {
    let Some(objects) = render(&[]) else {
        return;
    };
    let find = |kind: &str, name: &str| -> Value {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
            .clone()
    };
    let test_ns = find("Namespace", "meshid-test");
    let test_ns_labels: BTreeMap<String, String> =
        serde_json::from_value(test_ns["metadata"]["labels"].clone()).unwrap();
    let server = find("Deployment", "meshid-test-server")["spec"]["template"].clone();
    let client = find("Pod", "meshid-test-mesh");
    let key = rcgen::KeyPair::generate().unwrap();
    let root = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let config = meshid_injector::InjectConfig::new(
        meshid_injector::TrustBundle::from_pem(root.pem().as_bytes()).unwrap(),
    );
    for (name, pod) in [("server", &server), ("client", &client)] {
        let entries = entries_for(&objects, "meshid-test", &test_ns_labels, pod);
        assert_eq!(entries, ["pod.inject.meshid.io"], "{name}: {pod}");
        let review = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": name, "namespace": "meshid-test", "operation": "CREATE",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "object": pod}
        });
        let out = meshid_injector::review(&config, meshid_injector::Scope::Pod, &review);
        assert_eq!(out["response"]["allowed"], true, "{name}: {out}");
        assert!(
            out["response"]["patch"].is_string(),
            "{name} not injected: {out}"
        );
    }

    let ca = find("Deployment", "meshid-ca")["spec"]["template"].clone();
    let injector = find("Deployment", "meshid-injector")["spec"]["template"].clone();
    let health = find("Pod", "meshid-test-health");
    for (name, pod) in [("ca", &ca), ("injector", &injector), ("health", &health)] {
        let entries = entries_for(&objects, "meshid", &BTreeMap::new(), pod);
        assert!(entries.is_empty(), "{name} sent to {entries:?}");
    }
    // No label keeps a pod from the webhook: the author sets its labels. With an objectSelector
    // on `meshid.io/control-plane` (the CA and injector pods' label) an author could label a pod
    // and then change its meshid annotations (`meshid.io/app-probes`, which the sidecar acts on)
    // without the injector seeing the update. Outside the release namespace, a pod labelled as
    // the CA's is sent to the entries as any other pod.
    let opted_in = BTreeMap::from([("meshid.io/inject".to_owned(), "enabled".to_owned())]);
    for (name, pod) in [("ca", &ca), ("injector", &injector)] {
        let mut asking = pod.clone();
        asking["metadata"]["annotations"] = serde_json::json!({"meshid.io/inject": "enabled"});
        assert_eq!(
            entries_for(&objects, "elsewhere", &BTreeMap::new(), &asking),
            ["pod.inject.meshid.io"],
            "{name}"
        );
        assert_eq!(
            entries_for(&objects, "elsewhere", &opted_in, &asking),
            ["namespace.inject.meshid.io"],
            "{name}"
        );
    }
    let webhook = objects
        .iter()
        .find(|o| o["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    for entry in webhook["webhooks"].as_array().unwrap() {
        assert!(entry.get("objectSelector").is_none(), "{entry}");
    }
}

/// A rotation step runs `helm upgrade --set-file ca.trustBundle=...` (chart README): the CA reads
/// its bundle from its Secret, not from the chart, so a new bundle must not change its pod
/// template (a change rolls every CA replica mid-rotation, dropping every sidecar's bundle
/// stream). The injector re-reads the bundle ConfigMap in place: its template does not change
/// either. The ConfigMap and the webhook's caBundle do.
#[test]
fn a_new_trust_bundle_restarts_no_pod() {
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.pem");
    std::fs::write(
        &other,
        meshid_tests::pki::pem(&meshid_tests::pki::ForeignCa::new().root_der),
    )
    .unwrap();
    let other_arg = format!("ca.trustBundle={}", other.display());
    let (Some(before), Some(after)) = (render(&[]), render(&["--set-file", &other_arg])) else {
        return;
    };
    let find = |objects: &[Value], kind: &str, name: &str| -> Value {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
            .clone()
    };
    for name in ["meshid-ca", "meshid-injector"] {
        let (a, b) = (
            find(&before, "Deployment", name),
            find(&after, "Deployment", name),
        );
        assert_eq!(
            a["spec"]["template"], b["spec"]["template"],
            "{name}: the pod template changes with the trust bundle"
        );
    }
    let bundle = |objects: &[Value]| {
        find(objects, "ConfigMap", "meshid-trust-bundle")["data"]["bundle.pem"].clone()
    };
    assert_ne!(bundle(&before), bundle(&after));
}
