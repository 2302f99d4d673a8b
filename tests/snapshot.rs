//! Snapshot save and restore: `etcdctl snapshot save` over corekv's gRPC port gets a
//! consistent copy ending in its SHA-256 (as etcd's stream does); `corekv snapshot
//! restore` turns it into a new data dir that serves the same keyspace (same revisions,
//! same etcd HashKV) and continues the revision counter; a damaged copy is refused and
//! leaves nothing behind. Needs etcdctl (Debian's etcd-client; .ci/run installs it).

mod common;
use common::*;
use sha2::Digest;
use std::process::Command;

fn etcdctl(endpoint: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .output()
        .expect("run etcdctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The kvs of `get "" --from-key -w json` (the header's member/cluster IDs aside).
fn all_kvs(endpoint: &str) -> serde_json::Value {
    let (ok, out, err) = etcdctl(endpoint, &["get", "", "--from-key", "-w", "json"]);
    assert!(ok, "{err}");
    json(&out)["kvs"].clone()
}

fn hashkv(endpoint: &str, rev: &str) -> serde_json::Value {
    let (ok, out, err) = etcdctl(
        endpoint,
        &["endpoint", "hashkv", "--rev", rev, "-w", "json"],
    );
    assert!(ok, "{err}");
    json(&out)[0]["HashKV"].clone()
}

fn restore(file: &std::path::Path, data_dir: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .args(["snapshot", "restore"])
        .arg(file)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("run corekv snapshot restore")
}

#[test]
fn saved_snapshot_restores_into_a_new_data_dir() {
    if !have_etcdctl() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = Server::start(&dir.path().join("src"), &SMALL_WAL);
    let ep = src.grpc_endpoint();
    for i in 0..200 {
        src.ok(&["put", &format!("key{i:03}"), &format!("value {i}")]);
    }
    src.ok(&["del", "key01", "--prefix"]);
    src.ok(&["put", "key000", "rewritten"]);
    src.ok(&["compact", "50"]);
    let lease = src.ok(&["lease", "grant", "600"]);
    let lease_id = lease.split_whitespace().nth(1).unwrap().to_string();
    src.ok(&["put", "leased", "x", "--lease", &lease_id]);
    let before = all_kvs(&ep);
    let (_, status, _) = etcdctl(&ep, &["endpoint", "status", "-w", "json"]);
    let revision = json(&status)[0]["Status"]["header"]["revision"]
        .as_i64()
        .unwrap();
    let hash_before = hashkv(&ep, &revision.to_string());

    let file = dir.path().join("saved.db");
    let (ok, out, err) = etcdctl(&ep, &["snapshot", "save", file.to_str().unwrap()]);
    assert!(ok, "snapshot save: {err}");
    assert!(out.contains("Snapshot saved at"), "{out}");
    // The stream ends with the SHA-256 of everything before it.
    let bytes = std::fs::read(&file).unwrap();
    assert!(bytes.len() > 1000);
    let (data, sha) = bytes.split_at(bytes.len() - 32);
    assert_eq!(sha, &sha2::Sha256::digest(data)[..]);
    // The server's copy for the download is gone.
    let snap_dir = dir.path().join("src/member/snap");
    let left: Vec<_> = std::fs::read_dir(&snap_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("client-"))
        .collect();
    assert!(left.is_empty(), "download copies left: {left:?}");

    // `snapshot status` reads the file without installing it (etcdctl's three forms).
    let status = |fmt: &str| {
        let out = Command::new(BIN)
            .args(["snapshot", "status", file.to_str().unwrap(), "-w", fmt])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let st = json(&status("json"));
    assert_eq!(st["revision"], revision);
    assert_eq!(st["totalSize"], bytes.len() as u64);
    assert!(st["totalKey"].as_u64().unwrap() > 200, "{st}");
    let simple = status("simple");
    let cols: Vec<&str> = simple.trim_end().split(", ").collect();
    assert_eq!(cols.len(), 4, "{simple}");
    assert_eq!(cols[0], format!("{:x}", st["hash"].as_u64().unwrap()));
    assert_eq!(cols[1], revision.to_string());
    assert!(status("table").contains("TOTAL KEYS"));

    // A damaged copy is refused and creates nothing.
    let mut broken = bytes.clone();
    broken[bytes.len() / 2] ^= 1;
    let broken_file = dir.path().join("broken.db");
    std::fs::write(&broken_file, &broken).unwrap();
    let bad_dir = dir.path().join("bad");
    let out = restore(&broken_file, &bad_dir);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SHA-256 mismatch"));
    assert!(!bad_dir.exists());
    let out = Command::new(BIN)
        .args(["snapshot", "status", broken_file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a damaged file has no status");

    let restored_dir = dir.path().join("restored");
    let out = restore(&file, &restored_dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let msg = String::from_utf8_lossy(&out.stdout);
    assert!(msg.contains(&format!("revision {revision}")), "{msg}");
    assert!(
        msg.contains(&format!("{} keys", before.as_array().unwrap().len())),
        "{msg}"
    );
    // Never over an existing data dir.
    let again = restore(&file, &restored_dir);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));

    drop(src);
    let restored = Server::start(&restored_dir, &SMALL_WAL);
    let rep = restored.grpc_endpoint();
    assert_eq!(
        all_kvs(&rep),
        before,
        "same keys, values, revisions, leases"
    );
    let hash_after = hashkv(&rep, &revision.to_string());
    assert_eq!(hash_after["hash"], hash_before["hash"]);
    assert_eq!(hash_after["compact_revision"], 50);
    let out = restored.ok(&["put", "after", "restore", "-w", "json"]);
    assert_eq!(json(&out)["header"]["revision"], revision + 1);
    // History below the compaction stays compacted; above it, readable.
    let (ok, _, err) = etcdctl(&rep, &["get", "key000", "--rev", "10"]);
    assert!(!ok && err.contains("compacted"), "{err}");
    let (ok, out, _) = etcdctl(&rep, &["get", "key150", "--rev", "160"]);
    assert!(ok && out.contains("value 150"), "{out}");
}
