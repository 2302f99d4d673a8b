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

/// What the loader reads of a WatchResponse: only what it measures, parsed in place. A
/// full prost decode of every event made the loader, not the server, the bottleneck.
#[derive(Debug, Default)]
struct WatchSeen {
    created: bool,
    events: u64,
    /// The send times (ns since the run's epoch) in the events' values.
    stamps: Vec<u64>,
}

/// Protobuf wire walking: each field of `b` as (number, varint value or payload).
fn for_each_field(
    mut b: &[u8],
    mut f: impl FnMut(u64, u64, &[u8]) -> Result<(), String>,
) -> Result<(), String> {
    let decode_varint =
        |b: &mut &[u8]| prost::encoding::decode_varint(b).map_err(|e| e.to_string());
    // Bounded: every step consumes at least the key byte.
    while !b.is_empty() {
        let key = decode_varint(&mut b)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = decode_varint(&mut b)?;
                f(field, v, &[])?;
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                b = b.get(n..).ok_or_else(|| "short fixed field".to_string())?;
            }
            2 => {
                let len = decode_varint(&mut b)? as usize;
                let payload = b
                    .get(..len)
                    .ok_or_else(|| "short length-delimited field".to_string())?;
                f(field, 0, payload)?;
                b = &b[len..];
            }
            _ => return Err(format!("unexpected wire type {wire}")),
        }
    }
    Ok(())
}

/// WatchResponse field numbers (etcd's rpc.proto) and below.
const CREATED: u64 = 3;
const EVENTS: u64 = 11;
const EVENT_KV: u64 = 2;
const KV_VALUE: u64 = 5;

fn parse_watch(b: &[u8]) -> Result<WatchSeen, String> {
    let mut seen = WatchSeen::default();
    for_each_field(b, |field, v, event| {
        match field {
            CREATED => seen.created = v != 0,
            EVENTS => {
                seen.events += 1;
                for_each_field(event, |f, _, kv| match f {
                    EVENT_KV => for_each_field(kv, |f, _, value| {
                        if let (KV_VALUE, Some(b)) = (f, value.get(..8)) {
                            let stamp: [u8; 8] = b.try_into().unwrap_or_default();
                            seen.stamps.push(u64::from_be_bytes(stamp));
                        }
                        Ok(())
                    }),
                    _ => Ok(()),
                })?;
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(seen)
}

struct WatchSeenDecoder;

impl tonic::codec::Decoder for WatchSeenDecoder {
    type Item = WatchSeen;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<WatchSeen>, tonic::Status> {
        use bytes::Buf;
        let msg = buf.copy_to_bytes(buf.remaining());
        parse_watch(&msg).map(Some).map_err(tonic::Status::internal)
    }
}

#[derive(Default)]
struct WatchSeenCodec;

impl tonic::codec::Codec for WatchSeenCodec {
    type Encode = pb::WatchRequest;
    type Decode = WatchSeen;
    type Encoder = tonic_prost::ProstEncoder<pb::WatchRequest>;
    type Decoder = WatchSeenDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }
    fn decoder(&mut self) -> WatchSeenDecoder {
        WatchSeenDecoder
    }
}

/// Opens etcd's Watch stream, reading responses as `WatchSeen`.
async fn open_watch(
    channel: tonic::transport::Channel,
    requests: tokio::sync::mpsc::Receiver<pb::WatchRequest>,
) -> Result<tonic::Streaming<WatchSeen>, String> {
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(64 << 20);
    grpc.ready().await.map_err(|e| format!("watch: {e}"))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/etcdserverpb.Watch/Watch");
    let requests = tokio_stream::wrappers::ReceiverStream::new(requests);
    grpc.streaming(tonic::Request::new(requests), path, WatchSeenCodec)
        .await
        .map(|r| r.into_inner())
        .map_err(|e| format!("watch: {e}"))
}

async fn run_async(
    w: WatchArgs,
    rate: u64,
    url: String,
    server_pid: Option<u32>,
    done: Arc<AtomicU64>,
) -> Result<Outcome, String> {
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
        let mut inbound = open_watch(conns[(s % w.conns.max(1)) as usize].clone(), rx).await?;
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
                for sent in &resp.stamps {
                    let _ = h.record((now.saturating_sub(*sent) / 1000).max(1));
                }
                mine += resp.events;
                received.fetch_add(resp.events, Ordering::Relaxed);
                done.fetch_add(resp.events, Ordering::Relaxed);
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
    // Writers: `put_clients` sequential loops over their own connection, dialed first.
    let writers_n = w.put_clients.max(1);
    let mut channels = Vec::new();
    for _ in 0..writers_n {
        channels.push(grpc_channel(&url).await?);
    }
    let first_put_ns = epoch.elapsed().as_nanos() as u64;
    let mut writers = Vec::new();
    // One schedule for all writers, interleaved (writer p sends puts p, p + W, p + 2W...):
    // evenly spaced puts, as etcd's tool paces them through one rate limiter.
    let start = tokio::time::Instant::now();
    for (p, ch) in (0..writers_n).zip(channels) {
        let n = w.puts / writers_n + u64::from(p < w.puts % writers_n);
        let key = key.clone();
        writers.push(tokio::spawn(async move {
            let mut kv = pb::kv_client::KvClient::new(ch);
            // The puts' own round trips: an event cannot arrive before its put is durable.
            let mut put_hist = new_histogram();
            for i in 0..n {
                if stopped() {
                    break;
                }
                if rate > 0 {
                    let slot = i * writers_n + p;
                    let due = start + Duration::from_secs_f64(slot as f64 / rate as f64);
                    tokio::time::sleep_until(due).await;
                }
                let mut value = (epoch.elapsed().as_nanos() as u64).to_be_bytes().to_vec();
                value.resize(64, b'v');
                let put = pb::PutRequest {
                    key: key.clone(),
                    value,
                    ..Default::default()
                };
                let sent = Instant::now();
                if kv.put(put).await.is_err() {
                    return None;
                }
                let _ = put_hist.record((sent.elapsed().as_micros() as u64).max(1));
            }
            Some(put_hist)
        }));
    }
    let mut puts_hist = new_histogram();
    for wr in writers {
        let h = wr.await.map_err(|e| e.to_string())?.ok_or("put failed")?;
        puts_hist.add(&h).map_err(|e| e.to_string())?;
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
            "put_p50_ms": crate::record::ms(&puts_hist, 0.5),
            "put_p99_ms": crate::record::ms(&puts_hist, 0.99),
        }),
    })
}
