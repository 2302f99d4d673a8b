//! WAL recovery with a real server: a torn final record is cut off and the server
//! starts; a flipped byte earlier in the log (even in already-applied records) makes it
//! refuse to start with an error naming the file and offset.

mod common;
use common::*;
use corekv::storage::wal::{self, Decoded};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

fn segments(data: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(data.join("member/wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    v.sort();
    v
}

/// Offsets of every record in a segment.
fn record_offsets(path: &Path) -> Vec<usize> {
    let buf = std::fs::read(path).unwrap();
    let mut pos = 0;
    let mut out = Vec::new();
    while let Decoded::Record { next, .. } = wal::decode_at(&buf, pos) {
        out.push(pos);
        pos = next;
    }
    out
}

#[test]
fn torn_tail_recovers_and_mid_log_flip_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let mut s = Server::start(&data, &SMALL_WAL);
    for i in 0..20 {
        s.ok(&["put", &format!("k{i:02}"), &format!("v{i}")]);
    }
    s.kill9();

    // Tear the last record: zero its second half, as a crash mid-write would leave it.
    let seg = segments(&data).pop().unwrap();
    let offs = record_offsets(&seg);
    assert!(
        offs.len() > 20,
        "expected the puts' records, found {}",
        offs.len()
    );
    let last = *offs.last().unwrap() as u64;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    f.write_all_at(&[0u8; 6], last + 10).unwrap();
    drop(f);
    s.restart();
    assert!(std::fs::read_to_string(&s.log)
        .unwrap()
        .contains("torn final write"));
    // Every acknowledged put is there (the torn record was at most an unacknowledged
    // hard state or the last entry, which LMDB already holds after apply).
    for i in 0..20 {
        assert_eq!(
            s.ok(&["get", &format!("k{i:02}"), "--print-value-only"]),
            format!("v{i}\n")
        );
    }
    s.ok(&["put", "after", "torn"]);
    s.kill9();

    // Flip one byte in an early record (long applied): the server must refuse.
    let seg = segments(&data).pop().unwrap();
    let offs = record_offsets(&seg);
    let victim = offs[3] as u64 + 12;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, victim).unwrap();
    f.write_all_at(&[b[0] ^ 0x20], victim).unwrap();
    drop(f);
    let out = s.command().output().unwrap();
    assert!(!out.status.success(), "server started on a corrupt WAL");
    let err = String::from_utf8_lossy(&out.stderr);
    let name = seg.file_name().unwrap().to_string_lossy().to_string();
    assert!(err.contains(&name), "error names the file: {err}");
    assert!(
        err.contains(&format!("offset {}", offs[3])),
        "error names the offset: {err}"
    );
    assert!(err.contains("crc mismatch"), "{err}");
}

#[test]
fn truncated_segment_file_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let mut s = Server::start(&data, &SMALL_WAL);
    for i in 0..5 {
        s.ok(&["put", &format!("k{i}"), "v"]);
    }
    s.kill9();
    // Cut the file in the middle of its last record.
    let seg = segments(&data).pop().unwrap();
    let last = *record_offsets(&seg).last().unwrap() as u64;
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(last + 11).unwrap();
    drop(f);
    s.restart();
    let count = json(&s.ok(&["get", "k", "--prefix", "--count-only", "-w", "json"]));
    assert_eq!(count["count"], 5);
    // And it keeps working across another restart.
    s.ok(&["put", "k9", "v"]);
    s.kill9();
    s.restart();
    assert_eq!(s.ok(&["get", "k9", "--print-value-only"]), "v\n");
}
