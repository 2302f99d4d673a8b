//! The tuning experiments (tuning/*.sh) run end to end with tiny settings against real
//! corekv processes, so the scripts users rerun keep working. They measure nothing here:
//! the test checks that every scenario produced a row of numbers and that nothing they
//! started is left running.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin_dir() -> PathBuf {
    let corekv = PathBuf::from(env!("CARGO_BIN_EXE_corekv"));
    let dir = corekv.parent().expect("binary in a dir").to_path_buf();
    assert!(
        dir.join("corekv-bench").exists(),
        "corekv-bench beside corekv"
    );
    dir
}

/// Runs a script from tuning/ and returns its table rows for `target`.
fn run_script(script: &str, args: &[&str], target: &str) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(root.join("tuning").join(script))
        .args(args)
        .args(["--dir", work.path().to_str().unwrap()])
        .env("COREKV_BIN_DIR", bin_dir())
        .output()
        .expect("run the script");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing the script started may outlive it.
    let ps = Command::new("pgrep")
        .args(["-f", work.path().to_str().unwrap()])
        .output()
        .expect("pgrep");
    assert!(
        ps.stdout.is_empty(),
        "{script} left processes: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
    stdout
        .lines()
        .filter(|l| l.contains(&format!("| {target} |")))
        .map(str::to_string)
        .collect()
}

fn number(cell: &str) -> f64 {
    cell.trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {cell:?}"))
}

#[test]
fn ionice_script_measures_every_scenario() {
    let rows = run_script(
        "ionice.sh",
        &["--targets", "corekv", "--total", "40", "--noise-mib", "8"],
        "corekv",
    );
    // The script skips the realtime class without root.
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    let scenarios: &[&str] = if root {
        &[
            "quiet",
            "default",
            "be0 -p",
            "rt threads",
            "rt launch",
            "idle noise",
        ]
    } else {
        &["quiet", "default", "be0 -p", "idle noise"]
    };
    for s in scenarios {
        for clients in ["1", "10"] {
            let row = rows
                .iter()
                .find(|r| r.starts_with(&format!("| {s} | corekv | {clients} |")))
                .unwrap_or_else(|| panic!("no row for {s}, {clients} clients in {rows:#?}"));
            let cells: Vec<&str> = row.split('|').collect();
            // | scenario | target | clients | puts/s | p50 | p99 | max | classes |
            assert!(number(cells[4]) > 0.0, "{row}");
            let (p50, p99) = (number(cells[5]), number(cells[6]));
            assert!(p50 > 0.0 && p50 <= p99, "{row}");
        }
    }
    // The guides' `ionice -p PID` reaches the main thread only.
    let be0 = rows.iter().find(|r| r.starts_with("| be0 -p |")).unwrap();
    assert!(be0.contains("1 best-effort: prio 0"), "{be0}");
}

#[test]
fn heartbeat_script_measures_failover() {
    let rows = run_script(
        "heartbeat.sh",
        &[
            "--targets",
            "corekv",
            "--settings",
            "50:500",
            "--kills",
            "2",
            "--idle-s",
            "1",
        ],
        "corekv",
    );
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let cells: Vec<&str> = rows[0].split('|').collect();
    // | target | heartbeat | election | failover each | median | elections |
    assert_eq!(number(cells[2]), 50.0);
    let failovers: Vec<f64> = cells[4].split_whitespace().map(number).collect();
    assert_eq!(failovers.len(), 2, "{}", rows[0]);
    // A survivor can only take over after missing the leader for an election timeout,
    // and corekv's test suite holds failover within 2 of them (plus polling here).
    for f in failovers {
        assert!((400.0..5000.0).contains(&f), "{}", rows[0]);
    }
    number(cells[6]);
}

/// Processes holding /dev/cpu_dma_latency open (each holds a PM QoS request).
fn qos_holders() -> usize {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    procs
        .flatten()
        .filter_map(|p| std::fs::read_dir(p.path().join("fd")).ok())
        .flat_map(|fds| fds.flatten())
        .filter(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|t| t == Path::new("/dev/cpu_dma_latency"))
        })
        .count()
}

#[test]
fn idle_script_measures_one_and_three_members() {
    let holders_before = qos_holders();
    let rows = run_script(
        "idle.sh",
        &[
            "--targets",
            "corekv",
            "--modes",
            "default dma0",
            "--members",
            "1 3",
            "--total",
            "60",
        ],
        "corekv",
    );
    let writable = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/cpu_dma_latency")
        .is_ok();
    let modes: &[&str] = if writable {
        &["default", "dma0"]
    } else {
        &["default"]
    };
    for mode in modes {
        for members in ["1", "3"] {
            let row = rows
                .iter()
                .find(|r| r.starts_with(&format!("| {mode} | corekv | {members} |")))
                .unwrap_or_else(|| panic!("no row for {mode}, {members} members in {rows:#?}"));
            let cells: Vec<&str> = row.split('|').collect();
            // | mode | target | members | puts/s | p50 | p90 | p99 | polling % |
            assert!(number(cells[4]) > 0.0, "{row}");
            let (p50, p90, p99) = (number(cells[5]), number(cells[6]), number(cells[7]));
            assert!(p50 > 0.0 && p50 <= p90 && p90 <= p99, "{row}");
            number(cells[8].trim().trim_end_matches('%'));
        }
    }
    // The PM QoS request ends with the script.
    assert_eq!(qos_holders(), holders_before);
}
