#!/usr/bin/env bash
# Runs the standard native-protocol benchmark set against a fresh single-node corekv on
# this machine and prints a Markdown table (machine, commit, fsync floor beside the
# results). Usage: bench/run.sh [extra `corekv serve` flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
bin=target/release
work=$(mktemp -d "${TMPDIR:-/tmp}/corekv-bench.XXXXXX")
port=$((23000 + RANDOM % 2000))
ep="127.0.0.1:$port"
"$bin/corekv" serve --data-dir "$work/data" --listen-native-urls "$ep" "$@" >"$work/serve.log" 2>&1 &
server=$!
trap 'kill -9 $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do "$bin/corekv" --endpoints "$ep" get probe >/dev/null 2>&1 && break; sleep 0.1; done

echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r)"
echo "- commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty'), $(date -u +%Y-%m-%dT%H:%MZ)"
echo "- server flags: ${*:-(defaults)}; loader on the same machine"
echo
echo "| workload | clients / conns | ops | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |"
echo "|---|---|---|---|---|---|---|---|---|"
row() {
  python3 -c 'import json,sys
r=json.loads(sys.stdin.read())
if "qps" in r:
  print("| %s | %d / %d | %d | %.0f | %.3f | %.3f | %.3f | %.3f | %.3f |" % (r["workload"], r["clients"], r["conns"], r["ok"], r["qps"], r["p50_ms"], r["p90_ms"], r["p99_ms"], r["p999_ms"], r["max_ms"]))
else:
  print("| %s | - | %d | - | %.3f | - | %.3f | - | %.3f |" % (r["workload"], r["count"], r["p50_ms"], r["p99_ms"], r["max_ms"]))'
}
"$bin/corekv-bench" fsync-floor --dir "$work" --count 2000 --json | while read -r l; do echo "$l" | row; done
"$bin/corekv-bench" put --endpoints "$ep" --clients 1 --conns 1 --total 5000 --threads 1 --json | row
"$bin/corekv-bench" put --endpoints "$ep" --clients 100 --conns 10 --total 100000 --json | row
"$bin/corekv-bench" put --endpoints "$ep" --clients 1000 --conns 100 --total 300000 --json | row
"$bin/corekv-bench" range --consistency l --endpoints "$ep" --clients 100 --conns 10 --total 100000 --json | row
"$bin/corekv-bench" range --consistency s --endpoints "$ep" --clients 100 --conns 10 --total 100000 --json | row
echo
echo "Group commit (endpoint status -w json, wal):"
"$bin/corekv" --endpoints "$ep" endpoint status -w json | python3 -c 'import json,sys; w=json.load(sys.stdin)[0]["Status"]["wal"]; print("%d entries in %d synced batches (avg %.1f, max %d per batch); sync p50 %d us, p99 %d us" % (w["entries"], w["batches"], w["entries"]/max(w["batches"],1), w["maxBatch"], w["fsyncP50Micros"], w["fsyncP99Micros"]))'
