#!/usr/bin/env bash
# The delegation example, run against `baton dev` (start it first, from the
# same directory, in another terminal):
#
#   a human (alice) starts a task -> the planner agent redeems its grant ->
#   hands a narrower scope to the researcher agent -> the researcher calls
#   the example CRM tool server (search allowed, update denied) -> the task
#   ends -> the audit trace is printed and the log verified.
#
# Every agent here runs as your uid, so each redeem names which identity it
# takes (--spiffe-id); in production agents differ by uid or executable.
set -euo pipefail

BATON=${BATON:-baton}
DEV=${BATON_DEV_DIR:-.baton-dev}
export BATON_ADMIN_SOCKET="$DEV/admin.sock"
export SPIFFE_ENDPOINT_SOCKET="unix://$(cd "$DEV" && pwd)/agent.sock"
export BATON_BROKER_URL="https://$(cat "$DEV/broker.addr")"
NODE=spiffe://example.org/baton/node/dev
PLANNER=spiffe://example.org/agents/planner
RESEARCHER=spiffe://example.org/agents/researcher
WORK=$(mktemp -d)
trap 'kill $TOOL_PID 2>/dev/null || true; rm -rf "$WORK"' EXIT

# shellcheck source=examples/lib.sh
. "$(dirname "$0")/lib.sh"

say "register the agents and the tool server (ignored if they exist)"
for id in /tools/crm /agents/planner /agents/researcher; do
  "$BATON" entry create --spiffe-id "spiffe://example.org$id" --parent-id "$NODE" \
    --selector "unix:uid:$(id -u)" >/dev/null 2>&1 || true
done

say "start the example CRM tool server"
"$BATON" example tool-server --audience crm --spiffe-id spiffe://example.org/tools/crm \
  --spool "$WORK/spool" \
  --ready-file "$WORK/tool.addr" >"$WORK/tool.log" 2>&1 &
TOOL_PID=$!
# Waits (up to 60 s) for the tool server's address.
for _ in $(seq 1 600); do [ -s "$WORK/tool.addr" ] && break; sleep 0.1; done
TOOL_URL="https://$(cat "$WORK/tool.addr")"

say "alice starts a task for the planner"
"$BATON" task start --user alice@example.com --group engineering --root-agent "$PLANNER" \
  --purpose support.case-research --risk-ceiling write --ttl 10m --max-depth 2 \
  --scope tool:crm.search:read --scope tool:crm.update:write --scope dataset:crm:read \
  --audience crm -o json | tee "$WORK/task.json"
TASK=$(sed -n 's/.*"task_id": "\(.*\)".*/\1/p' "$WORK/task.json")
GRANT=$(sed -n 's/.*"grant": "\(.*\)".*/\1/p' "$WORK/task.json")

say "the planner redeems its grant through the node daemon"
redeem "$GRANT" "$PLANNER" "$WORK/planner"

say "the planner hands search-only to the researcher"
"$BATON" delegate --credential "$WORK/planner" --target "$RESEARCHER" \
  --scope tool:crm.search:read --scope dataset:crm:read --audience crm \
  --justification "look up the customer's open cases" -o json | tee "$WORK/hop.json"
HOP=$(sed -n 's/.*"grant": "\(.*\)".*/\1/p' "$WORK/hop.json")
redeem "$HOP" "$RESEARCHER" "$WORK/researcher"

say "the researcher searches the CRM (allowed)"
"$BATON" example call --credential "$WORK/researcher" --url "$TOOL_URL" --tool crm.search --input '{"q":"acme"}'

say "the researcher tries to update a case (denied)"
"$BATON" example call --credential "$WORK/researcher" --url "$TOOL_URL" --tool crm.update --input '{"case":42}' || true

say "alice's task ends"
"$BATON" task end "$TASK" >/dev/null

say "the audit trace"
for _ in $(seq 1 50); do
  "$BATON" audit trace "$TASK" | grep -q crm.update && break; sleep 0.2
done
"$BATON" audit trace "$TASK"
"$BATON" audit verify
