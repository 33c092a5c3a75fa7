#!/usr/bin/env bash
# Baseline wrk figures for the workerd peer (needs wrk on PATH).
#
# Usage: bench/workerd/baseline.sh [WORKERD_BIN] [PORT] [DURATION] [RUNS]
#
# Starts workerd on 127.0.0.1:PORT with a fresh temp storage dir, runs each
# scenario RUNS times, prints wrk's output, then the RSS after touching 10,000
# distinct objects, and stops workerd.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${1:-$("$here/install.sh")}"
port="${2:-18787}"
dur="${3:-10s}"
runs="${4:-2}"
url="http://127.0.0.1:$port"

data="$(mktemp -d)"
"$bin" serve "$here/config.capnp" \
  --socket-addr "http=127.0.0.1:$port" \
  --directory-path "do-storage=$data" &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -rf "$data"
}
trap cleanup EXIT

for _ in $(seq 1 100); do
  if curl -fs -o /dev/null "$url/obj/warmup/read"; then break; fi
  sleep 0.1
done
curl -fs -o /dev/null "$url/obj/warmup/read"

run() {
  local label="$1"
  shift
  for r in $(seq 1 "$runs"); do
    echo "=== $label (run $r)"
    wrk --latency -d "$dur" "$@"
  done
}

run "a: incr, 1 object, 1 conn" -t1 -c1 -s "$here/wrk/incr-one.lua" "$url"
run "b: incr, 1 object, 64 conns" -t1 -c64 -s "$here/wrk/incr-one.lua" "$url"
run "c: incr, 1000 objects, 64 conns" -t1 -c64 -s "$here/wrk/incr-many.lua" "$url"
run "d: read, 1 object, 64 conns" -t1 -c64 "$url/obj/obj-0/read"

# RSS after touching 10,000 distinct objects (obj-0..obj-9999, one incr each
# at least: 1 wrk thread cycling round-robin until every name was hit).
echo "=== RSS: before touching 10k objects: $(ps -o rss= -p "$pid") KiB"
WRK_OBJECTS=10000 wrk -t1 -c64 -d 30s -s "$here/wrk/incr-many.lua" "$url" >/dev/null &
wrkpid=$!
until [[ "$(curl -fs "$url/obj/obj-9999/read")" != '{"n":0}' ]]; do sleep 0.2; done
kill "$wrkpid"
wait "$wrkpid" 2>/dev/null || true
echo "=== RSS: after touching 10k objects: $(ps -o rss= -p "$pid") KiB"
echo "=== storage files: $(find "$data" -type f | wc -l), $(du -sh "$data" | cut -f1)"
