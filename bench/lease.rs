//! `lease-keepalive`: keepalive throughput over etcd's gRPC Lease API (etcd and corekv
//! alike). Grants `--leases` leases, then `--streams` keepalive streams each send
//! requests one at a time (request, wait for its answer) until `--total` keepalives are
//! answered; reports keepalives/s and latency percentiles.

use crate::record::{Outcome, Workload};
use crate::{grpc_channel, new_histogram, stopped};
use corekv::etcdpb::etcdserverpb as pb;
use futures::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args, Clone, Debug)]
pub struct KeepAliveArgs {
    #[arg(long, default_value_t = 100)]
    pub leases: u64,
    #[arg(long, default_value_t = 10)]
    pub streams: u64,
    #[arg(long, default_value_t = 100_000)]
    pub total: u64,
}

#[derive(Clone, Debug)]
pub struct KeepAliveWorkload {
    pub args: KeepAliveArgs,
}

pub fn workload(args: KeepAliveArgs) -> Workload {
    Workload::Lease(KeepAliveWorkload { args })
}

impl KeepAliveWorkload {
    pub fn label(&self) -> String {
        format!("lease-keepalive, {} streams", self.args.streams)
    }

    pub fn params(&self) -> serde_json::Value {
        let a = &self.args;
        serde_json::json!({"leases": a.leases, "streams": a.streams, "total": a.total})
    }

    pub fn total(&self) -> u64 {
        self.args.total
    }

    pub fn run(&self, endpoints: &str, done: &Arc<AtomicU64>) -> Result<Outcome, String> {
        let a = &self.args;
        if a.streams == 0 || a.leases == 0 {
            return Err("--streams and --leases must be at least 1".into());
        }
        let rt = crate::tokio_runtime()?;
        rt.block_on(run_async(a.clone(), endpoints, done.clone()))
    }
}

/// One connection per endpoint, streams round robin over them (as etcd's tool spreads
/// its clients), so on a cluster most keepalives arrive at a follower and are forwarded
/// to the leader.
async fn run_async(
    l: KeepAliveArgs,
    endpoints: &str,
    done: Arc<AtomicU64>,
) -> Result<Outcome, String> {
    use pb::lease_client::LeaseClient;
    let mut channels = Vec::new();
    let n_endpoints = endpoints.split(',').count().min(l.streams as usize);
    for e in 0..n_endpoints {
        channels.push(grpc_channel(&crate::grpc_url_n(endpoints, e)).await?);
    }
    let mut client = LeaseClient::new(channels[0].clone());
    let mut ids = Vec::new();
    for _ in 0..l.leases {
        let r = client
            .lease_grant(pb::LeaseGrantRequest { ttl: 600, id: 0 })
            .await
            .map_err(|e| format!("grant: {e}"))?;
        ids.push(r.into_inner().id);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..l.streams {
        let n = l.total / l.streams + u64::from(s < l.total % l.streams);
        let mine: Vec<i64> = ids
            .iter()
            .copied()
            .skip(s as usize % ids.len())
            .step_by(l.streams as usize)
            .collect();
        let mine = if mine.is_empty() { vec![ids[0]] } else { mine };
        let mut client = LeaseClient::new(channels[s as usize % channels.len()].clone());
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<pb::LeaseKeepAliveRequest>(1);
            // grpc-go answers headers with the first response: queue one request first.
            tx.send(pb::LeaseKeepAliveRequest { id: mine[0] })
                .await
                .map_err(|_| "stream closed".to_string())?;
            let mut answers = client
                .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map_err(|e| format!("keepalive: {e}"))?
                .into_inner();
            let mut h = new_histogram();
            let mut sent_at = Instant::now();
            for i in 0..n {
                if stopped() {
                    break;
                }
                if i > 0 {
                    sent_at = Instant::now();
                    let id = mine[i as usize % mine.len()];
                    tx.send(pb::LeaseKeepAliveRequest { id })
                        .await
                        .map_err(|_| "stream closed".to_string())?;
                }
                match answers.next().await {
                    Some(Ok(r)) if r.ttl > 0 => {
                        let _ = h.record((sent_at.elapsed().as_micros() as u64).max(1));
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    other => return Err(format!("keepalive answer: {other:?}")),
                }
            }
            Ok::<_, String>(h)
        }));
    }
    let mut all = new_histogram();
    for t in tasks {
        all.add(&t.await.map_err(|e| e.to_string())??)
            .map_err(|e| e.to_string())?;
    }
    let seconds = started.elapsed().as_secs_f64();
    for id in ids {
        let _ = client.lease_revoke(pb::LeaseRevokeRequest { id }).await;
    }
    Ok(Outcome {
        ok: all.len(),
        errors: 0,
        first_error: None,
        per_s: all.len() as f64 / seconds.max(1e-9),
        seconds,
        hist: all,
        extra: serde_json::Value::Null,
    })
}
