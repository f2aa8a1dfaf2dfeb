//! etcd's `Auth` service: users, roles and permissions (`kvset_storage::auth`, changed
//! through Raft), authentication with passwords, and its status.
//!
//! Every change is a `Command::Auth` run like any write, so it needs the `root` role once
//! authentication is enabled (`crate::auth`); before that anyone may prepare users and roles,
//! as in etcd. Passwords are hashed here, on the member that receives them. Reads (`UserGet`,
//! `RoleList`, …) answer from this member's applied state; a client that changed something
//! through a member reads it back there.

use kvset_proto::authpb;
use kvset_proto::etcdserverpb as epb;
use kvset_storage::auth::AuthCommand;
use kvset_storage::auth::PermKind;
use kvset_storage::auth::Permission;
use kvset_storage::Command;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::EtcdService;
use crate::auth::Needs;
use crate::errors::KvError;
use crate::forward::CallContext;
use crate::pb::etcd::errors;

impl EtcdService {
    /// Applies an access control change; answers with a header.
    async fn change(
        &self,
        ctx: &CallContext,
        change: AuthCommand,
    ) -> Result<Option<epb::ResponseHeader>, Status> {
        self.execute(Command::Auth(change), ctx).await?;
        Ok(self.header_now())
    }

    /// Refuses a read of users or roles unless auth is off or the caller is root (or `own`
    /// names the caller itself).
    fn may_read(&self, ctx: &CallContext, own: Option<&str>) -> Result<(), Status> {
        if let (Some(own), Ok(Some(caller))) = (own, self.member.caller(ctx)) {
            if caller == own {
                return Ok(());
            }
        }
        self.member.authorize(ctx, &Needs::admin(), "read users and roles").map_err(errors::from_kv)
    }

    /// A bcrypt hash of `password`, or the client's own hash, or none (`no_password`).
    async fn password_hash(
        &self,
        password: String,
        hashed: String,
        no_password: bool,
    ) -> Result<Option<String>, Status> {
        if no_password {
            return Ok(None);
        }
        if !hashed.is_empty() {
            if bcrypt::verify("", &hashed).is_err() {
                return Err(Status::from(KvError::InvalidArgument(
                    "kvset: hashedPassword is not a bcrypt hash".into(),
                )));
            }
            return Ok(Some(hashed));
        }
        let cost = self.member.config().auth.bcrypt_cost as u32;
        let hash = tokio::task::spawn_blocking(move || crate::auth::hash_password(&password, cost))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Some(hash))
    }
}

fn perm_kind(t: i32) -> Result<PermKind, Status> {
    match authpb::permission::Type::try_from(t) {
        Ok(authpb::permission::Type::Read) => Ok(PermKind::Read),
        Ok(authpb::permission::Type::Write) => Ok(PermKind::Write),
        Ok(authpb::permission::Type::Readwrite) => Ok(PermKind::ReadWrite),
        Err(_) => Err(Status::invalid_argument(format!("kvset: permission type {t} is not a known value"))),
    }
}

fn perm_type(kind: PermKind) -> i32 {
    match kind {
        PermKind::Read => authpb::permission::Type::Read as i32,
        PermKind::Write => authpb::permission::Type::Write as i32,
        PermKind::ReadWrite => authpb::permission::Type::Readwrite as i32,
    }
}

#[tonic::async_trait]
impl epb::auth_server::Auth for EtcdService {
    async fn auth_status(
        &self,
        _: Request<epb::AuthStatusRequest>,
    ) -> Result<Response<epb::AuthStatusResponse>, Status> {
        let state = self.member.reader().auth();
        Ok(Response::new(epb::AuthStatusResponse {
            header: self.header_now(),
            enabled: state.enabled,
            auth_revision: state.revision,
        }))
    }

    async fn authenticate(
        &self,
        req: Request<epb::AuthenticateRequest>,
    ) -> Result<Response<epb::AuthenticateResponse>, Status> {
        let remote = req.extensions().get::<crate::tls::ConnInfo>().and_then(|c| c.remote_addr);
        let r = req.into_inner();
        let state = self.member.reader().auth();
        if !state.enabled {
            return Err(errors::auth_not_enabled());
        }
        let hash = state.users.get(&r.name).and_then(|u| u.password_hash.clone());
        let password = r.password;
        // An unknown user costs the same bcrypt check as a known one: the answer's timing does
        // not tell which user names exist.
        let cost = self.member.config().auth.bcrypt_cost as u32;
        let matches = tokio::task::spawn_blocking(move || match hash {
            Some(hash) => crate::auth::password_matches(&password, &hash),
            None => {
                let _ = crate::auth::password_matches(&password, &crate::auth::dummy_hash(cost));
                false
            }
        })
        .await
        .unwrap_or(false);
        if !matches {
            tracing::warn!(user = %r.name, remote = ?remote, "authentication failed: unknown user or wrong password");
            return Err(errors::auth_failed());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let ttl_ms = self.member.config().auth.token_ttl_seconds.saturating_mul(1000);
        let token = crate::auth::issue_token(&state, self.member.token_secret(), &r.name, now, ttl_ms)
            .map_err(errors::from_kv)?;
        Ok(Response::new(epb::AuthenticateResponse { header: self.header_now(), token }))
    }

    async fn auth_enable(
        &self,
        req: Request<epb::AuthEnableRequest>,
    ) -> Result<Response<epb::AuthEnableResponse>, Status> {
        let ctx = CallContext::of(&req);
        let token_key = rand::random::<[u8; 32]>().to_vec();
        let header = self.change(&ctx, AuthCommand::Enable { token_key }).await?;
        tracing::info!("authentication enabled");
        Ok(Response::new(epb::AuthEnableResponse { header }))
    }

    async fn auth_disable(
        &self,
        req: Request<epb::AuthDisableRequest>,
    ) -> Result<Response<epb::AuthDisableResponse>, Status> {
        let ctx = CallContext::of(&req);
        let header = self.change(&ctx, AuthCommand::Disable).await?;
        tracing::warn!("authentication disabled: every client may do everything");
        Ok(Response::new(epb::AuthDisableResponse { header }))
    }

    async fn user_add(
        &self,
        req: Request<epb::AuthUserAddRequest>,
    ) -> Result<Response<epb::AuthUserAddResponse>, Status> {
        let ctx = CallContext::of(&req);
        // Refuse before hashing: hashing is slow on purpose.
        self.member.authorize(&ctx, &Needs::admin(), "add users").map_err(errors::from_kv)?;
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(Status::from(crate::errors::auth_rejected(
                &kvset_storage::auth::AuthError::UserEmpty,
            )));
        }
        let no_password = r.options.is_some_and(|o| o.no_password);
        let password_hash = self.password_hash(r.password, r.hashed_password, no_password).await?;
        let header = self.change(&ctx, AuthCommand::UserAdd { name: r.name, password_hash }).await?;
        Ok(Response::new(epb::AuthUserAddResponse { header }))
    }

    async fn user_get(
        &self,
        req: Request<epb::AuthUserGetRequest>,
    ) -> Result<Response<epb::AuthUserGetResponse>, Status> {
        let ctx = CallContext::of(&req);
        let r = req.into_inner();
        self.may_read(&ctx, Some(&r.name))?;
        let state = self.member.reader().auth();
        let user = state.users.get(&r.name).ok_or_else(|| {
            Status::from(KvError::FailedPrecondition(
                kvset_storage::auth::AuthError::UserNotFound.to_string(),
            ))
        })?;
        Ok(Response::new(epb::AuthUserGetResponse {
            header: self.header_now(),
            roles: user.roles.iter().cloned().collect(),
        }))
    }

    async fn user_list(
        &self,
        req: Request<epb::AuthUserListRequest>,
    ) -> Result<Response<epb::AuthUserListResponse>, Status> {
        self.may_read(&CallContext::of(&req), None)?;
        let state = self.member.reader().auth();
        Ok(Response::new(epb::AuthUserListResponse {
            header: self.header_now(),
            users: state.users.keys().cloned().collect(),
        }))
    }

    async fn user_delete(
        &self,
        req: Request<epb::AuthUserDeleteRequest>,
    ) -> Result<Response<epb::AuthUserDeleteResponse>, Status> {
        let ctx = CallContext::of(&req);
        let header = self.change(&ctx, AuthCommand::UserDelete { name: req.into_inner().name }).await?;
        Ok(Response::new(epb::AuthUserDeleteResponse { header }))
    }

    async fn user_change_password(
        &self,
        req: Request<epb::AuthUserChangePasswordRequest>,
    ) -> Result<Response<epb::AuthUserChangePasswordResponse>, Status> {
        let ctx = CallContext::of(&req);
        self.member.authorize(&ctx, &Needs::admin(), "change passwords").map_err(errors::from_kv)?;
        let r = req.into_inner();
        let password_hash = self.password_hash(r.password, r.hashed_password, false).await?;
        let header =
            self.change(&ctx, AuthCommand::UserChangePassword { name: r.name, password_hash }).await?;
        Ok(Response::new(epb::AuthUserChangePasswordResponse { header }))
    }

    async fn user_grant_role(
        &self,
        req: Request<epb::AuthUserGrantRoleRequest>,
    ) -> Result<Response<epb::AuthUserGrantRoleResponse>, Status> {
        let ctx = CallContext::of(&req);
        let r = req.into_inner();
        let header = self.change(&ctx, AuthCommand::UserGrantRole { user: r.user, role: r.role }).await?;
        Ok(Response::new(epb::AuthUserGrantRoleResponse { header }))
    }

    async fn user_revoke_role(
        &self,
        req: Request<epb::AuthUserRevokeRoleRequest>,
    ) -> Result<Response<epb::AuthUserRevokeRoleResponse>, Status> {
        let ctx = CallContext::of(&req);
        let r = req.into_inner();
        let header = self.change(&ctx, AuthCommand::UserRevokeRole { user: r.name, role: r.role }).await?;
        Ok(Response::new(epb::AuthUserRevokeRoleResponse { header }))
    }

    async fn role_add(
        &self,
        req: Request<epb::AuthRoleAddRequest>,
    ) -> Result<Response<epb::AuthRoleAddResponse>, Status> {
        let ctx = CallContext::of(&req);
        let header = self.change(&ctx, AuthCommand::RoleAdd { name: req.into_inner().name }).await?;
        Ok(Response::new(epb::AuthRoleAddResponse { header }))
    }

    async fn role_get(
        &self,
        req: Request<epb::AuthRoleGetRequest>,
    ) -> Result<Response<epb::AuthRoleGetResponse>, Status> {
        let ctx = CallContext::of(&req);
        self.may_read(&ctx, None)?;
        let name = req.into_inner().role;
        let state = self.member.reader().auth();
        let role = state.roles.get(&name).ok_or_else(|| {
            Status::from(KvError::FailedPrecondition(
                kvset_storage::auth::AuthError::RoleNotFound.to_string(),
            ))
        })?;
        Ok(Response::new(epb::AuthRoleGetResponse {
            header: self.header_now(),
            perm: role
                .permissions
                .iter()
                .map(|p| authpb::Permission {
                    perm_type: perm_type(p.kind),
                    key: p.key.clone(),
                    range_end: p.range_end.clone(),
                })
                .collect(),
        }))
    }

    async fn role_list(
        &self,
        req: Request<epb::AuthRoleListRequest>,
    ) -> Result<Response<epb::AuthRoleListResponse>, Status> {
        self.may_read(&CallContext::of(&req), None)?;
        let state = self.member.reader().auth();
        Ok(Response::new(epb::AuthRoleListResponse {
            header: self.header_now(),
            roles: state.roles.keys().cloned().collect(),
        }))
    }

    async fn role_delete(
        &self,
        req: Request<epb::AuthRoleDeleteRequest>,
    ) -> Result<Response<epb::AuthRoleDeleteResponse>, Status> {
        let ctx = CallContext::of(&req);
        let header = self.change(&ctx, AuthCommand::RoleDelete { name: req.into_inner().role }).await?;
        Ok(Response::new(epb::AuthRoleDeleteResponse { header }))
    }

    async fn role_grant_permission(
        &self,
        req: Request<epb::AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<epb::AuthRoleGrantPermissionResponse>, Status> {
        let ctx = CallContext::of(&req);
        let r = req.into_inner();
        let perm = r.perm.ok_or_else(|| Status::invalid_argument("etcdserver: permission not given"))?;
        let permission =
            Permission { kind: perm_kind(perm.perm_type)?, key: perm.key, range_end: perm.range_end };
        let header = self.change(&ctx, AuthCommand::RoleGrantPermission { role: r.name, permission }).await?;
        Ok(Response::new(epb::AuthRoleGrantPermissionResponse { header }))
    }

    async fn role_revoke_permission(
        &self,
        req: Request<epb::AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<epb::AuthRoleRevokePermissionResponse>, Status> {
        let ctx = CallContext::of(&req);
        let r = req.into_inner();
        let change = AuthCommand::RoleRevokePermission { role: r.role, key: r.key, range_end: r.range_end };
        let header = self.change(&ctx, change).await?;
        Ok(Response::new(epb::AuthRoleRevokePermissionResponse { header }))
    }
}
