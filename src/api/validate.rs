//! Request checks etcd performs in its API layer (v3rpc/key.go) before proposing.

use crate::error::KvError;
use crate::model::*;
use std::collections::HashSet;

pub fn check_range(r: &RangeRequest) -> Result<(), KvError> {
    if r.key.is_empty() {
        return Err(KvError::EmptyKey);
    }
    Ok(())
}

pub fn check_put(p: &PutRequest) -> Result<(), KvError> {
    if p.key.is_empty() {
        return Err(KvError::EmptyKey);
    }
    if p.ignore_value && !p.value.is_empty() {
        return Err(KvError::ValueProvided);
    }
    if p.ignore_lease && p.lease != 0 {
        return Err(KvError::LeaseProvided);
    }
    Ok(())
}

pub fn check_delete(d: &DeleteRangeRequest) -> Result<(), KvError> {
    if d.key.is_empty() {
        return Err(KvError::EmptyKey);
    }
    Ok(())
}

pub fn check_txn(t: &TxnRequest, max_txn_ops: usize) -> Result<(), KvError> {
    check_txn_ops(t, max_txn_ops)?;
    check_intervals(&t.success)?;
    check_intervals(&t.failure)?;
    Ok(())
}

fn check_txn_ops(t: &TxnRequest, max_txn_ops: usize) -> Result<(), KvError> {
    if t.compare.len() > max_txn_ops
        || t.success.len() > max_txn_ops
        || t.failure.len() > max_txn_ops
    {
        return Err(KvError::TooManyOps);
    }
    for c in &t.compare {
        if c.key.is_empty() {
            return Err(KvError::EmptyKey);
        }
    }
    for op in t.success.iter().chain(t.failure.iter()) {
        match op {
            RequestOp::Range(r) => check_range(r)?,
            RequestOp::Put(p) => check_put(p)?,
            RequestOp::DeleteRange(d) => check_delete(d)?,
            RequestOp::Txn(inner) => check_txn_ops(inner, max_txn_ops)?,
        }
    }
    Ok(())
}

/// A deleted range `[start, end)`; `None` end = unbounded.
struct Interval {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Interval {
    fn of_delete(d: &DeleteRangeRequest) -> Interval {
        let end = if d.range_end.is_empty() {
            let mut e = d.key.clone();
            e.push(0);
            Some(e)
        } else if d.range_end == [0] {
            None
        } else {
            Some(d.range_end.clone())
        };
        Interval {
            start: d.key.clone(),
            end,
        }
    }
    fn contains(&self, k: &[u8]) -> bool {
        k >= self.start.as_slice() && self.end.as_deref().is_none_or(|e| k < e)
    }
}

/// etcd's checkIntervals: a txn may not put one key twice, nor put a key it deletes.
/// Returns the puts and deletes of this level and below.
fn check_intervals(ops: &[RequestOp]) -> Result<(HashSet<Vec<u8>>, Vec<Interval>), KvError> {
    let mut dels: Vec<Interval> = ops
        .iter()
        .filter_map(|op| match op {
            RequestOp::DeleteRange(d) => Some(Interval::of_delete(d)),
            _ => None,
        })
        .collect();
    let mut puts: HashSet<Vec<u8>> = HashSet::new();
    for op in ops {
        let RequestOp::Txn(t) = op else { continue };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || dels.iter().any(|d| d.contains(k)) {
                return Err(KvError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in puts_else {
            // then/else are exclusive: a key in both branches is fine.
            if (puts.contains(&k) && !puts_then.contains(&k)) || dels.iter().any(|d| d.contains(&k))
            {
                return Err(KvError::DuplicateKey);
            }
            puts.insert(k);
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let RequestOp::Put(p) = op else { continue };
        if puts.contains(&p.key) || dels.iter().any(|d| d.contains(&p.key)) {
            return Err(KvError::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

/// etcd's `lease.MaxLeaseTTL`.
pub const MAX_LEASE_TTL_SECS: i64 = 9_000_000_000;

/// Validates any write request as the API layer would.
pub fn check_write(req: &WriteRequest, max_txn_ops: usize) -> Result<(), KvError> {
    match req {
        WriteRequest::Put(p) => check_put(p),
        WriteRequest::DeleteRange(d) => check_delete(d),
        WriteRequest::Txn(t) => check_txn(t, max_txn_ops),
        WriteRequest::LeaseGrant { ttl_secs, .. } if *ttl_secs > MAX_LEASE_TTL_SECS => {
            Err(KvError::LeaseTtlTooLarge)
        }
        WriteRequest::Compact(_)
        | WriteRequest::Alarm(_)
        | WriteRequest::LeaseGrant { .. }
        | WriteRequest::LeaseRevoke { .. }
        | WriteRequest::LeaseCheckpoint(_)
        | WriteRequest::PublishMember { .. }
        | WriteRequest::Auth(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str) -> RequestOp {
        RequestOp::Put(PutRequest {
            key: k.as_bytes().to_vec(),
            ..Default::default()
        })
    }

    #[test]
    fn duplicate_put_is_rejected_and_branches_are_exclusive() {
        let dup = TxnRequest {
            success: vec![put("a"), put("a")],
            ..Default::default()
        };
        assert_eq!(check_txn(&dup, 128), Err(KvError::DuplicateKey));
        let nested = TxnRequest {
            success: vec![RequestOp::Txn(TxnRequest {
                success: vec![put("a")],
                failure: vec![put("a")],
                ..Default::default()
            })],
            ..Default::default()
        };
        assert_eq!(check_txn(&nested, 128), Ok(()));
        let put_in_deleted = TxnRequest {
            success: vec![
                RequestOp::DeleteRange(DeleteRangeRequest {
                    key: b"a".to_vec(),
                    range_end: b"c".to_vec(),
                    prev_kv: false,
                }),
                put("b"),
            ],
            ..Default::default()
        };
        assert_eq!(check_txn(&put_in_deleted, 128), Err(KvError::DuplicateKey));
    }

    #[test]
    fn too_many_ops() {
        let t = TxnRequest {
            success: (0..129).map(|i| put(&format!("k{i}"))).collect(),
            ..Default::default()
        };
        assert_eq!(check_txn(&t, 128), Err(KvError::TooManyOps));
    }
}
