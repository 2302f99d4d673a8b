//! corekv-bench: load generator over the native protocol, and the disk's fsync floor.
//!
//!   corekv-bench put   --endpoints 127.0.0.1:2378 --clients 1000 --conns 100 --total 200000
//!   corekv-bench range --consistency l|s ...
//!   corekv-bench fsync-floor --dir /path/on/the/same/disk
//!   corekv-bench watch --endpoints 127.0.0.1:2379 --watchers 1000 (etcd's gRPC API)
//!   corekv-bench lease-keepalive --endpoints 127.0.0.1:2379 --streams 10 (etcd's gRPC API)
//!
//! Latencies go into hdrhistogram (µs); results print as one table row and, with
//! `--json`, as one JSON line for scripts.

mod lease;
mod watch;

use clap::{Args, Parser, Subcommand};
use corekv::client::Client;
use corekv::model::{PutRequest, RangeRequest};
use hdrhistogram::Histogram;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::rc::Rc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "corekv-bench",
    about = "Load generator for corekv's native protocol"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Puts random keys.
    Put(Load),
    /// Reads random keys (after loading them).
    Range {
        #[command(flatten)]
        load: Load,
        /// l (linearizable) or s (serializable).
        #[arg(long, default_value = "l")]
        consistency: String,
    },
    /// Watch fan-out over gRPC: events/s and put-to-event latency (etcd or corekv).
    Watch(watch::WatchLoad),
    /// Lease keepalive throughput over gRPC (etcd or corekv).
    LeaseKeepalive(lease::KeepAliveLoad),
    /// 4 KiB O_DIRECT write + fdatasync, into a pre-zeroed file and into a growing one.
    FsyncFloor {
        #[arg(long, default_value = ".")]
        dir: std::path::PathBuf,
        #[arg(long, default_value_t = 2000)]
        count: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Clone)]
struct Load {
    #[arg(long, default_value = "127.0.0.1:2378")]
    endpoints: String,
    /// Concurrent requests in flight in total.
    #[arg(long, default_value_t = 1)]
    clients: u64,
    /// TCP connections (clients are spread over them).
    #[arg(long, default_value_t = 1)]
    conns: u64,
    /// Requests in total.
    #[arg(long, default_value_t = 10_000)]
    total: u64,
    #[arg(long, default_value_t = 8)]
    key_size: usize,
    #[arg(long, default_value_t = 256)]
    val_size: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    key_space: u64,
    /// Load-generator threads (each a glommio executor); default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON line instead of the table row.
    #[arg(long)]
    json: bool,
    /// Microseconds a load thread polls before parking (0 = park at once; native only).
    #[arg(long, default_value_t = 0)]
    spin_before_park_us: u64,
    /// Protocol: `native` (corekv's capnp-rpc) or `grpc` (etcd's v3 API, works against
    /// etcd and corekv alike).
    #[arg(long, default_value = "native", value_parser = ["native", "grpc"])]
    api: String,
}

fn key_of(i: u64, size: usize) -> Vec<u8> {
    let s = format!("{i:0size$}");
    s.as_bytes()[s.len().saturating_sub(size)..].to_vec()
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

#[derive(Clone, Copy)]
enum Kind {
    Put,
    Range { serializable: bool },
}

/// One client's loop: `n` requests on random keys through `op(key, value)`, which says
/// whether the request succeeded. Shared by the native and gRPC modes.
async fn client_loop<F, Fut>(n: u64, seed: u64, load: &Load, mut op: F) -> (Histogram<u64>, u64)
where
    F: FnMut(Vec<u8>, Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut h = new_histogram();
    let mut rng = seed;
    let value = vec![b'v'; load.val_size];
    let mut errors = 0u64;
    for _ in 0..n {
        let key = key_of(xorshift(&mut rng) % load.key_space, load.key_size);
        let start = Instant::now();
        if op(key, value.clone()).await {
            let _ = h.record((start.elapsed().as_micros() as u64).max(1));
        } else {
            errors += 1;
        }
    }
    (h, errors)
}

/// The first endpoint as a URL tonic can dial (scheme optional on the command line).
fn grpc_url(endpoints: &str) -> String {
    grpc_url_n(endpoints, 0)
}

/// The `n`th endpoint (round robin), as etcd's benchmark spreads connections.
fn grpc_url_n(endpoints: &str, n: usize) -> String {
    let list: Vec<&str> = endpoints.split(',').map(str::trim).collect();
    let ep = list[n % list.len()];
    if ep.contains("://") {
        ep.to_string()
    } else {
        format!("http://{ep}")
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds")
}

/// The gRPC variant of `run_thread`: tonic on a current-thread tokio runtime.
fn run_thread_grpc(
    load: Load,
    kind: Kind,
    conns: u64,
    clients: u64,
    total: u64,
    seed: u64,
) -> Result<(Histogram<u64>, u64), String> {
    use corekv::etcdpb::etcdserverpb::{
        kv_client::KvClient, PutRequest as PbPut, RangeRequest as PbRange,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let mut channels = Vec::new();
        for i in 0..conns.max(1) {
            let url = grpc_url_n(&load.endpoints, i as usize);
            let ch = tonic::transport::Endpoint::from_shared(url.clone())
                .map_err(|e| e.to_string())?
                .tcp_nodelay(true)
                .connect()
                .await
                .map_err(|e| format!("dial {url}: {e}"))?;
            channels.push(ch);
        }
        let per_client = total / clients.max(1);
        let extra = total % clients.max(1);
        let mut tasks = Vec::new();
        for c in 0..clients {
            let client = KvClient::new(channels[(c % conns.max(1)) as usize].clone());
            let n = per_client + u64::from(c < extra);
            let load = load.clone();
            let seed = seed ^ (c + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            tasks.push(tokio::spawn(async move {
                client_loop(n, seed, &load, |key, value| {
                    let mut client = client.clone();
                    async move {
                        match kind {
                            Kind::Put => client
                                .put(PbPut {
                                    key,
                                    value,
                                    ..Default::default()
                                })
                                .await
                                .is_ok(),
                            Kind::Range { serializable } => client
                                .range(PbRange {
                                    key,
                                    serializable,
                                    ..Default::default()
                                })
                                .await
                                .is_ok(),
                        }
                    }
                })
                .await
            }));
        }
        let mut all = new_histogram();
        let mut errors = 0;
        for t in tasks {
            let (h, e) = t.await.map_err(|e| e.to_string())?;
            all.add(&h).map_err(|e| e.to_string())?;
            errors += e;
        }
        Ok((all, errors))
    })
}

/// One thread's share: `conns` connections, `clients` tasks, `total` requests.
fn run_thread(
    load: Load,
    kind: Kind,
    conns: u64,
    clients: u64,
    total: u64,
    seed: u64,
) -> Result<(Histogram<u64>, u64), String> {
    let spin = Duration::from_micros(load.spin_before_park_us);
    corekv::client::block_on_spinning(spin, move || async move {
        let mut conn_list = Vec::new();
        let eps: Vec<&str> = load.endpoints.split(',').map(str::trim).collect();
        for i in 0..conns.max(1) {
            conn_list.push(Rc::new(
                Client::connect(eps[i as usize % eps.len()])
                    .await
                    .map_err(|e| e.to_string())?,
            ));
        }
        let per_client = total / clients.max(1);
        let extra = total % clients.max(1);
        let mut tasks = Vec::new();
        for c in 0..clients {
            let client = conn_list[(c % conns.max(1)) as usize].clone();
            let n = per_client + u64::from(c < extra);
            let load = load.clone();
            let seed = seed ^ (c + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            tasks.push(glommio::spawn_local(async move {
                client_loop(n, seed, &load, |key, value| {
                    let client = client.clone();
                    async move {
                        match kind {
                            Kind::Put => client
                                .put(&PutRequest {
                                    key,
                                    value,
                                    ..Default::default()
                                })
                                .await
                                .is_ok(),
                            Kind::Range { serializable } => client
                                .range(&RangeRequest {
                                    key,
                                    serializable,
                                    ..Default::default()
                                })
                                .await
                                .is_ok(),
                        }
                    }
                })
                .await
            }));
        }
        let mut all = new_histogram();
        let mut errors = 0;
        for t in tasks {
            let (h, e) = t.await;
            all.add(&h).map_err(|e| e.to_string())?;
            errors += e;
        }
        Ok((all, errors))
    })?
}

fn report(name: &str, load: &Load, h: &Histogram<u64>, errors: u64, elapsed: Duration) {
    let qps = h.len() as f64 / elapsed.as_secs_f64();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    if load.json {
        println!(
            "{}",
            serde_json::json!({
                "workload": name, "api": load.api, "clients": load.clients, "conns": load.conns, "total": load.total,
                "ok": h.len(), "errors": errors, "seconds": elapsed.as_secs_f64(), "qps": qps,
                "p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99), "p999_ms": ms(0.999),
                "max_ms": h.max() as f64 / 1000.0,
            })
        );
    } else {
        println!(
            "{name:<12} api={:<6} clients={:<5} conns={:<4} ok={:<8} errors={:<4} {:>9.0} req/s  p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
            load.api, load.clients, load.conns, h.len(), errors, qps, ms(0.5), ms(0.9), ms(0.99), ms(0.999), h.max() as f64 / 1000.0
        );
    }
}

fn run_load(name: &str, load: Load, kind: Kind) -> Result<(), String> {
    let threads = load
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, load.conns.max(1) as usize);
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..threads as u64 {
        let share = |x: u64| x / threads as u64 + u64::from(t < x % threads as u64);
        let (conns, clients, total) = (share(load.conns), share(load.clients), share(load.total));
        let load = load.clone();
        let grpc = load.api == "grpc";
        handles.push(std::thread::spawn(move || {
            if grpc {
                run_thread_grpc(load, kind, conns, clients, total, 0x1234_5678 + t)
            } else {
                run_thread(load, kind, conns, clients, total, 0x1234_5678 + t)
            }
        }));
    }
    let mut all = new_histogram();
    let mut errors = 0;
    for h in handles {
        let (hist, e) = h.join().map_err(|_| "load thread panicked".to_string())??;
        all.add(&hist).map_err(|e| e.to_string())?;
        errors += e;
    }
    report(name, &load, &all, errors, started.elapsed());
    Ok(())
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct Aligned(*mut u8, std::alloc::Layout);
impl Aligned {
    fn new(size: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(size, 4096).expect("layout");
        // SAFETY: non-zero size layout; zeroed so the block is deterministic.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!p.is_null(), "allocation failed");
        Aligned(p, layout)
    }
    fn slice(&self) -> &[u8] {
        // SAFETY: p points at layout.size() initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.0, self.1.size()) }
    }
}
impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.0, self.1) }
    }
}

fn fsync_floor(dir: &std::path::Path, count: u64, json: bool) -> Result<(), String> {
    let block = Aligned::new(4096);
    let mut results = Vec::new();
    for (name, prezero) in [("pre-zeroed", true), ("extending", false)] {
        let path = dir.join(format!(".corekv-fsync-floor-{name}"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        if prezero {
            for i in 0..count {
                f.write_all_at(block.slice(), i * 4096)
                    .map_err(|e| e.to_string())?;
            }
            f.sync_all().map_err(|e| e.to_string())?;
        }
        let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).expect("bounds");
        for i in 0..count {
            let start = Instant::now();
            f.write_all_at(block.slice(), i * 4096)
                .map_err(|e| e.to_string())?;
            f.sync_data().map_err(|e| e.to_string())?;
            let _ = h.record((start.elapsed().as_micros() as u64).max(1));
        }
        let _ = std::fs::remove_file(&path);
        results.push((name, h));
    }
    for (name, h) in &results {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        if json {
            println!(
                "{}",
                serde_json::json!({"workload": format!("fsync-floor {name}"), "count": h.len(), "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": h.max() as f64 / 1000.0})
            );
        } else {
            println!("fsync-floor {name:<11} 4 KiB O_DIRECT write + fdatasync x{}: p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms", h.len(), ms(0.5), ms(0.99), h.max() as f64 / 1000.0);
        }
    }
    let _ = std::io::stdout().flush();
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Put(load) => run_load("put", load, Kind::Put),
        Cmd::Range { load, consistency } => {
            let serializable = consistency == "s";
            run_load(
                if serializable { "range-s" } else { "range-l" },
                load,
                Kind::Range { serializable },
            )
        }
        Cmd::FsyncFloor { dir, count, json } => fsync_floor(&dir, count, json),
        Cmd::Watch(w) => watch::run(w),
        Cmd::LeaseKeepalive(l) => lease::run(l),
    };
    if let Err(e) = r {
        eprintln!("corekv-bench: {e}");
        std::process::exit(1);
    }
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
