//! The lessor: which leases exist and when each expires. Part of the apply actor, so it
//! learns of grants and revokes the moment they are applied (a keepalive sent right after
//! a grant's reply always finds the lease). Expiry is decided only while this member
//! leads; it proposes the revoke through raft, so every member deletes the same keys at
//! the same revision.

use crate::error::KvError;
use crate::model::Lease;
use crate::storage::mvcc::LeaseChange;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// Leases revoked per expiry pass; the rest wait for the next tick (bounded work).
pub const MAX_EXPIRED_PER_PASS: usize = 1000;
/// A revoke proposed but not yet applied is proposed again after this long.
const REVOKE_RETRY: Duration = Duration::from_secs(3);

struct Held {
    ttl_secs: i64,
    /// Remaining TTL of the last applied checkpoint (0 = none).
    checkpoint_secs: i64,
    expiry: Instant,
}

pub struct Lessor {
    leases: HashMap<i64, Held>,
    by_expiry: BTreeSet<(Instant, i64)>,
    revoking: HashMap<i64, Instant>,
    is_leader: bool,
}

fn secs(s: i64) -> Duration {
    Duration::from_secs(s.max(0) as u64)
}

impl Lessor {
    /// Leases from the store; each runs from its last checkpoint or its full TTL.
    pub fn new(stored: Vec<Lease>, now: Instant) -> Lessor {
        let mut l = Lessor {
            leases: HashMap::new(),
            by_expiry: BTreeSet::new(),
            revoking: HashMap::new(),
            is_leader: false,
        };
        for lease in stored {
            l.insert(lease, now);
        }
        l
    }

    fn insert(&mut self, lease: Lease, now: Instant) {
        let run = if lease.remaining_secs > 0 {
            lease.remaining_secs
        } else {
            lease.ttl_secs
        };
        let held = Held {
            ttl_secs: lease.ttl_secs,
            checkpoint_secs: lease.remaining_secs,
            expiry: now + secs(run),
        };
        // Old entry out first: a re-insert can carry the same expiry.
        if let Some(old) = self.leases.remove(&lease.id) {
            self.by_expiry.remove(&(old.expiry, lease.id));
        }
        self.by_expiry.insert((held.expiry, lease.id));
        self.leases.insert(lease.id, held);
        debug_assert_eq!(self.leases.len(), self.by_expiry.len());
    }

    pub fn apply(&mut self, change: LeaseChange, now: Instant) {
        match change {
            LeaseChange::Granted(lease) => self.insert(lease, now),
            LeaseChange::Revoked(id) => {
                if let Some(old) = self.leases.remove(&id) {
                    self.by_expiry.remove(&(old.expiry, id));
                }
                self.revoking.remove(&id);
            }
        }
        debug_assert_eq!(self.leases.len(), self.by_expiry.len());
    }

    pub fn is_leader(&self) -> bool {
        self.is_leader
    }

    /// A new leader restarts every lease's clock from its checkpoint (etcd's Promote):
    /// the old leader's keepalives are unknown here, so it errs towards keeping leases.
    pub fn set_leader(&mut self, leader: bool, now: Instant) {
        if leader && !self.is_leader {
            let all: Vec<Lease> = self
                .leases
                .iter()
                .map(|(id, h)| Lease {
                    id: *id,
                    ttl_secs: h.ttl_secs,
                    remaining_secs: h.checkpoint_secs,
                })
                .collect();
            for lease in all {
                self.insert(lease, now);
            }
            self.revoking.clear();
        }
        self.is_leader = leader;
    }

    /// etcd's Renew: the lease's full TTL again; 0 when it does not exist (or is expiring).
    pub fn renew(&mut self, id: i64, now: Instant) -> Result<i64, KvError> {
        if !self.is_leader {
            return Err(KvError::NotLeader);
        }
        if self.revoking.contains_key(&id) {
            return Ok(0);
        }
        let Some(h) = self.leases.get_mut(&id) else {
            return Ok(0);
        };
        self.by_expiry.remove(&(h.expiry, id));
        h.expiry = now + secs(h.ttl_secs);
        self.by_expiry.insert((h.expiry, id));
        Ok(h.ttl_secs)
    }

    /// (remaining seconds, granted TTL) of a live lease.
    pub fn time_to_live(&self, id: i64, now: Instant) -> Option<(i64, i64)> {
        let h = self.leases.get(&id)?;
        let remaining = h.expiry.saturating_duration_since(now).as_secs() as i64;
        Some((remaining, h.ttl_secs))
    }

    pub fn ids(&self) -> Vec<i64> {
        self.leases.keys().copied().collect()
    }

    /// Expired leases to revoke now (leader only), each proposed at most every few seconds.
    pub fn expired(&mut self, now: Instant) -> Vec<i64> {
        if !self.is_leader {
            return Vec::new();
        }
        let mut out = Vec::new();
        for &(expiry, id) in &self.by_expiry {
            if expiry > now || out.len() >= MAX_EXPIRED_PER_PASS {
                break;
            }
            let due = self
                .revoking
                .get(&id)
                .is_none_or(|at| now.duration_since(*at) >= REVOKE_RETRY);
            if due {
                out.push(id);
            }
        }
        for id in &out {
            self.revoking.insert(*id, now);
        }
        out
    }

    /// Remaining TTLs worth recording: leases with more than `min_secs` left.
    pub fn checkpoints(&self, now: Instant, min_secs: i64) -> Vec<(i64, i64)> {
        self.leases
            .iter()
            .filter_map(|(id, h)| {
                let remaining = h.expiry.saturating_duration_since(now).as_secs() as i64;
                (remaining > min_secs && remaining < h.ttl_secs).then_some((*id, remaining))
            })
            .collect()
    }

    /// Records an applied checkpoint (used if this member later becomes leader).
    pub fn checkpointed(&mut self, cps: &[(i64, i64)]) {
        for (id, remaining) in cps {
            if let Some(h) = self.leases.get_mut(id) {
                h.checkpoint_secs = *remaining;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: i64, ttl: i64) -> Lease {
        Lease {
            id,
            ttl_secs: ttl,
            remaining_secs: 0,
        }
    }

    #[test]
    fn expires_only_on_the_leader_and_renew_extends() {
        let t0 = Instant::now();
        let mut l = Lessor::new(vec![lease(1, 5), lease(2, 10)], t0);
        assert!(
            l.expired(t0 + secs(6)).is_empty(),
            "followers never expire leases"
        );
        assert_eq!(l.renew(1, t0), Err(KvError::NotLeader));
        l.set_leader(true, t0);
        assert_eq!(l.renew(1, t0 + secs(4)), Ok(5));
        assert_eq!(l.expired(t0 + secs(8)), Vec::<i64>::new());
        assert_eq!(l.expired(t0 + secs(11)), vec![1, 2]);
        // Proposed once; again only after the retry interval.
        assert!(l.expired(t0 + secs(12)).is_empty());
        assert_eq!(
            l.renew(1, t0 + secs(12)),
            Ok(0),
            "an expiring lease is not renewed"
        );
        l.apply(LeaseChange::Revoked(1), t0 + secs(12));
        assert_eq!(l.expired(t0 + secs(15)), vec![2]);
        assert_eq!(l.renew(7, t0), Ok(0), "unknown lease renews to TTL 0");
    }

    #[test]
    fn checkpoint_survives_promotion() {
        let t0 = Instant::now();
        let mut l = Lessor::new(vec![lease(1, 100)], t0);
        l.set_leader(true, t0);
        let cps = l.checkpoints(t0 + secs(40), 10);
        assert_eq!(cps, vec![(1, 60)]);
        l.checkpointed(&cps);
        l.set_leader(false, t0 + secs(41));
        l.set_leader(true, t0 + secs(50));
        assert_eq!(l.time_to_live(1, t0 + secs(50)), Some((60, 100)));
        let restarted = Lessor::new(
            vec![Lease {
                id: 1,
                ttl_secs: 100,
                remaining_secs: 60,
            }],
            t0,
        );
        assert_eq!(restarted.time_to_live(1, t0), Some((60, 100)));
    }
}
