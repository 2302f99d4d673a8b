# Sourced by the tuning scripts.
# tuning_setup SCRIPT DIR BINARY...: sets `bin` (COREKV_BIN_DIR, default target/release)
# after checking each BINARY is there, and `dir` (DIR, or a new one under /var/tmp: on a
# real disk, not tmpfs) for data dirs and logs.
tuning_setup() {
  local script=$1 b
  dir=$2
  shift 2
  bin=${COREKV_BIN_DIR:-target/release}
  for b in "$@"; do
    [ -x "$bin/$b" ] || { echo "$script: $bin/$b missing: cargo build --release" >&2; exit 1; }
  done
  [ -n "$dir" ] || dir=$(mktemp -d "/var/tmp/corekv-${script%.sh}.XXXXXX")
  mkdir -p "$dir"
}
