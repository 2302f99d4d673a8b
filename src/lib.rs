//! corekv: etcd's v3 key-value API on raft-rs, an O_DIRECT group-commit WAL and LMDB,
//! run as pinned glommio actors (thread-per-core).

pub mod actors;
pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod error;
pub mod model;
pub mod server;
pub mod storage;
pub mod transport;

#[allow(clippy::all, dead_code, unused_parens)]
pub mod kv_capnp {
    include!(concat!(env!("OUT_DIR"), "/kv_capnp.rs"));
}
