//! `corekv-bench suite`: the standard set. For each topology (`--spawn 1,3`) it starts
//! fresh etcd and corekv deployments, preloads the same dataset into both, runs every
//! workload against every target alternately (round 1: etcd, corekv-grpc, corekv-native;
//! round 2 reversed; ...), grows the dataset and reads again, then stops everything and
//! writes the results file, a Markdown report and SVG plots.

use crate::kv::{KvArgs, KvOp, KvWorkload, RangeArgs};
use crate::lease::{KeepAliveArgs, KeepAliveWorkload};
use crate::record::{self, Place, Provenance, Run, Target, Workload};
use crate::report::{self, dataset_tag, GoalContext, Group};
use crate::spawn::{Deployment, SpawnArgs, System};
use crate::watch::{WatchArgs, WatchWorkload};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct SuiteArgs {
    /// Topologies: 1 (single node), 3 (3-member clusters), or both ("1,3").
    #[arg(long, value_delimiter = ',', default_value = "1",
          value_parser = clap::value_parser!(u8).range(1..=3))]
    pub spawn: Vec<u8>,
    /// Tiny totals (seconds, not minutes): checks the harness, measures nothing.
    #[arg(long)]
    pub quick: bool,
    /// Rounds per workload and target (default 2, --quick 1).
    #[arg(long)]
    pub rounds: Option<u32>,
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "etcd,corekv-grpc,corekv-native"
    )]
    pub target: Vec<Target>,
    /// Only workloads whose label contains one of these words (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Directory for report.md and the plots.
    #[arg(long, default_value = "bench/report")]
    pub out: PathBuf,
    /// A Markdown file whose `<!-- report:begin -->`…`<!-- report:end -->` section is
    /// replaced by the report (e.g. bench/README.md).
    #[arg(long)]
    pub readme: Option<PathBuf>,
    #[arg(long, default_value = "bench/results/results.jsonl")]
    pub results: PathBuf,
    #[arg(long)]
    pub no_results: bool,
    #[command(flatten)]
    pub spawn_args: SpawnArgs,
}

/// One step of the standard set.
enum Step {
    /// Bring every system's dataset to this many keys.
    Dataset(u64),
    Run(Workload),
    /// From here on, fresh deployments of both systems serve clients over TLS with
    /// --client-cert-auth (spawn --tls), dataset empty again.
    Secure,
}

/// The label tag of the rows measured over TLS.
const TLS_TAG: &str = "TLS";

fn kv(clients: u64, conns: u64, total: u64, keys: u64) -> KvArgs {
    KvArgs {
        clients,
        conns,
        total: Some(total),
        duration: None,
        rate: 0,
        key_size: 8,
        val_size: 256,
        key_space_size: keys,
        sequential_keys: false,
        threads: (clients == 1).then_some(1),
    }
}

fn range(consistency: &str) -> RangeArgs {
    RangeArgs {
        consistency: consistency.into(),
        span: 1,
        limit: 0,
        keys_only: false,
        count_only: false,
    }
}

fn watch(watchers: u64, streams: u64, puts: u64, rate: Option<u64>) -> Workload {
    Workload::Watch(WatchWorkload {
        args: WatchArgs {
            watchers,
            streams,
            conns: streams.min(10),
            put_clients: 10,
            puts,
            put_rate: rate,
        },
        latency: rate.is_some(),
    })
}

/// Put rates (puts/s) of the paced watch-latency rows, each fanned out to 1000 watchers.
const WATCH_LATENCY_RATES: [u64; 4] = [200, 500, 1100, 2000];

/// The standard set; `quick` keeps its shape with tiny totals.
fn plan(quick: bool) -> (Vec<Step>, u64, u64) {
    // (scale for totals, base dataset, grown dataset)
    let (f, base, grown) = if quick {
        (0.005, 1_000, 3_000)
    } else {
        (1.0, 100_000, 1_000_000)
    };
    let n = |x: f64| ((x * f) as u64).max(20);
    let mut steps = vec![Step::Dataset(base)];
    for (clients, conns, total) in [
        (1, 1, 3_000.0),
        (10, 10, 20_000.0),
        (100, 10, 60_000.0),
        (1000, 100, 150_000.0),
    ] {
        let total = if quick {
            clients.max(n(total))
        } else {
            n(total)
        };
        let w = KvWorkload::new(kv(clients, conns, total, base), KvOp::Put);
        steps.push(Step::Run(Workload::Kv(w)));
    }
    for c in ["l", "s"] {
        let w = KvWorkload::new(kv(100, 10, n(60_000.0), base), KvOp::Range(range(c)));
        steps.push(Step::Run(Workload::Kv(w)));
    }
    let w = KvWorkload::new(kv(100, 10, n(40_000.0), base), KvOp::TxnPut { ops: 1 });
    steps.push(Step::Run(Workload::Kv(w)));
    let mixed = KvOp::TxnMixed {
        range: range("l"),
        rw_ratio: 1.0,
    };
    let w = KvWorkload::new(kv(100, 10, n(40_000.0), base), mixed);
    steps.push(Step::Run(Workload::Kv(w)));
    if quick {
        steps.push(Step::Run(watch(100, 5, 20, None)));
        steps.push(Step::Run(watch(100, 5, 20, Some(100))));
    } else {
        steps.push(Step::Run(watch(1000, 10, 1000, None)));
        steps.push(Step::Run(watch(10_000, 10, 100, None)));
        steps.push(Step::Run(watch(100_000, 100, 10, None)));
        // etcd's watch-latency regime (1000 watchers, paced puts) at rising rates, ~5 s
        // each: the watch goal compares the best event rate each system delivers under
        // a p99 bound (report.rs, watch_goal).
        for rate in WATCH_LATENCY_RATES {
            steps.push(Step::Run(watch(1000, 10, rate * 5, Some(rate))));
        }
    }
    steps.push(Step::Run(Workload::Lease(KeepAliveWorkload {
        args: KeepAliveArgs {
            leases: if quick { 10 } else { 100 },
            streams: 10,
            total: n(50_000.0),
        },
    })));
    steps.push(Step::Dataset(grown));
    for c in ["l", "s"] {
        let mut w = KvWorkload::new(kv(100, 10, n(60_000.0), grown), KvOp::Range(range(c)));
        w.tag = dataset_tag(grown);
        steps.push(Step::Run(Workload::Kv(w)));
    }
    // The cost of TLS, side by side: the same puts and reads with both systems serving
    // https and requiring client certificates.
    steps.push(Step::Secure);
    steps.push(Step::Dataset(base));
    for (clients, conns, total) in [(1, 1, 3_000.0), (1000, 100, 150_000.0)] {
        let total = if quick {
            clients.max(n(total))
        } else {
            n(total)
        };
        let mut w = KvWorkload::new(kv(clients, conns, total, base), KvOp::Put);
        w.tag = TLS_TAG.into();
        steps.push(Step::Run(Workload::Kv(w)));
    }
    let mut w = KvWorkload::new(kv(100, 10, n(60_000.0), base), KvOp::Range(range("l")));
    w.tag = TLS_TAG.into();
    steps.push(Step::Run(Workload::Kv(w)));
    (steps, base, grown)
}

struct Topology {
    members: u8,
    runs: Vec<Run>,
    corekv_flags: String,
    etcd_flags: String,
    datasets: (u64, u64),
}

pub fn run(args: SuiteArgs) -> Result<(), String> {
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 2 });
    if rounds == 0 || args.target.is_empty() || args.spawn.is_empty() {
        return Err("need --rounds >= 1, a --target and a --spawn topology".into());
    }
    let prov = Provenance::collect(&args.spawn_args.etcd_bin);
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let work = args
        .spawn_args
        .work_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    eprintln!("fsync floor in {} ...", work.display());
    let floor = crate::fsync::run(&work, if args.quick { 50 } else { 2000 }, false)?;
    eprintln!("replication floor in {} ...", work.display());
    let replication = crate::floor::run(&work, if args.quick { 50 } else { 5000 }, false)?;
    let floors = Floors {
        fsync: floor,
        replication,
    };
    let mut topologies = Vec::new();
    for &members in &args.spawn {
        if crate::stopped() {
            break;
        }
        let t = run_topology(&args, members, rounds, &prov)?;
        topologies.push(t);
    }
    let text = render(&args, &prov, &floors, &topologies, rounds, "")?;
    let report_path = args.out.join("report.md");
    std::fs::write(&report_path, &text).map_err(|e| format!("{}: {e}", report_path.display()))?;
    println!("{text}");
    eprintln!("report: {}", report_path.display());
    if let Some(readme) = &args.readme {
        let prefix = relative_dir(readme, &args.out);
        let text = render(&args, &prov, &floors, &topologies, rounds, &prefix)?;
        replace_section(readme, &text)?;
        eprintln!("updated {}", readme.display());
    }
    Ok(())
}

fn wanted(args: &SuiteArgs, w: &Workload) -> bool {
    args.only.is_empty() || args.only.iter().any(|o| w.label().contains(o.as_str()))
}

fn run_topology(
    args: &SuiteArgs,
    members: u8,
    rounds: u32,
    prov: &Provenance,
) -> Result<Topology, String> {
    let (mut deployments, mut places) = start_all(args, members, &args.spawn_args)?;
    let (steps, base, grown) = plan(args.quick);
    let total_runs = steps.len();
    // A dataset step matters only if a workload `--only` selects runs after it (growing
    // to 1M keys for reads nobody asked for took minutes).
    let run_after: Vec<bool> = (0..steps.len())
        .map(|i| {
            steps[i + 1..]
                .iter()
                .any(|s| matches!(s, Step::Run(w) if wanted(args, w)))
        })
        .collect();
    let mut dataset = 0u64;
    let mut runs: Vec<Run> = Vec::new();
    for (i, step) in steps.into_iter().enumerate() {
        if crate::stopped() {
            break;
        }
        match step {
            Step::Secure if !run_after[i] => break,
            Step::Secure => {
                drop(std::mem::take(&mut deployments));
                let secure = SpawnArgs {
                    tls: true,
                    ..args.spawn_args.clone()
                };
                (deployments, places) = start_all(args, members, &secure)?;
                dataset = 0;
            }
            Step::Dataset(_) if !run_after[i] => {}
            Step::Dataset(keys) => {
                for d in &deployments {
                    eprintln!(
                        "preloading {System:?} to {keys} keys ...",
                        System = d.system
                    );
                    // Preloads go over the fastest path each system offers; data are equal.
                    let t = match d.system {
                        System::Etcd => Target::Etcd,
                        System::Corekv => Target::CorekvNative,
                    };
                    crate::kv::preload(&d.place(t), dataset, keys, 8, 256)?;
                }
                dataset = keys;
            }
            Step::Run(w) => {
                if !wanted(args, &w) {
                    continue;
                }
                eprintln!(
                    "[{}/{total_runs}] {} ({members} member(s))",
                    i + 1,
                    w.label()
                );
                let mut mine = Vec::new();
                for round in 0..rounds {
                    for t in record::round_order(&args.target, round) {
                        if !w.supports(t) || crate::stopped() {
                            continue;
                        }
                        let place = places.iter().find(|p| p.target == t).expect("place");
                        let run = record::measure(&w, place, members, round)?;
                        eprintln!("  {}", record::row(&run.record));
                        mine.push(run);
                    }
                }
                if !args.no_results {
                    record::append_results(&args.results, prov, &mine.iter().collect::<Vec<_>>())?;
                }
                runs.extend(mine);
            }
        }
    }
    let t = Topology {
        members,
        runs,
        corekv_flags: deployments
            .iter()
            .find(|d| d.system == System::Corekv)
            .map_or(String::new(), |d| d.flags.clone()),
        etcd_flags: deployments
            .iter()
            .find(|d| d.system == System::Etcd)
            .map_or(String::new(), |d| d.flags.clone()),
        datasets: (base, grown),
    };
    drop(deployments);
    Ok(t)
}

/// Fresh deployments of every system a target needs, and where each target is reached.
fn start_all(
    args: &SuiteArgs,
    members: u8,
    spawn: &SpawnArgs,
) -> Result<(Vec<Deployment>, Vec<Place>), String> {
    let mut deployments = Vec::new();
    for system in [System::Etcd, System::Corekv] {
        if args.target.iter().any(|t| t.system() == system) {
            let tls = if spawn.tls { " (TLS)" } else { "" };
            eprintln!("starting {members} × {system:?}{tls} ...");
            deployments.push(Deployment::start(system, members, spawn)?);
        }
    }
    let places: Vec<Place> = args
        .target
        .iter()
        .filter_map(|&t| {
            let d = deployments.iter().find(|d| d.system == t.system())?;
            Some(d.place(t))
        })
        .collect();
    Ok((deployments, places))
}

fn topology_name(members: u8) -> String {
    if members == 1 {
        "single node".into()
    } else {
        format!("{members}-member cluster")
    }
}

type NamedHistograms = Vec<(&'static str, hdrhistogram::Histogram<u64>)>;

/// What the machine allows, measured before the runs: `fsync-floor` and `replication-floor`.
struct Floors {
    fsync: NamedHistograms,
    replication: NamedHistograms,
}

fn floor_p50(floors: &NamedHistograms, name: &str) -> Option<f64> {
    floors
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, h)| record::ms(h, 0.5))
}

/// The report text; `img` prefixes plot paths (relative to where the text will live).
fn render(
    args: &SuiteArgs,
    prov: &Provenance,
    floors: &Floors,
    topologies: &[Topology],
    rounds: u32,
    img: &str,
) -> Result<String, String> {
    let mut s = String::new();
    let _ = writeln!(s, "## Report: corekv against etcd, side by side\n");
    let _ = writeln!(s, "- date: {}; commit: `{}`", prov.date, prov.commit);
    let _ = writeln!(s, "- machine: {}", prov.machine);
    let _ = writeln!(s, "- etcd: {} (Debian's etcd-server)", prov.etcd_version);
    let _ = writeln!(
        s,
        "- one load generator (`corekv-bench`, same client code over gRPC for both) on the same machine; \
         {rounds} round(s) per workload and target, alternating order; keys 8 B, values 256 B{}",
        if args.quick { "; **--quick: tiny totals, figures mean nothing**" } else { "" }
    );
    let _ = write!(
        s,
        "- fsync floor (4 KiB O_DIRECT write + fdatasync, same disk):"
    );
    let percentiles = |s: &mut String, list: &NamedHistograms| {
        for (name, h) in list {
            let _ = write!(
                s,
                " {name} p50 {:.3} ms, p99 {:.3} ms;",
                record::ms(h, 0.5),
                record::ms(h, 0.99)
            );
        }
    };
    percentiles(&mut s, &floors.fsync);
    let _ = write!(
        s,
        "\n- replication floor (`replication-floor`: threads as members over loopback TCP, one \
         4 KiB O_DIRECT write + fdatasync per member and put, quorum 2 of 3; no server software):"
    );
    percentiles(&mut s, &floors.replication);
    let _ = writeln!(s, "\n- reproduce: `bench/run.sh` (see bench/README.md)\n");
    let fsync_floor_p50 = floor_p50(&floors.fsync, "pre-zeroed");
    for t in topologies {
        let groups = report::group(&t.runs);
        let name = topology_name(t.members);
        let suffix = format!("{}node", t.members);
        let _ = writeln!(s, "### {name}\n");
        let _ = writeln!(
            s,
            "corekv flags: `{}`; etcd flags: `{}`; dataset {} keys, grown to {} for the last reads.\n",
            if t.corekv_flags.is_empty() { "(defaults)" } else { &t.corekv_flags },
            if t.etcd_flags.is_empty() { "(defaults)" } else { &t.etcd_flags },
            t.datasets.0,
            t.datasets.1
        );
        if groups.is_empty() {
            let _ = writeln!(s, "(no runs completed)\n");
            continue;
        }
        let _ = writeln!(s, "#### Headline: corekv ÷ etcd\n");
        s.push_str(&report::ratio_table_groups(&groups));
        let _ = writeln!(s, "\n#### Goals\n");
        let cx = GoalContext {
            members: t.members,
            fsync_floor_p50_ms: fsync_floor_p50,
            durable_put_floor_p50_ms: floor_p50(
                &floors.replication,
                if t.members <= 1 {
                    "durable put, 1 member"
                } else {
                    "durable put, 3 members"
                },
            ),
            datasets: Some(t.datasets),
        };
        s.push_str(&report::goals_table(&groups, &cx));
        let _ = writeln!(s, "\n#### Plots\n");
        let plots = plot_all(&args.out, &suffix, &groups)?;
        for (file, title) in plots {
            let _ = writeln!(s, "![{title}]({img}{file})\n");
        }
        let _ = writeln!(s, "#### Details\n");
        s.push_str(&report::details_table(&groups));
        s.push('\n');
    }
    Ok(s)
}

/// Writes the plots for one topology; returns (file name, title) per plot.
fn plot_all(out: &Path, suffix: &str, groups: &[Group]) -> Result<Vec<(String, String)>, String> {
    let mut files = Vec::new();
    let lat: Vec<&Group> = groups.iter().filter(|g| !g.by_target.is_empty()).collect();
    if !lat.is_empty() {
        let f = format!("latency-{suffix}.svg");
        report::plot_latency(&out.join(&f), &lat)?;
        files.push((f, "latency percentiles per workload".to_string()));
    }
    let puts: Vec<&Group> = groups.iter().filter(|g| g.workload == "put").collect();
    if puts.len() > 1 {
        let f = format!("put-throughput-{suffix}.svg");
        report::plot_throughput(&out.join(&f), &puts)?;
        files.push((f, "put throughput against clients".to_string()));
    }
    Ok(files)
}

/// `out` as seen from the directory holding `file`, with a trailing slash.
fn relative_dir(file: &Path, out: &Path) -> String {
    let base = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
        .canonicalize()
        .ok();
    let out_abs = out.canonicalize().ok();
    match (base, out_abs) {
        (Some(b), Some(o)) => match o.strip_prefix(&b) {
            Ok(rel) if rel.as_os_str().is_empty() => String::new(),
            Ok(rel) => format!("{}/", rel.display()),
            Err(_) => format!("{}/", o.display()),
        },
        _ => format!("{}/", out.display()),
    }
}

const BEGIN: &str = "<!-- report:begin -->";
const END: &str = "<!-- report:end -->";

fn replace_section(path: &Path, text: &str) -> Result<(), String> {
    let old = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (Some(b), Some(e)) = (old.find(BEGIN), old.find(END)) else {
        return Err(format!("{} has no {BEGIN} … {END} section", path.display()));
    };
    if e < b {
        return Err(format!("{}: {END} before {BEGIN}", path.display()));
    }
    let new = format!("{}{BEGIN}\n{text}\n{}", &old[..b], &old[e..]);
    std::fs::write(path, new).map_err(|e| format!("{}: {e}", path.display()))
}
