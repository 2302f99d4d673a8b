//! Auth on the native port (and Authenticate for both front ends), judged as the gRPC front end judges it (src/api/v3auth.rs):
//! a capability handed out by `authenticate` acts as its user (it holds the token, so the
//! token's expiry and revocation apply); the bootstrap capability is a caller without a
//! user, which etcd 3.4 still serves lease calls, status and member list.

use crate::actors::network::Shard;
use crate::error::KvError;
use crate::model::*;
use crate::storage::auth::{self as store, TokenLookup, MAX_TOKEN_WAIT};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How often a token whose issuing entry is not applied here yet is looked up again.
const TOKEN_POLL: Duration = Duration::from_millis(10);

/// The user `token` names (with the auth revision of this check); without a token the
/// CN of a verified client certificate (`cert_user`, under --client-cert-auth, as etcd's
/// AuthInfoFromTLS), else an empty user. Runs on a glommio executor, so it polls
/// instead of using tokio's timers.
pub async fn caller(
    shard: &Shard,
    token: Option<&str>,
    cert_user: Option<&str>,
) -> Result<AuthUser, KvError> {
    let Some(token) = token else {
        return match cert_user {
            Some(name) => {
                let (b, txn) = shard.backend.read()?;
                let revision = store::revision(&b, &txn)?;
                Ok(AuthUser {
                    name: name.to_string(),
                    revision,
                })
            }
            None => Ok(AuthUser::default()),
        };
    };
    let tokens = &shard.settings.tokens;
    let deadline = Instant::now() + MAX_TOKEN_WAIT;
    let max_polls = MAX_TOKEN_WAIT.as_millis() / TOKEN_POLL.as_millis() + 1;
    let mut name = None;
    for _ in 0..max_polls {
        match tokens.lookup(token) {
            TokenLookup::Valid(user) => {
                name = Some(user);
                break;
            }
            TokenLookup::Invalid => break,
            TokenLookup::NotYetApplied if Instant::now() >= deadline => break,
            TokenLookup::NotYetApplied => glommio::timer::sleep(TOKEN_POLL).await,
        }
    }
    let name = name.ok_or(KvError::InvalidAuthToken)?;
    let (b, txn) = shard.backend.read()?;
    let revision = store::revision(&b, &txn)?;
    Ok(AuthUser { name, revision })
}

/// Runs an auth store check, unless auth is off (the common case: no LMDB read then).
fn judge(
    shard: &Shard,
    check: impl FnOnce(&crate::storage::backend::Backend, &heed::RoTxn) -> Result<(), KvError>,
) -> Result<(), KvError> {
    if !shard.settings.tokens.auth_enabled() {
        return Ok(());
    }
    let (b, txn) = shard.backend.read()?;
    check(&b, &txn)
}

/// May `who` do `need` on `[key, range_end)`? (etcd's IsRangePermitted.)
pub fn check_range(
    shard: &Shard,
    who: &AuthUser,
    key: &[u8],
    range_end: &[u8],
    need: PermType,
) -> Result<(), KvError> {
    judge(shard, |b, txn| {
        store::check_range(b, txn, who, key, range_end, need)
    })
}

/// etcd's IsAdminPermitted (membership, maintenance).
pub fn check_admin(shard: &Shard, who: &AuthUser) -> Result<(), KvError> {
    judge(shard, |b, txn| store::check_admin(b, txn, who))
}

/// A lock or election: read (and write unless observing) the keys under `name/`.
pub fn check_recipe(
    shard: &Shard,
    who: &AuthUser,
    name: &[u8],
    write: bool,
) -> Result<(), KvError> {
    judge(shard, |b, txn| {
        store::check_recipe(b, txn, who, name, write)
    })
}

/// etcd's Authenticate, for both front ends: applies what was committed before (so an
/// enable or user add made through another member is seen, as etcd's
/// linearizableReadNotify), checks the password on the blocking pool (bcrypt takes tens
/// of ms), then issues the token through raft so every member knows it.
pub async fn authenticate(
    shard: &Rc<Shard>,
    name: String,
    password: String,
) -> Result<(Header, String), KvError> {
    let barrier = RangeRequest {
        key: vec![0],
        count_only: true,
        ..Default::default()
    };
    shard.range(barrier).await?;
    let stored = {
        let (b, txn) = shard.backend.read()?;
        if !store::enabled(&b, &txn)? {
            return Err(KvError::AuthNotEnabled);
        }
        store::password_hash(&b, &txn, &name)?
    };
    let stored = stored.ok_or(KvError::AuthFailed)?;
    let ok = glommio::executor()
        .spawn_blocking(move || store::password_matches(&password, &stored))
        .await;
    if !ok {
        return Err(KvError::AuthFailed);
    }
    let secret = store::token_prefix()?;
    let secret_sha256 = store::secret_sha256(&secret);
    let req = WriteRequest::Auth(AuthRequest::Authenticate {
        name,
        secret_sha256: secret_sha256.clone(),
    });
    match shard.write(req).await? {
        (h, WriteResponse::Auth(AuthResponse::Token(key))) => {
            // The applied entry answers `<secret SHA-256>.<index>`; the client gets the
            // secret itself.
            let index = key
                .strip_prefix(&secret_sha256)
                .and_then(|rest| rest.strip_prefix('.'))
                .filter(|i| i.parse::<u64>().is_ok())
                .ok_or_else(|| KvError::Internal("authenticate answered another token".into()))?;
            Ok((h, format!("{secret}.{index}")))
        }
        _ => Err(KvError::Internal("unexpected authenticate response".into())),
    }
}
