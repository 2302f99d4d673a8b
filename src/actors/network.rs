//! Network actor, one per shard: accepts native capnp-rpc connections (SO_REUSEPORT, so
//! the kernel spreads connections over shards), serves serializable reads straight from
//! an LMDB read txn, and sends writes and linearizable reads to the raft actor as typed
//! messages, matching replies by request id. All state here is shard-local.

use super::*;
use crate::api::{native, validate};
use crate::kv_capnp::kv;
use crate::model::*;
use crate::storage::backend::Backend;
use crate::storage::mvcc;
use capnp_rpc::{rpc_twoparty_capnp::Side, twoparty, RpcSystem};
use futures::channel::oneshot;
use futures::StreamExt;
use glommio::channels::shared_channel::ConnectedSender;
use glommio::net::{TcpListener, TcpStream};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

/// Calls one connection may have in flight; more wait (capnp-rpc has no flow control).
const MAX_INFLIGHT_PER_CONN: u64 = 1024;
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub enum Reply {
    Written(Header, Result<WriteResponse, KvError>),
    ReadReady,
    Failed(KvError),
    Status(RaftStatus),
}

pub struct NetSettings {
    pub max_request_bytes: u64,
    pub max_txn_ops: usize,
    pub quota_backend_bytes: u64,
    pub cluster_id: u64,
    pub member_id: u64,
    pub request_timeout: Duration,
}

pub struct Shard {
    shard: usize,
    epoch: u64,
    backend: Backend,
    settings: NetSettings,
    to_raft: ConnectedSender<ToRaft>,
    pending: RefCell<HashMap<ReqId, oneshot::Sender<Reply>>>,
    next_seq: Cell<u64>,
    raft_term: Cell<u64>,
    nospace_raised: Cell<bool>,
}

impl Shard {
    pub fn new(
        shard: usize,
        epoch: u64,
        backend: Backend,
        settings: NetSettings,
        to_raft: ConnectedSender<ToRaft>,
    ) -> Rc<Shard> {
        assert!(shard < (1 << 16), "shard index must fit in a request id");
        Rc::new(Shard {
            shard,
            epoch,
            backend,
            settings,
            to_raft,
            pending: RefCell::new(HashMap::new()),
            next_seq: Cell::new(1),
            raft_term: Cell::new(0),
            nospace_raised: Cell::new(false),
        })
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
            }
        }
    }

    fn resolve(&self, id: ReqId, reply: Reply) {
        // Absent when the request timed out; the client already has its error.
        if let Some(tx) = self.pending.borrow_mut().remove(&id) {
            let _ = tx.send(reply);
        }
    }

    fn next_id(&self) -> ReqId {
        let seq = self.next_seq.get();
        self.next_seq.set((seq + 1) & ((1 << 48) - 1));
        ((self.shard as u64) << 48) | seq
    }

    async fn call(&self, id: ReqId, msg: ToRaft) -> Result<Reply, KvError> {
        let (tx, rx) = oneshot::channel();
        self.pending.borrow_mut().insert(id, tx);
        if self.to_raft.send(msg).await.is_err() {
            self.pending.borrow_mut().remove(&id);
            return Err(KvError::Stopped);
        }
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
    fn observe_term(&self, txn: &heed::RoTxn) -> Result<(), KvError> {
        let applied_term = self
            .backend
            .get_u64(txn, crate::storage::backend::meta_key::APPLIED_TERM)?;
        self.raft_term.set(self.raft_term.get().max(applied_term));
        Ok(())
    }

    fn header(&self, revision: i64) -> Header {
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
        let txn = self.backend.read_txn()?;
        let (resp, rev) = mvcc::range(&self.backend, &txn, &req)?;
        self.observe_term(&txn)?;
        Ok((self.header(rev), resp))
    }

    pub async fn write(
        self: &Rc<Self>,
        req: WriteRequest,
    ) -> Result<(Header, WriteResponse), KvError> {
        validate::check_write(&req, self.settings.max_txn_ops)?;
        let grows = req.may_grow();
        let id = self.next_id();
        let data = postcard::to_allocvec(&Proposal {
            epoch: self.epoch,
            id,
            req,
        })?;
        if data.len() as u64 > self.settings.max_request_bytes {
            return Err(KvError::RequestTooLarge);
        }
        if grows
            && self.backend.size_in_use_bytes() + data.len() as u64
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
            let txn = self.backend.read_txn()?;
            let rev = mvcc::current_revision(&self.backend, &txn)?;
            self.observe_term(&txn)?;
            let alarms = mvcc::alarms(&self.backend, &txn)?
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

    pub async fn status(&self) -> Result<(Header, Status), KvError> {
        let id = self.next_id();
        let rs = match self.call(id, ToRaft::Status { id }).await? {
            Reply::Status(rs) => rs,
            Reply::Failed(e) => return Err(e),
            _ => return Err(KvError::Internal("unexpected reply to status".into())),
        };
        let txn = self.backend.read_txn()?;
        let rev = mvcc::current_revision(&self.backend, &txn)?;
        let applied = self
            .backend
            .get_u64(&txn, crate::storage::backend::meta_key::APPLIED_INDEX)?;
        let errors = mvcc::alarms(&self.backend, &txn)?
            .iter()
            .map(|a| format!("memberID:{} alarm:{} ", a.member_id, alarm_name(a.alarm)))
            .collect();
        let status = Status {
            version: VERSION.to_string(),
            db_size: self.backend.file_size_bytes() as i64,
            db_size_in_use: self.backend.size_in_use_bytes() as i64,
            leader: rs.leader,
            raft_index: rs.commit,
            raft_term: rs.term,
            raft_applied_index: applied,
            errors,
            is_learner: false,
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
}

impl KvService {
    async fn permit(&self) -> Result<glommio::sync::Permit<'_>, capnp::Error> {
        self.permits
            .acquire_permit(1)
            .await
            .map_err(|e| capnp::Error::failed(format!("etcdserver: {e}")))
    }
}

impl kv::Server for KvService {
    async fn range(
        self: Rc<Self>,
        params: kv::RangeParams,
        mut results: kv::RangeResults,
    ) -> Result<(), capnp::Error> {
        let _p = self.permit().await?;
        let req = native::read_range_req(params.get()?.get_req()?)?;
        let (h, resp) = self.shard.range(req).await.map_err(to_capnp)?;
        native::write_range_resp(results.get().init_resp(), &h, &resp);
        Ok(())
    }

    async fn put(
        self: Rc<Self>,
        params: kv::PutParams,
        mut results: kv::PutResults,
    ) -> Result<(), capnp::Error> {
        let _p = self.permit().await?;
        let req = native::read_put_req(params.get()?.get_req()?)?;
        tracing::trace!(key = ?String::from_utf8_lossy(&req.key), "put in");
        match self
            .shard
            .write(WriteRequest::Put(req))
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
        let _p = self.permit().await?;
        let req = native::read_delete_req(params.get()?.get_req()?)?;
        match self
            .shard
            .write(WriteRequest::DeleteRange(req))
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
        let _p = self.permit().await?;
        let req = native::read_txn_req(params.get()?.get_req()?)?;
        // Every txn, read-only ones too, is ordered through raft (etcd serves read-only
        // txns via ReadIndex; doing so here is a later optimisation).
        match self
            .shard
            .write(WriteRequest::Txn(req))
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
        let _p = self.permit().await?;
        let r = params.get()?.get_req()?;
        let req = CompactionRequest {
            revision: r.get_revision(),
            physical: r.get_physical(),
        };
        let (h, _) = self
            .shard
            .write(WriteRequest::Compact(req))
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
        let _p = self.permit().await?;
        let req = native::read_alarm_req(params.get()?.get_req()?)?;
        let (h, alarms) = self.shard.alarm(req).await.map_err(to_capnp)?;
        native::write_alarm_resp(results.get().init_resp(), &h, &alarms);
        Ok(())
    }

    async fn status(
        self: Rc<Self>,
        _params: kv::StatusParams,
        mut results: kv::StatusResults,
    ) -> Result<(), capnp::Error> {
        let _p = self.permit().await?;
        let (h, st) = self.shard.status().await.map_err(to_capnp)?;
        native::write_status(results.get().init_resp(), &h, &st);
        Ok(())
    }
}

/// Reader limits for one connection: a message over this is refused before allocation.
pub fn reader_options(max_request_bytes: u64) -> capnp::message::ReaderOptions {
    let mut o = capnp::message::ReaderOptions::new();
    o.traversal_limit_in_words(Some(((max_request_bytes + (1 << 20)) / 8) as usize));
    o.nesting_limit(128);
    o
}

async fn serve_conn(shard: Rc<Shard>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
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
    };
    let client: kv::Client = capnp_rpc::new_client(service);
    let rpc = RpcSystem::new(Box::new(network), Some(client.client));
    if let Err(e) = rpc.await {
        tracing::debug!(?peer, "native connection closed: {e}");
    }
}

/// Accepts connections on every native URL of this shard until the process exits.
pub async fn serve(shard: Rc<Shard>, addrs: Vec<String>) -> std::io::Result<()> {
    let mut accepts = Vec::new();
    for addr in addrs {
        let listener = TcpListener::bind(addr.as_str())?;
        let shard = shard.clone();
        accepts.push(glommio::spawn_local(async move {
            loop {
                match listener.accept().await {
                    Ok(stream) => {
                        glommio::spawn_local(serve_conn(shard.clone(), stream)).detach();
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
