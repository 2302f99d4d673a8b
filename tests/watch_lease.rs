//! Watch guarantees, leases, locks and elections against a real server process over the
//! native protocol.
//!
//! - A guarantee checker records every watch response of several watchers (one of them
//!   deliberately slow, so it falls back to catching up from the store) under concurrent
//!   puts, deletes and multi-key txns, and checks them against the writers' acknowledged
//!   revisions: ordered, unique, reliable (no gap), atomic (a revision never split over
//!   responses), and resumable from last revision + 1 after a disconnect.
//! - Leases: expiry deletes attached keys within TTL + election timeout; revoke deletes
//!   them in one revision; a lease outlives a SIGKILL restart.
//! - Locks: N holders increment a shared counter; the final count is N x iterations.
//! - Elections: one leader at a time; failover when the leader's lease expires.

mod common;
use common::*;
use corekv::actors::watch::WatchSpec;
use corekv::client::{block_on, Client};
use corekv::model::*;
use futures::StreamExt;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

fn put(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    }
}

/// Runs `f` with a connected client on a fresh executor.
fn with_client<T: Send + 'static, Fut>(
    ep: &str,
    f: impl FnOnce(Client) -> Fut + Send + 'static,
) -> T
where
    Fut: std::future::Future<Output = T> + 'static,
{
    let ep = ep.to_string();
    block_on(move || async move {
        let c = Client::connect(&ep).await.expect("connect");
        f(c).await
    })
    .expect("executor")
}

/// Every event of `(revision, key)` the writers produced, from their acknowledgements.
type Expected = BTreeSet<(i64, Vec<u8>)>;

/// Writes puts, deletes and 3-key txns on keys w/<writer>/<n>; returns what happened.
fn writer(ep: String, id: usize, ops: usize) -> Expected {
    with_client(&ep, move |c| async move {
        let mut done = Expected::new();
        for i in 0..ops {
            let k = |n: usize| format!("w/{id}/{}", n % 5);
            match i % 4 {
                0 | 1 => {
                    let (h, _) = c.put(&put(&k(i), &format!("v{i}"))).await.unwrap();
                    done.insert((h.revision, k(i).into_bytes()));
                }
                2 => {
                    let d = DeleteRangeRequest {
                        key: k(i).into_bytes(),
                        ..Default::default()
                    };
                    let (h, r) = c.delete(&d).await.unwrap();
                    if r.deleted > 0 {
                        done.insert((h.revision, k(i).into_bytes()));
                    }
                }
                _ => {
                    let keys = [k(i), k(i + 1), k(i + 2)];
                    let t = TxnRequest {
                        success: keys
                            .iter()
                            .map(|key| RequestOp::Put(put(key, "txn")))
                            .collect(),
                        ..Default::default()
                    };
                    let (h, _) = c.txn(&t).await.unwrap();
                    for key in keys {
                        done.insert((h.revision, key.into_bytes()));
                    }
                }
            }
        }
        done
    })
}

/// Collects a watcher's responses until it has seen revision `until` (or times out).
fn record(
    ep: String,
    spec: WatchSpec,
    until: std::sync::Arc<std::sync::atomic::AtomicI64>,
    slow: bool,
) -> Vec<WatchResponse> {
    with_client(&ep, move |c| async move {
        let mut w = c.watch(&spec);
        let mut got = Vec::new();
        let mut last = 0;
        let mut last_event_at = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            // Once the writers are done: stop at their last revision, or when nothing
            // more has come for a while (a watcher whose keys were not written last).
            let target = until.load(std::sync::atomic::Ordering::SeqCst);
            if target > 0 && (last >= target || last_event_at.elapsed() > Duration::from_secs(2)) {
                break;
            }
            let next = futures::future::select(
                w.rx.next(),
                Box::pin(glommio::timer::sleep(Duration::from_millis(200))),
            )
            .await;
            if let futures::future::Either::Left((Some(resp), _)) = next {
                if let Some(e) = resp.events.last() {
                    last = e.kv.mod_revision;
                    last_event_at = Instant::now();
                }
                got.push(resp);
                if slow {
                    glommio::timer::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        got
    })
}

/// Checks ordered / unique / atomic and returns the (revision, key) events seen.
fn check_stream(name: &str, resps: &[WatchResponse]) -> Expected {
    let mut seen = Expected::new();
    let mut last_rev = 0;
    let mut revs_in_earlier: BTreeSet<i64> = BTreeSet::new();
    for r in resps {
        assert!(!r.canceled, "{name}: canceled: {r:?}");
        let revs: BTreeSet<i64> = r.events.iter().map(|e| e.kv.mod_revision).collect();
        for e in &r.events {
            assert!(
                e.kv.mod_revision >= last_rev,
                "{name}: out of order at {}",
                e.kv.mod_revision
            );
            last_rev = e.kv.mod_revision;
            assert!(
                seen.insert((e.kv.mod_revision, e.kv.key.clone())),
                "{name}: duplicate event {} {:?}",
                e.kv.mod_revision,
                String::from_utf8_lossy(&e.kv.key)
            );
        }
        for rev in &revs {
            assert!(
                !revs_in_earlier.contains(rev),
                "{name}: revision {rev} split over responses"
            );
        }
        revs_in_earlier.extend(revs);
    }
    seen
}

#[test]
fn watch_guarantees_under_concurrent_writes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &SMALL_WAL);
    let ep = s.endpoint();
    let start = with_client(&ep, |c| async move {
        c.put(&put("start", "x")).await.unwrap().0.revision
    });
    let until = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let specs = [
        (
            "prefix",
            WatchSpec {
                key: b"w/".to_vec(),
                range_end: prefix_end(b"w/"),
                start_rev: start + 1,
                prev_kv: true,
                ..Default::default()
            },
        ),
        (
            "slow",
            WatchSpec {
                key: b"w/".to_vec(),
                range_end: prefix_end(b"w/"),
                start_rev: start + 1,
                ..Default::default()
            },
        ),
        (
            "key",
            WatchSpec {
                key: b"w/1/2".to_vec(),
                start_rev: start + 1,
                ..Default::default()
            },
        ),
        (
            "range",
            WatchSpec {
                key: b"w/0".to_vec(),
                range_end: b"w/2".to_vec(),
                start_rev: start + 1,
                ..Default::default()
            },
        ),
    ];
    let watchers: Vec<_> = specs
        .iter()
        .map(|(name, spec)| {
            let (ep, spec, until, slow) =
                (ep.clone(), spec.clone(), until.clone(), *name == "slow");
            (
                name.to_string(),
                spec.clone(),
                std::thread::spawn(move || record(ep, spec, until, slow)),
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let writers: Vec<_> = (0..4)
        .map(|id| {
            let ep = ep.clone();
            std::thread::spawn(move || writer(ep, id, 200))
        })
        .collect();
    let mut expected = Expected::new();
    for w in writers {
        expected.extend(w.join().unwrap());
    }
    let last = expected.iter().map(|(r, _)| *r).max().unwrap();
    until.store(last, std::sync::atomic::Ordering::SeqCst);
    let mut checked = 0;
    for (name, spec, handle) in watchers {
        let resps = handle.join().unwrap();
        let seen = check_stream(&name, &resps);
        let want: Expected = expected
            .iter()
            .filter(|(_, k)| in_range(k, &spec.key, &spec.range_end))
            .cloned()
            .collect();
        assert_eq!(
            seen, want,
            "{name}: events differ from the acknowledged writes (gap or extra)"
        );
        if name == "prefix" {
            // prev_kv: every put of a key that existed carries its previous value.
            let with_prev = resps
                .iter()
                .flat_map(|r| &r.events)
                .filter(|e| e.prev_kv.is_some())
                .count();
            assert!(with_prev > 0, "prev_kv requested but never present");
        }
        checked += seen.len();
    }
    eprintln!("watch checker: {checked} events over 4 watchers, 0 anomalies");

    // Resumable: a watcher that saw up to revision R resumes from R + 1 and sees
    // exactly the writes it missed.
    let mid = last;
    let missed = writer(ep.clone(), 9, 40);
    let resumed = record(
        ep.clone(),
        WatchSpec {
            key: b"w/9/".to_vec(),
            range_end: prefix_end(b"w/9/"),
            start_rev: mid + 1,
            ..Default::default()
        },
        std::sync::Arc::new(std::sync::atomic::AtomicI64::new(
            missed.iter().map(|(r, _)| *r).max().unwrap(),
        )),
        false,
    );
    assert_eq!(check_stream("resumed", &resumed), missed);

    // A start revision below the compaction point is canceled with compact_revision.
    with_client(&ep, move |c| async move {
        c.compact(mid, false).await.unwrap();
        let mut w = c.watch(&WatchSpec {
            key: b"w/".to_vec(),
            range_end: prefix_end(b"w/"),
            start_rev: start,
            ..Default::default()
        });
        let mut canceled = None;
        while let Some(r) = w.rx.next().await {
            if r.canceled {
                canceled = Some(r);
                break;
            }
        }
        let r = canceled.expect("compacted watch must be canceled");
        assert_eq!(r.compact_revision, mid);
    });
}

#[test]
fn leases_expire_revoke_atomically_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), &SMALL_WAL);
    let ep = s.endpoint();
    // Expiry: TTL 2 s, no keepalive; election timeout is 1 s.
    let granted = Instant::now();
    let watch_rev = with_client(&ep, |c| async move {
        let (h, id, ttl) = c.lease_grant(0, 2).await.unwrap();
        assert_eq!(ttl, 2);
        for k in ["e/a", "e/b", "e/c"] {
            c.put(&PutRequest {
                lease: id,
                ..put(k, "v")
            })
            .await
            .unwrap();
        }
        let (_, t) = c.lease_time_to_live(id, true).await.unwrap();
        assert_eq!(
            t.keys,
            vec![b"e/a".to_vec(), b"e/b".to_vec(), b"e/c".to_vec()]
        );
        h.revision + 1
    });
    let deleted = with_client(&ep, move |c| async move {
        let mut w = c.watch(&WatchSpec {
            key: b"e/".to_vec(),
            range_end: prefix_end(b"e/"),
            start_rev: watch_rev,
            no_put: true,
            ..Default::default()
        });
        loop {
            let r = w.rx.next().await.expect("watch ended");
            if !r.events.is_empty() {
                return r.events;
            }
        }
    });
    let took = granted.elapsed();
    assert!(
        took < Duration::from_millis(2000 + 1000 + 1500),
        "expiry took {took:?}"
    );
    assert_eq!(
        deleted.len(),
        3,
        "all attached keys deleted in one response: {deleted:?}"
    );
    assert!(
        deleted
            .iter()
            .all(|e| e.kv.mod_revision == deleted[0].kv.mod_revision),
        "one revision"
    );
    eprintln!("lease TTL 2 s expired after {took:?}");

    // Revoke: attached keys go in one revision; the lease is gone.
    with_client(&ep, |c| async move {
        let (_, id, _) = c.lease_grant(0, 60).await.unwrap();
        for k in ["r/a", "r/b"] {
            c.put(&PutRequest {
                lease: id,
                ..put(k, "v")
            })
            .await
            .unwrap();
        }
        let (h, _) = c.put(&put("r/c", "no lease")).await.unwrap();
        let before = h.revision;
        let h = c.lease_revoke(id).await.unwrap();
        assert_eq!(h.revision, before + 1, "revoke is one revision");
        let all = RangeRequest {
            key: b"r/".to_vec(),
            range_end: prefix_end(b"r/"),
            ..Default::default()
        };
        let (_, r) = c.range(&all).await.unwrap();
        assert_eq!(
            r.kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(),
            vec![b"r/c".to_vec()]
        );
        assert_eq!(
            c.lease_revoke(id).await.unwrap_err(),
            corekv::error::KvError::LeaseNotFound
        );
        assert_eq!(c.lease_keepalive(id).await.unwrap().1, 0);
        let bad = PutRequest {
            lease: id,
            ..put("r/d", "v")
        };
        assert_eq!(
            c.put(&bad).await.unwrap_err(),
            corekv::error::KvError::LeaseNotFound
        );
    });

    // A lease outlives a SIGKILL restart, and keepalives still work afterwards.
    let id = with_client(&ep, |c| async move {
        let (_, id, _) = c.lease_grant(0, 30).await.unwrap();
        c.put(&PutRequest {
            lease: id,
            ..put("kept", "v")
        })
        .await
        .unwrap();
        id
    });
    s.kill9();
    s.restart();
    let ep = s.endpoint();
    with_client(&ep, move |c| async move {
        let (_, t) = c.lease_time_to_live(id, true).await.unwrap();
        assert!(t.ttl_secs > 0 && t.granted_ttl_secs == 30, "{t:?}");
        assert_eq!(t.keys, vec![b"kept".to_vec()]);
        assert_eq!(c.lease_keepalive(id).await.unwrap().1, 30);
    });
}

#[test]
fn lock_excludes_and_election_fails_over() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &SMALL_WAL);
    let ep = s.endpoint();
    const HOLDERS: usize = 4;
    const ITERATIONS: usize = 10;
    let holders: Vec<_> = (0..HOLDERS)
        .map(|_| {
            let ep = ep.clone();
            std::thread::spawn(move || {
                with_client(&ep, |c| async move {
                    let (_, lease, _) = c.lease_grant(0, 30).await.unwrap();
                    for _ in 0..ITERATIONS {
                        let (_, key) = c.lock(b"counter-lock", lease).await.unwrap();
                        let get = RangeRequest {
                            key: b"counter".to_vec(),
                            ..Default::default()
                        };
                        let (_, r) = c.range(&get).await.unwrap();
                        let n: usize = r
                            .kvs
                            .first()
                            .map_or(0, |kv| String::from_utf8_lossy(&kv.value).parse().unwrap());
                        // Widen the race window: without exclusion, increments get lost.
                        glommio::timer::sleep(Duration::from_millis(2)).await;
                        c.put(&put("counter", &(n + 1).to_string())).await.unwrap();
                        c.unlock(&key).await.unwrap();
                    }
                })
            })
        })
        .collect();
    for h in holders {
        h.join().unwrap();
    }
    let total = with_client(&ep, |c| async move {
        let (_, r) = c
            .range(&RangeRequest {
                key: b"counter".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap();
        String::from_utf8_lossy(&r.kvs[0].value)
            .parse::<usize>()
            .unwrap()
    });
    assert_eq!(
        total,
        HOLDERS * ITERATIONS,
        "lost increments: mutual exclusion broken"
    );
    eprintln!("lock: {HOLDERS} holders x {ITERATIONS} increments = {total}");

    // Election: the first campaigner leads; a second waits until the first's lease
    // expires (no keepalive), then leads. Observers see both, in order.
    let ep2 = ep.clone();
    let observer = std::thread::spawn(move || {
        with_client(&ep2, |c| async move {
            let mut w = c.observe(b"elect");
            let mut leaders = Vec::new();
            while leaders.len() < 2 {
                let r = w.rx.next().await.expect("observe ended");
                for e in r.events {
                    leaders.push(String::from_utf8_lossy(&e.kv.value).into_owned());
                }
            }
            leaders
        })
    });
    let first = with_client(&ep, |c| async move {
        let (_, lease, _) = c.lease_grant(0, 2).await.unwrap();
        c.campaign(b"elect", lease, b"first").await.unwrap().1
    });
    let ep3 = ep.clone();
    let second = std::thread::spawn(move || {
        with_client(&ep3, |c| async move {
            // TTL 60 s outlasts the ~2 s wait; no keepalive needed.
            let (_, lease, _) = c.lease_grant(0, 60).await.unwrap();
            let t0 = Instant::now();
            let (_, leader) = c.campaign(b"elect", lease, b"second").await.unwrap();
            (leader, t0.elapsed())
        })
    });
    let (leader2, waited) = second.join().unwrap();
    assert_ne!(first.key, leader2.key);
    assert!(
        waited >= Duration::from_millis(500),
        "second became leader while the first led ({waited:?})"
    );
    let now = with_client(&ep, |c| async move { c.leader(b"elect").await.unwrap().1 });
    assert_eq!(now.value, b"second".to_vec());
    assert_eq!(
        observer.join().unwrap(),
        vec!["first".to_string(), "second".to_string()]
    );
    eprintln!("election: failover after {waited:?}");
}
