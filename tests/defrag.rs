//! Defragmentation, online (etcdctl's and corekv's `defrag`, Maintenance.Defragment) and
//! offline (`corekv defrag --data-dir`): after a delete + compaction the data file
//! shrinks to its live data while keyspace, revisions and HashKV stay; online it runs
//! under concurrent writers without losing an acknowledged write and survives SIGKILL +
//! restart; it completes the seeds' NOSPACE recovery (compact, defrag, disarm); a
//! running member's data dir is refused offline.

mod common;
use common::*;
use std::process::Command;

fn corekv(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().expect("run corekv")
}

#[test]
fn offline_defrag_shrinks_the_file_and_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let data_arg = data.to_str().unwrap();
    let mut s = Server::start(&data, &SMALL_WAL);
    let value = "v".repeat(20_000);
    for i in 0..120 {
        let out = s.ctl_stdin(&["put", &format!("big{i:03}")], &value);
        assert!(out.status.success());
    }
    s.ok(&["put", "keep", "me"]);
    assert_eq!(s.ok(&["del", "big", "--prefix"]), "120\n");
    let rev = json(&s.ok(&["get", "keep", "-w", "json"]))["header"]["revision"]
        .as_i64()
        .unwrap();
    s.ok(&["compact", &rev.to_string()]);
    // (hash, compact revision, revision): the raft term moves on with the restart.
    let hashkv = |s: &Server| {
        let v = json(&s.ok(&["endpoint", "hashkv", "-w", "json"]));
        let h = &v[0]["HashKV"];
        (
            h["hash"].as_u64(),
            h["compact_revision"].as_i64(),
            h["header"]["revision"].as_i64(),
        )
    };
    let hash_before = hashkv(&s);
    assert_eq!(hash_before.1, Some(rev));

    // A running member's files are never touched.
    let out = corekv(&["defrag", "--data-dir", data_arg]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is in use by another corekv process"), "{err}");

    s.kill9();
    let file = data.join("member/db/data.mdb");
    let size_before = disk_bytes(&file);
    let out = corekv(&["defrag", "--data-dir", data_arg]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("Finished defragmenting etcd data[{data_arg}]\n")
    );
    let size_after = disk_bytes(&file);
    assert!(
        size_after * 4 < size_before,
        "file {size_before} -> {size_after} bytes: the 2.4 MB of deleted values must go"
    );
    assert!(!data.join("member/db/data.mdb.defrag").exists());

    s.restart();
    assert_eq!(s.ok(&["get", "keep", "--print-value-only"]), "me\n");
    assert_eq!(s.ok(&["get", "big", "--prefix", "--keys-only"]), "");
    assert_eq!(hashkv(&s), hash_before);
    s.ok(&["put", "after", "defrag"]);
    let after = json(&s.ok(&["get", "after", "-w", "json"]));
    assert_eq!(after["kvs"][0]["mod_revision"].as_i64(), Some(rev + 1));
    // A missing data dir is a clear error, not a new empty store.
    let out = corekv(&[
        "defrag",
        "--data-dir",
        dir.path().join("nope").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no corekv data"));
}

/// (hash, compact revision, revision) of HashKV: what must not change across a defrag.
fn hash_of(s: &Server) -> (Option<u64>, Option<i64>, Option<i64>) {
    let v = json(&s.ok(&["endpoint", "hashkv", "-w", "json"]));
    let h = &v[0]["HashKV"];
    (
        h["hash"].as_u64(),
        h["compact_revision"].as_i64(),
        h["header"]["revision"].as_i64(),
    )
}

#[test]
fn online_defrag_under_writes_keeps_every_acknowledged_write() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(&dir.path().join("d"), &SMALL_WAL);
    let value = "v".repeat(20_000);
    for i in 0..100 {
        assert!(s
            .ctl_stdin(&["put", &format!("big{i:03}")], &value)
            .status
            .success());
    }
    s.ok(&["del", "big", "--prefix"]);
    let rev = json(&s.ok(&["get", "x", "-w", "json"]))["header"]["revision"]
        .as_i64()
        .unwrap();
    s.ok(&["compact", &rev.to_string()]);
    let file = dir.path().join("d/member/db/data.mdb");
    let size_before = disk_bytes(&file);

    // Two writers keep going while defrag runs (bounded: 150 puts each).
    let stop = Arc::new(AtomicBool::new(false));
    let endpoint = s.endpoint();
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let stop = stop.clone();
            let endpoint = endpoint.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for i in 0..150 {
                    if stop.load(Ordering::Relaxed) && i > 20 {
                        break;
                    }
                    let key = format!("w{w}-{i:03}");
                    let out = std::process::Command::new(BIN)
                        .args(["put", &key, "x", "--endpoints", &endpoint])
                        .output()
                        .unwrap();
                    if out.status.success() {
                        acked.push(key);
                    }
                }
                acked
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        s.ok(&["defrag"]),
        format!("Finished defragmenting etcd member[{endpoint}]\n")
    );
    // etcdctl's verb reaches the same RPC over gRPC.
    let out = Command::new("etcdctl")
        .args(["--endpoints", &s.grpc_endpoint(), "defrag"])
        .output();
    if let Ok(out) = out {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            said.starts_with("Finished defragmenting etcd member["),
            "{said}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<String> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(acked.len() >= 40, "writers ran alongside: {}", acked.len());
    let size_after = disk_bytes(&file);
    assert!(
        size_after * 4 < size_before,
        "{size_before} -> {size_after} bytes"
    );
    let dirs: Vec<_> = std::fs::read_dir(dir.path().join("d/member"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!dirs.iter().any(|d| d.starts_with("db.defrag")), "{dirs:?}");
    let check = |s: &Server| {
        for key in &acked {
            assert_eq!(s.ok(&["get", key, "--print-value-only"]), "x\n", "{key}");
        }
    };
    check(&s);
    let hash = hash_of(&s);
    // The new file is the store now: it survives SIGKILL and restart.
    s.kill9();
    s.restart();
    check(&s);
    assert_eq!(hash_of(&s), hash);
    s.ok(&["put", "after", "restart"]);
}

/// The seeds' recovery from "database space exceeded": compact, defrag, disarm, write.
#[test]
fn nospace_recovers_by_compact_defrag_disarm() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        &dir.path().join("d"),
        &[
            "--wal-segment-bytes",
            "1048576",
            "--quota-backend-bytes",
            "400000",
        ],
    );
    let value = "v".repeat(30_000);
    let mut refused = false;
    for i in 0..100 {
        let out = s.ctl_stdin(&["put", &format!("k{i:03}")], &value);
        if !out.status.success() {
            refused = true;
            break;
        }
    }
    assert!(refused, "quota never reached");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !s.ok(&["alarm", "list"]).contains("NOSPACE") {
        assert!(std::time::Instant::now() < deadline, "alarm not raised");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    s.ok(&["del", "k", "--prefix"]);
    let rev = json(&s.ok(&["get", "x", "-w", "json"]))["header"]["revision"]
        .as_i64()
        .unwrap();
    s.ok(&["compact", &rev.to_string()]);
    s.ok(&["defrag"]);
    s.ok(&["alarm", "disarm"]);
    assert_eq!(s.ok(&["put", "k000", "small"]), "OK\n");
    // Room again for more than one big value: the quota counts the shrunken file.
    for i in 0..3 {
        let out = s.ctl_stdin(&["put", &format!("again{i}")], &value);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Space the file takes on disk (what `du` shows). Its length is no measure: LMDB runs
/// with WRITE_MAP and sizes data.mdb to the map, a sparse reservation.
fn disk_bytes(file: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(file).expect("data.mdb").blocks() * 512
}
