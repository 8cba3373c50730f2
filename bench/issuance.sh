#!/usr/bin/env bash
# X509-SVID issuance: Baton's broker against cfssl, side by side in one run.
#
#   bench/issuance.sh [seconds] [concurrency] [batch]     (defaults: 10 16 100)
#
# Installs cfssl (Debian golang-cfssl) if missing, makes a throwaway P-256 CA,
# runs `cfssl serve` on loopback with 1 h ECDSA leaves, drives
# /api/v1/cfssl/sign with `baton-bench cfssl`, then runs `baton-bench
# issuance` with the same concurrency and duration, and prints Baton / cfssl.
# Everything lives in a temp dir that is removed, and cfssl killed, at exit.
set -euo pipefail

secs="${1:-10}"
conc="${2:-16}"
batch="${3:-100}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
work="$(mktemp -d)"
cfssl_pid=""
cleanup() {
    if [ -n "$cfssl_pid" ]; then
        kill "$cfssl_pid" 2>/dev/null || true
        wait "$cfssl_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "# bench/issuance.sh: $(date -u +%Y-%m-%dT%H:%M:%SZ), nproc $(nproc), ${secs} s, ${conc} clients, batch ${batch}"
bench="${CARGO_TARGET_DIR:-$repo/target}/release/baton-bench"
if ! (cd "$repo" && cargo build --release -p baton-bench); then
    if [ -x "$bench" ]; then
        echo "WARNING: the release build failed; using the existing $bench"
    else
        exit 1
    fi
fi

# --- the peer: cfssl ------------------------------------------------------
cfssl_rate=""
if ! command -v cfssl >/dev/null 2>&1; then
    echo "cfssl not found; trying apt-get install -y golang-cfssl"
    apt-get install -y golang-cfssl >"$work/apt.log" 2>&1 || true
fi
if command -v cfssl >/dev/null 2>&1 && command -v cfssljson >/dev/null 2>&1; then
    cd "$work"
    cat >ca-csr.json <<'JSON'
{"CN": "baton-bench throwaway CA", "key": {"algo": "ecdsa", "size": 256}}
JSON
    # Leaves like Baton's: 1 h, signature + server/client auth.
    cat >config.json <<'JSON'
{"signing": {"default": {"expiry": "1h", "usages": ["digital signature", "server auth", "client auth"]}}}
JSON
    cfssl gencert -initca ca-csr.json 2>"$work/gencert.log" | cfssljson -bare ca
    port=$((20000 + RANDOM % 20000))
    cfssl serve -address 127.0.0.1 -port "$port" -ca ca.pem -ca-key ca-key.pem \
        -config config.json >"$work/cfssl.log" 2>&1 &
    cfssl_pid=$!
    up=""
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then up=1; break; fi
        if ! kill -0 "$cfssl_pid" 2>/dev/null; then break; fi
        sleep 0.1
    done
    cd "$repo"
    if [ -n "$up" ]; then
        echo "loadavg before cfssl: $(cat /proc/loadavg 2>/dev/null || echo n/a)"
        out="$("$bench" cfssl --url "http://127.0.0.1:$port" --seconds "$secs" \
            --concurrency "$conc" --server-pid "$cfssl_pid")"
        echo "$out"
        cfssl_rate="$(echo "$out" | grep -o '"certs_per_s":[0-9.eE+-]*' | head -1 | cut -d: -f2)"
    else
        echo "NOTE: cfssl serve did not come up on port $port; skipping the peer. Its log:"
        cat "$work/cfssl.log"
    fi
    kill "$cfssl_pid" 2>/dev/null || true
    wait "$cfssl_pid" 2>/dev/null || true
    cfssl_pid=""
else
    echo "NOTE: cfssl could not be installed (see apt-get output below); the peer is skipped and no Baton/cfssl ratio is printed."
    cat "$work/apt.log" 2>/dev/null || true
fi

# --- Baton ------------------------------------------------------------------
# The machine may be shared: a busy neighbour skews one side of the ratio.
echo "loadavg before Baton: $(cat /proc/loadavg 2>/dev/null || echo n/a)"
out="$("$bench" issuance --seconds "$secs" --concurrency "$conc" --batch "$batch")"
echo "$out"
rates="$(echo "$out" | tail -1 | grep -o '"certs_per_s":[0-9.eE+-]*' | cut -d: -f2)"
b1="$(echo "$rates" | sed -n 1p)"
bb="$(echo "$rates" | sed -n 2p)"

if [ -n "$cfssl_rate" ]; then
    awk -v c="$cfssl_rate" -v b1="$b1" -v bb="$bb" -v batch="$batch" 'BEGIN {
        printf "RATIO Baton/cfssl, batch 1: %.2fx (%.0f / %.0f certs/s; target >= 5x)\n", b1 / c, b1, c
        if (bb != "") printf "RATIO Baton/cfssl, batch %s: %.2fx (%.0f / %.0f certs/s; target >= 5x)\n", batch, bb / c, bb, c
    }'
fi
