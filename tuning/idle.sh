#!/usr/bin/env bash
# CPU idle-state experiment. A lightly loaded member spends most of its time waiting for
# the next message, and every wait ends with a wake-up of an idle CPU; how long that takes
# depends on the CPU's idle state (a deep C-state on bare metal, a halt trapped to the host
# in a VM), not on etcd or corekv. This measures single-client put latency, one member and
# three, for etcd and corekv, under
#   default        the machine as it is
#   dma0           /dev/cpu_dma_latency held at 0 µs (the PM QoS request tuned's
#                  latency-performance profile makes): idle CPUs poll instead of sleeping
#   haltpoll:NS    a VM guest's haltpoll driver polls NS ns before halting
#                  (/sys/module/haltpoll/parameters/guest_halt_poll_ns, restored on exit)
# and reports, beside latency, the CPU time idle CPUs spent polling (cpuidle's POLL state):
# the price, paid by the host or in power, of the shorter wake-ups.
# Bounded: each load has a fixed count; every wait has a deadline.
#
# usage: tuning/idle.sh [--modes "default dma0 haltpoll:200000"] [--members "1 3"]
#                       [--total N] [--targets "etcd corekv corekv-native"] [--dir DIR]
#   corekv is measured over gRPC (the same client code as etcd), corekv-native over its
#   capnp protocol.
# Needs root for dma0 and haltpoll, target/release/{corekv,corekv-bench} (cargo build
# --release) and, for etcd, Debian's etcd-server and etcd-client.
set -euo pipefail
cd "$(dirname "$0")/.."

modes="default dma0 haltpoll:200000"
members_list="1 3"
total=3000
targets="etcd corekv corekv-native"
dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --modes) modes=$2; shift 2 ;;
    --members) members_list=$2; shift 2 ;;
    --total) total=$2; shift 2 ;;
    --targets) targets=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    *) echo "idle.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
. tuning/common.sh
tuning_setup idle.sh "$dir" corekv corekv-bench
haltpoll_param=/sys/module/haltpoll/parameters/guest_halt_poll_ns
haltpoll_saved=$(cat "$haltpoll_param" 2>/dev/null || true)

declare -a pids=()
qos_pid=""
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ -n "$qos_pid" ] && kill "$qos_pid" 2>/dev/null || true
  [ -n "$haltpoll_saved" ] && echo "$haltpoll_saved" >"$haltpoll_param" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

# Member I of the run: 127.0.0.18I (a loopback address no other corekv test uses).
ip() { echo "127.0.0.18$1"; }

# start_cluster TARGET N: fresh members 1..N, pids in pids[]; returns once one leads.
start_cluster() {
  local target=$1 n=$2 i cluster=""
  for i in $(seq "$n"); do cluster="$cluster${cluster:+,}m$i=http://$(ip "$i"):2380"; done
  rm -rf "$dir"/m*
  pids=()
  for i in $(seq "$n"); do
    local common=(--name "m$i" --data-dir "$dir/m$i"
      --listen-client-urls "http://$(ip "$i"):2379" --advertise-client-urls "http://$(ip "$i"):2379"
      --listen-peer-urls "http://$(ip "$i"):2380" --initial-advertise-peer-urls "http://$(ip "$i"):2380"
      --initial-cluster "$cluster")
    if [ "$target" != etcd ]; then
      # --cores 1 as the bench does for co-located members: three servers on two cores.
      "$bin/corekv" serve "${common[@]}" --cores 1 --listen-native-urls "http://$(ip "$i"):2378" \
        >"$dir/m$i.log" 2>&1 &
    else
      etcd "${common[@]}" >"$dir/m$i.log" 2>&1 &
    fi
    pids+=($!)
  done
  # Bounded: 150 tries, 0.1 s apart.
  for _ in $(seq 150); do
    [ -n "$(leader "$n")" ] && return 0
    sleep 0.1
  done
  echo "idle.sh: $target ($n members) elected no leader: $(tail -3 "$dir/m1.log")" >&2
  exit 1
}

stop_cluster() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}

# The leader's client endpoint (empty while there is none).
leader() {
  local eps="" i
  for i in $(seq "$1"); do eps="$eps${eps:+,}$(ip "$i"):2379"; done
  etcdctl --endpoints "$eps" --command-timeout 1s endpoint status 2>/dev/null |
    awk -F', ' '$5 == "true" { print $1; exit }'
}

# Microseconds all CPUs spent in cpuidle's polling state so far (0 without cpuidle).
poll_us() {
  local sum=0 f
  for f in /sys/devices/system/cpu/cpu*/cpuidle/state0/time; do
    [ -r "$f" ] && [ "$(cat "${f%/time}/name")" = POLL ] && sum=$((sum + $(cat "$f")))
  done
  echo "$sum"
}

# set_mode MODE: returns 1 (after printing a skipped row) when this machine cannot.
set_mode() {
  case "$1" in
    default) ;;
    dma0)
      [ -w /dev/cpu_dma_latency ] || { echo "| dma0 | – | – | skipped: /dev/cpu_dma_latency needs root | | | | |"; return 1; }
      # The request holds while the file is open: this subshell keeps it open for as long
      # as the script lives (its sleeps do not inherit it, so none outlives the request).
      (exec 3>/dev/cpu_dma_latency && printf '0\n' >&3 &&
        while kill -0 $$ 2>/dev/null; do sleep 1 3>&-; done) &
      qos_pid=$!
      sleep 0.2 ;;
    haltpoll:*)
      [ -w "$haltpoll_param" ] || { echo "| $1 | – | – | skipped: no writable $haltpoll_param (not a VM guest with haltpoll, or not root) | | | | |"; return 1; }
      echo "${1#haltpoll:}" >"$haltpoll_param" ;;
    *) echo "idle.sh: unknown mode $1" >&2; exit 2 ;;
  esac
}

unset_mode() {
  if [ -n "$qos_pid" ]; then kill "$qos_pid" 2>/dev/null || true; wait "$qos_pid" 2>/dev/null || true; qos_pid=""; fi
  [ -n "$haltpoll_saved" ] && echo "$haltpoll_saved" >"$haltpoll_param" 2>/dev/null || true
}

measure() { # MODE TARGET N PUTS
  local mode=$1 target=$2 n=$3 puts=$4 ep poll0 poll1 t0 t1
  ep=$(leader "$n")
  [ -n "$ep" ] || { echo "idle.sh: no leader for $target" >&2; exit 1; }
  [ "$target" = corekv-native ] && ep=${ep%:2379}:2378
  poll0=$(poll_us); t0=$(date +%s%N)
  "$bin/corekv-bench" put --target "$( [ "$target" = corekv ] && echo corekv-grpc || echo "$target")" \
    --endpoints "$ep" --clients 1 --conns 1 --total "$puts" --no-results --json >"$dir/run.json"
  poll1=$(poll_us); t1=$(date +%s%N)
  python3 - "$mode" "$target" "$n" "$((poll1 - poll0))" "$(( (t1 - t0) / 1000 ))" "$dir/run.json" <<'EOF'
import json, sys
mode, target, n, poll_us, wall_us, path = sys.argv[1:7]
r = json.loads(open(path).readline())
print("| %s | %s | %s | %.0f | %.3f | %.3f | %.3f | %.0f%% |" % (mode, target, n, r["per_s"],
      r["p50_ms"], r["p90_ms"], r["p99_ms"], 100.0 * int(poll_us) / max(1, int(wall_us))))
EOF
}

echo "# idle-state experiment: $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'),"
echo "# $(nproc) cores, kernel $(uname -r), cpuidle driver $(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null || echo none),"
echo "# governor $(cat /sys/devices/system/cpu/cpuidle/current_governor_ro 2>/dev/null || echo none), guest_halt_poll_ns ${haltpoll_saved:-n/a}; $total puts per row, 1 client"
echo
echo "| mode | target | members | puts/s | p50 ms | p90 ms | p99 ms | CPU polling while idle (% of one CPU) |"
echo "|---|---|---|---|---|---|---|---|"
for mode in $modes; do
  set_mode "$mode" || continue
  for n in $members_list; do
    for target in $targets; do
      start_cluster "$target" "$n"
      # A short warm-up so every row starts with connections open and files allocated.
      measure "$mode" "$target" "$n" $((total / 10 + 1)) >/dev/null
      measure "$mode" "$target" "$n" "$total"
      stop_cluster
    done
  done
  unset_mode
done
