"""What the chart's options must produce, on the rendered value sets of check.sh: the injector's
serving certificate by source (webhookCert, certManager with the chart's CA chain or a given
issuer, a user's Secret), the monitoring objects, the dashboard ConfigMap, the CA's HPA, the pod
knobs (labels, annotations, affinity, spreading, extra args/env/volumes) and the injector's probes.

Usage: chart_wiring.py RENDER_DIR BUNDLE_PEM
"""

import base64
import json
import sys

import yaml

RENDER, BUNDLE = sys.argv[1], open(sys.argv[2]).read()
NS = "meshid"


def load(name):
    return [d for d in yaml.safe_load_all(open(f"{RENDER}/{name}/all.yaml")) if d]


def one(docs, kind, suffix=""):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, (kind, suffix, [d["metadata"]["name"] for d in found])
    return found[0]


def kinds(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def pod(deploy):
    return deploy["spec"]["template"]["spec"]


def webhook(docs, name, source, secret, ca_bundle):
    inj = one(docs, "Deployment", "-injector")
    svc = one(docs, "Service", "-injector")
    mwc = one(docs, "MutatingWebhookConfiguration")
    tls = next(v for v in pod(inj)["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == secret, (name, tls)
    annotations = mwc["metadata"].get("annotations") or {}
    bundles = [w["clientConfig"].get("caBundle") for w in mwc["webhooks"]]
    certs = kinds(docs, "Certificate")
    if source == "certManager":
        serving = [c for c in certs if not c["spec"].get("isCA")]
        assert len(serving) == 1, serving
        c = serving[0]
        assert c["spec"]["secretName"] == secret, (c, secret)
        host = f"{svc['metadata']['name']}.{NS}.svc"
        assert host in c["spec"]["dnsNames"], c["spec"]["dnsNames"]
        assert f"--server-name={host}" in pod(inj)["containers"][0]["args"]
        want = f"{NS}/{c['metadata']['name']}"
        assert annotations.get("cert-manager.io/inject-ca-from") == want, (annotations, want)
        assert bundles == [None, None], "cert-manager's cainjector fills caBundle; the chart sets none"
        return f"cert-manager Certificate {c['metadata']['name']} (issuer {c['spec']['issuerRef']['kind']} {c['spec']['issuerRef']['name']}) -> Secret {secret}, caBundle injected from {want}"
    assert not certs and not kinds(docs, "Issuer"), (name, "no cert-manager objects")
    assert "cert-manager.io/inject-ca-from" not in annotations, annotations
    assert bundles == [base64.b64encode(ca_bundle.encode()).decode()] * 2, (name, "caBundle")
    return f"Secret {secret}, caBundle from {'ca.trustBundle' if source == 'webhookCert' else 'injector.tls.caBundle'}"


def main():
    sets = {n: load(n) for n in ("defaults", "all-options", "minimal-off", "webhook-cert-manager", "webhook-secret")}
    report = []
    # The injector's serving certificate, by source.
    report.append("defaults: " + webhook(sets["defaults"], "defaults", "webhookCert", "meshid-injector-tls", BUNDLE))
    report.append("webhook-secret: " + webhook(sets["webhook-secret"], "webhook-secret", "secret", "webhook-tls-from-vault", BUNDLE))
    cm = sets["webhook-cert-manager"]
    report.append("webhook-cert-manager: " + webhook(cm, "webhook-cert-manager", "certManager", "meshid-injector-tls", None))
    issuers = {i["metadata"]["name"]: i["spec"] for i in kinds(cm, "Issuer")}
    assert sorted(issuers.values(), key=str) == sorted([{"selfSigned": {}}, {"ca": {"secretName": "meshid-injector-ca"}}], key=str), issuers
    ca_cert = [c for c in kinds(cm, "Certificate") if c["spec"].get("isCA")]
    assert len(ca_cert) == 1 and ca_cert[0]["spec"]["secretName"] == "meshid-injector-ca", ca_cert
    assert issuers[ca_cert[0]["spec"]["issuerRef"]["name"]] == {"selfSigned": {}}
    ao = sets["all-options"]
    report.append("all-options: " + webhook(ao, "all-options", "certManager", "platform-meshid-injector-tls", None))
    assert not kinds(ao, "Issuer"), "a given issuerRef: the chart makes no Issuer"
    ref = one(ao, "Certificate")["spec"]["issuerRef"]
    assert ref == {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}, ref

    # The injector's admin port on its Service, and its probes.
    for name in ("defaults", "all-options"):
        docs = sets[name]
        svc = one(docs, "Service", "-injector")
        inj = pod(one(docs, "Deployment", "-injector"))["containers"][0]
        admin = next(p for p in inj["ports"] if p["name"] == "admin")
        metrics = next(p for p in svc["spec"]["ports"] if p["name"] == "metrics")
        assert metrics["targetPort"] == "admin" and metrics["port"] == admin["containerPort"], metrics
        for probe in ("startupProbe", "readinessProbe"):
            assert inj[probe]["httpGet"] == {"path": "/readyz", "port": "admin"}, inj[probe]
        assert inj["livenessProbe"]["httpGet"]["scheme"] == "HTTPS", inj["livenessProbe"]
    report.append("injector: Service port metrics -> admin; startup and readiness on /readyz (admin), liveness over the webhook's TLS")

    # Monitoring and the dashboard: off by default, on in all-options.
    for name in ("defaults", "minimal-off"):
        present = [d["kind"] for d in sets[name] if d["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule", "HorizontalPodAutoscaler")
                   or (d["kind"] == "ConfigMap" and "meshid.json" in d.get("data", {}))]
        assert not present, (name, present)
    assert sorted(d["metadata"]["name"] for d in kinds(ao, "ServiceMonitor")) == ["platform-meshid-ca", "platform-meshid-injector"]
    assert len(kinds(ao, "PodMonitor")) == 1 and len(kinds(ao, "PrometheusRule")) == 1
    assert all(d["metadata"]["labels"]["release"] == "kube-prometheus-stack" for d in ao if d["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule"))
    dash = next(d for d in ao if d["kind"] == "ConfigMap" and "meshid.json" in d.get("data", {}))
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1" and dash["metadata"]["namespace"] == "monitoring", dash["metadata"]
    assert dash["metadata"]["annotations"] == {"grafana_folder": "meshid"}
    board = json.loads(dash["data"]["meshid.json"])
    assert board["uid"] == "meshid-overview" and board["panels"], "dashboard"
    assert board == json.load(open("helm/meshid/dashboards/meshid.json")), "the ConfigMap carries the chart's file as is"
    report.append(f"monitoring: 2 ServiceMonitors, 1 PodMonitor, 1 PrometheusRule; dashboard ConfigMap ({len(board['panels'])} panels) labelled grafana_dashboard=1")

    # The CA: HPA owns the replicas when enabled; knobs reach the pods.
    d = one(sets["defaults"], "Deployment", "-ca")
    assert d["spec"]["replicas"] == 2, d["spec"]
    anti = pod(d)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname", anti
    for component in ("ca", "injector"):
        spec = pod(one(sets["webhook-secret"], "Deployment", f"-{component}"))
        hard = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert hard[0]["topologyKey"] == "kubernetes.io/hostname", hard
    ca = one(ao, "Deployment", "-ca")
    assert "replicas" not in ca["spec"], "the HPA owns the CA's replicas"
    hpa = one(ao, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": ca["metadata"]["name"]}, hpa
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 9)
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    for component in ("ca", "injector"):
        dep = one(ao, "Deployment", f"-{component}")
        tmpl, spec = dep["spec"]["template"], pod(dep)
        c = spec["containers"][0]
        assert tmpl["metadata"]["labels"]["team"] == "platform", tmpl["metadata"]["labels"]
        assert "team" not in dep["spec"]["selector"]["matchLabels"]
        assert "podAntiAffinity" not in spec["affinity"] or component == "injector", spec["affinity"]
        assert spec["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
        assert len(spec["topologySpreadConstraints"]) == 1, "the values replace the default spread"
        assert c["args"][-1] in ("--idle-timeout=2m", "--reload-interval=2s"), c["args"][-1]
        assert c["env"][-1]["name"] == "MESHID_LOG", c["env"]
        extra = spec["volumes"][-1]["name"]
        assert c["volumeMounts"][-1]["name"] == extra, (c["volumeMounts"], extra)
        assert spec["priorityClassName"] == "system-cluster-critical" and spec["nodeSelector"] and spec["tolerations"]
    inj = one(ao, "Deployment", "-injector")["spec"]["template"]
    assert inj["metadata"]["annotations"] == {"cluster-autoscaler.kubernetes.io/safe-to-evict": "true"}, inj["metadata"]
    assert inj["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    report.append("default anti-affinity soft (defaults) and hard (webhook-secret); knobs: HPA (3-9, 60% CPU) and no Deployment replicas; pod labels, annotations, affinity, topologySpreadConstraints, extraArgs/Env/Volumes/VolumeMounts on both")
    print("\n".join(report))


if __name__ == "__main__":
    main()
