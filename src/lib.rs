//! corekv: etcd's v3 key-value API on raft-rs, an O_DIRECT group-commit WAL and LMDB,
//! run as pinned glommio actors (thread-per-core).

pub mod actors;
pub mod api;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod discovery;
pub mod error;
pub mod model;
pub mod server;
pub mod storage;
pub mod tls;
pub mod transport;

#[allow(clippy::all, dead_code, unused_parens)]
pub mod kv_capnp {
    include!(concat!(env!("OUT_DIR"), "/kv_capnp.rs"));
}

/// etcd's protobuf packages (generated from proto/ by tonic-prost-build).
#[allow(clippy::all, dead_code, missing_docs)]
pub mod etcdpb {
    pub mod authpb {
        include!(concat!(env!("OUT_DIR"), "/authpb.rs"));
    }
    pub mod mvccpb {
        include!(concat!(env!("OUT_DIR"), "/mvccpb.rs"));
    }
    pub mod etcdserverpb {
        include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
    }
    pub mod v3electionpb {
        include!(concat!(env!("OUT_DIR"), "/v3electionpb.rs"));
    }
    pub mod v3lockpb {
        include!(concat!(env!("OUT_DIR"), "/v3lockpb.rs"));
    }
}
