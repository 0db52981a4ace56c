#!/usr/bin/env bash
# The dependency graph is the architecture (README "What is here"): this fails the build when it is
# not. Checked from `cargo tree` (normal dependencies, the ones that ship):
#   - meshid-ca, meshid-injector and meshid-sidecar never depend on each other;
#   - meshid-identity (the pure identity core) has no tokio, hyper, tonic or socket library in its
#     tree, and no meshid crate but meshid-proto;
#   - meshid-proto (the generated contract) and meshid-runtime depend on no other meshid crate but
#     what the table allows.
set -euo pipefail
cd "$(dirname "$0")/.."

problems=()
deps() { # the normal dependency tree of one package, one crate name per line
    cargo tree --quiet -p "$1" -e normal --prefix none --format '{p}' | awk '{print $1}' | sort -u
}

allowed_meshid() { # package, then the meshid crates it may depend on
    local pkg=$1
    shift
    local tree
    tree=$(deps "$pkg")
    while read -r dep; do
        [ "$dep" = "$pkg" ] && continue
        case " $* " in
            *" $dep "*) ;;
            *) problems+=("$pkg depends on $dep (allowed: ${*:-none})") ;;
        esac
    done < <(grep '^meshid-' <<<"$tree" || true)
}

allowed_meshid meshid-proto
allowed_meshid meshid-identity meshid-proto
allowed_meshid meshid-runtime
allowed_meshid meshid-ca meshid-proto meshid-identity meshid-runtime
allowed_meshid meshid-injector meshid-identity meshid-runtime
allowed_meshid meshid-sidecar meshid-proto meshid-identity meshid-runtime

identity=$(deps meshid-identity)
for banned in tokio hyper hyper-util tonic mio socket2 h2 tower; do
    if grep -qx "$banned" <<<"$identity"; then
        problems+=("meshid-identity's dependency tree contains $banned (it must stay pure: no runtime, no sockets)")
    fi
done

if [ ${#problems[@]} -gt 0 ]; then
    echo "scripts/check-layers.sh: the crate graph breaks the layering:" >&2
    printf '  %s\n' "${problems[@]}" >&2
    exit 1
fi
echo "layers OK: ca, injector and sidecar are independent; meshid-identity has no runtime or sockets"
