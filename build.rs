fn main() {
    println!("cargo:rerun-if-changed=schema/kv.capnp");
    capnpc::CompilerCommand::new()
        .src_prefix("schema")
        .file("schema/kv.capnp")
        .run()
        .expect("compiling schema/kv.capnp needs the `capnp` tool (apt-get install capnproto)");
}
