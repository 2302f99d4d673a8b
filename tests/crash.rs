//! Crash safety with real processes: a writer streams puts and multi-key txns at a
//! running server, the server is SIGKILLed mid-stream, and after every restart each
//! acknowledged write is present at its revision, no txn is half-applied and revisions
//! continue upward.

mod common;
use common::*;
use corekv::client::{block_on, Client};
use corekv::model::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// An acknowledged write: key -> (value, mod revision).
type Acked = HashMap<String, (String, i64)>;

/// Streams writes from `concurrency` tasks until the server dies or `stop` is set.
fn write_until_dead(ep: String, round: usize, stop: Arc<AtomicBool>) -> (Acked, Vec<usize>) {
    block_on(move || async move {
        let client = match Client::connect(&ep).await {
            Ok(c) => std::rc::Rc::new(c),
            Err(_) => return (Acked::new(), Vec::new()),
        };
        let acked = std::rc::Rc::new(std::cell::RefCell::new(Acked::new()));
        let txns = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let mut tasks = Vec::new();
        for t in 0..16usize {
            let (client, acked, txns, stop) =
                (client.clone(), acked.clone(), txns.clone(), stop.clone());
            tasks.push(glommio::spawn_local(async move {
                // Bounded: a few thousand writes per task at most.
                for i in 0..5000usize {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let n = t * 100_000 + i;
                    if i % 4 == 3 {
                        let puts = ["a", "b", "c"]
                            .iter()
                            .map(|s| {
                                RequestOp::Put(PutRequest {
                                    key: format!("r{round}/txn{n}/{s}").into_bytes(),
                                    value: format!("v{n}").into_bytes(),
                                    ..Default::default()
                                })
                            })
                            .collect();
                        let req = TxnRequest {
                            success: puts,
                            ..Default::default()
                        };
                        match client.txn(&req).await {
                            Ok((h, r)) => {
                                assert!(r.succeeded);
                                let mut a = acked.borrow_mut();
                                for s in ["a", "b", "c"] {
                                    a.insert(
                                        format!("r{round}/txn{n}/{s}"),
                                        (format!("v{n}"), h.revision),
                                    );
                                }
                                txns.borrow_mut().push(n);
                            }
                            Err(e) => {
                                eprintln!("writer: {e}");
                                break;
                            }
                        }
                    } else {
                        let key = format!("r{round}/put{n}");
                        let req = PutRequest {
                            key: key.clone().into_bytes(),
                            value: format!("v{n}").into_bytes(),
                            ..Default::default()
                        };
                        match client.put(&req).await {
                            Ok((h, _)) => {
                                acked
                                    .borrow_mut()
                                    .insert(key, (format!("v{n}"), h.revision));
                            }
                            Err(e) => {
                                eprintln!("writer: {e}");
                                break;
                            }
                        }
                    }
                }
            }));
        }
        futures::future::join_all(tasks).await;
        let a = acked.borrow().clone();
        let t = txns.borrow().clone();
        (a, t)
    })
    .expect("writer executor")
}

fn read_all(ep: &str) -> (HashMap<String, (String, i64)>, i64) {
    let ep = ep.to_string();
    block_on(move || async move {
        let c = Client::connect(&ep).await.expect("connect after restart");
        let (h, r) = c
            .range(&RangeRequest {
                key: vec![0],
                range_end: vec![0],
                ..Default::default()
            })
            .await
            .expect("range all");
        let map = r
            .kvs
            .into_iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    (
                        String::from_utf8_lossy(&kv.value).into_owned(),
                        kv.mod_revision,
                    ),
                )
            })
            .collect();
        (map, h.revision)
    })
    .expect("reader executor")
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments and frequent checkpoints: crashes land around rotation and release.
    let mut s = Server::start(
        &dir.path().join("d"),
        &["--wal-segment-bytes", "1048576", "--snapshot-count", "300"],
    );
    let mut all_acked = Acked::new();
    let mut last_rev = 0i64;
    for round in 0..4 {
        let stop = Arc::new(AtomicBool::new(false));
        let ep = s.endpoint();
        let st = stop.clone();
        let writer = std::thread::spawn(move || write_until_dead(ep, round, st));
        std::thread::sleep(Duration::from_millis(400 + 150 * round as u64));
        s.kill9();
        stop.store(true, Ordering::Relaxed);
        let (acked, txns) = writer.join().expect("writer thread");
        assert!(
            acked.len() > 50,
            "round {round}: writer made little progress ({})",
            acked.len()
        );
        all_acked.extend(acked);

        s.restart();
        let (store, rev) = read_all(&s.endpoint());
        for (k, (v, r)) in &all_acked {
            let got = store
                .get(k)
                .unwrap_or_else(|| panic!("round {round}: acknowledged {k} lost"));
            assert_eq!(&got.0, v, "value of {k}");
            assert_eq!(got.1, *r, "revision of {k}");
        }
        // Every txn in the store is whole, acknowledged or not.
        let mut groups: HashMap<String, usize> = HashMap::new();
        for k in store.keys().filter(|k| k.contains("/txn")) {
            let g = k
                .rsplit_once('/')
                .map(|(g, _)| g.to_string())
                .unwrap_or_default();
            *groups.entry(g).or_default() += 1;
        }
        for (g, n) in groups {
            assert_eq!(n, 3, "round {round}: txn {g} half-applied");
        }
        assert!(!txns.is_empty() || round > 0);
        assert!(rev >= last_rev, "revision went back: {rev} < {last_rev}");
        let max_acked = all_acked.values().map(|(_, r)| *r).max().unwrap_or(0);
        assert!(rev >= max_acked);
        // New writes continue above everything seen.
        let out = s.ok(&["put", "after-restart", "x", "-w", "json"]);
        let new_rev = json(&out)["header"]["revision"].as_i64().unwrap();
        assert!(
            new_rev > rev,
            "revision must continue upward: {new_rev} <= {rev}"
        );
        last_rev = new_rev;
    }
    // Checkpoints released old segments: segment 0 is gone, a later one is the oldest.
    // How much the crash rounds wrote depends on timing, so write a fixed 3 MiB more
    // (several 1 MiB segments, ten checkpoints) before looking.
    let ep = s.endpoint();
    block_on(move || async move {
        let c = Client::connect(&ep).await.expect("connect");
        for i in 0..3000 {
            let put = PutRequest {
                key: format!("fill/{i}").into_bytes(),
                value: vec![b'f'; 1024],
                ..Default::default()
            };
            c.put(&put).await.expect("fill put");
        }
    })
    .expect("fill executor");
    std::thread::sleep(Duration::from_millis(500)); // release follows the checkpoint
    let wal = dir.path().join("d/member/wal");
    let seqs: Vec<u64> = std::fs::read_dir(&wal)
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().to_string();
            let stem = name.strip_suffix(".wal")?;
            u64::from_str_radix(stem.split('-').next()?, 16).ok()
        })
        .collect();
    let oldest = seqs.iter().min().copied().expect("a segment");
    let newest = seqs.iter().max().copied().expect("a segment");
    assert!(
        newest >= 2,
        "the test wrote several 1 MiB segments ({seqs:?})"
    );
    assert!(
        oldest > 0,
        "no segment was released after checkpoints ({seqs:?})"
    );
}
