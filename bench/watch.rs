//! `watch` and `watch-latency`: fan-out over etcd's gRPC Watch API, so the same run drives
//! etcd and corekv. `--watchers` watches on one key spread over `--streams` streams (and
//! `--conns` connections); `--put-clients` write that key `--puts` times in total with
//! the send time in the value, as fast as they go (`watch`) or at `--put-rate` per second
//! (`watch-latency`, etcd's regime). Reports events/s (events received / time from the
//! first put to the last event), put→event latency percentiles (hdrhistogram), and the
//! server's RSS growth per watcher.

use crate::record::{rss_bytes, Outcome};
use crate::{grpc_channel, new_histogram, stopped};
use corekv::etcdpb::etcdserverpb as pb;
use futures::StreamExt;
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone, Debug)]
pub struct WatchArgs {
    #[arg(long, default_value_t = 1000)]
    pub watchers: u64,
    #[arg(long, default_value_t = 10)]
    pub streams: u64,
    #[arg(long, default_value_t = 10)]
    pub conns: u64,
    #[arg(long, default_value_t = 10)]
    pub put_clients: u64,
    #[arg(long, default_value_t = 2000)]
    pub puts: u64,
    /// Puts per second over all writers (watch: 0 = as fast as they go; watch-latency:
    /// default 100, as etcd's `benchmark watch-latency --put-rate`).
    #[arg(long, alias = "rate")]
    pub put_rate: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct WatchWorkload {
    pub args: WatchArgs,
    /// watch-latency: paced puts.
    pub latency: bool,
}

pub fn workload(args: WatchArgs, latency: bool) -> crate::record::Workload {
    crate::record::Workload::Watch(WatchWorkload { args, latency })
}

/// Events not delivered within this long after the last put count as lost.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

impl WatchWorkload {
    pub fn name(&self) -> &'static str {
        if self.latency {
            "watch-latency"
        } else {
            "watch"
        }
    }

    fn rate(&self) -> u64 {
        match (self.args.put_rate, self.latency) {
            (Some(r), _) => r,
            (None, true) => 100,
            (None, false) => 0,
        }
    }

    pub fn label(&self) -> String {
        let rate = match self.rate() {
            0 => String::new(),
            r => format!(", {r} puts/s"),
        };
        format!("{}, {} watchers{rate}", self.name(), self.args.watchers)
    }

    pub fn params(&self) -> serde_json::Value {
        let a = &self.args;
        serde_json::json!({"watchers": a.watchers, "streams": a.streams, "conns": a.conns,
            "put_clients": a.put_clients, "puts": a.puts, "rate": self.rate()})
    }

    pub fn expected_events(&self) -> u64 {
        self.args.watchers * self.args.puts
    }

    pub fn run(
        &self,
        endpoints: &str,
        server_pid: Option<u32>,
        done: &Arc<AtomicU64>,
    ) -> Result<Outcome, String> {
        let a = &self.args;
        if a.streams == 0 || a.watchers < a.streams || a.conns == 0 || a.put_clients == 0 {
            return Err(
                "need 1 <= --streams <= --watchers, --conns >= 1, --put-clients >= 1".into(),
            );
        }
        let rt = crate::tokio_runtime()?;
        rt.block_on(run_async(
            a.clone(),
            self.rate(),
            crate::grpc_url_n(endpoints, 0),
            server_pid,
            done.clone(),
        ))
    }
}

async fn run_async(
    w: WatchArgs,
    rate: u64,
    url: String,
    server_pid: Option<u32>,
    done: Arc<AtomicU64>,
) -> Result<Outcome, String> {
    use pb::watch_client::WatchClient;
    let key = b"corekv-bench-watch".to_vec();
    let epoch = Instant::now();
    let rss_before = server_pid.and_then(rss_bytes);
    let mut conns = Vec::new();
    for _ in 0..w.conns.max(1) {
        conns.push(grpc_channel(&url).await?);
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
        let (received, last, done) = (received.clone(), last_event_ns.clone(), done.clone());
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
                done.fetch_add(resp.events.len() as u64, Ordering::Relaxed);
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
    let rss_after = server_pid.and_then(rss_bytes);
    // Writers: `put_clients` sequential loops over their own connection.
    let first_put_ns = epoch.elapsed().as_nanos() as u64;
    let mut writers = Vec::new();
    for p in 0..w.put_clients.max(1) {
        let n = w.puts / w.put_clients.max(1) + u64::from(p < w.puts % w.put_clients.max(1));
        let ch = grpc_channel(&url).await?;
        let key = key.clone();
        let per_writer_rate = rate as f64 / w.put_clients.max(1) as f64;
        writers.push(tokio::spawn(async move {
            let mut kv = pb::kv_client::KvClient::new(ch);
            let start = tokio::time::Instant::now();
            for i in 0..n {
                if stopped() {
                    break;
                }
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
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while received.load(Ordering::Relaxed) < expected_events
        && Instant::now() < deadline
        && !stopped()
    {
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
    let lost = expected_events.saturating_sub(got);
    Ok(Outcome {
        ok: all.len(),
        errors: if stopped() { 0 } else { lost },
        first_error: (lost > 0 && !stopped())
            .then(|| format!("lost events: received {got} of {expected_events}")),
        seconds: secs,
        per_s: ev_per_s,
        hist: all,
        extra: serde_json::json!({
            "events": got, "expected": expected_events, "rss_bytes_per_watcher": per_watcher,
        }),
    })
}
