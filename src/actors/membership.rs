//! Membership verbs on a shard (etcd's Cluster service and move-leader): read the
//! membership from LMDB, or propose a raft conf change carrying the member change and
//! wait for it to be applied, as a write waits.

use super::network::{Reply, Shard};
use super::{ProposalRef, ToRaft};
use crate::cluster::{Member, MemberChange};
use crate::error::KvError;
use crate::model::{Header, WriteRequest, WriteResponse};
use ::raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2};
use std::rc::Rc;

impl Shard {
    /// The membership as this member last applied it (etcd 3.4 serves it locally too).
    pub fn member_list(&self) -> Result<(Header, Vec<Member>), KvError> {
        let (b, txn) = self.backend.read()?;
        let mut members = crate::cluster::load_members(&b, &txn)?;
        members.sort_by_key(|m| m.id); // etcd lists members by ID
        self.observe_term(&b, &txn)?;
        Ok((self.header(0), members))
    }

    fn find(&self, id: u64) -> Result<Member, KvError> {
        let (_, members) = self.member_list()?;
        members
            .into_iter()
            .find(|m| m.id == id)
            .ok_or(KvError::MemberNotFound)
    }

    /// Adds a member (or learner) with these peer URLs; returns it and the new list.
    pub async fn member_add(
        &self,
        peer_urls: Vec<String>,
        is_learner: bool,
    ) -> Result<(Header, Member, Vec<Member>), KvError> {
        if peer_urls.is_empty() {
            return Err(KvError::Client("member peer urls are not provided".into()));
        }
        crate::config::parse_urls(&peer_urls.join(",")).map_err(KvError::Client)?;
        let (_, members) = self.member_list()?;
        if members
            .iter()
            .any(|m| m.peer_urls.iter().any(|u| peer_urls.contains(u)))
        {
            return Err(KvError::PeerUrlExists);
        }
        // etcd: sha1(peer URLs + time of the add), no cluster token.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let member = Member {
            id: crate::cluster::member_id(&peer_urls, "", Some(now)),
            name: String::new(),
            peer_urls,
            client_urls: Vec::new(),
            is_learner,
            native_urls: Vec::new(),
        };
        let kind = if is_learner {
            ConfChangeType::AddLearnerNode
        } else {
            ConfChangeType::AddNode
        };
        let (h, list) = self
            .conf_change(kind, member.id, MemberChange::Add(member.clone()))
            .await?;
        Ok((h, member, list))
    }

    pub async fn member_remove(&self, id: u64) -> Result<(Header, Vec<Member>), KvError> {
        self.find(id)?;
        self.conf_change(ConfChangeType::RemoveNode, id, MemberChange::Remove(id))
            .await
    }

    pub async fn member_update(
        &self,
        id: u64,
        peer_urls: Vec<String>,
    ) -> Result<(Header, Vec<Member>), KvError> {
        crate::config::parse_urls(&peer_urls.join(",")).map_err(KvError::Client)?;
        let m = self.find(id)?;
        // Re-adding a member in its current role changes nothing in raft; the context
        // carries the new URLs to every member's transport and member list.
        let kind = if m.is_learner {
            ConfChangeType::AddLearnerNode
        } else {
            ConfChangeType::AddNode
        };
        self.conf_change(kind, id, MemberChange::UpdatePeerUrls(id, peer_urls))
            .await
    }

    /// Only the leader knows whether the learner has caught up: a follower forwards
    /// the promotion to it (as etcd does), with the caller's auth `token` (already judged
    /// here) so the leader judges the same caller.
    pub async fn member_promote(
        &self,
        id: u64,
        token: Option<String>,
    ) -> Result<(Header, Vec<Member>), KvError> {
        if !self.find(id)?.is_learner {
            return Err(KvError::MemberNotLearner);
        }
        match self
            .conf_change(ConfChangeType::AddNode, id, MemberChange::Promote(id))
            .await
        {
            Err(KvError::NotLeader) => self.forward_promote(id, token.as_deref()).await,
            other => other,
        }
    }

    async fn forward_promote(
        &self,
        id: u64,
        token: Option<&str>,
    ) -> Result<(Header, Vec<Member>), KvError> {
        let r = self.leader_client().await?.member_promote(id, token).await;
        self.forget_leader_conn_on(&r);
        r
    }

    /// A failed forwarded call may mean a dead connection: dial afresh next time.
    pub(super) fn forget_leader_conn_on<T>(&self, r: &Result<T, KvError>) {
        if r.is_err() {
            self.leader_conn.borrow_mut().take();
        }
    }

    /// A native connection to the current leader (kept while it leads), for the calls
    /// only the leader can answer.
    pub(super) async fn leader_client(&self) -> Result<Rc<crate::client::Client>, KvError> {
        let leader = self.leader_hint();
        if leader == 0 {
            return Err(KvError::NoLeader);
        }
        if leader == self.settings.member_id {
            // Raft just made this member leader; the caller's next try is answered here.
            return Err(KvError::NotLeader);
        }
        if let Some((id, c)) = self.leader_conn.borrow().as_ref() {
            if *id == leader {
                return Ok(c.clone());
            }
        }
        let member = self.find(leader).map_err(|_| KvError::NoLeader)?;
        let url = member.native_urls.first().ok_or(KvError::NoLeader)?;
        let client = Rc::new(crate::client::Client::connect(url).await?);
        *self.leader_conn.borrow_mut() = Some((leader, client.clone()));
        Ok(client)
    }

    /// The leader raft last reported (0 = none known).
    pub(super) fn leader_hint(&self) -> u64 {
        self.settings
            .leader_hint
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Another member leads, as far as raft last said.
    pub(super) fn follows_known_leader(&self) -> bool {
        let leader = self.leader_hint();
        leader != 0 && leader != self.settings.member_id
    }

    async fn conf_change(
        &self,
        kind: ConfChangeType,
        node_id: u64,
        change: MemberChange,
    ) -> Result<(Header, Vec<Member>), KvError> {
        let id = self.next_id();
        let mut single = ConfChangeSingle::default();
        single.set_change_type(kind);
        single.node_id = node_id;
        let mut cc = ConfChangeV2::default();
        cc.set_changes(vec![single].into());
        cc.set_context(postcard::to_allocvec(&change)?.into());
        let context = postcard::to_allocvec(&ProposalRef {
            epoch: self.epoch,
            id,
        })?;
        match self
            .call(id, ToRaft::ConfChange { id, context, cc })
            .await?
        {
            // etcd's Cluster responses carry no revision (membership is not in the MVCC)
            // and list members by ID.
            Reply::Written(h, Ok(WriteResponse::Members(mut list))) => {
                list.sort_by_key(|m| m.id);
                Ok((Header { revision: 0, ..h }, list))
            }
            Reply::Written(_, Err(e)) | Reply::Failed(e) => Err(e),
            _ => Err(KvError::Internal(
                "unexpected reply to a member change".into(),
            )),
        }
    }

    /// Leader only: hands leadership to `target` and returns once it leads.
    pub async fn move_leader(&self, target: u64) -> Result<Header, KvError> {
        let id = self.next_id();
        match self
            .call(id, ToRaft::TransferLeader { id, to: target })
            .await?
        {
            Reply::Status(_) => Ok(self.header(0)),
            Reply::Failed(e) => Err(e),
            _ => Err(KvError::Internal("unexpected reply to move leader".into())),
        }
    }

    /// Records this member's name and client URLs in the membership (etcd's publish),
    /// once a leader exists. Retries every 50 ms (a new cluster elects within about an
    /// election timeout) for at most ten minutes.
    pub async fn publish_self(
        self: Rc<Self>,
        name: String,
        (client_urls, native_urls): (Vec<String>, Vec<String>),
    ) {
        const ATTEMPTS: u32 = 12_000;
        for _ in 0..ATTEMPTS {
            let me = self.settings.member_id;
            let current = self
                .member_list()
                .ok()
                .and_then(|(_, ms)| ms.into_iter().find(|m| m.id == me));
            if current.is_some_and(|m| {
                m.name == name && m.client_urls == client_urls && m.native_urls == native_urls
            }) {
                return;
            }
            let req = WriteRequest::PublishMember {
                id: me,
                name: name.clone(),
                client_urls: client_urls.clone(),
                native_urls: native_urls.clone(),
            };
            match self.write(req).await {
                Ok(_) => return,
                Err(e) => tracing::debug!("publishing member attributes: {e}"),
            }
            glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
        }
        tracing::warn!("could not publish this member's name and client URLs");
    }
}
