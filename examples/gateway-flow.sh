#!/usr/bin/env bash
# The gateway example, run against `baton dev` (start it first, from the
# same directory, in another terminal):
#
#   a CRM that knows nothing of Baton (example-crm: an MCP server built
#   with the official Rust SDK, and a plain HTTP API) -> `baton gateway`
#   in front of it -> alice starts a task -> the planner hands search-only
#   to the researcher -> the researcher calls the CRM through the gateway
#   over MCP and over HTTP (search allowed, update refused) -> the task
#   ends and its credential is refused -> the audit trace shows every call
#   the gateway decided, and the log verifies.
#
# Every process here runs as your uid, so each redeem names which identity
# it takes (--spiffe-id); in production they differ by uid or executable.
set -euo pipefail

BATON=${BATON:-baton}
EXAMPLE_CRM=${EXAMPLE_CRM:-example-crm}
DEV=${BATON_DEV_DIR:-.baton-dev}
export BATON_ADMIN_SOCKET="$DEV/admin.sock"
AGENT_SOCKET="$(cd "$DEV" && pwd)/agent.sock"
export SPIFFE_ENDPOINT_SOCKET="unix://$AGENT_SOCKET"
BROKER="$(cat "$DEV/broker.addr")"
export BATON_BROKER_URL="https://$BROKER"
NODE=spiffe://example.org/baton/node/dev
PLANNER=spiffe://example.org/agents/planner
RESEARCHER=spiffe://example.org/agents/researcher
# The gateway's SPIFFE ID is the tokens' audience: the broker then takes
# its call records and approval requests without further configuration.
GATEWAY=spiffe://example.org/tools/gateway
WORK=$(mktemp -d)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"' EXIT

# shellcheck source=examples/lib.sh
. "$(dirname "$0")/lib.sh"

# Waits (up to 20 s) until FILE is non-empty.
wait_file() {
  for _ in $(seq 1 200); do [ -s "$1" ] && return 0; sleep 0.1; done
  echo "$1 did not appear; log:" >&2; cat "$2" >&2; return 1
}

# Runs a call that must be refused: shows the refusal, fails if it passed.
refused() {
  if "$@" 2>"$WORK/refused.err"; then
    echo "expected a refusal, but the call went through" >&2
    return 1
  fi
  echo "refused: $(cat "$WORK/refused.err")"
}

say "register the agents and the gateway (ignored if they exist)"
for id in /tools/gateway /agents/planner /agents/researcher; do
  "$BATON" entry create --spiffe-id "spiffe://example.org$id" --parent-id "$NODE" \
    --selector "unix:uid:$(id -u)" >/dev/null 2>&1 || true
done

say "start the CRM (MCP + HTTP, plain, on loopback; it knows nothing of Baton)"
"$EXAMPLE_CRM" --ready-file "$WORK/crm.addr" >"$WORK/crm.log" 2>&1 &
PIDS+=($!)
wait_file "$WORK/crm.addr" "$WORK/crm.log"
CRM_MCP=$(sed -n 's/^mcp=//p' "$WORK/crm.addr")
CRM_HTTP=$(sed -n 's/^http=//p' "$WORK/crm.addr")

say "start the gateway in front of it"
cat >"$WORK/gateway.toml" <<TOML
listen = "127.0.0.1:0"
audience = "$GATEWAY"
broker-url = "https://$BROKER"
spiffe-id = "$GATEWAY"
spool = "$WORK/gateway-spool"

[upstreams.crm-mcp]
url = "http://$CRM_MCP"

[upstreams.crm-http]
url = "http://$CRM_HTTP"

# The plain HTTP API: each route is a tool.
[[routes]]
method = "GET"
path = "/accounts/{account}"
upstream = "crm-http"
tool = "crm.search"
resource = "dataset:crm"
permission = "tool:crm.search:read"
tier = "read"
record-output = ["/open_cases"]

[[routes]]
method = "PUT"
path = "/cases/{case}"
upstream = "crm-http"
tool = "crm.update"
resource = "dataset:crm"
permission = "tool:crm.update:write"
tier = "write"
record-input = ["/status"]

# The MCP server: each tool call is decided from its name and arguments.
[[mcp]]
path = "/mcp"
upstream = "crm-mcp"

[[mcp.tools]]
name = "crm.search"
resource = "dataset:crm"
permission = "tool:crm.search:read"
tier = "read"
record-input = ["/account"]

[[mcp.tools]]
name = "crm.update"
resource = "dataset:crm"
permission = "tool:crm.update:write"
tier = "write"
TOML
"$BATON" gateway --config "$WORK/gateway.toml" --socket "$AGENT_SOCKET" \
  --ready-file "$WORK/gateway.addr" >"$WORK/gateway.log" 2>&1 &
PIDS+=($!)
wait_file "$WORK/gateway.addr" "$WORK/gateway.log"
GW="https://$(cat "$WORK/gateway.addr")"

say "alice starts a task for the planner, for tools behind the gateway"
"$BATON" task start --user alice@example.com --group engineering --root-agent "$PLANNER" \
  --purpose support.case-research --risk-ceiling write --ttl 10m --max-depth 2 \
  --scope tool:crm.search:read --scope tool:crm.update:write --scope dataset:crm:read \
  --audience "$GATEWAY" -o json | tee "$WORK/task.json"
TASK=$(sed -n 's/.*"task_id": "\(.*\)".*/\1/p' "$WORK/task.json")
GRANT=$(sed -n 's/.*"grant": "\(.*\)".*/\1/p' "$WORK/task.json")

say "the planner redeems its grant and hands search-only to the researcher"
redeem "$GRANT" "$PLANNER" "$WORK/planner"
"$BATON" delegate --credential "$WORK/planner" --target "$RESEARCHER" \
  --scope tool:crm.search:read --scope dataset:crm:read --audience "$GATEWAY" \
  --justification "look up the customer's open cases" -o json >"$WORK/hop.json"
HOP=$(sed -n 's/.*"grant": "\(.*\)".*/\1/p' "$WORK/hop.json")
redeem "$HOP" "$RESEARCHER" "$WORK/researcher"

say "the researcher searches over MCP (allowed; the CRM sees who asked)"
"$BATON" example call --credential "$WORK/researcher" --url "$GW/mcp" --mcp \
  --tool crm.search --input '{"account":"acme"}'

say "the researcher tries to update a case over MCP (refused: not in its scope)"
refused "$BATON" example call --credential "$WORK/researcher" --url "$GW/mcp" --mcp \
  --tool crm.update --input '{"account":"acme","case":42,"status":"closed"}'

say "the researcher reads the account over HTTP (allowed)"
"$BATON" example call --credential "$WORK/researcher" --url "$GW" --path /accounts/acme

say "the researcher tries to close the case over HTTP (refused)"
refused "$BATON" example call --credential "$WORK/researcher" --url "$GW" \
  --method PUT --path /cases/42 --input '{"status":"closed"}'

say "alice's task ends: the researcher's credential is refused at the gateway"
"$BATON" task end "$TASK" >/dev/null
for _ in $(seq 1 100); do
  "$BATON" example call --credential "$WORK/researcher" --url "$GW" --path /accounts/acme \
    >/dev/null 2>&1 || break
  sleep 0.1
done
refused "$BATON" example call --credential "$WORK/researcher" --url "$GW" --path /accounts/acme

say "the audit trace: every call the gateway decided"
# The gateway's call records reach the broker in no fixed order: wait for
# the refused update and what the reads recorded (up to 60 s).
for _ in $(seq 1 300); do
  TRACE=$("$BATON" audit trace "$TASK" 2>/dev/null || true)
  grep -q "PUT\|crm.update" <<<"$TRACE" && grep -q "account=acme" <<<"$TRACE" &&
    grep -q "open_cases=3" <<<"$TRACE" && break
  sleep 0.2
done
"$BATON" audit trace "$TASK"
"$BATON" audit verify
