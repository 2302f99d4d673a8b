//! The Python `etcd3` client (a different gRPC stack, generated from etcd's protos by
//! its authors) runs a config-centre scenario against corekv unchanged.
//! .ci/run builds a venv with etcd3 and points COREKV_PYTHON at it; elsewhere the test
//! says that it skipped.

mod common;
use common::*;

#[test]
fn python_etcd3_scenario() {
    let Ok(python) = std::env::var("COREKV_PYTHON") else {
        assert!(
            std::env::var("COREKV_REQUIRE_ETCD").is_err(),
            "COREKV_PYTHON (a python with etcd3 installed) is required in CI"
        );
        eprintln!(
            "SKIPPED python_etcd3_scenario: set COREKV_PYTHON to a python with etcd3==0.12.0"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &SMALL_WAL);
    let out = std::process::Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/etcd3_scenario.py"
        ))
        .arg(s.grpc_endpoint())
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "etcd3 scenario failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("etcd3 scenario: ok"));
}
