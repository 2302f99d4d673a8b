#!/usr/bin/env bash
# 3-member clusters on loopback, corekv against etcd 3.4, same generator over gRPC (and
# corekv's native protocol beside it): put with 1 / 100 / 1000 clients, linearizable and
# serializable range. Connections are spread over the three members, as etcd's benchmark
# does. Prints a Markdown table; everything started is stopped on exit.
#   bench/cluster.sh [corekv serve flags]   (after cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$PWD/target/release
work=$(mktemp -d "${TMPDIR:-/tmp}/corekv-cluster-bench.XXXXXX")
base=$((23000 + RANDOM % 2000))
pids=()
trap 'kill -9 "${pids[@]}" 2>/dev/null; rm -rf "$work"' EXIT

ck_grpc=() ck_native=() etcd_eps=() ck_cluster="" etcd_cluster=""
for i in 1 2 3; do
  ck_cluster+="${ck_cluster:+,}c$i=http://127.0.0.1:$((base + 10 * i))"
  etcd_cluster+="${etcd_cluster:+,}e$i=http://127.0.0.1:$((base + 100 + 10 * i))"
done
for i in 1 2 3; do
  p=$((base + 10 * i))
  "$bin/corekv" serve --name "c$i" --data-dir "$work/c$i" --initial-cluster "$ck_cluster" \
    --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
    --listen-client-urls "http://127.0.0.1:$((p + 1))" --advertise-client-urls "http://127.0.0.1:$((p + 1))" \
    --listen-native-urls "http://127.0.0.1:$((p + 2))" "$@" >"$work/c$i.log" 2>&1 &
  pids+=($!)
  ck_grpc+=("127.0.0.1:$((p + 1))") ck_native+=("127.0.0.1:$((p + 2))")
  q=$((base + 100 + 10 * i))
  etcd --name "e$i" --data-dir "$work/e$i" --initial-cluster "$etcd_cluster" \
    --listen-peer-urls "http://127.0.0.1:$q" --initial-advertise-peer-urls "http://127.0.0.1:$q" \
    --listen-client-urls "http://127.0.0.1:$((q + 1))" --advertise-client-urls "http://127.0.0.1:$((q + 1))" \
    >"$work/e$i.log" 2>&1 &
  pids+=($!)
  etcd_eps+=("127.0.0.1:$((q + 1))")
done
join() { local IFS=,; echo "$*"; }
for _ in $(seq 100); do
  "$bin/corekv" --endpoints "${ck_native[0]}" put probe x >/dev/null 2>&1 &&
    ETCDCTL_API=3 etcdctl --endpoints "${etcd_eps[0]}" put probe x >/dev/null 2>&1 && break
  sleep 0.2
done

echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r)"
echo "- commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty'), $(date -u +%Y-%m-%dT%H:%MZ)"
echo "- 3 members each on loopback, one machine; corekv flags: ${*:-(defaults)}; etcd: $(etcd --version | head -1)"
echo
: >"$work/results.json"
run() { # name api endpoints workload args...
  local name=$1 api=$2 ep=$3; shift 3
  "$bin/corekv-bench" "$@" --api "$api" --endpoints "$ep" --json | sed "s/^{/{\"server\":\"$name\",/" >>"$work/results.json"
}
workloads=(
  "put --clients 1 --conns 1 --total 2000 --threads 1"
  "put --clients 100 --conns 12 --total 40000"
  "put --clients 1000 --conns 99 --total 100000"
  "range --consistency l --clients 100 --conns 12 --total 40000"
  "range --consistency s --clients 100 --conns 12 --total 40000"
)
for w in "${workloads[@]}"; do
  # shellcheck disable=SC2086
  run etcd grpc "$(join "${etcd_eps[@]}")" $w
  # shellcheck disable=SC2086
  run corekv grpc "$(join "${ck_grpc[@]}")" $w
  # shellcheck disable=SC2086
  run corekv native "$(join "${ck_native[@]}")" $w
done
python3 bench/ratio_table.py "$work/results.json" "workload (3 members)"
