//! `corekv serve`: recovers state from LMDB + WAL, then starts one pinned glommio
//! executor per shard and the actors the configuration places on each.

use crate::actors::apply::{lease_ticker, ApplyActor, ApplyInput, ApplySetup};
use crate::actors::network::{self, NetSettings, Shard};
use crate::actors::raft::{RaftActor, RaftInput, RaftSetup};
use crate::actors::wal::WalActor;
use crate::actors::{connect_rx, Mailboxes};
use crate::cluster::Member;
use crate::config::{available_cpus, parse_listen_urls, ServeConfig};
use crate::storage::backend::{meta_key, Backend};
use crate::storage::raft_log::RaftLog;
use crate::storage::wal;
use futures::future::join_all;
use glommio::{LocalExecutorBuilder, Placement};
use protobuf::Message as _;
use raft::eraftpb::ConfState;
use std::time::Duration;

/// Raft messages from peers waiting for the raft actor; a full inbox stops reading
/// the peers' sockets (back-pressure through TCP).
const PEER_INBOX: usize = 4096;

/// Registered I/O memory per executor; small because RLIMIT_MEMLOCK is 8 MiB here.
const IO_MEMORY_BYTES: usize = 2 << 20;

fn raise_memlock() {
    let want: libc::rlim_t = 256 << 20;
    // SAFETY: plain syscalls on a stack struct.
    unsafe {
        let mut cur: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut cur) == 0 && cur.rlim_cur < want {
            let new = libc::rlimit {
                rlim_cur: want,
                rlim_max: want.max(cur.rlim_max),
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &new) != 0 {
                tracing::debug!("could not raise RLIMIT_MEMLOCK; keeping io_memory small");
            }
        }
    }
}

/// State recovered from disk before any actor starts.
struct Recovered {
    backend: Backend,
    raft_log: RaftLog,
    wal: wal::Recovered,
    applied_index: u64,
    applied_term: u64,
    member_id: u64,
    cluster_id: u64,
    members: Vec<Member>,
}

fn recover(cfg: &ServeConfig, peer_tls: Option<&crate::tls::TlsSide>) -> Result<Recovered, String> {
    for dir in [cfg.snap_dir(), cfg.wal_path(), cfg.db_path()] {
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    // Copies made for clients' snapshot downloads that a crash left behind.
    if let Ok(rd) = std::fs::read_dir(cfg.snap_dir()) {
        for e in rd.flatten() {
            let name = e.file_name();
            if name
                .to_str()
                .is_some_and(|n| n.starts_with(crate::storage::snapshot::CLIENT_COPY_PREFIX))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    // The map only reserves address space; twice the quota leaves room past the alarm.
    let map_size = cfg.quota_backend_bytes.saturating_mul(2).max(64 << 20);
    let backend = Backend::open(&cfg.db_path(), map_size as usize).map_err(|e| e.to_string())?;
    let identity = load_identity(&backend)?;
    let (member_id, cluster_id) = match identity {
        Some(ids) => {
            // A data dir that holds a member ignores the --initial-* flags, as etcd.
            ids
        }
        None => bootstrap(cfg, &backend, peer_tls)?,
    };
    let (applied_index, applied_term, conf_state, members) = {
        let txn = backend.read_txn().map_err(|e| e.to_string())?;
        let idx = backend
            .get_u64(&txn, meta_key::APPLIED_INDEX)
            .map_err(|e| e.to_string())?;
        let term = backend
            .get_u64(&txn, meta_key::APPLIED_TERM)
            .map_err(|e| e.to_string())?;
        let cs = match backend.meta.get(&txn, meta_key::CONF_STATE) {
            Ok(Some(b)) => {
                ConfState::parse_from_bytes(b).map_err(|e| format!("meta conf state: {e}"))?
            }
            Ok(None) => ConfState::default(),
            Err(e) => return Err(e.to_string()),
        };
        let members = crate::cluster::load_members(&backend, &txn).map_err(|e| e.to_string())?;
        let removed = crate::cluster::load_removed(&backend, &txn).map_err(|e| e.to_string())?;
        if removed.contains(&member_id) {
            return Err("this member has been permanently removed from the cluster".into());
        }
        (idx, term, cs, members)
    };
    let mut recovered = wal::recover(&cfg.wal_path()).map_err(|e| e.to_string())?;
    if let Some(t) = recovered.truncated_at {
        tracing::warn!(offset = t, "wal: recovered from a torn final record");
    }
    // Moved out, not copied: the WAL actor needs only the segments and the tail.
    let entries: Vec<_> = std::mem::take(&mut recovered.entries)
        .into_iter()
        .filter(|e| e.index > applied_index)
        .collect();
    if let Some(first) = entries.first() {
        if first.index != applied_index + 1 {
            return Err(format!(
                "wal: entries {}..{} are missing (applied index {applied_index})",
                applied_index + 1,
                first.index
            ));
        }
    }
    let mut hs = recovered.hard_state.clone().unwrap_or_default();
    // Apply can run ahead of the hard state's persisted commit; what is applied was committed.
    hs.commit = hs.commit.max(applied_index);
    hs.term = hs.term.max(applied_term);
    let last_index = entries.last().map_or(applied_index, |e| e.index);
    hs.commit = hs.commit.min(last_index);
    let raft_log = RaftLog::new(applied_index, applied_term, conf_state, hs, entries);
    Ok(Recovered {
        backend,
        raft_log,
        wal: recovered,
        applied_index,
        applied_term,
        member_id,
        cluster_id,
        members,
    })
}

/// (member ID, cluster ID) of an existing data dir; None for a new one. Data dirs from
/// before clustering (a conf state but no stored identity) are single-member clusters
/// of the default derivation and get their identity recorded.
fn load_identity(backend: &Backend) -> Result<Option<(u64, u64)>, String> {
    let txn = backend.read_txn().map_err(|e| e.to_string())?;
    let member_id = backend
        .get_u64(&txn, meta_key::MEMBER_ID)
        .map_err(|e| e.to_string())?;
    let cluster_id = backend
        .get_u64(&txn, meta_key::CLUSTER_ID)
        .map_err(|e| e.to_string())?;
    if member_id != 0 {
        return Ok(Some((member_id, cluster_id)));
    }
    let legacy = backend
        .meta
        .get(&txn, meta_key::CONF_STATE)
        .map_err(|e| e.to_string())?
        .map(|b| ConfState::parse_from_bytes(b).map_err(|e| format!("meta conf state: {e}")))
        .transpose()?;
    drop(txn);
    let Some(cs) = legacy else { return Ok(None) };
    let [id] = cs.voters[..] else {
        return Err("data dir has a conf state but no member identity".into());
    };
    let cluster_id = crate::cluster::cluster_id(&[id]);
    let mut txn = backend.env.write_txn().map_err(|e| e.to_string())?;
    backend
        .put_u64(&mut txn, meta_key::MEMBER_ID, id)
        .and_then(|_| backend.put_u64(&mut txn, meta_key::CLUSTER_ID, cluster_id))
        .map_err(|e| e.to_string())?;
    txn.commit().map_err(|e| e.to_string())?;
    Ok(Some((id, cluster_id)))
}

/// First start. `new`: every member of --initial-cluster is a voter from index 1 (all
/// members write the same state, so the group starts identical everywhere; the log
/// starts after it, so a member added later always begins from a snapshot). `existing`:
/// the membership is fetched from the peers; this member starts empty and is caught up
/// by the leader. Made durable before anything else.
fn bootstrap(
    cfg: &ServeConfig,
    backend: &Backend,
    peer_tls: Option<&crate::tls::TlsSide>,
) -> Result<(u64, u64), String> {
    let own_urls = cfg.advertise_peer_urls();
    let spec = match &cfg.discovery_srv {
        Some(domain) => crate::discovery::initial_cluster_from_srv(
            domain,
            &cfg.name,
            &own_urls,
            cfg.discovery_dns_server.as_deref(),
        )?,
        None => cfg.initial_cluster_spec(),
    };
    let initial = crate::cluster::parse_initial_cluster(&spec, &cfg.initial_cluster_token)?;
    let me = initial.iter().find(|m| m.name == cfg.name).ok_or_else(|| {
        format!(
            "couldn't find local name {:?} in the initial cluster configuration",
            cfg.name
        )
    })?;
    // (Discovery matched this member by resolved address; its URL is the SRV name.)
    if cfg.discovery_srv.is_none() && !crate::cluster::same_urls(&me.peer_urls, &own_urls) {
        return Err(format!(
            "--initial-cluster has {}={} but missing from --initial-advertise-peer-urls={}",
            me.name,
            me.peer_urls.join(","),
            own_urls.join(",")
        ));
    }
    let mut txn = backend.env.write_txn().map_err(|e| e.to_string())?;
    let err = |e: crate::error::KvError| e.to_string();
    let (member_id, cluster_id) = if cfg.initial_cluster_state == "existing" {
        let peer_urls: Vec<String> = initial
            .iter()
            .filter(|m| m.name != cfg.name)
            .flat_map(|m| m.peer_urls.clone())
            .collect();
        let (cluster_id, members) = crate::actors::peer::fetch_members(
            &peer_urls,
            &own_urls,
            peer_tls,
            peer_bind_ip(&crate::config::parse_urls(&cfg.listen_peer_urls)?),
        )?;
        let me = members
            .iter()
            .find(|m| crate::cluster::same_urls(&m.peer_urls, &own_urls))
            .ok_or_else(|| {
                format!(
                    "no member with peer URLs {} in cluster {cluster_id:x}; add it first (corekv member add {} --peer-urls={})",
                    own_urls.join(","),
                    cfg.name,
                    own_urls.join(",")
                )
            })?;
        let id = me.id;
        crate::cluster::store_members(backend, &mut txn, &members).map_err(err)?;
        let empty = ConfState::default()
            .write_to_bytes()
            .map_err(|e| e.to_string())?;
        backend
            .meta
            .put(&mut txn, meta_key::CONF_STATE, &empty)
            .map_err(|e| e.to_string())?;
        tracing::info!(member = %format!("{id:x}"), cluster = %format!("{cluster_id:x}"), "joining an existing cluster");
        (id, cluster_id)
    } else {
        let ids: Vec<u64> = initial.iter().map(|m| m.id).collect();
        let cluster_id = crate::cluster::cluster_id(&ids);
        let cs = ConfState {
            voters: ids,
            ..Default::default()
        };
        let bytes = cs.write_to_bytes().map_err(|e| e.to_string())?;
        backend
            .meta
            .put(&mut txn, meta_key::CONF_STATE, &bytes)
            .map_err(|e| e.to_string())?;
        // Identical on every member; client URLs arrive when each member publishes.
        crate::cluster::store_members(backend, &mut txn, &initial).map_err(err)?;
        backend
            .put_u64(&mut txn, meta_key::APPLIED_INDEX, 1)
            .and_then(|_| backend.put_u64(&mut txn, meta_key::APPLIED_TERM, 1))
            .map_err(err)?;
        tracing::info!(member = %format!("{:x}", me.id), cluster = %format!("{cluster_id:x}"), members = initial.len(), "bootstrapped a new cluster");
        (me.id, cluster_id)
    };
    backend
        .put_u64(&mut txn, meta_key::CLUSTER_ID, cluster_id)
        .and_then(|_| backend.put_u64(&mut txn, meta_key::MEMBER_ID, member_id))
        .map_err(err)?;
    txn.commit().map_err(|e| e.to_string())?;
    backend.sync().map_err(err)?;
    Ok((member_id, cluster_id))
}

/// Source address of this member's peer connections: the host of its first listen peer
/// URL (so firewall rules per address, and the peers' check that a member connects from
/// its own address, see the address it listens on); None for a wildcard.
fn peer_bind_ip(peer_addrs: &[String]) -> Option<std::net::IpAddr> {
    peer_addrs.first().and_then(|a| {
        a.parse::<std::net::SocketAddr>()
            .ok()
            .map(|sa| sa.ip())
            .filter(|ip| !ip.is_unspecified())
    })
}

fn exit_fatal(msg: String) -> ! {
    tracing::error!("{msg}");
    eprintln!("corekv: fatal: {msg}");
    std::process::exit(1)
}

/// Takes an exclusive lock on the data dir for the life of the process, so a second
/// server can never write the same WAL and LMDB.
fn lock_data_dir(cfg: &ServeConfig) -> Result<std::fs::File, String> {
    lock_member_dir(&cfg.data_dir)
}

/// The lock `serve` holds on `data_dir` (offline tools take it too, so they never run
/// beside a server on the same files).
pub fn lock_member_dir(data_dir: &std::path::Path) -> Result<std::fs::File, String> {
    use std::os::unix::io::AsRawFd;
    let dir = data_dir.join("member");
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let path = dir.join("corekv.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!(
            "data dir {} is in use by another corekv process",
            data_dir.display()
        ));
    }
    Ok(f)
}

/// Shards bind with SO_REUSEPORT, which would silently share a port with another
/// process; refuse like etcd ("address already in use") when anything listens there.
/// (A plain bind probe is too strict: a killed predecessor's orphaned connections
/// block it.)
fn probe_listen(addrs: &[String]) -> Result<(), String> {
    // A just-killed predecessor's listeners linger for a few ms after it is reaped.
    let mut result = Ok(());
    for _ in 0..40 {
        result = probe_listen_once(addrs);
        if result.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    result
}

fn probe_listen_once(addrs: &[String]) -> Result<(), String> {
    use std::net::{SocketAddr, ToSocketAddrs};
    let listening: Vec<SocketAddr> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| {
            t.lines()
                .skip(1)
                .filter_map(parse_proc_listen)
                .collect::<Vec<_>>()
        })
        .collect();
    for a in addrs {
        let want: Vec<SocketAddr> = a
            .to_socket_addrs()
            .map_err(|e| format!("listen tcp {a}: {e}"))?
            .collect();
        for w in &want {
            let taken = listening.iter().any(|l| {
                l.port() == w.port()
                    && (l.ip() == w.ip() || l.ip().is_unspecified() || w.ip().is_unspecified())
            });
            if taken {
                return Err(format!("listen tcp {a}: bind: address already in use"));
            }
        }
    }
    Ok(())
}

/// A LISTEN socket's address from a /proc/net/tcp{,6} line.
fn parse_proc_listen(line: &str) -> Option<std::net::SocketAddr> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.get(3) != Some(&"0A") {
        return None;
    }
    let (ip_hex, port_hex) = f.get(1)?.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let ip: std::net::IpAddr = match ip_hex.len() {
        8 => std::net::Ipv4Addr::from(u32::from_str_radix(ip_hex, 16).ok()?.swap_bytes()).into(),
        32 => {
            let mut b = [0u8; 16];
            for (i, chunk) in b.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(&ip_hex[i * 8..i * 8 + 8], 16).ok()?;
                chunk.copy_from_slice(&word.swap_bytes().to_be_bytes());
            }
            std::net::Ipv6Addr::from(b).into()
        }
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port))
}

pub fn run(cfg: ServeConfig) -> Result<(), String> {
    cfg.validate()?;
    for var in crate::config::unknown_etcd_env() {
        tracing::warn!("unrecognized environment variable {var}");
    }
    let tls = cfg.server_tls()?;
    if let Some(side) = &tls.client {
        // This member's own dials to other members' native URLs (calls only the leader
        // answers) go out with its client certificate, checked against its trusted CA.
        crate::client::set_tls(side.client.clone(), false);
    }
    raise_memlock();
    let native_listen = parse_listen_urls(&cfg.listen_native_urls)?;
    let addrs: Vec<String> = native_listen.iter().map(|(a, _)| a.clone()).collect();
    let client_listen = parse_listen_urls(&cfg.listen_client_urls)?;
    let client_addrs: Vec<String> = client_listen.iter().map(|(a, _)| a.clone()).collect();
    let peer_listen = parse_listen_urls(&cfg.listen_peer_urls)?;
    let peer_addrs: Vec<String> = peer_listen.iter().map(|(a, _)| a.clone()).collect();
    let _lock = lock_data_dir(&cfg)?;
    crate::storage::backend::remove_defrag_leftovers(&cfg.member_dir());
    probe_listen(&[addrs.clone(), client_addrs.clone(), peer_addrs.clone()].concat())?;
    let rec = recover(&cfg, tls.peer.as_ref())?;
    let shards = cfg.shards();
    let cpus = available_cpus();
    // Pinned only when the shards cover every CPU this process may use. With fewer
    // (`--cores 1` for several members on one box), each process would pin its shards to
    // the same first CPUs and leave the others idle: on the 2-core dev VM, three members
    // with `--cores 1` all ran on CPU 0 (native put at 1000 clients 26-27k/s; spread over
    // both CPUs 34-41k/s). The kernel balances unpinned shards; `taskset` still pins.
    let pinned = shards >= cpus.len();
    let member_id = rec.member_id;
    let cluster_id = rec.cluster_id;
    // Unique per boot and per member: only the proposing member answers its requests.
    let epoch = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ ((std::process::id() as u64) << 32)
        ^ member_id.rotate_left(17))
        | 1; // never 0: epoch 0 marks the apply actor's own proposals
    let bind_ip = peer_bind_ip(&peer_addrs);
    let resolved = match &cfg.discovery_dns_server {
        Some(dns) => {
            let urls: Vec<String> = rec
                .members
                .iter()
                .flat_map(|m| m.peer_urls.clone())
                .collect();
            crate::discovery::resolve_peer_hosts(dns, &urls)?
        }
        None => Default::default(),
    };
    let peers: std::collections::HashMap<u64, Vec<String>> = rec
        .members
        .iter()
        .filter(|m| m.id != member_id)
        .map(|m| (m.id, m.peer_urls.clone()))
        .collect();
    let request_timeout = Duration::from_millis(5000 + 2 * cfg.election_timeout);
    let mut mb = Mailboxes::new(shards);
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tokens = std::sync::Arc::new(crate::storage::auth::Tokens::new(Duration::from_secs(
        cfg.auth_token_ttl,
    )));
    tokens.sync_enabled(&rec.backend);
    // The leader raft last reported, read by the network actors to forward what only
    // the leader answers without asking raft first.
    let leader_hint = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Every actor but apply reaches LMDB through the store (online defrag swaps it). The
    // apply actor takes this one; no other clone may outlive the start, or a defragmented
    // file would stay open (and on disk) until exit.
    let store = crate::storage::backend::Store::new(rec.backend.clone());
    let mut apply_backend = Some(rec.backend);
    let (bridge_txs, mut bridge_rxs): (Vec<_>, Vec<_>) = (0..shards)
        .map(|_| {
            let (tx, rx) = crate::actors::bridge::channel();
            (tx, Some(rx))
        })
        .unzip();

    let mut raft_part = Some((rec.raft_log, rec.applied_index));
    let mut wal_part = Some(rec.wal);
    let mut apply_part = Some((rec.applied_index, rec.applied_term));
    let mut handles = Vec::new();
    for i in 0..shards {
        let resolved = resolved.clone();
        let peer_tls = tls.peer.clone();
        let cpu = cpus[i % cpus.len()];
        let backend = store.clone();
        let net_tx = mb.net_to_raft[i].0.take();
        let from_raft = mb.raft_to_net[i].1.take();
        let from_apply = mb.apply_to_net[i].1.take();
        let lessor_tx = mb.net_to_apply[i].0.take();
        let watching_here = watching.clone();
        let bridge_rx = bridge_rxs[i].take().expect("one bridge per shard");
        let addrs = addrs.clone();
        let native_listen = native_listen.clone();
        let settings = NetSettings {
            max_request_bytes: cfg.max_request_bytes,
            max_txn_ops: cfg.max_txn_ops as usize,
            quota_backend_bytes: cfg.quota_backend_bytes,
            cluster_id,
            member_id,
            request_timeout,
            min_lease_ttl_secs: cfg.min_lease_ttl_secs(),
            watch_progress_interval: cfg.watch_progress_notify_interval,
            snap_dir: cfg.snap_dir(),
            tokens: tokens.clone(),
            leader_hint: leader_hint.clone(),
            client_tls: tls.client.clone(),
        };
        // Endpoints of the actors placed on this shard.
        let raft = if i == cfg.raft_shard {
            let (log, applied) = raft_part.take().expect("one raft shard");
            Some((
                RaftSetup {
                    id: member_id,
                    log,
                    applied,
                    heartbeat_ms: cfg.heartbeat_interval,
                    election_ms: cfg.election_timeout,
                    backend: store.clone(),
                    snap_dir: cfg.snap_dir(),
                    auto_promote_within: cfg.auto_promote_learners,
                    snapshot_count: cfg.snapshot_count,
                    leader_hint: leader_hint.clone(),
                },
                peers.clone(),
                peer_listen.clone(),
                mb.net_to_raft
                    .iter_mut()
                    .map(|p| p.1.take().expect("rx"))
                    .collect::<Vec<_>>(),
                mb.raft_to_net
                    .iter_mut()
                    .map(|p| p.0.take().expect("tx"))
                    .collect::<Vec<_>>(),
                mb.raft_to_wal.0.take().expect("tx"),
                mb.wal_to_raft.1.take().expect("rx"),
                mb.raft_to_apply.0.take().expect("tx"),
                mb.apply_to_raft.1.take().expect("rx"),
            ))
        } else {
            None
        };
        let wal = if i == cfg.wal_shard {
            Some((
                wal_part.take().expect("one wal shard"),
                mb.raft_to_wal.1.take().expect("rx"),
                mb.wal_to_raft.0.take().expect("tx"),
                cfg.wal_path(),
                cfg.wal_segment_bytes,
                crate::actors::wal::SyncMode::parse(&cfg.wal_sync),
                rec.applied_index + 1,
            ))
        } else {
            None
        };
        let apply = if i == cfg.apply_shard {
            let (applied_index, applied_term) = apply_part.take().expect("one apply shard");
            Some((
                ApplySetup {
                    backend: apply_backend.take().expect("one apply actor"),
                    epoch,
                    cluster_id,
                    member_id,
                    snapshot_count: cfg.snapshot_count,
                    applied_index,
                    applied_term,
                    watching: watching.clone(),
                    lease_checkpoint_interval: cfg.lease_checkpoint_interval,
                    tokens: tokens.clone(),
                    store: store.clone(),
                    db_dir: cfg.db_path(),
                },
                mb.raft_to_apply.1.take().expect("rx"),
                mb.net_to_apply
                    .iter_mut()
                    .map(|p| p.1.take().expect("rx"))
                    .collect::<Vec<_>>(),
                mb.apply_to_net
                    .iter_mut()
                    .map(|p| p.0.take().expect("tx"))
                    .collect::<Vec<_>>(),
                mb.apply_to_raft.0.take().expect("tx"),
            ))
        } else {
            None
        };
        let heartbeat_ms = cfg.heartbeat_interval;
        let publish_name = cfg.name.clone();
        let publish_urls = (
            crate::cluster::url_list(&cfg.advertise_client_urls),
            crate::cluster::url_list(&cfg.listen_native_urls),
        );
        let placement = if pinned {
            Placement::Fixed(cpu)
        } else {
            Placement::Unbound
        };
        let mut builder = LocalExecutorBuilder::new(placement)
            .name(&format!("corekv-shard-{i}"))
            .io_memory(IO_MEMORY_BYTES);
        if cfg.spin_before_park_us > 0 {
            builder = builder.spin_before_park(Duration::from_micros(cfg.spin_before_park_us));
        }
        let handle = builder
            .spawn(move || async move {
                if let Some((wal_rec, inbox, to_raft, dir, seg_bytes, sync, start_index)) = wal {
                    glommio::spawn_local(async move {
                        let (inbox, to_raft) =
                            futures::join!(connect_rx(inbox, |m| m), to_raft.connect());
                        match WalActor::open(dir, seg_bytes, sync, wal_rec, start_index).await {
                            Ok(actor) => actor.run(inbox, to_raft).await,
                            Err(e) => exit_fatal(format!("wal: open: {e}")),
                        }
                    })
                    .detach();
                }
                if let Some((setup, apply_rx, lessor_rxs, to_net, to_raft)) = apply {
                    glommio::spawn_local(async move {
                        let (inbox, lessor_rxs, to_net, to_raft) = futures::join!(
                            connect_rx(apply_rx, ApplyInput::Raft),
                            join_all(
                                lessor_rxs
                                    .into_iter()
                                    .map(|r| connect_rx(r, ApplyInput::Lessor))
                            ),
                            join_all(to_net.into_iter().map(|t| t.connect())),
                            to_raft.connect()
                        );
                        let mut inputs = futures::stream::select_all(lessor_rxs);
                        inputs.push(inbox);
                        inputs.push(lease_ticker());
                        ApplyActor::new(setup, to_net, to_raft).run(inputs).await;
                    })
                    .detach();
                }
                if let Some((
                    setup,
                    peers,
                    peer_addrs,
                    net_rxs,
                    net_txs,
                    wal_tx,
                    wal_rx,
                    apply_tx,
                    apply_rx,
                )) = raft
                {
                    glommio::spawn_local(async move {
                        let (peer_tx, peer_rx) = futures::channel::mpsc::channel(PEER_INBOX);
                        let (snap_tx, snap_rx) = futures::channel::mpsc::channel(4);
                        let ctx = std::rc::Rc::new(crate::actors::peer::Ctx {
                            cluster_id,
                            member_id,
                            backend: setup.backend.clone(),
                            snap_dir: setup.snap_dir.clone(),
                            peers: std::cell::RefCell::new(peers),
                            bind_ip,
                            to_raft: peer_tx,
                            user_timeout_ms: (2 * setup.election_ms).max(1000) as u32,
                            resolved,
                            tls: peer_tls,
                        });
                        let listen_ctx = ctx.clone();
                        glommio::spawn_local(async move {
                            if let Err(e) =
                                crate::actors::peer::listen(listen_ctx, peer_addrs.clone()).await
                            {
                                exit_fatal(format!("listen on peer urls {peer_addrs:?}: {e}"));
                            }
                        })
                        .detach();
                        let transport = crate::actors::peer::Transport::new(ctx);
                        let (net_rxs, net_txs, wal_tx, wal_rx, apply_tx, apply_rx) = futures::join!(
                            join_all(net_rxs.into_iter().map(|r| connect_rx(r, RaftInput::Net))),
                            join_all(net_txs.into_iter().map(|t| t.connect())),
                            wal_tx.connect(),
                            connect_rx(wal_rx, RaftInput::Persisted),
                            apply_tx.connect(),
                            connect_rx(apply_rx, RaftInput::Apply),
                        );
                        let mut inputs = futures::stream::select_all(net_rxs);
                        inputs.push(wal_rx);
                        inputs.push(apply_rx);
                        inputs.push(Box::pin(futures::StreamExt::map(peer_rx, RaftInput::Peer)));
                        inputs.push(Box::pin(snap_rx));
                        inputs.push(RaftActor::ticker(heartbeat_ms));
                        match RaftActor::new(setup, wal_tx, apply_tx, net_txs, transport, snap_tx) {
                            Ok(actor) => actor.run(inputs).await,
                            Err(e) => exit_fatal(format!("raft: {e}")),
                        }
                    })
                    .detach();
                }
                let (to_raft, to_apply, from_raft, from_apply) = futures::join!(
                    net_tx.expect("tx").connect(),
                    lessor_tx.expect("tx").connect(),
                    connect_rx(from_raft.expect("rx"), |m| m),
                    connect_rx(from_apply.expect("rx"), |m| m),
                );
                let shard = match Shard::new(
                    i,
                    epoch,
                    backend,
                    settings,
                    to_raft,
                    to_apply,
                    watching_here,
                ) {
                    Ok(s) => s,
                    Err(e) => exit_fatal(format!("shard {i}: {e}")),
                };
                glommio::spawn_local(shard.clone().run_watch_hub()).detach();
                glommio::spawn_local(shard.clone().run_replies(from_raft)).detach();
                glommio::spawn_local(shard.clone().run_replies(from_apply)).detach();
                glommio::spawn_local(crate::actors::bridge::serve(shard.clone(), bridge_rx))
                    .detach();
                if i == 0 {
                    tracing::info!(urls = ?addrs, "ready to serve native clients");
                    glommio::spawn_local(shard.clone().publish_self(publish_name, publish_urls))
                        .detach();
                }
                if let Err(e) = network::serve(shard, native_listen).await {
                    exit_fatal(format!("listen on {addrs:?}: {e}"));
                }
            })
            .map_err(|e| format!("start shard {i}: {e}"))?;
        handles.push(handle);
    }
    let gateway = crate::api::v3rpc::Gateway::new(
        bridge_txs,
        cfg.raft_shard,
        cfg.apply_shard,
        cfg.max_request_bytes as usize,
        store.clone(),
        tokens,
        cfg.bcrypt_cost,
    );
    if cfg.grpc_keepalive_min_time != std::time::Duration::from_secs(5) {
        tracing::warn!(
            "--grpc-keepalive-min-time is accepted for etcd configurations but not enforced"
        );
    }
    let limits = crate::api::v3rpc::GrpcLimits {
        max_request_bytes: cfg.max_request_bytes as usize,
        keepalive_interval: Some(cfg.grpc_keepalive_interval).filter(|d| !d.is_zero()),
        keepalive_timeout: cfg.grpc_keepalive_timeout,
        max_concurrent_streams: cfg.max_concurrent_streams,
    };
    if let Err(e) = crate::api::v3rpc::spawn(gateway, client_listen, limits, tls.client.clone()) {
        exit_fatal(e);
    }
    tracing::info!(urls = ?client_addrs, "ready to serve etcd v3 gRPC clients");
    for h in handles {
        h.join().map_err(|e| format!("shard: {e}"))?;
    }
    Ok(())
}
