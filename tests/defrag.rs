//! Offline defragmentation (`corekv defrag --data-dir`, etcdctl's offline mode): after a
//! delete + compaction the data file shrinks to its live data, the keyspace, revisions
//! and HashKV are unchanged, the member serves and writes on; a running member's data
//! dir is refused, and online Defragment says it is not built, naming the offline verb.

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
    // Online: not built, and the answer says what to do instead.
    let err = s.fails(&["defrag"]);
    assert!(err.contains("corekv defrag --data-dir"), "{err}");

    s.kill9();
    let file = data.join("member/db/data.mdb");
    let size_before = std::fs::metadata(&file).unwrap().len();
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
    let size_after = std::fs::metadata(&file).unwrap().len();
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
