#!/usr/bin/env bash
# `make demo`: a dev broker on an embedded bbolt store with a dev SPIFFE CA;
# an admin stores a credential and grants it; agent-1 acquires a lease for a
# task, uses it and releases it; agent-2 is denied; the audit trail shows it.
set -euo pipefail

LEASEHOLD=${LEASEHOLD:-bin/leasehold}
DIR=${DEMO_DIR:-.demo}
TD=leasehold.dev

source "$(dirname "$0")/devbroker.sh"
start_dev_broker

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Dev broker on $addr; SVIDs for admin, agent-1 and agent-2 in $DIR/"
lh --as agent-1 whoami

step "Admin stores a credential (encrypted at rest; only its field names are ever shown)"
secret_file="$DIR/crm-api-key"
umask 077 # the generated key file is readable by its owner only
head -c 24 /dev/urandom | base64 | tr -d '/+=' | sed 's/^/sk-demo-/' > "$secret_file"
lh --as admin credential put crm/salesforce --description "CRM API key" \
  --set-file api_key="$secret_file" --set instance_url=https://acme.example.invalid

step "Admin grants agent-1 the 'read' scope, leases of at most 10 minutes"
lh --as admin grant create --credential crm/salesforce \
  --spiffe-id "spiffe://$TD/agents/agent-1" --scopes read --max-ttl 10m >/dev/null
lh --as admin grant list --credential crm/salesforce

# One trace for the task: every CLI call below joins it (TRACEPARENT is the
# OpenTelemetry convention for command-line tools). With the broker exporting
# (OTEL_TRACES_EXPORTER=otlp), the task is one trace in your tracing backend.
trace_id=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
export TRACEPARENT="00-${trace_id}-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')-01"

step "agent-1 acquires a lease for task ticket-4711 (trace $trace_id)"
eval "$(lh --as agent-1 acquire crm/salesforce --scopes read --ttl 2m \
  --task ticket-4711 --purpose "sync contacts to the CRM" --format env)"
echo "lease $LEASEHOLD_LEASE_ID, expires $LEASEHOLD_LEASE_EXPIRES_AT"

step "agent-1 uses it"
fingerprint=$(printf %s "$API_KEY" | sha256sum | cut -c1-12)
echo "calling $INSTANCE_URL with the leased key (sha256 $fingerprint...; the key itself is not printed)"
[ "$API_KEY" = "$(cat "$secret_file")" ] && echo "the leased key is the stored one"
unset API_KEY

step "agent-1 releases the lease"
lh --as agent-1 release "$LEASEHOLD_LEASE_ID" | grep -E '"(id|state|endReason)"'

unset TRACEPARENT

step "agent-2 has no grant and is denied (the denial is audited too)"
if lh --as agent-2 acquire crm/salesforce --scopes read --task ticket-4712 2>&1; then
  echo "demo: agent-2 was not denied" >&2; exit 1
fi

step "The audit trail: who accessed what, when, for which task"
lh --as admin audit query --credential crm/salesforce

step "The task's trace leads to its audit records"
lh --as admin audit query --trace "$trace_id"

printf '\nDone. The broker log is in %s/broker.log.\n' "$DIR"
