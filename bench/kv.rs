//! KV workloads (put, range, txn-put, txn-mixed) over etcd's gRPC API or corekv's native
//! protocol. Requests come from one generator for both protocols; each client keeps one
//! request in flight, clients are spread over connections and load threads.

use crate::record::{Outcome, Place, Target, Workload};
use crate::{grpc_url_n, new_histogram, stopped};
use corekv::etcdpb::etcdserverpb as pb;
use corekv::model::{PutRequest, RangeRequest, RequestOp, TxnRequest};
use hdrhistogram::Histogram;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A run bounded by count only still stops after this long.
const MAX_RUN: Duration = Duration::from_secs(3600);

#[derive(clap::Args, Clone, Debug)]
pub struct KvArgs {
    /// Requests in flight in total.
    #[arg(long, default_value_t = 1)]
    pub clients: u64,
    /// Connections (clients are spread over them, and over the endpoints).
    #[arg(long, default_value_t = 1)]
    pub conns: u64,
    /// Requests in total (default 10000 unless --duration is given).
    #[arg(long)]
    pub total: Option<u64>,
    /// Run for this long instead of a count ("30s", "2m").
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Requests per second over all clients (0 = as fast as they go).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    #[arg(long, default_value_t = 256)]
    pub val_size: usize,
    /// Distinct keys the requests pick from.
    #[arg(long, alias = "key-space", default_value_t = 100_000)]
    pub key_space_size: u64,
    /// Keys in order (client c takes c, c + clients, ...) instead of at random.
    #[arg(long)]
    pub sequential_keys: bool,
    /// Load-generator threads (default: all cores, at most one per connection).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(clap::Args, Clone, Debug)]
pub struct RangeArgs {
    /// l (linearizable) or s (serializable).
    #[arg(long, default_value = "l", value_parser = ["l", "s"])]
    pub consistency: String,
    /// Keys per range ([k, k+span)); 1 reads a single key.
    #[arg(long, default_value_t = 1)]
    pub span: u64,
    #[arg(long, default_value_t = 0)]
    pub limit: i64,
    #[arg(long)]
    pub keys_only: bool,
    #[arg(long)]
    pub count_only: bool,
}

#[derive(Clone, Debug)]
pub enum KvOp {
    Put,
    Range(RangeArgs),
    TxnPut { ops: u32 },
    TxnMixed { range: RangeArgs, rw_ratio: f64 },
}

#[derive(Clone, Debug)]
pub struct KvWorkload {
    pub load: KvArgs,
    pub op: KvOp,
    /// Appended to the label (e.g. the dataset size).
    pub tag: String,
    /// First key index of sequential keys (a preload that extends a dataset).
    pub key_offset: u64,
}

impl KvWorkload {
    pub fn new(load: KvArgs, op: KvOp) -> KvWorkload {
        KvWorkload {
            load,
            op,
            tag: String::new(),
            key_offset: 0,
        }
    }
}

pub fn workload_put(load: KvArgs) -> Workload {
    Workload::Kv(KvWorkload::new(load, KvOp::Put))
}

pub fn workload_range(load: KvArgs, range: RangeArgs) -> Workload {
    Workload::Kv(KvWorkload::new(load, KvOp::Range(range)))
}

pub fn workload_txn_put(load: KvArgs, ops: u32) -> Workload {
    Workload::Kv(KvWorkload::new(load, KvOp::TxnPut { ops: ops.max(1) }))
}

pub fn workload_txn_mixed(load: KvArgs, range: RangeArgs, rw_ratio: f64) -> Workload {
    Workload::Kv(KvWorkload::new(
        load,
        KvOp::TxnMixed {
            range,
            rw_ratio: rw_ratio.max(0.0),
        },
    ))
}

impl KvWorkload {
    pub fn name(&self) -> &'static str {
        match &self.op {
            KvOp::Put => "put",
            KvOp::Range(r) if r.consistency == "s" => "range-s",
            KvOp::Range(_) => "range-l",
            KvOp::TxnPut { .. } => "txn-put",
            KvOp::TxnMixed { .. } => "txn-mixed",
        }
    }

    pub fn label(&self) -> String {
        let clients = match self.load.clients {
            1 => "1 client".to_string(),
            n => format!("{n} clients"),
        };
        let what = match &self.op {
            KvOp::Put => "put".to_string(),
            KvOp::Range(r) => format!("range {}", r.consistency),
            KvOp::TxnPut { ops } => format!("txn-put ×{ops}"),
            KvOp::TxnMixed { range, rw_ratio } => {
                format!("txn-mixed {rw_ratio}:1 {}", range.consistency)
            }
        };
        if self.tag.is_empty() {
            format!("{what}, {clients}")
        } else {
            format!("{what}, {clients}, {}", self.tag)
        }
    }

    pub fn params(&self) -> serde_json::Value {
        let l = &self.load;
        let mut v = serde_json::json!({
            "clients": l.clients, "conns": l.conns, "total": self.expected(),
            "duration_s": l.duration.map(|d| d.as_secs_f64()), "rate": l.rate,
            "key_size": l.key_size, "val_size": l.val_size, "key_space": l.key_space_size,
            "sequential_keys": l.sequential_keys,
        });
        let range = match &self.op {
            KvOp::Range(r) => Some(r),
            KvOp::TxnMixed { range, rw_ratio } => {
                v["rw_ratio"] = (*rw_ratio).into();
                Some(range)
            }
            KvOp::TxnPut { ops } => {
                v["txn_ops"] = (*ops).into();
                None
            }
            KvOp::Put => None,
        };
        if let Some(r) = range {
            v["consistency"] = r.consistency.clone().into();
            v["span"] = r.span.into();
            v["limit"] = r.limit.into();
            v["keys_only"] = r.keys_only.into();
            v["count_only"] = r.count_only.into();
        }
        v
    }

    pub fn expected(&self) -> Option<u64> {
        match (self.load.total, self.load.duration) {
            (Some(t), _) => Some(t),
            (None, Some(_)) => None,
            (None, None) => Some(10_000),
        }
    }

    pub fn key_space(&self) -> u64 {
        self.load.key_space_size
    }
    pub fn key_size(&self) -> usize {
        self.load.key_size
    }
    pub fn val_size(&self) -> usize {
        self.load.val_size
    }

    pub fn run(
        &self,
        target: Target,
        endpoints: &str,
        done: &Arc<AtomicU64>,
    ) -> Result<Outcome, String> {
        run_threads(self, target, endpoints, done)
    }
}

/// Loads keys `from..to` (sequentially, 100 clients) into the system behind `place`, so
/// read figures compare like with like.
pub fn preload(
    place: &Place,
    from: u64,
    to: u64,
    key_size: usize,
    val_size: usize,
) -> Result<(), String> {
    assert!(from <= to);
    let keys = to - from;
    if keys == 0 {
        return Ok(());
    }
    let mut w = KvWorkload::new(
        KvArgs {
            clients: 100.min(keys),
            conns: 10,
            total: Some(keys),
            duration: None,
            rate: 0,
            key_size,
            val_size,
            key_space_size: to,
            sequential_keys: true,
            threads: None,
        },
        KvOp::Put,
    );
    w.key_offset = from;
    let done = Arc::new(AtomicU64::new(0));
    let o = w.run(place.target, &place.endpoints, &done)?;
    if o.errors > 0 {
        return Err(format!(
            "preload of {keys} keys into {}: {} errors (first: {})",
            place.target.name(),
            o.errors,
            o.first_error.unwrap_or_default()
        ));
    }
    assert_eq!(o.ok, keys, "every preload put answered");
    Ok(())
}

fn key_of(i: u64, size: usize) -> Vec<u8> {
    let s = format!("{i:0size$}");
    s.as_bytes()[s.len().saturating_sub(size)..].to_vec()
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// One request in the internal model; the gRPC path converts it to etcd's messages.
enum Req {
    Put(PutRequest),
    Range(RangeRequest),
    Txn(TxnRequest),
}

/// Per-client request generator.
struct Gen {
    op: KvOp,
    rng: u64,
    /// Next sequential key index and the stride between this client's keys.
    seq: u64,
    stride: u64,
    sequential: bool,
    key_space: u64,
    key_size: usize,
    value: Vec<u8>,
}

impl Gen {
    fn key_index(&mut self) -> u64 {
        if self.sequential {
            let k = self.seq % self.key_space;
            self.seq += self.stride;
            k
        } else {
            xorshift(&mut self.rng) % self.key_space
        }
    }

    fn range(&mut self, r: &RangeArgs) -> RangeRequest {
        let i = self.key_index();
        RangeRequest {
            key: key_of(i, self.key_size),
            range_end: if r.span > 1 {
                key_of(i + r.span, self.key_size)
            } else {
                Vec::new()
            },
            limit: r.limit,
            serializable: r.consistency == "s",
            keys_only: r.keys_only,
            count_only: r.count_only,
            ..Default::default()
        }
    }

    fn put(&mut self) -> PutRequest {
        PutRequest {
            key: key_of(self.key_index(), self.key_size),
            value: self.value.clone(),
            ..Default::default()
        }
    }

    fn next(&mut self) -> Req {
        match self.op.clone() {
            KvOp::Put => Req::Put(self.put()),
            KvOp::Range(r) => Req::Range(self.range(&r)),
            KvOp::TxnPut { ops } => Req::Txn(TxnRequest {
                compare: Vec::new(),
                success: (0..ops).map(|_| RequestOp::Put(self.put())).collect(),
                failure: Vec::new(),
            }),
            KvOp::TxnMixed { range, rw_ratio } => {
                // A read with probability rw_ratio / (rw_ratio + 1).
                let draw = (xorshift(&mut self.rng) % 1_000_000) as f64 / 1e6;
                let op = if draw < rw_ratio / (rw_ratio + 1.0) {
                    RequestOp::Range(self.range(&range))
                } else {
                    RequestOp::Put(self.put())
                };
                Req::Txn(TxnRequest {
                    compare: Vec::new(),
                    success: vec![op],
                    failure: Vec::new(),
                })
            }
        }
    }
}

fn put_pb(p: PutRequest) -> pb::PutRequest {
    pb::PutRequest {
        key: p.key,
        value: p.value,
        ..Default::default()
    }
}

fn range_pb(r: RangeRequest) -> pb::RangeRequest {
    pb::RangeRequest {
        key: r.key,
        range_end: r.range_end,
        limit: r.limit,
        serializable: r.serializable,
        keys_only: r.keys_only,
        count_only: r.count_only,
        ..Default::default()
    }
}

fn txn_pb(t: TxnRequest) -> pb::TxnRequest {
    use pb::request_op::Request;
    let op = |o: RequestOp| pb::RequestOp {
        request: match o {
            RequestOp::Put(p) => Some(Request::RequestPut(put_pb(p))),
            RequestOp::Range(r) => Some(Request::RequestRange(range_pb(r))),
            // The generator makes only puts and ranges.
            RequestOp::DeleteRange(_) | RequestOp::Txn(_) => None,
        },
    };
    pb::TxnRequest {
        compare: Vec::new(),
        success: t.success.into_iter().map(op).collect(),
        failure: Vec::new(),
    }
}

/// One client's share of the run.
struct ClientPlan {
    index: u64,
    /// Requests to make (u64::MAX: until the deadline).
    quota: u64,
    deadline: Instant,
    /// Gap between this client's requests under --rate.
    interval: Option<Duration>,
}

struct ClientResult {
    hist: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

/// Runs one client: requests from `gen`, executed by `exec`, paced by `sleep`.
async fn client_loop<E, EF, S, SF>(
    plan: ClientPlan,
    mut gen: Gen,
    done: Arc<AtomicU64>,
    mut exec: E,
    sleep: S,
) -> ClientResult
where
    E: FnMut(Req) -> EF,
    EF: std::future::Future<Output = Result<(), String>>,
    S: Fn(Duration) -> SF,
    SF: std::future::Future<Output = ()>,
{
    let mut r = ClientResult {
        hist: new_histogram(),
        errors: 0,
        first_error: None,
    };
    let began = Instant::now();
    let mut n = 0u64;
    while n < plan.quota && !stopped() && Instant::now() < plan.deadline {
        if let Some(gap) = plan.interval {
            let due = began + gap.mul_f64(n as f64);
            let now = Instant::now();
            if due > now {
                sleep(due - now).await;
            }
        }
        let req = gen.next();
        let start = Instant::now();
        match exec(req).await {
            Ok(()) => {
                let _ = r.hist.record((start.elapsed().as_micros() as u64).max(1));
            }
            Err(e) => {
                r.errors += 1;
                r.first_error.get_or_insert(e);
            }
        }
        n += 1;
        done.fetch_add(1, Ordering::Relaxed);
    }
    assert!(n <= plan.quota);
    r
}

fn share(x: u64, parts: u64, i: u64) -> u64 {
    x / parts + u64::from(i < x % parts)
}

fn run_threads(
    w: &KvWorkload,
    target: Target,
    endpoints: &str,
    done: &Arc<AtomicU64>,
) -> Result<Outcome, String> {
    let l = &w.load;
    if l.clients == 0 || l.conns == 0 || l.key_space_size == 0 {
        return Err("--clients, --conns and --key-space-size must be at least 1".into());
    }
    let threads = l
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, l.conns as usize) as u64;
    let deadline = Instant::now() + l.duration.unwrap_or(MAX_RUN);
    let total = w.expected();
    let started = Instant::now();
    let mut handles = Vec::new();
    let mut first_client = 0;
    let mut first_conn = 0;
    for t in 0..threads {
        let (conns, clients) = (share(l.conns, threads, t), share(l.clients, threads, t));
        let mut plans = Vec::new();
        for c in first_client..first_client + clients {
            plans.push(ClientPlan {
                index: c,
                quota: total.map_or(u64::MAX, |n| share(n, l.clients, c)),
                deadline,
                interval: (l.rate > 0)
                    .then(|| Duration::from_secs_f64(l.clients as f64 / l.rate as f64)),
            });
        }
        let gens: Vec<Gen> = plans
            .iter()
            .map(|p| Gen {
                op: w.op.clone(),
                rng: 0x1234_5678_9abc_def1 ^ (p.index + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                seq: w.key_offset + p.index,
                stride: l.clients,
                sequential: l.sequential_keys,
                key_space: l.key_space_size,
                key_size: l.key_size,
                value: vec![b'v'; l.val_size],
            })
            .collect();
        let eps: Vec<String> = (first_conn..first_conn + conns)
            .map(|i| grpc_url_n(endpoints, i as usize))
            .collect();
        let done = done.clone();
        handles.push(std::thread::spawn(move || {
            if target.is_native() {
                thread_native(eps, plans, gens, done)
            } else {
                thread_grpc(eps, plans, gens, done)
            }
        }));
        first_client += clients;
        first_conn += conns;
    }
    assert_eq!(first_client, l.clients);
    let mut hist = new_histogram();
    let (mut errors, mut first_error) = (0, None);
    for h in handles {
        let rs = h.join().map_err(|_| "load thread panicked".to_string())??;
        for r in rs {
            hist.add(&r.hist).map_err(|e| e.to_string())?;
            errors += r.errors;
            if first_error.is_none() {
                first_error = r.first_error;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Outcome {
        ok: hist.len(),
        per_s: hist.len() as f64 / seconds.max(1e-9),
        hist,
        errors,
        first_error,
        seconds,
        extra: serde_json::Value::Null,
    })
}

/// A load thread speaking gRPC: tonic on a current-thread tokio runtime.
fn thread_grpc(
    urls: Vec<String>,
    plans: Vec<ClientPlan>,
    gens: Vec<Gen>,
    done: Arc<AtomicU64>,
) -> Result<Vec<ClientResult>, String> {
    use pb::kv_client::KvClient;
    let rt = crate::tokio_runtime()?;
    rt.block_on(async move {
        let mut conns = Vec::new();
        for url in &urls {
            conns.push(crate::h2conn::connect(url).await?);
        }
        let mut tasks = Vec::new();
        for (i, (plan, gen)) in plans.into_iter().zip(gens).enumerate() {
            let (conn, origin) = conns[i % conns.len()].clone();
            let client = KvClient::with_origin(conn, origin);
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                let exec = |req: Req| {
                    let mut c = client.clone();
                    async move {
                        let r = match req {
                            Req::Put(p) => c.put(put_pb(p)).await.map(|_| ()),
                            Req::Range(r) => c.range(range_pb(r)).await.map(|_| ()),
                            Req::Txn(t) => c.txn(txn_pb(t)).await.map(|_| ()),
                        };
                        r.map_err(|s| format!("{:?}: {}", s.code(), s.message()))
                    }
                };
                client_loop(plan, gen, done, exec, tokio::time::sleep).await
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.map_err(|e| e.to_string())?);
        }
        Ok(out)
    })
}

/// A load thread speaking corekv's native protocol on a glommio executor.
fn thread_native(
    eps: Vec<String>,
    plans: Vec<ClientPlan>,
    gens: Vec<Gen>,
    done: Arc<AtomicU64>,
) -> Result<Vec<ClientResult>, String> {
    use corekv::client::Client;
    corekv::client::block_on(move || async move {
        let mut conns = Vec::new();
        for ep in &eps {
            let addr = ep.trim_start_matches("http://");
            conns.push(Rc::new(
                Client::connect(addr)
                    .await
                    .map_err(|e| format!("dial {addr}: {e}"))?,
            ));
        }
        let mut tasks = Vec::new();
        for (i, (plan, gen)) in plans.into_iter().zip(gens).enumerate() {
            let client = conns[i % conns.len()].clone();
            let done = done.clone();
            tasks.push(glommio::spawn_local(async move {
                let exec = |req: Req| {
                    let c = client.clone();
                    async move {
                        let r = match req {
                            Req::Put(p) => c.put(&p).await.map(|_| ()),
                            Req::Range(r) => c.range(&r).await.map(|_| ()),
                            Req::Txn(t) => c.txn(&t).await.map(|_| ()),
                        };
                        r.map_err(|e| e.to_string())
                    }
                };
                client_loop(plan, gen, done, exec, glommio::timer::sleep).await
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await);
        }
        Ok(out)
    })?
}
