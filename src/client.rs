//! Native (capnp-rpc) client, used by the CLI verbs, the bench and the tests. Runs on
//! whatever glommio executor the caller is on.

use crate::api::native;
use crate::cluster::Member;
use crate::error::KvError;
use crate::kv_capnp::kv;
use crate::model::*;
use capnp_rpc::{rpc_twoparty_capnp::Side, twoparty, RpcSystem};

pub struct Client {
    kv: kv::Client,
}

/// The user and password the CLI was given (`--user`, `--password`): every connection
/// this process makes logs in with them. Servers never set them.
static CREDENTIALS: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();

/// Sets the credentials every later `connect` logs in with (once per process).
pub fn set_credentials(user: String, password: String) {
    assert!(!user.is_empty(), "a login needs a user name");
    let _ = CREDENTIALS.set((user, password));
}

/// The TLS every `connect` of this process uses: the CLI's `--cacert/--cert/--key`, or a
/// server's own client identity (its dials to the leader's native port). `always`: also
/// for endpoints without `https://` (etcdctl's TLS flags with bare host:port endpoints).
struct ClientTls {
    config: std::sync::Arc<rustls::ClientConfig>,
    always: bool,
}

static CLIENT_TLS: std::sync::OnceLock<ClientTls> = std::sync::OnceLock::new();

/// Sets the client TLS for every later `connect` (once per process).
pub fn set_tls(config: std::sync::Arc<rustls::ClientConfig>, always: bool) {
    if CLIENT_TLS.set(ClientTls { config, always }).is_err() {
        tracing::warn!("client TLS was already set; the first setting stays");
    }
}

/// capnp-rpc over one connection (plain or TLS); the RPC system runs as its own task.
fn start_rpc<S>(stream: S) -> kv::Client
where
    S: futures::AsyncRead + futures::AsyncWrite + Unpin + 'static,
{
    let (r, w) = futures::AsyncReadExt::split(stream);
    let mut opts = capnp::message::ReaderOptions::new();
    opts.traversal_limit_in_words(Some(1 << 30)); // large range responses
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(r),
        crate::transport::coalescing(w),
        Side::Client,
        opts,
    );
    let mut rpc = RpcSystem::new(Box::new(network), None);
    let kv: kv::Client = rpc.bootstrap(Side::Server);
    glommio::spawn_local(async move {
        let _ = rpc.await;
    })
    .detach();
    kv
}

fn from_capnp(e: capnp::Error) -> KvError {
    KvError::from_message(&e.extra)
}

/// etcd's Authenticate on the native port: a capability that acts as `user`.
async fn login(kv: &kv::Client, user: &str, password: &str) -> Result<kv::Client, KvError> {
    let mut req = kv.authenticate_request();
    req.get().set_name(user);
    req.get().set_password(password);
    let resp = req.send().promise.await.map_err(from_capnp)?;
    resp.get().and_then(|r| r.get_kv()).map_err(from_capnp)
}

impl Client {
    /// Connects to the first endpoint that accepts (comma-separated, scheme optional;
    /// `https://`, or any endpoint once `set_tls(.., true)` was called, speaks TLS).
    pub async fn connect(endpoints: &str) -> Result<Client, KvError> {
        let urls = crate::cluster::url_list(endpoints);
        crate::config::parse_urls(endpoints).map_err(KvError::Client)?;
        let mut last_err = String::new();
        for url in urls {
            let tls = crate::tls::url_is_tls(&url).map_err(KvError::Client)?;
            let addr = crate::cluster::host_port(&url);
            let stream = match glommio::net::TcpStream::connect(addr.as_str()).await {
                Ok(s) => s,
                Err(e) => {
                    last_err = format!("dial {addr}: {e}");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let kv = match CLIENT_TLS.get() {
                Some(t) if tls || t.always => {
                    let name = crate::tls::server_name(&addr).map_err(KvError::Client)?;
                    let connector = futures_rustls::TlsConnector::from(t.config.clone());
                    let handshake = connector.connect(name, stream);
                    let timeout =
                        std::time::Duration::from_millis(crate::tls::HANDSHAKE_TIMEOUT_MS);
                    match glommio::timer::timeout(timeout, async { Ok(handshake.await) }).await {
                        Ok(Ok(s)) => start_rpc(s),
                        Ok(Err(e)) => {
                            last_err = format!("TLS handshake with {addr}: {e}");
                            continue;
                        }
                        Err(e) => {
                            last_err = format!("TLS handshake with {addr}: {e}");
                            continue;
                        }
                    }
                }
                None if tls => {
                    return Err(KvError::Client(format!(
                        "{url}: https endpoint but no client TLS configured"
                    )))
                }
                _ => start_rpc(stream),
            };
            let kv = match CREDENTIALS.get() {
                Some((user, password)) => login(&kv, user, password).await?,
                None => kv,
            };
            return Ok(Client { kv });
        }
        Err(KvError::Client(last_err))
    }

    pub async fn range(&self, r: &RangeRequest) -> Result<(Header, RangeResponse), KvError> {
        let mut req = self.kv.range_request();
        native::write_range_req(req.get().init_req(), r);
        let resp = req.send().promise.await.map_err(from_capnp)?;
        native::read_range_resp(resp.get().and_then(|x| x.get_resp()).map_err(from_capnp)?)
            .map_err(from_capnp)
    }

    pub async fn put(&self, p: &PutRequest) -> Result<(Header, PutResponse), KvError> {
        let mut req = self.kv.put_request();
        native::write_put_req(req.get().init_req(), p);
        let resp = req.send().promise.await.map_err(from_capnp)?;
        native::read_put_resp(resp.get().and_then(|x| x.get_resp()).map_err(from_capnp)?)
            .map_err(from_capnp)
    }

    pub async fn delete(
        &self,
        d: &DeleteRangeRequest,
    ) -> Result<(Header, DeleteRangeResponse), KvError> {
        let mut req = self.kv.delete_range_request();
        native::write_delete_req(req.get().init_req(), d);
        let resp = req.send().promise.await.map_err(from_capnp)?;
        native::read_delete_resp(resp.get().and_then(|x| x.get_resp()).map_err(from_capnp)?)
            .map_err(from_capnp)
    }

    pub async fn txn(&self, t: &TxnRequest) -> Result<(Header, TxnResponse), KvError> {
        let mut req = self.kv.txn_request();
        native::write_txn_req(req.get().init_req(), t);
        let resp = req.send().promise.await.map_err(from_capnp)?;
        native::read_txn_resp(resp.get().and_then(|x| x.get_resp()).map_err(from_capnp)?)
            .map_err(from_capnp)
    }

    pub async fn compact(&self, revision: i64, physical: bool) -> Result<Header, KvError> {
        let mut req = self.kv.compact_request();
        let mut b = req.get().init_req();
        b.set_revision(revision);
        b.set_physical(physical);
        let resp = req.send().promise.await.map_err(from_capnp)?;
        let h = resp
            .get()
            .and_then(|x| x.get_resp())
            .and_then(|x| x.get_header())
            .map_err(from_capnp)?;
        Ok(native::read_header(h))
    }

    pub async fn alarm(&self, a: &AlarmRequest) -> Result<(Header, Vec<AlarmMember>), KvError> {
        let mut req = self.kv.alarm_request();
        native::write_alarm_req(req.get().init_req(), a);
        let resp = req.send().promise.await.map_err(from_capnp)?;
        native::read_alarm_resp(resp.get().and_then(|x| x.get_resp()).map_err(from_capnp)?)
            .map_err(from_capnp)
    }

    pub async fn status(&self) -> Result<(Header, Status), KvError> {
        let req = self.kv.status_request();
        let resp = req.send().promise.await.map_err(from_capnp)?;
        native::read_status(resp.get().and_then(|x| x.get_resp()).map_err(from_capnp)?)
            .map_err(from_capnp)
    }
}

/// The client side of a native watch: the server pushes responses into `rx` one call at
/// a time (a full channel holds the server back). Dropping it cancels the watch.
pub struct Watch {
    pub rx: futures::channel::mpsc::Receiver<WatchResponse>,
    _call: glommio::Task<()>,
}

struct Sink {
    tx: futures::channel::mpsc::Sender<WatchResponse>,
}

impl crate::kv_capnp::watch_sink::Server for Sink {
    async fn send(
        self: std::rc::Rc<Self>,
        params: crate::kv_capnp::watch_sink::SendParams,
        _results: crate::kv_capnp::watch_sink::SendResults,
    ) -> Result<(), capnp::Error> {
        use futures::SinkExt;
        let resp = native::read_watch_resp(params.get()?.get_resp()?)?;
        let mut tx = self.tx.clone();
        tx.send(resp)
            .await
            .map_err(|_| capnp::Error::failed("watch receiver dropped".into()))
    }
}

/// Buffered watch responses on the client before the server is held back.
const WATCH_CLIENT_BUFFER: usize = 64;

fn header_of(
    r: Result<crate::kv_capnp::response_header::Reader, capnp::Error>,
) -> Result<Header, KvError> {
    Ok(native::read_header(r.map_err(from_capnp)?))
}

impl Client {
    pub async fn lease_grant(&self, id: i64, ttl_secs: i64) -> Result<(Header, i64, i64), KvError> {
        let mut req = self.kv.lease_grant_request();
        req.get().set_id(id);
        req.get().set_ttl(ttl_secs);
        let resp = req.send().promise.await.map_err(from_capnp)?;
        let r = resp.get().and_then(|x| x.get_resp()).map_err(from_capnp)?;
        Ok((header_of(r.get_header())?, r.get_id(), r.get_ttl()))
    }

    pub async fn lease_revoke(&self, id: i64) -> Result<Header, KvError> {
        let mut req = self.kv.lease_revoke_request();
        req.get().set_id(id);
        let resp = req.send().promise.await.map_err(from_capnp)?;
        header_of(resp.get().and_then(|x| x.get_header()))
    }

    /// Renews a lease: its TTL, or 0 when it has expired or was revoked.
    pub async fn lease_keepalive(&self, id: i64) -> Result<(Header, i64), KvError> {
        let mut req = self.kv.lease_keep_alive_request();
        req.get().set_id(id);
        let resp = req.send().promise.await.map_err(from_capnp)?;
        let r = resp.get().map_err(from_capnp)?;
        Ok((header_of(r.get_header())?, r.get_ttl()))
    }

    pub async fn lease_time_to_live(
        &self,
        id: i64,
        keys: bool,
    ) -> Result<(Header, LeaseTimeToLive), KvError> {
        let mut req = self.kv.lease_time_to_live_request();
        req.get().set_id(id);
        req.get().set_keys(keys);
        let resp = req.send().promise.await.map_err(from_capnp)?;
        let r = resp.get().and_then(|x| x.get_resp()).map_err(from_capnp)?;
        let keys = r
            .get_keys()
            .map_err(from_capnp)?
            .iter()
            .map(|k| k.map(|k| k.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(from_capnp)?;
        Ok((
            header_of(r.get_header())?,
            LeaseTimeToLive {
                id: r.get_id(),
                ttl_secs: r.get_ttl(),
                granted_ttl_secs: r.get_granted_ttl(),
                keys,
            },
        ))
    }

    pub async fn lease_list(&self) -> Result<(Header, Vec<i64>), KvError> {
        let req = self.kv.lease_leases_request();
        let resp = req.send().promise.await.map_err(from_capnp)?;
        let r = resp.get().map_err(from_capnp)?;
        let ids = r.get_ids().map_err(from_capnp)?.iter().collect();
        Ok((header_of(r.get_header())?, ids))
    }

    pub fn watch(&self, spec: &crate::actors::watch::WatchSpec) -> Watch {
        let (tx, rx) = futures::channel::mpsc::channel(WATCH_CLIENT_BUFFER);
        let sink: crate::kv_capnp::watch_sink::Client = capnp_rpc::new_client(Sink { tx });
        let mut req = self.kv.watch_request();
        native::write_watch_req(req.get().init_req(), spec);
        req.get().set_sink(sink);
        let call = glommio::spawn_local(async move {
            let _ = req.send().promise.await;
        });
        Watch { rx, _call: call }
    }

    pub async fn lock(&self, name: &[u8], lease: i64) -> Result<(Header, Vec<u8>), KvError> {
        let mut req = self.kv.lock_request();
        req.get().set_name(name);
        req.get().set_lease(lease);
        let resp = req.send().promise.await.map_err(from_capnp)?;
        let r = resp.get().map_err(from_capnp)?;
        Ok((
            header_of(r.get_header())?,
            r.get_key().map_err(from_capnp)?.to_vec(),
        ))
    }

    pub async fn unlock(&self, key: &[u8]) -> Result<Header, KvError> {
        let mut req = self.kv.unlock_request();
        req.get().set_key(key);
        let resp = req.send().promise.await.map_err(from_capnp)?;
        header_of(resp.get().and_then(|x| x.get_header()))
    }

    pub async fn campaign(
        &self,
        name: &[u8],
        lease: i64,
        value: &[u8],
    ) -> Result<(Header, LeaderKey), KvError> {
        let mut req = self.kv.campaign_request();
        req.get().set_name(name);
        req.get().set_lease(lease);
        req.get().set_value(value);
        let resp = req.send().promise.await.map_err(from_capnp)?;
        let r = resp.get().map_err(from_capnp)?;
        let leader =
            native::read_leader_key(r.get_leader().map_err(from_capnp)?).map_err(from_capnp)?;
        Ok((header_of(r.get_header())?, leader))
    }

    pub async fn proclaim(&self, leader: &LeaderKey, value: &[u8]) -> Result<Header, KvError> {
        let mut req = self.kv.proclaim_request();
        native::write_leader_key(req.get().init_leader(), leader);
        req.get().set_value(value);
        let resp = req.send().promise.await.map_err(from_capnp)?;
        header_of(resp.get().and_then(|x| x.get_header()))
    }

    pub async fn resign(&self, leader: &LeaderKey) -> Result<Header, KvError> {
        let mut req = self.kv.resign_request();
        native::write_leader_key(req.get().init_leader(), leader);
        let resp = req.send().promise.await.map_err(from_capnp)?;
        header_of(resp.get().and_then(|x| x.get_header()))
    }

    pub async fn leader(&self, name: &[u8]) -> Result<(Header, KeyValue), KvError> {
        let mut req = self.kv.leader_request();
        req.get().set_name(name);
        let resp = req.send().promise.await.map_err(from_capnp)?;
        let r = resp.get().map_err(from_capnp)?;
        let kv = native::read_kv(r.get_kv().map_err(from_capnp)?).map_err(from_capnp)?;
        Ok((header_of(r.get_header())?, kv))
    }

    pub async fn member_list(&self) -> Result<(Header, Vec<Member>), KvError> {
        let resp = self
            .kv
            .member_list_request()
            .send()
            .promise
            .await
            .map_err(from_capnp)?;
        let r = resp.get().map_err(from_capnp)?;
        let ms = native::read_members(r.get_members().map_err(from_capnp)?).map_err(from_capnp)?;
        Ok((header_of(r.get_header())?, ms))
    }

    pub async fn member_add(
        &self,
        peer_urls: &[String],
        is_learner: bool,
    ) -> Result<(Header, Member, Vec<Member>), KvError> {
        let mut req = self.kv.member_add_request();
        {
            let mut p = req.get();
            p.set_is_learner(is_learner);
            let mut l = p.init_peer_urls(peer_urls.len() as u32);
            for (i, u) in peer_urls.iter().enumerate() {
                l.set(i as u32, u.as_str());
            }
        }
        let resp = req.send().promise.await.map_err(from_capnp)?;
        let r = resp.get().map_err(from_capnp)?;
        let m = native::read_member(r.get_member().map_err(from_capnp)?).map_err(from_capnp)?;
        let ms = native::read_members(r.get_members().map_err(from_capnp)?).map_err(from_capnp)?;
        Ok((header_of(r.get_header())?, m, ms))
    }

    pub async fn member_remove(&self, id: u64) -> Result<(Header, Vec<Member>), KvError> {
        let mut req = self.kv.member_remove_request();
        req.get().set_id(id);
        let resp = req.send().promise.await.map_err(from_capnp)?;
        let r = resp.get().map_err(from_capnp)?;
        let ms = native::read_members(r.get_members().map_err(from_capnp)?).map_err(from_capnp)?;
        Ok((header_of(r.get_header())?, ms))
    }

    pub async fn member_update(
        &self,
        id: u64,
        peer_urls: &[String],
    ) -> Result<(Header, Vec<Member>), KvError> {
        let mut req = self.kv.member_update_request();
        {
            let mut p = req.get();
            p.set_id(id);
            let mut l = p.init_peer_urls(peer_urls.len() as u32);
            for (i, u) in peer_urls.iter().enumerate() {
                l.set(i as u32, u.as_str());
            }
        }
        let resp = req.send().promise.await.map_err(from_capnp)?;
        let r = resp.get().map_err(from_capnp)?;
        let ms = native::read_members(r.get_members().map_err(from_capnp)?).map_err(from_capnp)?;
        Ok((header_of(r.get_header())?, ms))
    }

    /// `on_behalf_of`: a caller's auth token, when a member forwards the call for it.
    pub async fn member_promote(
        &self,
        id: u64,
        on_behalf_of: Option<&str>,
    ) -> Result<(Header, Vec<Member>), KvError> {
        let mut req = self.kv.member_promote_request();
        req.get().set_id(id);
        if let Some(token) = on_behalf_of {
            req.get().set_token(token);
        }
        let resp = req.send().promise.await.map_err(from_capnp)?;
        let r = resp.get().map_err(from_capnp)?;
        let ms = native::read_members(r.get_members().map_err(from_capnp)?).map_err(from_capnp)?;
        Ok((header_of(r.get_header())?, ms))
    }

    pub async fn move_leader(&self, target: u64) -> Result<Header, KvError> {
        let mut req = self.kv.move_leader_request();
        req.get().set_target(target);
        let resp = req.send().promise.await.map_err(from_capnp)?;
        header_of(resp.get().map_err(from_capnp)?.get_header())
    }

    /// Online defragmentation of the member this client is connected to.
    pub async fn defragment(&self) -> Result<Header, KvError> {
        let req = self.kv.defragment_request();
        let resp = req.send().promise.await.map_err(from_capnp)?;
        header_of(resp.get().map_err(from_capnp)?.get_header())
    }

    /// etcd's HashKV at `revision` (0 = current): (header, hash, compact revision).
    pub async fn hash_kv(&self, revision: i64) -> Result<(Header, u32, i64), KvError> {
        let mut req = self.kv.hash_kv_request();
        req.get().set_revision(revision);
        let resp = req.send().promise.await.map_err(from_capnp)?;
        let r = resp.get().map_err(from_capnp)?;
        Ok((
            header_of(r.get_header())?,
            r.get_hash(),
            r.get_compact_revision(),
        ))
    }

    /// Each leader of `name` (and each change of its value) as a one-event response.
    pub fn observe(&self, name: &[u8]) -> Watch {
        let (tx, rx) = futures::channel::mpsc::channel(WATCH_CLIENT_BUFFER);
        let sink: crate::kv_capnp::watch_sink::Client = capnp_rpc::new_client(Sink { tx });
        let mut req = self.kv.observe_request();
        req.get().set_name(name);
        req.get().set_sink(sink);
        let call = glommio::spawn_local(async move {
            let _ = req.send().promise.await;
        });
        Watch { rx, _call: call }
    }
}

/// Runs `f` on a fresh, unpinned glommio executor (for CLI verbs and tests).
pub fn block_on<T: Send + 'static, F, Fut>(f: F) -> Result<T, String>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    block_on_spinning(std::time::Duration::ZERO, f)
}

/// Like `block_on`, polling for `spin` before parking when idle (latency benchmarks).
pub fn block_on_spinning<T: Send + 'static, F, Fut>(
    spin: std::time::Duration,
    f: F,
) -> Result<T, String>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    let mut builder =
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound).io_memory(1 << 20);
    if !spin.is_zero() {
        builder = builder.spin_before_park(spin);
    }
    builder
        .spawn(f)
        .map_err(|e| format!("start executor: {e}"))?
        .join()
        .map_err(|e| format!("executor: {e}"))
}
