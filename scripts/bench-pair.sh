# Sourced by scripts that record a running benchmark pair (symbol-order.sh, request-instructions.sh):
# a work directory removed on exit with every process listed in `pids`, and
# `start_bench_pair BIN_DIR [PAIR]`, which starts `bench-run --serve PAIR` (meshid, the default:
# outbound sidecar -> mTLS, h2 -> inbound sidecar -> app; or nginx) from BIN_DIR, waits until it
# serves, and sets `entry` (the outbound's plaintext address); its output is in "$work/serve.log".
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

start_bench_pair() {
    local pair=${2:-meshid}
    "$1/bench-run" --serve "$pair" --bin-dir "$1" >"$work/serve.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 240); do
        grep -q "running until interrupted" "$work/serve.log" && break
        sleep 0.25
    done
    grep -q "running until interrupted" "$work/serve.log" || {
        cat "$work/serve.log" >&2
        exit 1
    }
    entry=$(sed -n "s/^$pair: plaintext entry //p" "$work/serve.log")
}
