//! Front ends' shared pieces: the native protocol codec and etcd's request checks.
pub mod gateway;
pub mod gateway_auth;
pub mod gateway_stream;
pub mod grpc_listen;
pub mod native;
pub mod native_auth;
pub mod v3auth;
pub mod v3lease;
pub mod v3lock;
pub mod v3rpc;
pub mod v3watch;
pub mod validate;
