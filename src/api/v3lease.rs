//! etcd's Lease service over gRPC. Grants and revokes go through raft (on the raft
//! shard); keepalives, time-to-live and lists are answered by the lessor in the apply
//! actor, as etcd answers them from its lessor without a raft round.

use super::v3rpc::{header, BoxStream, Gateway};
use crate::actors::bridge::BridgeRequest;
use crate::etcdpb::etcdserverpb as pb;
use crate::etcdpb::etcdserverpb::lease_server::Lease;
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};

/// Keepalive requests of one stream in flight at once (etcd answers them in order too).
const KEEPALIVE_BUFFER: usize = 64;

impl Gateway {
    pub(crate) async fn keepalive_once(
        &self,
        id: i64,
    ) -> Result<pb::LeaseKeepAliveResponse, Status> {
        let (h, ttl) = self
            .call(|tx| BridgeRequest::LeaseKeepAlive(id, tx))
            .await?;
        Ok(pb::LeaseKeepAliveResponse {
            header: header(&h),
            id,
            ttl,
        })
    }
}

#[tonic::async_trait]
impl Lease for Gateway {
    async fn lease_grant(
        &self,
        req: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let r = req.into_inner();
        let (h, id, ttl) = self
            .call(|tx| BridgeRequest::LeaseGrant(r.id, r.ttl, tx))
            .await?;
        Ok(Response::new(pb::LeaseGrantResponse {
            header: header(&h),
            id,
            ttl,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        req: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let who = self.caller(&req).await?;
        let id = req.into_inner().id;
        let h = self
            .call(|tx| BridgeRequest::LeaseRevoke(id, Some(who), tx))
            .await?;
        Ok(Response::new(pb::LeaseRevokeResponse {
            header: header(&h),
        }))
    }

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<BoxStream<pb::LeaseKeepAliveResponse>>, Status> {
        let g = self.clone();
        // One answer per request, in order; a server-side error ends the stream.
        let out = req
            .into_inner()
            .map(move |r| {
                let g = g.clone();
                async move {
                    match r {
                        Ok(r) => g.keepalive_once(r.id).await,
                        Err(e) => Err(e),
                    }
                }
            })
            .buffered(KEEPALIVE_BUFFER)
            .scan(false, |failed, r| {
                let out = if *failed { None } else { Some(r) };
                *failed |= matches!(out, Some(Err(_)));
                futures::future::ready(out)
            });
        Ok(Response::new(Box::pin(out)))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let r = req.into_inner();
        let (h, t) = self
            .call(|tx| BridgeRequest::LeaseTimeToLive(r.id, r.keys, tx))
            .await?;
        Ok(Response::new(pb::LeaseTimeToLiveResponse {
            header: header(&h),
            id: t.id,
            ttl: t.ttl_secs,
            granted_ttl: t.granted_ttl_secs,
            keys: t.keys,
        }))
    }

    async fn lease_leases(
        &self,
        _req: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        let (h, ids) = self.call(BridgeRequest::LeaseList).await?;
        Ok(Response::new(pb::LeaseLeasesResponse {
            header: header(&h),
            leases: ids.into_iter().map(|id| pb::LeaseStatus { id }).collect(),
        }))
    }
}
