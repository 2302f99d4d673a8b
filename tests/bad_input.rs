//! Bad input gets etcd's error and loses nothing; the server keeps serving.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

#[test]
fn garbage_and_abrupt_closes_on_the_native_port() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(&dir.path().join("d"), &SMALL_WAL);
    s.ok(&["put", "before", "1"]);

    // A long-lived good client keeps working across the abuse below.
    let ep = s.endpoint();
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    for round in 0..20 {
        let mut c = TcpStream::connect(&ep).unwrap();
        let garbage: Vec<u8> = (0..4096)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let n = if round % 2 == 0 { garbage.len() } else { 7 };
        let _ = c.write_all(&garbage[..n]);
        drop(c); // abrupt close, possibly mid-frame
    }
    // A frame that declares a 2 GiB segment: refused before allocating.
    let mut c = TcpStream::connect(&ep).unwrap();
    let mut frame = Vec::new();
    frame.extend_from_slice(&0u32.to_le_bytes()); // one segment
    frame.extend_from_slice(&(1u32 << 28).to_le_bytes()); // 2^28 words
    frame.extend_from_slice(&[0u8; 64]);
    c.write_all(&frame).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The server answers with a capnp Abort naming the limit, then closes.
    let mut reply = Vec::new();
    c.read_to_end(&mut reply)
        .expect("connection closed, not timed out");
    assert!(String::from_utf8_lossy(&reply).contains("too large"));
    // A connection that sends half a valid-looking header then waits, then vanishes.
    let mut half = TcpStream::connect(&ep).unwrap();
    half.write_all(&[0, 0, 0, 0, 10]).unwrap();

    assert!(s.is_running(), "server died on garbage input");
    assert_eq!(s.ok(&["get", "before", "--print-value-only"]), "1\n");
    s.ok(&["put", "after", "2"]);
    drop(half);
    assert_eq!(s.ok(&["get", "after", "--print-value-only"]), "2\n");
}

#[test]
fn etcd_errors_for_invalid_requests() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &SMALL_WAL);

    assert!(s
        .fails(&["put", "", "v"])
        .contains("Error: etcdserver: key is not provided"));
    assert!(s
        .fails(&["get", ""])
        .contains("etcdserver: key is not provided"));
    assert!(s
        .fails(&["del", ""])
        .contains("etcdserver: key is not provided"));
    assert!(s
        .fails(&["put", "k", "--ignore-value"])
        .contains("etcdserver: key not found"));
    assert!(s
        .fails(&["put", "k", "v", "--lease", "1234"])
        .contains("etcdserver: requested lease not found"));

    // Just over --max-request-bytes (1.5 MiB): etcd's "request is too large".
    let big = "x".repeat(1_600_000);
    let out = s.ctl_stdin(&["put", "big"], &big);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("etcdserver: request is too large"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Far over: refused by the transport's size limit, server unharmed.
    let huge = "x".repeat(4 << 20);
    let out = s.ctl_stdin(&["put", "huge"], &huge);
    assert!(!out.status.success());
    // Just under the limit works.
    let ok = "y".repeat(1_000_000);
    assert!(s.ctl_stdin(&["put", "fits"], &ok).status.success());

    let mut txn = String::from("\n");
    for i in 0..129 {
        txn.push_str(&format!("put k{i} v\n"));
    }
    txn.push('\n');
    let out = s.ctl_stdin(&["txn"], &txn);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("etcdserver: too many operations in txn request"));
    let out = s.ctl_stdin(&["txn"], "\nput a 1\nput a 2\n\n");
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("etcdserver: duplicate key given in txn request"));
    let out = s.ctl_stdin(&["txn"], "\ndel a c\nput b 2\n\n");
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("etcdserver: duplicate key given in txn request"));
    // None of the refused requests changed anything.
    assert_eq!(s.ok(&["get", "a", "--prefix", "--keys-only"]), "");
    let none = json(&s.ok(&["get", "k", "--prefix", "--count-only", "-w", "json"]));
    assert!(none.get("count").is_none(), "no key k* was written: {none}");
    assert_eq!(
        s.ok(&["get", "fits", "--print-value-only"]).len(),
        1_000_001
    );
}

#[test]
fn quota_raises_nospace_then_disarm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let quota = 400_000u64;
    let quota_flag = quota.to_string();
    let mut s = Server::start(
        &data,
        &[
            "--wal-segment-bytes",
            "1048576",
            "--quota-backend-bytes",
            &quota_flag,
        ],
    );
    let value = "v".repeat(30_000);
    let mut refused = None;
    for i in 0..100 {
        let out = s.ctl_stdin(&["put", &format!("k{i:03}")], &value);
        if !out.status.success() {
            refused = Some((i, String::from_utf8_lossy(&out.stderr).into_owned()));
            break;
        }
    }
    let (at, err) = refused.expect("quota never reached");
    assert!(at > 3, "refused too early at put {at}");
    assert!(
        err.contains("etcdserver: mvcc: database space exceeded"),
        "{err}"
    );
    // The alarm is raised (asynchronously through raft) and then refuses every put.
    let mut listed = String::new();
    for _ in 0..100 {
        listed = s.ok(&["alarm", "list"]);
        if !listed.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(listed, "memberID:10276657743932975437 alarm:NOSPACE \n");
    assert!(s
        .fails(&["put", "tiny", "x"])
        .contains("database space exceeded"));
    let txn = s.ctl_stdin(&["txn"], "\nput t 1\n\n");
    assert!(String::from_utf8_lossy(&txn.stderr).contains("database space exceeded"));
    // Reads and deletes still work.
    assert_eq!(
        s.ok(&["get", "k000", "--print-value-only"]).len(),
        value.len() + 1
    );
    assert_eq!(s.ok(&["del", "k000"]), "1\n");
    let st = s.ok(&["endpoint", "status"]);
    assert!(st.contains("alarm:NOSPACE"), "status lists the alarm: {st}");

    // The alarm is persisted: it survives a restart (with room to grow now).
    s.kill9();
    s.extra = vec![
        "--wal-segment-bytes".into(),
        "1048576".into(),
        "--quota-backend-bytes".into(),
        "100000000".into(),
    ];
    s.restart();
    assert!(s.ok(&["alarm", "list"]).contains("alarm:NOSPACE"));
    assert!(s
        .fails(&["put", "tiny", "x"])
        .contains("database space exceeded"));
    assert_eq!(
        s.ok(&["alarm", "disarm"]),
        "memberID:10276657743932975437 alarm:NOSPACE \n"
    );
    assert_eq!(s.ok(&["alarm", "list"]), "");
    assert_eq!(s.ok(&["put", "tiny", "x"]), "OK\n");
}
