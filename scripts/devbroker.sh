# Sourced by the demo scripts: starts `leasehold dev` on a free port under
# $DIR, sets $addr, stops the broker on exit, and defines lh (the CLI
# against it).
start_dev_broker() {
  rm -rf "$DIR"
  mkdir -p -m 700 "$DIR"
  "$LEASEHOLD" dev --dir "$DIR" --listen 127.0.0.1:0 >"$DIR/broker.out" 2>"$DIR/broker.log" &
  broker=$!
  trap 'kill "$broker" 2>/dev/null || true; wait "$broker" 2>/dev/null || true' EXIT
  addr=""
  for _ in $(seq 100); do
    addr=$(sed -n 's/^Leasehold dev broker on \([^ ]*\) .*/\1/p' "$DIR/broker.out")
    [ -n "$addr" ] && return 0
    kill -0 "$broker" 2>/dev/null || { cat "$DIR/broker.log"; echo "broker exited" >&2; exit 1; }
    sleep 0.1
  done
  echo "broker did not start" >&2
  exit 1
}

lh() { "$LEASEHOLD" --addr "$addr" --dev-dir "$DIR" "$@"; }
