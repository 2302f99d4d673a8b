//! One measured run: which target, where it lives, what it cost the server, and the
//! record appended to the results file. Also the single-workload command (`put`,
//! `range`, ...), with or without `--spawn`.

use crate::spawn::{Deployment, SpawnArgs, System};
use crate::{kv, lease, report, watch};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A server and the protocol the load generator speaks to it.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Target {
    /// etcd over its gRPC API.
    Etcd,
    /// corekv over etcd's gRPC API (the same client code as for etcd).
    CorekvGrpc,
    /// corekv over its native capnp-rpc protocol.
    CorekvNative,
}

impl Target {
    pub const ALL: [Target; 3] = [Target::Etcd, Target::CorekvGrpc, Target::CorekvNative];

    pub fn name(self) -> &'static str {
        match self {
            Target::Etcd => "etcd",
            Target::CorekvGrpc => "corekv-grpc",
            Target::CorekvNative => "corekv-native",
        }
    }

    pub fn system(self) -> System {
        match self {
            Target::Etcd => System::Etcd,
            Target::CorekvGrpc | Target::CorekvNative => System::Corekv,
        }
    }

    pub fn is_native(self) -> bool {
        self == Target::CorekvNative
    }
}

#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// Server and protocol; several (comma-separated) only with --spawn.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "corekv-grpc")]
    pub target: Vec<Target>,
    /// Endpoints of the given target (comma-separated; connections go round robin).
    /// Default: 127.0.0.1:2379 (gRPC) or 127.0.0.1:2378 (native).
    #[arg(long)]
    pub endpoints: Option<String>,
    /// Start a fresh single node (1) or 3-member loopback cluster (3) of each system.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=3))]
    pub spawn: Option<u8>,
    /// Runs per target; with several targets their order alternates (A B, B A, ...).
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Server processes to sample RSS and CPU time from (without --spawn).
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Results file each run appends one JSON line to.
    #[arg(long, default_value = "bench/results/results.jsonl")]
    pub results: PathBuf,
    #[arg(long)]
    pub no_results: bool,
    /// Print each run as a JSON line instead of a table row.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub spawn_args: SpawnArgs,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

/// What a load generator does; the same value runs against every target.
#[derive(Clone)]
pub enum Workload {
    Kv(kv::KvWorkload),
    Watch(watch::WatchWorkload),
    Lease(lease::KeepAliveWorkload),
}

impl Workload {
    /// The row title in reports, e.g. "put, 100 clients".
    pub fn label(&self) -> String {
        match self {
            Workload::Kv(w) => w.label(),
            Workload::Watch(w) => w.label(),
            Workload::Lease(w) => w.label(),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Workload::Kv(w) => w.name(),
            Workload::Watch(w) => w.name(),
            Workload::Lease(_) => "lease-keepalive",
        }
    }

    pub fn supports(&self, t: Target) -> bool {
        match self {
            Workload::Kv(_) => true,
            // The watch and keepalive generators speak gRPC only.
            Workload::Watch(_) | Workload::Lease(_) => !t.is_native(),
        }
    }

    fn params(&self) -> serde_json::Value {
        match self {
            Workload::Kv(w) => w.params(),
            Workload::Watch(w) => w.params(),
            Workload::Lease(w) => w.params(),
        }
    }

    /// Requests the run will make, for the progress bar (None: bounded by time).
    fn expected(&self) -> Option<u64> {
        match self {
            Workload::Kv(w) => w.expected(),
            Workload::Watch(w) => Some(w.expected_events()),
            Workload::Lease(w) => Some(w.total()),
        }
    }

    fn run(&self, place: &Place, done: &Arc<AtomicU64>) -> Result<Outcome, String> {
        match self {
            Workload::Kv(w) => w.run(place.target, &place.endpoints, done),
            Workload::Watch(w) => w.run(&place.endpoints, place.pids.first().copied(), done),
            Workload::Lease(w) => w.run(&place.endpoints, done),
        }
    }
}

/// What a workload measured.
pub struct Outcome {
    pub hist: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    /// Requests (or events) per second.
    pub per_s: f64,
    /// Workload-specific figures (watch: events, bytes per watcher).
    pub extra: serde_json::Value,
}

/// Where a target is reached and which processes serve it.
#[derive(Clone)]
pub struct Place {
    pub target: Target,
    pub endpoints: String,
    pub pids: Vec<u32>,
    /// corekv native endpoints, one per member, for WAL group-commit statistics.
    pub native_status: Vec<String>,
    /// etcd client endpoints, one per member, for /metrics.
    pub etcd_metrics: Vec<String>,
}

#[derive(Serialize, Clone, Default)]
pub struct ServerUse {
    pub processes: usize,
    pub rss_bytes: u64,
    pub cpu_seconds: f64,
    /// Server CPU time per successful request (µs).
    pub cpu_us_per_op: f64,
    /// WAL entries per fdatasync over the run, summed over members (where known).
    pub fsync_batch: Option<f64>,
    pub fsyncs: Option<u64>,
}

#[derive(Serialize, Clone)]
pub struct Record {
    pub label: String,
    pub workload: &'static str,
    pub target: &'static str,
    pub members: u8,
    pub round: u32,
    pub params: serde_json::Value,
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    pub per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub server: Option<ServerUse>,
    pub extra: serde_json::Value,
}

pub struct Run {
    pub record: Record,
    pub hist: Histogram<u64>,
}

pub fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Runs `w` once against `place`, with a progress bar and server usage around it.
pub fn measure(w: &Workload, place: &Place, members: u8, round: u32) -> Result<Run, String> {
    assert!(
        w.supports(place.target),
        "caller filters unsupported targets"
    );
    let before = Sample::take(place);
    let done = Arc::new(AtomicU64::new(0));
    let msg = format!(
        "{} · {} · round {}",
        w.label(),
        place.target.name(),
        round + 1
    );
    let outcome = with_progress(&msg, w.expected(), &done, || w.run(place, &done))?;
    let after = Sample::take(place);
    let server = before.usage(&after, place, outcome.ok);
    let h = &outcome.hist;
    let record = Record {
        label: w.label(),
        workload: w.name(),
        target: place.target.name(),
        members,
        round,
        params: w.params(),
        ok: outcome.ok,
        errors: outcome.errors,
        first_error: outcome.first_error,
        seconds: outcome.seconds,
        per_s: outcome.per_s,
        p50_ms: ms(h, 0.5),
        p90_ms: ms(h, 0.9),
        p99_ms: ms(h, 0.99),
        p999_ms: ms(h, 0.999),
        max_ms: h.max() as f64 / 1000.0,
        server,
        extra: outcome.extra,
    };
    Ok(Run {
        record,
        hist: outcome.hist,
    })
}

/// An indicatif bar fed from `done` while `f` runs (hidden when stderr is no terminal).
fn with_progress<T>(
    msg: &str,
    len: Option<u64>,
    done: &Arc<AtomicU64>,
    f: impl FnOnce() -> T,
) -> T {
    let bar = match len {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template("{msg:50} {bar:30} {pos}/{len} {per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner(),
    };
    bar.set_message(msg.to_string());
    let finished = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (bar, done, finished) = (bar.clone(), done.clone(), finished.clone());
        std::thread::spawn(move || {
            // Bounded by the run: `finished` is set right after it.
            while !finished.load(Ordering::Relaxed) {
                bar.set_position(done.load(Ordering::Relaxed));
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let out = f();
    finished.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    bar.finish_and_clear();
    out
}

/// Server-side counters sampled before and after a run.
struct Sample {
    cpu_ticks: u64,
    wal: Option<(u64, u64)>,
}

impl Sample {
    fn take(place: &Place) -> Sample {
        let cpu_ticks = place.pids.iter().filter_map(|&p| cpu_ticks(p)).sum();
        let wal = if !place.native_status.is_empty() {
            corekv_wal(&place.native_status)
        } else if !place.etcd_metrics.is_empty() {
            etcd_wal(&place.etcd_metrics)
        } else {
            None
        };
        Sample { cpu_ticks, wal }
    }

    fn usage(&self, after: &Sample, place: &Place, ok: u64) -> Option<ServerUse> {
        if place.pids.is_empty() {
            return None;
        }
        // SAFETY: sysconf has no preconditions.
        let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let cpu_seconds = after.cpu_ticks.saturating_sub(self.cpu_ticks) as f64 / ticks_per_s;
        let (fsyncs, fsync_batch) = match (self.wal, after.wal) {
            (Some((s0, e0)), Some((s1, e1))) if s1 > s0 => {
                (Some(s1 - s0), Some((e1 - e0) as f64 / (s1 - s0) as f64))
            }
            _ => (None, None),
        };
        Some(ServerUse {
            processes: place.pids.len(),
            rss_bytes: place.pids.iter().filter_map(|&p| rss_bytes(p)).sum(),
            cpu_seconds,
            cpu_us_per_op: cpu_seconds * 1e6 / ok.max(1) as f64,
            fsync_batch,
            fsyncs,
        })
    }
}

pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// utime + stime of a process in clock ticks (/proc/PID/stat fields 14 and 15).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its closing ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// (fsyncs, entries) over corekv members, from `endpoint status`'s WAL statistics.
fn corekv_wal(natives: &[String]) -> Option<(u64, u64)> {
    let eps = natives.to_vec();
    corekv::client::block_on(move || async move {
        let mut sum = (0, 0);
        for ep in &eps {
            let c = corekv::client::Client::connect(ep).await.ok()?;
            let (_, st) = c.status().await.ok()?;
            sum.0 += st.wal.batches;
            sum.1 += st.wal.entries;
        }
        Some(sum)
    })
    .ok()
    .flatten()
}

/// (fsyncs, entries) over etcd members: WAL fsync count and committed index from /metrics.
fn etcd_wal(endpoints: &[String]) -> Option<(u64, u64)> {
    let mut sum = (0, 0);
    for ep in endpoints {
        let text = http_get(ep, "/metrics")?;
        let metric = |name: &str| -> Option<u64> {
            let line = text.lines().find(|l| l.starts_with(name))?;
            line.split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
                .map(|v| v as u64)
        };
        sum.0 += metric("etcd_disk_wal_fsync_duration_seconds_count ")?;
        sum.1 += metric("etcd_server_proposals_committed_total ")?;
    }
    Some(sum)
}

/// A plain HTTP/1.0 GET (no chunking), bounded by a 5 s timeout.
fn http_get(endpoint: &str, path: &str) -> Option<String> {
    crate::tls::http_get(endpoint, path, Duration::from_secs(5))
}

/// Machine, commit and date stamped on every results line and report.
#[derive(Serialize, Clone)]
pub struct Provenance {
    pub date: String,
    pub commit: String,
    pub machine: String,
    pub etcd_version: String,
}

impl Provenance {
    pub fn collect(etcd_bin: &str) -> Provenance {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let mem_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                let l = s.lines().find(|l| l.starts_with("MemTotal:"))?;
                l.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .map_or(0, |kb| kb >> 20);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Provenance {
            date: utc_now(),
            commit: git_commit(),
            machine: format!("{cores} cores, {cpu}, {mem_gib} GiB, Linux {kernel}"),
            etcd_version: command_line(etcd_bin, &["--version"])
                .unwrap_or_else(|| "etcd not found".into()),
        }
    }
}

fn command_line(bin: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(bin).args(args).output().ok()?;
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    s.lines().next().map(|l| l.trim().to_string())
}

fn git_commit() -> String {
    let Some(head) = command_line("git", &["rev-parse", "--short", "HEAD"]) else {
        return "unknown (not a git checkout)".into();
    };
    let dirty = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    if dirty {
        format!("{head}+dirty")
    } else {
        head
    }
}

/// `YYYY-MM-DDTHH:MMZ` without a date crate (civil-from-days, H. Hinnant's algorithm).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// Appends runs to the results file, one JSON object per line.
pub fn append_results(path: &Path, prov: &Provenance, runs: &[&Run]) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    for r in runs {
        let mut v = serde_json::to_value(&r.record).map_err(|e| e.to_string())?;
        let p = serde_json::to_value(prov).map_err(|e| e.to_string())?;
        if let (Some(obj), Some(p)) = (v.as_object_mut(), p.as_object()) {
            for (k, x) in p {
                obj.insert(k.clone(), x.clone());
            }
        }
        writeln!(f, "{v}").map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// A one-line human summary of a run.
pub fn row(r: &Record) -> String {
    let server = r.server.as_ref().map_or(String::new(), |s| {
        format!(
            "  server: {:.1} MiB RSS, {:.0} µs CPU/op{}",
            s.rss_bytes as f64 / (1 << 20) as f64,
            s.cpu_us_per_op,
            s.fsync_batch
                .map_or(String::new(), |b| format!(", {b:.1} entries/fsync"))
        )
    });
    let errors = match &r.first_error {
        Some(e) => format!("  errors {} (first: {e})", r.errors),
        None => String::new(),
    };
    // Watch runs: the round trips of the puts whose events were measured.
    let puts = match (r.extra.get("put_p50_ms"), r.extra.get("put_p99_ms")) {
        (Some(p50), Some(p99)) => format!(
            "  puts p50 {:.3} p99 {:.3} ms",
            p50.as_f64().unwrap_or(f64::NAN),
            p99.as_f64().unwrap_or(f64::NAN)
        ),
        _ => String::new(),
    };
    format!(
        "{:<34} {:<14} ok {:<8} {:>10.0}/s  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms{puts}{server}{errors}",
        r.label, r.target, r.ok, r.per_s, r.p50_ms, r.p90_ms, r.p99_ms, r.p999_ms, r.max_ms
    )
}

fn print_run(r: &Run, json: bool) {
    if json {
        match serde_json::to_string(&r.record) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("corekv-bench: {e}"),
        }
    } else {
        println!("{}", row(&r.record));
    }
}

/// Orders targets for round `round`: as given on even rounds, reversed on odd ones, so
/// drift on a noisy machine falls on every system alike.
pub fn round_order(targets: &[Target], round: u32) -> Vec<Target> {
    let mut v = targets.to_vec();
    if round % 2 == 1 {
        v.reverse();
    }
    v
}

pub fn run_one(args: &RunArgs, w: Workload) -> Result<(), String> {
    run_one_preloaded(args, w, false)
}

/// A single workload against one given endpoint, or against spawned systems.
pub fn run_one_preloaded(args: &RunArgs, w: Workload, preload: bool) -> Result<(), String> {
    if args.rounds == 0 {
        return Err("--rounds must be at least 1".into());
    }
    args.tls.apply()?;
    let prov = Provenance::collect(&args.spawn_args.etcd_bin);
    let targets: Vec<Target> = args
        .target
        .iter()
        .copied()
        .filter(|t| w.supports(*t))
        .collect();
    if targets.is_empty() {
        return Err(format!(
            "{} runs over gRPC only: use --target etcd or corekv-grpc",
            w.name()
        ));
    }
    let mut deployments: Vec<Deployment> = Vec::new();
    let places: Vec<Place> = match args.spawn {
        None => {
            if targets.len() != 1 {
                return Err("several --target values need --spawn 1|3".into());
            }
            let t = targets[0];
            let default_ep = if t.is_native() {
                "127.0.0.1:2378"
            } else {
                "127.0.0.1:2379"
            };
            let endpoints = args.endpoints.clone().unwrap_or_else(|| default_ep.into());
            let list: Vec<String> = endpoints.split(',').map(|s| s.trim().to_string()).collect();
            vec![Place {
                target: t,
                endpoints,
                pids: args.server_pid.clone(),
                native_status: if t.is_native() { list.clone() } else { vec![] },
                etcd_metrics: if t == Target::Etcd { list } else { vec![] },
            }]
        }
        Some(members) => {
            for system in [System::Etcd, System::Corekv] {
                if targets.iter().any(|t| t.system() == system) {
                    deployments.push(Deployment::start(system, members, &args.spawn_args)?);
                }
            }
            targets
                .iter()
                .filter_map(|&t| {
                    let d = deployments.iter().find(|d| d.system == t.system())?;
                    Some(d.place(t))
                })
                .collect()
        }
    };
    if preload {
        if let Workload::Kv(kv) = &w {
            let mut seen = Vec::new();
            for p in &places {
                if !seen.contains(&p.target.system()) {
                    seen.push(p.target.system());
                    kv::preload(p, 0, kv.key_space(), kv.key_size(), kv.val_size())?;
                }
            }
        }
    }
    let members = args.spawn.unwrap_or(0);
    let mut runs = Vec::new();
    for round in 0..args.rounds {
        for t in round_order(&targets, round) {
            if crate::stopped() {
                break;
            }
            let place = places
                .iter()
                .find(|p| p.target == t)
                .expect("place per target");
            let run = measure(&w, place, members, round)?;
            print_run(&run, args.json);
            runs.push(run);
        }
    }
    if !args.no_results {
        append_results(&args.results, &prov, &runs.iter().collect::<Vec<_>>())?;
    }
    if targets.len() > 1 && !args.json {
        println!();
        print!("{}", report::ratio_table(&runs));
    }
    drop(deployments);
    Ok(())
}
