#!/usr/bin/env bash
# Baseline wrk figures for the workerd peer (needs wrk and curl on PATH).
#
# Usage: bench/workerd/baseline.sh [WORKERD_BIN] [PORT] [DURATION] [RUNS]
#
# Starts workerd on 127.0.0.1:PORT with a fresh temp storage dir, runs each
# scenario RUNS times and prints wrk's output; then starts a fresh workerd,
# touches 10,000 distinct objects and prints its RSS.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${1:-$("$here/install.sh")}"
port="${2:-18787}"
dur="${3:-10s}"
runs="${4:-2}"
url="http://127.0.0.1:$port"

pid=""
data=""
stop_workerd() {
  if [[ -n "$pid" ]]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=""
  fi
  if [[ -n "$data" ]]; then
    rm -rf "$data"
    data=""
  fi
}
trap stop_workerd EXIT
trap 'exit 130' INT TERM

start_workerd() {
  data="$(mktemp -d)"
  "$bin" serve "$here/config.capnp" \
    --socket-addr "http=127.0.0.1:$port" \
    --directory-path "do-storage=$data" &
  pid=$!
  for _ in $(seq 1 100); do
    if curl -fs -o /dev/null "$url/obj/warmup/read"; then return 0; fi
    sleep 0.1
  done
  echo "workerd did not become ready on $url" >&2
  return 1
}

run() {
  local label="$1"
  shift
  for r in $(seq 1 "$runs"); do
    echo "=== $label (run $r)"
    wrk --latency -d "$dur" "$@"
  done
}

start_workerd
run "a: incr, 1 object, 1 conn" -t1 -c1 -s "$here/wrk/incr-one.lua" "$url"
run "b: incr, 1 object, 64 conns" -t1 -c64 -s "$here/wrk/incr-one.lua" "$url"
run "c: incr, 1000 objects, 64 conns" -t1 -c64 -s "$here/wrk/incr-many.lua" "$url"
run "d: read, 1 object, 64 conns" -t1 -c64 "$url/obj/obj-0/read"
stop_workerd

# RSS of a fresh workerd after touching 10,000 distinct objects: one wrk thread
# cycles round-robin over obj-0..obj-9999 until obj-9999 has been incremented.
start_workerd
echo "=== RSS: fresh, ready: $(ps -o rss= -p "$pid") KiB"
start=$SECONDS
WRK_OBJECTS=10000 wrk -t1 -c64 -d 600s -s "$here/wrk/incr-many.lua" "$url" >/dev/null &
wrkpid=$!
until [[ "$(curl -fs "$url/obj/obj-9999/read")" =~ ^\{\"n\":[1-9] ]]; do
  if ! kill -0 "$wrkpid" 2>/dev/null; then
    echo "wrk ended before obj-9999 was touched" >&2
    exit 1
  fi
  sleep 0.5
done
kill "$wrkpid"
wait "$wrkpid" 2>/dev/null || true
echo "=== RSS: after touching 10,000 objects ($((SECONDS - start)) s): $(ps -o rss= -p "$pid") KiB"
sleep 15
echo "=== RSS: 15 s later, idle: $(ps -o rss= -p "$pid") KiB"
echo "=== storage: $(find "$data" -type f | wc -l) files, $(du -sh "$data" | cut -f1)"
