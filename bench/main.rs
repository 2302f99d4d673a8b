//! corekv-bench: corekv against etcd, side by side, over the same protocol on one machine.
//!
//!   corekv-bench put   --target etcd --endpoints 127.0.0.1:2379 --clients 100 --conns 10
//!   corekv-bench put   --spawn 1 --target etcd,corekv-grpc,corekv-native --rounds 2
//!   corekv-bench range --consistency l|s --limit 10 --keys-only ...
//!   corekv-bench txn-put --txn-ops 4 ... | txn-mixed --rw-ratio 4 ...
//!   corekv-bench watch | watch-latency --watchers 1000 --streams 10 --put-rate 200
//!   corekv-bench lease-keepalive --leases 100 --streams 10
//!   corekv-bench fsync-floor --dir /path/on/the/same/disk
//!   corekv-bench suite --spawn 1,3 --out bench/report --readme bench/README.md
//!
//! Every run records latencies in hdrhistogram (µs), appends one JSON line with machine,
//! commit and date to `--results` (default bench/results/results.jsonl) and prints a row.
//! With `--spawn 1|3` the tool starts a fresh single node or 3-member loopback cluster of
//! each system itself, runs the targets alternately (A B, then B A) and stops everything.

mod floor;
mod fsync;
mod h2conn;
mod kv;
mod lease;
mod record;
mod report;
mod spawn;
mod suite;
mod tls;
mod watch;

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by Ctrl-C: load loops stop at their next request, the run still reports.
pub static STOP: AtomicBool = AtomicBool::new(false);

pub fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

#[derive(Parser)]
#[command(
    name = "corekv-bench",
    about = "corekv against etcd, side by side: load generator, cluster spawner and report"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Puts (etcd's `benchmark put`).
    Put {
        #[command(flatten)]
        run: record::RunArgs,
        #[command(flatten)]
        load: kv::KvArgs,
    },
    /// Ranges over the preloaded key space (etcd's `benchmark range`).
    Range {
        #[command(flatten)]
        run: record::RunArgs,
        #[command(flatten)]
        load: kv::KvArgs,
        #[command(flatten)]
        range: kv::RangeArgs,
        /// Keys loaded (sequentially, `--key-space-size` of them) before measuring, per system.
        #[arg(long)]
        preload: bool,
    },
    /// Txns of `--txn-ops` puts each (etcd's `benchmark txn-put`).
    TxnPut {
        #[command(flatten)]
        run: record::RunArgs,
        #[command(flatten)]
        load: kv::KvArgs,
        #[arg(long, default_value_t = 1)]
        txn_ops: u32,
    },
    /// Txns that read or write one key, `--rw-ratio` reads per write (etcd's `txn-mixed`).
    TxnMixed {
        #[command(flatten)]
        run: record::RunArgs,
        #[command(flatten)]
        load: kv::KvArgs,
        #[command(flatten)]
        range: kv::RangeArgs,
        #[arg(long, default_value_t = 1.0)]
        rw_ratio: f64,
    },
    /// Watch fan-out: events/s and put→event latency, puts as fast as they go.
    Watch {
        #[command(flatten)]
        run: record::RunArgs,
        #[command(flatten)]
        load: watch::WatchArgs,
    },
    /// Watch delivery latency at a fixed put rate (etcd's `benchmark watch-latency`).
    WatchLatency {
        #[command(flatten)]
        run: record::RunArgs,
        #[command(flatten)]
        load: watch::WatchArgs,
    },
    /// Lease keepalive throughput (etcd's `benchmark lease-keepalive`).
    LeaseKeepalive {
        #[command(flatten)]
        run: record::RunArgs,
        #[command(flatten)]
        load: lease::KeepAliveArgs,
    },
    /// 4 KiB O_DIRECT write + fdatasync: into a pre-zeroed file, a growing one, and a
    /// pre-zeroed one after 1 ms idle gaps.
    FsyncFloor(FloorArgs),
    /// The least a durable put costs here: loopback round trip, and a 4 KiB fdatasync'ed
    /// write on 1 member and on a 3-member quorum, with threads as members (no server).
    ReplicationFloor(FloorArgs),
    /// The standard set against spawned etcd and corekv, with results file and report.
    Suite(suite::SuiteArgs),
}

#[derive(clap::Args)]
struct FloorArgs {
    /// Directory on the disk to measure (the data dir's).
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
    #[arg(long, default_value_t = 2000)]
    count: u64,
    #[arg(long)]
    json: bool,
}

pub fn new_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds")
}

/// The `n`th of comma-separated endpoints (round robin), as a URL tonic can dial.
pub fn grpc_url_n(endpoints: &str, n: usize) -> String {
    let list: Vec<&str> = endpoints.split(',').map(str::trim).collect();
    assert!(!list.is_empty(), "split yields at least one item");
    let ep = list[n % list.len()];
    if ep.contains("://") {
        ep.to_string()
    } else {
        format!("http://{ep}")
    }
}

/// A tonic channel to `url` (TLS for `https://`, done by tls::Dialer).
pub async fn grpc_channel(url: &str) -> Result<tonic::transport::Channel, String> {
    let https = url.starts_with("https://");
    let plain = url.replacen("https://", "http://", 1);
    tonic::transport::Endpoint::from_shared(plain)
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .connect_with_connector(tls::Dialer { https })
        .await
        .map_err(|e| format!("dial {url}: {e}"))
}

pub fn tokio_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

fn main() {
    let cli = Cli::parse();
    // First Ctrl-C: stop loads and still report; second: leave at once (children started
    // with --spawn die with us through PR_SET_PDEATHSIG).
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ncorekv-bench: stopping (Ctrl-C again to leave at once)");
    });
    let r = match cli.cmd {
        Cmd::Put { run, load } => record::run_one(&run, kv::workload_put(load)),
        Cmd::Range {
            run,
            load,
            range,
            preload,
        } => record::run_one_preloaded(&run, kv::workload_range(load, range), preload),
        Cmd::TxnPut { run, load, txn_ops } => {
            record::run_one(&run, kv::workload_txn_put(load, txn_ops))
        }
        Cmd::TxnMixed {
            run,
            load,
            range,
            rw_ratio,
        } => record::run_one(&run, kv::workload_txn_mixed(load, range, rw_ratio)),
        Cmd::Watch { run, load } => record::run_one(&run, watch::workload(load, false)),
        Cmd::WatchLatency { run, load } => record::run_one(&run, watch::workload(load, true)),
        Cmd::LeaseKeepalive { run, load } => record::run_one(&run, lease::workload(load)),
        Cmd::FsyncFloor(a) => fsync::run(&a.dir, a.count, a.json).map(|_| ()),
        Cmd::ReplicationFloor(a) => floor::run(&a.dir, a.count, a.json).map(|_| ()),
        Cmd::Suite(args) => suite::run(args),
    };
    if let Err(e) = r {
        eprintln!("corekv-bench: {e}");
        std::process::exit(1);
    }
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
