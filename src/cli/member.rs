//! `member list|add|remove|update|promote`, `move-leader`, and the cluster-wide
//! `endpoint status|health` verbs, printed as etcdctl prints them.

use super::output::{header_json, table, Format};
use crate::client::Client;
use crate::cluster::Member;
use crate::error::KvError;
use crate::model::Header;
use clap::Subcommand;
use serde_json::{json, Value};

#[derive(Subcommand, Debug, Clone)]
pub enum MemberCmd {
    /// Lists all members in the cluster.
    List,
    /// Adds a member into the cluster.
    Add {
        name: String,
        /// Comma separated peer URLs for the new member.
        #[arg(long)]
        peer_urls: String,
        /// Indicates if the new member is raft learner.
        #[arg(long)]
        learner: bool,
    },
    /// Removes a member from the cluster.
    Remove { id: String },
    /// Updates a member in the cluster.
    Update {
        id: String,
        /// Comma separated peer URLs for the updated member.
        #[arg(long)]
        peer_urls: String,
    },
    /// Promotes a non-voting member in the cluster.
    Promote { id: String },
}

pub fn parse_id(s: &str) -> Result<u64, KvError> {
    u64::from_str_radix(s, 16)
        .map_err(|e| KvError::Client(format!("bad member ID arg ({e}), expecting ID in Hex")))
}

fn member_json(m: &Member) -> Value {
    let mut o = serde_json::Map::new();
    o.insert("ID".into(), json!(m.id));
    if !m.name.is_empty() {
        o.insert("name".into(), json!(m.name));
    }
    if !m.peer_urls.is_empty() {
        o.insert("peerURLs".into(), json!(m.peer_urls));
    }
    if !m.client_urls.is_empty() {
        o.insert("clientURLs".into(), json!(m.client_urls));
    }
    if m.is_learner {
        o.insert("isLearner".into(), json!(true));
    }
    Value::Object(o)
}

pub fn member_list(f: Format, h: &Header, ms: &[Member]) -> String {
    let cells = |m: &Member| -> Vec<String> {
        let status = if m.name.is_empty() {
            "unstarted"
        } else {
            "started"
        };
        vec![
            format!("{:x}", m.id),
            status.to_string(),
            m.name.clone(),
            m.peer_urls.join(","),
            m.client_urls.join(","),
            m.is_learner.to_string(),
        ]
    };
    match f {
        Format::Simple => ms.iter().map(|m| cells(m).join(", ") + "\n").collect(),
        Format::Json => {
            json!({"header": header_json(h), "members": ms.iter().map(member_json).collect::<Vec<_>>()})
                .to_string()
                + "\n"
        }
        Format::Table => {
            let header: Vec<String> = [
                "ID",
                "STATUS",
                "NAME",
                "PEER ADDRS",
                "CLIENT ADDRS",
                "IS LEARNER",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            table(&header, &ms.iter().map(cells).collect::<Vec<_>>())
        }
    }
}

/// etcdctl's `member add` printout plus the same lines for corekv's variables.
fn added(name: &str, h: &Header, m: &Member, list: &[Member]) -> String {
    let learner = if m.is_learner { " as learner " } else { " " };
    let mut out = format!(
        "Member {:16x} added{learner}to cluster {:16x}\n\n",
        m.id, h.cluster_id
    );
    let conf: Vec<String> = list
        .iter()
        .flat_map(|x| {
            let n = if x.id == m.id { name } else { x.name.as_str() };
            x.peer_urls.iter().map(move |u| format!("{n}={u}"))
        })
        .collect();
    for prefix in ["ETCD", "COREKV"] {
        out += &format!("{prefix}_NAME={name:?}\n");
        out += &format!("{prefix}_INITIAL_CLUSTER={:?}\n", conf.join(","));
        out += &format!(
            "{prefix}_INITIAL_ADVERTISE_PEER_URLS={:?}\n",
            m.peer_urls.join(",")
        );
        out += &format!("{prefix}_INITIAL_CLUSTER_STATE=\"existing\"\n");
    }
    out
}

pub async fn run(c: &Client, f: Format, cmd: &MemberCmd) -> Result<String, KvError> {
    let urls = |s: &str| crate::cluster::url_list(s);
    match cmd {
        MemberCmd::List => {
            let (h, ms) = c.member_list().await?;
            Ok(member_list(f, &h, &ms))
        }
        MemberCmd::Add {
            name,
            peer_urls,
            learner,
        } => {
            let (h, m, list) = c.member_add(&urls(peer_urls), *learner).await?;
            Ok(match f {
                Format::Json => {
                    json!({"header": header_json(&h), "member": member_json(&m),
                        "members": list.iter().map(member_json).collect::<Vec<_>>()})
                    .to_string()
                        + "\n"
                }
                _ => added(name, &h, &m, &list),
            })
        }
        MemberCmd::Remove { id } => {
            let id = parse_id(id)?;
            let (h, _) = c.member_remove(id).await?;
            Ok(format!(
                "Member {id:16x} removed from cluster {:16x}\n",
                h.cluster_id
            ))
        }
        MemberCmd::Update { id, peer_urls } => {
            let id = parse_id(id)?;
            let (h, _) = c.member_update(id, &urls(peer_urls)).await?;
            Ok(format!(
                "Member {id:16x} updated in cluster {:16x}\n",
                h.cluster_id
            ))
        }
        MemberCmd::Promote { id } => {
            let id = parse_id(id)?;
            let (h, _) = c.member_promote(id, None).await?;
            Ok(format!(
                "Member {id:16x} promoted in cluster {:16x}\n",
                h.cluster_id
            ))
        }
    }
}

/// Native endpoints of every member, from the membership one endpoint reports.
pub async fn cluster_endpoints(endpoints: &str) -> Result<Vec<String>, KvError> {
    let c = Client::connect(endpoints).await?;
    let (_, ms) = c.member_list().await?;
    let mut eps = Vec::new();
    for m in ms {
        if let Some(u) = m.native_urls.first() {
            eps.extend(crate::config::parse_urls(u).map_err(KvError::Client)?);
        }
    }
    Ok(eps)
}

/// etcdctl's `move-leader`: finds the leader among the endpoints and asks it.
pub async fn move_leader(endpoints: &str, target: &str) -> Result<String, KvError> {
    let target = parse_id(target)?;
    let addrs = crate::config::parse_urls(endpoints).map_err(KvError::Client)?;
    for ep in addrs {
        let Ok(c) = Client::connect(&ep).await else {
            continue;
        };
        let Ok((h, st)) = c.status().await else {
            continue;
        };
        if st.leader == h.member_id {
            c.move_leader(target).await?;
            return Ok(format!(
                "Leadership transferred from {:x} to {target:x}\n",
                h.member_id
            ));
        }
    }
    Err(KvError::Client(
        "no leader endpoint given at [".to_string() + endpoints + "]",
    ))
}

/// etcdctl's `endpoint health`: a linearizable read through each endpoint.
pub async fn endpoint_health(eps: &[String]) -> (String, bool) {
    let mut out = String::new();
    let mut healthy = true;
    for ep in eps {
        let started = std::time::Instant::now();
        let result = match Client::connect(ep).await {
            Ok(c) => c
                .range(&crate::model::RangeRequest {
                    key: b"health".to_vec(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                out += &format!(
                    "{ep} is healthy: successfully committed proposal: took = {:?}\n",
                    started.elapsed()
                )
            }
            Err(e) => {
                healthy = false;
                out += &format!("{ep} is unhealthy: failed to commit proposal: {e}\n");
            }
        }
    }
    (out, healthy)
}
