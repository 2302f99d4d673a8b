//! etcd's HTTP/JSON gateway (grpc-gateway) on the gRPC port: POST /v3/kv/*,
//! /v3/maintenance/{status,alarm,hash,hashkv,defragment,transfer-leadership},
//! /v3/cluster/member/{list,add,remove,update,promote}, and GET /health, /version.
//! Requests are decoded from JSON the way grpc-gateway does (snake_case or camelCase
//! names, 64-bit integers as numbers or strings, bytes as base64), handed to the same
//! service methods the gRPC server uses, and answered in etcd's JSON: original field
//! names, 64-bit integers as strings, zero values omitted.

use super::v3rpc::{Gateway, ETCD_API_VERSION};
use crate::etcdpb::etcdserverpb as pb;
use crate::etcdpb::etcdserverpb::{
    cluster_server::Cluster, kv_server::Kv, maintenance_server::Maintenance,
};
use crate::etcdpb::mvccpb;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde_json::{json, Map, Value};

pub(super) type Obj = Map<String, Value>;

pub fn router(g: Gateway) -> axum::Router {
    axum::Router::new()
        .route("/v3/kv/range", post(range))
        .route("/v3/kv/put", post(put))
        .route("/v3/kv/deleterange", post(delete_range))
        .route("/v3/kv/txn", post(txn))
        .route("/v3/kv/compaction", post(compaction))
        .route("/v3/maintenance/status", post(status))
        .route("/v3/maintenance/alarm", post(alarm))
        .route("/v3/maintenance/hash", post(hash))
        .route("/v3/maintenance/defragment", post(defragment))
        .route("/v3/maintenance/hashkv", post(hash_kv))
        .route("/v3/cluster/member/list", post(member_list))
        .route("/v3/cluster/member/add", post(member_add))
        .route("/v3/cluster/member/remove", post(member_remove))
        .route("/v3/cluster/member/update", post(member_update))
        .route("/v3/cluster/member/promote", post(member_promote))
        .route("/v3/maintenance/transfer-leadership", post(move_leader))
        .merge(super::gateway_stream::routes())
        .merge(super::gateway_auth::routes())
        .route("/health", get(health))
        .route("/version", get(version))
        .with_state(g)
}

/// A gRPC request carrying the HTTP `Authorization` header as its token, as grpc-gateway
/// forwards it.
pub(super) fn authed<T>(headers: &HeaderMap, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(v) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
    {
        req.metadata_mut().insert("token", v);
    }
    req
}

/// grpc-gateway's error body and HTTP status for a gRPC status.
pub(super) fn error(s: tonic::Status) -> Response {
    use tonic::Code::*;
    let http = match s.code() {
        InvalidArgument | OutOfRange => StatusCode::BAD_REQUEST,
        FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        NotFound => StatusCode::NOT_FOUND,
        ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Unauthenticated => StatusCode::UNAUTHORIZED,
        PermissionDenied => StatusCode::FORBIDDEN,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let body = json!({"error": s.message(), "message": s.message(), "code": s.code() as i32});
    (http, body.to_string()).into_response()
}

pub(super) fn ok(v: Value) -> Response {
    (StatusCode::OK, v.to_string()).into_response()
}

fn bad(msg: String) -> tonic::Status {
    tonic::Status::invalid_argument(msg)
}

pub(super) fn parse(body: &Bytes) -> Result<Obj, tonic::Status> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(bad("json: request body must be an object".into())),
        Err(e) => Err(bad(e.to_string())),
    }
}

fn camel(snake: &str) -> String {
    let mut out = String::new();
    let mut up = false;
    for c in snake.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// A nested object field by its proto or camelCase name.
/// A string field (absent: empty).
pub(super) fn string(m: &Obj, name: &str) -> Result<String, tonic::Status> {
    match field(m, name) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(bad(format!("{name}: expected a string"))),
    }
}

pub(super) fn field_obj<'a>(m: &'a Obj, name: &str) -> Option<&'a Obj> {
    match field(m, name) {
        Some(Value::Object(o)) => Some(o),
        _ => None,
    }
}

/// A field by its proto name or its camelCase JSON name.
fn field<'a>(m: &'a Obj, name: &str) -> Option<&'a Value> {
    m.get(name)
        .or_else(|| m.get(&camel(name)))
        .filter(|v| !v.is_null())
}

pub(super) fn bytes(m: &Obj, name: &str) -> Result<Vec<u8>, tonic::Status> {
    match field(m, name) {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => base64::engine::general_purpose::STANDARD
            .decode(s)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(s))
            .map_err(|e| bad(format!("bad base64 in {name}: {e}"))),
        Some(_) => Err(bad(format!("{name}: expected a base64 string"))),
    }
}

pub(super) fn int(m: &Obj, name: &str) -> Result<i64, tonic::Status> {
    match field(m, name) {
        None => Ok(0),
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| bad(format!("{name}: not an integer"))),
        Some(Value::String(s)) => s
            .parse()
            .map_err(|_| bad(format!("{name}: not an integer"))),
        Some(_) => Err(bad(format!("{name}: expected an integer"))),
    }
}

fn uint(m: &Obj, name: &str) -> Result<u64, tonic::Status> {
    match field(m, name) {
        None => Ok(0),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| bad(format!("{name}: not an integer"))),
        Some(Value::String(s)) => s
            .parse()
            .map_err(|_| bad(format!("{name}: not an integer"))),
        Some(_) => Err(bad(format!("{name}: expected an integer"))),
    }
}

pub(super) fn boolean(m: &Obj, name: &str) -> Result<bool, tonic::Status> {
    match field(m, name) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad(format!("{name}: expected a boolean"))),
    }
}

/// An enum by name or number.
pub(super) fn enumeration(m: &Obj, name: &str, names: &[&str]) -> Result<i32, tonic::Status> {
    match field(m, name) {
        None => Ok(0),
        Some(Value::Number(n)) => Ok(n.as_i64().unwrap_or(0) as i32),
        Some(Value::String(s)) => names
            .iter()
            .position(|x| x.eq_ignore_ascii_case(s))
            .map(|i| i as i32)
            .ok_or_else(|| bad(format!("{name}: unknown value {s:?}"))),
        Some(_) => Err(bad(format!("{name}: expected an enum name"))),
    }
}

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a Obj, tonic::Status> {
    v.as_object()
        .ok_or_else(|| bad(format!("{what}: expected an object")))
}

fn range_req(m: &Obj) -> Result<pb::RangeRequest, tonic::Status> {
    Ok(pb::RangeRequest {
        key: bytes(m, "key")?,
        range_end: bytes(m, "range_end")?,
        limit: int(m, "limit")?,
        revision: int(m, "revision")?,
        sort_order: enumeration(m, "sort_order", &["NONE", "ASCEND", "DESCEND"])?,
        sort_target: enumeration(
            m,
            "sort_target",
            &["KEY", "VERSION", "CREATE", "MOD", "VALUE"],
        )?,
        serializable: boolean(m, "serializable")?,
        keys_only: boolean(m, "keys_only")?,
        count_only: boolean(m, "count_only")?,
        min_mod_revision: int(m, "min_mod_revision")?,
        max_mod_revision: int(m, "max_mod_revision")?,
        min_create_revision: int(m, "min_create_revision")?,
        max_create_revision: int(m, "max_create_revision")?,
    })
}

fn put_req(m: &Obj) -> Result<pb::PutRequest, tonic::Status> {
    Ok(pb::PutRequest {
        key: bytes(m, "key")?,
        value: bytes(m, "value")?,
        lease: int(m, "lease")?,
        prev_kv: boolean(m, "prev_kv")?,
        ignore_value: boolean(m, "ignore_value")?,
        ignore_lease: boolean(m, "ignore_lease")?,
    })
}

fn delete_req(m: &Obj) -> Result<pb::DeleteRangeRequest, tonic::Status> {
    Ok(pb::DeleteRangeRequest {
        key: bytes(m, "key")?,
        range_end: bytes(m, "range_end")?,
        prev_kv: boolean(m, "prev_kv")?,
    })
}

fn compare(m: &Obj) -> Result<pb::Compare, tonic::Status> {
    use pb::compare::TargetUnion as U;
    let target = enumeration(m, "target", &["VERSION", "CREATE", "MOD", "VALUE", "LEASE"])?;
    let union = if field(m, "version").is_some() {
        Some(U::Version(int(m, "version")?))
    } else if field(m, "create_revision").is_some() {
        Some(U::CreateRevision(int(m, "create_revision")?))
    } else if field(m, "mod_revision").is_some() {
        Some(U::ModRevision(int(m, "mod_revision")?))
    } else if field(m, "value").is_some() {
        Some(U::Value(bytes(m, "value")?))
    } else if field(m, "lease").is_some() {
        Some(U::Lease(int(m, "lease")?))
    } else {
        None
    };
    Ok(pb::Compare {
        result: enumeration(m, "result", &["EQUAL", "GREATER", "LESS", "NOT_EQUAL"])?,
        target,
        key: bytes(m, "key")?,
        range_end: bytes(m, "range_end")?,
        target_union: union,
    })
}

const MAX_TXN_DEPTH: u32 = 64;

fn request_op(m: &Obj, depth: u32) -> Result<pb::RequestOp, tonic::Status> {
    use pb::request_op::Request as R;
    let request = if let Some(v) = field(m, "request_range") {
        R::RequestRange(range_req(object(v, "request_range")?)?)
    } else if let Some(v) = field(m, "request_put") {
        R::RequestPut(put_req(object(v, "request_put")?)?)
    } else if let Some(v) = field(m, "request_delete_range") {
        R::RequestDeleteRange(delete_req(object(v, "request_delete_range")?)?)
    } else if let Some(v) = field(m, "request_txn") {
        R::RequestTxn(txn_req(object(v, "request_txn")?, depth + 1)?)
    } else {
        return Err(bad(
            "request op: expected request_range, request_put, request_delete_range or request_txn"
                .into(),
        ));
    };
    Ok(pb::RequestOp {
        request: Some(request),
    })
}

pub(super) fn list<'a>(m: &'a Obj, name: &str) -> Result<Vec<&'a Obj>, tonic::Status> {
    match field(m, name) {
        None => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(|v| object(v, name)).collect(),
        Some(_) => Err(bad(format!("{name}: expected a list"))),
    }
}

fn txn_req(m: &Obj, depth: u32) -> Result<pb::TxnRequest, tonic::Status> {
    if depth > MAX_TXN_DEPTH {
        return Err(bad("etcdserver: txn nested too deeply".into()));
    }
    Ok(pb::TxnRequest {
        compare: list(m, "compare")?
            .into_iter()
            .map(compare)
            .collect::<Result<_, _>>()?,
        success: list(m, "success")?
            .into_iter()
            .map(|o| request_op(o, depth))
            .collect::<Result<_, _>>()?,
        failure: list(m, "failure")?
            .into_iter()
            .map(|o| request_op(o, depth))
            .collect::<Result<_, _>>()?,
    })
}

/// Inserts `v` unless it is a zero value (as etcd's JSON omits them).
pub(super) fn put_nz(m: &mut Obj, k: &str, v: Value) {
    let zero = match &v {
        Value::String(s) => s.is_empty() || s == "0",
        Value::Bool(b) => !b,
        Value::Array(a) => a.is_empty(),
        Value::Null => true,
        Value::Number(n) => n.as_i64() == Some(0),
        Value::Object(_) => false,
    };
    if !zero {
        m.insert(k.into(), v);
    }
}

pub(super) fn s64(v: impl ToString) -> Value {
    Value::String(v.to_string())
}

pub(super) fn b64(b: &[u8]) -> Value {
    Value::String(base64::engine::general_purpose::STANDARD.encode(b))
}

pub(super) fn header_json(m: &mut Obj, h: &Option<pb::ResponseHeader>) {
    if let Some(h) = h {
        let mut o = Obj::new();
        put_nz(&mut o, "cluster_id", s64(h.cluster_id));
        put_nz(&mut o, "member_id", s64(h.member_id));
        put_nz(&mut o, "revision", s64(h.revision));
        put_nz(&mut o, "raft_term", s64(h.raft_term));
        m.insert("header".into(), Value::Object(o));
    }
}

pub(super) fn kv_json(kv: &mvccpb::KeyValue) -> Value {
    let mut o = Obj::new();
    put_nz(&mut o, "key", b64(&kv.key));
    put_nz(&mut o, "create_revision", s64(kv.create_revision));
    put_nz(&mut o, "mod_revision", s64(kv.mod_revision));
    put_nz(&mut o, "version", s64(kv.version));
    put_nz(&mut o, "value", b64(&kv.value));
    put_nz(&mut o, "lease", s64(kv.lease));
    Value::Object(o)
}

fn range_json(r: &pb::RangeResponse) -> Value {
    let mut o = Obj::new();
    header_json(&mut o, &r.header);
    put_nz(
        &mut o,
        "kvs",
        Value::Array(r.kvs.iter().map(kv_json).collect()),
    );
    put_nz(&mut o, "more", Value::Bool(r.more));
    put_nz(&mut o, "count", s64(r.count));
    Value::Object(o)
}

fn put_json(r: &pb::PutResponse) -> Value {
    let mut o = Obj::new();
    header_json(&mut o, &r.header);
    if let Some(kv) = &r.prev_kv {
        o.insert("prev_kv".into(), kv_json(kv));
    }
    Value::Object(o)
}

fn delete_json(r: &pb::DeleteRangeResponse) -> Value {
    let mut o = Obj::new();
    header_json(&mut o, &r.header);
    put_nz(&mut o, "deleted", s64(r.deleted));
    put_nz(
        &mut o,
        "prev_kvs",
        Value::Array(r.prev_kvs.iter().map(kv_json).collect()),
    );
    Value::Object(o)
}

fn txn_json(r: &pb::TxnResponse) -> Value {
    use pb::response_op::Response as R;
    let mut o = Obj::new();
    header_json(&mut o, &r.header);
    put_nz(&mut o, "succeeded", Value::Bool(r.succeeded));
    let ops = r
        .responses
        .iter()
        .filter_map(|op| {
            Some(match op.response.as_ref()? {
                R::ResponseRange(x) => json!({ "response_range": range_json(x) }),
                R::ResponsePut(x) => json!({ "response_put": put_json(x) }),
                R::ResponseDeleteRange(x) => json!({ "response_delete_range": delete_json(x) }),
                R::ResponseTxn(x) => json!({ "response_txn": txn_json(x) }),
            })
        })
        .collect();
    put_nz(&mut o, "responses", Value::Array(ops));
    Value::Object(o)
}

async fn range(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body).and_then(|m| range_req(&m)) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Kv::range(&g, authed(&headers, req)).await {
        Ok(r) => ok(range_json(r.get_ref())),
        Err(e) => error(e),
    }
}

async fn put(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body).and_then(|m| put_req(&m)) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Kv::put(&g, authed(&headers, req)).await {
        Ok(r) => ok(put_json(r.get_ref())),
        Err(e) => error(e),
    }
}

async fn delete_range(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body).and_then(|m| delete_req(&m)) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Kv::delete_range(&g, authed(&headers, req)).await {
        Ok(r) => ok(delete_json(r.get_ref())),
        Err(e) => error(e),
    }
}

async fn txn(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body).and_then(|m| txn_req(&m, 0)) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Kv::txn(&g, authed(&headers, req)).await {
        Ok(r) => ok(txn_json(r.get_ref())),
        Err(e) => error(e),
    }
}

async fn compaction(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body).and_then(|m| {
        Ok(pb::CompactionRequest {
            revision: int(&m, "revision")?,
            physical: boolean(&m, "physical")?,
        })
    }) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Kv::compact(&g, authed(&headers, req)).await {
        Ok(r) => {
            let mut o = Obj::new();
            header_json(&mut o, &r.get_ref().header);
            ok(Value::Object(o))
        }
        Err(e) => error(e),
    }
}

async fn status(State(g): State<Gateway>, headers: HeaderMap) -> Response {
    match Maintenance::status(&g, authed(&headers, pb::StatusRequest {})).await {
        Ok(r) => {
            let s = r.get_ref();
            let mut o = Obj::new();
            header_json(&mut o, &s.header);
            put_nz(&mut o, "version", Value::String(s.version.clone()));
            put_nz(&mut o, "dbSize", s64(s.db_size));
            put_nz(&mut o, "leader", s64(s.leader));
            put_nz(&mut o, "raftIndex", s64(s.raft_index));
            put_nz(&mut o, "raftTerm", s64(s.raft_term));
            put_nz(&mut o, "raftAppliedIndex", s64(s.raft_applied_index));
            put_nz(&mut o, "errors", json!(s.errors));
            put_nz(&mut o, "dbSizeInUse", s64(s.db_size_in_use));
            put_nz(&mut o, "isLearner", Value::Bool(s.is_learner));
            ok(Value::Object(o))
        }
        Err(e) => error(e),
    }
}

async fn hash(State(g): State<Gateway>, headers: HeaderMap) -> Response {
    match Maintenance::hash(&g, authed(&headers, pb::HashRequest {})).await {
        Ok(r) => {
            let mut o = Obj::new();
            header_json(&mut o, &r.get_ref().header);
            put_nz(&mut o, "hash", json!(r.get_ref().hash));
            ok(Value::Object(o))
        }
        Err(e) => error(e),
    }
}

async fn defragment(State(g): State<Gateway>, headers: HeaderMap) -> Response {
    match Maintenance::defragment(&g, authed(&headers, pb::DefragmentRequest {})).await {
        Ok(r) => {
            let mut o = Obj::new();
            header_json(&mut o, &r.get_ref().header);
            ok(Value::Object(o))
        }
        Err(e) => error(e),
    }
}

async fn hash_kv(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body).and_then(|m| {
        Ok(pb::HashKvRequest {
            revision: int(&m, "revision")?,
        })
    }) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Maintenance::hash_kv(&g, authed(&headers, req)).await {
        Ok(r) => {
            let mut o = Obj::new();
            header_json(&mut o, &r.get_ref().header);
            put_nz(&mut o, "hash", json!(r.get_ref().hash));
            put_nz(
                &mut o,
                "compact_revision",
                s64(r.get_ref().compact_revision),
            );
            ok(Value::Object(o))
        }
        Err(e) => error(e),
    }
}

async fn alarm(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    const ALARMS: [&str; 3] = ["NONE", "NOSPACE", "CORRUPT"];
    let req = match parse(&body).and_then(|m| {
        Ok(pb::AlarmRequest {
            action: enumeration(&m, "action", &["GET", "ACTIVATE", "DEACTIVATE"])?,
            member_id: uint(&m, "member_id")?,
            alarm: enumeration(&m, "alarm", &ALARMS)?,
        })
    }) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Maintenance::alarm(&g, authed(&headers, req)).await {
        Ok(r) => {
            let mut o = Obj::new();
            header_json(&mut o, &r.get_ref().header);
            let alarms = r
                .get_ref()
                .alarms
                .iter()
                .map(|a| {
                    let name = ALARMS.get(a.alarm as usize).copied().unwrap_or("NONE");
                    json!({"memberID": a.member_id.to_string(), "alarm": name})
                })
                .collect();
            put_nz(&mut o, "alarms", Value::Array(alarms));
            ok(Value::Object(o))
        }
        Err(e) => error(e),
    }
}

fn member_json(m: &pb::Member) -> Value {
    let mut e = Obj::new();
    put_nz(&mut e, "ID", s64(m.id));
    put_nz(&mut e, "name", Value::String(m.name.clone()));
    put_nz(&mut e, "peerURLs", json!(m.peer_ur_ls));
    put_nz(&mut e, "clientURLs", json!(m.client_ur_ls));
    put_nz(&mut e, "isLearner", Value::Bool(m.is_learner));
    Value::Object(e)
}

/// A member response: header, the member it concerns (add), the members after it.
fn members_json(
    header: &Option<pb::ResponseHeader>,
    member: Option<&pb::Member>,
    members: &[pb::Member],
) -> Response {
    let mut o = Obj::new();
    header_json(&mut o, header);
    if let Some(m) = member {
        o.insert("member".into(), member_json(m));
    }
    put_nz(
        &mut o,
        "members",
        Value::Array(members.iter().map(member_json).collect()),
    );
    ok(Value::Object(o))
}

fn strings(m: &Obj, name: &str) -> Result<Vec<String>, tonic::Status> {
    match field(m, name) {
        None => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(bad(format!("{name}: expected strings"))),
            })
            .collect(),
        Some(_) => Err(bad(format!("{name}: expected a list of strings"))),
    }
}

async fn member_list(State(g): State<Gateway>, headers: HeaderMap) -> Response {
    match Cluster::member_list(&g, authed(&headers, pb::MemberListRequest::default())).await {
        Ok(r) => members_json(&r.get_ref().header, None, &r.get_ref().members),
        Err(e) => error(e),
    }
}

async fn member_add(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body).and_then(|m| {
        Ok(pb::MemberAddRequest {
            peer_ur_ls: strings(&m, "peerURLs")?,
            is_learner: boolean(&m, "isLearner")?,
        })
    }) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Cluster::member_add(&g, authed(&headers, req)).await {
        Ok(r) => {
            let r = r.get_ref();
            members_json(&r.header, r.member.as_ref(), &r.members)
        }
        Err(e) => error(e),
    }
}

async fn member_remove(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body).and_then(|m| {
        Ok(pb::MemberRemoveRequest {
            id: uint(&m, "ID")?,
        })
    }) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Cluster::member_remove(&g, authed(&headers, req)).await {
        Ok(r) => members_json(&r.get_ref().header, None, &r.get_ref().members),
        Err(e) => error(e),
    }
}

async fn member_update(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body).and_then(|m| {
        Ok(pb::MemberUpdateRequest {
            id: uint(&m, "ID")?,
            peer_ur_ls: strings(&m, "peerURLs")?,
        })
    }) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Cluster::member_update(&g, authed(&headers, req)).await {
        Ok(r) => members_json(&r.get_ref().header, None, &r.get_ref().members),
        Err(e) => error(e),
    }
}

async fn member_promote(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body).and_then(|m| {
        Ok(pb::MemberPromoteRequest {
            id: uint(&m, "ID")?,
        })
    }) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Cluster::member_promote(&g, authed(&headers, req)).await {
        Ok(r) => members_json(&r.get_ref().header, None, &r.get_ref().members),
        Err(e) => error(e),
    }
}

async fn move_leader(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body).and_then(|m| {
        Ok(pb::MoveLeaderRequest {
            target_id: uint(&m, "targetID")?,
        })
    }) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match Maintenance::move_leader(&g, authed(&headers, req)).await {
        Ok(r) => {
            let mut o = Obj::new();
            header_json(&mut o, &r.get_ref().header);
            ok(Value::Object(o))
        }
        Err(e) => error(e),
    }
}

/// etcd 3.4's /health: healthy when a linearizable read succeeds (and no alarm is raised).
/// It reads as the server itself, so it answers the same with auth enabled (as etcd's
/// internal QGET does).
async fn health(State(g): State<Gateway>) -> Response {
    let read = crate::model::RangeRequest {
        key: b"health".to_vec(),
        ..Default::default()
    };
    let alarms = pb::AlarmRequest::default();
    let healthy = g
        .call(|tx| crate::actors::bridge::BridgeRequest::Range(read, tx))
        .await
        .is_ok()
        && Maintenance::alarm(&g, tonic::Request::new(alarms))
            .await
            .is_ok_and(|r| r.get_ref().alarms.is_empty());
    let body = json!({"health": healthy.to_string()});
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body.to_string()).into_response()
}

async fn version() -> Response {
    ok(json!({"etcdserver": ETCD_API_VERSION, "etcdcluster": "3.4.0"}))
}
