//! Native (capnp-rpc) client, used by the CLI verbs, the bench and the tests. Runs on
//! whatever glommio executor the caller is on.

use crate::api::native;
use crate::error::KvError;
use crate::kv_capnp::kv;
use crate::model::*;
use capnp_rpc::{rpc_twoparty_capnp::Side, twoparty, RpcSystem};

pub struct Client {
    kv: kv::Client,
}

fn from_capnp(e: capnp::Error) -> KvError {
    KvError::from_message(&e.extra)
}

impl Client {
    /// Connects to the first endpoint that accepts (comma-separated, scheme optional).
    pub async fn connect(endpoints: &str) -> Result<Client, KvError> {
        let addrs = crate::config::parse_urls(endpoints).map_err(KvError::Client)?;
        let mut last_err = String::new();
        for addr in addrs {
            match glommio::net::TcpStream::connect(addr.as_str()).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
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
                    return Ok(Client { kv });
                }
                Err(e) => last_err = format!("dial {addr}: {e}"),
            }
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
