//! Users, roles and key permissions (etcd's model), replicated through Raft as part of the
//! state machine: every change is an [`AuthCommand`] applied in log order, so every member
//! holds the same [`AuthState`] at the same log index, and snapshots carry it.
//!
//! The rules are etcd's (`server/auth/store.go`): a user holds roles, a role holds permissions
//! (read, write or both) on a key or a key range; the role `root` grants everything and need
//! not be created; authentication can be enabled only once a user `root` with the role `root`
//! exists, and while it is enabled neither can be taken away. Every successful change bumps
//! the auth revision. Passwords arrive here already hashed (the member that received the
//! request hashes them), so applying stays deterministic and cheap.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use serde::Deserialize;
use serde::Serialize;

/// The name of the all-powerful user and role.
pub const ROOT: &str = "root";

/// What a permission allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PermKind {
    Read,
    Write,
    ReadWrite,
}

impl PermKind {
    /// Whether it allows `access`.
    pub fn allows(self, access: Access) -> bool {
        matches!(
            (self, access),
            (PermKind::ReadWrite, _) | (PermKind::Read, Access::Read) | (PermKind::Write, Access::Write)
        )
    }
}

/// A kind of access to keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// A permission on one key (`range_end` empty), on `[key, range_end)`, or on every key from
/// `key` on (`range_end` = `[0]`), as etcd writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permission {
    pub kind: PermKind,
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
}

/// A user: its password hash (`None`: password login refused, certificate only) and roles.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub password_hash: Option<String>,
    pub roles: BTreeSet<String>,
    /// Bumped when the password changes: tokens issued before are no longer valid.
    pub epoch: u64,
}

/// A role: its permissions, in the order granted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    pub permissions: Vec<Permission>,
}

/// Everything access control knows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthState {
    pub enabled: bool,
    /// Bumped by every successful change.
    pub revision: u64,
    /// The key tokens are signed with, minted by the member that proposed `Enable` (the same
    /// on every member, so any member accepts any member's tokens).
    pub token_key: Vec<u8>,
    pub users: BTreeMap<String, User>,
    pub roles: BTreeMap<String, Role>,
}

/// A change to the access control state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthCommand {
    Enable { token_key: Vec<u8> },
    Disable,
    UserAdd { name: String, password_hash: Option<String> },
    UserDelete { name: String },
    UserChangePassword { name: String, password_hash: Option<String> },
    UserGrantRole { user: String, role: String },
    UserRevokeRole { user: String, role: String },
    RoleAdd { name: String },
    RoleDelete { name: String },
    RoleGrantPermission { role: String, permission: Permission },
    RoleRevokePermission { role: String, key: Vec<u8>, range_end: Vec<u8> },
}

/// Why a change was refused; the texts are etcd's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum AuthError {
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: user name not found")]
    UserNotFound,
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    /// The command's caller may not do what it asks, by the users, roles and lease keys as they
    /// were when it applied (last, so results written before it existed still decode).
    #[error("etcdserver: permission denied")]
    PermissionDenied,
}

/// What a command needs of its caller: administrative rights (the `root` role), or access to
/// key ranges — etcd's rules: reads need read access, puts and deletes write access (and read
/// access when they return previous values), a transaction everything of both branches and its
/// compares, a lease revoke write access to every key attached to the lease.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Needs {
    pub admin: bool,
    /// (access, key, range_end) in etcd's range forms: an empty `range_end` is the key alone,
    /// `[0]` every key from `key` on.
    pub ranges: Vec<(Access, Vec<u8>, Vec<u8>)>,
}

impl Needs {
    /// Administrative rights (the `root` role).
    pub fn admin() -> Self {
        Self { admin: true, ranges: Vec::new() }
    }

    /// Read access to `range`.
    pub fn read(range: &crate::KeyRange) -> Self {
        let mut n = Self::default();
        n.add(Access::Read, range);
        n
    }

    /// Adds `access` to `range`.
    pub fn add(&mut self, access: Access, range: &crate::KeyRange) {
        let end = match &range.end {
            crate::RangeEnd::Single => Vec::new(),
            crate::RangeEnd::Unbounded => vec![0],
            crate::RangeEnd::Before(end) => end.clone(),
        };
        self.ranges.push((access, range.start.clone(), end));
    }

    /// A put needs write access, and read access too when it returns the previous value.
    fn put(&mut self, p: &crate::Put) {
        let range = crate::KeyRange::single(p.key.clone());
        self.add(Access::Write, &range);
        if p.prev_kv {
            self.add(Access::Read, &range);
        }
    }

    /// A delete needs write access, and read access too when it returns the deleted values.
    fn delete(&mut self, d: &crate::Delete) {
        self.add(Access::Write, &d.range);
        if d.prev_kv {
            self.add(Access::Read, &d.range);
        }
    }

    fn txn(&mut self, t: &crate::Txn) {
        for c in &t.compares {
            self.add(Access::Read, &c.range);
        }
        for op in t.success.iter().chain(&t.failure) {
            match op {
                crate::TxnOp::Range(r) => self.add(Access::Read, &r.range),
                crate::TxnOp::Put(p) => self.put(p),
                crate::TxnOp::Delete(d) => self.delete(d),
                crate::TxnOp::Txn(t) => self.txn(t),
            }
        }
    }

    /// What applying `command` needs; `lease_keys` lists the keys attached to a lease.
    pub fn of_command(command: &crate::Command, lease_keys: impl Fn(i64) -> Vec<Vec<u8>>) -> Self {
        use crate::Command;
        let mut n = Self::default();
        match command {
            Command::Put(p) => n.put(p),
            Command::Delete(d) => n.delete(d),
            Command::Txn(t) => n.txn(t),
            Command::LeaseGrant { .. } => {}
            Command::LeaseRevoke(id) => {
                for key in lease_keys(*id) {
                    n.add(Access::Write, &crate::KeyRange::single(key));
                }
            }
            Command::SetReplicas(_) | Command::Compact(_) | Command::Auth(_) => n.admin = true,
            Command::AsUser { command, .. } => return Self::of_command(command, lease_keys),
        }
        n
    }
}

impl AuthState {
    /// Applies `command`, or refuses it leaving the state unchanged.
    pub fn apply(&mut self, command: &AuthCommand) -> Result<(), AuthError> {
        let mut next = self.clone();
        next.change(command)?;
        next.revision += 1;
        *self = next;
        Ok(())
    }

    fn user_mut(&mut self, name: &str) -> Result<&mut User, AuthError> {
        self.users.get_mut(name).ok_or(AuthError::UserNotFound)
    }

    fn role_mut(&mut self, name: &str) -> Result<&mut Role, AuthError> {
        self.roles.get_mut(name).ok_or(AuthError::RoleNotFound)
    }

    fn change(&mut self, command: &AuthCommand) -> Result<(), AuthError> {
        use AuthCommand as C;
        match command {
            C::Enable { token_key } => {
                let root = self.users.get(ROOT).ok_or(AuthError::RootUserNotExist)?;
                if !root.roles.contains(ROOT) {
                    return Err(AuthError::RootRoleNotExist);
                }
                // A new key each time authentication is turned on: tokens from before a
                // Disable do not come back.
                if !self.enabled {
                    self.token_key = token_key.clone();
                }
                self.enabled = true;
            }
            C::Disable => self.enabled = false,
            C::UserAdd { name, password_hash } => {
                if name.is_empty() {
                    return Err(AuthError::UserEmpty);
                }
                if self.users.contains_key(name) {
                    return Err(AuthError::UserAlreadyExist);
                }
                // The epoch is the auth revision (which only grows): tokens of an earlier user
                // of the same name stay dead.
                let epoch = self.revision + 1;
                let user = User { password_hash: password_hash.clone(), roles: BTreeSet::new(), epoch };
                self.users.insert(name.clone(), user);
            }
            C::UserDelete { name } => {
                if self.enabled && name == ROOT {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                self.users.remove(name).ok_or(AuthError::UserNotFound)?;
            }
            C::UserChangePassword { name, password_hash } => {
                let epoch = self.revision + 1;
                let user = self.user_mut(name)?;
                user.password_hash = password_hash.clone();
                user.epoch = epoch;
            }
            C::UserGrantRole { user, role } => {
                if role != ROOT && !self.roles.contains_key(role) {
                    return Err(AuthError::RoleNotFound);
                }
                self.user_mut(user)?.roles.insert(role.clone());
            }
            C::UserRevokeRole { user, role } => {
                if self.enabled && user == ROOT && role == ROOT {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                if !self.user_mut(user)?.roles.remove(role) {
                    return Err(AuthError::RoleNotGranted);
                }
            }
            C::RoleAdd { name } => {
                if name.is_empty() {
                    return Err(AuthError::RoleEmpty);
                }
                if self.roles.contains_key(name) {
                    return Err(AuthError::RoleAlreadyExist);
                }
                self.roles.insert(name.clone(), Role::default());
            }
            C::RoleDelete { name } => {
                if self.enabled && name == ROOT {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                self.roles.remove(name).ok_or(AuthError::RoleNotFound)?;
                for user in self.users.values_mut() {
                    user.roles.remove(name);
                }
            }
            C::RoleGrantPermission { role, permission } => {
                let role = self.role_mut(role)?;
                match role
                    .permissions
                    .iter_mut()
                    .find(|p| p.key == permission.key && p.range_end == permission.range_end)
                {
                    Some(p) => p.kind = permission.kind,
                    None => role.permissions.push(permission.clone()),
                }
            }
            C::RoleRevokePermission { role, key, range_end } => {
                let role = self.role_mut(role)?;
                let before = role.permissions.len();
                role.permissions.retain(|p| !(p.key == *key && p.range_end == *range_end));
                if role.permissions.len() == before {
                    return Err(AuthError::PermissionNotGranted);
                }
            }
        }
        Ok(())
    }

    /// Whether `user` holds the role `root`.
    pub fn is_root(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|u| u.roles.contains(ROOT))
    }

    /// Whether `user` has everything `needs` asks (`root` has everything).
    pub fn allows(&self, user: &str, needs: &Needs) -> bool {
        if self.is_root(user) {
            return true;
        }
        !needs.admin && needs.ranges.iter().all(|(access, key, end)| self.permitted(user, *access, key, end))
    }

    /// Whether `user` may `access` every key of `[key, range_end)` (etcd's range forms: an
    /// empty `range_end` is the key alone, `[0]` every key from `key` on). A range is allowed
    /// when the permissions of the user's roles together cover all of it.
    pub fn permitted(&self, user: &str, access: Access, key: &[u8], range_end: &[u8]) -> bool {
        let Some(u) = self.users.get(user) else { return false };
        if u.roles.contains(ROOT) {
            return true;
        }
        let mut granted: Vec<(Vec<u8>, Bound)> = u
            .roles
            .iter()
            .filter_map(|r| self.roles.get(r))
            .flat_map(|r| r.permissions.iter())
            .filter(|p| p.kind.allows(access))
            .map(|p| (p.key.clone(), Bound::of(&p.key, &p.range_end)))
            .collect();
        granted.sort();
        let want_end = Bound::of(key, range_end);
        // Walk the granted intervals in order, extending what is covered from `key` on.
        let mut covered_to = Bound::Key(key.to_vec());
        for (start, end) in granted {
            if Bound::Key(start) > covered_to {
                break;
            }
            if end > covered_to {
                covered_to = end;
            }
            if covered_to >= want_end {
                return true;
            }
        }
        covered_to >= want_end
    }
}

/// The exclusive end of an interval of keys.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Bound {
    Key(Vec<u8>),
    /// Past every key.
    Infinite,
}

impl Bound {
    /// The end of `[key, range_end)` in etcd's forms.
    fn of(key: &[u8], range_end: &[u8]) -> Self {
        match range_end {
            [] => {
                let mut next = key.to_vec();
                next.push(0);
                Bound::Key(next)
            }
            [0] => Bound::Infinite,
            end => Bound::Key(end.to_vec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> AuthState {
        let mut s = AuthState::default();
        for c in [
            AuthCommand::UserAdd { name: "root".into(), password_hash: Some("h".into()) },
            AuthCommand::UserGrantRole { user: "root".into(), role: "root".into() },
            AuthCommand::UserAdd { name: "app".into(), password_hash: Some("h".into()) },
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
        ] {
            s.apply(&c).unwrap();
        }
        s
    }

    #[test]
    fn enabling_needs_a_root_user_with_the_root_role() {
        let mut s = AuthState::default();
        let enable = AuthCommand::Enable { token_key: vec![1; 32] };
        assert_eq!(s.apply(&enable), Err(AuthError::RootUserNotExist));
        s.apply(&AuthCommand::UserAdd { name: "root".into(), password_hash: None }).unwrap();
        assert_eq!(s.apply(&enable), Err(AuthError::RootRoleNotExist));
        // The root role needs no creation.
        s.apply(&AuthCommand::UserGrantRole { user: "root".into(), role: "root".into() }).unwrap();
        let before = s.revision;
        s.apply(&enable).unwrap();
        assert!(s.enabled && s.revision == before + 1 && s.token_key == vec![1; 32]);
        // Enabling again keeps the key; enabling after a disable mints a new one.
        s.apply(&AuthCommand::Enable { token_key: vec![2; 32] }).unwrap();
        assert_eq!(s.token_key, vec![1; 32]);
        s.apply(&AuthCommand::Disable).unwrap();
        s.apply(&AuthCommand::Enable { token_key: vec![3; 32] }).unwrap();
        assert_eq!(s.token_key, vec![3; 32], "tokens from before the disable die");
        // While enabled, root cannot be removed or demoted.
        for c in [
            AuthCommand::UserDelete { name: "root".into() },
            AuthCommand::UserRevokeRole { user: "root".into(), role: "root".into() },
        ] {
            let unchanged = s.clone();
            assert_eq!(s.apply(&c), Err(AuthError::InvalidAuthMgmt));
            assert_eq!(s, unchanged, "a refused change changes nothing");
        }
    }

    #[test]
    fn users_and_roles_follow_etcds_rules() {
        let mut s = state();
        let refused = [
            (AuthCommand::UserAdd { name: "app".into(), password_hash: None }, AuthError::UserAlreadyExist),
            (AuthCommand::UserAdd { name: "".into(), password_hash: None }, AuthError::UserEmpty),
            (AuthCommand::RoleAdd { name: "".into() }, AuthError::RoleEmpty),
            (AuthCommand::RoleAdd { name: "apps".into() }, AuthError::RoleAlreadyExist),
            (AuthCommand::UserGrantRole { user: "app".into(), role: "nope".into() }, AuthError::RoleNotFound),
            (
                AuthCommand::UserGrantRole { user: "nope".into(), role: "apps".into() },
                AuthError::UserNotFound,
            ),
            (
                AuthCommand::UserRevokeRole { user: "app".into(), role: "other".into() },
                AuthError::RoleNotGranted,
            ),
            (
                AuthCommand::RoleRevokePermission {
                    role: "apps".into(),
                    key: b"x".to_vec(),
                    range_end: vec![],
                },
                AuthError::PermissionNotGranted,
            ),
            (AuthCommand::UserDelete { name: "nope".into() }, AuthError::UserNotFound),
        ];
        for (c, e) in refused {
            let unchanged = s.clone();
            assert_eq!(s.apply(&c), Err(e), "{c:?}");
            assert_eq!(s, unchanged);
        }
        // Granting the same key again changes the kind instead of adding a permission.
        s.apply(&AuthCommand::RoleGrantPermission {
            role: "apps".into(),
            permission: Permission {
                kind: PermKind::Read,
                key: b"/app/".to_vec(),
                range_end: b"/app0".to_vec(),
            },
        })
        .unwrap();
        assert_eq!(s.roles["apps"].permissions.len(), 1);
        assert!(!s.permitted("app", Access::Write, b"/app/x", b""));
        // Deleting a role takes it from every user.
        s.apply(&AuthCommand::RoleDelete { name: "apps".into() }).unwrap();
        assert!(s.users["app"].roles.is_empty());
        // A new password ends the tokens of the old one.
        let epoch = s.users["app"].epoch;
        s.apply(&AuthCommand::UserChangePassword { name: "app".into(), password_hash: Some("h2".into()) })
            .unwrap();
        assert!(s.users["app"].epoch > epoch);
        // A user deleted and added again under the same name does not get its old epoch back.
        let epoch = s.users["app"].epoch;
        s.apply(&AuthCommand::UserDelete { name: "app".into() }).unwrap();
        s.apply(&AuthCommand::UserAdd { name: "app".into(), password_hash: None }).unwrap();
        assert!(s.users["app"].epoch > epoch, "old tokens of that name stay dead");
    }

    #[test]
    fn a_range_is_permitted_only_when_the_grants_cover_all_of_it() {
        let mut s = state();
        assert!(s.permitted("app", Access::Read, b"/app/x", b""));
        assert!(s.permitted("app", Access::Write, b"/app/", b"/app0"));
        assert!(s.permitted("app", Access::Write, b"/app/a", b"/app/b"));
        assert!(!s.permitted("app", Access::Write, b"/app/", b"/app1"), "past the end");
        assert!(!s.permitted("app", Access::Read, b"/ap", b"/app/x"), "before the start");
        assert!(!s.permitted("app", Access::Read, b"/app/", &[0]), "every key from /app/ on");
        assert!(!s.permitted("app", Access::Read, b"/other", b""));
        assert!(!s.permitted("nobody", Access::Read, b"/app/x", b""));
        assert!(s.permitted("root", Access::Write, b"", &[0]), "root may do anything");
        // Two grants that touch cover their union; a gap between them does not.
        let grant = |key: &[u8], end: &[u8]| AuthCommand::RoleGrantPermission {
            role: "apps".into(),
            permission: Permission { kind: PermKind::Read, key: key.to_vec(), range_end: end.to_vec() },
        };
        s.apply(&grant(b"/app0", b"/app5")).unwrap();
        assert!(s.permitted("app", Access::Read, b"/app/", b"/app5"));
        assert!(!s.permitted("app", Access::Write, b"/app/", b"/app5"), "the second grant is read-only");
        s.apply(&grant(b"/app6", &[0])).unwrap();
        assert!(!s.permitted("app", Access::Read, b"/app/", &[0]), "the gap [/app5, /app6)");
        s.apply(&grant(b"/app5", b"/app6")).unwrap();
        assert!(s.permitted("app", Access::Read, b"/app/", &[0]));
        // A single key is the interval [key, key\0).
        s.apply(&grant(b"!k", b"")).unwrap();
        assert!(s.permitted("app", Access::Read, b"!k", b""));
        assert!(s.permitted("app", Access::Read, b"!k", b"!k\x00"));
        assert!(!s.permitted("app", Access::Read, b"!k", b"!k\x00\x00"), "!k\\0 is not granted");
    }
}
