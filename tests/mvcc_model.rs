//! Model-based property test: random put / delete / txn / compact / range sequences run
//! against the LMDB MVCC store and a plain in-memory model of etcd's semantics,
//! including reads at old revisions and after compaction, leases (grant, attach, revoke)
//! and the watch events each write produces (live and replayed from the store).

use corekv::error::KvError;
use corekv::model::*;
use corekv::storage::backend::Backend;
use corekv::storage::mvcc::{self, Applier};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

type Snapshot = BTreeMap<Vec<u8>, KeyValue>;

#[derive(Default)]
struct Model {
    rev: i64,
    compacted: i64,
    /// State after each revision (index = revision).
    history: Vec<Snapshot>,
    leases: BTreeSet<i64>,
}

impl Model {
    fn new() -> Model {
        Model {
            rev: 1,
            compacted: 0,
            history: vec![Snapshot::new(), Snapshot::new()],
            leases: BTreeSet::new(),
        }
    }
    fn current(&self) -> Snapshot {
        self.history[self.rev as usize].clone()
    }
    fn commit(&mut self, s: Snapshot) {
        self.rev += 1;
        self.history.push(s);
    }
    fn put(s: &mut Snapshot, key: &[u8], value: &[u8], lease: i64, main: i64) {
        let kv = match s.get(key) {
            Some(old) => KeyValue {
                value: value.to_vec(),
                mod_revision: main,
                version: old.version + 1,
                lease,
                ..old.clone()
            },
            None => KeyValue {
                key: key.to_vec(),
                value: value.to_vec(),
                create_revision: main,
                mod_revision: main,
                version: 1,
                lease,
            },
        };
        s.insert(key.to_vec(), kv);
    }
    fn delete(s: &mut Snapshot, key: &[u8], end: &[u8]) -> usize {
        let doomed: Vec<Vec<u8>> = s
            .keys()
            .filter(|k| in_range(k, key, end))
            .cloned()
            .collect();
        for k in &doomed {
            s.remove(k);
        }
        doomed.len()
    }
    fn compare(s: &Snapshot, c: &Compare) -> bool {
        let kvs: Vec<&KeyValue> = s
            .values()
            .filter(|kv| in_range(&kv.key, &c.key, &c.range_end))
            .collect();
        let holds = |kv: &KeyValue| {
            let ord = match &c.target {
                CompareTarget::Version(v) => kv.version.cmp(v),
                CompareTarget::Value(v) => kv.value.as_slice().cmp(v.as_slice()),
                CompareTarget::Mod(v) => kv.mod_revision.cmp(v),
                CompareTarget::Create(v) => kv.create_revision.cmp(v),
                CompareTarget::Lease(v) => kv.lease.cmp(v),
            };
            match c.result {
                CompareResult::Equal => ord.is_eq(),
                CompareResult::NotEqual => ord.is_ne(),
                CompareResult::Greater => ord.is_gt(),
                CompareResult::Less => ord.is_lt(),
            }
        };
        if kvs.is_empty() {
            return !matches!(c.target, CompareTarget::Value(_)) && holds(&KeyValue::default());
        }
        kvs.into_iter().all(holds)
    }
    /// Applies a write; returns the model's answer.
    fn apply(&mut self, req: &WriteRequest) -> Result<(), KvError> {
        let main = self.rev + 1;
        match req {
            WriteRequest::Put(p) => {
                if p.lease != 0 && !self.leases.contains(&p.lease) {
                    return Err(KvError::LeaseNotFound);
                }
                let mut s = self.current();
                Model::put(&mut s, &p.key, &p.value, p.lease, main);
                self.commit(s);
            }
            WriteRequest::LeaseGrant { id, .. } => {
                if !self.leases.insert(*id) {
                    return Err(KvError::LeaseExist);
                }
            }
            WriteRequest::LeaseRevoke { id } => {
                if !self.leases.remove(id) {
                    return Err(KvError::LeaseNotFound);
                }
                let mut s = self.current();
                let before = s.len();
                s.retain(|_, kv| kv.lease != *id);
                if s.len() != before {
                    self.commit(s);
                }
            }
            WriteRequest::DeleteRange(d) => {
                let mut s = self.current();
                if Model::delete(&mut s, &d.key, &d.range_end) > 0 {
                    self.commit(s);
                }
            }
            WriteRequest::Txn(t) => {
                let mut s = self.current();
                let ok = t.compare.iter().all(|c| Model::compare(&s, c));
                let ops = if ok { &t.success } else { &t.failure };
                let mut wrote = false;
                for op in ops {
                    match op {
                        RequestOp::Put(p) => {
                            Model::put(&mut s, &p.key, &p.value, p.lease, main);
                            wrote = true;
                        }
                        RequestOp::DeleteRange(d) => {
                            wrote |= Model::delete(&mut s, &d.key, &d.range_end) > 0
                        }
                        _ => {}
                    }
                }
                if wrote {
                    self.commit(s);
                }
            }
            WriteRequest::Compact(c) => {
                if c.revision > self.rev {
                    return Err(KvError::FutureRev);
                }
                if c.revision <= self.compacted {
                    return Err(KvError::Compacted);
                }
                self.compacted = c.revision;
            }
            WriteRequest::Alarm(_)
            | WriteRequest::LeaseCheckpoint(_)
            | WriteRequest::PublishMember { .. }
            | WriteRequest::Auth(_) => {}
        }
        Ok(())
    }
    /// The events of revision `r`, from the difference between its state and the one
    /// before, in key order.
    fn events_at(&self, r: usize) -> Vec<Event> {
        let (old, new) = (&self.history[r - 1], &self.history[r]);
        let keys: BTreeSet<&Vec<u8>> = old.keys().chain(new.keys()).collect();
        let mut out = Vec::new();
        for k in keys {
            match (old.get(k), new.get(k)) {
                (prev, Some(kv)) if prev != Some(kv) => out.push(Event {
                    kind: EventKind::Put,
                    kv: kv.clone(),
                    prev_kv: prev.cloned(),
                }),
                (Some(prev), None) => out.push(Event {
                    kind: EventKind::Delete,
                    kv: KeyValue {
                        key: k.clone(),
                        mod_revision: r as i64,
                        ..Default::default()
                    },
                    prev_kv: Some(prev.clone()),
                }),
                _ => {}
            }
        }
        out
    }
    fn range(
        &self,
        key: &[u8],
        end: &[u8],
        rev: i64,
        limit: i64,
    ) -> Result<RangeResponse, KvError> {
        let at = if rev <= 0 { self.rev } else { rev };
        if at > self.rev {
            return Err(KvError::FutureRev);
        }
        if rev > 0 && at < self.compacted {
            return Err(KvError::Compacted);
        }
        let all: Vec<KeyValue> = self.history[at as usize]
            .values()
            .filter(|kv| in_range(&kv.key, key, end))
            .cloned()
            .collect();
        let count = all.len() as i64;
        let more = limit > 0 && all.len() > limit as usize;
        let kvs = if more {
            all[..limit as usize].to_vec()
        } else {
            all
        };
        Ok(RangeResponse { kvs, more, count })
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write(WriteRequest),
    Range {
        key: Vec<u8>,
        end: Vec<u8>,
        rev_back: i64,
        limit: i64,
    },
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(vec!["a", "b", "ba", "bb", "c", "d"]).prop_map(|s| s.as_bytes().to_vec())
}

fn end_for() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        Just(b"c".to_vec()),
        Just(vec![0]),
        Just(b"bc".to_vec()),
    ]
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(vec!["x", "y", "z"]).prop_map(|s| s.as_bytes().to_vec())
}

fn op() -> impl Strategy<Value = Op> {
    let put = (key(), value(), 0i64..4).prop_map(|(k, v, lease)| {
        Op::Write(WriteRequest::Put(PutRequest {
            key: k,
            value: v,
            lease,
            ..Default::default()
        }))
    });
    let grant = (1i64..4).prop_map(|id| Op::Write(WriteRequest::LeaseGrant { id, ttl_secs: 5 }));
    let revoke = (1i64..4).prop_map(|id| Op::Write(WriteRequest::LeaseRevoke { id }));
    let del = (key(), end_for()).prop_map(|(k, e)| {
        Op::Write(WriteRequest::DeleteRange(DeleteRangeRequest {
            key: k,
            range_end: e,
            prev_kv: false,
        }))
    });
    let txn = (
        key(),
        value(),
        0i64..3,
        prop::collection::btree_set(key(), 1..3),
        value(),
    )
        .prop_map(|(ck, cv, ver, keys, v)| {
            let compare = vec![
                Compare {
                    key: ck.clone(),
                    range_end: vec![],
                    target: CompareTarget::Version(ver),
                    result: CompareResult::Greater,
                },
                Compare {
                    key: ck,
                    range_end: vec![],
                    target: CompareTarget::Value(cv),
                    result: CompareResult::NotEqual,
                },
            ];
            let success = keys
                .into_iter()
                .map(|k| {
                    RequestOp::Put(PutRequest {
                        key: k,
                        value: v.clone(),
                        ..Default::default()
                    })
                })
                .collect();
            let failure = vec![RequestOp::DeleteRange(DeleteRangeRequest {
                key: b"b".to_vec(),
                range_end: b"c".to_vec(),
                prev_kv: false,
            })];
            Op::Write(WriteRequest::Txn(TxnRequest {
                compare,
                success,
                failure,
            }))
        });
    let compact = (0i64..4).prop_map(|back| {
        Op::Write(WriteRequest::Compact(CompactionRequest {
            revision: -back,
            physical: false,
        }))
    });
    let range =
        (key(), end_for(), 0i64..6, 0i64..3).prop_map(|(key, end, rev_back, limit)| Op::Range {
            key,
            end,
            rev_back,
            limit,
        });
    prop_oneof![3 => put, 2 => del, 2 => txn, 1 => compact, 3 => range, 1 => grant, 1 => revoke]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn mvcc_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let b = Backend::open(dir.path(), 64 << 20).unwrap();
        let mut model = Model::new();
        for op in ops {
            match op {
                Op::Write(mut req) => {
                    // Compactions are generated relative to the current revision.
                    if let WriteRequest::Compact(c) = &mut req {
                        c.revision += model.rev;
                    }
                    let mut a = Applier::begin(&b).unwrap();
                    a.collect_events();
                    let got = a.apply(&req).map(|_| ());
                    let rev = a.revision();
                    let mut events = a.take_events().unwrap();
                    a.finish(1, 1).unwrap();
                    let before = model.rev;
                    let want = model.apply(&req);
                    prop_assert_eq!(got, want, "{:?}", req);
                    prop_assert_eq!(rev, model.rev);
                    events.sort_by(|x, y| x.kv.key.cmp(&y.kv.key));
                    let want_events = if model.rev > before { model.events_at(model.rev as usize) } else { Vec::new() };
                    prop_assert_eq!(events, want_events, "events of {:?}", req);
                }
                Op::Range { key, end, rev_back, limit } => {
                    let rev = if rev_back == 0 { 0 } else { model.rev + 1 - rev_back };
                    let req = RangeRequest { key: key.clone(), range_end: end.clone(), revision: rev, limit, ..Default::default() };
                    let txn = b.read_txn().unwrap();
                    let got = mvcc::range(&b, &txn, &req).map(|(r, _)| r);
                    let want = model.range(&key, &end, rev, limit);
                    prop_assert_eq!(got, want, "range {:?}", req);
                }
            }
        }
        // Every revision at or after the compaction point still reads as the model says,
        // and its events replay from the store as they were produced.
        let txn = b.read_txn().unwrap();
        for r in (model.compacted + 1).max(2)..=model.rev {
            let (mut got, next) = mvcc::events_between(&b, &txn, r, r, 1).unwrap();
            got.sort_by(|x, y| x.kv.key.cmp(&y.kv.key));
            prop_assert_eq!(next, r + 1);
            prop_assert_eq!(got, model.events_at(r as usize), "replayed events at {}", r);
        }
        for r in model.compacted.max(1)..=model.rev {
            let req = RangeRequest { key: vec![0], range_end: vec![0], revision: r, ..Default::default() };
            let got = mvcc::range(&b, &txn, &req).map(|(r, _)| r);
            prop_assert_eq!(got, model.range(&[0], &[0], r, 0), "full read at {}", r);
        }
    }
}
