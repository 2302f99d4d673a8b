//! etcd's v3lock and v3election gRPC services, backed by the recipes in
//! `actors/recipes.rs` (same key layout as etcd's concurrency package).

use super::v3rpc::{header, kv_to_pb, to_status, BoxStream, Gateway};
use crate::actors::bridge::BridgeRequest;
use crate::error::KvError;
use crate::etcdpb::v3electionpb as epb;
use crate::etcdpb::v3electionpb::election_server::Election;
use crate::etcdpb::v3lockpb as lpb;
use crate::etcdpb::v3lockpb::lock_server::Lock;
use crate::model::{LeaderKey, PermType};
use futures::channel::oneshot;
use futures::{SinkExt, StreamExt};
use tonic::{Request, Response, Status};

fn leader_from_pb(l: Option<epb::LeaderKey>) -> Result<LeaderKey, Status> {
    // etcd's ErrMissingLeaderKey.
    let l = l.ok_or_else(|| Status::unknown("\"leader\" field must be provided"))?;
    Ok(LeaderKey {
        name: l.name,
        key: l.key,
        rev: l.rev,
        lease: l.lease,
    })
}

fn leader_to_pb(l: LeaderKey) -> epb::LeaderKey {
    epb::LeaderKey {
        name: l.name,
        key: l.key,
        rev: l.rev,
        lease: l.lease,
    }
}

#[tonic::async_trait]
impl Lock for Gateway {
    async fn lock(
        &self,
        req: Request<lpb::LockRequest>,
    ) -> Result<Response<lpb::LockResponse>, Status> {
        let who = self.caller(&req).await?;
        let r = req.into_inner();
        self.check_recipe(&who, &r.name, true)?;
        let (h, key) = self
            .call(|tx| BridgeRequest::Lock(r.name, r.lease, tx))
            .await?;
        Ok(Response::new(lpb::LockResponse {
            header: header(&h),
            key,
        }))
    }

    async fn unlock(
        &self,
        req: Request<lpb::UnlockRequest>,
    ) -> Result<Response<lpb::UnlockResponse>, Status> {
        let who = self.caller(&req).await?;
        let key = req.into_inner().key;
        self.check_range(&who, &key, &[], PermType::Write)?;
        let h = self.call(|tx| BridgeRequest::Unlock(key, tx)).await?;
        Ok(Response::new(lpb::UnlockResponse { header: header(&h) }))
    }
}

#[tonic::async_trait]
impl Election for Gateway {
    async fn campaign(
        &self,
        req: Request<epb::CampaignRequest>,
    ) -> Result<Response<epb::CampaignResponse>, Status> {
        let who = self.caller(&req).await?;
        let r = req.into_inner();
        self.check_recipe(&who, &r.name, true)?;
        let (h, leader) = self
            .call(|tx| BridgeRequest::Campaign(r.name, r.lease, r.value, tx))
            .await?;
        Ok(Response::new(epb::CampaignResponse {
            header: header(&h),
            leader: Some(leader_to_pb(leader)),
        }))
    }

    async fn proclaim(
        &self,
        req: Request<epb::ProclaimRequest>,
    ) -> Result<Response<epb::ProclaimResponse>, Status> {
        let who = self.caller(&req).await?;
        let r = req.into_inner();
        let leader = leader_from_pb(r.leader)?;
        self.check_range(&who, &leader.key, &[], PermType::Write)?;
        let h = self
            .call(|tx| BridgeRequest::Proclaim(leader, r.value, tx))
            .await?;
        Ok(Response::new(epb::ProclaimResponse { header: header(&h) }))
    }

    async fn leader(
        &self,
        req: Request<epb::LeaderRequest>,
    ) -> Result<Response<epb::LeaderResponse>, Status> {
        let who = self.caller(&req).await?;
        let name = req.into_inner().name;
        self.check_recipe(&who, &name, false)?;
        let (h, kv) = self.call(|tx| BridgeRequest::Leader(name, tx)).await?;
        Ok(Response::new(epb::LeaderResponse {
            header: header(&h),
            kv: Some(kv_to_pb(kv)),
        }))
    }

    async fn observe(
        &self,
        req: Request<epb::LeaderRequest>,
    ) -> Result<Response<BoxStream<epb::LeaderResponse>>, Status> {
        let who = self.caller(&req).await?;
        let name = req.into_inner().name;
        self.check_recipe(&who, &name, false)?;
        let (tx, rx) = oneshot::channel();
        let mut shard = self.shard_sender(self.pick_shard());
        let stopped = || to_status(KvError::Stopped);
        shard
            .send(BridgeRequest::Observe(name, tx))
            .await
            .map_err(|_| stopped())?;
        let observed = rx.await.map_err(|_| stopped())?;
        let out = observed.map(|r| {
            r.map(|(h, kv)| epb::LeaderResponse {
                header: header(&h),
                kv: Some(kv_to_pb(kv)),
            })
            .map_err(to_status)
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn resign(
        &self,
        req: Request<epb::ResignRequest>,
    ) -> Result<Response<epb::ResignResponse>, Status> {
        let who = self.caller(&req).await?;
        let leader = leader_from_pb(req.into_inner().leader)?;
        self.check_range(&who, &leader.key, &[], PermType::Write)?;
        let h = self.call(|tx| BridgeRequest::Resign(leader, tx)).await?;
        Ok(Response::new(epb::ResignResponse { header: header(&h) }))
    }
}
