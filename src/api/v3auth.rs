//! etcd's Auth service and the auth checks every gRPC front-end call makes (etcd's
//! `v3rpc/auth.go` + the AuthInfo handling of `etcdserver/v3_server.go`): tokens from the
//! `token` metadata (the JSON gateway passes `Authorization`), reads and watches checked
//! here against the replicated auth store, writes stamped with the user and checked when
//! applied, admin-only calls refused unless the user holds the root role.

use super::v3rpc::{header, Gateway};
use crate::actors::bridge::BridgeRequest;
use crate::error::KvError;
use crate::etcdpb::authpb;
use crate::etcdpb::etcdserverpb as pb;
use crate::etcdpb::etcdserverpb::auth_server::Auth;
use crate::model::*;
use crate::storage::auth as store;
use tonic::{Request, Response, Status};

/// Metadata keys a token arrives under: clientv3's, and grpc-gateway's header.
const TOKEN_KEYS: [&str; 2] = ["token", "authorization"];

impl Gateway {
    /// The auth token `req` carries, if any.
    pub(crate) fn token_of<T>(req: &Request<T>) -> Option<String> {
        TOKEN_KEYS
            .iter()
            .find_map(|k| req.metadata().get(*k))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// Who sent `req`: the user its token names (with the auth revision of this check), or
    /// an empty user when it has none. A token that is not (or no longer) valid is refused.
    /// (The future owns what it needs, so it is Send whatever the request holds.)
    pub(crate) fn caller<T>(
        &self,
        req: &Request<T>,
    ) -> impl std::future::Future<Output = Result<AuthUser, Status>> + Send + 'static {
        let token = Self::token_of(req);
        // Without a token, the verified client certificate's CN (--client-cert-auth).
        let cert_user = req
            .extensions()
            .get::<super::grpc_listen::ConnInfo>()
            .and_then(|c| c.cert_user.clone());
        let gateway = (token.is_some() || cert_user.is_some()).then(|| self.clone());
        async move {
            let Some(g) = gateway else {
                return Ok(AuthUser::default());
            };
            let Some(token) = token else {
                let name = cert_user.unwrap_or_default();
                let (b, txn) = g.backend().read().map_err(super::v3rpc::to_status)?;
                let revision = store::revision(&b, &txn).map_err(super::v3rpc::to_status)?;
                return Ok(AuthUser { name, revision });
            };
            let name = match g.tokens().user(&token) {
                Some(name) => name,
                None => g
                    .tokens()
                    .user_when_applied(&token)
                    .await
                    .ok_or_else(|| super::v3rpc::to_status(KvError::InvalidAuthToken))?,
            };
            let (b, txn) = g.backend().read().map_err(super::v3rpc::to_status)?;
            let revision = store::revision(&b, &txn).map_err(super::v3rpc::to_status)?;
            Ok(AuthUser { name, revision })
        }
    }

    /// May `who` do `need` on `[key, range_end)` (checked before serving; etcd's
    /// IsRangePermitted for reads and watches)?
    pub(crate) fn check_range(
        &self,
        who: &AuthUser,
        key: &[u8],
        range_end: &[u8],
        need: PermType,
    ) -> Result<(), Status> {
        if !self.tokens().auth_enabled() {
            return Ok(()); // the common case: no LMDB read on the request path
        }
        let (b, txn) = self.backend().read().map_err(super::v3rpc::to_status)?;
        store::check_range(&b, &txn, who, key, range_end, need).map_err(super::v3rpc::to_status)
    }

    /// etcd's IsAdminPermitted for membership changes.
    pub(crate) fn check_admin(&self, who: &AuthUser) -> Result<(), Status> {
        self.admin(who).map_err(super::v3rpc::to_status)
    }

    /// IsAdminPermitted as etcd 3.4's maintenance services answer it: the auth package's
    /// own error text with gRPC code Unknown (etcd does not map these).
    pub(crate) fn check_maintenance_admin(&self, who: &AuthUser) -> Result<(), Status> {
        self.admin(who).map_err(|e| {
            Status::unknown(match e {
                KvError::UserEmpty => "auth: user name is empty".to_string(),
                KvError::UserNotFound => "auth: user not found".to_string(),
                KvError::PermissionDenied => "auth: permission denied".to_string(),
                other => other.to_string(),
            })
        })
    }

    fn admin(&self, who: &AuthUser) -> Result<(), KvError> {
        if !self.tokens().auth_enabled() {
            return Ok(());
        }
        let (b, txn) = self.backend().read()?;
        store::check_admin(&b, &txn, who)
    }

    /// A lock or election: read (and write unless observing) the keys under `name/`.
    pub(crate) fn check_recipe(
        &self,
        who: &AuthUser,
        name: &[u8],
        write: bool,
    ) -> Result<(), Status> {
        if !self.tokens().auth_enabled() {
            return Ok(());
        }
        let (b, txn) = self.backend().read().map_err(super::v3rpc::to_status)?;
        store::check_recipe(&b, &txn, who, name, write).map_err(super::v3rpc::to_status)
    }

    async fn auth_write<T>(
        &self,
        req: &Request<T>,
        a: AuthRequest,
    ) -> Result<(pb::ResponseHeader, AuthResponse), Status> {
        let who = self.caller(req).await?;
        self.auth_write_as(Some(who), a).await
    }

    async fn auth_write_as(
        &self,
        who: Option<AuthUser>,
        a: AuthRequest,
    ) -> Result<(pb::ResponseHeader, AuthResponse), Status> {
        match self.write_as(WriteRequest::Auth(a), who).await? {
            (h, WriteResponse::Auth(r)) => Ok((header(&h).unwrap_or_default(), r)),
            _ => Err(Status::internal("etcdserver: unexpected auth response")),
        }
    }
}

/// bcrypt on tokio's blocking pool: tens of ms of CPU must not stall the gRPC threads.
async fn hash_off_thread(password: String, cost: u32) -> Result<String, Status> {
    tokio::task::spawn_blocking(move || store::hash_password(&password, cost))
        .await
        .map_err(|e| Status::internal(format!("etcdserver: bcrypt task: {e}")))?
        .map_err(super::v3rpc::to_status)
}

/// The stored hash for a user add or password change (3.5 clients may send it hashed).
async fn new_password_hash(
    password: String,
    hashed: String,
    no_password: bool,
    cost: u32,
) -> Result<Option<String>, Status> {
    if no_password {
        Ok(None)
    } else if !hashed.is_empty() {
        Ok(Some(hashed))
    } else {
        Ok(Some(hash_off_thread(password, cost).await?))
    }
}

fn perm_from_pb(p: authpb::Permission) -> Permission {
    Permission {
        perm_type: match p.perm_type {
            1 => PermType::Write,
            2 => PermType::ReadWrite,
            _ => PermType::Read,
        },
        key: p.key,
        range_end: p.range_end,
    }
}

fn perm_to_pb(p: Permission) -> authpb::Permission {
    authpb::Permission {
        perm_type: match p.perm_type {
            PermType::Read => 0,
            PermType::Write => 1,
            PermType::ReadWrite => 2,
        },
        key: p.key,
        range_end: p.range_end,
    }
}

fn names(r: AuthResponse) -> Vec<String> {
    match r {
        AuthResponse::Names(n) => n,
        _ => Vec::new(),
    }
}

#[tonic::async_trait]
impl Auth for Gateway {
    async fn auth_enable(
        &self,
        req: Request<pb::AuthEnableRequest>,
    ) -> Result<Response<pb::AuthEnableResponse>, Status> {
        let (h, _) = self.auth_write(&req, AuthRequest::Enable).await?;
        Ok(Response::new(pb::AuthEnableResponse { header: Some(h) }))
    }

    async fn auth_disable(
        &self,
        req: Request<pb::AuthDisableRequest>,
    ) -> Result<Response<pb::AuthDisableResponse>, Status> {
        let (h, _) = self.auth_write(&req, AuthRequest::Disable).await?;
        Ok(Response::new(pb::AuthDisableResponse { header: Some(h) }))
    }

    async fn auth_status(
        &self,
        _req: Request<pb::AuthStatusRequest>,
    ) -> Result<Response<pb::AuthStatusResponse>, Status> {
        let h = self.current_header().await?;
        let (b, txn) = self.backend().read().map_err(super::v3rpc::to_status)?;
        let enabled = store::enabled(&b, &txn).map_err(super::v3rpc::to_status)?;
        let auth_revision = store::revision(&b, &txn).map_err(super::v3rpc::to_status)?;
        Ok(Response::new(pb::AuthStatusResponse {
            header: header(&h),
            enabled,
            auth_revision,
        }))
    }

    /// On the member's shard, as the native port's (api::native_auth::authenticate).
    async fn authenticate(
        &self,
        req: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        let r = req.into_inner();
        let (h, token) = self
            .call(|tx| BridgeRequest::Authenticate(r.name, r.password, tx))
            .await?;
        Ok(Response::new(pb::AuthenticateResponse {
            header: header(&h),
            token,
        }))
    }

    async fn user_add(
        &self,
        req: Request<pb::AuthUserAddRequest>,
    ) -> Result<Response<pb::AuthUserAddResponse>, Status> {
        let who = self.caller(&req).await?;
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(super::v3rpc::to_status(KvError::UserEmpty));
        }
        let no_password = r.options.is_some_and(|o| o.no_password);
        let cost = self.bcrypt_cost();
        let password_hash =
            new_password_hash(r.password, r.hashed_password, no_password, cost).await?;
        let a = AuthRequest::UserAdd {
            name: r.name,
            password_hash,
        };
        let (h, _) = self.auth_write_as(Some(who), a).await?;
        Ok(Response::new(pb::AuthUserAddResponse { header: Some(h) }))
    }

    async fn user_get(
        &self,
        req: Request<pb::AuthUserGetRequest>,
    ) -> Result<Response<pb::AuthUserGetResponse>, Status> {
        let name = req.get_ref().name.clone();
        let (h, r) = self.auth_write(&req, AuthRequest::UserGet { name }).await?;
        Ok(Response::new(pb::AuthUserGetResponse {
            header: Some(h),
            roles: names(r),
        }))
    }

    async fn user_list(
        &self,
        req: Request<pb::AuthUserListRequest>,
    ) -> Result<Response<pb::AuthUserListResponse>, Status> {
        let (h, r) = self.auth_write(&req, AuthRequest::UserList).await?;
        Ok(Response::new(pb::AuthUserListResponse {
            header: Some(h),
            users: names(r),
        }))
    }

    async fn user_delete(
        &self,
        req: Request<pb::AuthUserDeleteRequest>,
    ) -> Result<Response<pb::AuthUserDeleteResponse>, Status> {
        let name = req.get_ref().name.clone();
        let (h, _) = self
            .auth_write(&req, AuthRequest::UserDelete { name })
            .await?;
        Ok(Response::new(pb::AuthUserDeleteResponse {
            header: Some(h),
        }))
    }

    async fn user_change_password(
        &self,
        req: Request<pb::AuthUserChangePasswordRequest>,
    ) -> Result<Response<pb::AuthUserChangePasswordResponse>, Status> {
        let who = self.caller(&req).await?;
        // Refuse before spending a bcrypt round on a caller who may not do this.
        self.check_admin(&who)?;
        let r = req.into_inner();
        let cost = self.bcrypt_cost();
        let password_hash = new_password_hash(r.password, r.hashed_password, false, cost).await?;
        let a = AuthRequest::UserChangePassword {
            name: r.name,
            password_hash,
        };
        let (h, _) = self.auth_write_as(Some(who), a).await?;
        Ok(Response::new(pb::AuthUserChangePasswordResponse {
            header: Some(h),
        }))
    }

    async fn user_grant_role(
        &self,
        req: Request<pb::AuthUserGrantRoleRequest>,
    ) -> Result<Response<pb::AuthUserGrantRoleResponse>, Status> {
        let r = req.get_ref().clone();
        let a = AuthRequest::UserGrantRole {
            user: r.user,
            role: r.role,
        };
        let (h, _) = self.auth_write(&req, a).await?;
        Ok(Response::new(pb::AuthUserGrantRoleResponse {
            header: Some(h),
        }))
    }

    async fn user_revoke_role(
        &self,
        req: Request<pb::AuthUserRevokeRoleRequest>,
    ) -> Result<Response<pb::AuthUserRevokeRoleResponse>, Status> {
        let r = req.get_ref().clone();
        let a = AuthRequest::UserRevokeRole {
            user: r.name,
            role: r.role,
        };
        let (h, _) = self.auth_write(&req, a).await?;
        Ok(Response::new(pb::AuthUserRevokeRoleResponse {
            header: Some(h),
        }))
    }

    async fn role_add(
        &self,
        req: Request<pb::AuthRoleAddRequest>,
    ) -> Result<Response<pb::AuthRoleAddResponse>, Status> {
        let name = req.get_ref().name.clone();
        let (h, _) = self.auth_write(&req, AuthRequest::RoleAdd { name }).await?;
        Ok(Response::new(pb::AuthRoleAddResponse { header: Some(h) }))
    }

    async fn role_get(
        &self,
        req: Request<pb::AuthRoleGetRequest>,
    ) -> Result<Response<pb::AuthRoleGetResponse>, Status> {
        let name = req.get_ref().role.clone();
        let (h, r) = self.auth_write(&req, AuthRequest::RoleGet { name }).await?;
        let perm = match r {
            AuthResponse::Perms(p) => p.into_iter().map(perm_to_pb).collect(),
            _ => Vec::new(),
        };
        Ok(Response::new(pb::AuthRoleGetResponse {
            header: Some(h),
            perm,
        }))
    }

    async fn role_list(
        &self,
        req: Request<pb::AuthRoleListRequest>,
    ) -> Result<Response<pb::AuthRoleListResponse>, Status> {
        let (h, r) = self.auth_write(&req, AuthRequest::RoleList).await?;
        Ok(Response::new(pb::AuthRoleListResponse {
            header: Some(h),
            roles: names(r),
        }))
    }

    async fn role_delete(
        &self,
        req: Request<pb::AuthRoleDeleteRequest>,
    ) -> Result<Response<pb::AuthRoleDeleteResponse>, Status> {
        let name = req.get_ref().role.clone();
        let (h, _) = self
            .auth_write(&req, AuthRequest::RoleDelete { name })
            .await?;
        Ok(Response::new(pb::AuthRoleDeleteResponse {
            header: Some(h),
        }))
    }

    async fn role_grant_permission(
        &self,
        req: Request<pb::AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<pb::AuthRoleGrantPermissionResponse>, Status> {
        let r = req.get_ref().clone();
        let Some(perm) = r.perm else {
            return Err(Status::invalid_argument("etcdserver: permission not given"));
        };
        let a = AuthRequest::RoleGrantPermission {
            name: r.name,
            perm: perm_from_pb(perm),
        };
        let (h, _) = self.auth_write(&req, a).await?;
        Ok(Response::new(pb::AuthRoleGrantPermissionResponse {
            header: Some(h),
        }))
    }

    async fn role_revoke_permission(
        &self,
        req: Request<pb::AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<pb::AuthRoleRevokePermissionResponse>, Status> {
        let r = req.get_ref().clone();
        let a = AuthRequest::RoleRevokePermission {
            name: r.role,
            key: r.key,
            range_end: r.range_end,
        };
        let (h, _) = self.auth_write(&req, a).await?;
        Ok(Response::new(pb::AuthRoleRevokePermissionResponse {
            header: Some(h),
        }))
    }
}
