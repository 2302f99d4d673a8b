//! etcd's auth flags on corekv: `--auth-token-ttl` ends an unused token (and use renews
//! it), `--bcrypt-cost` is honoured within etcd's range, `--auth-token jwt` and unknown
//! token types are refused at start with a clear error; a token's secret never reaches
//! the WAL (its Authenticate entry carries the SHA-256).

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

#[test]
fn token_ttl_and_bcrypt_cost_flags() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--auth-token-ttl", "2", "--bcrypt-cost", "4"];
    let s = Server::start(&dir.path().join("d"), &flags);
    let ep = s.grpc_endpoint();
    for (path, body) in [
        ("/v3/auth/user/add", r#"{"name":"root","password":"pw"}"#),
        ("/v3/auth/role/add", r#"{"name":"root"}"#),
        ("/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#),
        ("/v3/auth/enable", "{}"),
    ] {
        let out = gateway_post(&ep, path, None, body);
        assert!(out.starts_with("200 "), "{path}: {out}");
    }
    let out = gateway_post(
        &ep,
        "/v3/auth/authenticate",
        None,
        r#"{"name":"root","password":"pw"}"#,
    );
    let token = json(out.split_once(' ').unwrap().1)["token"]
        .as_str()
        .unwrap()
        .to_string();
    // The WAL (raft entries) holds the token's secret only as its SHA-256.
    let secret = token.rsplit_once('.').unwrap().0;
    let hash = corekv::storage::auth::secret_sha256(secret);
    let mut wal = Vec::new();
    for e in std::fs::read_dir(dir.path().join("d/member/wal")).unwrap() {
        wal.extend(std::fs::read(e.unwrap().path()).unwrap());
    }
    let in_wal = |pat: &[u8]| wal.windows(pat.len()).any(|w| w == pat);
    assert!(!in_wal(secret.as_bytes()), "the token secret is in the WAL");
    assert!(
        in_wal(hash.as_bytes()),
        "the Authenticate entry is not in the WAL"
    );
    let put = r#"{"key":"Zm9v","value":"YmFy"}"#;
    // Used every second: renewed each time, so it outlives its 2 s TTL.
    for _ in 0..4 {
        let out = gateway_post(&ep, "/v3/kv/put", Some(&token), put);
        assert!(out.starts_with("200 "), "{out}");
        std::thread::sleep(Duration::from_millis(1000));
    }
    // Unused for 3 s: gone.
    std::thread::sleep(Duration::from_millis(3000));
    let out = gateway_post(&ep, "/v3/kv/put", Some(&token), put);
    assert!(out.contains("etcdserver: invalid auth token"), "{out}");
    assert!(out.starts_with("401 "), "{out}");
    // The stored hash carries the flag's cost: bcrypt's "$2b$04$" prefix in the data file
    // (the page cache holds LMDB's writes even before a checkpoint syncs them).
    let data = std::fs::read(dir.path().join("d/member/db/data.mdb")).unwrap();
    let found = |pat: &[u8]| data.windows(pat.len()).any(|w| w == pat);
    assert!(found(b"$2b$04$"), "a cost-4 bcrypt hash is stored");
    assert!(!found(b"$2b$10$"), "not the default cost");
}

#[test]
fn unsupported_auth_token_types_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    for (value, said) in [
        (
            "jwt,pub-key=a.pub,priv-key=a.key,sign-method=RS256",
            "--auth-token jwt is not supported",
        ),
        ("opaque", "unknown token type: opaque"),
    ] {
        let out = Command::new(BIN)
            .args(["serve", "--data-dir"])
            .arg(dir.path().join("x"))
            .args(["--auth-token", value])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(said), "{value}: {err}");
    }
    let out = Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(dir.path().join("y"))
        .args(["--bcrypt-cost", "3"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "bcrypt cost 3 is below etcd's minimum"
    );
}
