# Shared by bench/run.sh and bench/ab.sh; sourced, not run.

# launch_exporter BINARY DIR [FLAGS...]: starts BINARY on a fresh socket and
# database in DIR with an ephemeral loopback HTTP port, waits until it
# listens, and sets EXP_PID, SOCK, DB and URL (its /metrics). Exits the
# script with the exporter's log if it does not start.
launch_exporter() {
  local bin=$1 dir=$2
  shift 2
  mkdir -p "$dir"
  SOCK=$dir/monitor.sock
  DB=$dir/monitor.db
  "$bin" --socket.path "$SOCK" --db.path "$DB" --web.listen-address 127.0.0.1:0 \
    --log.level warn,kissbot_exporter::http=info "$@" >"$dir/exporter.log" 2>&1 &
  EXP_PID=$!
  local addr=""
  for _ in $(seq 1 200); do
    addr=$(sed -n 's/.*http server listening.*address=\([0-9.:]*\).*/\1/p' "$dir/exporter.log" | head -1)
    if [ -n "$addr" ] && [ -S "$SOCK" ]; then break; fi
    sleep 0.05
  done
  if [ -z "$addr" ]; then
    cat "$dir/exporter.log" >&2
    echo "exporter did not start" >&2
    exit 1
  fi
  URL=http://$addr/metrics
}
