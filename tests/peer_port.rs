//! The peer port as an outsider sees it (plaintext peers, 3 real members on 127.0.0.N):
//! an invented member ID, a real member's ID from another address, a member-list request
//! from a stranger, oversized frames before the hello (memory must not follow the
//! declared length), and — from a member's own address, which plaintext cannot tell
//! apart — raft messages no correct member sends (a commit far beyond the log, messages
//! to another member). The cluster must refuse, stay up and keep serving.

mod common;

use common::cluster::Cluster;
use corekv::actors::peer::{
    encode_frame, encode_messages, Hello, HelloAck, Purpose, KIND_HELLO, KIND_HELLO_ACK,
    KIND_MESSAGES, KIND_SNAP_CHUNK, KIND_SNAP_END,
};
use raft::eraftpb::{Message, MessageType};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// A TCP connection to `to` from the loopback address `from_ip`.
fn connect_from(from_ip: &str, to: &str) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let src: SocketAddr = format!("{from_ip}:0").parse().unwrap();
    sock.bind(&src.into()).unwrap();
    let dst: SocketAddr = to.parse().unwrap();
    sock.connect_timeout(&dst.into(), Duration::from_secs(2))
        .unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Sends a hello and reads the ack (None: the member closed the connection).
fn hello(s: &mut TcpStream, h: &Hello) -> Option<HelloAck> {
    let mut frame = Vec::new();
    encode_frame(&mut frame, KIND_HELLO, &postcard::to_allocvec(h).unwrap());
    s.write_all(&frame).ok()?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut buf).ok()?;
    assert_eq!(buf[0], KIND_HELLO_ACK);
    Some(postcard::from_bytes(&buf[1..]).unwrap())
}

/// True once the member closed `s` (a read returns 0 or fails with a reset).
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 16];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn outsiders_on_the_peer_port_are_refused_and_bad_messages_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 61, 3, &[]);
    let leader = c.leader(Duration::from_secs(10)).expect("leader");
    // The member an insider message claims to come from: not the leader.
    let sender = if leader == 1 { 2 } else { 1 };
    let ids: Vec<u64> = c
        .nodes
        .iter()
        .map(|n| corekv::cluster::member_id(&[n.peer_url()], &c.token, None))
        .collect();
    let cluster_id = corekv::cluster::cluster_id(&ids);
    let target = format!("{}:{}", c.nodes[0].ip, c.nodes[0].peer_port);
    let raft_hello = |from: u64| Hello {
        cluster_id,
        from,
        to: ids[0],
        purpose: Purpose::Raft,
        urls: Vec::new(),
    };

    // An invented member ID.
    let mut s = connect_from("127.0.0.1", &target);
    let ack = hello(&mut s, &raft_hello(0xdead_beef));
    assert!(matches!(ack, Some(HelloAck::NotMember)), "{ack:?}");
    assert!(closed(&mut s));
    // A real member's ID, but not from its address.
    let mut s = connect_from("127.0.0.1", &target);
    let ack = hello(&mut s, &raft_hello(ids[1]));
    assert!(matches!(ack, Some(HelloAck::NotMember)), "{ack:?}");
    // This member's own ID.
    let mut s = connect_from(&c.nodes[0].ip, &target);
    let ack = hello(&mut s, &raft_hello(ids[0]));
    assert!(matches!(ack, Some(HelloAck::NotMember)), "{ack:?}");
    // The member list, asked for by a stranger (no URLs, or URLs of no member).
    for urls in [vec![], vec!["http://127.0.0.1:1".to_string()]] {
        let mut s = connect_from("127.0.0.1", &target);
        let ack = hello(
            &mut s,
            &Hello {
                cluster_id: 0,
                from: 0,
                to: 0,
                purpose: Purpose::FetchMembers,
                urls,
            },
        );
        assert!(
            matches!(ack, Some(HelloAck::NotMember)),
            "member list served: {ack:?}"
        );
    }
    // ... and by someone naming a member's URLs from elsewhere.
    let mut s = connect_from("127.0.0.1", &target);
    let ack = hello(
        &mut s,
        &Hello {
            cluster_id: 0,
            from: 0,
            to: 0,
            purpose: Purpose::FetchMembers,
            urls: vec![c.nodes[1].peer_url()],
        },
    );
    assert!(matches!(ack, Some(HelloAck::NotMember)), "{ack:?}");
    let log = c.nodes[0].log_text();
    assert!(log.contains("not a member of this cluster"), "{log}");
    assert!(log.contains("not from its peer URLs' addresses"), "{log}");

    // Frames declaring 64 MiB before any hello: refused at once, memory unmoved.
    let pid = c.nodes[0].child.as_ref().unwrap().id();
    let before = rss_kib(pid);
    let mut held = Vec::new();
    for _ in 0..100 {
        let mut s = connect_from("127.0.0.1", &target);
        let mut f = ((64u32 << 20) - 1).to_le_bytes().to_vec();
        f.push(KIND_HELLO);
        f.extend_from_slice(&[0u8; 1024]);
        let _ = s.write_all(&f);
        held.push(s);
    }
    for s in held.iter_mut() {
        assert!(closed(s), "an oversized pre-hello frame was not refused");
    }
    let after = rss_kib(pid);
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} KiB to {after} KiB on 100 oversized frames"
    );
    drop(held);

    // From a follower's own address (plaintext cannot tell it apart): a heartbeat whose
    // commit is far beyond the log, a snapshot from a member that does not lead, and a
    // message addressed to another member.
    let mut s = connect_from(&c.nodes[sender].ip, &target);
    let ack = hello(&mut s, &raft_hello(ids[sender]));
    assert!(matches!(ack, Some(HelloAck::Ok)), "{ack:?}");
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgHeartbeat);
    m.from = ids[sender];
    m.to = ids[0];
    m.term = 0; // a stale term: raft ignores it whatever the commit
    m.commit = 1_000_000_000;
    let mut frame = Vec::new();
    encode_frame(
        &mut frame,
        KIND_MESSAGES,
        &encode_messages(&[m.clone()]).unwrap(),
    );
    s.write_all(&frame).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.nodes[0].log_text().contains("beyond the last index") {
        assert!(Instant::now() < deadline, "{}", c.nodes[0].log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let term = c.nodes[0].status().expect("status").2;
    let mut snap = Message::default();
    snap.set_msg_type(MessageType::MsgSnapshot);
    snap.from = ids[sender];
    snap.to = ids[0];
    snap.term = term;
    snap.mut_snapshot().mut_metadata().index = 1_000_000;
    snap.mut_snapshot().mut_metadata().term = term;
    let data = b"not a snapshot";
    frame.clear();
    encode_frame(&mut frame, KIND_SNAP_CHUNK, data);
    let mut end = crc32c::crc32c(data).to_le_bytes().to_vec();
    end.extend_from_slice(&protobuf::Message::write_to_bytes(&snap).unwrap());
    encode_frame(&mut frame, KIND_SNAP_END, &end);
    s.write_all(&frame).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.nodes[0].log_text().contains("not the leader") {
        assert!(Instant::now() < deadline, "{}", c.nodes[0].log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    m.to = ids[3 - sender]; // the third member
    frame.clear();
    encode_frame(&mut frame, KIND_MESSAGES, &encode_messages(&[m]).unwrap());
    s.write_all(&frame).unwrap();
    assert!(
        closed(&mut s),
        "a message to another member was not refused"
    );

    // Every member is still up, and the cluster still commits.
    std::thread::sleep(Duration::from_millis(500));
    for n in c.nodes.iter_mut() {
        assert!(n.is_running(), "{} died:\n{}", n.name, n.log_text());
    }
    c.nodes[0].ok(&["put", "after-outsiders", "1"]);
    let got = c.nodes[2].ok(&["get", "after-outsiders", "--print-value-only"]);
    assert_eq!(got.trim(), "1");
}
