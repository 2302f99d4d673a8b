//! Actor placement is configuration: the same server works with every actor on one
//! shard, and with raft, wal and apply spread over more shards than there are CPUs.

mod common;
use common::*;

fn exercise(s: &Server) {
    for i in 0..30 {
        s.ok(&["put", &format!("p{i:02}"), &format!("{i}")]);
    }
    let out = s.ctl_stdin(
        &["txn"],
        "value(\"p00\") = \"0\"\n\nput p00 changed\ndel p01\n\n\n",
    );
    assert!(out.status.success());
    let all = s.ok(&["get", "p", "--prefix", "--count-only", "-w", "json"]);
    assert_eq!(json(&all)["count"], 29);
    assert_eq!(
        s.ok(&["get", "p00", "--print-value-only", "--consistency", "s"]),
        "changed\n"
    );
    let st = json(&s.ok(&["endpoint", "status", "-w", "json"]));
    assert_eq!(
        st[0]["Status"]["raftAppliedIndex"],
        st[0]["Status"]["raftIndex"]
    );
}

#[test]
fn one_shard() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        &dir.path().join("d"),
        &["--cores", "1", "--wal-segment-bytes", "1048576"],
    );
    exercise(&s);
}

#[test]
fn actors_spread_over_more_shards_than_cpus() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        &dir.path().join("d"),
        &[
            "--cores",
            "4",
            "--raft-shard",
            "1",
            "--wal-shard",
            "2",
            "--apply-shard",
            "3",
            "--wal-segment-bytes",
            "1048576",
        ],
    );
    exercise(&s);
    let bad = std::process::Command::new(BIN)
        .args(["serve", "--cores", "2", "--wal-shard", "2"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--wal-shard 2 is not below --cores 2"));
}

#[test]
fn wal_dir_moves_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("elsewhere-wal");
    let mut s = Server::start(
        &dir.path().join("d"),
        &[
            "--wal-dir",
            wal.to_str().unwrap(),
            "--wal-segment-bytes",
            "1048576",
        ],
    );
    s.ok(&["put", "k", "v"]);
    let in_wal_dir = std::fs::read_dir(&wal)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".wal")
        })
        .count();
    assert_eq!(in_wal_dir, 1);
    assert!(
        !dir.path().join("d/member/wal").exists()
            || std::fs::read_dir(dir.path().join("d/member/wal"))
                .unwrap()
                .count()
                == 0
    );
    s.kill9();
    s.restart();
    assert_eq!(s.ok(&["get", "k", "--print-value-only"]), "v\n");
}
