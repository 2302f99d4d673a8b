//! A Wing–Gong linearizability checker for registers (one per key: linearizability is
//! compositional, so keys are checked separately), with Lowe's memoization of
//! (linearized set, state). Operations whose outcome is unknown (the client saw an
//! error or timeout) may take effect at any point after their call, or never.

use std::collections::HashSet;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Put(String),
    /// Observed value; None = key absent.
    Get(Option<String>),
    /// Compare-and-swap: (expected, new, succeeded?). `succeeded` None = unknown.
    Cas(String, String, Option<bool>),
}

#[derive(Clone, Debug)]
pub struct Op {
    pub key: String,
    pub kind: Kind,
    /// Microseconds since the run started.
    pub call_us: u64,
    /// None: no answer (error or timeout) - the op may or may not have happened.
    pub ret_us: Option<u64>,
}

/// The register's next state if `op` can take effect in `state` with its observed result.
fn step(op: &Op, state: &Option<String>) -> Option<Option<String>> {
    match &op.kind {
        Kind::Put(v) => Some(Some(v.clone())),
        Kind::Get(seen) => (seen == state).then(|| state.clone()),
        Kind::Cas(expect, new, outcome) => {
            let holds = state.as_deref() == Some(expect.as_str());
            match outcome {
                Some(true) if holds => Some(Some(new.clone())),
                Some(false) if !holds => Some(state.clone()),
                None if holds => Some(Some(new.clone())),
                _ => None,
            }
        }
    }
}

/// Whether one key's history (starting from an absent key) is linearizable. `budget`
/// bounds the search (states explored); None when it ran out.
pub fn check_key(ops: &[Op], budget: usize) -> Option<bool> {
    assert!(ops.len() < 4096, "history too long for one key");
    let words = ops.len().div_ceil(64);
    let must: Vec<bool> = ops.iter().map(|o| o.ret_us.is_some()).collect();
    let ret = |i: usize| ops[i].ret_us.unwrap_or(u64::MAX);
    let mut memo: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    // Explicit DFS stack: (linearized set, state).
    let mut stack: Vec<(Vec<u64>, Option<String>)> = vec![(vec![0u64; words], None)];
    let mut explored = 0usize;
    while let Some((done, state)) = stack.pop() {
        explored += 1;
        if explored > budget {
            return None;
        }
        let is_done = |i: usize| done[i / 64] & (1 << (i % 64)) != 0;
        if (0..ops.len()).all(|i| !must[i] || is_done(i)) {
            return Some(true);
        }
        // Only ops called before every pending op's return may go next.
        let min_ret = (0..ops.len())
            .filter(|&i| !is_done(i))
            .map(ret)
            .min()
            .unwrap_or(u64::MAX);
        for i in 0..ops.len() {
            if is_done(i) || ops[i].call_us >= min_ret {
                continue;
            }
            if let Some(next) = step(&ops[i], &state) {
                let mut d = done.clone();
                d[i / 64] |= 1 << (i % 64);
                if memo.insert((d.clone(), next.clone())) {
                    stack.push((d, next));
                }
            }
        }
    }
    Some(false)
}

pub struct Report {
    pub ops: usize,
    pub keys: usize,
    pub anomalies: Vec<String>,
    pub undecided: Vec<String>,
}

pub fn check(history: &[Op]) -> Report {
    let mut keys: Vec<&str> = history.iter().map(|o| o.key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut anomalies = Vec::new();
    let mut undecided = Vec::new();
    for k in &keys {
        let mut ops: Vec<Op> = history.iter().filter(|o| o.key == *k).cloned().collect();
        ops.sort_by_key(|o| o.call_us);
        match check_key(&ops, 5_000_000) {
            Some(true) => {}
            Some(false) => anomalies.push(format!("key {k}: not linearizable ({} ops)", ops.len())),
            None => undecided.push(format!("key {k}: search budget exhausted")),
        }
    }
    Report {
        ops: history.len(),
        keys: keys.len(),
        anomalies,
        undecided,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: Kind, call: u64, ret: Option<u64>) -> Op {
        Op {
            key: "k".into(),
            kind,
            call_us: call,
            ret_us: ret,
        }
    }

    #[test]
    fn accepts_linearizable_and_catches_stale_reads() {
        let put = |v: &str, c, r| op(Kind::Put(v.into()), c, Some(r));
        let get = |v: Option<&str>, c, r| op(Kind::Get(v.map(String::from)), c, Some(r));
        // Concurrent put and get: either order is fine.
        assert_eq!(
            check_key(&[put("a", 0, 10), get(None, 1, 5)], 1000),
            Some(true)
        );
        // A read that starts after a put returned must see it (or something newer).
        assert_eq!(
            check_key(&[put("a", 0, 10), get(None, 20, 30)], 1000),
            Some(false)
        );
        // An unanswered put may have happened...
        let maybe = op(Kind::Put("b".into()), 40, None);
        assert_eq!(
            check_key(
                &[put("a", 0, 10), maybe.clone(), get(Some("b"), 50, 60)],
                1000
            ),
            Some(true)
        );
        // ...or not, but never before it was called.
        assert_eq!(
            check_key(&[get(Some("b"), 0, 10), maybe], 1000),
            Some(false)
        );
        // A CAS that claims success on a value that was not there is caught.
        let cas = op(Kind::Cas("x".into(), "y".into(), Some(true)), 20, Some(30));
        assert_eq!(check_key(&[put("a", 0, 10), cas], 1000), Some(false));
    }
}
