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
# shellcheck source=bench/lib.sh
. bench/lib.sh
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
EXP_PID=""
trap 'if [ -n "$EXP_PID" ]; then kill "$EXP_PID" 2>/dev/null || true; fi; rm -rf "$WORK"' EXIT

# one BINARY: starts it on a fresh directory, runs the scenario, prints the figure.
one() {
  local dir
  dir=$(mktemp -d "$WORK/run.XXXX")
  launch_exporter "$1" "$dir" "${FLAGS[@]}"
  "$LG" ingest --socket "$SOCK" --metrics-url "$URL" --db "$DB" --exporter-pid "$EXP_PID" \
    "${ARGS[@]}" --duration 6s --out "$dir/out.json" >/dev/null
  kill "$EXP_PID"
  wait "$EXP_PID" || true
  EXP_PID=""
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['latency_ms']['p99'] if sys.argv[2]=='per-message-6k' else round(d['exporter']['accepted_per_second']))" \
    "$dir/out.json" "$SCENARIO"
}

for round in $(seq 1 "$ROUNDS"); do
  echo "round $round: old $(one "$OLD") new $(one "$NEW")"
done
