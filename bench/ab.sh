#!/usr/bin/env bash
# Alternates two exporter builds on one scenario, with this tree's load
# generator, and prints one figure per run:
#
#   bench/ab.sh OLD_BINARY NEW_BINARY SCENARIO [ROUNDS]
#
# SCENARIO: per-message (accepted msg/s), per-message-6k (sender p99 ms),
# long-lived (accepted lines/s), overload (accepted lines/s with a 1,024-row
# queue). ROUNDS (default 4) pairs of 6-second runs, old first. For a
# difference smaller than the machine's run-to-run spread, which bench/run.sh
# alone cannot settle.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=$1 NEW=$2 SCENARIO=$3 ROUNDS=${4:-4}
cargo build --release --locked --bins
LG=$PWD/target/release/kissbot-loadgen
case $SCENARIO in
  per-message) ARGS=(--mode per-message --bots 1000 --senders 32 --llm-ratio 0.2) ;;
  per-message-6k) ARGS=(--mode per-message --bots 1000 --senders 32 --llm-ratio 0.2 --rate 6000) ;;
  long-lived) ARGS=(--mode long-lived --bots 1000 --senders 2 --batch 256 --llm-ratio 0) ;;
  overload) ARGS=(--mode long-lived --bots 1000 --senders 2 --batch 256 --llm-ratio 1) ;;
  *) echo "unknown scenario $SCENARIO" >&2; exit 2 ;;
esac
FLAGS=()
if [ "$SCENARIO" = overload ]; then FLAGS=(--queue.capacity 1024); fi

WORK=$(mktemp -d)
PID=""
trap 'if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; fi; rm -rf "$WORK"' EXIT

# one BINARY: starts it on a fresh directory, runs the scenario, prints the figure.
one() {
  local dir
  dir=$(mktemp -d "$WORK/run.XXXX")
  "$1" --socket.path "$dir/s.sock" --db.path "$dir/m.db" --web.listen-address 127.0.0.1:0 \
    --log.level warn,kissbot_exporter::http=info "${FLAGS[@]}" >"$dir/log" 2>&1 &
  PID=$!
  local addr=""
  for _ in $(seq 1 200); do
    addr=$(sed -n 's/.*http server listening.*address=\([0-9.:]*\).*/\1/p' "$dir/log" | head -1)
    if [ -n "$addr" ] && [ -S "$dir/s.sock" ]; then break; fi
    sleep 0.05
  done
  "$LG" ingest --socket "$dir/s.sock" --metrics-url "http://$addr/metrics" --db "$dir/m.db" --exporter-pid "$PID" \
    "${ARGS[@]}" --duration 6s --out "$dir/out.json" >/dev/null
  kill "$PID"
  wait "$PID" || true
  PID=""
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['latency_ms']['p99'] if sys.argv[2]=='per-message-6k' else round(d['exporter']['accepted_per_second']))" \
    "$dir/out.json" "$SCENARIO"
}

for round in $(seq 1 "$ROUNDS"); do
  echo "round $round: old $(one "$OLD") new $(one "$NEW")"
done
