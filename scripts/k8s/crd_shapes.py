"""Shape checks for the chart's custom resources, which kubernetes-validate cannot check (it knows
only the core API): monitoring.coreos.com/v1 (PrometheusRule, ServiceMonitor, PodMonitor) and
cert-manager.io/v1 (Certificate, Issuer). Every key used must be one the CRD defines (the field
lists below are taken from the Prometheus Operator's and cert-manager's v1 CRDs), required fields
must be there, and references must resolve: a ServiceMonitor's port on a Service it selects, a
PodMonitor's port on the sidecar the injector adds (injected pods from the inject_webhook test),
an Issuer's CA Secret made by a Certificate, a Certificate's issuer.

Usage: crd_shapes.py INJECTED_DIR RENDER/all.yaml...; writes RENDER/core.yaml (everything else)
beside each all.yaml, for kubernetes-validate.
"""

import glob
import json
import re
import sys

import yaml

CRD_GROUPS = ("monitoring.coreos.com/", "cert-manager.io/")
SELECTOR = {"matchLabels", "matchExpressions"}
NAMESPACE_SELECTOR = {"any", "matchNames"}
ENDPOINT_COMMON = {
    "port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout", "tlsConfig",
    "bearerTokenSecret", "authorization", "honorLabels", "honorTimestamps",
    "trackTimestampsStaleness", "basicAuth", "oauth2", "metricRelabelings", "relabelings",
    "proxyUrl", "noProxy", "proxyFromEnvironment", "proxyConnectHeader", "followRedirects",
    "enableHttp2", "filterRunning",
}
MONITOR_SPEC = {
    "jobLabel", "podTargetLabels", "selector", "namespaceSelector", "sampleLimit", "targetLimit",
    "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit", "attachMetadata",
    "keepDroppedTargets", "scrapeClass", "scrapeProtocols", "bodySizeLimit", "selectorMechanism",
    "fallbackScrapeProtocol", "scrapeClassicHistograms", "nativeHistogramBucketLimit",
    "nativeHistogramMinBucketFactor", "convertClassicHistogramsToNHCB",
}
SHAPES = {
    "ServiceMonitor": {
        "spec": MONITOR_SPEC | {"endpoints", "targetLabels"},
        "spec.endpoints[]": ENDPOINT_COMMON | {"bearerTokenFile"},
        "spec.selector": SELECTOR,
        "spec.namespaceSelector": NAMESPACE_SELECTOR,
    },
    "PodMonitor": {
        "spec": MONITOR_SPEC | {"podMetricsEndpoints"},
        "spec.podMetricsEndpoints[]": ENDPOINT_COMMON | {"portNumber"},
        "spec.selector": SELECTOR,
        "spec.namespaceSelector": NAMESPACE_SELECTOR,
    },
    "PrometheusRule": {
        "spec": {"groups"},
        "spec.groups[]": {"name", "interval", "rules", "partial_response_strategy", "limit",
                          "query_offset", "labels"},
        "spec.groups[].rules[]": {"record", "alert", "expr", "for", "keep_firing_for", "labels",
                                  "annotations"},
    },
    "Certificate": {
        "spec": {"subject", "literalSubject", "commonName", "duration", "renewBefore",
                 "renewBeforePercentage", "dnsNames", "ipAddresses", "uris", "otherNames",
                 "emailAddresses", "secretName", "secretTemplate", "keystores", "issuerRef", "isCA",
                 "usages", "privateKey", "signatureAlgorithm", "encodeUsagesInRequest",
                 "revisionHistoryLimit", "additionalOutputFormats", "nameConstraints"},
        "spec.privateKey": {"rotationPolicy", "encoding", "algorithm", "size"},
        "spec.issuerRef": {"name", "kind", "group"},
        "spec.secretTemplate": {"labels", "annotations"},
    },
    "Issuer": {
        "spec": {"acme", "ca", "vault", "selfSigned", "venafi"},
        "spec.ca": {"secretName", "crlDistributionPoints", "ocspServers", "issuingCertificateURLs"},
        "spec.selfSigned": {"crlDistributionPoints"},
    },
}
REQUIRED = {
    "ServiceMonitor": ["spec.selector", "spec.endpoints"],
    "PodMonitor": ["spec.selector", "spec.podMetricsEndpoints"],
    "PrometheusRule": ["spec.groups"],
    "Certificate": ["spec.secretName", "spec.issuerRef"],
    "Issuer": [],
}
USAGES = {"signing", "digital signature", "content commitment", "key encipherment",
          "key agreement", "data encipherment", "cert sign", "crl sign", "encipher only",
          "decipher only", "any", "server auth", "client auth", "code signing", "email protection",
          "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping",
          "ocsp signing", "microsoft sgc", "netscape sgc"}
GO_DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
PROM_DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")


def at(obj, path):
    """The values at a dotted path; `x[]` walks every item of list x."""
    values = [obj]
    for part in path.split("."):
        many = part.endswith("[]")
        key = part[:-2] if many else part
        nxt = []
        for v in values:
            if isinstance(v, dict) and key in v:
                nxt.extend(v[key] if many else [v[key]])
        values = nxt
    return values


def seconds(d):
    total = 0.0
    for num, unit in re.findall(r"([0-9.]+)(ns|us|µs|ms|s|m|h)", d):
        total += float(num) * {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60,
                               "h": 3600}[unit]
    return total


def matches(selector, labels):
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        has, val = e["key"] in labels, labels.get(e["key"])
        if e["operator"] == "Exists" and not has or e["operator"] == "DoesNotExist" and has:
            return False
        if e["operator"] == "In" and val not in e["values"]:
            return False
        if e["operator"] == "NotIn" and val in e["values"]:
            return False
    return True


def sidecar_ports(injected_dir):
    ports = set()
    for path in glob.glob(f"{injected_dir}/*.json"):
        pod = json.load(open(path))
        spec = pod.get("spec", pod)
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            if c.get("name") == "meshid-sidecar":
                ports |= {p["name"] for p in c.get("ports", []) if "name" in p}
    return ports


def check(docs, injected_ports, problems, name):
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    for d in docs:
        kind, where = d["kind"], f"{name}: {d['kind']} {d['metadata']['name']}"
        if not d["apiVersion"].startswith(CRD_GROUPS):
            continue
        if d["apiVersion"] not in ("monitoring.coreos.com/v1", "cert-manager.io/v1"):
            problems.append(f"{where}: apiVersion {d['apiVersion']} is not v1")
        if kind not in SHAPES:
            problems.append(f"{where}: no shape known for this kind")
            continue
        for path, allowed in SHAPES[kind].items():
            for v in at(d, path):
                if not isinstance(v, dict):
                    problems.append(f"{where}: {path} is not an object")
                    continue
                for k in sorted(set(v) - allowed):
                    problems.append(f"{where}: {path}.{k} is not a field of the CRD")
        for path in REQUIRED[kind]:
            if not at(d, path):
                problems.append(f"{where}: {path} is required")
        for path in ("spec.endpoints[].interval", "spec.endpoints[].scrapeTimeout",
                     "spec.podMetricsEndpoints[].interval", "spec.podMetricsEndpoints[].scrapeTimeout",
                     "spec.groups[].rules[].for"):
            for v in at(d, path):
                if not PROM_DURATION.match(str(v)):
                    problems.append(f"{where}: {path} {v!r} is not a Prometheus duration")
        ns = d["metadata"].get("namespace")
        if kind == "PrometheusRule":
            for r in at(d, "spec.groups[].rules[]"):
                if not r.get("expr") or not (r.get("alert") or r.get("record")):
                    problems.append(f"{where}: a rule without expr or alert/record: {r}")
        if kind == "ServiceMonitor":
            nsel = d["spec"].get("namespaceSelector", {})
            services = [s for s in by_kind.get("Service", [])
                        if matches(d["spec"]["selector"], s["metadata"].get("labels", {}))
                        and (nsel.get("any") or s["metadata"]["namespace"] in nsel.get("matchNames", [ns]))]
            for ep in d["spec"]["endpoints"]:
                if not any(p.get("name") == ep.get("port") for s in services for p in s["spec"]["ports"]):
                    problems.append(f"{where}: no Service it selects has a port named {ep.get('port')!r}")
        if kind == "PodMonitor":
            for ep in d["spec"]["podMetricsEndpoints"]:
                if ep.get("port") not in injected_ports:
                    problems.append(f"{where}: port {ep.get('port')!r} is not a port of the injected sidecar ({sorted(injected_ports)})")
        if kind == "Certificate":
            spec = d["spec"]
            for u in spec.get("usages", []):
                if u not in USAGES:
                    problems.append(f"{where}: usage {u!r} unknown to cert-manager")
            for f in ("duration", "renewBefore"):
                if f in spec and not GO_DURATION.match(str(spec[f])):
                    problems.append(f"{where}: {f} {spec[f]!r} is not a Go duration")
            if "duration" in spec and "renewBefore" in spec and seconds(spec["renewBefore"]) >= seconds(spec["duration"]):
                problems.append(f"{where}: renewBefore is not shorter than duration")
            if not spec.get("isCA") and not spec.get("dnsNames"):
                problems.append(f"{where}: a serving certificate without dnsNames")
            ref = spec["issuerRef"]
            if ref.get("group", "cert-manager.io") == "cert-manager.io" and ref.get("kind", "Issuer") == "Issuer":
                if not any(i["metadata"]["name"] == ref["name"] and i["metadata"]["namespace"] == ns
                           for i in by_kind.get("Issuer", [])):
                    problems.append(f"{where}: issuerRef names Issuer {ref['name']}, which is not rendered")
        if kind == "Issuer":
            spec = d["spec"]
            if len(spec) != 1:
                problems.append(f"{where}: exactly one issuer type expected, got {sorted(spec)}")
            secret = spec.get("ca", {}).get("secretName")
            if "ca" in spec and not any(c["spec"].get("secretName") == secret and c["spec"].get("isCA")
                                        for c in by_kind.get("Certificate", [])):
                problems.append(f"{where}: its CA Secret {secret} is made by no CA Certificate here")


def main():
    injected_ports = sidecar_ports(sys.argv[1])
    if "meshid-stats" not in injected_ports:
        print(f"FAIL: the injected sidecars have no meshid-stats port ({sorted(injected_ports)})", file=sys.stderr)
        return 1
    problems, counts = [], {}
    for path in sys.argv[2:]:
        name = path.rsplit("/", 2)[-2]
        docs = [d for d in yaml.safe_load_all(open(path)) if d]
        check(docs, injected_ports, problems, name)
        custom = [d for d in docs if d["apiVersion"].startswith(CRD_GROUPS)]
        counts[name] = ", ".join(sorted(f"{d['kind']} {d['metadata']['name']}" for d in custom)) or "none"
        with open(path.replace("all.yaml", "core.yaml"), "w") as f:
            yaml.safe_dump_all([d for d in docs if d not in custom], f)
    for name, what in sorted(counts.items()):
        print(f"{name}: {what}")
    for p in problems:
        print("FAIL:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
