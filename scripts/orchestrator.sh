#!/usr/bin/env bash
# `make example-orchestrator`: a dev broker, two credentials each granted to
# one sub-agent, and examples/orchestrator running a task across them.
set -euo pipefail
LEASEHOLD=${LEASEHOLD:-bin/leasehold}
DIR=${DEMO_DIR:-.demo-orchestrator}
source "$(dirname "$0")/devbroker.sh"
start_dev_broker

lh --as admin credential put crm/salesforce --set api_key="sk-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')" >/dev/null
lh --as admin credential put db/warehouse --set password="pw-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')" >/dev/null
lh --as admin grant create --credential crm/salesforce --spiffe-id spiffe://leasehold.dev/agents/agent-1 --scopes read >/dev/null
lh --as admin grant create --credential db/warehouse --spiffe-id spiffe://leasehold.dev/agents/agent-2 --scopes read >/dev/null

go run ./examples/orchestrator --addr "$addr" --dev-dir "$DIR"
printf '\nThe audit trail of task report-42:\n'
lh --as admin audit query --limit 20 | grep -E 'SEQ|report-42'
