//! `replication-floor`: the least a durable put can cost on this machine, whatever the
//! server. Threads stand in for members (the scheduler treats them as it treats processes),
//! talk over loopback TCP in fixed 256-byte messages and make each write durable with a
//! 4 KiB O_DIRECT write + fdatasync into a pre-zeroed file. No consensus, no storage engine,
//! no RPC framing: only the hand-offs and disk flushes every correct design must pay.
//!
//! - `loopback round trip`: client -> echo thread -> client (two wake-ups, no disk).
//! - `durable put, 1 member`: client -> member (write + fdatasync) -> client.
//! - `durable put, 3 members`: client -> leader; the leader sends to both followers, makes
//!   its own write durable meanwhile, then answers once one follower has acknowledged
//!   (a quorum of 2 of 3, as Raft): client -> leader -> follower (fdatasync) -> leader ->
//!   client, with the leader's flush in parallel.
//!
//! Blocking sockets and poll(2) throughout: nothing spins, as corekv does not by default.

use crate::fsync::Aligned;
use hdrhistogram::Histogram;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

const MESSAGE_BYTES: usize = 256;
const BLOCK_BYTES: u64 = 4096;
/// Writes cycle over this many pre-zeroed blocks per member file (4 MiB).
const RING_BLOCKS: u64 = 1024;

/// One member's durable log: a pre-zeroed file written block by block, O_DIRECT.
struct Log {
    file: std::fs::File,
    path: PathBuf,
    block: Aligned,
    next: u64,
}

impl Log {
    fn create(dir: &Path, name: &str) -> Result<Log, String> {
        let path = dir.join(format!(".corekv-replication-floor-{name}"));
        let block = Aligned::new(BLOCK_BYTES as usize);
        let file = crate::fsync::open_direct(&path, &block, RING_BLOCKS)?;
        Ok(Log {
            file,
            path,
            block,
            next: 0,
        })
    }

    /// One durable block, as a WAL append of a small entry is.
    fn append(&mut self) -> Result<(), String> {
        let at = (self.next % RING_BLOCKS) * BLOCK_BYTES;
        self.next += 1;
        self.file
            .write_all_at(self.block.slice(), at)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A connected loopback pair with Nagle off on both ends.
fn pair() -> Result<(TcpStream, TcpStream), String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let a = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let (b, _) = l.accept().map_err(|e| e.to_string())?;
    for s in [&a, &b] {
        s.set_nodelay(true).map_err(|e| e.to_string())?;
    }
    Ok((a, b))
}

fn send(s: &mut TcpStream, seq: u64) -> std::io::Result<()> {
    let mut m = [0u8; MESSAGE_BYTES];
    m[..8].copy_from_slice(&seq.to_le_bytes());
    s.write_all(&m)
}

fn recv(s: &mut TcpStream) -> std::io::Result<u64> {
    let mut m = [0u8; MESSAGE_BYTES];
    s.read_exact(&mut m)?;
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&m[..8]);
    Ok(u64::from_le_bytes(seq))
}

/// The peer went away: EOF, or a reset when it closed with our last answer unread (the
/// leader never reads the slower follower's final acknowledgement), or a broken pipe
/// when that follower was still sending it.
fn closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
    )
}

/// Answers every message with its sequence number, after a durable append when `log` is
/// given; returns when the peer closes.
fn serve(mut s: TcpStream, mut log: Option<Log>) -> Result<(), String> {
    loop {
        let seq = match recv(&mut s) {
            Ok(seq) => seq,
            Err(e) if closed(&e) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        if let Some(log) = &mut log {
            log.append()?;
        }
        match send(&mut s, seq) {
            Ok(()) => {}
            Err(e) if closed(&e) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Waits until either follower has acknowledged `seq`; acknowledgements of earlier
/// sequence numbers (the slower follower's) are consumed on the way.
fn await_quorum(
    followers: &mut [TcpStream; 2],
    acked: &mut [u64; 2],
    seq: u64,
) -> Result<(), String> {
    // Each pass reads at least one ack; each follower owes at most a few.
    for _ in 0..1_000_000 {
        if acked.iter().any(|&a| a >= seq) {
            return Ok(());
        }
        let mut fds = [0, 1].map(|i| libc::pollfd {
            fd: followers[i].as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: fds is a valid array of two pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 10_000) };
        if n <= 0 {
            return Err(format!("no follower acknowledged {seq} within 10 s"));
        }
        for i in 0..2 {
            if fds[i].revents != 0 {
                acked[i] = recv(&mut followers[i]).map_err(|e| e.to_string())?;
            }
        }
    }
    Err("quorum wait did not converge".into())
}

fn leader(
    mut client: TcpStream,
    mut followers: [TcpStream; 2],
    mut log: Log,
) -> Result<(), String> {
    let mut acked = [0u64; 2];
    loop {
        let seq = match recv(&mut client) {
            Ok(seq) => seq,
            Err(e) if closed(&e) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        for f in followers.iter_mut() {
            send(f, seq).map_err(|e| e.to_string())?;
        }
        log.append()?;
        await_quorum(&mut followers, &mut acked, seq)?;
        send(&mut client, seq).map_err(|e| e.to_string())?;
    }
}

/// Unrecorded requests first: the first round trips after idling pay for waking halted
/// vCPUs and cold caches, which a server under steady load does not.
const WARMUP_REQUESTS: u64 = 200;

/// Sends `count` requests one at a time over `s` (after the warm-up) and records each
/// round trip.
fn drive(mut s: TcpStream, count: u64) -> Result<Histogram<u64>, String> {
    let mut h = crate::new_histogram();
    for seq in 1..=WARMUP_REQUESTS + count {
        let start = Instant::now();
        send(&mut s, seq).map_err(|e| e.to_string())?;
        let got = recv(&mut s).map_err(|e| e.to_string())?;
        if got != seq {
            return Err(format!("answer {got} to request {seq}: out of order"));
        }
        if seq > WARMUP_REQUESTS {
            let _ = h.record((start.elapsed().as_micros() as u64).max(1));
        }
    }
    assert_eq!(h.len(), count, "one sample per recorded request");
    Ok(h)
}

type Servers = Vec<std::thread::JoinHandle<Result<(), String>>>;

fn join(servers: Servers) -> Result<(), String> {
    for t in servers {
        t.join()
            .map_err(|_| "floor thread panicked".to_string())??;
    }
    Ok(())
}

fn one(dir: &Path, count: u64, members: u8) -> Result<Histogram<u64>, String> {
    let (client, at_server) = pair()?;
    let mut servers: Servers = Vec::new();
    match members {
        0 => servers.push(std::thread::spawn(move || serve(at_server, None))),
        1 => {
            let log = Log::create(dir, "m1")?;
            servers.push(std::thread::spawn(move || serve(at_server, Some(log))));
        }
        3 => {
            let (to_f2, at_f2) = pair()?;
            let (to_f3, at_f3) = pair()?;
            let logs = [
                Log::create(dir, "m1")?,
                Log::create(dir, "m2")?,
                Log::create(dir, "m3")?,
            ];
            let [l1, l2, l3] = logs;
            servers.push(std::thread::spawn(move || serve(at_f2, Some(l2))));
            servers.push(std::thread::spawn(move || serve(at_f3, Some(l3))));
            servers.push(std::thread::spawn(move || {
                leader(at_server, [to_f2, to_f3], l1)
            }));
        }
        _ => unreachable!("members is 0, 1 or 3"),
    }
    let h = drive(client, count);
    // The client's stream closed: the leader returns, closing the followers' streams.
    let joined = join(servers);
    let h = h?;
    joined?;
    Ok(h)
}

/// Measures the three floors and prints them; returns (name, histogram) per floor.
pub fn run(
    dir: &Path,
    count: u64,
    json: bool,
) -> Result<Vec<(&'static str, Histogram<u64>)>, String> {
    if count == 0 {
        return Err("--count must be at least 1".into());
    }
    let mut results = Vec::new();
    for (name, members) in [
        ("loopback round trip", 0),
        ("durable put, 1 member", 1),
        ("durable put, 3 members", 3),
    ] {
        results.push((name, one(dir, count, members)?));
    }
    crate::fsync::print_floors("replication-floor", "", &results, json);
    Ok(results)
}
