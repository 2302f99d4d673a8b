//! Network actor, one per shard: accepts native capnp-rpc connections (SO_REUSEPORT, so
//! the kernel spreads connections over shards), serves serializable reads straight from
//! an LMDB read txn, and sends writes and linearizable reads to the raft actor as typed
//! messages, matching replies by request id. All state here is shard-local.

use super::recipes::InternalWatch;
use super::watch::{StreamId, WatchHub, WatchOut, WatchSpec};
use super::*;
use crate::api::{native, native_auth, validate};
use crate::kv_capnp::kv;
use crate::model::*;
use crate::storage::backend::{Backend, Store};
use crate::storage::mvcc;
use capnp_rpc::{rpc_twoparty_capnp::Side, twoparty, RpcSystem};
use futures::channel::oneshot;
use futures::StreamExt;
use glommio::channels::shared_channel::ConnectedSender;
use glommio::net::{TcpListener, TcpStream};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

/// Calls one connection may have in flight; more wait (capnp-rpc has no flow control).
const MAX_INFLIGHT_PER_CONN: u64 = 1024;
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub enum Reply {
    Written(Header, Result<WriteResponse, KvError>),
    ReadReady,
    Failed(KvError),
    Status(RaftStatus),
    Lease(Result<LeaseReply, KvError>),
}

pub struct NetSettings {
    pub max_request_bytes: u64,
    pub max_txn_ops: usize,
    pub quota_backend_bytes: u64,
    pub cluster_id: u64,
    pub member_id: u64,
    pub request_timeout: Duration,
    /// etcd's minimum lease TTL: 1.5 election timeouts, in whole seconds.
    pub min_lease_ttl_secs: i64,
    pub watch_progress_interval: Duration,
    /// Where copies for Maintenance.Snapshot are written before they are streamed.
    pub snap_dir: std::path::PathBuf,
    pub tokens: Arc<crate::storage::auth::Tokens>,
    /// The leader's member ID as raft last reported it (0 = none known); the raft
    /// actor writes it.
    pub leader_hint: Arc<std::sync::atomic::AtomicU64>,
    /// TLS of the client URLs (native https URLs serve with it).
    pub client_tls: Option<crate::tls::TlsSide>,
}

pub struct Shard {
    shard: usize,
    pub(super) epoch: u64,
    pub(crate) backend: Store,
    pub(crate) settings: NetSettings,
    to_raft: ConnectedSender<ToRaft>,
    to_apply: ConnectedSender<ToLessor>,
    pending: RefCell<HashMap<ReqId, oneshot::Sender<Reply>>>,
    next_seq: Cell<u64>,
    raft_term: Rc<Cell<u64>>,
    nospace_raised: Cell<bool>,
    /// A native connection to the leader (its member ID), for lease calls only the
    /// leader answers.
    pub(super) leader_conn: RefCell<Option<(u64, Rc<crate::client::Client>)>>,
    pub hub: RefCell<WatchHub>,
    /// Wakes the catch-up task when some watcher is behind.
    catch_up_kick: glommio::channels::local_channel::LocalSender<()>,
    catch_up_rx: RefCell<Option<glommio::channels::local_channel::LocalReceiver<()>>>,
    next_internal_stream: Cell<u64>,
}

/// etcd's idutil generator: the member id's low 16 bits, then milliseconds and a counter.
fn next_lease_id(member_id: u64) -> i64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static SUFFIX: OnceLock<AtomicU64> = OnceLock::new();
    let suffix = SUFFIX.get_or_init(|| {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        AtomicU64::new(ms << 8)
    });
    let low = suffix.fetch_add(1, Ordering::Relaxed) + 1;
    let id = ((member_id & 0xffff) << 48) | (low & ((1 << 48) - 1));
    (id & ((1 << 63) - 1)) as i64
}

impl Shard {
    pub fn new(
        shard: usize,
        epoch: u64,
        backend: Store,
        settings: NetSettings,
        to_raft: ConnectedSender<ToRaft>,
        to_apply: ConnectedSender<ToLessor>,
        watching: Arc<AtomicUsize>,
    ) -> Result<Rc<Shard>, KvError> {
        assert!(shard < (1 << 16), "shard index must fit in a request id");
        assert!(epoch != 0, "epoch 0 marks internal proposals");
        let raft_term = Rc::new(Cell::new(0));
        let hub = WatchHub::new(
            backend.clone(),
            settings.cluster_id,
            settings.member_id,
            raft_term.clone(),
            watching,
        )?;
        let (kick, kicked) = glommio::channels::local_channel::new_bounded(1);
        Ok(Rc::new(Shard {
            shard,
            epoch,
            backend,
            settings,
            to_raft,
            to_apply,
            pending: RefCell::new(HashMap::new()),
            next_seq: Cell::new(1),
            raft_term,
            nospace_raised: Cell::new(false),
            leader_conn: RefCell::new(None),
            hub: RefCell::new(hub),
            catch_up_kick: kick,
            catch_up_rx: RefCell::new(Some(kicked)),
            next_internal_stream: Cell::new(0),
        }))
    }

    /// Runs the hub's catch-up steps while any watcher is behind, and its progress timer.
    pub async fn run_watch_hub(self: Rc<Self>) {
        let Some(kicked) = self.catch_up_rx.borrow_mut().take() else {
            return;
        };
        let me = self.clone();
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(me.settings.watch_progress_interval).await;
                me.hub.borrow_mut().progress_tick();
            }
        })
        .detach();
        while kicked.recv().await.is_some() {
            // Bounded by the watchers' progress: each pass sends or waits for room. A
            // pass that sent something goes on at once (after letting other tasks run);
            // only one that found every owed stream full waits for the consumers.
            while self.hub.borrow().has_unsynced() {
                let progressed = self.hub.borrow_mut().catch_up();
                if !self.hub.borrow().has_unsynced() {
                    break;
                }
                if progressed {
                    glommio::executor().yield_now().await;
                } else {
                    glommio::timer::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    }

    fn kick_catch_up(&self) {
        if self.hub.borrow().has_unsynced() {
            let _ = self.catch_up_kick.try_send(());
        }
    }

    /// Stream ids for watches the server opens itself (locks, elections, native clients):
    /// top bit set, then the shard, so they never meet the gRPC front end's ids.
    pub fn internal_stream_id(&self) -> StreamId {
        let seq = self.next_internal_stream.get() + 1;
        self.next_internal_stream.set(seq);
        (1 << 63) | ((self.shard as u64) << 48) | (seq & ((1 << 48) - 1))
    }

    pub fn watch_open(&self, stream: StreamId, tx: futures::channel::mpsc::Sender<WatchOut>) {
        self.hub.borrow_mut().open_stream(stream, tx);
    }

    pub fn watch_create(&self, stream: StreamId, spec: WatchSpec) {
        self.hub.borrow_mut().create(stream, spec);
        self.kick_catch_up();
    }

    pub fn watch_refuse(&self, stream: StreamId, watch_id: i64, reason: String) {
        self.hub.borrow_mut().refuse(stream, watch_id, reason);
    }

    pub fn watch_cancel(&self, stream: StreamId, watch_id: i64) {
        self.hub.borrow_mut().cancel(stream, watch_id);
        self.kick_catch_up();
    }

    pub fn watch_progress(&self, stream: StreamId) {
        self.hub.borrow_mut().request_progress(stream);
        self.kick_catch_up();
    }

    pub fn watch_close(&self, stream: StreamId) {
        self.hub.borrow_mut().close_stream(stream);
    }

    /// Routes replies from the raft and apply actors to the waiting requests.
    pub async fn run_replies(self: Rc<Self>, mut inbox: BoxStream<ToNet>) {
        while let Some(msg) = inbox.next().await {
            match msg {
                ToNet::Written(batch) => {
                    for (id, h, r) in batch {
                        self.raft_term.set(self.raft_term.get().max(h.raft_term));
                        self.resolve(id, Reply::Written(h, r));
                    }
                }
                ToNet::ReadReady(ids) => ids
                    .into_iter()
                    .for_each(|id| self.resolve(id, Reply::ReadReady)),
                ToNet::Failed(ids, e) => ids
                    .into_iter()
                    .for_each(|id| self.resolve(id, Reply::Failed(e.clone()))),
                ToNet::Status(id, st) => {
                    self.raft_term.set(self.raft_term.get().max(st.term));
                    self.resolve(id, Reply::Status(st))
                }
                ToNet::Lease(id, r) => self.resolve(id, Reply::Lease(r)),
                ToNet::Events(batch) => {
                    self.hub.borrow_mut().on_batch(&batch);
                    self.kick_catch_up();
                }
            }
        }
    }

    fn resolve(&self, id: ReqId, reply: Reply) {
        // Absent when the request timed out; the client already has its error.
        if let Some(tx) = self.pending.borrow_mut().remove(&id) {
            let _ = tx.send(reply);
        }
    }

    pub(super) fn next_id(&self) -> ReqId {
        let seq = self.next_seq.get();
        self.next_seq.set((seq + 1) & ((1 << 48) - 1));
        ((self.shard as u64) << 48) | seq
    }

    pub(super) async fn call(&self, id: ReqId, msg: ToRaft) -> Result<Reply, KvError> {
        let (tx, rx) = oneshot::channel();
        self.pending.borrow_mut().insert(id, tx);
        if self.to_raft.send(msg).await.is_err() {
            self.pending.borrow_mut().remove(&id);
            return Err(KvError::Stopped);
        }
        self.wait_reply(id, rx).await
    }

    async fn call_lessor(&self, id: ReqId, msg: ToLessor) -> Result<LeaseReply, KvError> {
        let (tx, rx) = oneshot::channel();
        self.pending.borrow_mut().insert(id, tx);
        if self.to_apply.send(msg).await.is_err() {
            self.pending.borrow_mut().remove(&id);
            return Err(KvError::Stopped);
        }
        match self.wait_reply(id, rx).await? {
            Reply::Lease(r) => r,
            Reply::Failed(e) => Err(e),
            _ => Err(KvError::Internal("unexpected reply to lease query".into())),
        }
    }

    async fn wait_reply(&self, id: ReqId, rx: oneshot::Receiver<Reply>) -> Result<Reply, KvError> {
        let timer = glommio::timer::sleep(self.settings.request_timeout);
        match futures::future::select(rx, Box::pin(timer)).await {
            futures::future::Either::Left((Ok(reply), _)) => Ok(reply),
            futures::future::Either::Left((Err(_), _)) => Err(KvError::Stopped),
            futures::future::Either::Right(_) => {
                self.pending.borrow_mut().remove(&id);
                Err(KvError::Timeout)
            }
        }
    }

    /// Reads see at least the term of the last applied entry.
    pub(super) fn observe_term(&self, b: &Backend, txn: &heed::RoTxn) -> Result<(), KvError> {
        let applied_term = b.get_u64(txn, crate::storage::backend::meta_key::APPLIED_TERM)?;
        self.raft_term.set(self.raft_term.get().max(applied_term));
        Ok(())
    }

    pub(super) fn header(&self, revision: i64) -> Header {
        Header {
            cluster_id: self.settings.cluster_id,
            member_id: self.settings.member_id,
            revision,
            raft_term: self.raft_term.get(),
        }
    }

    /// Waits until everything committed before this call is applied (ReadIndex).
    async fn read_barrier(&self) -> Result<(), KvError> {
        let id = self.next_id();
        match self.call(id, ToRaft::ReadIndex { id }).await? {
            Reply::ReadReady => Ok(()),
            Reply::Failed(e) => Err(e),
            _ => Err(KvError::Internal("unexpected reply to read index".into())),
        }
    }

    pub async fn range(&self, req: RangeRequest) -> Result<(Header, RangeResponse), KvError> {
        validate::check_range(&req)?;
        if !req.serializable {
            self.read_barrier().await?;
        }
        let (b, txn) = self.backend.read()?;
        let (resp, rev) = mvcc::range(&b, &txn, &req)?;
        self.observe_term(&b, &txn)?;
        Ok((self.header(rev), resp))
    }

    /// A write of the server's own (never refused by the auth store).
    pub async fn write(
        self: &Rc<Self>,
        req: WriteRequest,
    ) -> Result<(Header, WriteResponse), KvError> {
        self.write_as(req, None).await
    }

    /// A write on behalf of `auth`'s user, judged by the auth store when applied.
    pub async fn write_as(
        self: &Rc<Self>,
        req: WriteRequest,
        auth: Option<AuthUser>,
    ) -> Result<(Header, WriteResponse), KvError> {
        validate::check_write(&req, self.settings.max_txn_ops)?;
        let grows = req.may_grow();
        let id = self.next_id();
        let data = postcard::to_allocvec(&Proposal {
            epoch: self.epoch,
            id,
            req,
            auth,
        })?;
        if data.len() as u64 > self.settings.max_request_bytes {
            return Err(KvError::RequestTooLarge);
        }
        if grows
            && self.backend.current().size_in_use_bytes() + data.len() as u64
                > self.settings.quota_backend_bytes
        {
            self.raise_nospace();
            return Err(KvError::NoSpace);
        }
        match self.call(id, ToRaft::Propose { id, data }).await? {
            Reply::Written(h, r) => r.map(|resp| (h, resp)),
            Reply::Failed(e) => Err(e),
            _ => Err(KvError::Internal("unexpected reply to proposal".into())),
        }
    }

    /// Raises the cluster-wide NOSPACE alarm through raft, as etcd's quota check does.
    fn raise_nospace(self: &Rc<Self>) {
        if self.nospace_raised.replace(true) {
            return;
        }
        let member_id = self.settings.member_id;
        let me = self.clone();
        glommio::spawn_local(async move {
            let req = WriteRequest::Alarm(AlarmRequest {
                action: AlarmAction::Activate,
                member_id,
                alarm: AlarmType::Nospace,
            });
            if let Err(e) = me.write(req).await {
                tracing::warn!("raising NOSPACE alarm: {e}");
            } else {
                tracing::warn!("quota exceeded: NOSPACE alarm raised");
            }
            me.nospace_raised.set(false);
        })
        .detach();
    }

    pub async fn alarm(
        self: &Rc<Self>,
        req: AlarmRequest,
    ) -> Result<(Header, Vec<AlarmMember>), KvError> {
        if req.action == AlarmAction::Get {
            let (b, txn) = self.backend.read()?;
            let rev = mvcc::current_revision(&b, &txn)?;
            self.observe_term(&b, &txn)?;
            let alarms = mvcc::alarms(&b, &txn)?
                .into_iter()
                .filter(|a| req.alarm == AlarmType::None || a.alarm == req.alarm)
                .collect();
            return Ok((self.header(rev), alarms));
        }
        match self.write(WriteRequest::Alarm(req)).await? {
            (h, WriteResponse::Alarm(a)) => Ok((h, a)),
            _ => Err(KvError::Internal("unexpected alarm response".into())),
        }
    }

    /// Maintenance.Defragment: the apply actor compacts the environment between batches
    /// (writes wait meanwhile, as with etcd's defrag). Not bounded by the request timeout:
    /// a large database takes a while, and the apply actor always answers.
    pub async fn defragment(&self) -> Result<Header, KvError> {
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        self.pending.borrow_mut().insert(id, tx);
        if self
            .to_apply
            .send(ToLessor::Defragment { id })
            .await
            .is_err()
        {
            self.pending.borrow_mut().remove(&id);
            return Err(KvError::Stopped);
        }
        match rx.await {
            Ok(Reply::Lease(Ok(LeaseReply::Defragmented))) => self.current_header(),
            Ok(Reply::Lease(Err(e))) | Ok(Reply::Failed(e)) => Err(e),
            Ok(_) => Err(KvError::Internal("unexpected reply to defragment".into())),
            Err(_) => Err(KvError::Stopped),
        }
    }

    /// The header for answers that carry the current revision without a raft round.
    pub fn current_header(&self) -> Result<Header, KvError> {
        let (b, txn) = self.backend.read()?;
        let rev = mvcc::current_revision(&b, &txn)?;
        self.observe_term(&b, &txn)?;
        Ok(self.header(rev))
    }

    /// etcd's LeaseGrant: id 0 picks one; TTLs below the minimum are raised to it.
    pub async fn lease_grant(
        self: &Rc<Self>,
        id: i64,
        ttl_secs: i64,
    ) -> Result<(Header, i64, i64), KvError> {
        if ttl_secs > validate::MAX_LEASE_TTL_SECS {
            return Err(KvError::LeaseTtlTooLarge);
        }
        let id = if id == 0 {
            next_lease_id(self.settings.member_id)
        } else {
            id
        };
        let ttl_secs = ttl_secs.max(self.settings.min_lease_ttl_secs);
        match self
            .write(WriteRequest::LeaseGrant { id, ttl_secs })
            .await?
        {
            (h, WriteResponse::LeaseGrant { id, ttl_secs }) => Ok((h, id, ttl_secs)),
            _ => Err(KvError::Internal("unexpected lease grant response".into())),
        }
    }

    pub async fn lease_revoke(self: &Rc<Self>, id: i64) -> Result<Header, KvError> {
        self.lease_revoke_as(id, None).await
    }

    /// A revoke on behalf of `who`: refused when an attached key is not theirs to delete.
    pub async fn lease_revoke_as(
        self: &Rc<Self>,
        id: i64,
        who: Option<AuthUser>,
    ) -> Result<Header, KvError> {
        let (h, _) = self.write_as(WriteRequest::LeaseRevoke { id }, who).await?;
        Ok(h)
    }

    /// Renews a lease on the leader: its TTL, or 0 when it no longer exists.
    /// Keepalives renew the leader's timers (etcd forwards them to the leader too).
    pub async fn lease_keepalive(&self, lease: i64) -> Result<(Header, i64), KvError> {
        let local = async {
            let id = self.next_id();
            match self
                .call_lessor(id, ToLessor::KeepAlive { id, lease })
                .await?
            {
                LeaseReply::KeepAlive(ttl) => Ok((self.current_header()?, ttl)),
                _ => Err(KvError::Internal("unexpected keepalive reply".into())),
            }
        };
        self.leader_answers(local, || async {
            self.leader_client().await?.lease_keepalive(lease).await
        })
        .await
    }

    /// A lease's remaining TTL (and keys), from the leader's lessor as etcd answers it.
    pub async fn lease_time_to_live(
        &self,
        lease: i64,
        keys: bool,
    ) -> Result<(Header, LeaseTimeToLive), KvError> {
        let local = async {
            let id = self.next_id();
            match self
                .call_lessor(id, ToLessor::TimeToLive { id, lease, keys })
                .await?
            {
                LeaseReply::TimeToLive(t) => Ok((self.current_header()?, t)),
                _ => Err(KvError::Internal("unexpected time-to-live reply".into())),
            }
        };
        self.leader_answers(local, || async {
            self.leader_client()
                .await?
                .lease_time_to_live(lease, keys)
                .await
        })
        .await
    }

    /// A call only the leader's lessor answers. A follower that knows the leader forwards
    /// at once (its own lessor could only say NotLeader); a stale hint (the leader just
    /// changed) falls through to `local`, and a NotLeader from it forwards.
    async fn leader_answers<T, F, Fut>(
        &self,
        local: impl std::future::Future<Output = Result<T, KvError>>,
        forward: F,
    ) -> Result<T, KvError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, KvError>>,
    {
        if self.follows_known_leader() {
            let r = forward().await;
            self.forget_leader_conn_on(&r);
            match r {
                Err(KvError::NotLeader | KvError::NoLeader) => {}
                other => return other,
            }
        }
        match local.await {
            Err(KvError::NotLeader) => {
                let r = forward().await;
                self.forget_leader_conn_on(&r);
                r
            }
            other => other,
        }
    }

    pub async fn lease_list(&self) -> Result<(Header, Vec<i64>), KvError> {
        let id = self.next_id();
        match self.call_lessor(id, ToLessor::Leases { id }).await? {
            LeaseReply::Leases(ids) => Ok((self.current_header()?, ids)),
            _ => Err(KvError::Internal("unexpected lease list reply".into())),
        }
    }

    /// etcd's HashKV at `rev` (0 = current), scanned on the blocking pool.
    pub async fn hash_kv(&self, rev: i64) -> Result<(Header, mvcc::KvHash), KvError> {
        let backend = self.backend.current();
        let h = glommio::executor()
            .spawn_blocking(move || mvcc::hash_kv(&backend, rev))
            .await?;
        Ok((self.header(h.current_revision), h))
    }

    /// A consistent copy of the state for Maintenance.Snapshot (made on the blocking
    /// pool); the caller streams and deletes the file.
    pub async fn snapshot_copy(&self) -> Result<(Header, std::path::PathBuf), KvError> {
        let backend = self.backend.current();
        let dir = self.settings.snap_dir.clone();
        let path = glommio::executor()
            .spawn_blocking(move || crate::storage::snapshot::save_copy(&backend, &dir))
            .await
            .map_err(KvError::Internal)?;
        Ok((self.current_header()?, path))
    }

    /// Maintenance.Hash over the replicated tables, on the blocking pool.
    pub async fn hash_all(&self) -> Result<(Header, u32), KvError> {
        let backend = self.backend.current();
        let h = glommio::executor()
            .spawn_blocking(move || mvcc::hash_all(&backend))
            .await?;
        Ok((self.current_header()?, h))
    }

    pub async fn status(&self) -> Result<(Header, Status), KvError> {
        let id = self.next_id();
        let rs = match self.call(id, ToRaft::Status { id }).await? {
            Reply::Status(rs) => rs,
            Reply::Failed(e) => return Err(e),
            _ => return Err(KvError::Internal("unexpected reply to status".into())),
        };
        let (b, txn) = self.backend.read()?;
        let rev = mvcc::current_revision(&b, &txn)?;
        let applied = b.get_u64(&txn, crate::storage::backend::meta_key::APPLIED_INDEX)?;
        let errors = mvcc::alarms(&b, &txn)?
            .iter()
            .map(|a| format!("memberID:{} alarm:{} ", a.member_id, alarm_name(a.alarm)))
            .collect();
        let status = Status {
            version: VERSION.to_string(),
            db_size: b.file_size_bytes() as i64,
            db_size_in_use: b.size_in_use_bytes() as i64,
            leader: rs.leader,
            raft_index: rs.commit,
            raft_term: rs.term,
            raft_applied_index: applied,
            errors,
            is_learner: rs.is_learner,
            wal: rs.wal,
        };
        Ok((self.header(rev), status))
    }
}

pub fn alarm_name(a: AlarmType) -> &'static str {
    match a {
        AlarmType::None => "NONE",
        AlarmType::Nospace => "NOSPACE",
        AlarmType::Corrupt => "CORRUPT",
    }
}

fn to_capnp(e: KvError) -> capnp::Error {
    capnp::Error::failed(e.to_string())
}

struct KvService {
    shard: Rc<Shard>,
    permits: Rc<glommio::sync::Semaphore>,
    /// The token of a capability `authenticate` handed out; None for the bootstrap one
    /// (a caller without a user).
    token: Option<Rc<str>>,
    /// The CN of the connection's verified client certificate under --client-cert-auth:
    /// the user when no token is given (etcd's AuthInfoFromTLS).
    cert_user: Option<Rc<str>>,
}

impl KvService {
    /// Who is calling (see api::native_auth).
    async fn who(&self) -> Result<AuthUser, capnp::Error> {
        native_auth::caller(
            &self.shard,
            self.token.as_deref(),
            self.cert_user.as_deref(),
        )
        .await
        .map_err(to_capnp)
    }

    /// A slot among the connection's in-flight calls, and who is calling.
    async fn permit(&self) -> Result<(glommio::sync::Permit<'_>, AuthUser), capnp::Error> {
        let who = self.who().await?;
        let permit = self
            .permits
            .acquire_permit(1)
            .await
            .map_err(|e| capnp::Error::failed(format!("etcdserver: {e}")))?;
        Ok((permit, who))
    }

    fn check_range(
        &self,
        who: &AuthUser,
        key: &[u8],
        range_end: &[u8],
        need: PermType,
    ) -> Result<(), capnp::Error> {
        native_auth::check_range(&self.shard, who, key, range_end, need).map_err(to_capnp)
    }

    fn check_admin(&self, who: &AuthUser) -> Result<(), capnp::Error> {
        native_auth::check_admin(&self.shard, who).map_err(to_capnp)
    }

    fn check_recipe(&self, who: &AuthUser, name: &[u8], write: bool) -> Result<(), capnp::Error> {
        native_auth::check_recipe(&self.shard, who, name, write).map_err(to_capnp)
    }
}

impl kv::Server for KvService {
    async fn range(
        self: Rc<Self>,
        params: kv::RangeParams,
        mut results: kv::RangeResults,
    ) -> Result<(), capnp::Error> {
        let (_p, who) = self.permit().await?;
        let req = native::read_range_req(params.get()?.get_req()?)?;
        self.check_range(&who, &req.key, &req.range_end, PermType::Read)?;
        let (h, resp) = self.shard.range(req).await.map_err(to_capnp)?;
        native::write_range_resp(results.get().init_resp(), &h, &resp);
        Ok(())
    }

    async fn put(
        self: Rc<Self>,
        params: kv::PutParams,
        mut results: kv::PutResults,
    ) -> Result<(), capnp::Error> {
        let (_p, who) = self.permit().await?;
        let req = native::read_put_req(params.get()?.get_req()?)?;
        tracing::trace!(key = ?String::from_utf8_lossy(&req.key), "put in");
        match self
            .shard
            .write_as(WriteRequest::Put(req), Some(who))
            .await
            .map_err(to_capnp)?
        {
            (h, WriteResponse::Put(r)) => native::write_put_resp(results.get().init_resp(), &h, &r),
            _ => return Err(capnp::Error::failed("unexpected response".into())),
        }
        tracing::trace!("put out");
        Ok(())
    }

    async fn delete_range(
        self: Rc<Self>,
        params: kv::DeleteRangeParams,
        mut results: kv::DeleteRangeResults,
    ) -> Result<(), capnp::Error> {
        let (_p, who) = self.permit().await?;
        let req = native::read_delete_req(params.get()?.get_req()?)?;
        match self
            .shard
            .write_as(WriteRequest::DeleteRange(req), Some(who))
            .await
            .map_err(to_capnp)?
        {
            (h, WriteResponse::DeleteRange(r)) => {
                native::write_delete_resp(results.get().init_resp(), &h, &r)
            }
            _ => return Err(capnp::Error::failed("unexpected response".into())),
        }
        Ok(())
    }

    async fn txn(
        self: Rc<Self>,
        params: kv::TxnParams,
        mut results: kv::TxnResults,
    ) -> Result<(), capnp::Error> {
        let (_p, who) = self.permit().await?;
        let req = native::read_txn_req(params.get()?.get_req()?)?;
        // Every txn, read-only ones too, is ordered through raft (etcd serves read-only
        // txns via ReadIndex; doing so here is a later optimisation).
        match self
            .shard
            .write_as(WriteRequest::Txn(req), Some(who))
            .await
            .map_err(to_capnp)?
        {
            (h, WriteResponse::Txn(r)) => native::write_txn_resp(results.get().init_resp(), &h, &r),
            _ => return Err(capnp::Error::failed("unexpected response".into())),
        }
        Ok(())
    }

    async fn compact(
        self: Rc<Self>,
        params: kv::CompactParams,
        mut results: kv::CompactResults,
    ) -> Result<(), capnp::Error> {
        let (_p, who) = self.permit().await?;
        let r = params.get()?.get_req()?;
        let req = CompactionRequest {
            revision: r.get_revision(),
            physical: r.get_physical(),
        };
        let (h, _) = self
            .shard
            .write_as(WriteRequest::Compact(req), Some(who))
            .await
            .map_err(to_capnp)?;
        native::write_header(results.get().init_resp().init_header(), &h);
        Ok(())
    }

    async fn alarm(
        self: Rc<Self>,
        params: kv::AlarmParams,
        mut results: kv::AlarmResults,
    ) -> Result<(), capnp::Error> {
        // No permission needed (etcd 3.4 serves alarms to a caller without a user).
        let (_p, _who) = self.permit().await?;
        let req = native::read_alarm_req(params.get()?.get_req()?)?;
        let (h, alarms) = self.shard.alarm(req).await.map_err(to_capnp)?;
        native::write_alarm_resp(results.get().init_resp(), &h, &alarms);
        Ok(())
    }

    async fn lease_grant(
        self: Rc<Self>,
        params: kv::LeaseGrantParams,
        mut results: kv::LeaseGrantResults,
    ) -> Result<(), capnp::Error> {
        let (_p, _who) = self.permit().await?;
        let p = params.get()?;
        let (h, id, ttl) = self
            .shard
            .lease_grant(p.get_id(), p.get_ttl())
            .await
            .map_err(to_capnp)?;
        let mut r = results.get().init_resp();
        native::write_header(r.reborrow().init_header(), &h);
        r.set_id(id);
        r.set_ttl(ttl);
        Ok(())
    }

    async fn lease_revoke(
        self: Rc<Self>,
        params: kv::LeaseRevokeParams,
        mut results: kv::LeaseRevokeResults,
    ) -> Result<(), capnp::Error> {
        let (_p, who) = self.permit().await?;
        let id = params.get()?.get_id();
        let h = self
            .shard
            .lease_revoke_as(id, Some(who))
            .await
            .map_err(to_capnp)?;
        native::write_header(results.get().init_header(), &h);
        Ok(())
    }

    async fn lease_keep_alive(
        self: Rc<Self>,
        params: kv::LeaseKeepAliveParams,
        mut results: kv::LeaseKeepAliveResults,
    ) -> Result<(), capnp::Error> {
        let (_p, _who) = self.permit().await?;
        let id = params.get()?.get_id();
        let (h, ttl) = self.shard.lease_keepalive(id).await.map_err(to_capnp)?;
        let mut r = results.get();
        native::write_header(r.reborrow().init_header(), &h);
        r.set_ttl(ttl);
        Ok(())
    }

    async fn lease_time_to_live(
        self: Rc<Self>,
        params: kv::LeaseTimeToLiveParams,
        mut results: kv::LeaseTimeToLiveResults,
    ) -> Result<(), capnp::Error> {
        let (_p, _who) = self.permit().await?;
        let p = params.get()?;
        let (h, t) = self
            .shard
            .lease_time_to_live(p.get_id(), p.get_keys())
            .await
            .map_err(to_capnp)?;
        let mut r = results.get().init_resp();
        native::write_header(r.reborrow().init_header(), &h);
        r.set_id(t.id);
        r.set_ttl(t.ttl_secs);
        r.set_granted_ttl(t.granted_ttl_secs);
        let mut keys = r.init_keys(t.keys.len() as u32);
        for (i, k) in t.keys.iter().enumerate() {
            keys.set(i as u32, k);
        }
        Ok(())
    }

    async fn lease_leases(
        self: Rc<Self>,
        _params: kv::LeaseLeasesParams,
        mut results: kv::LeaseLeasesResults,
    ) -> Result<(), capnp::Error> {
        let (_p, _who) = self.permit().await?;
        let (h, ids) = self.shard.lease_list().await.map_err(to_capnp)?;
        let mut r = results.get();
        native::write_header(r.reborrow().init_header(), &h);
        let mut list = r.init_ids(ids.len() as u32);
        for (i, id) in ids.iter().enumerate() {
            list.set(i as u32, *id);
        }
        Ok(())
    }

    async fn watch(
        self: Rc<Self>,
        params: kv::WatchParams,
        _results: kv::WatchResults,
    ) -> Result<(), capnp::Error> {
        let who = self.who().await?;
        // No permit: a watch lasts as long as the client wants it.
        let p = params.get()?;
        let spec = native::read_watch_req(p.get_req()?)?;
        self.check_range(&who, &spec.key, &spec.range_end, PermType::Read)?;
        let sink = p.get_sink()?;
        pump_watch(InternalWatch::new(&self.shard, spec), sink).await
    }

    async fn lock(
        self: Rc<Self>,
        params: kv::LockParams,
        mut results: kv::LockResults,
    ) -> Result<(), capnp::Error> {
        let who = self.who().await?;
        let p = params.get()?;
        let (name, lease) = (p.get_name()?.to_vec(), p.get_lease());
        self.check_recipe(&who, &name, true)?;
        let (h, key) = self.shard.lock(name, lease).await.map_err(to_capnp)?;
        let mut r = results.get();
        native::write_header(r.reborrow().init_header(), &h);
        r.set_key(&key);
        Ok(())
    }

    async fn unlock(
        self: Rc<Self>,
        params: kv::UnlockParams,
        mut results: kv::UnlockResults,
    ) -> Result<(), capnp::Error> {
        let (_p, who) = self.permit().await?;
        let key = params.get()?.get_key()?.to_vec();
        self.check_range(&who, &key, &[], PermType::Write)?;
        let h = self.shard.unlock(key).await.map_err(to_capnp)?;
        native::write_header(results.get().init_header(), &h);
        Ok(())
    }

    async fn campaign(
        self: Rc<Self>,
        params: kv::CampaignParams,
        mut results: kv::CampaignResults,
    ) -> Result<(), capnp::Error> {
        let who = self.who().await?;
        let p = params.get()?;
        let (name, lease, value) = (
            p.get_name()?.to_vec(),
            p.get_lease(),
            p.get_value()?.to_vec(),
        );
        self.check_recipe(&who, &name, true)?;
        let (h, leader) = self
            .shard
            .campaign(name, lease, value)
            .await
            .map_err(to_capnp)?;
        let mut r = results.get();
        native::write_header(r.reborrow().init_header(), &h);
        native::write_leader_key(r.init_leader(), &leader);
        Ok(())
    }

    async fn proclaim(
        self: Rc<Self>,
        params: kv::ProclaimParams,
        mut results: kv::ProclaimResults,
    ) -> Result<(), capnp::Error> {
        let (_p, who) = self.permit().await?;
        let p = params.get()?;
        let leader = native::read_leader_key(p.get_leader()?)?;
        let value = p.get_value()?.to_vec();
        self.check_range(&who, &leader.key, &[], PermType::Write)?;
        let h = self.shard.proclaim(leader, value).await.map_err(to_capnp)?;
        native::write_header(results.get().init_header(), &h);
        Ok(())
    }

    async fn resign(
        self: Rc<Self>,
        params: kv::ResignParams,
        mut results: kv::ResignResults,
    ) -> Result<(), capnp::Error> {
        let (_p, who) = self.permit().await?;
        let leader = native::read_leader_key(params.get()?.get_leader()?)?;
        self.check_range(&who, &leader.key, &[], PermType::Write)?;
        let h = self.shard.resign(leader).await.map_err(to_capnp)?;
        native::write_header(results.get().init_header(), &h);
        Ok(())
    }

    async fn leader(
        self: Rc<Self>,
        params: kv::LeaderParams,
        mut results: kv::LeaderResults,
    ) -> Result<(), capnp::Error> {
        let (_p, who) = self.permit().await?;
        let name = params.get()?.get_name()?.to_vec();
        self.check_recipe(&who, &name, false)?;
        let (h, kv) = self.shard.leader(&name).await.map_err(to_capnp)?;
        let mut r = results.get();
        native::write_header(r.reborrow().init_header(), &h);
        native::write_kv(r.init_kv(), &kv);
        Ok(())
    }

    async fn observe(
        self: Rc<Self>,
        params: kv::ObserveParams,
        _results: kv::ObserveResults,
    ) -> Result<(), capnp::Error> {
        let who = self.who().await?;
        let p = params.get()?;
        let name = p.get_name()?.to_vec();
        self.check_recipe(&who, &name, false)?;
        let sink = p.get_sink()?;
        let mut leaders = self.shard.observe(name);
        while let Some(next) = leaders.next().await {
            let (header, kv) = next.map_err(to_capnp)?;
            let resp = WatchResponse {
                header,
                events: vec![Event {
                    kind: EventKind::Put,
                    kv,
                    prev_kv: None,
                }],
                ..Default::default()
            };
            let mut req = sink.send_request();
            native::write_watch_resp(req.get().init_resp(), &resp);
            req.send().promise.await?;
        }
        Ok(())
    }

    async fn member_list(
        self: Rc<Self>,
        _params: kv::MemberListParams,
        mut results: kv::MemberListResults,
    ) -> Result<(), capnp::Error> {
        let (_p, _who) = self.permit().await?;
        let (h, ms) = self.shard.member_list().map_err(to_capnp)?;
        let mut r = results.get();
        native::write_header(r.reborrow().init_header(), &h);
        native::write_members(r.init_members(ms.len() as u32), &ms);
        Ok(())
    }

    async fn member_add(
        self: Rc<Self>,
        params: kv::MemberAddParams,
        mut results: kv::MemberAddResults,
    ) -> Result<(), capnp::Error> {
        let (_p, who) = self.permit().await?;
        self.check_admin(&who)?;
        let p = params.get()?;
        let urls = native::read_text_list(p.get_peer_urls()?)?;
        let (h, m, ms) = self
            .shard
            .member_add(urls, p.get_is_learner())
            .await
            .map_err(to_capnp)?;
        let mut r = results.get();
        native::write_header(r.reborrow().init_header(), &h);
        native::write_member(r.reborrow().init_member(), &m);
        native::write_members(r.init_members(ms.len() as u32), &ms);
        Ok(())
    }

    async fn member_remove(
        self: Rc<Self>,
        params: kv::MemberRemoveParams,
        mut results: kv::MemberRemoveResults,
    ) -> Result<(), capnp::Error> {
        let (_p, who) = self.permit().await?;
        self.check_admin(&who)?;
        let id = params.get()?.get_id();
        let (h, ms) = self.shard.member_remove(id).await.map_err(to_capnp)?;
        let mut r = results.get();
        native::write_header(r.reborrow().init_header(), &h);
        native::write_members(r.init_members(ms.len() as u32), &ms);
        Ok(())
    }

    async fn member_update(
        self: Rc<Self>,
        params: kv::MemberUpdateParams,
        mut results: kv::MemberUpdateResults,
    ) -> Result<(), capnp::Error> {
        let (_p, who) = self.permit().await?;
        self.check_admin(&who)?;
        let p = params.get()?;
        let urls = native::read_text_list(p.get_peer_urls()?)?;
        let (h, ms) = self
            .shard
            .member_update(p.get_id(), urls)
            .await
            .map_err(to_capnp)?;
        let mut r = results.get();
        native::write_header(r.reborrow().init_header(), &h);
        native::write_members(r.init_members(ms.len() as u32), &ms);
        Ok(())
    }

    async fn member_promote(
        self: Rc<Self>,
        params: kv::MemberPromoteParams,
        mut results: kv::MemberPromoteResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let forwarded = p
            .get_token()?
            .to_str()
            .map_err(|e| capnp::Error::failed(format!("token: {e}")))?;
        let (_p, mut who) = self.permit().await?;
        let token = if forwarded.is_empty() {
            self.token.as_deref()
        } else {
            who = native_auth::caller(&self.shard, Some(forwarded), None)
                .await
                .map_err(to_capnp)?;
            Some(forwarded)
        };
        self.check_admin(&who)?;
        let (h, ms) = self
            .shard
            .member_promote(p.get_id(), token.map(str::to_owned))
            .await
            .map_err(to_capnp)?;
        let mut r = results.get();
        native::write_header(r.reborrow().init_header(), &h);
        native::write_members(r.init_members(ms.len() as u32), &ms);
        Ok(())
    }

    async fn move_leader(
        self: Rc<Self>,
        params: kv::MoveLeaderParams,
        mut results: kv::MoveLeaderResults,
    ) -> Result<(), capnp::Error> {
        // No permission needed (as etcd 3.4's MoveLeader).
        let (_p, _who) = self.permit().await?;
        let target = params.get()?.get_target();
        let h = self.shard.move_leader(target).await.map_err(to_capnp)?;
        native::write_header(results.get().init_header(), &h);
        Ok(())
    }

    async fn defragment(
        self: Rc<Self>,
        _params: kv::DefragmentParams,
        mut results: kv::DefragmentResults,
    ) -> Result<(), capnp::Error> {
        let (_p, who) = self.permit().await?;
        self.check_admin(&who)?;
        let h = self.shard.defragment().await.map_err(to_capnp)?;
        native::write_header(results.get().init_header(), &h);
        Ok(())
    }

    async fn hash_kv(
        self: Rc<Self>,
        params: kv::HashKvParams,
        mut results: kv::HashKvResults,
    ) -> Result<(), capnp::Error> {
        let (_p, who) = self.permit().await?;
        self.check_admin(&who)?;
        let rev = params.get()?.get_revision();
        let (h, kh) = self.shard.hash_kv(rev).await.map_err(to_capnp)?;
        let mut r = results.get();
        native::write_header(r.reborrow().init_header(), &h);
        r.set_hash(kh.hash);
        r.set_compact_revision(kh.compact_revision);
        Ok(())
    }

    async fn status(
        self: Rc<Self>,
        _params: kv::StatusParams,
        mut results: kv::StatusResults,
    ) -> Result<(), capnp::Error> {
        let (_p, _who) = self.permit().await?;
        let (h, st) = self.shard.status().await.map_err(to_capnp)?;
        native::write_status(results.get().init_resp(), &h, &st);
        Ok(())
    }

    async fn authenticate(
        self: Rc<Self>,
        params: kv::AuthenticateParams,
        mut results: kv::AuthenticateResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let name = p
            .get_name()?
            .to_string()
            .map_err(|e| capnp::Error::failed(e.to_string()))?;
        let password = p
            .get_password()?
            .to_string()
            .map_err(|e| capnp::Error::failed(e.to_string()))?;
        let (_, token) = native_auth::authenticate(&self.shard, name, password)
            .await
            .map_err(to_capnp)?;
        let service = KvService {
            shard: self.shard.clone(),
            // The connection's in-flight bound covers every capability on it.
            permits: self.permits.clone(),
            token: Some(Rc::from(token.as_str())),
            cert_user: self.cert_user.clone(),
        };
        let mut r = results.get();
        r.set_token(&token);
        r.set_kv(capnp_rpc::new_client(service));
        Ok(())
    }
}

/// Sends hub messages to a native watch sink, one call at a time (flow control), until
/// the watch is canceled or the client goes away.
async fn pump_watch(mut w: InternalWatch, sink: kv_capnp_sink::Client) -> Result<(), capnp::Error> {
    while let Some(out) = w.next_out().await {
        let resp = native::watch_out_to_resp(out);
        let last = resp.canceled;
        let mut req = sink.send_request();
        native::write_watch_resp(req.get().init_resp(), &resp);
        req.send().promise.await?;
        if last {
            break;
        }
    }
    Ok(())
}

use crate::kv_capnp::watch_sink as kv_capnp_sink;

/// Reader limits for one connection: a message over this is refused before allocation.
pub fn reader_options(max_request_bytes: u64) -> capnp::message::ReaderOptions {
    let mut o = capnp::message::ReaderOptions::new();
    o.traversal_limit_in_words(Some(((max_request_bytes + (1 << 20)) / 8) as usize));
    o.nesting_limit(128);
    o
}

async fn serve_conn<S>(
    shard: Rc<Shard>,
    stream: S,
    peer: Option<std::net::SocketAddr>,
    cert_user: Option<Rc<str>>,
) where
    S: futures::AsyncRead + futures::AsyncWrite + Unpin + 'static,
{
    let (reader, writer) = futures::AsyncReadExt::split(stream);
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(reader),
        crate::transport::coalescing(writer),
        Side::Server,
        reader_options(shard.settings.max_request_bytes),
    );
    let service = KvService {
        shard,
        permits: Rc::new(glommio::sync::Semaphore::new(MAX_INFLIGHT_PER_CONN)),
        token: None,
        cert_user,
    };
    let client: kv::Client = capnp_rpc::new_client(service);
    let rpc = RpcSystem::new(Box::new(network), Some(client.client));
    if let Err(e) = rpc.await {
        tracing::debug!(?peer, "native connection closed: {e}");
    }
}

/// One accepted connection: plaintext, or TLS (the handshake runs in this connection's
/// own task, so it never holds up the accept loop or other connections).
async fn accept_conn(shard: Rc<Shard>, stream: TcpStream, tls: Option<crate::tls::TlsSide>) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    let Some(tls) = tls else {
        return serve_conn(shard, stream, peer, None).await;
    };
    let acceptor = futures_rustls::TlsAcceptor::from(tls.server.clone());
    let timeout = Duration::from_millis(crate::tls::HANDSHAKE_TIMEOUT_MS);
    let stream =
        match glommio::timer::timeout(timeout, async { Ok(acceptor.accept(stream).await) }).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return tracing::info!(?peer, "native TLS handshake refused: {e}"),
            Err(e) => return tracing::info!(?peer, "native TLS handshake: {e}"),
        };
    if let Err(e) = crate::tls::check_identity(&tls, stream.get_ref().1.peer_certificates()) {
        return tracing::info!(?peer, "native TLS refused: {e}");
    }
    // With --client-cert-auth the verified certificate's CN is the user (as etcd).
    let cert_user = if tls.client_cert_auth {
        stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(crate::tls::common_name)
            .map(|cn| Rc::from(cn.as_str()))
    } else {
        None
    };
    serve_conn(shard, stream, peer, cert_user).await
}

/// Accepts connections on every native URL of this shard until the process exits
/// (`(host:port, tls)` pairs; TLS ones with the client side's certificate).
pub async fn serve(shard: Rc<Shard>, addrs: Vec<(String, bool)>) -> std::io::Result<()> {
    let mut accepts = Vec::new();
    for (addr, tls) in addrs {
        let listener = TcpListener::bind(addr.as_str())?;
        let shard = shard.clone();
        let tls = if tls {
            let side = shard.settings.client_tls.clone();
            assert!(
                side.is_some(),
                "an https native URL passed start-up without TLS"
            );
            side
        } else {
            None
        };
        accepts.push(glommio::spawn_local(async move {
            loop {
                match listener.accept().await {
                    Ok(stream) => {
                        glommio::spawn_local(accept_conn(shard.clone(), stream, tls.clone()))
                            .detach();
                    }
                    Err(e) => {
                        // e.g. EMFILE: back off instead of spinning.
                        tracing::warn!("accept on {addr}: {e}");
                        glommio::timer::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    futures::future::join_all(accepts).await;
    Ok(())
}
