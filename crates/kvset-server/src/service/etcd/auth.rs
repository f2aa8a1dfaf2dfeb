//! etcd's `Auth` service. kvset has no users or roles yet: `AuthStatus` reports
//! authentication disabled, `Authenticate` fails as etcd does when it is disabled, and every
//! call that manages users or roles is `UNIMPLEMENTED`, naming itself.

use kvset_proto::etcdserverpb as epb;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::EtcdService;
use crate::pb::etcd::errors;

/// The refusal of a user or role call.
fn no_auth(call: &str) -> Status {
    errors::unimplemented(&format!(
        "Auth.{call}: users, roles and authentication are not implemented yet; the client port has no access control \
         (restrict who reaches it with network policy)"
    ))
}

#[tonic::async_trait]
impl epb::auth_server::Auth for EtcdService {
    async fn auth_status(
        &self,
        _: Request<epb::AuthStatusRequest>,
    ) -> Result<Response<epb::AuthStatusResponse>, Status> {
        Ok(Response::new(epb::AuthStatusResponse {
            header: self.header_now(),
            enabled: false,
            auth_revision: 0,
        }))
    }

    async fn authenticate(
        &self,
        _: Request<epb::AuthenticateRequest>,
    ) -> Result<Response<epb::AuthenticateResponse>, Status> {
        Err(errors::auth_not_enabled())
    }

    async fn auth_enable(
        &self,
        _: Request<epb::AuthEnableRequest>,
    ) -> Result<Response<epb::AuthEnableResponse>, Status> {
        Err(no_auth("AuthEnable"))
    }

    async fn auth_disable(
        &self,
        _: Request<epb::AuthDisableRequest>,
    ) -> Result<Response<epb::AuthDisableResponse>, Status> {
        Err(no_auth("AuthDisable"))
    }

    async fn user_add(
        &self,
        _: Request<epb::AuthUserAddRequest>,
    ) -> Result<Response<epb::AuthUserAddResponse>, Status> {
        Err(no_auth("UserAdd"))
    }

    async fn user_get(
        &self,
        _: Request<epb::AuthUserGetRequest>,
    ) -> Result<Response<epb::AuthUserGetResponse>, Status> {
        Err(no_auth("UserGet"))
    }

    async fn user_list(
        &self,
        _: Request<epb::AuthUserListRequest>,
    ) -> Result<Response<epb::AuthUserListResponse>, Status> {
        Err(no_auth("UserList"))
    }

    async fn user_delete(
        &self,
        _: Request<epb::AuthUserDeleteRequest>,
    ) -> Result<Response<epb::AuthUserDeleteResponse>, Status> {
        Err(no_auth("UserDelete"))
    }

    async fn user_change_password(
        &self,
        _: Request<epb::AuthUserChangePasswordRequest>,
    ) -> Result<Response<epb::AuthUserChangePasswordResponse>, Status> {
        Err(no_auth("UserChangePassword"))
    }

    async fn user_grant_role(
        &self,
        _: Request<epb::AuthUserGrantRoleRequest>,
    ) -> Result<Response<epb::AuthUserGrantRoleResponse>, Status> {
        Err(no_auth("UserGrantRole"))
    }

    async fn user_revoke_role(
        &self,
        _: Request<epb::AuthUserRevokeRoleRequest>,
    ) -> Result<Response<epb::AuthUserRevokeRoleResponse>, Status> {
        Err(no_auth("UserRevokeRole"))
    }

    async fn role_add(
        &self,
        _: Request<epb::AuthRoleAddRequest>,
    ) -> Result<Response<epb::AuthRoleAddResponse>, Status> {
        Err(no_auth("RoleAdd"))
    }

    async fn role_get(
        &self,
        _: Request<epb::AuthRoleGetRequest>,
    ) -> Result<Response<epb::AuthRoleGetResponse>, Status> {
        Err(no_auth("RoleGet"))
    }

    async fn role_list(
        &self,
        _: Request<epb::AuthRoleListRequest>,
    ) -> Result<Response<epb::AuthRoleListResponse>, Status> {
        Err(no_auth("RoleList"))
    }

    async fn role_delete(
        &self,
        _: Request<epb::AuthRoleDeleteRequest>,
    ) -> Result<Response<epb::AuthRoleDeleteResponse>, Status> {
        Err(no_auth("RoleDelete"))
    }

    async fn role_grant_permission(
        &self,
        _: Request<epb::AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<epb::AuthRoleGrantPermissionResponse>, Status> {
        Err(no_auth("RoleGrantPermission"))
    }

    async fn role_revoke_permission(
        &self,
        _: Request<epb::AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<epb::AuthRoleRevokePermissionResponse>, Status> {
        Err(no_auth("RoleRevokePermission"))
    }
}
