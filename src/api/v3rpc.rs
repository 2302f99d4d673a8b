//! etcd's v3 gRPC API (etcd's `api/v3rpc`): tonic services on their own tokio thread,
//! converting etcd's protobuf messages to the internal model and bridging each request
//! into a shard (round robin) through bounded mailboxes, so gRPC and the native protocol
//! share one request path. Features not built yet answer `Unimplemented`, naming them.

use crate::actors::bridge::BridgeRequest;
use crate::error::{Code, KvError};
use crate::etcdpb::etcdserverpb as pb;
use crate::etcdpb::etcdserverpb::{auth_server::AuthServer, lease_server::LeaseServer};
use crate::etcdpb::etcdserverpb::{
    cluster_server::{Cluster, ClusterServer},
    kv_server::{Kv, KvServer},
    maintenance_server::{Maintenance, MaintenanceServer},
};
use crate::etcdpb::mvccpb;
use crate::etcdpb::v3electionpb::election_server::ElectionServer;
use crate::etcdpb::v3lockpb::lock_server::LockServer;
use crate::model::*;
use futures::channel::{mpsc, oneshot};
use futures::SinkExt;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The etcd API version corekv implements, reported by Status (clients check it).
pub const ETCD_API_VERSION: &str = "3.4.0";
/// etcd's allowance for gRPC framing on top of --max-request-bytes.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

#[derive(Clone)]
pub struct Gateway {
    inner: Arc<GatewayInner>,
}

struct GatewayInner {
    /// Read-only use: the auth store's checks before a request is bridged.
    backend: crate::storage::backend::Store,
    tokens: Arc<crate::storage::auth::Tokens>,
    /// `--bcrypt-cost` for passwords set through this front end.
    bcrypt_cost: u32,
    shards: Vec<mpsc::Sender<BridgeRequest>>,
    /// Writes go to the shard of the raft actor: one cross-shard hop fewer.
    raft_shard: usize,
    /// Where the lessor runs: keepalives and lease queries go there directly.
    apply_shard: usize,
    next: AtomicUsize,
    max_request_bytes: usize,
}

pub(crate) fn to_status(e: KvError) -> Status {
    let code = match e.code() {
        Code::InvalidArgument => tonic::Code::InvalidArgument,
        Code::NotFound => tonic::Code::NotFound,
        Code::OutOfRange => tonic::Code::OutOfRange,
        Code::ResourceExhausted => tonic::Code::ResourceExhausted,
        Code::FailedPrecondition => tonic::Code::FailedPrecondition,
        Code::Unavailable => tonic::Code::Unavailable,
        Code::Internal => tonic::Code::Internal,
        Code::DeadlineExceeded => tonic::Code::DeadlineExceeded,
        Code::Unknown => tonic::Code::Unknown,
        Code::PermissionDenied => tonic::Code::PermissionDenied,
        Code::Unauthenticated => tonic::Code::Unauthenticated,
    };
    Status::new(code, e.to_string())
}

fn not_yet(what: &str) -> Status {
    Status::unimplemented(format!("corekv: {what} is not implemented yet"))
}

type Reply<T> = oneshot::Sender<Result<T, KvError>>;

impl Gateway {
    pub fn new(
        shards: Vec<mpsc::Sender<BridgeRequest>>,
        raft_shard: usize,
        apply_shard: usize,
        max_request_bytes: usize,
        backend: crate::storage::backend::Store,
        tokens: Arc<crate::storage::auth::Tokens>,
        bcrypt_cost: u32,
    ) -> Gateway {
        assert!(raft_shard < shards.len() && apply_shard < shards.len());
        Gateway {
            inner: Arc::new(GatewayInner {
                backend,
                tokens,
                bcrypt_cost,
                shards,
                raft_shard,
                apply_shard,
                next: AtomicUsize::new(0),
                max_request_bytes,
            }),
        }
    }

    pub(crate) async fn call<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> BridgeRequest,
    ) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        let req = make(tx);
        let n = match req {
            BridgeRequest::Write(..)
            | BridgeRequest::LeaseGrant(..)
            | BridgeRequest::LeaseRevoke(..) => self.inner.raft_shard,
            // The lessor answers these: elsewhere they would cross to its shard and back.
            BridgeRequest::LeaseKeepAlive(..)
            | BridgeRequest::LeaseTimeToLive(..)
            | BridgeRequest::LeaseList(..) => self.inner.apply_shard,
            _ => self.pick_shard(),
        };
        let mut shard = self.inner.shards[n].clone();
        let stopped = || to_status(KvError::Stopped);
        shard.send(req).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?.map_err(to_status)
    }

    /// Round robin over the shards for reads and watch streams.
    pub(crate) fn pick_shard(&self) -> usize {
        self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.shards.len()
    }

    /// The bridge into one shard (watch streams stay on the shard they opened on).
    pub(crate) fn shard_sender(&self, n: usize) -> mpsc::Sender<BridgeRequest> {
        self.inner.shards[n].clone()
    }

    pub(crate) fn max_request_bytes(&self) -> usize {
        self.inner.max_request_bytes
    }

    /// A write on behalf of `who` (None: no client identity, e.g. Authenticate's token).
    pub(crate) async fn write_as(
        &self,
        req: WriteRequest,
        who: Option<AuthUser>,
    ) -> Result<(Header, WriteResponse), Status> {
        self.call(|tx| BridgeRequest::Write(req, who, tx)).await
    }

    pub(crate) fn backend(&self) -> &crate::storage::backend::Store {
        &self.inner.backend
    }

    pub(crate) fn bcrypt_cost(&self) -> u32 {
        self.inner.bcrypt_cost
    }

    pub(crate) fn tokens(&self) -> &crate::storage::auth::Tokens {
        &self.inner.tokens
    }

    /// A response header at the current revision (for answers that need no raft round).
    pub(crate) async fn current_header(&self) -> Result<Header, Status> {
        self.call(BridgeRequest::Header).await
    }
}

pub(crate) fn header(h: &Header) -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader {
        cluster_id: h.cluster_id,
        member_id: h.member_id,
        revision: h.revision,
        raft_term: h.raft_term,
    })
}

pub(crate) fn kv_to_pb(kv: KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: kv.key,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: kv.value,
        lease: kv.lease,
    }
}

fn range_from_pb(r: pb::RangeRequest) -> RangeRequest {
    RangeRequest {
        key: r.key,
        range_end: r.range_end,
        limit: r.limit,
        revision: r.revision,
        sort_order: match r.sort_order {
            1 => SortOrder::Ascend,
            2 => SortOrder::Descend,
            _ => SortOrder::None,
        },
        sort_target: match r.sort_target {
            1 => SortTarget::Version,
            2 => SortTarget::Create,
            3 => SortTarget::Mod,
            4 => SortTarget::Value,
            _ => SortTarget::Key,
        },
        serializable: r.serializable,
        keys_only: r.keys_only,
        count_only: r.count_only,
        min_mod_revision: r.min_mod_revision,
        max_mod_revision: r.max_mod_revision,
        min_create_revision: r.min_create_revision,
        max_create_revision: r.max_create_revision,
    }
}

fn range_to_pb(h: &Header, r: RangeResponse) -> pb::RangeResponse {
    pb::RangeResponse {
        header: header(h),
        kvs: r.kvs.into_iter().map(kv_to_pb).collect(),
        more: r.more,
        count: r.count,
    }
}

fn put_from_pb(p: pb::PutRequest) -> PutRequest {
    PutRequest {
        key: p.key,
        value: p.value,
        lease: p.lease,
        prev_kv: p.prev_kv,
        ignore_value: p.ignore_value,
        ignore_lease: p.ignore_lease,
    }
}

fn put_to_pb(h: &Header, r: PutResponse) -> pb::PutResponse {
    pb::PutResponse {
        header: header(h),
        prev_kv: r.prev_kv.map(kv_to_pb),
    }
}

fn delete_from_pb(d: pb::DeleteRangeRequest) -> DeleteRangeRequest {
    DeleteRangeRequest {
        key: d.key,
        range_end: d.range_end,
        prev_kv: d.prev_kv,
    }
}

fn delete_to_pb(h: &Header, r: DeleteRangeResponse) -> pb::DeleteRangeResponse {
    pb::DeleteRangeResponse {
        header: header(h),
        deleted: r.deleted,
        prev_kvs: r.prev_kvs.into_iter().map(kv_to_pb).collect(),
    }
}

fn compare_from_pb(c: pb::Compare) -> Result<Compare, Status> {
    use pb::compare::TargetUnion as U;
    let u = c.target_union;
    let num = |u: &Option<U>| match u {
        Some(U::Version(v) | U::CreateRevision(v) | U::ModRevision(v) | U::Lease(v)) => *v,
        _ => 0,
    };
    let target = match c.target {
        0 => CompareTarget::Version(num(&u)),
        1 => CompareTarget::Create(num(&u)),
        2 => CompareTarget::Mod(num(&u)),
        3 => CompareTarget::Value(match u {
            Some(U::Value(v)) => v,
            _ => Vec::new(),
        }),
        4 => CompareTarget::Lease(num(&u)),
        t => {
            return Err(Status::invalid_argument(format!(
                "etcdserver: unknown compare target {t}"
            )))
        }
    };
    let result = match c.result {
        0 => CompareResult::Equal,
        1 => CompareResult::Greater,
        2 => CompareResult::Less,
        3 => CompareResult::NotEqual,
        r => {
            return Err(Status::invalid_argument(format!(
                "etcdserver: unknown compare result {r}"
            )))
        }
    };
    Ok(Compare {
        key: c.key,
        range_end: c.range_end,
        target,
        result,
    })
}

/// Nesting bound for txns (prost itself stops at 100 levels of message recursion).
const MAX_TXN_DEPTH: u32 = 64;

fn txn_from_pb(t: pb::TxnRequest, depth: u32) -> Result<TxnRequest, Status> {
    if depth > MAX_TXN_DEPTH {
        return Err(Status::invalid_argument(
            "etcdserver: txn nested too deeply",
        ));
    }
    let ops = |ops: Vec<pb::RequestOp>| -> Result<Vec<RequestOp>, Status> {
        use pb::request_op::Request as R;
        ops.into_iter()
            .map(|op| match op.request {
                Some(R::RequestRange(r)) => Ok(RequestOp::Range(range_from_pb(r))),
                Some(R::RequestPut(p)) => Ok(RequestOp::Put(put_from_pb(p))),
                Some(R::RequestDeleteRange(d)) => Ok(RequestOp::DeleteRange(delete_from_pb(d))),
                Some(R::RequestTxn(t)) => Ok(RequestOp::Txn(txn_from_pb(t, depth + 1)?)),
                None => Err(Status::invalid_argument("etcdserver: empty request op")),
            })
            .collect()
    };
    Ok(TxnRequest {
        compare: t
            .compare
            .into_iter()
            .map(compare_from_pb)
            .collect::<Result<_, _>>()?,
        success: ops(t.success)?,
        failure: ops(t.failure)?,
    })
}

fn txn_to_pb(h: &Header, t: TxnResponse) -> pb::TxnResponse {
    use pb::response_op::Response as R;
    let revisions = t.op_revisions;
    pb::TxnResponse {
        header: header(h),
        succeeded: t.succeeded,
        responses: t
            .responses
            .into_iter()
            .enumerate()
            .map(|(i, op)| {
                // Nested headers carry only the revision as of that op, as etcd's do.
                let inner = Header {
                    revision: revisions.get(i).copied().unwrap_or(h.revision),
                    ..Default::default()
                };
                pb::ResponseOp {
                    response: Some(match op {
                        ResponseOp::Range(r) => R::ResponseRange(range_to_pb(&inner, r)),
                        ResponseOp::Put(p) => R::ResponsePut(put_to_pb(&inner, p)),
                        ResponseOp::DeleteRange(d) => {
                            R::ResponseDeleteRange(delete_to_pb(&inner, d))
                        }
                        ResponseOp::Txn(t) => R::ResponseTxn(txn_to_pb(&inner, t)),
                    }),
                }
            })
            .collect(),
    }
}

fn unexpected() -> Status {
    Status::internal("etcdserver: unexpected response type")
}

/// Chunk size of Maintenance.Snapshot messages (etcd's).
const SNAPSHOT_CHUNK_BYTES: usize = 32 * 1024;

/// A snapshot copy made for one download; deleted when the stream ends or is dropped.
struct SnapshotCopy(std::path::PathBuf);

impl Drop for SnapshotCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct SnapshotSend {
    file: tokio::fs::File,
    remaining: u64,
    sha: sha2::Sha256,
    _copy: SnapshotCopy,
}

pub(crate) type BoxStream<T> =
    Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Kv for Gateway {
    async fn range(
        &self,
        req: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let who = self.caller(&req).await?;
        let r = range_from_pb(req.into_inner());
        self.check_range(&who, &r.key, &r.range_end, PermType::Read)?;
        let (h, resp) = self.call(|tx| BridgeRequest::Range(r, tx)).await?;
        Ok(Response::new(range_to_pb(&h, resp)))
    }

    async fn range_stream(
        &self,
        _req: Request<pb::RangeRequest>,
    ) -> Result<Response<BoxStream<pb::RangeStreamResponse>>, Status> {
        Err(not_yet("RangeStream"))
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let who = self.caller(&req).await?;
        match self
            .write_as(WriteRequest::Put(put_from_pb(req.into_inner())), Some(who))
            .await?
        {
            (h, WriteResponse::Put(p)) => Ok(Response::new(put_to_pb(&h, p))),
            _ => Err(unexpected()),
        }
    }

    async fn delete_range(
        &self,
        req: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let who = self.caller(&req).await?;
        match self
            .write_as(
                WriteRequest::DeleteRange(delete_from_pb(req.into_inner())),
                Some(who),
            )
            .await?
        {
            (h, WriteResponse::DeleteRange(d)) => Ok(Response::new(delete_to_pb(&h, d))),
            _ => Err(unexpected()),
        }
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let who = self.caller(&req).await?;
        let t = txn_from_pb(req.into_inner(), 0)?;
        match self.write_as(WriteRequest::Txn(t), Some(who)).await? {
            (h, WriteResponse::Txn(t)) => Ok(Response::new(txn_to_pb(&h, t))),
            _ => Err(unexpected()),
        }
    }

    async fn compact(
        &self,
        req: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        let who = self.caller(&req).await?;
        let c = req.into_inner();
        let req = WriteRequest::Compact(CompactionRequest {
            revision: c.revision,
            physical: c.physical,
        });
        let (h, _) = self.write_as(req, Some(who)).await?;
        Ok(Response::new(pb::CompactionResponse { header: header(&h) }))
    }
}

fn alarm_type_from_pb(a: i32) -> AlarmType {
    match a {
        1 => AlarmType::Nospace,
        2 => AlarmType::Corrupt,
        _ => AlarmType::None,
    }
}

fn alarm_type_to_pb(a: AlarmType) -> i32 {
    match a {
        AlarmType::None => 0,
        AlarmType::Nospace => 1,
        AlarmType::Corrupt => 2,
    }
}

#[tonic::async_trait]
impl Maintenance for Gateway {
    async fn alarm(
        &self,
        req: Request<pb::AlarmRequest>,
    ) -> Result<Response<pb::AlarmResponse>, Status> {
        let a = req.into_inner();
        let action = match a.action {
            1 => AlarmAction::Activate,
            2 => AlarmAction::Deactivate,
            _ => AlarmAction::Get,
        };
        let req = AlarmRequest {
            action,
            member_id: a.member_id,
            alarm: alarm_type_from_pb(a.alarm),
        };
        let (_, alarms) = self.call(|tx| BridgeRequest::Alarm(req, tx)).await?;
        Ok(Response::new(pb::AlarmResponse {
            // etcd 3.4 answers alarm requests without a header.
            header: None,
            alarms: alarms
                .into_iter()
                .map(|m| pb::AlarmMember {
                    member_id: m.member_id,
                    alarm: alarm_type_to_pb(m.alarm),
                })
                .collect(),
        }))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let (h, st) = self.call(BridgeRequest::Status).await?;
        Ok(Response::new(pb::StatusResponse {
            header: header(&h),
            version: ETCD_API_VERSION.to_string(),
            db_size: st.db_size,
            leader: st.leader,
            raft_index: st.raft_index,
            raft_term: st.raft_term,
            raft_applied_index: st.raft_applied_index,
            errors: st.errors,
            db_size_in_use: st.db_size_in_use,
            is_learner: st.is_learner,
            ..Default::default()
        }))
    }

    async fn defragment(
        &self,
        req: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        self.check_maintenance_admin(&self.caller(&req).await?)?;
        self.call(BridgeRequest::Defragment).await?;
        // etcd 3.4 answers an empty message (no header).
        Ok(Response::new(pb::DefragmentResponse { header: None }))
    }

    async fn hash(
        &self,
        req: Request<pb::HashRequest>,
    ) -> Result<Response<pb::HashResponse>, Status> {
        self.check_maintenance_admin(&self.caller(&req).await?)?;
        let (h, hash) = self.call(BridgeRequest::Hash).await?;
        Ok(Response::new(pb::HashResponse {
            header: header(&h),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        req: Request<pb::HashKvRequest>,
    ) -> Result<Response<pb::HashKvResponse>, Status> {
        self.check_maintenance_admin(&self.caller(&req).await?)?;
        let rev = req.into_inner().revision;
        let (h, kh) = self.call(|tx| BridgeRequest::HashKv(rev, tx)).await?;
        Ok(Response::new(pb::HashKvResponse {
            header: header(&h),
            hash: kh.hash,
            compact_revision: kh.compact_revision,
            // etcd 3.5's field (3.4 clients ignore it): the revision hashed up to.
            hash_revision: kh.hash_revision,
        }))
    }

    /// etcd's snapshot stream: the data in 32 KiB chunks counting down
    /// `remaining_bytes`, then one message holding the data's SHA-256.
    async fn snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<BoxStream<pb::SnapshotResponse>>, Status> {
        self.check_maintenance_admin(&self.caller(&req).await?)?;
        let (_, path) = self.call(BridgeRequest::Snapshot).await?;
        let copy = SnapshotCopy(path);
        let file = tokio::fs::File::open(&copy.0)
            .await
            .map_err(|e| Status::internal(format!("snapshot: {e}")))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| Status::internal(format!("snapshot: {e}")))?
            .len();
        let state = SnapshotSend {
            file,
            remaining: size,
            sha: <sha2::Sha256 as sha2::Digest>::new(),
            _copy: copy,
        };
        let stream = futures::stream::unfold(Some(state), |st| async move {
            use sha2::Digest;
            use tokio::io::AsyncReadExt;
            let mut st = st?;
            if st.remaining == 0 {
                let digest = std::mem::take(&mut st.sha).finalize().to_vec();
                let last = pb::SnapshotResponse {
                    header: None,
                    remaining_bytes: 0,
                    blob: digest,
                    ..Default::default()
                };
                return Some((Ok(last), None));
            }
            let n = st.remaining.min(SNAPSHOT_CHUNK_BYTES as u64) as usize;
            let mut blob = vec![0u8; n];
            if let Err(e) = st.file.read_exact(&mut blob).await {
                return Some((Err(Status::internal(format!("snapshot: {e}"))), None));
            }
            st.remaining -= n as u64;
            st.sha.update(&blob);
            let resp = pb::SnapshotResponse {
                header: None,
                remaining_bytes: st.remaining,
                blob,
                ..Default::default()
            };
            Some((Ok(resp), Some(st)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn move_leader(
        &self,
        req: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        let to = req.into_inner().target_id;
        let h = self.call(|tx| BridgeRequest::MoveLeader(to, tx)).await?;
        Ok(Response::new(pb::MoveLeaderResponse { header: header(&h) }))
    }

    async fn downgrade(
        &self,
        _req: Request<pb::DowngradeRequest>,
    ) -> Result<Response<pb::DowngradeResponse>, Status> {
        Err(not_yet("downgrade"))
    }
}

fn member_pb(m: &crate::cluster::Member) -> pb::Member {
    pb::Member {
        id: m.id,
        name: m.name.clone(),
        peer_ur_ls: m.peer_urls.clone(),
        client_ur_ls: m.client_urls.clone(),
        is_learner: m.is_learner,
    }
}

fn members_pb(ms: &[crate::cluster::Member]) -> Vec<pb::Member> {
    ms.iter().map(member_pb).collect()
}

#[tonic::async_trait]
impl Cluster for Gateway {
    async fn member_add(
        &self,
        req: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        self.check_admin(&self.caller(&req).await?)?;
        let r = req.into_inner();
        let (h, m, list) = self
            .call(|tx| BridgeRequest::MemberAdd(r.peer_ur_ls, r.is_learner, tx))
            .await?;
        Ok(Response::new(pb::MemberAddResponse {
            header: header(&h),
            member: Some(member_pb(&m)),
            members: members_pb(&list),
        }))
    }

    async fn member_remove(
        &self,
        req: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        self.check_admin(&self.caller(&req).await?)?;
        let id = req.into_inner().id;
        let (h, list) = self.call(|tx| BridgeRequest::MemberRemove(id, tx)).await?;
        Ok(Response::new(pb::MemberRemoveResponse {
            header: header(&h),
            members: members_pb(&list),
        }))
    }

    async fn member_update(
        &self,
        req: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        self.check_admin(&self.caller(&req).await?)?;
        let r = req.into_inner();
        let (h, list) = self
            .call(|tx| BridgeRequest::MemberUpdate(r.id, r.peer_ur_ls, tx))
            .await?;
        Ok(Response::new(pb::MemberUpdateResponse {
            header: header(&h),
            members: members_pb(&list),
        }))
    }

    async fn member_list(
        &self,
        _req: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        let (h, list) = self.call(BridgeRequest::MemberList).await?;
        Ok(Response::new(pb::MemberListResponse {
            header: header(&h),
            members: members_pb(&list),
        }))
    }

    async fn member_promote(
        &self,
        req: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        self.check_admin(&self.caller(&req).await?)?;
        let token = Self::token_of(&req);
        let id = req.into_inner().id;
        let (h, list) = self
            .call(|tx| BridgeRequest::MemberPromote(id, token, tx))
            .await?;
        Ok(Response::new(pb::MemberPromoteResponse {
            header: header(&h),
            members: members_pb(&list),
        }))
    }
}

/// Limits of the gRPC server (etcd's flags).
#[derive(Clone, Copy, Debug)]
pub struct GrpcLimits {
    pub max_request_bytes: usize,
    /// Server pings an idle connection this often (None: never).
    pub keepalive_interval: Option<std::time::Duration>,
    /// and closes it when a ping is not answered within this.
    pub keepalive_timeout: std::time::Duration,
    pub max_concurrent_streams: u32,
}

/// Runs the gRPC server on a dedicated thread with its own tokio runtime. Returns once
/// every listener is bound (or with the bind error).
/// Serves every client URL (`(host:port, tls)`; TLS ones with `tls`) on the gRPC thread.
pub fn spawn(
    gateway: Gateway,
    addrs: Vec<(String, bool)>,
    limits: GrpcLimits,
    tls: Option<crate::tls::TlsSide>,
) -> Result<(), String> {
    assert!(limits.max_concurrent_streams >= 1 && !limits.keepalive_timeout.is_zero());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    std::thread::Builder::new()
        .name("corekv-grpc".into())
        .spawn(move || {
            // One thread: more tokio workers compete with the pinned shards (measured:
            // 100 clients 20k puts/s with one, 15k with two on the 2-core dev VM).
            // Current-thread, not a one-worker multi-thread runtime: the latter saves the
            // eventfd write per wake-up from a shard but switched context more often and
            // lost 4-22% of put throughput at 1000 clients (1 and 3 members, interleaved
            // pairs, 2026-11-22).
            let rt = match tokio::runtime::Builder::new_current_thread()
                .thread_name("corekv-grpc")
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("grpc runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let mut servers = Vec::new();
                for (addr, is_tls) in addrs {
                    let listener = match tokio::net::TcpListener::bind(addr.as_str()).await {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("listen tcp {addr}: bind: {e}")));
                            return;
                        }
                    };
                    let limit = limits.max_request_bytes + GRPC_OVERHEAD_BYTES;
                    let g = gateway.clone();
                    let routes = tonic::service::Routes::new(
                        KvServer::new(g.clone()).max_decoding_message_size(limit),
                    )
                    .add_service(MaintenanceServer::new(g.clone()).max_decoding_message_size(limit))
                    .add_service(ClusterServer::new(g.clone()).max_decoding_message_size(limit))
                    .add_service(super::v3watch::WatchService::new(g.clone(), limit))
                    .add_service(LeaseServer::new(g.clone()).max_decoding_message_size(limit))
                    .add_service(AuthServer::new(g.clone()).max_decoding_message_size(limit))
                    .add_service(LockServer::new(g.clone()).max_decoding_message_size(limit))
                    .add_service(ElectionServer::new(g.clone()).max_decoding_message_size(limit));
                    // The JSON gateway shares the port, as etcd's does.
                    let routes = tonic::service::Routes::from(
                        routes.into_axum_router().merge(super::gateway::router(g)),
                    );
                    let router = tonic::transport::Server::builder()
                        .accept_http1(true)
                        .http2_keepalive_interval(limits.keepalive_interval)
                        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
                        .max_concurrent_streams(limits.max_concurrent_streams)
                        .add_routes(routes);
                    let side = if is_tls {
                        assert!(
                            tls.is_some(),
                            "an https client URL passed start-up without TLS"
                        );
                        tls.clone()
                    } else {
                        None
                    };
                    let incoming = super::grpc_listen::incoming(listener, side);
                    servers.push(tokio::spawn(async move {
                        if let Err(e) = router.serve_with_incoming(incoming).await {
                            tracing::error!("grpc server on {addr}: {e}");
                        }
                    }));
                }
                let _ = ready_tx.send(Ok(()));
                futures::future::join_all(servers).await;
            });
        })
        .map_err(|e| format!("start grpc thread: {e}"))?;
    ready_rx
        .recv()
        .map_err(|_| "grpc thread exited during start-up".to_string())?
}
