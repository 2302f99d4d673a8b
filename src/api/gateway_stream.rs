//! The JSON gateway's lease and watch routes, as etcd 3.4's grpc-gateway serves them:
//! POST /v3/lease/{grant,revoke,timetolive,leases,keepalive} (revoke, timetolive and
//! leases also under /v3/kv/lease/*), POST /v3/watch, whose answer is a stream of
//! `{"result": WatchResponse}` lines kept open until the client disconnects, and the
//! lock / election routes (/v3/lock/{lock,unlock}, /v3/election/{campaign,proclaim,
//! leader,resign}), and the streamed /v3/election/observe and /v3/maintenance/snapshot.

use super::gateway::{
    authed, b64, boolean, bytes, error, header_json, int, kv_json, ok, parse, put_nz, s64, Obj,
};
use super::v3rpc::Gateway;
use super::v3watch::{to_pb, CloseOnDrop, NEXT_STREAM};
use crate::actors::bridge::{BridgeRequest, WatchCmd};
use crate::actors::watch::{WatchSpec, STREAM_BUFFER};
use crate::etcdpb::etcdserverpb as pb;
use crate::etcdpb::etcdserverpb::lease_server::Lease;
use crate::etcdpb::v3electionpb as epb;
use crate::etcdpb::v3electionpb::election_server::Election;
use crate::etcdpb::v3lockpb as lpb;
use crate::etcdpb::v3lockpb::lock_server::Lock;
use crate::model::PermType;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use std::sync::atomic::Ordering;

pub fn routes() -> axum::Router<Gateway> {
    axum::Router::new()
        .route("/v3/lease/grant", post(grant))
        .route("/v3/lease/revoke", post(revoke))
        .route("/v3/kv/lease/revoke", post(revoke))
        .route("/v3/lease/timetolive", post(time_to_live))
        .route("/v3/kv/lease/timetolive", post(time_to_live))
        .route("/v3/lease/leases", post(leases))
        .route("/v3/kv/lease/leases", post(leases))
        .route("/v3/lease/keepalive", post(keepalive))
        .route("/v3/watch", post(watch))
        .route("/v3/lock/lock", post(lock))
        .route("/v3/lock/unlock", post(unlock))
        .route("/v3/election/campaign", post(campaign))
        .route("/v3/election/proclaim", post(proclaim))
        .route("/v3/election/leader", post(leader))
        .route("/v3/election/resign", post(resign))
        .route("/v3/election/observe", post(observe))
        .route("/v3/maintenance/snapshot", post(snapshot))
}

fn leader_key(m: &Obj) -> Result<Option<epb::LeaderKey>, tonic::Status> {
    Ok(match super::gateway::field_obj(m, "leader") {
        None => None,
        Some(l) => Some(epb::LeaderKey {
            name: bytes(l, "name")?,
            key: bytes(l, "key")?,
            rev: int(l, "rev")?,
            lease: int(l, "lease")?,
        }),
    })
}

fn leader_key_json(l: &epb::LeaderKey) -> Value {
    let mut o = Obj::new();
    put_nz(&mut o, "name", b64(&l.name));
    put_nz(&mut o, "key", b64(&l.key));
    put_nz(&mut o, "rev", s64(l.rev));
    put_nz(&mut o, "lease", s64(l.lease));
    Value::Object(o)
}

async fn lock(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body).and_then(|m| {
        Ok(lpb::LockRequest {
            name: bytes(&m, "name")?,
            lease: int(&m, "lease")?,
        })
    }) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Lock::lock(&g, authed(&headers, req)).await {
        Ok(r) => {
            let r = r.get_ref();
            let mut o = with_header(&r.header);
            put_nz(&mut o, "key", b64(&r.key));
            ok(Value::Object(o))
        }
        Err(e) => error(e),
    }
}

async fn unlock(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body).and_then(|m| {
        Ok(lpb::UnlockRequest {
            key: bytes(&m, "key")?,
        })
    }) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Lock::unlock(&g, authed(&headers, req)).await {
        Ok(r) => ok(Value::Object(with_header(&r.get_ref().header))),
        Err(e) => error(e),
    }
}

async fn campaign(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body).and_then(|m| {
        Ok(epb::CampaignRequest {
            name: bytes(&m, "name")?,
            lease: int(&m, "lease")?,
            value: bytes(&m, "value")?,
        })
    }) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Election::campaign(&g, authed(&headers, req)).await {
        Ok(r) => {
            let r = r.get_ref();
            let mut o = with_header(&r.header);
            if let Some(l) = &r.leader {
                o.insert("leader".into(), leader_key_json(l));
            }
            ok(Value::Object(o))
        }
        Err(e) => error(e),
    }
}

async fn proclaim(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body).and_then(|m| {
        Ok(epb::ProclaimRequest {
            leader: leader_key(&m)?,
            value: bytes(&m, "value")?,
        })
    }) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Election::proclaim(&g, authed(&headers, req)).await {
        Ok(r) => ok(Value::Object(with_header(&r.get_ref().header))),
        Err(e) => error(e),
    }
}

async fn leader(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body).and_then(|m| {
        Ok(epb::LeaderRequest {
            name: bytes(&m, "name")?,
        })
    }) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Election::leader(&g, authed(&headers, req)).await {
        Ok(r) => {
            let r = r.get_ref();
            let mut o = with_header(&r.header);
            if let Some(kv) = &r.kv {
                o.insert("kv".into(), kv_json(kv));
            }
            ok(Value::Object(o))
        }
        Err(e) => error(e),
    }
}

async fn resign(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body).and_then(|m| {
        Ok(epb::ResignRequest {
            leader: leader_key(&m)?,
        })
    }) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Election::resign(&g, authed(&headers, req)).await {
        Ok(r) => ok(Value::Object(with_header(&r.get_ref().header))),
        Err(e) => error(e),
    }
}

fn with_header(h: &Option<pb::ResponseHeader>) -> Obj {
    let mut o = Obj::new();
    header_json(&mut o, h);
    o
}

async fn grant(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body).and_then(|m| {
        Ok(pb::LeaseGrantRequest {
            ttl: int(&m, "TTL")?,
            id: int(&m, "ID")?,
        })
    }) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Lease::lease_grant(&g, authed(&headers, req)).await {
        Ok(r) => {
            let r = r.get_ref();
            let mut o = with_header(&r.header);
            put_nz(&mut o, "ID", s64(r.id));
            put_nz(&mut o, "TTL", s64(r.ttl));
            ok(Value::Object(o))
        }
        Err(e) => error(e),
    }
}

async fn revoke(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body).and_then(|m| Ok(pb::LeaseRevokeRequest { id: int(&m, "ID")? })) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Lease::lease_revoke(&g, authed(&headers, req)).await {
        Ok(r) => ok(Value::Object(with_header(&r.get_ref().header))),
        Err(e) => error(e),
    }
}

async fn time_to_live(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body).and_then(|m| {
        Ok(pb::LeaseTimeToLiveRequest {
            id: int(&m, "ID")?,
            keys: boolean(&m, "keys")?,
        })
    }) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Lease::lease_time_to_live(&g, authed(&headers, req)).await {
        Ok(r) => {
            let r = r.get_ref();
            let mut o = with_header(&r.header);
            put_nz(&mut o, "ID", s64(r.id));
            put_nz(&mut o, "TTL", s64(r.ttl));
            put_nz(&mut o, "grantedTTL", s64(r.granted_ttl));
            put_nz(
                &mut o,
                "keys",
                Value::Array(r.keys.iter().map(|k| b64(k)).collect()),
            );
            ok(Value::Object(o))
        }
        Err(e) => error(e),
    }
}

async fn leases(State(g): State<Gateway>, headers: HeaderMap) -> Response {
    match Lease::lease_leases(&g, authed(&headers, pb::LeaseLeasesRequest {})).await {
        Ok(r) => {
            let r = r.get_ref();
            let mut o = with_header(&r.header);
            let ids: Vec<Value> = r
                .leases
                .iter()
                .map(|l| {
                    let mut m = Obj::new();
                    put_nz(&mut m, "ID", s64(l.id));
                    Value::Object(m)
                })
                .collect();
            put_nz(&mut o, "leases", Value::Array(ids));
            ok(Value::Object(o))
        }
        Err(e) => error(e),
    }
}

/// A streamed answer: one `{"result": ...}` JSON object per line.
fn stream_response(lines: impl futures::Stream<Item = Value> + Send + 'static) -> Response {
    let body = lines.map(|v| {
        Ok::<_, std::convert::Infallible>(format!("{}\n", serde_json::json!({ "result": v })))
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| error(tonic::Status::internal("building the response")))
}

/// A server stream as grpc-gateway writes it: `{"result": ...}` per message, and a final
/// `{"error": ...}` line if the stream fails.
fn stream_results<T, F>(
    items: impl futures::Stream<Item = Result<T, tonic::Status>> + Send + 'static,
    to_json: F,
) -> Response
where
    F: Fn(&T) -> Value + Send + 'static,
{
    let body = items.map(move |item| {
        let line = match item {
            Ok(v) => serde_json::json!({ "result": to_json(&v) }),
            Err(s) => serde_json::json!({"error": {
                "grpc_code": s.code() as i32, "message": s.message(),
            }}),
        };
        Ok::<_, std::convert::Infallible>(format!("{line}\n"))
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| error(tonic::Status::internal("building the response")))
}

async fn observe(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body).and_then(|m| {
        Ok(epb::LeaderRequest {
            name: bytes(&m, "name")?,
        })
    }) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Election::observe(&g, authed(&headers, req)).await {
        Ok(r) => stream_results(r.into_inner(), |resp: &epb::LeaderResponse| {
            let mut o = with_header(&resp.header);
            if let Some(kv) = &resp.kv {
                o.insert("kv".into(), kv_json(kv));
            }
            Value::Object(o)
        }),
        Err(e) => error(e),
    }
}

async fn snapshot(State(g): State<Gateway>, headers: HeaderMap) -> Response {
    use crate::etcdpb::etcdserverpb::maintenance_server::Maintenance;
    match Maintenance::snapshot(&g, authed(&headers, pb::SnapshotRequest {})).await {
        Ok(r) => stream_results(r.into_inner(), |resp: &pb::SnapshotResponse| {
            let mut o = with_header(&resp.header);
            put_nz(&mut o, "remaining_bytes", s64(resp.remaining_bytes));
            put_nz(&mut o, "blob", b64(&resp.blob));
            Value::Object(o)
        }),
        Err(e) => error(e),
    }
}

/// One keepalive per request body (grpc-gateway reads one message, answers, and ends).
async fn keepalive(State(g): State<Gateway>, body: Bytes) -> Response {
    let id = match parse(&body).and_then(|m| int(&m, "ID")) {
        Ok(id) => id,
        Err(e) => return error(e),
    };
    match g.keepalive_once(id).await {
        Ok(r) => {
            let mut o = with_header(&r.header);
            put_nz(&mut o, "ID", s64(r.id));
            put_nz(&mut o, "TTL", s64(r.ttl));
            stream_response(futures::stream::iter([Value::Object(o)]))
        }
        Err(e) => error(e),
    }
}

fn watch_json(r: &pb::WatchResponse) -> Value {
    let mut o = with_header(&r.header);
    put_nz(&mut o, "watch_id", s64(r.watch_id));
    put_nz(&mut o, "created", Value::Bool(r.created));
    put_nz(&mut o, "canceled", Value::Bool(r.canceled));
    put_nz(&mut o, "compact_revision", s64(r.compact_revision));
    put_nz(
        &mut o,
        "cancel_reason",
        Value::String(r.cancel_reason.clone()),
    );
    put_nz(&mut o, "fragment", Value::Bool(r.fragment));
    let events: Vec<Value> = r
        .events
        .iter()
        .map(|e| {
            let mut m = Obj::new();
            if e.r#type == 1 {
                m.insert("type".into(), Value::String("DELETE".into()));
            }
            if let Some(kv) = &e.kv {
                m.insert("kv".into(), kv_json(kv));
            }
            if let Some(kv) = &e.prev_kv {
                m.insert("prev_kv".into(), kv_json(kv));
            }
            Value::Object(m)
        })
        .collect();
    put_nz(&mut o, "events", Value::Array(events));
    Value::Object(o)
}

fn watch_spec(m: &Obj) -> Result<WatchSpec, tonic::Status> {
    let create = match super::gateway::field_obj(m, "create_request") {
        Some(c) => c,
        None => {
            return Err(tonic::Status::invalid_argument(
                "watch: create_request is required",
            ))
        }
    };
    let filters = match create.get("filters") {
        Some(Value::Array(a)) => a.clone(),
        _ => Vec::new(),
    };
    let has = |name: &str, n: i64| {
        filters
            .iter()
            .any(|f| f.as_str() == Some(name) || f.as_i64() == Some(n))
    };
    Ok(WatchSpec {
        key: bytes(create, "key")?,
        range_end: bytes(create, "range_end")?,
        start_rev: int(create, "start_revision")?,
        watch_id: int(create, "watch_id")?,
        prev_kv: boolean(create, "prev_kv")?,
        progress_notify: boolean(create, "progress_notify")?,
        fragment: boolean(create, "fragment")?,
        no_put: has("NOPUT", 0),
        no_delete: has("NODELETE", 1),
    })
}

/// POST /v3/watch {"create_request": {...}}: the watch's responses as a line stream.
async fn watch(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let spec = match parse(&body).and_then(|m| watch_spec(&m)) {
        Ok(s) => s,
        Err(e) => return error(e),
    };
    let who = match g.caller(&authed(&headers, ())).await {
        Ok(w) => w,
        Err(e) => return error(e),
    };
    let key: &[u8] = if spec.key.is_empty() { &[0] } else { &spec.key };
    let create = match g.check_range(&who, key, &spec.range_end, PermType::Read) {
        Ok(()) => WatchCmd::Create(spec),
        Err(e) => WatchCmd::Refuse(spec.watch_id, super::v3watch::grpc_error_text(&e)),
    };
    let stream = NEXT_STREAM.fetch_add(1, Ordering::Relaxed);
    let mut bridge = g.shard_sender(g.pick_shard());
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let opened = bridge
        .send(BridgeRequest::Watch(stream, WatchCmd::Open(tx)))
        .await
        .is_ok()
        && bridge
            .send(BridgeRequest::Watch(stream, create))
            .await
            .is_ok();
    if !opened {
        return error(tonic::Status::unavailable("etcdserver: server stopped"));
    }
    let guard = CloseOnDrop { stream, bridge };
    let max_bytes = g.max_request_bytes();
    let lines = rx.flat_map(move |m| {
        let _keep = &guard;
        futures::stream::iter(to_pb(m, max_bytes).into_iter().map(|r| watch_json(&r)))
    });
    stream_response(lines)
}
