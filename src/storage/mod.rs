//! Storage layers, named as in etcd: `wal` (log format + recovery), `backend` (LMDB),
//! `mvcc` (revisions on top of the backend), `raft_log` (raft-rs Storage).
pub mod auth;
pub mod backend;
pub mod mvcc;
pub mod raft_log;
pub mod snapshot;
pub mod wal;
