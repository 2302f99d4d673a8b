//! The report: runs grouped per workload and target (rounds merged), a headline table of
//! corekv ÷ etcd, the goals of issue 6 checked against the figures, a details table, and
//! SVG plots (latency percentile curves per system; throughput against clients).

use crate::new_histogram;
use crate::record::{ms, Run, Target};
use hdrhistogram::Histogram;
use plotters::prelude::*;
use std::fmt::Write as _;
use std::path::Path;

/// One workload against one target, its rounds merged.
pub struct Merged {
    pub target: Target,
    pub hist: Histogram<u64>,
    /// Mean over rounds of requests (events) per second.
    pub per_s: f64,
    /// Per-round rates, to show the spread.
    pub rounds: Vec<f64>,
    pub errors: u64,
    pub first_error: Option<String>,
    pub cpu_us_per_op: Option<f64>,
    pub rss_bytes: Option<u64>,
    pub fsync_batch: Option<f64>,
    pub bytes_per_watcher: Option<f64>,
}

impl Merged {
    pub fn p(&self, q: f64) -> f64 {
        ms(&self.hist, q)
    }

    /// Largest deviation of a round from the mean, in percent.
    fn spread_pct(&self) -> f64 {
        let m = self.per_s.max(1e-9);
        self.rounds
            .iter()
            .map(|r| (r - m).abs() / m * 100.0)
            .fold(0.0, f64::max)
    }
}

pub struct Group {
    pub label: String,
    pub workload: String,
    pub clients: Option<u64>,
    pub members: u8,
    pub by_target: Vec<Merged>,
}

impl Group {
    pub fn get(&self, t: Target) -> Option<&Merged> {
        self.by_target.iter().find(|m| m.target == t)
    }
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Groups runs by (members, label) in first-seen order, merging rounds per target.
pub fn group(runs: &[Run]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for run in runs {
        let r = &run.record;
        let gi = match groups
            .iter()
            .position(|g| g.label == r.label && g.members == r.members)
        {
            Some(i) => i,
            None => {
                groups.push(Group {
                    label: r.label.clone(),
                    workload: r.workload.to_string(),
                    clients: r.params.get("clients").and_then(|c| c.as_u64()),
                    members: r.members,
                    by_target: Vec::new(),
                });
                groups.len() - 1
            }
        };
        let g = &mut groups[gi];
        let target = Target::ALL
            .into_iter()
            .find(|t| t.name() == r.target)
            .expect("records name a known target");
        if g.get(target).is_none() {
            g.by_target.push(Merged {
                target,
                hist: new_histogram(),
                per_s: 0.0,
                rounds: Vec::new(),
                errors: 0,
                first_error: None,
                cpu_us_per_op: None,
                rss_bytes: None,
                fsync_batch: None,
                bytes_per_watcher: None,
            });
        }
        let m = g
            .by_target
            .iter_mut()
            .find(|m| m.target == target)
            .expect("inserted above");
        let _ = m.hist.add(&run.hist);
        m.rounds.push(r.per_s);
        m.per_s = mean(&m.rounds).unwrap_or(0.0);
        m.errors += r.errors;
        if m.first_error.is_none() {
            m.first_error = r.first_error.clone();
        }
        let n = m.rounds.len() as f64;
        let avg = |old: Option<f64>, new: Option<f64>| match (old, new) {
            (Some(o), Some(x)) => Some(o + (x - o) / n),
            (None, x) => x,
            (o, None) => o,
        };
        if let Some(s) = &r.server {
            m.cpu_us_per_op = avg(m.cpu_us_per_op, Some(s.cpu_us_per_op));
            m.rss_bytes = Some(m.rss_bytes.unwrap_or(0).max(s.rss_bytes));
            m.fsync_batch = avg(m.fsync_batch, s.fsync_batch);
        }
        let bpw = r
            .extra
            .get("rss_bytes_per_watcher")
            .and_then(|b| b.as_f64());
        m.bytes_per_watcher = avg(m.bytes_per_watcher, bpw);
    }
    groups
}

fn rate(x: f64) -> String {
    if x >= 100.0 {
        let s = format!("{:.0}", x);
        // Thousands separators for readability.
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else {
        format!("{x:.1}")
    }
}

fn cell(m: Option<&Merged>) -> String {
    match m {
        None => "–".into(),
        Some(m) => format!(
            "{}/s · p50 {:.2} · p99 {:.2} ms{}",
            rate(m.per_s),
            m.p(0.5),
            m.p(0.99),
            if m.errors > 0 {
                format!(" · **{} errors**", m.errors)
            } else {
                String::new()
            }
        ),
    }
}

fn ratio(c: Option<&Merged>, e: Option<&Merged>) -> String {
    match (c, e) {
        (Some(c), Some(e)) if e.per_s > 0.0 => format!(
            "**{:.2}×** (p99 {:.2}×)",
            c.per_s / e.per_s,
            c.p(0.99) / e.p(0.99).max(1e-9)
        ),
        _ => "–".into(),
    }
}

/// corekv ÷ etcd per workload: throughput ratio first, p99 ratio beside it.
pub fn ratio_table_groups(groups: &[Group]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| workload | etcd (gRPC) | corekv gRPC | corekv ÷ etcd | corekv native | native ÷ etcd |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for g in groups {
        let (e, c, n) = (
            g.get(Target::Etcd),
            g.get(Target::CorekvGrpc),
            g.get(Target::CorekvNative),
        );
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            g.label,
            cell(e),
            cell(c),
            ratio(c, e),
            cell(n),
            ratio(n, e)
        );
    }
    let _ = writeln!(
        s,
        "\nRates are the mean over rounds; percentiles from all rounds' hdrhistograms merged. \
         Ratios: corekv's rate ÷ etcd's (higher is better), and corekv's p99 ÷ etcd's (lower is better)."
    );
    s
}

pub fn ratio_table(runs: &[Run]) -> String {
    ratio_table_groups(&group(runs))
}

/// Every figure per workload and target.
pub fn details_table(groups: &[Group]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| workload | target | rate/s (±round spread) | p50 | p90 | p99 | p99.9 | max ms | errors | server CPU µs/op | server RSS MiB | entries/fsync | B/watcher |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for g in groups {
        for m in &g.by_target {
            let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("–".into(), f);
            let _ = writeln!(
                s,
                "| {} | {} | {} (±{:.0}%) | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} | {} | {} | {} | {} | {} |",
                g.label,
                m.target.name(),
                rate(m.per_s),
                m.spread_pct(),
                m.p(0.5),
                m.p(0.9),
                m.p(0.99),
                m.p(0.999),
                m.hist.max() as f64 / 1000.0,
                match &m.first_error {
                    Some(e) if m.errors > 0 => format!("{} ({})", m.errors, e.replace('|', "/")),
                    _ => "0".into(),
                },
                opt(m.cpu_us_per_op, &|v| format!("{v:.0}")),
                opt(m.rss_bytes.map(|b| b as f64), &|v| format!("{:.0}", v / 1048576.0)),
                opt(m.fsync_batch, &|v| format!("{v:.1}")),
                opt(m.bytes_per_watcher, &|v| format!("{v:.0}")),
            );
        }
    }
    s
}

/// Inputs the goals need besides the runs.
pub struct GoalContext {
    pub members: u8,
    /// Pre-zeroed fsync floor p50 (ms), when measured.
    pub fsync_floor_p50_ms: Option<f64>,
    /// `replication-floor`'s durable put p50 (ms) for this topology, when measured.
    pub durable_put_floor_p50_ms: Option<f64>,
    /// (base, grown) dataset sizes for the "flat as the dataset grows" goal.
    pub datasets: Option<(u64, u64)>,
}

fn find<'a>(groups: &'a [Group], workload: &str, clients: Option<u64>) -> Option<&'a Group> {
    groups
        .iter()
        .find(|g| g.workload == workload && (clients.is_none() || g.clients == clients))
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**not met**"
    }
}

/// Issue 6's targets for this machine, each with the figure measured over gRPC (the same
/// protocol etcd speaks) and corekv native beside it.
pub fn goals_table(groups: &[Group], cx: &GoalContext) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| goal | measured (corekv gRPC; native) | verdict |");
    let _ = writeln!(s, "|---|---|---|");
    let both = |g: &Group, f: &dyn Fn(&Merged) -> String| {
        let c = g.get(Target::CorekvGrpc).map_or("–".into(), f);
        let n = g.get(Target::CorekvNative).map_or("–".into(), f);
        format!("{c}; native {n}")
    };
    if let Some(g) = find(groups, "put", Some(1)) {
        let (limit, goal) = if cx.members <= 1 {
            match cx.fsync_floor_p50_ms {
                Some(f) => (
                    1.5 * f,
                    format!("put, 1 client: p50 ≤ 1.5 × fsync floor ({:.3} ms)", 1.5 * f),
                ),
                None => (f64::NAN, "put, 1 client: p50 ≤ 1.5 × fsync floor".into()),
            }
        } else {
            let floor = cx.durable_put_floor_p50_ms.map_or(String::new(), |f| {
                format!(" (replication floor here: {f:.3} ms)")
            });
            (0.45, format!("put, 1 client: p50 ≤ 0.45 ms{floor}"))
        };
        if let Some(c) = g.get(Target::CorekvGrpc) {
            let _ = writeln!(
                s,
                "| {goal} | {} | {} |",
                both(g, &|m| format!("p50 {:.3} ms", m.p(0.5))),
                verdict(c.p(0.5) <= limit)
            );
        }
    }
    for clients in [100, 1000] {
        let Some(g) = find(groups, "put", Some(clients)) else {
            continue;
        };
        let (Some(c), Some(e)) = (g.get(Target::CorekvGrpc), g.get(Target::Etcd)) else {
            continue;
        };
        let f = |m: &Merged| {
            format!(
                "{:.2}× rate, p99 {:.2}× etcd's",
                m.per_s / e.per_s.max(1e-9),
                m.p(0.99) / e.p(0.99).max(1e-9)
            )
        };
        // Clusters at 1000 clients: issue 4's goal (rate only); otherwise issue 6's.
        let (goal, met) = if cx.members > 1 && clients == 1000 {
            (
                format!("put, {clients} clients: ≥ 3× etcd's rate"),
                c.per_s >= 3.0 * e.per_s,
            )
        } else {
            (
                format!("put, {clients} clients: ≥ 4× etcd's rate and ≤ ¼ of its p99"),
                c.per_s >= 4.0 * e.per_s && c.p(0.99) <= e.p(0.99) / 4.0,
            )
        };
        let _ = writeln!(s, "| {goal} | {} | {} |", both(g, &f), verdict(met));
    }
    for w in ["range-l", "range-s"] {
        let Some(g) = find(groups, w, Some(100)) else {
            continue;
        };
        let (Some(c), Some(e)) = (g.get(Target::CorekvGrpc), g.get(Target::Etcd)) else {
            continue;
        };
        let f = |m: &Merged| format!("{:.2}×", m.per_s / e.per_s.max(1e-9));
        let _ = writeln!(
            s,
            "| {}, 100 clients: ≥ 3× etcd | {} | {} |",
            g.label.split(',').next().unwrap_or(w),
            both(g, &f),
            verdict(c.per_s >= 3.0 * e.per_s)
        );
        if let Some((base, grown)) = cx.datasets {
            let big = groups
                .iter()
                .find(|x| x.workload == w && x.label.contains(&dataset_tag(grown)));
            if let Some(b) = big.and_then(|b| b.get(Target::CorekvGrpc)) {
                let flat = b.per_s / c.per_s.max(1e-9);
                let etcd_flat = big
                    .and_then(|b| b.get(Target::Etcd))
                    .map_or("–".into(), |be| {
                        format!("{:.2}", be.per_s / e.per_s.max(1e-9))
                    });
                let _ = writeln!(
                    s,
                    "| {w} flat as the dataset grows ({} → {} keys): rate kept ≥ 80% | {:.0}% (etcd: {}) | {} |",
                    rate(base as f64),
                    rate(grown as f64),
                    flat * 100.0,
                    etcd_flat
                        .parse::<f64>()
                        .map_or(etcd_flat.clone(), |v| format!("{:.0}%", v * 100.0)),
                    verdict(flat >= 0.8)
                );
            }
        }
    }
    if let Some(row) = watch_goal(groups) {
        s.push_str(&row);
    }
    s
}

/// The watch goal's p99 bound for corekv.
const WATCH_GOAL_P99_MS: f64 = 2.0;
/// etcd's reference figure pairs its 207k events/s with p99 12 ms (REFERENCE.md): etcd is
/// credited with the best rate it delivers within that.
const ETCD_WATCH_REFERENCE_P99_MS: f64 = 12.0;

/// The best events/s `t` delivered on the paced 1000-watcher rows with p99 within
/// `p99_ms`, with that row's p99; `None` if no row kept within it.
fn best_paced_watch(groups: &[Group], t: Target, p99_ms: f64) -> Option<(f64, f64)> {
    groups
        .iter()
        .filter(|g| g.workload == "watch-latency" && g.label.contains(" 1000 watchers"))
        .filter_map(|g| g.get(t))
        .filter(|m| m.errors == 0 && m.p(0.99) <= p99_ms)
        .map(|m| (m.per_s, m.p(0.99)))
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

/// Issue 5's "≥ 5× etcd's events/s at 1000 watchers with p99 ≤ 2 ms", read off the paced
/// rows: corekv's best rate within p99 2 ms ÷ etcd's best within its reference 12 ms. If
/// etcd kept within 12 ms at no offered rate, its capacity is below the slowest rate
/// offered, so the ratio is at least corekv's ÷ that. The unpaced row's ratio is shown
/// beside it (as fast as the writers go, latency is queueing).
fn watch_goal(groups: &[Group]) -> Option<String> {
    let paced: Vec<&Group> = groups
        .iter()
        .filter(|g| g.workload == "watch-latency" && g.label.contains(" 1000 watchers"))
        .collect();
    let unpaced = groups
        .iter()
        .find(|g| g.workload == "watch" && g.label.contains(" 1000 watchers"))
        .and_then(|g| Some((g.get(Target::CorekvGrpc)?, g.get(Target::Etcd)?)))
        .map_or(String::new(), |(c, e)| {
            format!(
                "; unpaced: {:.2}× at p99 {:.2} ms",
                c.per_s / e.per_s.max(1e-9),
                c.p(0.99)
            )
        });
    if paced.is_empty() {
        return None;
    }
    let goal = format!(
        "watch, 1000 watchers: ≥ 5× etcd's events/s, p99 ≤ {WATCH_GOAL_P99_MS} ms (paced rows: \
         corekv's best rate within p99 {WATCH_GOAL_P99_MS} ms ÷ etcd's within {ETCD_WATCH_REFERENCE_P99_MS} ms)"
    );
    let corekv = best_paced_watch(groups, Target::CorekvGrpc, WATCH_GOAL_P99_MS);
    let etcd = best_paced_watch(groups, Target::Etcd, ETCD_WATCH_REFERENCE_P99_MS);
    let slowest_etcd = paced
        .iter()
        .filter_map(|g| g.get(Target::Etcd))
        .map(|m| m.per_s)
        .min_by(f64::total_cmp);
    let (measured, met) = match (corekv, etcd, slowest_etcd) {
        (None, _, _) => (
            format!("corekv kept p99 ≤ {WATCH_GOAL_P99_MS} ms at no offered rate{unpaced}"),
            false,
        ),
        (Some((c, cp)), Some((e, ep)), _) => (
            format!(
                "{:.2}×: corekv {} events/s (p99 {cp:.2} ms) ÷ etcd {} (p99 {ep:.2} ms){unpaced}",
                c / e.max(1e-9),
                rate(c),
                rate(e)
            ),
            c >= 5.0 * e,
        ),
        (Some((c, cp)), None, Some(slowest)) => (
            format!(
                "> {:.2}×: corekv {} events/s (p99 {cp:.2} ms); etcd kept p99 ≤ {ETCD_WATCH_REFERENCE_P99_MS} ms at no rate offered (slowest: {}){unpaced}",
                c / slowest.max(1e-9),
                rate(c),
                rate(slowest)
            ),
            c >= 5.0 * slowest,
        ),
        (Some(_), None, None) => return None,
    };
    Some(format!("| {goal} | {measured} | {} |\n", verdict(met)))
}

pub fn dataset_tag(keys: u64) -> String {
    if keys >= 1_000_000 && keys.is_multiple_of(1_000_000) {
        format!("{}M keys", keys / 1_000_000)
    } else if keys >= 1000 && keys.is_multiple_of(1000) {
        format!("{}k keys", keys / 1000)
    } else {
        format!("{keys} keys")
    }
}

fn color(t: Target) -> RGBColor {
    match t {
        Target::Etcd => RGBColor(214, 39, 40),
        Target::CorekvGrpc => RGBColor(31, 119, 180),
        Target::CorekvNative => RGBColor(44, 160, 44),
    }
}

/// x = -log10(1 - q): 0 = p0, 1 = p90, 2 = p99, 3 = p99.9, 4 = p99.99.
fn percentile_label(x: &f64) -> String {
    let r = x.round();
    if (x - r).abs() > 0.01 {
        return String::new();
    }
    match r as i64 {
        0 => "p0".into(),
        1 => "p90".into(),
        2 => "p99".into(),
        3 => "p99.9".into(),
        4 => "p99.99".into(),
        _ => String::new(),
    }
}

fn curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    (0..=80)
        .map(|k| {
            let x = k as f64 * 0.05;
            let q = 1.0 - 10f64.powf(-x);
            (x, (h.value_at_quantile(q) as f64 / 1000.0).max(0.001))
        })
        .collect()
}

type PlotResult = Result<(), String>;

fn perr<E: std::fmt::Display>(e: E) -> String {
    format!("plot: {e}")
}

/// A grid of latency-percentile panels, one per workload, one curve per target.
pub fn plot_latency(path: &Path, groups: &[&Group]) -> PlotResult {
    assert!(!groups.is_empty(), "caller passes workloads to plot");
    let cols = 3usize.min(groups.len());
    let rows = groups.len().div_ceil(cols);
    let root = SVGBackend::new(path, (420 * cols as u32, 300 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(perr)?;
    let panels = root.split_evenly((rows, cols));
    for (panel, g) in panels.iter().zip(groups) {
        let curves: Vec<(Target, Vec<(f64, f64)>)> = g
            .by_target
            .iter()
            .filter(|m| !m.hist.is_empty())
            .map(|m| (m.target, curve(&m.hist)))
            .collect();
        let ys = curves.iter().flat_map(|(_, c)| c.iter().map(|p| p.1));
        let (lo, hi) = ys.fold((f64::MAX, 0.0f64), |(l, h), y| (l.min(y), h.max(y)));
        if curves.is_empty() || hi <= 0.0 {
            continue;
        }
        let mut chart = ChartBuilder::on(panel)
            .caption(&g.label, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(24)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..4f64, ((lo * 0.8).max(0.001)..hi * 1.25).log_scale())
            .map_err(perr)?;
        chart
            .configure_mesh()
            .x_labels(5)
            .x_label_formatter(&percentile_label)
            .y_labels(6)
            .light_line_style(WHITE)
            .y_desc("latency ms")
            .draw()
            .map_err(perr)?;
        for (t, points) in curves {
            let c = color(t);
            chart
                .draw_series(LineSeries::new(points, c.stroke_width(2)))
                .map_err(perr)?
                .label(t.name())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(perr)?;
    }
    root.present().map_err(perr)
}

/// Put throughput against client count, one line per target (log x).
pub fn plot_throughput(path: &Path, groups: &[&Group]) -> PlotResult {
    let mut series: Vec<(Target, Vec<(f64, f64)>)> = Vec::new();
    for g in groups {
        let Some(clients) = g.clients else { continue };
        for m in &g.by_target {
            match series.iter_mut().find(|(t, _)| *t == m.target) {
                Some((_, v)) => v.push((clients as f64, m.per_s)),
                None => series.push((m.target, vec![(clients as f64, m.per_s)])),
            }
        }
    }
    let top = series
        .iter()
        .flat_map(|(_, v)| v.iter().map(|p| p.1))
        .fold(0.0f64, f64::max);
    let right = series
        .iter()
        .flat_map(|(_, v)| v.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    assert!(!series.is_empty(), "caller passes put workloads");
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(perr)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("put throughput against clients", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d((0.8f64..right * 1.25).log_scale(), 0f64..top * 1.15 + 1.0)
        .map_err(perr)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc("clients (requests in flight)")
        .y_desc("puts/s")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
        .draw()
        .map_err(perr)?;
    for (t, mut points) in series {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let c = color(t);
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
            .map_err(perr)?
            .label(t.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
        chart
            .draw_series(points.into_iter().map(|p| Circle::new(p, 4, c.filled())))
            .map_err(perr)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(perr)?;
    root.present().map_err(perr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A merged result whose every sample took `p99_ms`.
    fn merged(target: Target, per_s: f64, p99_ms: f64) -> Merged {
        let mut hist = new_histogram();
        hist.record((p99_ms * 1000.0) as u64)
            .expect("within the histogram's bounds");
        Merged {
            target,
            hist,
            per_s,
            rounds: vec![per_s],
            errors: 0,
            first_error: None,
            cpu_us_per_op: None,
            rss_bytes: None,
            fsync_batch: None,
            bytes_per_watcher: None,
        }
    }

    /// A paced row: (etcd rate, etcd p99), (corekv rate, corekv p99).
    fn paced(puts_per_s: u64, etcd: (f64, f64), corekv: (f64, f64)) -> Group {
        Group {
            label: format!("watch-latency, 1000 watchers, {puts_per_s} puts/s"),
            workload: "watch-latency".into(),
            clients: None,
            members: 1,
            by_target: vec![
                merged(Target::Etcd, etcd.0, etcd.1),
                merged(Target::CorekvGrpc, corekv.0, corekv.1),
            ],
        }
    }

    #[test]
    fn watch_goal_takes_each_systems_best_rate_within_its_bound() {
        let groups = vec![
            paced(200, (200e3, 6.0), (200e3, 1.5)),
            paced(500, (500e3, 40.0), (500e3, 1.9)),
            paced(1000, (990e3, 90.0), (1000e3, 4.0)),
        ];
        let row = watch_goal(&groups).expect("paced rows give a goal row");
        // corekv 500k within 2 ms, etcd 200k within 12 ms: 2.5x, not met.
        assert!(row.contains("| 2.50×: corekv 500,000"), "{row}");
        assert!(row.ends_with("| **not met** |\n"), "{row}");
    }

    #[test]
    fn watch_goal_is_a_lower_bound_when_etcd_never_keeps_within_its_bound() {
        let groups = vec![
            paced(200, (200e3, 20.0), (200e3, 1.0)),
            paced(1000, (900e3, 90.0), (1000e3, 1.8)),
        ];
        let row = watch_goal(&groups).expect("paced rows give a goal row");
        assert!(row.contains("> 5.00×: corekv 1,000,000"), "{row}");
        assert!(row.ends_with("| met |\n"), "{row}");
    }

    #[test]
    fn watch_goal_is_not_met_when_corekv_never_keeps_within_2_ms() {
        let groups = vec![paced(200, (200e3, 6.0), (200e3, 2.5))];
        let row = watch_goal(&groups).expect("paced rows give a goal row");
        assert!(
            row.contains("corekv kept p99 ≤ 2 ms at no offered rate"),
            "{row}"
        );
        assert!(row.ends_with("| **not met** |\n"), "{row}");
    }

    /// A put row at `clients` on `members`: (etcd rate, p99), (corekv gRPC rate, p99).
    fn put(members: u8, clients: u64, etcd: (f64, f64), corekv: (f64, f64)) -> Group {
        Group {
            label: format!("put, {clients} clients"),
            workload: "put".into(),
            clients: Some(clients),
            members,
            by_target: vec![
                merged(Target::Etcd, etcd.0, etcd.1),
                merged(Target::CorekvGrpc, corekv.0, corekv.1),
            ],
        }
    }

    fn context(members: u8) -> GoalContext {
        GoalContext {
            members,
            fsync_floor_p50_ms: None,
            durable_put_floor_p50_ms: None,
            datasets: None,
        }
    }

    #[test]
    fn cluster_put_goal_at_1000_clients_is_three_times_etcds_rate() {
        // 3.1x etcd's rate with a p99 only half etcd's: issue 4's goal holds on a cluster,
        // the single node's (4x and a quarter of the p99) does not.
        let cluster = goals_table(&[put(3, 1000, (10e3, 200.0), (31e3, 100.0))], &context(3));
        assert!(
            cluster.contains("| put, 1000 clients: ≥ 3× etcd's rate | 3.10× rate"),
            "{cluster}"
        );
        assert!(cluster.contains("| met |"), "{cluster}");
        let single = goals_table(&[put(1, 1000, (10e3, 200.0), (31e3, 100.0))], &context(1));
        assert!(
            single.contains("≥ 4× etcd's rate and ≤ ¼ of its p99"),
            "{single}"
        );
        assert!(single.contains("| **not met** |"), "{single}");
        let short = goals_table(&[put(3, 1000, (10e3, 200.0), (29e3, 10.0))], &context(3));
        assert!(short.contains("| **not met** |"), "{short}");
    }
}
