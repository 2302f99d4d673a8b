//! Cluster membership: members as etcd records them, their IDs (derived as etcd derives
//! them, so IDs match a real etcd started with the same flags), and the `meta` keys the
//! membership lives under in LMDB (written by bootstrap and by applied conf changes, so
//! every member agrees on it at every applied index).

use crate::error::KvError;
use crate::storage::backend::{meta_key, Backend};
use heed::{RoTxn, RwTxn, WithoutTls};
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: u64,
    /// Empty until the member has started and published itself (as etcd).
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
    /// corekv's native capnp URLs (published with the client URLs; corekv's CLI uses them).
    pub native_urls: Vec<String>,
}

/// etcd's member ID: sha1 over the sorted peer URLs, the cluster token and (for members
/// added at run time) the time of the add; the first 8 bytes, big endian.
pub fn member_id(peer_urls: &[String], token: &str, added_unix_secs: Option<i64>) -> u64 {
    let mut urls: Vec<&str> = peer_urls.iter().map(|s| s.as_str()).collect();
    urls.sort_unstable();
    let mut h = Sha1::new();
    for u in urls {
        h.update(u.as_bytes());
    }
    h.update(token.as_bytes());
    if let Some(t) = added_unix_secs {
        h.update(t.to_string().as_bytes());
    }
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().unwrap_or([0; 8])).max(1)
}

/// etcd's cluster ID: sha1 over the sorted member IDs (8 bytes each, big endian).
pub fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort_unstable();
    let mut h = Sha1::new();
    for id in ids {
        h.update(id.to_be_bytes());
    }
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().unwrap_or([0; 8]))
}

/// "http://127.0.0.1:2380" -> "127.0.0.1:2380" (scheme optional, as etcd's flags).
pub fn host_port(url: &str) -> String {
    url.strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url)
        .trim_end_matches('/')
        .to_string()
}

/// The host of a URL or host:port, without port or IPv6 brackets.
pub fn host_of(url: &str) -> String {
    let hp = host_port(url);
    match hp.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']').to_string(),
        None => hp,
    }
}

/// Splits a comma-separated URL list, trimmed, empty items dropped.
pub fn url_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

/// Parses `--initial-cluster` ("n1=http://a:2380,n2=http://b:2380"; a name may repeat
/// to give a member several URLs) into members in first-appearance order.
pub fn parse_initial_cluster(s: &str, token: &str) -> Result<Vec<Member>, String> {
    let mut members: Vec<Member> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (name, url) = item
            .split_once('=')
            .ok_or_else(|| format!("--initial-cluster: {item:?} is not name=url"))?;
        let (name, url) = (name.trim(), url.trim());
        if name.is_empty() || url.is_empty() {
            return Err(format!("--initial-cluster: {item:?} is not name=url"));
        }
        crate::config::parse_urls(url).map_err(|e| format!("--initial-cluster: {e}"))?;
        match members.iter_mut().find(|m| m.name == name) {
            Some(m) => m.peer_urls.push(url.to_string()),
            None => members.push(Member {
                name: name.to_string(),
                peer_urls: vec![url.to_string()],
                ..Default::default()
            }),
        }
    }
    if members.is_empty() {
        return Err("--initial-cluster is empty".into());
    }
    for m in members.iter_mut() {
        m.id = member_id(&m.peer_urls, token, None);
    }
    for (i, a) in members.iter().enumerate() {
        if members[..i].iter().any(|b| b.id == a.id) {
            return Err(format!(
                "--initial-cluster: member {} has the same peer URLs as another member",
                a.name
            ));
        }
    }
    Ok(members)
}

/// Whether two URL lists name the same URLs in any order.
pub fn same_urls(a: &[String], b: &[String]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort();
    b.sort();
    a == b
}

/// Membership as stored in LMDB: members, removed IDs, and who this data dir belongs to.
pub fn load_members(b: &Backend, txn: &RoTxn<WithoutTls>) -> Result<Vec<Member>, KvError> {
    match b.meta.get(txn, meta_key::MEMBERS)? {
        Some(bytes) => Ok(postcard::from_bytes(bytes)?),
        None => Ok(Vec::new()),
    }
}

pub fn load_removed(b: &Backend, txn: &RoTxn<WithoutTls>) -> Result<Vec<u64>, KvError> {
    match b.meta.get(txn, meta_key::REMOVED)? {
        Some(bytes) => Ok(postcard::from_bytes(bytes)?),
        None => Ok(Vec::new()),
    }
}

pub fn store_members(b: &Backend, txn: &mut RwTxn, members: &[Member]) -> Result<(), KvError> {
    b.meta
        .put(txn, meta_key::MEMBERS, &postcard::to_allocvec(members)?)?;
    Ok(())
}

pub fn store_removed(b: &Backend, txn: &mut RwTxn, removed: &[u64]) -> Result<(), KvError> {
    b.meta
        .put(txn, meta_key::REMOVED, &postcard::to_allocvec(removed)?)?;
    Ok(())
}

/// Membership changes carried in a raft conf change's context (etcd puts the member's
/// JSON there; corekv a postcard `Member`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MemberChange {
    Add(Member),
    Remove(u64),
    UpdatePeerUrls(u64, Vec<String>),
    Promote(u64),
}

/// Applies a membership change to the stored list (the conf state is raft's business).
pub fn apply_change(members: &mut Vec<Member>, removed: &mut Vec<u64>, change: &MemberChange) {
    match change {
        MemberChange::Add(m) => {
            if !members.iter().any(|x| x.id == m.id) && !removed.contains(&m.id) {
                members.push(m.clone());
            }
        }
        MemberChange::Remove(id) => {
            members.retain(|m| m.id != *id);
            if !removed.contains(id) {
                removed.push(*id);
            }
        }
        MemberChange::UpdatePeerUrls(id, urls) => {
            if let Some(m) = members.iter_mut().find(|m| m.id == *id) {
                m.peer_urls = urls.clone();
            }
        }
        MemberChange::Promote(id) => {
            if let Some(m) = members.iter_mut().find(|m| m.id == *id) {
                m.is_learner = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_match_etcd() {
        // etcd 3.4 started with defaults reports member 8e9e05c52164694d in cluster
        // cdf818194e3a8c32.
        let m = parse_initial_cluster("default=http://localhost:2380", "etcd-cluster").unwrap();
        assert_eq!(format!("{:x}", m[0].id), "8e9e05c52164694d");
        assert_eq!(format!("{:x}", cluster_id(&[m[0].id])), "cdf818194e3a8c32");
    }

    #[test]
    fn initial_cluster_parses_and_rejects() {
        let m = parse_initial_cluster("a=http://x:1,b=http://y:1,a=http://x:2", "t").unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].peer_urls, vec!["http://x:1", "http://x:2"]);
        assert!(parse_initial_cluster("a", "t").is_err());
        assert!(parse_initial_cluster("a=http://x:1,b=http://x:1", "t").is_err());
        assert!(parse_initial_cluster("", "t").is_err());
    }
}
