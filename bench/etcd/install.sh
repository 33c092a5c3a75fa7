#!/usr/bin/env bash
# Install etcd (the replication benchmark's peer) from Debian's etcd-server
# package into a cache directory, idempotently, and print the absolute path of
# the server binary.
#
# Usage: bench/etcd/install.sh [CACHE_DIR]   (default: target/peers/etcd)
#
# Only the path is printed on stdout; apt's output goes to stderr.
#
# The package is fetched with `apt-get download` and unpacked with
# `dpkg-deb -x` instead of being installed: its maintainer scripts would add an
# etcd system user and enable a system etcd on 2379/2380, and start it where an
# init system runs (invoke-rc.d / systemd). Unpacked, no maintainer script runs,
# nothing is started, and no root is needed unless the apt lists are missing.
# Only usr/bin/etcd is kept, as CACHE_DIR/etcd; it needs only libc.
#
# Debian 12 ships etcd 3.4.23, whose v3 JSON gateway serves /v3/... (and the
# older /v3beta/...).
set -euo pipefail

ETCD_SERIES="3.4"
dir="${1:-target/peers/etcd}"

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
bin="$dir/etcd"

etcd_version() {
  "$1" --version 2>/dev/null | sed -n 's/^etcd Version: //p'
}

have=""
if [[ -x "$bin" ]]; then
  have="$(etcd_version "$bin" || true)"
fi

if [[ "$have" != "$ETCD_SERIES".* ]]; then
  if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    echo "install.sh: needs apt-get and dpkg-deb (Debian or Ubuntu)" >&2
    exit 1
  fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  # (As root, apt warns that the download is unsandboxed: harmless.)
  if ! (cd "$tmp" && apt-get download etcd-server) >&2; then
    if [[ "$(id -u)" -ne 0 ]]; then
      echo "install.sh: 'apt-get download etcd-server' failed; run 'apt-get update' as root and retry" >&2
      exit 1
    fi
    apt-get update >&2
    (cd "$tmp" && apt-get download etcd-server) >&2
  fi
  debs=("$tmp"/etcd-server_*.deb)
  dpkg-deb -x "${debs[0]}" "$tmp/root"
  # Only the server binary is kept (the rest is docs and init scripts).
  install -m 755 "$tmp/root/usr/bin/etcd" "$bin"
  have="$(etcd_version "$bin" || true)"
  if [[ "$have" != "$ETCD_SERIES".* ]]; then
    echo "install.sh: expected etcd $ETCD_SERIES.x from $bin, got '${have:-nothing}'" >&2
    exit 1
  fi
  echo "install.sh: etcd $have unpacked from $(basename "${debs[0]}") into $dir" >&2
fi

# A system etcd left running by an installed etcd-server package would compete
# for the 2 cores and the disk during the measurements.
if system_pids="$(pgrep -u etcd -x etcd 2>/dev/null)"; then
  echo "install.sh: warning: a system etcd is running (pid $(echo "$system_pids" | tr '\n' ' '| sed 's/ $//')); stop it with 'service etcd stop'" >&2
fi

echo "$bin"
