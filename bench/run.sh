#!/usr/bin/env bash
# The full benchmark report on this machine, in one command: builds corekv, then
# `corekv-bench suite` starts a fresh etcd (Debian's etcd-server) and a fresh corekv, single
# node and then 3-member clusters on loopback, runs the standard set against both over the
# same gRPC client code (and corekv's native protocol beside it), alternating the order,
# stops everything it started, appends bench/results/results.jsonl and writes
# bench/report/ (report.md + SVG plots) and the report section of bench/README.md.
# Takes about half an hour. Extra arguments go to `suite` (e.g. --spawn 1, --rounds 3,
# --only put, --corekv-args "--cores 1", --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q --bin corekv --bin corekv-bench
# Cargo puts the binaries under $CARGO_TARGET_DIR when that is set: run those, not an
# older build left in ./target.
exec "${CARGO_TARGET_DIR:-target}/release/corekv-bench" suite --spawn 1,3 --out bench/report --readme bench/README.md "$@"
