//! The Python `etcd3` client (a different gRPC stack, generated from etcd's protos by
//! its authors) runs a config-centre scenario against corekv unchanged.
//! .ci/run builds a venv with etcd3 and points COREKV_PYTHON at it; elsewhere the test
//! says that it skipped.

mod common;
use common::*;

/// The python COREKV_PYTHON names, or None after saying the test skipped.
fn python(test: &str) -> Option<String> {
    let Ok(python) = std::env::var("COREKV_PYTHON") else {
        assert!(
            std::env::var("COREKV_REQUIRE_ETCD").is_err(),
            "COREKV_PYTHON (a python with etcd3 installed) is required in CI"
        );
        eprintln!("SKIPPED {test}: set COREKV_PYTHON to a python with etcd3==0.12.0");
        return None;
    };
    Some(python)
}

/// The same scenario over TLS: https with --client-cert-auth, etcd3's ca_cert /
/// cert_cert / cert_key.
#[test]
fn python_etcd3_scenario_over_tls() {
    let Some(python) = python("python_etcd3_scenario_over_tls") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let certs = common::certs::ClientCertSetup::new(dir.path(), "py");
    let (pki, client) = (&certs.pki, &certs.client);
    let ctl = certs.ctl_args();
    let ctl: Vec<&str> = ctl.iter().map(String::as_str).collect();
    let s = Server::start_tls(&dir.path().join("d"), &SMALL_WAL, &certs.serve_args(), &ctl);
    let out = std::process::Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/etcd3_scenario.py"
        ))
        .args([
            s.grpc_endpoint().as_str(),
            pki.ca(),
            client.cert(),
            client.key(),
        ])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "etcd3 scenario over TLS failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("etcd3 scenario: ok (TLS)"));
}

#[test]
fn python_etcd3_scenario() {
    let Some(python) = python("python_etcd3_scenario") else {
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
