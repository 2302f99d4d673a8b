//! Errors with etcd's messages and gRPC status codes, so clients can match them.

use serde::{Deserialize, Serialize};

/// gRPC status codes used by etcd for its API errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    FailedPrecondition,
    Unavailable,
    Internal,
    DeadlineExceeded,
    PermissionDenied,
    Unauthenticated,
    /// Plain Go errors returned by etcd's lock/election services.
    Unknown,
}

/// Every error the KV API can return. `Display` is etcd's exact message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum KvError {
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev,
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExist,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: not leader")]
    NotLeader,
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    #[error("etcdserver: can only promote a learner member")]
    MemberNotLearner,
    #[error("etcdserver: member ID already exist")]
    MemberExists,
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExists,
    #[error("etcdserver: member not found")]
    MemberNotFound,
    #[error("etcdserver: request timed out, leader transfer took too long")]
    LeaderTransferTimeout,
    #[error("etcdserver: bad leader transferee")]
    BadLeaderTransferee,
    #[error("election: not leader")]
    ElectionNotLeader,
    #[error("election: no leader")]
    ElectionNoLeader,
    #[error("etcdserver: too many requests")]
    TooManyRequests,
    #[error("etcdserver: request timed out")]
    Timeout,
    #[error("etcdserver: server stopped")]
    Stopped,
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: user name not found")]
    UserNotFound,
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    #[error("etcdserver: revision of auth store is old")]
    AuthOldRevision,
    #[error("etcdserver: {0}")]
    Internal(String),
    /// Client-side errors (bad arguments, dialing): no server prefix.
    #[error("{0}")]
    Client(String),
}

impl KvError {
    pub fn code(&self) -> Code {
        use KvError::*;
        match self {
            EmptyKey | KeyNotFound | ValueProvided | LeaseProvided | TooManyOps | DuplicateKey
            | RequestTooLarge => Code::InvalidArgument,
            Compacted | FutureRev | LeaseTtlTooLarge => Code::OutOfRange,
            LeaseExist => Code::FailedPrecondition,
            NotLeader | LearnerNotReady | MemberNotLearner | MemberExists | PeerUrlExists
            | BadLeaderTransferee => Code::FailedPrecondition,
            NoLeader => Code::Unavailable,
            MemberNotFound => Code::NotFound,
            LeaderTransferTimeout => Code::DeadlineExceeded,
            ElectionNotLeader | ElectionNoLeader => Code::Unknown,
            NoSpace | TooManyRequests => Code::ResourceExhausted,
            LeaseNotFound => Code::NotFound,
            Timeout | Stopped => Code::Unavailable,
            RootUserNotExist | RootRoleNotExist | UserAlreadyExist | UserNotFound
            | RoleAlreadyExist | RoleNotFound | RoleNotGranted | PermissionNotGranted
            | AuthNotEnabled => Code::FailedPrecondition,
            UserEmpty | RoleEmpty | AuthFailed | InvalidAuthMgmt | AuthOldRevision => {
                Code::InvalidArgument
            }
            PermissionDenied => Code::PermissionDenied,
            InvalidAuthToken => Code::Unauthenticated,
            Internal(_) => Code::Internal,
            Client(_) => Code::InvalidArgument,
        }
    }

    /// Recovers the typed error from its message (errors cross the native protocol as text).
    pub fn from_message(msg: &str) -> KvError {
        use KvError::*;
        let known = [
            EmptyKey,
            KeyNotFound,
            ValueProvided,
            LeaseProvided,
            TooManyOps,
            DuplicateKey,
            RequestTooLarge,
            Compacted,
            FutureRev,
            NoSpace,
            LeaseNotFound,
            LeaseExist,
            LeaseTtlTooLarge,
            NotLeader,
            NoLeader,
            LearnerNotReady,
            MemberNotLearner,
            MemberExists,
            PeerUrlExists,
            MemberNotFound,
            LeaderTransferTimeout,
            BadLeaderTransferee,
            ElectionNotLeader,
            ElectionNoLeader,
            TooManyRequests,
            Timeout,
            Stopped,
            RootUserNotExist,
            RootRoleNotExist,
            UserAlreadyExist,
            UserEmpty,
            UserNotFound,
            RoleAlreadyExist,
            RoleNotFound,
            RoleEmpty,
            AuthFailed,
            PermissionDenied,
            RoleNotGranted,
            PermissionNotGranted,
            AuthNotEnabled,
            InvalidAuthToken,
            InvalidAuthMgmt,
            AuthOldRevision,
        ];
        for e in known {
            if msg.contains(&e.to_string()) {
                return e;
            }
        }
        Internal(msg.trim_start_matches("etcdserver: ").to_string())
    }
}

impl From<heed::Error> for KvError {
    fn from(e: heed::Error) -> Self {
        match e {
            heed::Error::Mdb(heed::MdbError::MapFull) => KvError::NoSpace,
            other => KvError::Internal(format!("backend: {other}")),
        }
    }
}

impl From<postcard::Error> for KvError {
    fn from(e: postcard::Error) -> Self {
        KvError::Internal(format!("decode: {e}"))
    }
}
