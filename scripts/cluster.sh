#!/usr/bin/env bash
# `make example-cluster`: three etcd members and two dev brokers sharing
# them. A grant made on one broker is used on the other; a revocation on one
# is in force on the other; the broker leading background work is killed
# and the other takes over; an etcd member is killed and serving goes on.
# Production settings: docs/deployment.md.
set -euo pipefail
LEASEHOLD=${LEASEHOLD:-bin/leasehold}
ETCD=${ETCD:-bin/etcd}
DIR=${DEMO_DIR:-.demo-cluster}
rm -rf "$DIR"
mkdir -p -m 700 "$DIR"
pids=()
trap 'kill -9 "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT

# GET /health from an etcd member with bash alone (no curl needed).
healthy() { # URL
  local hp=${1#http://}
  (exec 3<>"/dev/tcp/${hp%:*}/${hp#*:}" && printf 'GET /health HTTP/1.0\r\n\r\n' >&3 && cat <&3) 2>/dev/null |
    grep -q '"health":"true"'
}

# A free loopback port (bash's /dev/tcp: a port nobody answers on).
free_port() {
  while :; do
    local p=$((20000 + RANDOM % 20000))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
}

echo "== three etcd members"
peers=() clients=() initial=""
for i in 0 1 2; do
  peers[i]=http://127.0.0.1:$(free_port) clients[i]=http://127.0.0.1:$(free_port)
  initial+="${initial:+,}m$i=${peers[i]}"
done
for i in 0 1 2; do
  "$ETCD" --name "m$i" --data-dir "$DIR/etcd-$i" --log-level error \
    --listen-peer-urls "${peers[i]}" --initial-advertise-peer-urls "${peers[i]}" \
    --listen-client-urls "${clients[i]}" --advertise-client-urls "${clients[i]}" \
    --initial-cluster "$initial" --initial-cluster-state new \
    --max-txn-ops 32768 --max-request-bytes 8388608 >"$DIR/etcd-$i.log" 2>&1 &
  etcd_pid[i]=$!
  pids+=("$!")
done
for i in 0 1 2; do
  for _ in $(seq 200); do
    healthy "${clients[i]}" && break
    sleep 0.1
  done
done
endpoints=$(IFS=,; echo "${clients[*]}")
echo "   $endpoints"

echo "== two brokers on them (leasehold dev --store-endpoints ...)"
start_broker() { # name
  "$LEASEHOLD" dev --dir "$DIR/dev" --listen 127.0.0.1:0 --store-endpoints "$endpoints" \
    >"$DIR/$1.out" 2>"$DIR/$1.log" &
  local pid=$!
  pids+=("$pid")
  eval "pid_$1=$pid"
  for _ in $(seq 200); do
    local a
    a=$(sed -n 's/^Leasehold dev broker on \([^ ]*\) .*/\1/p' "$DIR/$1.out")
    if [ -n "$a" ]; then eval "addr_$1=$a"; echo "   broker $1 on $a"; return 0; fi
    kill -0 "$pid" 2>/dev/null || { cat "$DIR/$1.log"; echo "broker $1 exited" >&2; exit 1; }
    sleep 0.1
  done
  echo "broker $1 did not start" >&2; exit 1
}
start_broker a
start_broker b
on() { local b=$1; shift; eval "local addr=\$addr_$b"; "$LEASEHOLD" --addr "$addr" --dev-dir "$DIR/dev" "$@"; }

echo "== on broker a: a credential and a grant; on broker b: agent-1 uses it"
on a --as admin credential put crm/api --set api_key="sk-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')" >/dev/null
on a --as admin grant create --credential crm/api --spiffe-id-prefix spiffe://leasehold.dev/agents --scopes read >/dev/null
lease_id() { sed -n 's/^ *"id": *"\(ls_[^"]*\)".*/\1/p' | head -1; }
echo "   agent-1 on b got lease $(on b --as agent-1 acquire crm/api --scopes read --task cluster-1 | lease_id)"

echo "== on broker a: revoke agent-1; on broker b, at once:"
on a --as admin agent revoke spiffe://leasehold.dev/agents/agent-1 --reason "demo: compromised" >/dev/null
if on b --as agent-1 acquire crm/api --scopes read --task cluster-2 >/dev/null 2>"$DIR/refused"; then
  echo "agent-1 still got a lease on b (unexpected)"; exit 1
fi
echo "   $(cat "$DIR/refused")"

echo "== the broker leading background work (reaper, revocation queue, rotation) is killed"
leader=a other=b
for _ in $(seq 100); do
  grep -q "leading background work" "$DIR/a.log" && break
  grep -q "leading background work" "$DIR/b.log" && { leader=b other=a; break; }
  sleep 0.1
done
eval "kill -9 \$pid_$leader; wait \$pid_$leader 2>/dev/null || true"
echo "   killed broker $leader (SIGKILL)"
for _ in $(seq 100); do
  grep -q "leading background work" "$DIR/$other.log" && break
  sleep 0.1
done
grep -q "leading background work" "$DIR/$other.log" || { echo "broker $other did not take over" >&2; exit 1; }
echo "   broker $other took over the background work"
echo "   agent-2 on $other got lease $(on "$other" --as agent-2 acquire crm/api --scopes read --task cluster-3 | lease_id)"

echo "== an etcd member is killed; broker $other goes on"
kill -9 "${etcd_pid[0]}"; wait "${etcd_pid[0]}" 2>/dev/null || true
echo "   agent-2 on $other got lease $(on "$other" --as agent-2 acquire crm/api --scopes read --task cluster-4 | lease_id)"

echo "== the audit trail, written by both brokers, verifies"
on "$other" --as admin audit verify | sed 's/^/   /'
on "$other" --as admin audit query --limit 8 | sed 's/^/   /'
