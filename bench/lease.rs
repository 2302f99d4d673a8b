//! `corekv-bench lease-keepalive`: keepalive throughput over etcd's gRPC Lease API (works
//! against etcd and corekv). Grants `--leases` leases, then `--streams` keepalive
//! streams each send requests one at a time (request, wait for its answer) until
//! `--total` keepalives are answered; reports keepalives/s and latency percentiles.

use super::new_histogram;
use corekv::etcdpb::etcdserverpb as pb;
use futures::StreamExt;
use std::time::Instant;

#[derive(clap::Args, Clone)]
pub struct KeepAliveLoad {
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoints: String,
    #[arg(long, default_value_t = 100)]
    leases: u64,
    #[arg(long, default_value_t = 10)]
    streams: u64,
    #[arg(long, default_value_t = 100_000)]
    total: u64,
    #[arg(long)]
    json: bool,
}

pub fn run(l: KeepAliveLoad) -> Result<(), String> {
    assert!(l.streams >= 1 && l.leases >= 1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(run_async(l))
}

async fn run_async(l: KeepAliveLoad) -> Result<(), String> {
    use pb::lease_client::LeaseClient;
    let url = super::grpc_url(&l.endpoints);
    let ch = super::watch::channel(&url).await?;
    let mut client = LeaseClient::new(ch.clone());
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
        let mut client = LeaseClient::new(ch.clone());
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
    let secs = started.elapsed().as_secs_f64();
    let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    let rate = all.len() as f64 / secs;
    if l.json {
        println!(
            "{}",
            serde_json::json!({
                "workload": "lease-keepalive", "leases": l.leases, "streams": l.streams,
                "ok": all.len(), "seconds": secs, "per_s": rate,
                "p50_ms": ms(0.5), "p99_ms": ms(0.99), "p999_ms": ms(0.999), "max_ms": all.max() as f64 / 1000.0,
            })
        );
    } else {
        println!(
            "lease-keepalive leases={} streams={} ok={} {rate:.0} keepalives/s  p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
            l.leases, l.streams, all.len(), ms(0.5), ms(0.99), ms(0.999), all.max() as f64 / 1000.0
        );
    }
    for id in ids {
        let _ = client.lease_revoke(pb::LeaseRevokeRequest { id }).await;
    }
    Ok(())
}
