//! History checker over a 3-member cluster under faults: concurrent put / linearizable
//! get / compare-and-swap clients spread over every member while the leader is killed
//! (SIGKILL) and restarted, and then a member is cut off by nftables. Every operation's
//! call and return times are recorded; the per-key Wing–Gong checker must find 0
//! anomalies.

mod common;
#[path = "common/linearizability.rs"]
mod linearizability;

use common::cluster::{Cluster, Partition};
use linearizability::{check, Kind, Op};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEYS: usize = 4;
const CLIENTS: usize = 6;
/// Bounded by count and by the fault schedule's end.
const MAX_OPS_PER_CLIENT: usize = 2000;

/// One client op through the corekv CLI; Ok(stdout) or Err on any failure.
fn run(ep: &str, args: &[&str], stdin: &str) -> Result<String, ()> {
    let mut child = Command::new(common::BIN)
        .args(args)
        .args(["--endpoints", ep])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|_| ())?;
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(stdin.as_bytes());
    }
    let out = child.wait_with_output().map_err(|_| ())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(())
    }
}

fn client(
    id: usize,
    endpoints: Vec<String>,
    start: Instant,
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<Vec<Op>>>,
) {
    let mut last_seen: Vec<Option<String>> = vec![None; KEYS];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (id as u64 + 1);
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for i in 0..MAX_OPS_PER_CLIENT {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let k = (next() % KEYS as u64) as usize;
        let key = format!("lin{k}");
        let ep = &endpoints[(next() % endpoints.len() as u64) as usize];
        let value = format!("c{id}-{i}");
        let choice = next() % 3;
        let call_us = start.elapsed().as_micros() as u64;
        let (kind, result) = match (choice, &last_seen[k]) {
            (0, _) | (_, None) => {
                let r = run(ep, &["put", &key, &value], "");
                (Kind::Put(value.clone()), r.map(|_| None))
            }
            (1, _) => {
                let r = run(ep, &["get", &key, "--print-value-only"], "");
                match r {
                    Ok(out) => {
                        let v = out.lines().next().map(str::to_string);
                        last_seen[k] = v.clone();
                        (Kind::Get(v), Ok(None))
                    }
                    Err(()) => continue, // an unanswered read constrains nothing
                }
            }
            (_, Some(expect)) => {
                let script = format!("value(\"{key}\") = \"{expect}\"\n\nput {key} {value}\n\n\n");
                let r = run(ep, &["txn"], &script);
                let outcome = r.as_ref().ok().map(|o| o.starts_with("SUCCESS"));
                (
                    Kind::Cas(expect.clone(), value.clone(), outcome),
                    r.map(|_| outcome),
                )
            }
        };
        let ret_us = result.is_ok().then(|| start.elapsed().as_micros() as u64);
        history.lock().unwrap().push(Op {
            key,
            kind,
            call_us,
            ret_us,
        });
    }
}

#[test]
fn put_get_cas_history_is_linearizable_under_leader_kill_and_partition() {
    if common::cluster::nft_unusable(
        "put_get_cas_history_is_linearizable_under_leader_kill_and_partition",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 111, 3, &[]);
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let (eps, stop, h) = (c.endpoints(), stop.clone(), history.clone());
            std::thread::spawn(move || client(id, eps, start, stop, h))
        })
        .collect();
    // Faults: SIGKILL the leader, restart it, then cut a member off and heal.
    std::thread::sleep(Duration::from_secs(2));
    let leader = c.leader(Duration::from_secs(10)).expect("leader");
    c.nodes[leader].kill9();
    std::thread::sleep(Duration::from_secs(3));
    c.nodes[leader].start();
    c.wait_ready(leader);
    let victim = c
        .leader(Duration::from_secs(10))
        .expect("leader after restart");
    let ips: Vec<String> = c.nodes.iter().map(|n| n.ip.clone()).collect();
    let rest: Vec<&str> = (0..3)
        .filter(|i| *i != victim)
        .map(|i| ips[i].as_str())
        .collect();
    let part = Partition::new("linearizability", &[ips[victim].as_str()], &rest);
    std::thread::sleep(Duration::from_secs(4));
    drop(part);
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.join().expect("client thread");
    }
    let history = history.lock().unwrap().clone();
    let answered = history.iter().filter(|o| o.ret_us.is_some()).count();
    let report = check(&history);
    eprintln!(
        "linearizability: {} operations ({} answered, {} unknown) on {} keys from {CLIENTS} clients checked; {} anomalies, {} undecided",
        report.ops,
        answered,
        report.ops - answered,
        report.keys,
        report.anomalies.len(),
        report.undecided.len()
    );
    assert!(answered > 100, "too few operations completed: {answered}");
    assert!(report.undecided.is_empty(), "{:?}", report.undecided);
    assert!(
        report.anomalies.is_empty(),
        "anomalies: {:?}",
        report.anomalies
    );
}
