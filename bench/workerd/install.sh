#!/usr/bin/env bash
# Install Cloudflare's workerd (the benchmark peer) from the npm registry into a
# cache directory, idempotently, and print the absolute path of the binary.
#
# Usage: bench/workerd/install.sh [CACHE_DIR]   (default: target/peers/workerd)
#
# Only the path is printed on stdout; npm's output goes to stderr.
set -euo pipefail

WORKERD_VERSION="1.20261117.1"
dir="${1:-target/peers/workerd}"

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) platform="linux-64" ;;
  Linux-aarch64 | Linux-arm64) platform="linux-arm64" ;;
  Darwin-x86_64) platform="darwin-64" ;;
  Darwin-arm64) platform="darwin-arm64" ;;
  *)
    echo "install.sh: unsupported platform $(uname -s)-$(uname -m)" >&2
    exit 1
    ;;
esac

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
# The native binary ships inside the platform package, so it is there whether
# or not npm ran workerd's postinstall script. Using it directly (rather than
# node_modules/.bin/workerd, which may be a node shim) keeps workerd the
# process we start, signal and measure.
bin="$dir/node_modules/@cloudflare/workerd-$platform/bin/workerd"
want="workerd ${WORKERD_VERSION#1.}"
want="${want:0:12}-${want:12:2}-${want:14:2}" # "workerd 20261117" -> "workerd 2026-11-17"

have=""
if [[ -x "$bin" ]]; then
  have="$("$bin" --version 2>/dev/null || true)"
fi
if [[ "$have" != "$want" ]]; then
  npm install --prefix "$dir" --no-audit --no-fund --no-save \
    "workerd@$WORKERD_VERSION" >&2
  have="$("$bin" --version)"
  if [[ "$have" != "$want" ]]; then
    echo "install.sh: expected '$want' from $bin, got '$have'" >&2
    exit 1
  fi
fi

echo "$bin"
