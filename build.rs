//! Generates code for the native capnp schema (schema/kv.capnp) and etcd's gRPC protos
//! (proto/, from etcd via the etcd-client crate). With the `capnp` / `protoc` tools
//! installed the code is generated afresh (and must match the checked-in copies, which
//! CI verifies); without them the checked-in copies are used, so a plain Rust toolchain
//! can build corekv.

use std::path::Path;

const GENERATED: &str = "schema/generated";
/// The Rust files tonic-prost-build writes, one per proto package.
const PROTO_OUTPUTS: &[&str] = &[
    "authpb.rs",
    "etcdserverpb.rs",
    "mvccpb.rs",
    "v3electionpb.rs",
    "v3lockpb.rs",
];

fn tool_works(name: &str) -> bool {
    std::process::Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn use_checked_in(out: &Path, file: &str) {
    std::fs::copy(Path::new(GENERATED).join(file), out.join(file))
        .unwrap_or_else(|e| panic!("copy the checked-in {GENERATED}/{file}: {e}"));
}

fn main() {
    println!("cargo:rerun-if-changed=schema/kv.capnp");
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed={GENERATED}");
    let out_dir = std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo");
    let out = Path::new(&out_dir);

    if tool_works("capnp") {
        capnpc::CompilerCommand::new()
            .src_prefix("schema")
            .file("schema/kv.capnp")
            .run()
            .expect("compiling schema/kv.capnp");
    } else {
        use_checked_in(out, "kv_capnp.rs");
    }

    if tool_works("protoc") {
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .generate_default_stubs(true)
            .compile_protos(
                &[
                    "proto/etcd/api/etcdserverpb/rpc.proto",
                    "proto/etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto",
                    "proto/etcd/server/etcdserver/api/v3lock/v3lockpb/v3lock.proto",
                ],
                &["proto"],
            )
            .expect("compiling etcd's protos");
    } else {
        for f in PROTO_OUTPUTS {
            use_checked_in(out, f);
        }
    }
}
