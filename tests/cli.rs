//! The etcdctl-shaped verbs against a real server, in each output format.

mod common;
use base64::Engine;
use common::*;

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn put_get_del_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &SMALL_WAL);

    assert_eq!(s.ok(&["put", "foo", "bar"]), "OK\n");
    assert_eq!(s.ok(&["put", "foo", "bar2", "--prev-kv"]), "OK\nfoo\nbar\n");
    let put = json(&s.ok(&["put", "foo2", "x", "-w", "json"]));
    assert_eq!(put["header"]["revision"], 4);
    assert_eq!(put["header"]["member_id"], 10276657743932975437u64);
    assert_eq!(put["header"]["cluster_id"], 14841639068965178418u64);
    assert!(put["header"]["raft_term"].as_u64().unwrap() >= 1);
    s.ok(&["put", "foo3", "y"]);
    // A value read from standard input, as etcdctl does when it is omitted.
    let out = s.ctl_stdin(&["put", "fromstdin"], "piped value");
    assert!(out.status.success());
    assert_eq!(
        s.ok(&["get", "fromstdin", "--print-value-only"]),
        "piped value\n"
    );

    assert_eq!(s.ok(&["get", "foo"]), "foo\nbar2\n");
    assert_eq!(s.ok(&["get", "foo", "--print-value-only"]), "bar2\n");
    assert_eq!(
        s.ok(&["get", "foo", "--prefix", "--keys-only"]),
        "foo\n\nfoo2\n\nfoo3\n\n"
    );
    assert_eq!(s.ok(&["get", "foo", "foo3"]), "foo\nbar2\nfoo2\nx\n");
    assert_eq!(
        s.ok(&["get", "foo2", "--from-key", "--keys-only"]),
        "foo2\n\nfoo3\n\nfromstdin\n\n"
    );
    assert_eq!(s.ok(&["get", "nothere"]), "");

    let g = json(&s.ok(&["get", "foo", "-w", "json"]));
    assert_eq!(g["kvs"][0]["key"], b64("foo"));
    assert_eq!(g["kvs"][0]["value"], b64("bar2"));
    assert_eq!(g["kvs"][0]["create_revision"], 2);
    assert_eq!(g["kvs"][0]["mod_revision"], 3);
    assert_eq!(g["kvs"][0]["version"], 2);
    assert_eq!(g["count"], 1);
    assert!(
        g.get("more").is_none(),
        "zero values are omitted as in etcd: {g}"
    );
    // JSON keys come in etcd's order.
    let raw = s.ok(&["get", "foo", "-w", "json"]);
    assert!(raw.starts_with("{\"header\":{\"cluster_id\":"), "{raw}");

    let lim = json(&s.ok(&["get", "foo", "--prefix", "--limit", "1", "-w", "json"]));
    assert_eq!(lim["more"], true);
    assert_eq!(lim["count"], 3);
    assert_eq!(lim["kvs"].as_array().unwrap().len(), 1);

    let desc = s.ok(&[
        "get",
        "foo",
        "--prefix",
        "--keys-only",
        "--order",
        "DESCEND",
    ]);
    assert_eq!(desc, "foo3\n\nfoo2\n\nfoo\n\n");
    let by_mod = s.ok(&[
        "get",
        "f",
        "--prefix",
        "--keys-only",
        "--sort-by",
        "MODIFY",
        "--order",
        "DESCEND",
    ]);
    assert_eq!(by_mod, "fromstdin\n\nfoo3\n\nfoo2\n\nfoo\n\n");
    let count = json(&s.ok(&["get", "foo", "--prefix", "--count-only", "-w", "json"]));
    assert_eq!(count["count"], 3);
    assert!(count.get("kvs").is_none());
    assert_eq!(s.ok(&["get", "foo", "--rev", "2"]), "foo\nbar\n");
    assert_eq!(s.ok(&["get", "foo", "--consistency", "s"]), "foo\nbar2\n");
    assert!(s
        .fails(&["get", "foo", "-w", "table"])
        .contains("table not supported as output format"));

    assert_eq!(s.ok(&["del", "foo3"]), "1\n");
    assert_eq!(s.ok(&["del", "nothere"]), "0\n");
    assert_eq!(
        s.ok(&["del", "foo", "--prefix", "--prev-kv"]),
        "2\nfoo\nbar2\nfoo2\nx\n"
    );
    let d = json(&s.ok(&["del", "fromstdin", "-w", "json"]));
    assert_eq!(d["deleted"], 1);
    assert_eq!(s.ok(&["get", "foo", "--prefix"]), "");
    // History is still there below the deletes.
    assert_eq!(
        s.ok(&["get", "foo3", "--rev", "5", "--print-value-only"]),
        "y\n"
    );
}

#[test]
fn txn_compact_status_and_alarm_verbs() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &SMALL_WAL);
    s.ok(&["put", "k1", "v1"]);

    let txn = "mod(\"k1\") > \"0\"\nvalue(\"k1\") = \"v1\"\n\nput k1 \"new v\"\nget k1\ndel k9\n\nput k1 fail\n\n";
    let out = s.ctl_stdin(&["txn"], txn);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "SUCCESS\n\nOK\n\nk1\nnew v\n\n0\n"
    );

    let fail = "value(\"k1\") = \"nope\"\n\nput k1 x\n\nget k1\nput k2 \"b c\"\n\n";
    let out = s.ctl_stdin(&["txn", "-w", "json"], fail);
    let j = json(&String::from_utf8_lossy(&out.stdout));
    assert!(
        j.get("succeeded").is_none(),
        "failed txn has succeeded omitted: {j}"
    );
    assert_eq!(
        j["responses"][0]["Response"]["ResponseRange"]["kvs"][0]["value"],
        b64("new v")
    );
    assert!(j["responses"][1]["Response"]["ResponsePut"].is_object());
    assert_eq!(s.ok(&["get", "k2", "--print-value-only"]), "b c\n");

    let bad = s.ctl_stdin(&["txn"], "garbage(\n\n");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("malformed comparison"));

    // Revisions: k1@2, k1@3 (txn), k2@4.
    assert_eq!(s.ok(&["compact", "3"]), "compacted revision 3\n");
    assert!(s
        .fails(&["compact", "3"])
        .contains("Error: etcdserver: mvcc: required revision has been compacted"));
    assert!(s
        .fails(&["compact", "100"])
        .contains("required revision is a future revision"));
    assert!(s
        .fails(&["get", "k1", "--rev", "2"])
        .contains("required revision has been compacted"));
    assert!(s
        .fails(&["get", "k1", "--rev", "100"])
        .contains("required revision is a future revision"));
    assert_eq!(
        s.ok(&["get", "k1", "--rev", "3", "--print-value-only"]),
        "new v\n"
    );

    let st = s.ok(&["endpoint", "status"]);
    let cols: Vec<&str> = st.trim_end().split(", ").collect();
    assert_eq!(cols[0], s.endpoint());
    assert_eq!(cols[1], "8e9e05c52164694d");
    assert_eq!(cols[4], "true", "single member is leader: {st}");
    assert_eq!(cols[5], "false");
    let table = s.ok(&["endpoint", "status", "-w", "table"]);
    assert!(table.contains("| RAFT APPLIED INDEX |"), "{table}");
    assert!(table.contains("8e9e05c52164694d"), "{table}");
    let js = json(&s.ok(&["endpoint", "status", "-w", "json"]));
    let status = &js[0]["Status"];
    assert_eq!(status["leader"], 10276657743932975437u64);
    assert!(status["raftAppliedIndex"].as_u64().unwrap() >= 4);
    assert!(status["wal"]["batches"].as_u64().unwrap() >= 1, "{js}");
    assert!(status["wal"]["entries"].as_u64().unwrap() >= 4, "{js}");

    // etcd's HashKV, in etcdctl's three formats; a compacted or future revision fails.
    let simple = s.ok(&["endpoint", "hashkv"]);
    let (ep, hash) = simple.trim_end().split_once(", ").unwrap();
    assert_eq!(ep, s.endpoint());
    let hash: u32 = hash.parse().unwrap();
    let js = json(&s.ok(&["endpoint", "hashkv", "-w", "json"]));
    assert_eq!(js[0]["HashKV"]["hash"], hash);
    assert_eq!(js[0]["HashKV"]["compact_revision"], 3);
    let table = s.ok(&["endpoint", "hashkv", "-w", "table"]);
    assert!(
        table.contains(" ENDPOINT ") && table.contains(" HASH "),
        "{table}"
    );
    assert!(table.contains(&hash.to_string()), "{table}");
    // A later write changes the current hash, not the hash of history up to 4.
    s.ok(&["put", "k3", "later"]);
    assert_eq!(s.ok(&["endpoint", "hashkv", "--rev", "4"]), simple);
    assert_ne!(s.ok(&["endpoint", "hashkv"]), simple);
    assert!(s
        .fails(&["endpoint", "hashkv", "--rev", "2"])
        .contains("etcdserver: mvcc: required revision has been compacted"));
    assert!(s
        .fails(&["endpoint", "hashkv", "--rev", "100000"])
        .contains("etcdserver: mvcc: required revision is a future revision"));

    assert_eq!(s.ok(&["alarm", "list"]), "");
    assert_eq!(s.ok(&["alarm", "disarm"]), "");
}

#[test]
fn unknown_flags_and_bad_values_exit_nonzero() {
    let out = std::process::Command::new(BIN)
        .args(["serve", "--no-such-flag"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
    let out = std::process::Command::new(BIN)
        .args(["serve", "--snapshot-count", "lots"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value"));
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--heartbeat-interval",
            "500",
            "--election-timeout",
            "1000",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 5 times"));
    let out = std::process::Command::new(BIN)
        .args(["get"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn env_vars_configure_the_server_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("from-env");
    let port = free_port();
    let mut child = std::process::Command::new(BIN)
        .arg("serve")
        .env("ETCD_DATA_DIR", &data)
        .env("COREKV_LISTEN_NATIVE_URLS", format!("127.0.0.1:{port}"))
        .env(
            "ETCD_LISTEN_CLIENT_URLS",
            format!("127.0.0.1:{}", free_port()),
        )
        .env(
            "ETCD_LISTEN_PEER_URLS",
            format!("http://127.0.0.1:{}", free_port()),
        )
        .env("ETCD_SNAPSHOT_COUNT", "not-a-number-but-overridden")
        .args(["--snapshot-count", "100", "--wal-segment-bytes", "1048576"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ep = format!("127.0.0.1:{port}");
    let mut ok = false;
    for _ in 0..200 {
        let out = std::process::Command::new(BIN)
            .args(["put", "a", "b", "--endpoints", &ep])
            .output()
            .unwrap();
        if out.status.success() {
            ok = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "server configured from env did not come up");
    assert!(
        data.join("member/wal").is_dir(),
        "ETCD_DATA_DIR was honoured"
    );
}
