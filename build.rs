//! Generates the capnp code for schema/kv.capnp. With the `capnp` tool installed the
//! code is generated afresh (and must match the checked-in copy, which CI verifies);
//! without it the checked-in copy is used, so a plain Rust toolchain can build corekv.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=schema/kv.capnp");
    println!("cargo:rerun-if-changed=schema/generated/kv_capnp.rs");
    let out_dir = std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo");
    let out = Path::new(&out_dir).join("kv_capnp.rs");
    let have_capnp = std::process::Command::new("capnp")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if have_capnp {
        capnpc::CompilerCommand::new()
            .src_prefix("schema")
            .file("schema/kv.capnp")
            .run()
            .expect("compiling schema/kv.capnp");
    } else {
        std::fs::copy("schema/generated/kv_capnp.rs", &out)
            .expect("copy the checked-in schema/generated/kv_capnp.rs");
    }
}
