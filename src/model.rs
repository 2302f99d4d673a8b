//! The one internal request/response model every front end (capnp, later etcd gRPC and
//! JSON) converts to. Write requests are serialized into raft entries with postcard.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub lease: i64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub cluster_id: u64,
    pub member_id: u64,
    pub revision: i64,
    pub raft_term: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SortOrder {
    #[default]
    None,
    Ascend,
    Descend,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SortTarget {
    #[default]
    Key,
    Version,
    Create,
    Mod,
    Value,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
    pub limit: i64,
    pub revision: i64,
    pub sort_order: SortOrder,
    pub sort_target: SortTarget,
    pub serializable: bool,
    pub keys_only: bool,
    pub count_only: bool,
    pub min_mod_revision: i64,
    pub max_mod_revision: i64,
    pub min_create_revision: i64,
    pub max_create_revision: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResponse {
    pub kvs: Vec<KeyValue>,
    pub more: bool,
    pub count: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRequest {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub lease: i64,
    pub prev_kv: bool,
    pub ignore_value: bool,
    pub ignore_lease: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutResponse {
    pub prev_kv: Option<KeyValue>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRangeRequest {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
    pub prev_kv: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRangeResponse {
    pub deleted: i64,
    pub prev_kvs: Vec<KeyValue>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareResult {
    Equal,
    Greater,
    Less,
    NotEqual,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    Version(i64),
    Create(i64),
    Mod(i64),
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    Lease(i64),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
    pub target: CompareTarget,
    pub result: CompareResult,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestOp {
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseOp {
    Range(RangeResponse),
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRequest {
    pub compare: Vec<Compare>,
    pub success: Vec<RequestOp>,
    pub failure: Vec<RequestOp>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResponse {
    pub succeeded: bool,
    pub responses: Vec<ResponseOp>,
    /// The revision in each nested response's header, as etcd reports it: the txn's new
    /// revision once the txn has changed anything, the revision before it until then.
    pub op_revisions: Vec<i64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactionRequest {
    pub revision: i64,
    pub physical: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AlarmType {
    None,
    Nospace,
    Corrupt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AlarmAction {
    Get,
    Activate,
    Deactivate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AlarmMember {
    pub member_id: u64,
    pub alarm: AlarmType,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlarmRequest {
    pub action: AlarmAction,
    pub member_id: u64,
    pub alarm: AlarmType,
}

/// Who sent a request, as the auth store judges it (etcd's AuthInfo): the user a token
/// named (empty: none) and the auth revision the front end saw when it checked the token.
/// A write applied under a newer auth revision is refused (etcd's ErrAuthOldRevision).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthUser {
    pub name: String,
    pub revision: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PermType {
    Read,
    Write,
    ReadWrite,
}

/// A key permission of a role: `[key, range_end)` as etcd reads ranges.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permission {
    pub perm_type: PermType,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
}

/// Auth management, applied through raft like etcd's InternalRaftRequest auth fields.
/// Passwords arrive already bcrypt-hashed (by the member that took the request), so every
/// replica stores the same bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthRequest {
    Enable,
    Disable,
    /// Issues a simple token `<secret>.<entry index>` once the password was checked. The
    /// entry (so the WAL, raft messages and snapshots) holds only the secret's SHA-256:
    /// the member that took the request hands the secret to the client.
    Authenticate {
        name: String,
        secret_sha256: String,
    },
    UserAdd {
        name: String,
        password_hash: Option<String>,
    },
    UserDelete {
        name: String,
    },
    UserChangePassword {
        name: String,
        password_hash: Option<String>,
    },
    UserGrantRole {
        user: String,
        role: String,
    },
    UserRevokeRole {
        user: String,
        role: String,
    },
    UserGet {
        name: String,
    },
    UserList,
    RoleAdd {
        name: String,
    },
    RoleGet {
        name: String,
    },
    RoleList,
    RoleDelete {
        name: String,
    },
    RoleGrantPermission {
        name: String,
        perm: Permission,
    },
    RoleRevokePermission {
        name: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        range_end: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthResponse {
    Done,
    /// The token prefix; the apply actor appends the entry index.
    Token(String),
    /// A user's roles, or the names of all users or roles.
    Names(Vec<String>),
    Perms(Vec<Permission>),
}

/// Mutations: each one is a raft entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteRequest {
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(CompactionRequest),
    Alarm(AlarmRequest),
    /// `id` is chosen by the proposing member (never 0 here) so replicas agree on it.
    LeaseGrant {
        id: i64,
        ttl_secs: i64,
    },
    LeaseRevoke {
        id: i64,
    },
    /// Remaining TTLs recorded by the leader, so a restart or new leader does not reset them.
    LeaseCheckpoint(Vec<(i64, i64)>),
    /// A started member records its name and client URLs (etcd's publish).
    PublishMember {
        id: u64,
        name: String,
        client_urls: Vec<String>,
        native_urls: Vec<String>,
    },
    Auth(AuthRequest),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteResponse {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact,
    Alarm(Vec<AlarmMember>),
    LeaseGrant {
        id: i64,
        ttl_secs: i64,
    },
    LeaseRevoke,
    LeaseCheckpoint,
    /// The membership after a member change or publish.
    Members(Vec<crate::cluster::Member>),
    Auth(AuthResponse),
}

/// A lease as stored: its granted TTL and the remaining TTL of the last checkpoint
/// (0 = none yet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: i64,
    pub ttl_secs: i64,
    pub remaining_secs: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTimeToLive {
    pub id: i64,
    /// Remaining seconds; -1 when the lease does not exist (etcd's answer).
    pub ttl_secs: i64,
    pub granted_ttl_secs: i64,
    pub keys: Vec<Vec<u8>>,
}

/// An election leader's identity, as etcd's `LeaderKey`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderKey {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub rev: i64,
    pub lease: i64,
}

/// A watch response as a native client receives it (one watch per call: no watch id).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchResponse {
    pub header: Header,
    pub created: bool,
    pub canceled: bool,
    pub compact_revision: i64,
    pub cancel_reason: String,
    pub events: Vec<Event>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change as a watcher sees it. A delete's `kv` holds only the key and
/// mod_revision, as etcd's does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
    pub prev_kv: Option<KeyValue>,
}

/// Server status for `endpoint status`, including group-commit statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub db_size: i64,
    pub db_size_in_use: i64,
    pub leader: u64,
    pub raft_index: u64,
    pub raft_term: u64,
    pub raft_applied_index: u64,
    pub errors: Vec<String>,
    pub is_learner: bool,
    pub wal: WalStats,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalStats {
    pub batches: u64,
    pub entries: u64,
    pub max_batch: u64,
    pub fsync_p50_us: u64,
    pub fsync_p99_us: u64,
}

/// `[key, range_end)` as etcd reads it: empty end = the single key, "\0" = no upper bound.
pub fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    if end.is_empty() {
        key == start
    } else if end == [0] {
        key >= start
    } else {
        key >= start && key < end
    }
}

/// The key that ends a prefix range (etcd's `clientv3.GetPrefixRangeEnd`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): every key from the prefix on.
    vec![0]
}

impl WriteRequest {
    /// Whether this request can grow the database (refused while NOSPACE is raised).
    pub fn may_grow(&self) -> bool {
        match self {
            WriteRequest::Put(_) | WriteRequest::LeaseGrant { .. } => true,
            WriteRequest::Txn(t) => txn_has_put(t),
            _ => false,
        }
    }
}

fn txn_has_put(t: &TxnRequest) -> bool {
    t.success.iter().chain(t.failure.iter()).any(|op| match op {
        RequestOp::Put(_) => true,
        RequestOp::Txn(inner) => txn_has_put(inner),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PutRequest as corekv wrote it before its byte fields were `serde_bytes`: WAL
    /// records and LMDB values written then must read back the same, and new ones must
    /// be byte for byte what the old code wrote.
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct PlainPut {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
        prev_kv: bool,
        ignore_value: bool,
        ignore_lease: bool,
    }

    #[test]
    fn byte_fields_keep_postcards_sequence_encoding() {
        let sizes = [0usize, 1, 127, 128, 300, 70_000];
        for (i, &n) in sizes.iter().enumerate() {
            let key: Vec<u8> = (0..n).map(|b| (b * 7 + i) as u8).collect();
            let value: Vec<u8> = (0..n * 2).map(|b| (b ^ i) as u8).collect();
            let new = PutRequest {
                key: key.clone(),
                value: value.clone(),
                lease: -5,
                prev_kv: true,
                ignore_value: false,
                ignore_lease: true,
            };
            let old = PlainPut {
                key,
                value,
                lease: -5,
                prev_kv: true,
                ignore_value: false,
                ignore_lease: true,
            };
            let new_bytes = postcard::to_allocvec(&new).expect("encode");
            let old_bytes = postcard::to_allocvec(&old).expect("encode");
            assert_eq!(new_bytes, old_bytes, "key of {n} bytes");
            let back: PutRequest = postcard::from_bytes(&old_bytes).expect("decode");
            assert_eq!(back, new);
        }
        let cmp = CompareTarget::Value(b"v\x00\xff".to_vec());
        let plain = postcard::to_allocvec(&(3u32, b"v\x00\xff".to_vec())).expect("encode");
        assert_eq!(postcard::to_allocvec(&cmp).expect("encode"), plain);
    }
}
