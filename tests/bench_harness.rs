//! The benchmark harness itself (issue 6), on tiny totals against real etcd and corekv:
//! `corekv-bench suite --quick` starts both, writes a results file, a report with
//! non-empty plots and the README section, and leaves no process or data directory
//! behind; a single workload with `--spawn 3 --rounds 2` alternates the target order.
//! Needs Debian's etcd-server (installed by .ci/run); skips visibly without it unless
//! COREKV_REQUIRE_ETCD is set. Measures nothing: figures live in bench/README.md.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bench_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_corekv-bench"))
}

fn have_etcd() -> bool {
    let ok = Command::new("etcd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("COREKV_REQUIRE_ETCD").is_err(),
            "etcd missing but COREKV_REQUIRE_ETCD is set"
        );
        eprintln!("SKIPPED: apt-get install etcd-server");
    }
    ok
}

fn bench(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(bench_bin())
        .args(args)
        .args(["--work-dir", dir.to_str().unwrap()])
        .current_dir(dir)
        .output()
        .expect("run corekv-bench");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Every "spawned NAME: pids [..], data in DIR" line the tool printed.
fn spawned(stderr: &str) -> (Vec<u32>, Vec<PathBuf>) {
    let (mut pids, mut dirs) = (Vec::new(), Vec::new());
    for line in stderr.lines().filter(|l| l.starts_with("spawned ")) {
        let list = &line[line.find('[').unwrap() + 1..line.find(']').unwrap()];
        pids.extend(list.split(", ").map(|p| p.parse::<u32>().unwrap()));
        dirs.push(PathBuf::from(line.rsplit("data in ").next().unwrap()));
    }
    (pids, dirs)
}

fn assert_cleaned_up(stderr: &str, processes: usize) {
    let (pids, dirs) = spawned(stderr);
    assert_eq!(pids.len(), processes, "spawned processes reported");
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} still running"
        );
    }
    for d in dirs {
        assert!(!d.exists(), "data directory {} left behind", d.display());
    }
}

fn records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .expect("results file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[test]
fn quick_suite_writes_results_report_and_plots_and_cleans_up() {
    if !have_etcd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let readme = dir.path().join("README.md");
    std::fs::write(
        &readme,
        "# bench\nintro\n<!-- report:begin -->\nold\n<!-- report:end -->\ntail\n",
    )
    .unwrap();
    let out = bench(
        dir.path(),
        &[
            "suite",
            "--quick",
            "--spawn",
            "1",
            "--out",
            "report",
            "--results",
            "results/results.jsonl",
            "--readme",
            "README.md",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "suite failed");
    // Plaintext, then TLS deployments of both systems.
    assert_cleaned_up(&stderr, 4);
    assert!(
        stderr.contains("× Etcd (TLS)") && stderr.contains("× Corekv (TLS)"),
        "{stderr}"
    );

    let recs = records(&dir.path().join("results/results.jsonl"));
    let tls = |r: &serde_json::Value| r["label"].as_str().unwrap().ends_with("TLS");
    for target in ["etcd", "corekv-grpc", "corekv-native"] {
        let puts: Vec<_> = recs
            .iter()
            .filter(|r| r["workload"] == "put" && r["target"] == target && !tls(r))
            .collect();
        assert_eq!(puts.len(), 4, "put at 1/10/100/1000 clients on {target}");
        let secure: Vec<_> = recs
            .iter()
            .filter(|r| r["target"] == target && tls(r))
            .map(|r| r["label"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            secure,
            [
                "put, 1 client, TLS",
                "put, 1000 clients, TLS",
                "range l, 100 clients, TLS"
            ],
            "TLS rows on {target}"
        );
    }
    for r in &recs {
        assert!(r["ok"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["errors"].as_u64(), Some(0), "{r}");
        assert!(r["per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["p50_ms"].as_f64().unwrap() <= r["p99_ms"].as_f64().unwrap());
        assert!(!r["commit"].as_str().unwrap().is_empty());
        assert!(r["machine"].as_str().unwrap().contains("cores"));
        assert!(r["date"].as_str().unwrap().ends_with('Z'));
        let server = &r["server"];
        assert!(server["rss_bytes"].as_u64().unwrap() > 1 << 20, "{r}");
    }
    // Watch and keepalive go over gRPC only: no native rows for them.
    assert!(recs
        .iter()
        .any(|r| r["workload"] == "watch" && r["target"] == "etcd"));
    assert!(!recs
        .iter()
        .any(|r| r["workload"] == "watch" && r["target"] == "corekv-native"));

    let report = std::fs::read_to_string(dir.path().join("report/report.md")).unwrap();
    for needle in [
        "Headline: corekv ÷ etcd",
        "| put, 100 clients |",
        "| range l, 100 clients, 3k keys |",
        "#### Goals",
        "![latency percentiles per workload](latency-1node.svg)",
        "fsync floor",
    ] {
        assert!(report.contains(needle), "report lacks {needle:?}");
    }
    for svg in ["latency-1node.svg", "put-throughput-1node.svg"] {
        let text = std::fs::read_to_string(dir.path().join("report").join(svg)).unwrap();
        assert!(text.starts_with("<svg"), "{svg} is SVG");
        // Every target drew a curve: etcd red, corekv-grpc blue, corekv-native green.
        for stroke in ["#D62728", "#1F77B4", "#2CA02C"] {
            assert!(
                text.contains(&format!(
                    "<polyline fill=\"none\" opacity=\"1\" stroke=\"{stroke}\""
                )),
                "{svg} lacks a {stroke} curve"
            );
        }
    }
    let readme = std::fs::read_to_string(&readme).unwrap();
    assert!(readme.starts_with("# bench\nintro\n<!-- report:begin -->\n"));
    assert!(readme.ends_with("<!-- report:end -->\ntail\n"));
    assert!(!readme.contains("\nold\n"));
    assert!(readme.contains("(report/latency-1node.svg)"));
}

#[test]
fn spawned_cluster_runs_alternate_and_bad_flags_are_refused() {
    if !have_etcd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = bench(
        dir.path(),
        &[
            "put",
            "--spawn",
            "3",
            "--target",
            "etcd,corekv-grpc,corekv-native",
            "--rounds",
            "2",
            "--total",
            "300",
            "--clients",
            "10",
            "--conns",
            "3",
            "--results",
            "r.jsonl",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success());
    assert_cleaned_up(&stderr, 6);
    let recs = records(&dir.path().join("r.jsonl"));
    let order: Vec<(&str, u64)> = recs
        .iter()
        .map(|r| (r["target"].as_str().unwrap(), r["round"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        order,
        [
            ("etcd", 0),
            ("corekv-grpc", 0),
            ("corekv-native", 0),
            ("corekv-native", 1),
            ("corekv-grpc", 1),
            ("etcd", 1)
        ]
    );
    for r in &recs {
        assert_eq!(r["members"], 3);
        assert_eq!(r["ok"], 300, "{r}");
        assert_eq!(r["server"]["processes"], 3);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("| put, 10 clients |"),
        "ratio table printed"
    );

    for (args, message) in [
        (
            &["put", "--target", "etcd,corekv-grpc"][..],
            "several --target values need --spawn",
        ),
        (
            &["watch", "--target", "corekv-native"][..],
            "watch runs over gRPC only",
        ),
        (&["put", "--spawn", "4"][..], "4 is not in 1..=3"),
        (&["put", "--no-such-flag"][..], "unexpected argument"),
    ] {
        let out = bench(dir.path(), args);
        assert!(!out.status.success(), "{args:?} refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(message), "{args:?}: {err}");
    }
}
