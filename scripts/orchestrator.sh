#!/usr/bin/env bash
# `make example-orchestrator`: a dev broker, two credentials granted to the
# orchestrator with one level of delegation, examples/orchestrator
# delegating them to two sub-agents for one subtask each, and then one
# revocation of the orchestrator cutting the whole tree off.
set -euo pipefail
LEASEHOLD=${LEASEHOLD:-bin/leasehold}
DIR=${DEMO_DIR:-.demo-orchestrator}
source "$(dirname "$0")/devbroker.sh"
start_dev_broker
ORCH=spiffe://leasehold.dev/agents/orchestrator

lh --as admin credential put crm/salesforce --set api_key="sk-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')" >/dev/null
lh --as admin credential put db/warehouse --set password="pw-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')" >/dev/null
lh --as admin grant create --credential crm/salesforce --spiffe-id "$ORCH" --scopes read,write --max-delegation-depth 1 >/dev/null
lh --as admin grant create --credential db/warehouse --spiffe-id "$ORCH" --scopes read --max-delegation-depth 1 >/dev/null

go run ./examples/orchestrator --addr "$addr" --dev-dir "$DIR"

printf '\nThe admin revokes the orchestrator; everything it delegated goes with it:\n'
lh --as admin agent revoke "$ORCH" --reason "demo: orchestrator compromised" | grep -E 'delegated|leases'
if lh --as agent-1 acquire crm/salesforce --scopes read --task report-42/crm >/dev/null 2>"$DIR/refused"; then
  echo "agent-1 still got a lease (unexpected)"; exit 1
fi
printf 'agent-1 afterwards: %s\n' "$(cat "$DIR/refused")"

printf '\nThe audit trail of task report-42 (DELEGATED BY: on whose behalf each sub-agent acted):\n'
lh --as admin audit query --limit 40 | grep -E 'SEQ|report-42'
