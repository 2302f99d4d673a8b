//! Peer transport actor (on the raft shard): one outbound TCP connection per peer that
//! carries batched raft messages, and a listener whose connections feed incoming
//! messages to the raft actor. Snapshots are streamed in chunks behind their message
//! and CRC-checked on receipt. Connections start with a hello naming the cluster and
//! both members, so a member of another cluster (wrong token) or a removed member is
//! refused with a clear error instead of being merged.
//!
//! Wire format: frames of `u32 LE length | u8 kind | payload`, at most
//! `MAX_FRAME_BYTES` (`HELLO_MAX_BYTES` before the hello is accepted). Each direction of
//! a member pair has its own connection (like etcd's streams), so a connection is
//! written by one side only.
//!
//! The peer port is hostile until a hello is accepted: only a current member of this
//! cluster is, and only from where it may be (with peer TLS and --peer-client-cert-auth,
//! a certificate valid for one of its peer URLs' hosts; without, a source address among
//! its peer URLs' IPs when they are IP literals). `https://` peer URLs speak TLS
//! (`super::peer_stream`).

use super::peer_stream::PeerStream;
use crate::cluster::Member;
use crate::storage::backend::Store;
use futures::channel::mpsc;
use futures::io::{AsyncReadExt, AsyncWriteExt};
use futures::{SinkExt, StreamExt};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

pub const MAX_FRAME_BYTES: usize = 64 << 20;
/// Frames a connection may send before its hello is accepted (a hello with a few URLs).
pub const HELLO_MAX_BYTES: usize = 4 << 10;
/// A frame's buffer grows by at most this much per read: memory follows the bytes that
/// arrived, not the length a frame declares.
const READ_STEP_BYTES: usize = 64 << 10;
const _: () = assert!(HELLO_MAX_BYTES < READ_STEP_BYTES && READ_STEP_BYTES < MAX_FRAME_BYTES);
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Messages queued per peer; when full, further messages are dropped (raft resends)
/// and the peer is reported unreachable.
const PEER_QUEUE: usize = 4096;
/// Messages written per frame.
const MAX_BATCH_MESSAGES: usize = 512;
/// Read buffer of an inbound peer stream: one recv takes every frame that has arrived
/// (unbuffered, each frame cost a recv for its length, one for its body and a failed one
/// before the next: syscalls are ~10 µs each on the dev VM).
const RECEIVE_BUFFER_BYTES: usize = 64 << 10;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

pub const KIND_HELLO: u8 = 1;
pub const KIND_HELLO_ACK: u8 = 2;
pub const KIND_MESSAGES: u8 = 3;
pub const KIND_SNAP_CHUNK: u8 = 4;
pub const KIND_SNAP_END: u8 = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Purpose {
    Raft,
    /// A member joining with `--initial-cluster-state existing` asks for the membership.
    FetchMembers,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub cluster_id: u64,
    pub from: u64,
    pub to: u64,
    pub purpose: Purpose,
    /// FetchMembers: the asking member's peer URLs (it is served only if a member with
    /// exactly these URLs was added). Empty for Raft.
    pub urls: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum HelloAck {
    Ok,
    ClusterMismatch {
        ours: u64,
    },
    Removed,
    WrongMember {
        ours: u64,
    },
    /// The sender is not a current member, or not where that member may be.
    NotMember,
    Members {
        cluster_id: u64,
        members: Vec<Member>,
    },
}

/// What the transport reports to the raft actor.
pub enum PeerEvent {
    Message(Box<Message>),
    Unreachable(u64),
    SnapshotSent { to: u64, ok: bool },
}

pub fn encode_frame(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    assert!(payload.len() < MAX_FRAME_BYTES, "frame too large");
    out.extend_from_slice(&((payload.len() + 1) as u32).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
}

/// Reads one frame of at most `limit_bytes`; errors on a longer one or a closed stream.
/// The buffer grows with the bytes that arrive (`READ_STEP_BYTES` at a time), so a
/// frame that declares 64 MiB and sends nothing costs nothing.
pub async fn read_frame<R: futures::io::AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    limit_bytes: usize,
) -> std::io::Result<u8> {
    assert!(limit_bytes <= MAX_FRAME_BYTES);
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > limit_bytes {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("peer frame of {len} bytes (limit {limit_bytes})"),
        ));
    }
    buf.clear();
    if buf.capacity() > 2 * SNAPSHOT_CHUNK_BYTES {
        buf.shrink_to(SNAPSHOT_CHUNK_BYTES);
    }
    // Bounded: each turn reads at least one byte more, up to `len`.
    while buf.len() < len {
        let start = buf.len();
        buf.resize(start + (len - start).min(READ_STEP_BYTES), 0);
        r.read_exact(&mut buf[start..]).await?;
    }
    assert_eq!(buf.len(), len);
    let kind = buf[0];
    buf.drain(..1);
    Ok(kind)
}

fn invalid(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// A batch of messages as one frame payload: `u32 LE length | protobuf` each.
pub fn encode_messages(msgs: &[Message]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for m in msgs {
        let b = m
            .write_to_bytes()
            .map_err(|e| invalid(format!("encode raft message: {e}")))?;
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(&b);
    }
    Ok(out)
}

pub fn decode_messages(mut payload: &[u8]) -> std::io::Result<Vec<Message>> {
    let mut out = Vec::new();
    while !payload.is_empty() {
        if payload.len() < 4 {
            return Err(invalid("truncated message length"));
        }
        let n = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
        let body = payload
            .get(4..4 + n)
            .ok_or_else(|| invalid("truncated raft message"))?;
        out.push(
            Message::parse_from_bytes(body).map_err(|e| invalid(format!("raft message: {e}")))?,
        );
        payload = &payload[4 + n..];
    }
    Ok(out)
}

/// Shared by the transport's tasks (all on the raft shard's executor).
pub struct Ctx {
    pub cluster_id: u64,
    pub member_id: u64,
    pub backend: Store,
    pub snap_dir: PathBuf,
    /// Peer ID -> peer URLs; updated by the raft actor on membership changes.
    pub peers: RefCell<HashMap<u64, Vec<String>>>,
    /// Source address for outbound connections (the host of --listen-peer-urls), so
    /// per-address firewall rules between members take effect (partition tests).
    pub bind_ip: Option<std::net::IpAddr>,
    pub to_raft: mpsc::Sender<PeerEvent>,
    /// TCP_USER_TIMEOUT for outbound connections: unacknowledged data for longer than
    /// this breaks the connection, which then reconnects (instead of waiting out TCP's
    /// exponential retransmit backoff after a partition heals).
    pub user_timeout_ms: u32,
    /// host:port -> address resolved at start-up through --discovery-dns-server.
    pub resolved: HashMap<String, std::net::SocketAddr>,
    /// Peer TLS (`https://` peer URLs are dialed and served with it).
    pub tls: Option<crate::tls::TlsSide>,
}

/// The raft actor's handle: per-peer queues, each drained by one connection task.
pub struct Transport {
    ctx: Rc<Ctx>,
    queues: HashMap<u64, mpsc::Sender<Message>>,
}

impl Transport {
    pub fn new(ctx: Rc<Ctx>) -> Transport {
        let mut t = Transport {
            ctx,
            queues: HashMap::new(),
        };
        t.sync_peers();
        t
    }

    pub fn ctx(&self) -> &Rc<Ctx> {
        &self.ctx
    }

    /// Starts connection tasks for new peers and stops those of removed ones.
    pub fn sync_peers(&mut self) {
        let peers: Vec<u64> = self.ctx.peers.borrow().keys().copied().collect();
        self.queues.retain(|id, _| peers.contains(id));
        for id in peers {
            if id == self.ctx.member_id || self.queues.contains_key(&id) {
                continue;
            }
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            self.queues.insert(id, tx);
            glommio::spawn_local(outbound(self.ctx.clone(), id, rx)).detach();
        }
    }

    /// Queues messages to their peers; messages for unknown members are dropped.
    pub fn send(&mut self, msgs: Vec<Message>) {
        let mut unreachable = Vec::new();
        for m in msgs {
            let to = m.to;
            match self.queues.get_mut(&to) {
                Some(q) => {
                    if let Err(e) = q.try_send(m) {
                        let m = e.into_inner();
                        if m.get_msg_type() == MessageType::MsgSnapshot {
                            let _ = self
                                .ctx
                                .to_raft
                                .clone()
                                .try_send(PeerEvent::SnapshotSent { to, ok: false });
                        }
                        if !unreachable.contains(&to) {
                            unreachable.push(to);
                        }
                    }
                }
                None => {
                    tracing::debug!(to = %format!("{to:x}"), "message for unknown member dropped")
                }
            }
        }
        for to in unreachable {
            let _ = self
                .ctx
                .to_raft
                .clone()
                .try_send(PeerEvent::Unreachable(to));
        }
    }
}

/// Non-blocking connect bound to `bind_ip`, wrapped for glommio once connected.
async fn connect(ctx: &Ctx, addr: &str) -> std::io::Result<glommio::net::TcpStream> {
    use std::net::ToSocketAddrs;
    use std::os::unix::io::{AsRawFd, FromRawFd, IntoRawFd};
    let target = match ctx.resolved.get(addr) {
        Some(sa) => *sa,
        None => addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| invalid(format!("{addr}: no address")))?,
    };
    let domain = socket2::Domain::for_address(target);
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    sock.set_nodelay(true)?;
    if let Some(ip) = ctx.bind_ip {
        if ip.is_ipv4() == target.is_ipv4() {
            sock.bind(&std::net::SocketAddr::new(ip, 0).into())?;
        }
    }
    set_user_timeout(sock.as_raw_fd(), ctx.user_timeout_ms);
    match sock.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // Loopback connects finish within microseconds; poll instead of blocking the shard.
    let deadline = std::time::Instant::now() + CONNECT_TIMEOUT;
    loop {
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n > 0 {
            if let Some(e) = sock.take_error()? {
                return Err(e);
            }
            break;
        }
        if std::time::Instant::now() >= deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect {addr}: timed out"),
            ));
        }
        glommio::timer::sleep(Duration::from_millis(2)).await;
    }
    // SAFETY: the fd is a connected TCP socket whose ownership moves to glommio.
    Ok(unsafe { glommio::net::TcpStream::from_raw_fd(sock.into_raw_fd()) })
}

fn set_user_timeout(fd: i32, ms: u32) {
    // SAFETY: setsockopt with a u32 option value on a socket we own.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            &ms as *const u32 as *const libc::c_void,
            std::mem::size_of::<u32>() as libc::socklen_t,
        );
    }
}

/// Dials `url` (TLS for `https://`, checking the certificate names the URL's host and
/// the allowed CN/hostname).
async fn dial(ctx: &Ctx, url: &str) -> Result<PeerStream, String> {
    let addr = crate::cluster::host_port(url);
    let tcp = connect(ctx, &addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    if !crate::tls::url_is_tls(url)? {
        return Ok(PeerStream::Plain(tcp));
    }
    let side = ctx
        .tls
        .as_ref()
        .ok_or_else(|| format!("{url} is https but this member has no peer TLS"))?;
    let name = crate::tls::server_name(&addr)?;
    let connector = futures_rustls::TlsConnector::from(side.client.clone());
    let s = match glommio::timer::timeout(CONNECT_TIMEOUT, async {
        Ok(connector.connect(name, tcp).await)
    })
    .await
    {
        Ok(Ok(s)) => PeerStream::Dialed(Box::new(s)),
        Ok(Err(e)) => return Err(format!("TLS handshake with {addr}: {e}")),
        Err(e) => return Err(format!("TLS handshake with {addr}: {e}")),
    };
    crate::tls::check_identity(side, s.peer_certificates()).map_err(|e| format!("{addr}: {e}"))?;
    Ok(s)
}

/// Connects to `to` and says hello; errors name the reason.
async fn handshake(ctx: &Ctx, to: u64) -> Result<PeerStream, String> {
    let urls = ctx.peers.borrow().get(&to).cloned().unwrap_or_default();
    let mut last_err = format!("member {to:x} has no peer URL");
    for url in urls {
        let addr = crate::cluster::host_port(&url);
        let mut s = match dial(ctx, &url).await {
            Ok(s) => s,
            Err(e) => {
                last_err = e;
                continue;
            }
        };
        let hello = Hello {
            cluster_id: ctx.cluster_id,
            from: ctx.member_id,
            to,
            purpose: Purpose::Raft,
            urls: Vec::new(),
        };
        let hello_bytes = match postcard::to_allocvec(&hello) {
            Ok(b) => b,
            Err(e) => return Err(format!("encode hello: {e}")),
        };
        let mut frame = Vec::new();
        encode_frame(&mut frame, KIND_HELLO, &hello_bytes);
        let ack = async {
            s.write_all(&frame).await?;
            s.flush().await?;
            let mut buf = Vec::new();
            let kind = read_frame(&mut s, &mut buf, HELLO_MAX_BYTES).await?;
            if kind != KIND_HELLO_ACK {
                return Err(invalid("expected hello ack"));
            }
            postcard::from_bytes::<HelloAck>(&buf).map_err(|e| invalid(e.to_string()))
        };
        match glommio::timer::timeout(CONNECT_TIMEOUT, async { Ok(ack.await) }).await {
            Ok(Ok(HelloAck::Ok)) => return Ok(s),
            Ok(Ok(HelloAck::ClusterMismatch { ours })) => {
                last_err = format!(
                    "cluster ID mismatch: member {to:x} at {addr} is in cluster {ours:x}, this member in {:x}",
                    ctx.cluster_id
                );
                tracing::error!("{last_err}");
            }
            Ok(Ok(HelloAck::Removed)) => {
                let msg = "this member has been permanently removed from the cluster";
                tracing::error!("{msg}");
                eprintln!("corekv: fatal: {msg}");
                std::process::exit(1);
            }
            Ok(Ok(HelloAck::WrongMember { ours })) => {
                last_err = format!("member ID mismatch: {addr} is member {ours:x}, not {to:x}");
                tracing::error!("{last_err}");
            }
            Ok(Ok(HelloAck::NotMember)) => {
                last_err = format!(
                    "{addr} refused this member ({:x}): not a member there, or not from its peer URLs' addresses",
                    ctx.member_id
                );
                tracing::error!("{last_err}");
            }
            Ok(Ok(HelloAck::Members { .. })) => last_err = "unexpected hello ack".into(),
            Ok(Err(e)) => last_err = format!("hello to {addr}: {e}"),
            Err(e) => last_err = format!("hello to {addr}: {e}"),
        }
    }
    Err(last_err)
}

/// One peer's outbound connection: reconnects with backoff, drops what queued meanwhile.
async fn outbound(ctx: Rc<Ctx>, to: u64, mut rx: mpsc::Receiver<Message>) {
    let mut backoff = BACKOFF_MIN;
    let mut was_up = true;
    // Ends when the peer is removed (its queue's sender is dropped).
    loop {
        let mut stream = match handshake(&ctx, to).await {
            Ok(s) => {
                if !was_up {
                    tracing::info!(peer = %format!("{to:x}"), "peer connection established");
                }
                was_up = true;
                backoff = BACKOFF_MIN;
                s
            }
            Err(e) => {
                if was_up {
                    tracing::warn!(peer = %format!("{to:x}"), "peer unreachable: {e}");
                }
                was_up = false;
                let _ = ctx.to_raft.clone().try_send(PeerEvent::Unreachable(to));
                if !drain_failed(&ctx, to, &mut rx) {
                    return;
                }
                glommio::timer::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        loop {
            let Some(first) = rx.next().await else { return };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH_MESSAGES {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            if let Err(e) = write_batch(&ctx, &mut stream, batch).await {
                tracing::warn!(peer = %format!("{to:x}"), "peer connection lost: {e}");
                let _ = ctx.to_raft.clone().try_send(PeerEvent::Unreachable(to));
                break;
            }
        }
    }
}

/// Drops queued messages while a peer is down, failing queued snapshots. Returns false
/// once the queue is closed.
fn drain_failed(ctx: &Ctx, to: u64, rx: &mut mpsc::Receiver<Message>) -> bool {
    for _ in 0..PEER_QUEUE {
        match rx.try_recv() {
            Ok(m) => {
                if m.get_msg_type() == MessageType::MsgSnapshot {
                    let _ = ctx
                        .to_raft
                        .clone()
                        .try_send(PeerEvent::SnapshotSent { to, ok: false });
                }
            }
            Err(mpsc::TryRecvError::Closed) => return false,
            Err(mpsc::TryRecvError::Empty) => return true,
        }
    }
    true
}

/// Writes plain messages as one frame; snapshots are streamed separately.
async fn write_batch(
    ctx: &Ctx,
    stream: &mut PeerStream,
    batch: Vec<Message>,
) -> std::io::Result<()> {
    let mut plain = Vec::with_capacity(batch.len());
    for m in batch {
        if m.get_msg_type() == MessageType::MsgSnapshot {
            if !plain.is_empty() {
                write_messages(stream, &std::mem::take(&mut plain)).await?;
            }
            let to = m.to;
            let result = send_snapshot(stream, m).await;
            let ok = result.is_ok();
            if let Err(e) = &result {
                tracing::warn!(peer = %format!("{to:x}"), "snapshot send failed: {e}");
            }
            let _ = ctx
                .to_raft
                .clone()
                .send(PeerEvent::SnapshotSent { to, ok })
                .await;
            result?;
        } else {
            plain.push(m);
        }
    }
    if !plain.is_empty() {
        write_messages(stream, &plain).await?;
    }
    Ok(())
}

async fn write_messages(stream: &mut PeerStream, msgs: &[Message]) -> std::io::Result<()> {
    let payload = encode_messages(msgs)?;
    let mut frame = Vec::with_capacity(payload.len() + 5);
    encode_frame(&mut frame, KIND_MESSAGES, &payload);
    stream.write_all(&frame).await?;
    stream.flush().await
}

/// Streams the snapshot file named in the message's data, then the message itself with
/// the file's CRC32C. The receiver rewrites `data` to its local copy's path.
async fn send_snapshot(stream: &mut PeerStream, m: Message) -> std::io::Result<()> {
    let path = PathBuf::from(String::from_utf8_lossy(m.get_snapshot().get_data()).into_owned());
    let file = glommio::io::BufferedFile::open(&path)
        .await
        .map_err(|e| std::io::Error::other(format!("open snapshot {}: {e}", path.display())))?;
    let size = file
        .file_size()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut crc = 0u32;
    let mut off = 0u64;
    let mut frame = Vec::with_capacity(SNAPSHOT_CHUNK_BYTES + 8);
    while off < size {
        let n = ((size - off) as usize).min(SNAPSHOT_CHUNK_BYTES);
        let chunk = file
            .read_at(off, n)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        if chunk.is_empty() {
            return Err(invalid("snapshot file shrank while sending"));
        }
        crc = crc32c::crc32c_append(crc, &chunk);
        frame.clear();
        encode_frame(&mut frame, KIND_SNAP_CHUNK, &chunk);
        // write_all waits for the socket: the receiver's pace is the back-pressure.
        stream.write_all(&frame).await?;
        off += chunk.len() as u64;
    }
    let _ = file.close().await;
    let mut payload = crc.to_le_bytes().to_vec();
    let message = m
        .write_to_bytes()
        .map_err(|e| invalid(format!("encode snapshot message: {e}")))?;
    payload.extend_from_slice(&message);
    frame.clear();
    encode_frame(&mut frame, KIND_SNAP_END, &payload);
    stream.write_all(&frame).await?;
    stream.flush().await?;
    tracing::info!(bytes = size, to = %format!("{:x}", m.to), "snapshot sent");
    Ok(())
}

/// A listener with SO_REUSEADDR, so a restarted member can bind while its previous
/// life's peer connections sit in TIME_WAIT (Go, hence etcd, sets it too).
fn bind_reusable(addr: &str) -> std::io::Result<glommio::net::TcpListener> {
    use std::net::ToSocketAddrs;
    use std::os::unix::io::{FromRawFd, IntoRawFd};
    let sa = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| invalid(format!("{addr}: no address")))?;
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(sa),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&sa.into())?;
    sock.listen(1024)?;
    // SAFETY: a bound, listening TCP socket whose ownership moves to glommio.
    Ok(unsafe { glommio::net::TcpListener::from_raw_fd(sock.into_raw_fd()) })
}

/// Accepts peer connections on every address (`(host:port, tls)`); each connection
/// feeds the raft actor once its hello is accepted.
pub async fn listen(ctx: Rc<Ctx>, addrs: Vec<(String, bool)>) -> std::io::Result<()> {
    let mut tasks = Vec::new();
    for (addr, tls) in addrs {
        assert!(
            !tls || ctx.tls.is_some(),
            "an https peer URL passed start-up without TLS"
        );
        let l = bind_reusable(&addr)?;
        let ctx = ctx.clone();
        tasks.push(glommio::spawn_local(async move {
            let current: Rc<RefCell<HashMap<u64, glommio::task::JoinHandle<()>>>> = Rc::default();
            // Bounded by the process's life; accept errors (EMFILE) back off briefly.
            loop {
                match l.accept().await {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        glommio::spawn_local(inbound(ctx.clone(), s, tls, current.clone()))
                            .detach();
                    }
                    Err(e) => {
                        tracing::warn!("peer accept: {e}");
                        glommio::timer::sleep(BACKOFF_MIN).await;
                    }
                }
            }
        }));
    }
    futures::future::join_all(tasks).await;
    Ok(())
}

/// The accepting side's TLS handshake (in the connection's own task) and identity check.
async fn accept_tls(ctx: &Ctx, tcp: glommio::net::TcpStream) -> Result<PeerStream, String> {
    let side = ctx.tls.as_ref().ok_or("no peer TLS")?;
    let acceptor = futures_rustls::TlsAcceptor::from(side.server.clone());
    let s = match glommio::timer::timeout(CONNECT_TIMEOUT, async { Ok(acceptor.accept(tcp).await) })
        .await
    {
        Ok(Ok(s)) => PeerStream::Accepted(Box::new(s)),
        Ok(Err(e)) => return Err(format!("TLS handshake refused: {e}")),
        Err(e) => return Err(format!("TLS handshake: {e}")),
    };
    crate::tls::check_identity(side, s.peer_certificates())?;
    Ok(s)
}

/// One inbound connection: TLS if the URL is https, a hello (at most `HELLO_MAX_BYTES`),
/// then frames until the peer closes or misbehaves. A newer connection from the same
/// member replaces (cancels) the older one.
async fn inbound(
    ctx: Rc<Ctx>,
    tcp: glommio::net::TcpStream,
    tls: bool,
    current: Rc<RefCell<HashMap<u64, glommio::task::JoinHandle<()>>>>,
) {
    let remote = tcp.peer_addr().ok();
    let mut s = if tls {
        match accept_tls(&ctx, tcp).await {
            Ok(s) => s,
            Err(e) => return tracing::warn!(?remote, "peer connection refused: {e}"),
        }
    } else {
        PeerStream::Plain(tcp)
    };
    let mut buf = Vec::new();
    let hello = match glommio::timer::timeout(CONNECT_TIMEOUT, async {
        Ok(read_frame(&mut s, &mut buf, HELLO_MAX_BYTES).await)
    })
    .await
    {
        Ok(Ok(KIND_HELLO)) => match postcard::from_bytes::<Hello>(&buf) {
            Ok(h) => h,
            Err(e) => return tracing::warn!(?remote, "peer hello refused: {e}"),
        },
        Ok(Ok(k)) => return tracing::warn!(?remote, "peer sent frame kind {k} before hello"),
        Ok(Err(e)) => return tracing::warn!(?remote, "peer hello refused: {e}"),
        Err(e) => return tracing::debug!(?remote, "peer hello: {e}"),
    };
    let ack = check_hello(&ctx, &hello, remote, &s);
    let mut frame = Vec::new();
    let ack_bytes = match postcard::to_allocvec(&ack) {
        Ok(b) => b,
        Err(e) => return tracing::error!("encode hello ack: {e}"),
    };
    encode_frame(&mut frame, KIND_HELLO_ACK, &ack_bytes);
    if s.write_all(&frame).await.is_err() || s.flush().await.is_err() {
        return;
    }
    if !matches!(ack, HelloAck::Ok) {
        return;
    }
    let from = hello.from;
    let task = glommio::spawn_local(receive(ctx.clone(), s, from)).detach();
    if let Some(old) = current.borrow_mut().insert(from, task) {
        old.cancel();
    }
}

/// May a connection from `remote` over `s` speak for the member with `urls`? With peer
/// client-certificate auth: its certificate must be valid for one of the URLs' hosts.
/// Without: its source address must be one of the URLs' IPs (or their resolved
/// addresses); URLs by DNS name that were not resolved at start-up are taken on trust.
fn may_speak_for(
    ctx: &Ctx,
    urls: &[String],
    remote: Option<std::net::SocketAddr>,
    s: &PeerStream,
) -> Result<(), String> {
    if let Some(side) = ctx
        .tls
        .as_ref()
        .filter(|t| t.client_cert_auth && s.is_tls())
    {
        if side.skip_client_san {
            return Ok(()); // signed by the peer CA is enough, by the operator's choice
        }
        let leaf = s
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("no client certificate")?;
        let hosts: Vec<String> = urls.iter().map(|u| crate::cluster::host_of(u)).collect();
        let valid = hosts.iter().any(|h| crate::tls::cert_valid_for(leaf, h));
        return if valid {
            Ok(())
        } else {
            Err(format!(
                "its certificate is valid for none of {}",
                hosts.join(", ")
            ))
        };
    }
    let Some(ip) = remote.map(|r| r.ip().to_canonical()) else {
        return Err("no peer address".into());
    };
    let mut allowed = Vec::new();
    for u in urls {
        let host = crate::cluster::host_of(u);
        if let Some(sa) = ctx.resolved.get(&crate::cluster::host_port(u)) {
            allowed.push(sa.ip().to_canonical());
        } else if let Ok(a) = host.parse::<std::net::IpAddr>() {
            allowed.push(a.to_canonical());
        } else {
            return Ok(()); // a DNS name: not checkable without a lookup on this shard
        }
    }
    if allowed.contains(&ip) {
        Ok(())
    } else {
        Err(format!(
            "it connected from {ip}, not from its peer URLs' addresses"
        ))
    }
}

fn check_hello(
    ctx: &Ctx,
    h: &Hello,
    remote: Option<std::net::SocketAddr>,
    s: &PeerStream,
) -> HelloAck {
    let members = match ctx
        .backend
        .read()
        .and_then(|(b, txn)| crate::cluster::load_members(&b, &txn))
    {
        Ok(m) => m,
        Err(e) => {
            tracing::error!("peer hello: read members: {e}");
            return HelloAck::NotMember;
        }
    };
    if h.purpose == Purpose::FetchMembers {
        // Only a member that was added (its exact peer URLs), from where it may be.
        let joining = members
            .iter()
            .find(|m| !h.urls.is_empty() && crate::cluster::same_urls(&m.peer_urls, &h.urls));
        return match joining.map(|m| may_speak_for(ctx, &m.peer_urls, remote, s)) {
            Some(Ok(())) => HelloAck::Members {
                cluster_id: ctx.cluster_id,
                members,
            },
            Some(Err(e)) => {
                tracing::warn!(?remote, "member list refused to {:?}: {e}", h.urls);
                HelloAck::NotMember
            }
            None => {
                tracing::warn!(
                    ?remote,
                    "member list refused to {:?}: no member has these peer URLs",
                    h.urls
                );
                HelloAck::NotMember
            }
        };
    }
    if h.cluster_id != ctx.cluster_id {
        tracing::error!(
            "cluster ID mismatch: member {:x} claims cluster {:x}, this member is in cluster {:x}; refused",
            h.from,
            h.cluster_id,
            ctx.cluster_id
        );
        return HelloAck::ClusterMismatch {
            ours: ctx.cluster_id,
        };
    }
    if h.to != ctx.member_id {
        return HelloAck::WrongMember {
            ours: ctx.member_id,
        };
    }
    let removed = match ctx
        .backend
        .read()
        .and_then(|(b, txn)| crate::cluster::load_removed(&b, &txn))
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("peer hello: read removed members: {e}");
            return HelloAck::NotMember;
        }
    };
    if removed.contains(&h.from) {
        tracing::warn!(peer = %format!("{:x}", h.from), "refused a removed member");
        return HelloAck::Removed;
    }
    let urls = ctx.peers.borrow().get(&h.from).cloned();
    let Some(urls) = urls.filter(|_| h.from != ctx.member_id) else {
        tracing::warn!(?remote, claimed = %format!("{:x}", h.from), "peer hello refused: not a member of this cluster");
        return HelloAck::NotMember;
    };
    if let Err(e) = may_speak_for(ctx, &urls, remote, s) {
        tracing::warn!(?remote, claimed = %format!("{:x}", h.from), "peer hello refused: {e}");
        return HelloAck::NotMember;
    }
    HelloAck::Ok
}

async fn receive(ctx: Rc<Ctx>, s: PeerStream, from: u64) {
    // Wrapped only after the hello: the peer waits for our ack before it sends frames, so
    // nothing it sent is left behind in an unbuffered read.
    let mut s = futures::io::BufReader::with_capacity(RECEIVE_BUFFER_BYTES, s);
    let mut buf = Vec::new();
    let mut to_raft = ctx.to_raft.clone();
    let mut snap: Option<(std::fs::File, PathBuf, u32, u64)> = None;
    // Bounded by the connection: ends on close, error, or a protocol violation.
    loop {
        let kind = match read_frame(&mut s, &mut buf, MAX_FRAME_BYTES).await {
            Ok(k) => k,
            Err(e) => {
                tracing::debug!(peer = %format!("{from:x}"), "peer stream ended: {e}");
                break;
            }
        };
        let result = match kind {
            KIND_MESSAGES => match decode_messages(&buf) {
                Ok(msgs) => {
                    let mut ok = true;
                    for m in msgs {
                        if m.from != from || m.to != ctx.member_id {
                            ok = false;
                            break;
                        }
                        // Back-pressure: a full raft inbox stops reading this socket.
                        if to_raft.send(PeerEvent::Message(Box::new(m))).await.is_err() {
                            return;
                        }
                    }
                    if ok {
                        Ok(())
                    } else {
                        Err(invalid(
                            "message from a member other than the hello's, or to another member",
                        ))
                    }
                }
                Err(e) => Err(e),
            },
            KIND_SNAP_CHUNK => receive_chunk(&ctx, &mut snap, from, &buf),
            KIND_SNAP_END => match finish_snapshot(&mut snap, &buf) {
                Ok(m) => {
                    if to_raft.send(PeerEvent::Message(Box::new(m))).await.is_err() {
                        return;
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            },
            k => Err(invalid(format!("unknown frame kind {k}"))),
        };
        if let Err(e) = result {
            tracing::warn!(peer = %format!("{from:x}"), "peer stream refused: {e}");
            break;
        }
    }
    if let Some((_, path, _, _)) = snap {
        let _ = std::fs::remove_file(path);
    }
}

fn receive_chunk(
    ctx: &Ctx,
    snap: &mut Option<(std::fs::File, PathBuf, u32, u64)>,
    from: u64,
    chunk: &[u8],
) -> std::io::Result<()> {
    use std::io::Write;
    if snap.is_none() {
        let path = ctx.snap_dir.join(format!("recv-{from:016x}.db.tmp"));
        let f = std::fs::File::create(&path)?;
        *snap = Some((f, path, 0, 0));
    }
    let Some((f, _, crc, size)) = snap.as_mut() else {
        return Err(invalid("no snapshot in progress"));
    };
    // Snapshots are rare; a buffered write of 1 MiB per chunk on the raft shard is
    // the price of not adding a blocking-pool hop per chunk.
    f.write_all(chunk)?;
    *crc = crc32c::crc32c_append(*crc, chunk);
    *size += chunk.len() as u64;
    Ok(())
}

/// Checks the CRC, syncs the file and names it after the snapshot's index; returns the
/// MsgSnapshot whose data now holds the local path.
fn finish_snapshot(
    snap: &mut Option<(std::fs::File, PathBuf, u32, u64)>,
    payload: &[u8],
) -> std::io::Result<Message> {
    let (f, path, crc, size) = snap
        .take()
        .ok_or_else(|| invalid("snapshot end without data"))?;
    if payload.len() < 4 {
        let _ = std::fs::remove_file(&path);
        return Err(invalid("short snapshot end"));
    }
    let want = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
    if want != crc {
        let _ = std::fs::remove_file(&path);
        return Err(invalid(format!(
            "snapshot CRC mismatch: got {crc:08x}, sender says {want:08x}"
        )));
    }
    let mut m = Message::parse_from_bytes(&payload[4..])
        .map_err(|e| invalid(format!("snapshot message: {e}")))?;
    if m.get_msg_type() != MessageType::MsgSnapshot {
        let _ = std::fs::remove_file(&path);
        return Err(invalid("snapshot data followed by a non-snapshot message"));
    }
    f.sync_all()?;
    drop(f);
    let meta = m.get_snapshot().get_metadata();
    let final_path = path.with_file_name(format!("recv-{:016x}-{:016x}.db", meta.term, meta.index));
    std::fs::rename(&path, &final_path)?;
    tracing::info!(bytes = size, index = meta.index, "snapshot received");
    m.mut_snapshot()
        .set_data(final_path.to_string_lossy().as_bytes().to_vec().into());
    Ok(m)
}

/// The largest member list a joining member reads.
const MEMBERS_MAX_BYTES: usize = 1 << 20;

/// One blocking hello/ack exchange over `s` (start-up only).
fn exchange<S: std::io::Read + std::io::Write>(
    s: &mut S,
    hello: &Hello,
) -> std::io::Result<HelloAck> {
    let mut frame = Vec::new();
    let bytes = postcard::to_allocvec(hello).map_err(|e| invalid(e.to_string()))?;
    encode_frame(&mut frame, KIND_HELLO, &bytes);
    s.write_all(&frame)?;
    s.flush()?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MEMBERS_MAX_BYTES {
        return Err(invalid(format!(
            "hello ack of {len} bytes (limit {MEMBERS_MAX_BYTES})"
        )));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf)?;
    if buf[0] != KIND_HELLO_ACK {
        return Err(invalid("expected hello ack"));
    }
    postcard::from_bytes(&buf[1..]).map_err(|e| invalid(e.to_string()))
}

/// Blocking (start-up only): asks the members at `urls` for the cluster's membership,
/// as the member whose peer URLs are `own_urls` (`https://` ones over peer TLS).
pub fn fetch_members(
    urls: &[String],
    own_urls: &[String],
    tls: Option<&crate::tls::TlsSide>,
    bind_ip: Option<std::net::IpAddr>,
) -> Result<(u64, Vec<Member>), String> {
    let mut errors = Vec::new();
    let hello = Hello {
        cluster_id: 0,
        from: 0,
        to: 0,
        purpose: Purpose::FetchMembers,
        urls: own_urls.to_vec(),
    };
    for url in urls {
        let addr = crate::cluster::host_port(url);
        let attempt = || -> Result<HelloAck, String> {
            use std::net::ToSocketAddrs;
            let target = addr
                .to_socket_addrs()
                .map_err(|e| e.to_string())?
                .next()
                .ok_or("no address")?;
            let sock = socket2::Socket::new(
                socket2::Domain::for_address(target),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .map_err(|e| e.to_string())?;
            if let Some(ip) = bind_ip.filter(|ip| ip.is_ipv4() == target.is_ipv4()) {
                sock.bind(&std::net::SocketAddr::new(ip, 0).into())
                    .map_err(|e| format!("bind {ip}: {e}"))?;
            }
            sock.connect_timeout(&target.into(), CONNECT_TIMEOUT)
                .map_err(|e| e.to_string())?;
            let mut s: std::net::TcpStream = sock.into();
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            if !crate::tls::url_is_tls(url)? {
                return exchange(&mut s, &hello).map_err(|e| e.to_string());
            }
            let side =
                tls.ok_or_else(|| format!("{url} is https but this member has no peer TLS"))?;
            let name = crate::tls::server_name(&addr)?;
            let conn = rustls::ClientConnection::new(side.client.clone(), name)
                .map_err(|e| format!("TLS: {e}"))?;
            let mut t = rustls::StreamOwned::new(conn, s);
            let ack = exchange(&mut t, &hello).map_err(|e| format!("TLS: {e}"))?;
            crate::tls::check_identity(side, t.conn.peer_certificates())?;
            Ok(ack)
        };
        match attempt() {
            Ok(HelloAck::Members {
                cluster_id,
                members,
            }) => return Ok((cluster_id, members)),
            Ok(other) => errors.push(format!("{url}: unexpected answer {other:?}")),
            Err(e) => errors.push(format!("{url}: {e}")),
        }
    }
    Err(format!(
        "could not fetch the cluster's members from its peers ({})",
        errors.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.from = 1;
        m.to = 2;
        m.term = 7;
        let payload = encode_messages(&[m.clone(), m.clone()]).unwrap();
        let back = decode_messages(&payload).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].term, 7);
        assert!(decode_messages(&payload[..payload.len() - 1]).is_err());
        assert!(decode_messages(&[9, 0, 0, 0, 1]).is_err());
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut bytes = ((MAX_FRAME_BYTES + 1) as u32).to_le_bytes().to_vec();
        bytes.push(KIND_MESSAGES);
        let mut r = futures::io::Cursor::new(bytes);
        let mut buf = Vec::new();
        let e =
            futures::executor::block_on(read_frame(&mut r, &mut buf, MAX_FRAME_BYTES)).unwrap_err();
        assert!(e.to_string().contains("limit"), "{e}");
    }
}
