#!/usr/bin/env bash
# A local 3-member corekv cluster on loopback, like etcd's Procfile + goreman:
#   scripts/local-cluster.sh start   # members infra1..3, data in ./local-cluster/
#   scripts/local-cluster.sh stop
# Client (etcd gRPC) ports 2379/22379/32379, native 2378/22378/32378, peers 12380/22380/32380.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${COREKV_BIN:-target/release/corekv}
dir=${COREKV_CLUSTER_DIR:-local-cluster}
cluster="infra1=http://127.0.0.1:12380,infra2=http://127.0.0.1:22380,infra3=http://127.0.0.1:32380"
case "${1:-start}" in
start)
  [ -x "$bin" ] || cargo build --release
  mkdir -p "$dir"
  for i in 1 2 3; do
    p=$([ "$i" = 1 ] && echo "" || echo "$i")
    "$bin" serve --name "infra$i" --data-dir "$dir/infra$i" \
      --listen-client-urls "http://127.0.0.1:${p}2379" --advertise-client-urls "http://127.0.0.1:${p}2379" \
      --listen-native-urls "http://127.0.0.1:${p}2378" \
      --listen-peer-urls "http://127.0.0.1:${i}2380" --initial-advertise-peer-urls "http://127.0.0.1:${i}2380" \
      --initial-cluster "$cluster" --initial-cluster-token corekv-local --initial-cluster-state new \
      >"$dir/infra$i.log" 2>&1 &
    echo $! >"$dir/infra$i.pid"
  done
  sleep 2
  "$bin" --endpoints 127.0.0.1:2378 endpoint status --cluster -w table
  ;;
stop)
  for f in "$dir"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; rm -f "$f"; done
  ;;
*) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
