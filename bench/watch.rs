//! `corekv-bench watch`: fan-out over etcd's gRPC Watch API, so the same run drives etcd
//! and corekv. `--watchers` watches on one key spread over `--streams` streams (and
//! `--conns` connections); `--put-clients` write that key `--puts` times in total with
//! the send time in the value. Reports events/s (events received / time from the first
//! put to the last event), put→event latency percentiles (hdrhistogram), and, given
//! `--server-pid`, the server's RSS growth per watcher.

use super::new_histogram;
use corekv::etcdpb::etcdserverpb as pb;
use futures::StreamExt;
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone)]
pub struct WatchLoad {
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoints: String,
    #[arg(long, default_value_t = 1000)]
    watchers: u64,
    #[arg(long, default_value_t = 10)]
    streams: u64,
    #[arg(long, default_value_t = 10)]
    conns: u64,
    #[arg(long, default_value_t = 10)]
    put_clients: u64,
    #[arg(long, default_value_t = 2000)]
    puts: u64,
    /// Puts per second over all writers (0 = as fast as they go), as etcd's
    /// `benchmark watch-latency --put-rate`.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Server process to sample VmRSS from (memory per watcher).
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long)]
    json: bool,
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub(super) async fn channel(url: &str) -> Result<tonic::transport::Channel, String> {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("dial {url}: {e}"))
}

pub fn run(w: WatchLoad) -> Result<(), String> {
    assert!(w.streams >= 1 && w.watchers >= w.streams);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(run_async(w))
}

async fn run_async(w: WatchLoad) -> Result<(), String> {
    use pb::watch_client::WatchClient;
    let url = super::grpc_url(&w.endpoints);
    let key = b"corekv-bench-watch".to_vec();
    let epoch = Instant::now();
    let rss_before = w.server_pid.and_then(rss_bytes);
    let mut conns = Vec::new();
    for _ in 0..w.conns.max(1) {
        conns.push(channel(&url).await?);
    }
    let expected_events = w.watchers * w.puts;
    let received = Arc::new(AtomicU64::new(0));
    let last_event_ns = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    let mut created = Vec::new();
    for s in 0..w.streams {
        let n = w.watchers / w.streams + u64::from(s < w.watchers % w.streams);
        // Creates are queued before the call: grpc-go (etcd) sends the response headers
        // only with its first response, which tonic's call waits for.
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::WatchRequest>(n as usize + 1);
        for _ in 0..n {
            let create = pb::WatchCreateRequest {
                key: key.clone(),
                ..Default::default()
            };
            let req = pb::WatchRequest {
                request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)),
            };
            tx.send(req).await.map_err(|_| "watch stream closed")?;
        }
        let mut client = WatchClient::new(conns[(s % w.conns.max(1)) as usize].clone())
            .max_decoding_message_size(64 << 20);
        let mut inbound = client
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|e| format!("watch: {e}"))?
            .into_inner();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        created.push(ready_rx);
        let (received, last) = (received.clone(), last_event_ns.clone());
        readers.push(tokio::spawn(async move {
            let _keep_open = tx;
            let mut h = new_histogram();
            let mut pending_created = n;
            let mut ready = Some(ready_tx);
            let mut mine = 0u64;
            // Bounded: ends when this stream has all its events or the server closes it.
            while let Some(Ok(resp)) = inbound.next().await {
                if resp.created {
                    pending_created -= 1;
                    if pending_created == 0 {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                }
                let now = epoch.elapsed().as_nanos() as u64;
                for e in &resp.events {
                    if let Some(kv) = &e.kv {
                        if let Ok(b) = <[u8; 8]>::try_from(&kv.value[..8.min(kv.value.len())]) {
                            let sent = u64::from_be_bytes(b);
                            let _ = h.record((now.saturating_sub(sent) / 1000).max(1));
                        }
                    }
                }
                mine += resp.events.len() as u64;
                received.fetch_add(resp.events.len() as u64, Ordering::Relaxed);
                last.fetch_max(now, Ordering::Relaxed);
                if mine >= n * w.puts {
                    break;
                }
            }
            h
        }));
    }
    for c in created {
        c.await
            .map_err(|_| "watch stream ended before all watches were created")?;
    }
    let rss_after = w.server_pid.and_then(rss_bytes);
    // Writers: `put_clients` sequential loops over their own connection.
    let first_put_ns = epoch.elapsed().as_nanos() as u64;
    let mut writers = Vec::new();
    for p in 0..w.put_clients.max(1) {
        let n = w.puts / w.put_clients.max(1) + u64::from(p < w.puts % w.put_clients.max(1));
        let ch = channel(&url).await?;
        let key = key.clone();
        let per_writer_rate = w.rate as f64 / w.put_clients.max(1) as f64;
        writers.push(tokio::spawn(async move {
            let mut kv = pb::kv_client::KvClient::new(ch);
            let start = tokio::time::Instant::now();
            for i in 0..n {
                if per_writer_rate > 0.0 {
                    let due = start + Duration::from_secs_f64(i as f64 / per_writer_rate);
                    tokio::time::sleep_until(due).await;
                }
                let mut value = (epoch.elapsed().as_nanos() as u64).to_be_bytes().to_vec();
                value.resize(64, b'v');
                let put = pb::PutRequest {
                    key: key.clone(),
                    value,
                    ..Default::default()
                };
                if kv.put(put).await.is_err() {
                    return false;
                }
            }
            true
        }));
    }
    for wr in writers {
        if !wr.await.map_err(|e| e.to_string())? {
            return Err("put failed".into());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while received.load(Ordering::Relaxed) < expected_events && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut all: Histogram<u64> = new_histogram();
    for r in readers {
        if r.is_finished() {
            all.add(&r.await.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        } else {
            r.abort();
        }
    }
    let got = received.load(Ordering::Relaxed);
    let secs = (last_event_ns
        .load(Ordering::Relaxed)
        .saturating_sub(first_put_ns)) as f64
        / 1e9;
    let ev_per_s = got as f64 / secs.max(1e-9);
    let per_watcher = match (rss_before, rss_after) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / w.watchers as f64),
        _ => None,
    };
    let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    if w.json {
        println!(
            "{}",
            serde_json::json!({
                "workload": "watch", "watchers": w.watchers, "streams": w.streams, "puts": w.puts, "rate": w.rate,
                "events": got, "expected": expected_events, "seconds": secs, "events_per_s": ev_per_s,
                "p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99), "p999_ms": ms(0.999),
                "max_ms": all.max() as f64 / 1000.0, "rss_bytes_per_watcher": per_watcher,
            })
        );
    } else {
        println!(
            "watch watchers={} streams={} events={got}/{expected_events} {ev_per_s:.0} events/s  p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  rss/watcher {}",
            w.watchers, w.streams, ms(0.5), ms(0.99), ms(0.999), all.max() as f64 / 1000.0,
            per_watcher.map_or("n/a".to_string(), |b| format!("{b:.0} B"))
        );
    }
    if got < expected_events {
        return Err(format!("lost events: received {got} of {expected_events}"));
    }
    Ok(())
}
