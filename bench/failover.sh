#!/usr/bin/env bash
# Time to fail over (issue 11): from `kill -9` of the broker a node daemon
# talks to until the daemon's next sync and signing succeed elsewhere.
#
# Two `baton broker` processes on one PostgreSQL database (shared, sealed
# CA) and one `baton agent` given both URLs, the killed one first. Each
# round registers a new workload entry at the surviving broker and times
# until a workload on the node gets that entry's X509-SVID, which the
# daemon can only have after a sync and a signing that reached a broker.
# The same is timed with both brokers up in the same run (the baseline: the
# wait for the daemon's next sync tick is in both), so the figure that
# carries across machines is failover - baseline. The killed broker is
# restarted on its address between rounds.
#
# Usage: bench/failover.sh [ROUNDS=10] [SYNC_INTERVAL=1s]
# PostgreSQL: BATON_BENCH_PG (libpq key/value, without dbname; default
# "host=127.0.0.1 port=5432 user=postgres"); a throwaway database is
# created and dropped. BATON_BIN: a built `baton` (default: a release
# build of baton-cli, built if needed).
set -euo pipefail

rounds="${1:-10}"
interval="${2:-1s}"
pg="${BATON_BENCH_PG:-host=127.0.0.1 port=5432 user=postgres}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
work="$(mktemp -d)"
db="baton_failover_$$"
pids=()
cleanup() {
    exec 2>/dev/null # the shell reports each process it kills
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for f in "$work"/*.pid; do [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true; done
    psql "$pg dbname=postgres" -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "${BATON_BIN:-}" ]; then
    (cd "$repo" && cargo build --release --locked -p baton-cli)
    baton="${CARGO_TARGET_DIR:-$repo/target}/release/baton"
else
    baton="$BATON_BIN"
fi
echo "# bench/failover.sh: $(date -u +%Y-%m-%dT%H:%M:%SZ), nproc $(nproc), $rounds rounds, agent --sync-interval $interval"

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# Polls `what` every 20 ms for up to 60 s.
wait_until() {
    local what="$1"
    shift
    local deadline=$(($(now_ms) + 60000))
    until "$@" >/dev/null 2>&1; do
        if [ "$(now_ms)" -gt "$deadline" ]; then
            echo "timed out waiting for $what" >&2
            exit 1
        fi
        sleep 0.02
    done
}

psql "$pg dbname=postgres" -qc "CREATE DATABASE $db" >/dev/null
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/seal.key"
echo >>"$work/seal.key"
chmod 600 "$work/seal.key"

# start_broker NAME LISTEN: starts it and waits for its ready file.
start_broker() {
    local name="$1" listen="$2"
    mkdir -p "$work/$name"
    rm -f "$work/$name/addr"
    "$baton" broker --trust-domain bench.test --listen "$listen" \
        --datastore "$pg dbname=$db" --ca-encryption-key-file "$work/seal.key" \
        --data-dir "$work/$name/broker" --admin-socket "$work/$name/admin.sock" \
        --ready-file "$work/$name/addr" >>"$work/$name.log" 2>&1 &
    echo $! >"$work/$name.pid"
    wait_until "broker $name" test -s "$work/$name/addr"
}
admin() {
    local name="$1"
    shift
    BATON_ADMIN_SOCKET="$work/$name/admin.sock" "$baton" "$@"
}

start_broker a 127.0.0.1:0
start_broker b 127.0.0.1:0
addr_a="$(cat "$work/a/addr")"
addr_b="$(cat "$work/b/addr")"

token="$(admin a token generate -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')"
"$baton" agent --trust-domain bench.test --sync-interval "$interval" \
    --broker-url "https://$addr_a,https://$addr_b" \
    --data-dir "$work/agent" --socket "$work/agent.sock" \
    --trust-bundle "$work/a/broker/bundle.pem" --join-token "$token" \
    --ready-file "$work/agent.ready" >"$work/agent.log" 2>&1 &
pids+=($!)
wait_until "the node daemon" test -s "$work/agent.ready"
node="$(cat "$work/agent.ready")"

fetch() {
    SPIFFE_ENDPOINT_SOCKET="unix:$work/agent.sock" "$baton" svid fetch --spiffe-id "$1"
}

# One measurement: registers workload N at broker b and times until the
# workload gets its SVID from the node daemon.
measure() {
    local n="$1" t0="$2"
    local id="spiffe://bench.test/bench/w$n"
    admin b entry create --spiffe-id "$id" --parent-id "$node" \
        --selector "unix:uid:$(id -u)" >/dev/null
    wait_until "the SVID of $id" fetch "$id"
    echo $(($(now_ms) - t0))
}

base=()
fail=()
for i in $(seq 1 "$rounds"); do
    # Baseline: both brokers up, at a random point of the sync cycle.
    sleep "0.$((RANDOM % 10))"
    v="$(measure "base$i" "$(now_ms)")" || exit 1
    base+=("$v")
    # Failover: the daemon's first broker dies (kill -9), then the same.
    sleep "0.$((RANDOM % 10))"
    kill -9 "$(cat "$work/a.pid")"
    wait "$(cat "$work/a.pid")" 2>/dev/null || true
    t0="$(now_ms)"
    v="$(measure "fail$i" "$t0")" || exit 1
    fail+=("$v")
    start_broker a "$addr_a"
done

python3 - "$interval" "${base[*]}" "${fail[*]}" <<'PY'
import statistics, sys
interval = sys.argv[1]
base = sorted(int(x) for x in sys.argv[2].split())
fail = sorted(int(x) for x in sys.argv[3].split())
def q(v, p):
    return v[min(len(v) - 1, int(round(p * (len(v) - 1))))]
print(f"| measure (agent --sync-interval {interval}) | p50 ms | p90 ms | max ms |")
print("|---|---|---|---|")
print(f"| both brokers up: entry registered -> workload has its SVID | {q(base, .5)} | {q(base, .9)} | {base[-1]} |")
print(f"| kill -9 of the daemon's first broker -> workload has a new SVID | {q(fail, .5)} | {q(fail, .9)} | {fail[-1]} |")
print(f"| failover - baseline | {q(fail, .5) - q(base, .5)} | {q(fail, .9) - q(base, .9)} | {fail[-1] - base[-1]} |")
PY
