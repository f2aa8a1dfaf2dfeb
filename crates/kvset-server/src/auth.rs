//! Access control at the door (docs/architecture.md, "Security"): who the caller is, and
//! whether it may do what it asks, against the replicated users, roles and permissions
//! (`kvset_storage::auth`). One check for both client APIs: `LocalMember::execute` and
//! `::read` call it on the domain command or query, so no handler of kvset.v1 or of the etcd
//! API can forget it; watches and administrative calls check their own needs the same way.
//!
//! * **Identity**: a token from `Authenticate` in the `token` (or `authorization`) metadata
//!   entry, as etcd's clients send it; else the common name of the client's verified TLS
//!   certificate (etcd's `--client-cert-auth`); else none, which is refused while
//!   authentication is enabled (etcd's "user name is empty").
//! * **Tokens** are stateless and work on every member: user, expiry and the user's password
//!   epoch, signed with HMAC-SHA-256 under the key minted when authentication was enabled
//!   (replicated with the rest of the state). A password change or the user's deletion ends
//!   its tokens at once; a token expires after `auth.token_ttl_seconds`.
//! * **Passwords** are hashed with bcrypt (`auth.bcrypt_cost`, etcd's default 10) by the
//!   member that receives them, before anything is proposed: the log and snapshots hold hashes
//!   only.
//! * **What is checked**: reads need read permission on every key of the range; puts and
//!   deletes write permission; a transaction needs permission for every compare and every op
//!   of both branches (etcd's rule); revoking a lease needs write permission on its keys;
//!   compaction, membership, snapshots, defragmentation and user/role management need the
//!   `root` role. Grants and keep-alives of leases need an authenticated caller only.
//!
//! Checked twice: here, at the member that receives the request (fast refusals), and again
//! where it takes effect against the newest state — commands when they apply (the state machine
//! checks a `Command::AsUser` against the users, roles and lease keys of that moment, as etcd
//! checks at apply), forwarded reads on the leader (the read names its caller). A permission
//! taken away, or a key attached to a lease, after the first check cannot be used through it.

use std::time::SystemTime;
use std::time::UNIX_EPOCH;

use kvset_storage::auth::Access;
use kvset_storage::auth::AuthState;
use kvset_storage::KeyRange;
use ring::hmac;

use crate::errors::KvError;
use crate::query::Query;

/// The metadata entries a token arrives in (etcd's clients use `token`).
const TOKEN_KEYS: [&str; 2] = ["token", "authorization"];

/// What a request says about its caller, before it is checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub token: Option<String>,
    /// The common name of the verified client certificate, if one was presented.
    pub cert_user: Option<String>,
}

impl Credentials {
    /// The credentials of `request`.
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        let token = TOKEN_KEYS
            .iter()
            .find_map(|k| request.metadata().get(*k))
            .and_then(|v| v.to_str().ok())
            .map(|t| t.trim_start_matches("Bearer ").to_string());
        // Read from the certificate once, at the handshake.
        let cert_user = request
            .extensions()
            .get::<crate::tls::ConnInfo>()
            .and_then(|c| c.common_name.as_deref())
            .map(str::to_string);
        Self { token, cert_user }
    }
}

/// Why a caller is refused.
fn user_empty() -> KvError {
    KvError::InvalidArgument("etcdserver: user name is empty".into())
}

fn denied(user: &str, what: &str) -> KvError {
    tracing::warn!(user, what, "permission denied");
    KvError::PermissionDenied(format!("etcdserver: permission denied ({user} may not {what})"))
}

/// The caller of a request under `state`: `None` while authentication is disabled (everyone
/// may do everything), else the user, or why there is none.
pub fn caller(
    state: &AuthState,
    secret: &TokenSecret,
    credentials: &Credentials,
) -> Result<Option<String>, KvError> {
    if !state.enabled {
        return Ok(None);
    }
    if let Some(token) = &credentials.token {
        return verify_token(state, secret, token, now_ms()).map(Some);
    }
    match &credentials.cert_user {
        Some(user) if state.users.contains_key(user) => Ok(Some(user.clone())),
        Some(user) => Err(denied(user, "log in: no such user (certificate common name)")),
        None => Err(user_empty()),
    }
}

pub use kvset_storage::auth::Needs;

/// What answering `query` needs; `lease_keys` lists the keys attached to a lease (a lease's
/// time-to-live with its keys names them: reading their names needs read access).
pub fn needs_of_query(query: &Query, lease_keys: impl Fn(i64) -> Vec<Vec<u8>>) -> Needs {
    match query {
        Query::Get { key, .. } => Needs::read(&KeyRange::single(key.clone())),
        Query::Range(r) => Needs::read(&r.range),
        Query::Lease { id, keys: true } => {
            let mut n = Needs::default();
            for key in lease_keys(*id) {
                n.add(Access::Read, &KeyRange::single(key));
            }
            n
        }
        Query::Lease { keys: false, .. } | Query::Leases => Needs::default(),
    }
}

/// Checks that `user` (from [`caller`]) has what `needs` asks; `what` names the request in
/// the refusal and the log.
pub fn check(state: &AuthState, user: Option<&str>, needs: &Needs, what: &str) -> Result<(), KvError> {
    let Some(user) = user else { return Ok(()) };
    if state.allows(user, needs) {
        Ok(())
    } else {
        Err(denied(user, what))
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 2048 {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// The shortest secret `auth.token_key_file` may hold.
pub const MIN_TOKEN_SECRET_BYTES: usize = 32;

/// What token signatures depend on besides the replicated key (minted at each `AuthEnable`,
/// kept in the replicated state and so on every volume): a secret of the members only, from
/// `auth.token_key_file` (a Kubernetes Secret), when one is configured. With it, whoever holds a
/// volume cannot sign tokens; without it, the replicated key alone signs. Backups hold neither.
#[derive(Clone, Default)]
pub struct TokenSecret(Option<std::sync::Arc<[u8]>>);

impl std::fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "TokenSecret(file)" } else { "TokenSecret(none)" })
    }
}

impl TokenSecret {
    /// The secret in `path` (empty: none). Refuses a missing, unreadable or short file.
    pub fn load(path: &str) -> Result<Self, String> {
        if path.is_empty() {
            return Ok(Self(None));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("auth.token_key_file {path}: {e}"))?;
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < MIN_TOKEN_SECRET_BYTES {
            return Err(format!(
                "auth.token_key_file {path}: holds {} bytes; at least {MIN_TOKEN_SECRET_BYTES} are needed",
                trimmed.len()
            ));
        }
        Ok(Self(Some(trimmed.into())))
    }

    /// The signing key under `state`: the replicated key, or an HMAC of it under the secret.
    fn key(&self, state: &AuthState) -> hmac::Key {
        match &self.0 {
            None => hmac::Key::new(hmac::HMAC_SHA256, &state.token_key),
            Some(secret) => {
                let derived = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), &state.token_key);
                hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref())
            }
        }
    }
}

/// A token for `user`, valid for `ttl_ms` from `now_ms`.
pub fn issue_token(
    state: &AuthState,
    secret: &TokenSecret,
    user: &str,
    now_ms: u64,
    ttl_ms: u64,
) -> Result<String, KvError> {
    let epoch =
        state.users.get(user).map(|u| u.epoch).ok_or_else(|| KvError::Internal("no such user".into()))?;
    let payload = format!("{}.{}.{epoch}", hex(user.as_bytes()), now_ms.saturating_add(ttl_ms));
    let signature = hmac::sign(&secret.key(state), payload.as_bytes());
    Ok(format!("{payload}.{}", hex(signature.as_ref())))
}

/// The user a token names, if it is genuine, unexpired and still current.
pub fn verify_token(
    state: &AuthState,
    secret: &TokenSecret,
    token: &str,
    now_ms: u64,
) -> Result<String, KvError> {
    let invalid = |why: &str| {
        tracing::debug!(why, "invalid auth token");
        KvError::Unauthenticated("etcdserver: invalid auth token".into())
    };
    let (payload, signature) = token.rsplit_once('.').ok_or_else(|| invalid("malformed"))?;
    let key = secret.key(state);
    let signature = unhex(signature).ok_or_else(|| invalid("malformed signature"))?;
    hmac::verify(&key, payload.as_bytes(), &signature).map_err(|_| invalid("bad signature"))?;
    let mut parts = payload.split('.');
    let (Some(user), Some(expiry), Some(epoch), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("malformed payload"));
    };
    let user =
        unhex(user).and_then(|u| String::from_utf8(u).ok()).ok_or_else(|| invalid("malformed user"))?;
    let expiry: u64 = expiry.parse().map_err(|_| invalid("malformed expiry"))?;
    let epoch: u64 = epoch.parse().map_err(|_| invalid("malformed epoch"))?;
    if now_ms >= expiry {
        return Err(invalid("expired"));
    }
    match state.users.get(&user) {
        Some(u) if u.epoch == epoch => Ok(user),
        Some(_) => Err(invalid("the password changed")),
        None => Err(invalid("the user was deleted")),
    }
}

/// Hashes `password` with bcrypt at `cost` (slow on purpose: run it on the blocking pool).
pub fn hash_password(password: &str, cost: u32) -> Result<String, KvError> {
    if password.is_empty() {
        return Err(KvError::InvalidArgument(
            "kvset: the password is empty; give one, or add the user with no password (certificate login only)".into(),
        ));
    }
    if password.len() > 72 {
        return Err(KvError::InvalidArgument("kvset: passwords are at most 72 bytes (bcrypt)".into()));
    }
    bcrypt::hash(password, cost).map_err(|e| KvError::Internal(format!("hashing the password: {e}")))
}

/// A fixed bcrypt hash at `cost`, checked against for unknown users (computed once per cost).
pub fn dummy_hash(cost: u32) -> String {
    static CACHE: std::sync::Mutex<Vec<(u32, String)>> = std::sync::Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, h)) = cache.iter().find(|(c, _)| *c == cost) {
        return h.clone();
    }
    let h = bcrypt::hash("kvset: no such user", cost).unwrap_or_default();
    cache.push((cost, h.clone()));
    h
}

/// Whether `password` matches `hash` (slow on purpose: run it on the blocking pool).
pub fn password_matches(password: &str, hash: &str) -> bool {
    password.len() <= 72 && bcrypt::verify(password, hash).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use kvset_storage::auth::AuthCommand;
    use kvset_storage::auth::PermKind;
    use kvset_storage::auth::Permission;
    use kvset_storage::Command;

    use super::*;

    fn state() -> AuthState {
        let mut s = AuthState::default();
        for c in [
            AuthCommand::UserAdd { name: "root".into(), password_hash: None },
            AuthCommand::UserGrantRole { user: "root".into(), role: "root".into() },
            AuthCommand::UserAdd { name: "app".into(), password_hash: None },
            AuthCommand::RoleAdd { name: "apps".into() },
            AuthCommand::RoleGrantPermission {
                role: "apps".into(),
                permission: Permission {
                    kind: PermKind::ReadWrite,
                    key: b"/app/".to_vec(),
                    range_end: b"/app0".to_vec(),
                },
            },
            AuthCommand::UserGrantRole { user: "app".into(), role: "apps".into() },
            AuthCommand::Enable { token_key: vec![7; 32] },
        ] {
            s.apply(&c).unwrap();
        }
        s
    }

    fn none_secret() -> TokenSecret {
        TokenSecret::default()
    }

    /// Issue 24, item 8: with `auth.token_key_file`, the replicated key (on every volume) no
    /// longer signs tokens by itself, and members sharing the file accept each other's tokens.
    #[test]
    fn with_a_secret_file_the_replicated_key_alone_signs_nothing() {
        let s = state();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token-key");
        std::fs::write(&file, [42u8; 40]).unwrap();
        let secret = TokenSecret::load(file.to_str().unwrap()).unwrap();
        let t = issue_token(&s, &secret, "app", 1_000, 500).unwrap();
        assert_eq!(
            verify_token(&s, &TokenSecret::load(file.to_str().unwrap()).unwrap(), &t, 1_200).unwrap(),
            "app"
        );
        let forged = issue_token(&s, &none_secret(), "app", 1_000, 500).unwrap();
        assert!(verify_token(&s, &secret, &forged, 1_200).is_err(), "signed with the volume's key alone");
        assert!(verify_token(&s, &none_secret(), &t, 1_200).is_err(), "a member without the file");
        std::fs::write(&file, b"short").unwrap();
        let e = TokenSecret::load(file.to_str().unwrap()).unwrap_err();
        assert!(e.contains("at least 32"), "{e}");
        assert!(TokenSecret::load("/nonexistent/token-key").unwrap_err().contains("/nonexistent/token-key"));
    }

    #[test]
    fn tokens_are_checked_for_signature_expiry_and_password_epoch() {
        let mut s = state();
        let t = issue_token(&s, &none_secret(), "app", 1_000, 500).unwrap();
        assert_eq!(verify_token(&s, &none_secret(), &t, 1_200).unwrap(), "app");
        assert!(verify_token(&s, &none_secret(), &t, 1_500).is_err(), "expired");
        // Tampering: another user in the payload, or another key.
        let forged = t.replacen(&hex(b"app"), &hex(b"root"), 1);
        assert!(verify_token(&s, &none_secret(), &forged, 1_200).is_err(), "a forged user");
        let mut other = s.clone();
        other.token_key = vec![8; 32];
        assert!(verify_token(&other, &none_secret(), &t, 1_200).is_err(), "another cluster's key");
        for garbage in ["", ".", "a.b", "zz.zz.zz.zz", &format!("{t}x"), "...."] {
            assert!(verify_token(&s, &none_secret(), garbage, 1_200).is_err(), "{garbage:?}");
        }
        s.apply(&AuthCommand::UserChangePassword { name: "app".into(), password_hash: None }).unwrap();
        assert!(verify_token(&s, &none_secret(), &t, 1_200).is_err(), "the password changed");
        let t = issue_token(&s, &none_secret(), "app", 1_000, 500).unwrap();
        s.apply(&AuthCommand::UserDelete { name: "app".into() }).unwrap();
        assert!(verify_token(&s, &none_secret(), &t, 1_200).is_err(), "the user was deleted");
    }

    #[test]
    fn callers_and_needs() {
        let s = state();
        let none = Credentials::default();
        assert!(
            matches!(caller(&s, &none_secret(), &none), Err(KvError::InvalidArgument(m)) if m.contains("user name is empty"))
        );
        assert_eq!(
            caller(&AuthState::default(), &none_secret(), &none).unwrap(),
            None,
            "auth disabled: no caller needed"
        );
        let cert = Credentials { token: None, cert_user: Some("app".into()) };
        assert_eq!(caller(&s, &none_secret(), &cert).unwrap().as_deref(), Some("app"));
        let stranger = Credentials { token: None, cert_user: Some("stranger".into()) };
        assert!(caller(&s, &none_secret(), &stranger).is_err());

        let put = |k: &[u8]| Command::Put(kvset_storage::Put::new(k.to_vec(), b"v".to_vec()));
        let ok = |c: &Command| check(&s, Some("app"), &Needs::of_command(c, |_| Vec::new()), "test");
        assert!(ok(&put(b"/app/x")).is_ok());
        assert!(matches!(ok(&put(b"/other")), Err(KvError::PermissionDenied(_))));
        assert!(ok(&Command::Compact(3)).is_err(), "compaction is administrative");
        // Returning the previous value is a read: a write-only grant does not give it.
        let mut s = s.clone();
        s.apply(&kvset_storage::auth::AuthCommand::RoleGrantPermission {
            role: "apps".into(),
            permission: Permission {
                kind: PermKind::Write,
                key: b"/wo/".to_vec(),
                range_end: b"/wo0".to_vec(),
            },
        })
        .unwrap();
        let ok = |c: &Command| check(&s, Some("app"), &Needs::of_command(c, |_| Vec::new()), "test");
        assert!(ok(&put(b"/wo/x")).is_ok());
        let mut with_prev = kvset_storage::Put::new(b"/wo/x".to_vec(), b"v".to_vec());
        with_prev.prev_kv = true;
        assert!(ok(&Command::Put(with_prev)).is_err(), "prev_kv on a write-only key");
        let delete = |prev_kv| {
            Command::Delete(kvset_storage::Delete { range: KeyRange::single(b"/wo/x".to_vec()), prev_kv })
        };
        assert!(ok(&delete(false)).is_ok());
        assert!(ok(&delete(true)).is_err(), "prev_kv on a write-only delete");
        assert!(ok(&Command::LeaseGrant { id: 1, ttl: 10 }).is_ok());
        let revoke =
            Needs::of_command(&Command::LeaseRevoke(1), |_| vec![b"/app/a".to_vec(), b"/etc".to_vec()]);
        assert!(
            check(&s, Some("app"), &revoke, "revoke").is_err(),
            "a lease holding a key outside the grant"
        );
        assert!(check(&s, Some("root"), &Needs::admin(), "admin").is_ok());
        let ttl = |keys| needs_of_query(&Query::Lease { id: 1, keys }, |_| vec![b"/etc".to_vec()]);
        assert!(check(&s, Some("app"), &ttl(true), "ttl").is_err(), "the names of keys outside the grant");
        assert!(check(&s, Some("app"), &ttl(false), "ttl").is_ok());
        assert!(check(&s, None, &Needs::admin(), "auth off").is_ok());
    }

    #[test]
    fn the_common_name_is_read_from_real_certificates_and_garbage_is_none() {
        let ca = crate::devcerts::Authority::new("CA").unwrap();
        let issued = ca.issue(&crate::devcerts::Request::client("alice")).unwrap();
        let path = std::path::Path::new("cert");
        let der = kvset_proto::tls::parse_certs(path, issued.cert_pem.as_bytes()).unwrap().remove(0);
        assert_eq!(crate::tls::common_name(der.as_ref()).as_deref(), Some("alice"));
        assert_eq!(crate::tls::subject_common_name(&[]), None);
        assert_eq!(crate::tls::subject_common_name(&[0x31, 0x05, 0x30, 0x03, 0x06, 0x01]), None);
        assert_eq!(crate::tls::common_name(b"not a certificate"), None);
    }
}
