#!/usr/bin/env bash
# Heartbeat / election-timeout experiment. The operating guides tune
# `--heartbeat-interval` (default 100 ms) and `--election-timeout` (default 1000 ms, about
# 10x the heartbeat, at least 10x the peers' round trip): lower values fail over sooner,
# too low ones elect when nothing failed. For each setting this starts a 3-member cluster
# of etcd and of corekv on loopback and measures
#   failover  SIGKILL the leader, then the time until a put succeeds on a survivor
#             (polled with etcdctl, each try given 50 ms, so ~60 ms resolution); repeated --kills
#             times, the killed member restarted and caught up in between
#   elections raft term increases while the cluster idles --idle-s seconds with a CPU
#             hog per core beside it (a busy box should not look like a dead leader)
# Bounded: a fixed number of kills per setting, every wait has a deadline.
#
# usage: tuning/heartbeat.sh [--settings "100:1000 50:500 20:200"] [--kills N]
#                            [--idle-s N] [--targets "etcd corekv"] [--dir DIR]
# Needs target/release/corekv (cargo build --release) and Debian's etcd-server/client.
set -euo pipefail
cd "$(dirname "$0")/.."

settings="100:1000 50:500 20:200"
kills=5
idle_s=10
targets="etcd corekv"
dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --settings) settings=$2; shift 2 ;;
    --kills) kills=$2; shift 2 ;;
    --idle-s) idle_s=$2; shift 2 ;;
    --targets) targets=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    *) echo "heartbeat.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
. tuning/common.sh
tuning_setup heartbeat.sh "$dir" corekv

declare -a pids=(0 0 0)
hogs=""
cleanup() {
  for p in "${pids[@]}"; do [ "$p" != 0 ] && kill -9 "$p" 2>/dev/null || true; done
  [ -n "$hogs" ] && kill $hogs 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

grpc() { echo "127.0.0.1:2${1}379"; }  # member 1..3 -> 127.0.0.1:21379, 22379, 23379
all_endpoints="$(grpc 1),$(grpc 2),$(grpc 3)"
cluster="m1=http://127.0.0.1:21380,m2=http://127.0.0.1:22380,m3=http://127.0.0.1:23380"

# start_member TARGET I HEARTBEAT ELECTION
start_member() {
  local target=$1 i=$2 hb=$3 el=$4
  local common=(--name "m$i" --data-dir "$dir/m$i"
    --listen-client-urls "http://$(grpc "$i")" --advertise-client-urls "http://$(grpc "$i")"
    --listen-peer-urls "http://127.0.0.1:2${i}380" --initial-advertise-peer-urls "http://127.0.0.1:2${i}380"
    --initial-cluster "$cluster" --heartbeat-interval "$hb" --election-timeout "$el")
  if [ "$target" = corekv ]; then
    "$bin/corekv" serve "${common[@]}" --cores 1 --listen-native-urls "http://127.0.0.1:2${i}378" \
      >>"$dir/m$i.log" 2>&1 &
  else
    etcd "${common[@]}" >>"$dir/m$i.log" 2>&1 &
  fi
  pids[$((i - 1))]=$!
}

now_ms() { date +%s%3N; }

# The member index (1-3) that says it leads, or nothing.
leader() {
  etcdctl --endpoints "$all_endpoints" --command-timeout=500ms endpoint status -w json 2>/dev/null |
    python3 -c '
import json, sys
try:
    for s in json.load(sys.stdin):
        st = s["Status"]
        if st["header"]["member_id"] == st["leader"]:
            print(s["Endpoint"].split(":")[1][1]); break
except Exception:
    pass'
}

# Highest raft term any member reports.
term() {
  etcdctl --endpoints "$all_endpoints" --command-timeout=500ms endpoint status -w json 2>/dev/null |
    python3 -c '
import json, sys
try:
    print(max(s["Status"]["raftTerm"] for s in json.load(sys.stdin)))
except Exception:
    print(0)'
}

# wait_put ENDPOINTS DEADLINE_MS: polls puts until one succeeds; prints when (ms) or fails.
wait_put() {
  while [ "$(now_ms)" -lt "$2" ]; do
    if etcdctl --endpoints "$1" --command-timeout=50ms put hb-probe x >/dev/null 2>&1; then
      now_ms
      return 0
    fi
    sleep 0.01
  done
  return 1
}

echo "# heartbeat experiment: $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, kernel $(uname -r)"
echo
echo "| target | heartbeat ms | election ms | failover ms (each kill) | median | elections in ${idle_s} s idle beside $(nproc) CPU hogs |"
echo "|---|---|---|---|---|---|"
for setting in $settings; do
  hb=${setting%%:*}
  el=${setting##*:}
  for target in $targets; do
    rm -rf "$dir"/m*
    for i in 1 2 3; do start_member "$target" "$i" "$hb" "$el"; done
    wait_put "$all_endpoints" $(($(now_ms) + 30000)) >/dev/null ||
      { echo "heartbeat.sh: $target did not start (hb $hb, el $el)" >&2; exit 1; }
    times=()
    for _ in $(seq "$kills"); do
      l=""
      for _ in $(seq 50); do l=$(leader); [ -n "$l" ] && break; sleep 0.1; done
      [ -n "$l" ] || { echo "heartbeat.sh: no leader ($target, hb $hb)" >&2; exit 1; }
      survivors=$(for i in 1 2 3; do if [ "$i" != "$l" ]; then printf '%s,' "$(grpc "$i")"; fi; done)
      t0=$(now_ms)
      kill -9 "${pids[$((l - 1))]}"
      wait "${pids[$((l - 1))]}" 2>/dev/null || true
      if t1=$(wait_put "${survivors%,}" $((t0 + 20 * el + 10000))); then
        times+=($((t1 - t0)))
      else
        times+=("timeout")
      fi
      start_member "$target" "$l" "$hb" "$el"
      # Caught up: the restarted member answers a linearizable read.
      wait_put "$(grpc "$l")" $(($(now_ms) + 30000)) >/dev/null || true
    done
    median=$(printf '%s\n' "${times[@]}" | grep -v timeout | sort -n | awk '{a[NR]=$1} END {print (NR ? a[int((NR+1)/2)] : "-")}')
    t_before=$(term)
    hogs=""
    for _ in $(seq "$(nproc)"); do
      (end=$((SECONDS + idle_s)); while [ $SECONDS -lt $end ]; do :; done) &
      hogs="$hogs $!"
    done
    sleep "$idle_s"
    wait $hogs 2>/dev/null || true
    hogs=""
    t_after=$(term)
    echo "| $target | $hb | $el | ${times[*]} | $median | $((t_after - t_before)) |"
    for i in 0 1 2; do kill -9 "${pids[$i]}" 2>/dev/null || true; wait "${pids[$i]}" 2>/dev/null || true; pids[$i]=0; done
  done
done
