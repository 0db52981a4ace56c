#!/usr/bin/env bash
# Proves the Helm chart and the injector's output without a cluster:
#  1. renders helm/meshid with the required values only, with every documented option
#     (scripts/k8s/values/all-options.yaml), with everything optional off (minimal-off.yaml) and
#     with each source of the injector's serving certificate (webhook-cert-manager.yaml,
#     webhook-secret.yaml), and checks that rendering without the required values fails with a
#     clear message;
#  2. helm lint --strict (each values set) and a values.schema.json check (wrong type, unknown key);
#  3. kubernetes-validate --strict against Kubernetes 1.30 and the newest schema it ships (1.37),
#     for every rendered object and for the pods the injector produces (inject_webhook test output);
#     objects of CRDs it does not know (monitoring.coreos.com, cert-manager.io) are left out of it
#     and checked for shape by scripts/k8s/crd_shapes.py instead;
#  4. checkov (framework kubernetes) with zero failures outside the skip list below; the webhook's
#     matchConditions evaluated with a CEL evaluator on sample requests
#     (scripts/k8s/match_conditions.py: which pod creations, updates and kubectl debug calls reach
#     the injector);
#  5. the Dockerfiles in docker/ without a Docker engine: hadolint (zero findings outside the ignore
#     list below), checkov --framework dockerfile (zero failures outside its skip list), every
#     binary the runtime stages copy is one the workspace builds (cargo metadata), the image
#     entrypoints name copied binaries, each chart Deployment runs the image of its component
#     (<repository>/<component>, built by docker/<component>.Dockerfile) and its command is a binary
#     that image copies, and the runtime user is a numeric non-root uid:gid.
# Needs scripts/k8s/install-tools.sh (run it first); uses cargo for the injected pods (honours
# CARGO_TARGET_DIR).
set -euo pipefail
cd "$(dirname "$0")/../.."
TOOLS="$PWD/.tools/k8s"
HELM="$TOOLS/bin/helm"
VENV="$TOOLS/venv/bin"
CHART=helm/meshid
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
K8S_VERSIONS=(1.30.0 1.37.0)
# checkov checks skipped everywhere, each with the reason:
SKIPS=(
  CKV_K8S_43 # image digests: optional (image.caDigest/injectorDigest/sidecarDigest); tags are the default
  CKV_K8S_15 # imagePullPolicy Always: a value (image.pullPolicy); IfNotPresent suits pinned tags
)
# hadolint rules ignored for docker/*.Dockerfile, each with the reason (empty: none needed).
HADOLINT_IGNORES=(
)
# checkov dockerfile checks skipped, each with the reason:
DOCKER_SKIPS=(
  CKV_DOCKER_2 # HEALTHCHECK: Kubernetes ignores it and probes the pods (chart, injected sidecar);
               # distroless images have no shell or curl to run one
)

fail() { echo "FAIL: $*" >&2; exit 1; }

# Fixtures: a real CA's bundle, as the platform team would pass it. No JWKS: by default the CA
# fetches it from the API server (minimal-off.yaml passes one, the file mode).
"${CARGO:-cargo}" build -q -p meshid-ca --bin meshid-ca
"${CARGO_TARGET_DIR:-target}/debug/meshid-ca" init --dir "$OUT/ca" --trust-domain cluster.local >/dev/null
REQUIRED=(--set ca.existingSecret=meshid-ca --set-file "ca.trustBundle=$OUT/ca/bundle.pem")

echo "== helm $("$HELM" version --short)"
declare -A SETS=(
  [defaults]=""
  [all-options]="scripts/k8s/values/all-options.yaml"
  [minimal-off]="scripts/k8s/values/minimal-off.yaml"
  [webhook-cert-manager]="scripts/k8s/values/webhook-cert-manager.yaml"
  [webhook-secret]="scripts/k8s/values/webhook-secret.yaml"
)
# Values a set needs beyond its file: the user's webhook CA (any real PEM; the mesh bundle here).
declare -A SET_ARGS=(
  [webhook-secret]="--set-file injector.tls.caBundle=$OUT/ca/bundle.pem"
)
for name in "${!SETS[@]}"; do
  extra=()
  [ -n "${SETS[$name]}" ] && extra=(-f "${SETS[$name]}")
  # shellcheck disable=SC2206 # word splitting intended: flag and value
  [ -n "${SET_ARGS[$name]:-}" ] && extra+=(${SET_ARGS[$name]})
  "$HELM" lint --strict "$CHART" "${extra[@]}" "${REQUIRED[@]}" >"$OUT/lint-$name.txt" 2>&1 ||
    { cat "$OUT/lint-$name.txt"; fail "helm lint --strict ($name)"; }
  mkdir -p "$OUT/render/$name"
  "$HELM" template meshid "$CHART" --namespace meshid "${extra[@]}" "${REQUIRED[@]}" >"$OUT/render/$name/all.yaml"
  echo "rendered $name: $(grep -c '^kind:' "$OUT/render/$name/all.yaml") objects ($(grep '^kind:' "$OUT/render/$name/all.yaml" | sort | uniq -c | awk '{printf "%s %s, ", $1, $3}' | sed 's/, $//'))"
done
grep -q 'path: /inject-namespace' "$OUT/render/defaults/all.yaml" || fail "webhook entries missing"
! grep -q 'kind: MutatingWebhookConfiguration' "$OUT/render/minimal-off/all.yaml" || fail "injector.enabled=false still renders the webhook"

echo "== install notes: the webhook port warning"
notes() { # helm args...: the NOTES an install prints
  "$HELM" install meshid "$CHART" --dry-run=client --namespace meshid "${REQUIRED[@]}" "$@" >"$OUT/install.txt"
  sed -n '/^NOTES:/,$p' "$OUT/install.txt" >"$OUT/notes.txt"
  grep -q "is installed in namespace meshid" "$OUT/notes.txt" || { cat "$OUT/install.txt"; fail "NOTES not rendered ($*)"; }
}
WARNING="any pod can reach the injector's webhook port"
notes
grep -q "$WARNING" "$OUT/notes.txt" || fail "NOTES: no webhook port warning with the defaults"
notes --set-json 'injector.networkPolicy.webhookFrom=[{"ipBlock":{"cidr":"10.0.0.0/24"}}]'
! grep -q "$WARNING" "$OUT/notes.txt" || fail "NOTES: webhook port warning with webhookFrom narrowed"
notes --set networkPolicy.enabled=false --set-json 'injector.networkPolicy.webhookFrom=[{"ipBlock":{"cidr":"10.0.0.0/24"}}]'
grep -q "$WARNING" "$OUT/notes.txt" || fail "NOTES: no webhook port warning without network policies"
notes --set injector.failurePolicy=Ignore
! grep -q "$WARNING" "$OUT/notes.txt" || fail "NOTES: webhook port warning with failurePolicy Ignore"
notes --set injector.enabled=false
! grep -q "$WARNING" "$OUT/notes.txt" || fail "NOTES: webhook port warning without an injector"
echo "NOTES warn about the webhook port exactly when failurePolicy is Fail and any pod can reach it"

echo "== required values and schema"
expect_fail() { # description, expected message, helm args...
  local what="$1" needle="$2"; shift 2
  if "$HELM" template meshid "$CHART" "$@" >"$OUT/err.txt" 2>&1; then fail "$what: rendered"; fi
  grep -q -- "$needle" "$OUT/err.txt" || { cat "$OUT/err.txt"; fail "$what: message lacks '$needle'"; }
  echo "refused as expected: $what"
}
expect_fail "no values at all" "ca.existingSecret is required"
expect_fail "no trust bundle" "ca.trustBundle is required" --set ca.existingSecret=x
expect_fail "unknown key" "additional properties 'replica' not allowed\|replica" "${REQUIRED[@]}" --set ca.replica=2
expect_fail "wrong type" "replicas" "${REQUIRED[@]}" --set ca.replicas=two
expect_fail "bad enum" "failurePolicy" "${REQUIRED[@]}" --set injector.failurePolicy=Sometimes
expect_fail "per-namespace bundles (gone)" "trustBundle.namespaces is gone" "${REQUIRED[@]}" --set 'trustBundle.namespaces={shop}'
expect_fail "unknown injector.tls key" "injector" "${REQUIRED[@]}" --set injector.tls.secret=x
expect_fail "unknown webhook certificate source" "source" "${REQUIRED[@]}" --set injector.tls.source=vault
expect_fail "secret source without its CA" "injector.tls.caBundle" "${REQUIRED[@]}" --set injector.tls.source=secret
expect_fail "issuerRef without a name" "issuerRef" "${REQUIRED[@]}" --set injector.tls.source=certManager --set injector.tls.certManager.issuerRef.kind=ClusterIssuer
expect_fail "injected tokens outliving the CA's limit" "sidecar.tokenExpirationSeconds (3601) exceeds ca.maxTokenLifetime (1h, 3600 s)" "${REQUIRED[@]}" --set sidecar.tokenExpirationSeconds=3601
expect_fail "Kubernetes-extended tokens (3607 s) under the default limit" "sidecar.tokenExpirationSeconds (3607) exceeds ca.maxTokenLifetime (1h, 3600 s)" "${REQUIRED[@]}" --set sidecar.tokenExpirationSeconds=3607
expect_fail "injected tokens outliving a lowered limit" "exceeds ca.maxTokenLifetime (30m, 1800 s)" "${REQUIRED[@]}" --set sidecar.tokenExpirationSeconds=3600 --set ca.maxTokenLifetime=30m
expect_fail "HPA min above max" "minReplicas must not exceed" "${REQUIRED[@]}" --set ca.autoscaling.enabled=true --set ca.autoscaling.minReplicas=5 --set ca.autoscaling.maxReplicas=3
expect_fail "unknown prometheus key" "servicemonitors\|prometheus" "${REQUIRED[@]}" --set prometheus.servicemonitors.enabled=true
expect_fail "helm test's namespace is the release's" "must be one of its own" "${REQUIRED[@]}" --namespace meshid --set test.mesh.namespace=meshid
expect_fail "helm test's namespace is kube-system" "must be one of its own" "${REQUIRED[@]}" --set test.mesh.namespace=kube-system

echo "== injector: own TLS Secret, no CA key, one bundle ConfigMap"
"$VENV/python" - "$OUT/render/defaults/all.yaml" <<'PY' || fail "injector wiring"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
inj = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-injector"))
pod = inj["spec"]["template"]["spec"]
secrets = [v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v]
assert secrets == ["meshid-injector-tls"], secrets
keys = [i["key"] for v in pod["volumes"] if "secret" in v for i in v["secret"]["items"]]
assert sorted(keys) == ["tls.crt", "tls.key"], keys
args = pod["containers"][0]["args"]
assert not any(a.startswith(("--ca-dir", "--san")) for a in args), args
for flag in ("--tls-cert=", "--tls-key=", "--trust-bundle="):
    assert any(a.startswith(flag) for a in args), (flag, args)
cms = [d for d in docs if d["kind"] == "ConfigMap" and "bundle.pem" in d.get("data", {})]
assert [c["metadata"]["namespace"] for c in cms] == ["meshid"], cms
print("injector mounts meshid-injector-tls (tls.crt, tls.key) and the bundle; no CA Secret; one bundle ConfigMap")
PY

echo "== CA: JWKS discovery (RBAC, projected token) by default, a file when ca.jwks is given"
"$VENV/python" - "$OUT/render" <<'PY' || fail "CA JWKS wiring"
import sys, yaml
def load(name):
    return [d for d in yaml.safe_load_all(open(f"{sys.argv[1]}/{name}/all.yaml")) if d]
for name, discovery in (("defaults", True), ("all-options", True), ("minimal-off", False)):
    docs = load(name)
    ca = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-ca"))
    pod = ca["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    bindings = [d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding", "ClusterRole", "Role")]
    assert pod["automountServiceAccountToken"] is False, name
    sa = pod["serviceAccountName"]
    if discovery:
        assert not any(a.startswith("--jwks=") for a in args), (name, args)
        assert "--jwks-discovery" in args or any(a.startswith("--jwks-url=https://") for a in args), (name, args)
        vol = vols[mounts["/var/run/secrets/kubernetes.io/serviceaccount"]]
        srcs = vol["projected"]["sources"]
        assert any("serviceAccountToken" in s and s["serviceAccountToken"]["path"] == "token" for s in srcs), srcs
        assert any(s.get("configMap", {}).get("name") == "kube-root-ca.crt" for s in srcs), srcs
        # Two bindings: the issuer's keys (a built-in role) and token reviews (the chart's role,
        # which may create TokenReviews and nothing else).
        crbs = [d for d in bindings if d["kind"] == "ClusterRoleBinding"]
        roles = [d for d in bindings if d["kind"] == "ClusterRole"]
        assert len(crbs) == 2 and len(roles) == 1 and len(bindings) == 3, bindings
        for b in crbs:
            assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "meshid"}], b
        assert sorted(b["roleRef"]["name"] for b in crbs) == sorted(
            ["system:service-account-issuer-discovery", roles[0]["metadata"]["name"]]), crbs
        assert roles[0]["rules"] == [{"apiGroups": ["authentication.k8s.io"],
                                      "resources": ["tokenreviews"], "verbs": ["create"]}], roles
        assert "--token-review" in args, (name, args)
        assert not any(d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-jwks") for d in docs)
    else:
        assert "--jwks=/etc/meshid/jwks/jwks.json" in args, (name, args)
        assert not any(a.startswith(("--jwks-discovery", "--jwks-url")) for a in args), (name, args)
        assert "/var/run/secrets/kubernetes.io/serviceaccount" not in mounts, mounts
        assert not bindings, bindings
        assert "--token-review" not in args, (name, args)
    print(f"{name}: CA {'discovers its JWKS and reviews tokens (issuer-discovery and tokenreviews create only, projected token)' if discovery else 'reads a JWKS file (no token, no RBAC, no token review)'}")
PY

echo "== webhook certificate sources, knobs, HPA, probes, dashboard"
"$VENV/python" scripts/k8s/chart_wiring.py "$OUT/render" "$OUT/ca/bundle.pem" || fail "chart wiring"

echo "== webhook matchConditions evaluated (CEL) on the requests the API server sends"
for name in defaults all-options; do
  "$TOOLS/cel-venv/bin/python" scripts/k8s/match_conditions.py "$OUT/render/$name/all.yaml" ||
    fail "matchConditions ($name)"
done

echo "== injected pods (inject_webhook test output)"
mkdir -p "$OUT/injected"
# --workspace, as the README's test command selects: the same features, so after the tests nothing is
# rebuilt (`-p meshid-tests` alone unifies features differently and rebuilds tokio and all above it).
MESHID_INJECT_OUT="$OUT/injected" "${CARGO:-cargo}" nextest run --workspace \
  -E 'binary(inject_webhook) | binary(helm_test_pods)' \
  --no-fail-fast --status-level fail --final-status-level fail
ls "$OUT/injected"/*.json >/dev/null || fail "no injected pods written"

echo "== custom resources (CRDs: checked for shape here, left out of the core-schema validation)"
"$VENV/python" scripts/k8s/crd_shapes.py "$OUT/injected" "$OUT"/render/*/all.yaml || fail "custom resources"

echo "== kubernetes-validate --strict"
for v in "${K8S_VERSIONS[@]}"; do
  for f in "$OUT"/render/*/core.yaml "$OUT"/injected/*.json; do
    "$VENV/kubernetes-validate" --strict --quiet -k "$v" "$f" || fail "kubernetes-validate $v $f"
  done
  echo "valid against Kubernetes $v: $(ls "$OUT"/render/*/core.yaml "$OUT"/injected/*.json | wc -l) files"
done

echo "== checkov"
skip="$(IFS=,; echo "${SKIPS[*]}")"
# Injected pods are not scanned: their app containers are test fixtures, not our objects.
for d in "$OUT"/render/*; do
  this="$skip"
  # networkPolicy.enabled=false is the platform team's explicit choice in that values set.
  [ "$(basename "$d")" = minimal-off ] && this="$skip,CKV2_K8S_6"
  # No network here: checkov's guideline download fails harmlessly (stderr).
  "$VENV/checkov" -d "$d" --framework kubernetes --skip-check "$this" --compact --quiet \
    --skip-download >"$OUT/checkov.txt" 2>"$OUT/checkov.err" || { cat "$OUT/checkov.txt"; fail "checkov $(basename "$d")"; }
  echo "checkov $(basename "$d"): $(grep -o 'Passed checks: [0-9]*, Failed checks: [0-9]*, Skipped checks: [0-9]*' "$OUT/checkov.txt")"
done
echo "== Dockerfiles (static: no Docker engine here)"
ignore=()
for r in "${HADOLINT_IGNORES[@]}"; do ignore+=(--ignore "$r"); done
"$VENV/hadolint" --no-color --failure-threshold style "${ignore[@]}" docker/*.Dockerfile ||
  fail "hadolint"
echo "hadolint $("$VENV/hadolint" --version | grep -o '[0-9][0-9.]*' | head -1): no findings in $(ls docker/*.Dockerfile | wc -l) Dockerfiles (ignored: ${HADOLINT_IGNORES[*]:-none})"
dskip="$(IFS=,; echo "${DOCKER_SKIPS[*]}")"
"$VENV/checkov" -d docker/ --framework dockerfile --skip-check "$dskip" --compact --quiet \
  --skip-download >"$OUT/checkov-docker.txt" 2>"$OUT/checkov-docker.err" || { cat "$OUT/checkov-docker.txt"; fail "checkov dockerfile"; }
echo "checkov dockerfile: $(grep -o 'Passed checks: [0-9]*, Failed checks: [0-9]*, Skipped checks: [0-9]*' "$OUT/checkov-docker.txt")"
"${CARGO:-cargo}" metadata --no-deps --format-version 1 >"$OUT/metadata.json"
"$VENV/python" - "$OUT/metadata.json" "$OUT/render" docker/*.Dockerfile <<'PY' || fail "Dockerfile contents"
import glob, json, re, shlex, sys, yaml
meta, renders, dockerfiles = sys.argv[1], sys.argv[2], sys.argv[3:]
bins = {t["name"] for p in json.load(open(meta))["packages"] for t in p["targets"] if "bin" in t["kind"]}
problems, images = [], {}
for path in dockerfiles:
    text = re.sub(r"\\\n", " ", open(path).read())  # join continuation lines
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    stages, cur = [], None
    for l in lines:
        word, _, rest = l.partition(" ")
        if word.upper() == "FROM":
            cur = {"from": rest, "lines": []}
            stages.append(cur)
        elif cur is not None:
            cur["lines"].append((word.upper(), rest.strip()))
    build = " ".join(r for st in stages[:-1] for w, r in st["lines"] if w == "RUN")
    built = set(re.findall(r"--bin\s+([A-Za-z0-9_-]+)", build))
    runtime = stages[-1]
    copied = {}
    for w, r in runtime["lines"]:
        if w != "COPY":
            continue
        args = shlex.split(r)
        if not any(a.startswith("--from=") for a in args):
            continue
        paths = [a for a in args if not a.startswith("--")]
        dest = paths[-1]
        for src in paths[:-1]:
            name = src.rstrip("/").rsplit("/", 1)[-1]
            if name not in bins:
                problems.append(f"{path}: COPY --from {src}: {name} is not a bin target of the workspace ({sorted(bins)})")
            if name not in built:
                problems.append(f"{path}: COPY --from {src}: the build stage does not build --bin {name}")
            copied[dest.rstrip("/") + "/" + name if dest.endswith("/") else dest] = name
    if not copied:
        problems.append(f"{path}: the runtime stage copies no binary from the build stage")
    users = [r for w, r in runtime["lines"] if w == "USER"]
    if not users or not re.fullmatch(r"[1-9][0-9]*(:[1-9][0-9]*)?", users[-1]):
        problems.append(f"{path}: runtime USER {users[-1] if users else None!r} is not a numeric non-root uid[:gid]")
    entry = [r for w, r in runtime["lines"] if w == "ENTRYPOINT"]
    if not entry:
        problems.append(f"{path}: no ENTRYPOINT")
    else:
        exe = json.loads(entry[-1])[0]
        if exe not in copied:
            problems.append(f"{path}: ENTRYPOINT {exe} is not a copied binary ({sorted(copied)})")
    images[path.rsplit("/", 1)[-1]] = copied
    verdict = "problems below" if any(p.startswith(path) for p in problems) else "workspace bins, all built"
    print(f"{path}: runtime copies {', '.join(sorted(copied.values()))} ({verdict}); USER {users[-1] if users else '-'}")
# Each chart Deployment runs its component's image, <repository>/<component>[:tag|@digest], built by
# docker/<component>.Dockerfile (ca: ca.Dockerfile, injector: injector.Dockerfile); an explicit
# command must be a binary that image copies (without one, the entrypoint checked above runs).
checked = set()
for rendered in sorted(glob.glob(f"{renders}/*/all.yaml")):
    setname = rendered.rsplit("/", 2)[-2]
    for d in yaml.safe_load_all(open(rendered)):
        if not d or d.get("kind") != "Deployment":
            continue
        dep = f"chart {d['metadata']['name']} ({setname})"
        component = d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        if (d["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test":
            # `helm test` fixtures (the mesh test's server) run public images, not meshid's.
            checked.add(f"{component} -> helm test fixture, {d['spec']['template']['spec']['containers'][0]['image']}")
            continue
        for c in d["spec"]["template"]["spec"]["containers"]:
            ref = c["image"]
            image = ref.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]
            dockerfile = f"{image}.Dockerfile"
            if image != component:
                problems.append(f"{dep}: container {c['name']} runs {ref}, not the {component} image")
            if dockerfile not in images:
                problems.append(f"{dep}: container {c['name']} runs {ref}: no docker/{dockerfile} builds it")
                continue
            for exe in c.get("command", [])[:1]:
                if exe not in images[dockerfile]:
                    problems.append(f"{dep}: command {exe} is not in docker/{dockerfile}'s image ({sorted(images[dockerfile])})")
            checked.add(f"{component} -> docker/{dockerfile}" + (f" ({c['command'][0]})" if c.get("command") else " (entrypoint)"))
for want in ("ca", "injector"):
    if not any(x.startswith(f"{want} -> ") for x in checked):
        problems.append(f"chart: no {want} Deployment rendered to check against docker/{want}.Dockerfile")
print("chart Deployments and their images:", "; ".join(sorted(checked)))
sidecar = images.get("sidecar.Dockerfile", {})
if "/usr/local/bin/meshid-sidecar" not in sidecar:
    problems.append("docker/sidecar.Dockerfile: the injected sidecar relies on meshid-sidecar as the image's entrypoint")
for p in problems:
    print("FAIL:", p, file=sys.stderr)
sys.exit(1 if problems else 0)
PY
echo "k8s check: all passed"
