#!/usr/bin/env bash
# Disk I/O priority experiment. The operating guides' advice for a disk shared with other
# work is `ionice -c2 -n0 -p $(pgrep etcd)`; this measures what I/O priority buys etcd and
# corekv here: put latency (1 client, then 10) with the disk to itself, then while another
# process streams O_DIRECT writes to the same disk, with
#   default     every process in the best-effort class (the default)
#   be0 -p      the guides' `ionice -c2 -n0 -p PID` on the running server
#   rt launch   the server started under `ionice -c1 -n0` (realtime class)
#   rt threads  `ionice -c1 -n0 -p TID` on every thread of the running server
#   idle noise  the competing writer under `ionice -c3` (idle class)
# Prints one table row per scenario, target and client count. Bounded: every load has a
# fixed count, the writer a fixed size and a deadline.
#
# usage: tuning/ionice.sh [--dir DIR] [--total N] [--targets "etcd corekv"] [--noise-mib N]
#   DIR: where data dirs and the writer's file go (default: a new dir under /var/tmp, on
#   the disk under test). Needs target/release/{corekv,corekv-bench} (cargo build
#   --release) and, for etcd, Debian's etcd-server.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=""
total=2000
targets="etcd corekv"
noise_mib=4096
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --total) total=$2; shift 2 ;;
    --targets) targets=$2; shift 2 ;;
    --noise-mib) noise_mib=$2; shift 2 ;;
    *) echo "ionice.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
. tuning/common.sh
tuning_setup ionice.sh "$dir" corekv corekv-bench
dev=$(df --output=source "$dir" | tail -1)
sched=$(cat "/sys/block/$(basename "$dev" | sed 's/[0-9]*$//')/queue/scheduler" 2>/dev/null || echo unknown)

server_pid=""
noise_pid=""
cleanup() {
  [ -n "$noise_pid" ] && kill "$noise_pid" 2>/dev/null || true
  [ -n "$server_pid" ] && kill -9 "$server_pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

# start_server TARGET PREFIX...: a fresh single node on 127.0.0.1:23791 (gRPC), its pid in
# server_pid. PREFIX is prepended to the command (e.g. `ionice -c1 -n0`).
start_server() {
  local target=$1; shift
  rm -rf "$dir/data"
  case "$target" in
    corekv) "$@" "$bin/corekv" serve --data-dir "$dir/data" \
        --listen-client-urls http://127.0.0.1:23791 --advertise-client-urls http://127.0.0.1:23791 \
        --listen-native-urls http://127.0.0.1:23781 --listen-peer-urls http://127.0.0.1:23801 \
        >"$dir/server.log" 2>&1 & ;;
    etcd) "$@" etcd --data-dir "$dir/data" \
        --listen-client-urls http://127.0.0.1:23791 --advertise-client-urls http://127.0.0.1:23791 \
        --listen-peer-urls http://127.0.0.1:23801 >"$dir/server.log" 2>&1 & ;;
  esac
  server_pid=$!
  # Bounded: 100 tries, 0.1 s apart.
  for _ in $(seq 100); do
    if etcdctl --endpoints 127.0.0.1:23791 put ionice-probe ready >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.1
  done
  echo "ionice.sh: $target did not start: $(tail -3 "$dir/server.log")" >&2
  exit 1
}

stop_server() {
  kill -9 "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

# The competing writer: 1 MiB O_DIRECT writes into a fresh file, up to noise_mib MiB or
# 120 s, repeated until killed.
start_noise() {
  (
    deadline=$((SECONDS + 120))
    while [ $SECONDS -lt $deadline ]; do
      # A disk that refuses O_DIRECT (tmpfs) gives no noise; do not spin on it.
      "$@" dd if=/dev/zero of="$dir/noise" bs=1M count="$noise_mib" oflag=direct status=none || sleep 1
      rm -f "$dir/noise"
    done
  ) &
  noise_pid=$!
  sleep 1 # let it reach the disk
}

stop_noise() {
  kill "$noise_pid" 2>/dev/null || true
  pkill -f "of=$dir/noise" 2>/dev/null || true
  wait "$noise_pid" 2>/dev/null || true
  noise_pid=""
  rm -f "$dir/noise"
}

# Threads of the server in each I/O class ("3 best-effort: prio 0, 12 realtime: prio 0").
classes() {
  for t in /proc/"$server_pid"/task/*; do ionice -p "${t##*/}"; done | sort | uniq -c |
    awk '{c=$1; $1=""; printf "%s%d%s", (NR>1?", ":""), c, $0}'
}

measure() { # SCENARIO TARGET
  local scenario=$1 target=$2 clients
  for clients in 1 10; do
    "$bin/corekv-bench" put --target "$( [ "$target" = etcd ] && echo etcd || echo corekv-grpc)" \
      --endpoints 127.0.0.1:23791 --clients "$clients" --conns "$clients" \
      --total $((total * clients / (clients > 1 ? 4 : 1))) --no-results --json |
      python3 -c '
import json, sys
r = json.loads(sys.stdin.readline())
print("| %s | %s | %d | %.0f | %.2f | %.2f | %.2f | %s |" % (sys.argv[1], sys.argv[2], int(sys.argv[3]),
      r["per_s"], r["p50_ms"], r["p99_ms"], r["max_ms"], sys.argv[4]))' \
        "$scenario" "$target" "$clients" "$(classes)"
  done
}

echo "# ionice experiment: $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'),"
echo "# disk $dev (scheduler: $sched), $(nproc) cores, kernel $(uname -r)"
echo
echo "| scenario | target | clients | puts/s | p50 ms | p99 ms | max ms | server threads by I/O class |"
echo "|---|---|---|---|---|---|---|---|"
for target in $targets; do
  start_server "$target"
  measure "quiet" "$target"
  start_noise
  measure "default" "$target"
  ionice -c2 -n0 -p "$server_pid"
  measure "be0 -p" "$target"
  # The realtime class needs CAP_SYS_ADMIN.
  if [ "$(id -u)" = 0 ]; then
    for t in /proc/"$server_pid"/task/*; do ionice -c1 -n0 -p "${t##*/}"; done
    measure "rt threads" "$target"
  fi
  stop_noise
  stop_server

  if [ "$(id -u)" = 0 ]; then
    start_server "$target" ionice -c1 -n0
    start_noise
    measure "rt launch" "$target"
    stop_noise
    stop_server
  else
    echo "| rt threads, rt launch | $target | – | skipped: the realtime class needs root | | | | |"
  fi

  start_server "$target"
  start_noise ionice -c3
  measure "idle noise" "$target"
  stop_noise
  stop_server
done
