#!/usr/bin/env bash
# Runs the standard benchmark set on this machine and prints a Markdown report: the fsync
# floor, then each workload against a fresh etcd (if installed) and a fresh corekv through
# the same load generator over etcd's gRPC API, plus corekv's native protocol, with
# hdrhistogram percentiles and ratios against etcd from the same run.
# Usage: bench/run.sh [extra `corekv serve` flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
bin=$PWD/target/release
work=$(mktemp -d "${TMPDIR:-/tmp}/corekv-bench.XXXXXX")
base=$((22000 + RANDOM % 3000))
ck_native="127.0.0.1:$base" ck_grpc="127.0.0.1:$((base + 1))"
etcd_client="127.0.0.1:$((base + 2))" etcd_peer="http://127.0.0.1:$((base + 3))"
ck_peer="http://127.0.0.1:$((base + 4))"
pids=()
trap 'kill -9 "${pids[@]}" 2>/dev/null; rm -rf "$work"' EXIT

"$bin/corekv" serve --data-dir "$work/corekv" --listen-native-urls "$ck_native" \
  --listen-client-urls "$ck_grpc" --listen-peer-urls "$ck_peer" "$@" >"$work/corekv.log" 2>&1 &
pids+=($!)
have_etcd=0
if command -v etcd >/dev/null 2>&1; then
  have_etcd=1
  etcd --data-dir "$work/etcd" --listen-client-urls "http://$etcd_client" \
    --advertise-client-urls "http://$etcd_client" --listen-peer-urls "$etcd_peer" >"$work/etcd.log" 2>&1 &
  pids+=($!)
fi
for _ in $(seq 100); do "$bin/corekv" --endpoints "$ck_native" get probe >/dev/null 2>&1 && break; sleep 0.1; done
sleep 1 # etcd elects itself within a second

echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r)"
echo "- commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty'), $(date -u +%Y-%m-%dT%H:%MZ)"
echo "- corekv flags: ${*:-(defaults)}; etcd: $( [ $have_etcd = 1 ] && etcd --version | head -1 || echo 'not installed')"
echo "- one load generator (corekv-bench) on the same machine; keys 8 B random over 100k, values 256 B"
echo
"$bin/corekv-bench" fsync-floor --dir "$work" --count 2000 --json >"$work/floor.json"
python3 - "$work/floor.json" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['workload']}: p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms (4 KiB O_DIRECT write + fdatasync)")
PY
echo

run() { # name api endpoint workload args...
  local name=$1 api=$2 ep=$3; shift 3
  "$bin/corekv-bench" "$@" --api "$api" --endpoints "$ep" --json | sed "s/^{/{\"server\":\"$name\",/" >>"$work/results.json"
}
workloads=(
  "put --clients 1 --conns 1 --total 3000 --threads 1"
  "put --clients 100 --conns 10 --total 60000"
  "put --clients 1000 --conns 100 --total 150000"
  "range --consistency l --clients 100 --conns 10 --total 60000"
  "range --consistency s --clients 100 --conns 10 --total 60000"
)
for w in "${workloads[@]}"; do
  # shellcheck disable=SC2086
  { [ $have_etcd = 1 ] && run etcd grpc "$etcd_client" $w; } || true
  # shellcheck disable=SC2086
  run corekv grpc "$ck_grpc" $w
  # shellcheck disable=SC2086
  run corekv native "$ck_native" $w
done
python3 bench/ratio_table.py "$work/results.json"
echo
echo "corekv group commit (endpoint status -w json, wal):"
"$bin/corekv" --endpoints "$ck_native" endpoint status -w json | python3 -c 'import json,sys; w=json.load(sys.stdin)[0]["Status"]["wal"]; print("%d entries in %d synced batches (avg %.1f, max %d per batch); sync p50 %d us, p99 %d us" % (w["entries"], w["batches"], w["entries"]/max(w["batches"],1), w["maxBatch"], w["fsyncP50Micros"], w["fsyncP99Micros"]))'

# Watch fan-out and lease keepalives over etcd's gRPC API, same generator for both.
etcd_pid=$( [ $have_etcd = 1 ] && echo "${pids[1]}" || echo "")
ck_pid=${pids[0]}
: >"$work/watch.json"
for watchers in 1000 10000 100000; do
  puts=$((1000000 / watchers)); [ $puts -lt 10 ] && puts=10
  streams=$((watchers / 1000)); [ $streams -lt 10 ] && streams=10
  for side in etcd corekv; do
    if [ $side = etcd ]; then [ $have_etcd = 1 ] || continue; ep=$etcd_client; pid=$etcd_pid; else ep=$ck_grpc; pid=$ck_pid; fi
    "$bin/corekv-bench" watch --endpoints "$ep" --watchers $watchers --streams $streams --conns 10 \
      --puts $puts --server-pid "$pid" --json | sed "s/^{/{\"server\":\"$side\",/" >>"$work/watch.json" || true
  done
done
# Latency at a fixed put rate (etcd's `benchmark watch-latency` regime): 1000 watchers,
# 200 puts/s -> 200k events/s offered.
for side in etcd corekv; do
  if [ $side = etcd ]; then [ $have_etcd = 1 ] || continue; ep=$etcd_client; pid=$etcd_pid; else ep=$ck_grpc; pid=$ck_pid; fi
  "$bin/corekv-bench" watch --endpoints "$ep" --watchers 1000 --streams 10 --conns 10 \
    --puts 2000 --rate 200 --json | sed "s/^{/{\"server\":\"$side\",/" >>"$work/watch.json" || true
done
for side in etcd corekv; do
  if [ $side = etcd ]; then [ $have_etcd = 1 ] || continue; ep=$etcd_client; else ep=$ck_grpc; fi
  "$bin/corekv-bench" lease-keepalive --endpoints "$ep" --leases 100 --streams 10 --total 50000 --json \
    | sed "s/^{/{\"server\":\"$side\",/" >>"$work/watch.json" || true
done
echo
python3 - "$work/watch.json" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| workload | etcd gRPC | corekv gRPC | ratio |")
print("|---|---|---|---|")
def rss(r):
    b = r.get("rss_bytes_per_watcher")
    return f", {b:,.0f} B/watcher" if b is not None else ""
for w, rate in sorted({(r["watchers"], r.get("rate", 0)) for r in rows if r["workload"] == "watch"}):
    got = {r["server"]: r for r in rows if r["workload"] == "watch" and r["watchers"] == w and r.get("rate", 0) == rate}
    cell = lambda r: f"{r['events_per_s']:,.0f} ev/s, p50 {r['p50_ms']:.2f}, p99 {r['p99_ms']:.2f}, max {r['max_ms']:.1f}{rss(r)}" if r else "-"
    e, c = got.get("etcd"), got.get("corekv")
    ratio = f"{c['events_per_s'] / e['events_per_s']:.2f}×" if e and c else "-"
    how = f", {rate} puts/s" if rate else ", puts unthrottled"
    print(f"| watch, {w:,} watchers on one key{how} | {cell(e)} | {cell(c)} | {ratio} |")
got = {r["server"]: r for r in rows if r["workload"] == "lease-keepalive"}
cell = lambda r: f"{r['per_s']:,.0f}/s, p50 {r['p50_ms']:.2f}, p99 {r['p99_ms']:.2f}" if r else "-"
e, c = got.get("etcd"), got.get("corekv")
if c:
    ratio = f"{c['per_s'] / e['per_s']:.2f}×" if e else "-"
    print(f"| lease keepalive, 10 streams | {cell(e)} | {cell(c)} | {ratio} |")
PY
