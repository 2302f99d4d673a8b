//! etcd's auth store (`auth/store.go`): users, roles and key permissions in the replicated
//! `meta` bucket, changed only by applied raft entries so every member judges a request
//! the same way; plus the member-local table of simple tokens (`Tokens`).

use crate::error::KvError;
use crate::model::*;
use crate::storage::backend::Backend;
use heed::{RoTxn, RwTxn};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant};

/// The user and role that may do everything (and manage auth) once auth is enabled.
pub const ROOT: &str = "root";
const ENABLED: &[u8] = b"auth_enabled";
const REVISION: &[u8] = b"auth_revision";
const USER_PREFIX: &[u8] = b"auth_user/";
const ROLE_PREFIX: &[u8] = b"auth_role/";
/// Bound on users or roles listed in one answer (etcd has none; this keeps loops bounded).
const MAX_LISTED: usize = 1 << 20;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct User {
    /// bcrypt hash; None for users added with `--no-password` (they cannot authenticate).
    password_hash: Option<String>,
    /// Sorted, no duplicates.
    roles: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Role {
    /// Sorted by key, as etcd keeps them.
    perms: Vec<Permission>,
}

pub fn enabled(b: &Backend, txn: &RoTxn) -> Result<bool, KvError> {
    Ok(b.get_u64(txn, ENABLED)? == 1)
}

/// Bumped by every change that can alter a permission decision.
pub fn revision(b: &Backend, txn: &RoTxn) -> Result<u64, KvError> {
    b.get_u64(txn, REVISION)
}

fn entry_key(prefix: &[u8], name: &str) -> Vec<u8> {
    [prefix, name.as_bytes()].concat()
}

fn get<T: for<'a> Deserialize<'a>>(
    b: &Backend,
    txn: &RoTxn,
    prefix: &[u8],
    name: &str,
) -> Result<Option<T>, KvError> {
    match b.meta.get(txn, &entry_key(prefix, name))? {
        Some(bytes) => Ok(Some(postcard::from_bytes(bytes)?)),
        None => Ok(None),
    }
}

fn put<T: Serialize>(
    b: &Backend,
    txn: &mut RwTxn,
    prefix: &[u8],
    name: &str,
    v: &T,
) -> Result<(), KvError> {
    let bytes = postcard::to_allocvec(v)?;
    b.meta.put(txn, &entry_key(prefix, name), &bytes)?;
    Ok(())
}

/// Names under `prefix`, sorted (LMDB keeps keys in order).
fn names(b: &Backend, txn: &RoTxn, prefix: &[u8]) -> Result<Vec<String>, KvError> {
    let mut out = Vec::new();
    for item in b.meta.prefix_iter(txn, prefix)?.take(MAX_LISTED) {
        let (k, _) = item?;
        out.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
    }
    Ok(out)
}

/// The stored bcrypt hash of `name` (None: no such user, or one without a password).
pub fn password_hash(b: &Backend, txn: &RoTxn, name: &str) -> Result<Option<String>, KvError> {
    Ok(get::<User>(b, txn, USER_PREFIX, name)?.and_then(|u| u.password_hash))
}

/// etcd's IsAdminPermitted: with auth enabled only a user holding the root role passes.
pub fn check_admin(b: &Backend, txn: &RoTxn, who: &AuthUser) -> Result<(), KvError> {
    if !enabled(b, txn)? {
        return Ok(());
    }
    if who.name.is_empty() {
        return Err(KvError::UserEmpty);
    }
    match get::<User>(b, txn, USER_PREFIX, &who.name)? {
        None => Err(KvError::UserNotFound),
        Some(u) if u.roles.iter().any(|r| r == ROOT) => Ok(()),
        Some(_) => Err(KvError::PermissionDenied),
    }
}

/// A lock or election works on the keys under `name/`: the user must read them, and
/// write them unless only observing (etcd's recipes run as the caller's own requests).
pub fn check_recipe(
    b: &Backend,
    txn: &RoTxn,
    who: &AuthUser,
    name: &[u8],
    write: bool,
) -> Result<(), KvError> {
    let prefix = [name, b"/"].concat();
    let end = prefix_end(&prefix);
    check_range(b, txn, who, &prefix, &end, PermType::Read)?;
    if write {
        check_range(b, txn, who, &prefix, &end, PermType::Write)?;
    }
    Ok(())
}

/// etcd's isOpPermitted: may `who` do `need` on every key of `[key, range_end)`?
pub fn check_range(
    b: &Backend,
    txn: &RoTxn,
    who: &AuthUser,
    key: &[u8],
    range_end: &[u8],
    need: PermType,
) -> Result<(), KvError> {
    assert!(need != PermType::ReadWrite, "callers ask for read or write");
    if !enabled(b, txn)? {
        return Ok(());
    }
    if who.name.is_empty() {
        return Err(KvError::UserEmpty);
    }
    if who.revision < revision(b, txn)? {
        return Err(KvError::AuthOldRevision);
    }
    let Some(user) = get::<User>(b, txn, USER_PREFIX, &who.name)? else {
        return Err(KvError::PermissionDenied);
    };
    if user.roles.iter().any(|r| r == ROOT) {
        return Ok(());
    }
    let mut granted = Vec::new();
    for name in &user.roles {
        if let Some(role) = get::<Role>(b, txn, ROLE_PREFIX, name)? {
            granted.extend(
                role.perms
                    .into_iter()
                    .filter(|p| p.perm_type == PermType::ReadWrite || p.perm_type == need),
            );
        }
    }
    if covered(&granted, key, range_end) {
        Ok(())
    } else {
        Err(KvError::PermissionDenied)
    }
}

/// `[start, end)` with `None` = unbounded; a single key k is `[k, k\0)`.
fn interval(key: &[u8], range_end: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
    match range_end {
        [] => (key.to_vec(), Some([key, &[0]].concat())),
        [0] => (key.to_vec(), None),
        end => (key.to_vec(), Some(end.to_vec())),
    }
}

/// Whether the union of `perms` covers the request (etcd merges them in an interval tree).
fn covered(perms: &[Permission], key: &[u8], range_end: &[u8]) -> bool {
    let (start, end) = interval(key, range_end);
    if end.as_ref().is_some_and(|e| *e <= start) {
        return false; // an empty request range names no key etcd would grant
    }
    let mut ivs: Vec<_> = perms
        .iter()
        .map(|p| interval(&p.key, &p.range_end))
        .collect();
    ivs.sort();
    let mut reached = start; // everything in [start, reached) is granted
    for (s, e) in ivs {
        if s > reached {
            break; // a gap no later interval (sorted by start) can fill
        }
        match e {
            None => return true,
            Some(e) if e > reached => reached = e,
            Some(_) => {}
        }
        if end.as_ref().is_some_and(|want| reached >= *want) {
            return true;
        }
    }
    false
}

fn bump_revision(b: &Backend, txn: &mut RwTxn) -> Result<(), KvError> {
    let rev = revision(b, txn)?;
    b.put_u64(txn, REVISION, rev + 1)
}

/// Applies one auth request as etcd's applier does: management needs the root role once
/// auth is enabled (a user may read their own entry and roles they hold).
pub fn apply(
    b: &Backend,
    txn: &mut RwTxn,
    who: Option<&AuthUser>,
    req: &AuthRequest,
) -> Result<AuthResponse, KvError> {
    if let Some(who) = who {
        if let Err(e) = check_admin(b, txn, who) {
            let own = match req {
                AuthRequest::Authenticate { .. } => true,
                AuthRequest::UserGet { name } => *name == who.name,
                AuthRequest::RoleGet { name } => get::<User>(b, txn, USER_PREFIX, &who.name)?
                    .is_some_and(|u| u.roles.contains(name)),
                _ => false,
            };
            if !own {
                return Err(e);
            }
        }
    }
    let on = enabled(b, txn)?;
    let changed = match req {
        AuthRequest::Enable => {
            if !on {
                let root =
                    get::<User>(b, txn, USER_PREFIX, ROOT)?.ok_or(KvError::RootUserNotExist)?;
                if !root.roles.iter().any(|r| r == ROOT) {
                    return Err(KvError::RootRoleNotExist);
                }
                b.put_u64(txn, ENABLED, 1)?;
            }
            !on
        }
        AuthRequest::Disable => {
            if on {
                b.put_u64(txn, ENABLED, 0)?;
            }
            on
        }
        AuthRequest::Authenticate {
            name,
            secret_sha256,
        } => {
            if !on {
                return Err(KvError::AuthNotEnabled);
            }
            if get::<User>(b, txn, USER_PREFIX, name)?.is_none() {
                return Err(KvError::AuthFailed);
            }
            return Ok(AuthResponse::Token(secret_sha256.clone()));
        }
        AuthRequest::UserAdd {
            name,
            password_hash,
        } => {
            if name.is_empty() {
                return Err(KvError::UserEmpty);
            }
            if get::<User>(b, txn, USER_PREFIX, name)?.is_some() {
                return Err(KvError::UserAlreadyExist);
            }
            let user = User {
                password_hash: password_hash.clone(),
                roles: Vec::new(),
            };
            put(b, txn, USER_PREFIX, name, &user)?;
            true
        }
        AuthRequest::UserDelete { name } => {
            if on && name == ROOT {
                return Err(KvError::InvalidAuthMgmt);
            }
            if !b.meta.delete(txn, &entry_key(USER_PREFIX, name))? {
                return Err(KvError::UserNotFound);
            }
            true
        }
        AuthRequest::UserChangePassword {
            name,
            password_hash,
        } => {
            let mut user = get::<User>(b, txn, USER_PREFIX, name)?.ok_or(KvError::UserNotFound)?;
            user.password_hash = password_hash.clone();
            put(b, txn, USER_PREFIX, name, &user)?;
            true
        }
        AuthRequest::UserGrantRole { user, role } => {
            let mut u = get::<User>(b, txn, USER_PREFIX, user)?.ok_or(KvError::UserNotFound)?;
            if role != ROOT && get::<Role>(b, txn, ROLE_PREFIX, role)?.is_none() {
                return Err(KvError::RoleNotFound);
            }
            match u.roles.binary_search(role) {
                Ok(_) => false, // already granted: etcd answers success
                Err(at) => {
                    u.roles.insert(at, role.clone());
                    put(b, txn, USER_PREFIX, user, &u)?;
                    true
                }
            }
        }
        AuthRequest::UserRevokeRole { user, role } => {
            if on && user == ROOT && role == ROOT {
                return Err(KvError::InvalidAuthMgmt);
            }
            let mut u = get::<User>(b, txn, USER_PREFIX, user)?.ok_or(KvError::UserNotFound)?;
            let at = u
                .roles
                .binary_search(role)
                .map_err(|_| KvError::RoleNotGranted)?;
            u.roles.remove(at);
            put(b, txn, USER_PREFIX, user, &u)?;
            true
        }
        AuthRequest::UserGet { name } => {
            let u = get::<User>(b, txn, USER_PREFIX, name)?.ok_or(KvError::UserNotFound)?;
            return Ok(AuthResponse::Names(u.roles));
        }
        AuthRequest::UserList => return Ok(AuthResponse::Names(names(b, txn, USER_PREFIX)?)),
        AuthRequest::RoleAdd { name } => {
            if name.is_empty() {
                return Err(KvError::RoleEmpty);
            }
            if get::<Role>(b, txn, ROLE_PREFIX, name)?.is_some() {
                return Err(KvError::RoleAlreadyExist);
            }
            put(b, txn, ROLE_PREFIX, name, &Role::default())?;
            true
        }
        AuthRequest::RoleGet { name } => {
            let r = get::<Role>(b, txn, ROLE_PREFIX, name)?.ok_or(KvError::RoleNotFound)?;
            return Ok(AuthResponse::Perms(r.perms));
        }
        AuthRequest::RoleList => return Ok(AuthResponse::Names(names(b, txn, ROLE_PREFIX)?)),
        AuthRequest::RoleDelete { name } => {
            if on && name == ROOT {
                return Err(KvError::InvalidAuthMgmt);
            }
            if !b.meta.delete(txn, &entry_key(ROLE_PREFIX, name))? {
                return Err(KvError::RoleNotFound);
            }
            // The role leaves every user holding it.
            for user in names(b, txn, USER_PREFIX)? {
                if let Some(mut u) = get::<User>(b, txn, USER_PREFIX, &user)? {
                    if let Ok(at) = u.roles.binary_search(name) {
                        u.roles.remove(at);
                        put(b, txn, USER_PREFIX, &user, &u)?;
                    }
                }
            }
            true
        }
        AuthRequest::RoleGrantPermission { name, perm } => {
            let mut r = get::<Role>(b, txn, ROLE_PREFIX, name)?.ok_or(KvError::RoleNotFound)?;
            match r
                .perms
                .iter_mut()
                .find(|p| p.key == perm.key && p.range_end == perm.range_end)
            {
                Some(p) => p.perm_type = perm.perm_type,
                None => {
                    r.perms.push(perm.clone());
                    r.perms.sort_by(|a, b| a.key.cmp(&b.key));
                }
            }
            put(b, txn, ROLE_PREFIX, name, &r)?;
            true
        }
        AuthRequest::RoleRevokePermission {
            name,
            key,
            range_end,
        } => {
            let mut r = get::<Role>(b, txn, ROLE_PREFIX, name)?.ok_or(KvError::RoleNotFound)?;
            let at = r
                .perms
                .iter()
                .position(|p| p.key == *key && p.range_end == *range_end)
                .ok_or(KvError::PermissionNotGranted)?;
            r.perms.remove(at);
            put(b, txn, ROLE_PREFIX, name, &r)?;
            true
        }
    };
    if changed {
        bump_revision(b, txn)?;
    }
    Ok(AuthResponse::Done)
}

/// Tokens held per member; the oldest are dropped beyond this (bounded memory).
const MAX_TOKENS: usize = 100_000;
/// How long a request waits for the entry that issued its token to be applied here (a
/// token taken from another member a moment ago); then the token is invalid.
pub const MAX_TOKEN_WAIT: Duration = Duration::from_secs(2);
/// Re-check interval while waiting: a token ended before it was applied here is never
/// issued, and the applied index then says so.
const TOKEN_RECHECK: Duration = Duration::from_millis(50);

/// What a token is worth on this member right now (see `Tokens::lookup`).
#[derive(Debug, PartialEq, Eq)]
pub enum TokenLookup {
    Valid(String),
    NotYetApplied,
    Invalid,
}

/// Simple tokens of this member (etcd's `simpleTokenTTLKeeper`): issued when an
/// Authenticate entry is applied, so every member knows each token; dropped on auth
/// disable, user delete and password change. Only requests that carry a token touch it:
/// with auth off the request path never takes this lock.
pub struct Tokens {
    start: Instant,
    /// How long a token lives without use (`--auth-token-ttl`, etcd's 300 s default).
    ttl: Duration,
    table: RwLock<HashMap<String, Token>>,
    /// Mirror of the stored flag, so requests skip the auth store while auth is off (as
    /// etcd keeps its flag in memory); set at start and after every applied enable or
    /// disable. Writes are judged again against the store when applied.
    enabled: AtomicBool,
    /// The raft index this member has applied up to (a token names the index of the
    /// entry that issued it).
    applied_index: AtomicU64,
    /// Woken whenever a token is issued.
    issued: tokio::sync::Notify,
}

struct Token {
    user: String,
    /// Milliseconds since `start` after which the token is gone.
    expires_ms: AtomicU64,
}

impl Tokens {
    pub fn new(ttl: Duration) -> Tokens {
        assert!(!ttl.is_zero(), "a token must live a while");
        Tokens {
            start: Instant::now(),
            ttl,
            table: RwLock::new(HashMap::new()),
            enabled: AtomicBool::new(false),
            applied_index: AtomicU64::new(0),
            issued: tokio::sync::Notify::new(),
        }
    }

    /// Called by the apply actor after each batch (so after the tokens it issued).
    pub fn set_applied(&self, index: u64) {
        self.applied_index.fetch_max(index, Ordering::Release);
    }

    /// The user a live token names, as `user`, except that a token whose issuing entry
    /// this member has not applied yet is waited for (bounded by MAX_TOKEN_WAIT): tokens
    /// are issued through raft, so one from any member works on every member. (For tokio
    /// callers; glommio ones poll `lookup` with their own timer.)
    pub async fn user_when_applied(&self, token: &str) -> Option<String> {
        let deadline = tokio::time::Instant::now() + MAX_TOKEN_WAIT;
        // Bounded by the deadline.
        loop {
            let notified = self.issued.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.lookup(token) {
                TokenLookup::Valid(user) => return Some(user),
                TokenLookup::Invalid => return None,
                TokenLookup::NotYetApplied => {}
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return None;
            }
            let wait = TOKEN_RECHECK.min(deadline - now);
            let _ = tokio::time::timeout(wait, notified).await;
        }
    }

    /// Whether `token` names a user now, may yet (its issuing entry is not applied here),
    /// or never will.
    pub fn lookup(&self, token: &str) -> TokenLookup {
        if let Some(user) = self.user(token) {
            return TokenLookup::Valid(user);
        }
        let issued_at = token
            .rsplit_once('.')
            .and_then(|(_, index)| index.parse::<u64>().ok());
        match issued_at {
            Some(index) if self.applied_index.load(Ordering::Acquire) < index => {
                TokenLookup::NotYetApplied
            }
            _ => TokenLookup::Invalid,
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Keeps the token whose table key (`<secret SHA-256>.<index>`, as the applied
    /// entry has it) is `key`.
    pub fn issue(&self, key: String, user: String) {
        if key.is_empty() || user.is_empty() {
            return; // never valid; the apply path only issues for existing users
        }
        let now = self.now_ms();
        let expires_ms = AtomicU64::new(now + self.ttl.as_millis() as u64);
        let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
        if table.len() >= MAX_TOKENS {
            table.retain(|_, t| t.expires_ms.load(Ordering::Relaxed) > now);
        }
        if table.len() < MAX_TOKENS {
            table.insert(key, Token { user, expires_ms });
        } else {
            tracing::warn!("{MAX_TOKENS} live auth tokens: a new one is not kept");
        }
        drop(table);
        self.issued.notify_waiters();
    }

    /// The user a live token names, renewing it.
    pub fn user(&self, token: &str) -> Option<String> {
        let key = table_key(token)?;
        let now = self.now_ms();
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        let t = table.get(&key)?;
        if t.expires_ms.load(Ordering::Relaxed) <= now {
            return None;
        }
        t.expires_ms
            .store(now + self.ttl.as_millis() as u64, Ordering::Relaxed);
        Some(t.user.clone())
    }

    pub fn auth_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Copies the stored flag (at start, after auth changes and snapshot installs).
    pub fn sync_enabled(&self, b: &Backend) {
        let on = b.read_txn().and_then(|txn| enabled(b, &txn));
        match on {
            Ok(on) => self.enabled.store(on, Ordering::Release),
            Err(e) => tracing::error!("reading the auth flag: {e}"),
        }
    }

    /// After an applied auth change: which tokens stop working.
    pub fn invalidate(&self, req: &AuthRequest) {
        let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
        match req {
            AuthRequest::Disable => table.clear(),
            AuthRequest::UserDelete { name } | AuthRequest::UserChangePassword { name, .. } => {
                table.retain(|_, t| t.user != *name)
            }
            _ => {}
        }
    }
}

/// The SHA-256 (hex) of a token's secret part: what raft entries and the token table
/// hold instead of the secret.
pub fn secret_sha256(secret: &str) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(secret.as_bytes()))
}

/// A client's token `<secret>.<index>` as the token table keys it.
fn table_key(token: &str) -> Option<String> {
    let (secret, index) = token.rsplit_once('.')?;
    Some(format!("{}.{index}", secret_sha256(secret)))
}

/// A random token prefix: 16 letters, as etcd's simple tokens start.
pub fn token_prefix() -> Result<String, KvError> {
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut raw = [0u8; 16];
    getrandom::getrandom(&mut raw).map_err(|e| KvError::Internal(format!("random: {e}")))?;
    Ok(raw
        .iter()
        .map(|b| LETTERS[*b as usize % LETTERS.len()] as char)
        .collect())
}

/// Hashes a password at `cost` (`--bcrypt-cost`; at etcd's default 10, tens of ms of CPU:
/// call it off any latency-sensitive executor).
pub fn hash_password(password: &str, cost: u32) -> Result<String, KvError> {
    bcrypt::hash(password, cost).map_err(|e| KvError::Internal(format!("bcrypt: {e}")))
}

/// Checks a password against a stored hash (CPU-heavy like `hash_password`).
pub fn password_matches(password: &str, hash: &str) -> bool {
    bcrypt::verify(password, hash).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perm(key: &str, end: &str) -> Permission {
        Permission {
            perm_type: PermType::Read,
            key: key.as_bytes().to_vec(),
            range_end: end.as_bytes().to_vec(),
        }
    }

    /// A token issued by an entry not yet applied here is waited for; one whose entry was
    /// applied without issuing it, or with no index, is refused at once.
    #[tokio::test]
    async fn tokens_from_other_members_wait_for_their_entry() {
        let tokens = std::sync::Arc::new(Tokens::new(Duration::from_secs(300)));
        tokens.set_applied(10);
        let start = Instant::now();
        assert_eq!(tokens.user_when_applied("abc.9").await, None);
        assert_eq!(tokens.user_when_applied("garbage").await, None);
        assert!(start.elapsed() < TOKEN_RECHECK, "refused without waiting");

        let applier = tokens.clone();
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(120)).await;
            applier.issue(format!("{}.12", secret_sha256("xyz")), "alice".into());
            applier.set_applied(12);
        });
        let start = Instant::now();
        assert_eq!(
            tokens.user_when_applied("xyz.12").await.as_deref(),
            Some("alice")
        );
        assert!(start.elapsed() >= Duration::from_millis(100));
        later.await.unwrap();
        // Applied past its index and never issued (ended before it got here): refused.
        assert_eq!(tokens.user_when_applied("nope.11").await, None);
    }

    #[test]
    fn ranges_are_covered_by_the_union_of_permissions() {
        let perms = [perm("/a/", "/a0"), perm("/b", ""), perm("/a0", "/c")];
        assert!(covered(&perms, b"/a/x", b""));
        assert!(covered(&perms, b"/a/", b"/b"), "two adjacent ranges join");
        assert!(covered(&perms, b"/b", b""));
        assert!(!covered(&perms, b"/c", b""));
        assert!(
            !covered(&perms, b"/a/", b"\0"),
            "unbounded needs an unbounded grant"
        );
        assert!(!covered(&perms, b"/", b"/a0"), "a gap before /a/");
        let all = [perm("", "\0")];
        assert!(covered(&all, b"anything", b"\0"));
        assert!(
            !covered(&[perm("/k", "")], b"/k", b"/l"),
            "one key is not a range"
        );
    }
}
