//! A shard must never sleep through a wake-up from the gRPC thread. A change to glommio's
//! reactor (preemption timers kept armed across loop turns, the ring link submitted with
//! the wait) made a shard miss one under a serializable-range load: every request routed
//! to it hung until some timer of its own fired, minutes later. The load that showed it
//! (the bench suite's "range s, 100 clients") runs here against a real server; each run
//! took 2-3 s when nothing hung.

mod common;

use common::Server;
use std::process::Command;
use std::time::{Duration, Instant};

const BENCH: &str = env!("CARGO_BIN_EXE_corekv-bench");

/// Runs corekv-bench with a deadline; returns its table line.
fn bench(args: &[&str], deadline: Duration) -> String {
    let mut child = Command::new(BENCH)
        .args(args)
        .arg("--no-results")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start corekv-bench");
    let started = Instant::now();
    // Bounded: polled every 50 ms until the deadline.
    loop {
        if child.try_wait().expect("poll corekv-bench").is_some() {
            break;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} did not finish within {deadline:?}: requests hung");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("corekv-bench output");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn serializable_range_load_never_hangs_a_shard() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let ep = server.grpc_endpoint();
    let common = ["--endpoints", ep.as_str(), "--target", "corekv-grpc"];
    let load = [
        "--clients",
        "100",
        "--conns",
        "10",
        "--key-space-size",
        "20000",
    ];
    bench(
        &[
            &["put"][..],
            &common,
            &load,
            &["--total", "20000", "--sequential-keys"],
        ]
        .concat(),
        Duration::from_secs(60),
    );
    for run in 0..5 {
        let line = bench(
            &[
                &["range"][..],
                &common,
                &load,
                &["--total", "60000", "--consistency", "s"],
            ]
            .concat(),
            Duration::from_secs(40),
        );
        // Every request answered, none lost to the histogram's 60 s bound.
        assert!(line.contains("ok 60000 "), "run {run}: {line}");
    }
}
