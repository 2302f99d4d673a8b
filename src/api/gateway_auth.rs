//! The JSON gateway's /v3/auth/* routes (etcd 3.4's grpc-gateway paths), answered by the
//! same Auth service as gRPC; the token comes from the `Authorization` header.

use super::gateway::{authed, b64, bytes, enumeration, error, field_obj, header_json, ok, parse};
use super::gateway::{boolean, put_nz, string, Obj};
use super::v3rpc::Gateway;
use crate::etcdpb::authpb;
use crate::etcdpb::etcdserverpb as pb;
use crate::etcdpb::etcdserverpb::auth_server::Auth;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use serde_json::Value;

const PERM_TYPES: [&str; 3] = ["READ", "WRITE", "READWRITE"];

pub(super) fn routes() -> axum::Router<Gateway> {
    axum::Router::new()
        .route("/v3/auth/enable", post(enable))
        .route("/v3/auth/disable", post(disable))
        .route("/v3/auth/authenticate", post(authenticate))
        .route("/v3/auth/user/add", post(user_add))
        .route("/v3/auth/user/get", post(user_get))
        .route("/v3/auth/user/list", post(user_list))
        .route("/v3/auth/user/delete", post(user_delete))
        .route("/v3/auth/user/changepw", post(user_change_password))
        .route("/v3/auth/user/grant", post(user_grant_role))
        .route("/v3/auth/user/revoke", post(user_revoke_role))
        .route("/v3/auth/role/add", post(role_add))
        .route("/v3/auth/role/get", post(role_get))
        .route("/v3/auth/role/list", post(role_list))
        .route("/v3/auth/role/delete", post(role_delete))
        .route("/v3/auth/role/grant", post(role_grant_permission))
        .route("/v3/auth/role/revoke", post(role_revoke_permission))
}

/// Parses the body, calls the Auth method with the header's token, renders the answer.
async fn answer<Req, Resp, Fut>(
    headers: HeaderMap,
    body: Bytes,
    decode: impl FnOnce(&Obj) -> Result<Req, tonic::Status>,
    call: impl FnOnce(tonic::Request<Req>) -> Fut,
    render: impl FnOnce(&Resp, &mut Obj),
    header: impl Fn(&Resp) -> &Option<pb::ResponseHeader>,
) -> Response
where
    Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
{
    let req = match parse(&body).and_then(|m| decode(&m)) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match call(authed(&headers, req)).await {
        Ok(r) => {
            let mut o = Obj::new();
            header_json(&mut o, header(r.get_ref()));
            render(r.get_ref(), &mut o);
            ok(Value::Object(o))
        }
        Err(e) => error(e),
    }
}

fn names(o: &mut Obj, key: &str, list: &[String]) {
    let v: Vec<Value> = list.iter().map(|s| Value::String(s.clone())).collect();
    put_nz(o, key, Value::Array(v));
}

/// Generates a handler for a request whose answer is just a header.
macro_rules! header_only {
    ($name:ident, $method:ident, |$m:ident| $decode:expr) => {
        async fn $name(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
            answer(
                headers,
                body,
                |$m: &Obj| Ok($decode),
                |r| async move { g.$method(r).await },
                |_, _| {},
                |r| &r.header,
            )
            .await
        }
    };
}

header_only!(enable, auth_enable, |_m| pb::AuthEnableRequest {});
header_only!(disable, auth_disable, |_m| pb::AuthDisableRequest {});
header_only!(user_add, user_add, |m| pb::AuthUserAddRequest {
    name: string(m, "name")?,
    password: string(m, "password")?,
    options: field_obj(m, "options")
        .map(|o| -> Result<_, tonic::Status> {
            Ok(authpb::UserAddOptions {
                no_password: boolean(o, "no_password")?,
            })
        })
        .transpose()?,
    hashed_password: String::new(),
});
header_only!(user_delete, user_delete, |m| pb::AuthUserDeleteRequest {
    name: string(m, "name")?,
});
header_only!(user_change_password, user_change_password, |m| {
    pb::AuthUserChangePasswordRequest {
        name: string(m, "name")?,
        password: string(m, "password")?,
        hashed_password: String::new(),
    }
});
header_only!(user_grant_role, user_grant_role, |m| {
    pb::AuthUserGrantRoleRequest {
        user: string(m, "user")?,
        role: string(m, "role")?,
    }
});
header_only!(user_revoke_role, user_revoke_role, |m| {
    pb::AuthUserRevokeRoleRequest {
        name: string(m, "name")?,
        role: string(m, "role")?,
    }
});
header_only!(role_add, role_add, |m| pb::AuthRoleAddRequest {
    name: string(m, "name")?,
});
header_only!(role_delete, role_delete, |m| pb::AuthRoleDeleteRequest {
    role: string(m, "role")?,
});
header_only!(role_grant_permission, role_grant_permission, |m| {
    pb::AuthRoleGrantPermissionRequest {
        name: string(m, "name")?,
        perm: field_obj(m, "perm")
            .map(|p| -> Result<_, tonic::Status> {
                Ok(authpb::Permission {
                    perm_type: enumeration(p, "permType", &PERM_TYPES)?,
                    key: bytes(p, "key")?,
                    range_end: bytes(p, "range_end")?,
                })
            })
            .transpose()?,
    }
});
header_only!(role_revoke_permission, role_revoke_permission, |m| {
    pb::AuthRoleRevokePermissionRequest {
        role: string(m, "role")?,
        key: bytes(m, "key")?,
        range_end: bytes(m, "range_end")?,
    }
});

async fn authenticate(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let decode = |m: &Obj| {
        Ok(pb::AuthenticateRequest {
            name: string(m, "name")?,
            password: string(m, "password")?,
        })
    };
    let render = |r: &pb::AuthenticateResponse, o: &mut Obj| {
        put_nz(o, "token", Value::String(r.token.clone()))
    };
    let call = |r| async move { g.authenticate(r).await };
    answer(headers, body, decode, call, render, |r| &r.header).await
}

async fn user_get(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let decode = |m: &Obj| {
        Ok(pb::AuthUserGetRequest {
            name: string(m, "name")?,
        })
    };
    let render = |r: &pb::AuthUserGetResponse, o: &mut Obj| names(o, "roles", &r.roles);
    let call = |r| async move { g.user_get(r).await };
    answer(headers, body, decode, call, render, |r| &r.header).await
}

async fn user_list(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let decode = |_: &Obj| Ok(pb::AuthUserListRequest {});
    let render = |r: &pb::AuthUserListResponse, o: &mut Obj| names(o, "users", &r.users);
    let call = |r| async move { g.user_list(r).await };
    answer(headers, body, decode, call, render, |r| &r.header).await
}

async fn role_list(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let decode = |_: &Obj| Ok(pb::AuthRoleListRequest {});
    let render = |r: &pb::AuthRoleListResponse, o: &mut Obj| names(o, "roles", &r.roles);
    let call = |r| async move { g.role_list(r).await };
    answer(headers, body, decode, call, render, |r| &r.header).await
}

async fn role_get(State(g): State<Gateway>, headers: HeaderMap, body: Bytes) -> Response {
    let decode = |m: &Obj| {
        Ok(pb::AuthRoleGetRequest {
            role: string(m, "role")?,
        })
    };
    let render = |r: &pb::AuthRoleGetResponse, o: &mut Obj| {
        let perms: Vec<Value> = r
            .perm
            .iter()
            .map(|p| {
                let mut po = Obj::new();
                if p.perm_type != 0 {
                    let name = PERM_TYPES.get(p.perm_type as usize).unwrap_or(&"READ");
                    po.insert("permType".into(), Value::String(name.to_string()));
                }
                put_nz(&mut po, "key", b64(&p.key));
                put_nz(&mut po, "range_end", b64(&p.range_end));
                Value::Object(po)
            })
            .collect();
        put_nz(o, "perm", Value::Array(perms));
    };
    let call = |r| async move { g.role_get(r).await };
    answer(headers, body, decode, call, render, |r| &r.header).await
}
