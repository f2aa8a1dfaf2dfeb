//! The gateway's paths: etcd 3.5's `google.api.http` bindings of each RPC (POST, body `*`),
//! which the vendored protos leave out. Served under `/v3/` and, as etcd 3.4 did, `/v3beta/`.
//!
//! Every RPC of the eight services has a path except three, as in etcd: `Maintenance.HashKV`
//! (etcd 3.4 binds only `Hash` to `/v3/maintenance/hash`), `Maintenance.Downgrade` and
//! `Auth.Status`, which etcd 3.4 does not bind; `rpcs_and_paths_cover_every_method` checks the
//! table against the descriptors, so a method added to a proto cannot be forgotten.

/// One gateway call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    Range,
    Put,
    DeleteRange,
    Txn,
    Compact,
    Watch,
    LeaseGrant,
    LeaseRevoke,
    LeaseKeepAlive,
    LeaseTimeToLive,
    LeaseLeases,
    MemberAdd,
    MemberRemove,
    MemberUpdate,
    MemberList,
    MemberPromote,
    Alarm,
    Status,
    Defragment,
    Hash,
    Snapshot,
    MoveLeader,
    AuthEnable,
    AuthDisable,
    Authenticate,
    UserAdd,
    UserGet,
    UserList,
    UserDelete,
    UserChangePassword,
    UserGrantRole,
    UserRevokeRole,
    RoleAdd,
    RoleGet,
    RoleList,
    RoleDelete,
    RoleGrantPermission,
    RoleRevokePermission,
    Lock,
    Unlock,
    Campaign,
    Proclaim,
    Leader,
    Observe,
    Resign,
}

/// Path (after the version prefix) → call, with the gRPC method each serves.
pub const ROUTES: &[(&str, Rpc, &str)] = &[
    ("kv/range", Rpc::Range, "etcdserverpb.KV/Range"),
    ("kv/put", Rpc::Put, "etcdserverpb.KV/Put"),
    ("kv/deleterange", Rpc::DeleteRange, "etcdserverpb.KV/DeleteRange"),
    ("kv/txn", Rpc::Txn, "etcdserverpb.KV/Txn"),
    ("kv/compaction", Rpc::Compact, "etcdserverpb.KV/Compact"),
    ("watch", Rpc::Watch, "etcdserverpb.Watch/Watch"),
    ("lease/grant", Rpc::LeaseGrant, "etcdserverpb.Lease/LeaseGrant"),
    ("lease/revoke", Rpc::LeaseRevoke, "etcdserverpb.Lease/LeaseRevoke"),
    ("kv/lease/revoke", Rpc::LeaseRevoke, "etcdserverpb.Lease/LeaseRevoke"),
    ("lease/keepalive", Rpc::LeaseKeepAlive, "etcdserverpb.Lease/LeaseKeepAlive"),
    ("lease/timetolive", Rpc::LeaseTimeToLive, "etcdserverpb.Lease/LeaseTimeToLive"),
    ("kv/lease/timetolive", Rpc::LeaseTimeToLive, "etcdserverpb.Lease/LeaseTimeToLive"),
    ("lease/leases", Rpc::LeaseLeases, "etcdserverpb.Lease/LeaseLeases"),
    ("kv/lease/leases", Rpc::LeaseLeases, "etcdserverpb.Lease/LeaseLeases"),
    ("cluster/member/add", Rpc::MemberAdd, "etcdserverpb.Cluster/MemberAdd"),
    ("cluster/member/remove", Rpc::MemberRemove, "etcdserverpb.Cluster/MemberRemove"),
    ("cluster/member/update", Rpc::MemberUpdate, "etcdserverpb.Cluster/MemberUpdate"),
    ("cluster/member/list", Rpc::MemberList, "etcdserverpb.Cluster/MemberList"),
    ("cluster/member/promote", Rpc::MemberPromote, "etcdserverpb.Cluster/MemberPromote"),
    ("maintenance/alarm", Rpc::Alarm, "etcdserverpb.Maintenance/Alarm"),
    ("maintenance/status", Rpc::Status, "etcdserverpb.Maintenance/Status"),
    ("maintenance/defragment", Rpc::Defragment, "etcdserverpb.Maintenance/Defragment"),
    ("maintenance/hash", Rpc::Hash, "etcdserverpb.Maintenance/Hash"),
    ("maintenance/snapshot", Rpc::Snapshot, "etcdserverpb.Maintenance/Snapshot"),
    ("maintenance/transfer-leadership", Rpc::MoveLeader, "etcdserverpb.Maintenance/MoveLeader"),
    ("auth/enable", Rpc::AuthEnable, "etcdserverpb.Auth/AuthEnable"),
    ("auth/disable", Rpc::AuthDisable, "etcdserverpb.Auth/AuthDisable"),
    ("auth/authenticate", Rpc::Authenticate, "etcdserverpb.Auth/Authenticate"),
    ("auth/user/add", Rpc::UserAdd, "etcdserverpb.Auth/UserAdd"),
    ("auth/user/get", Rpc::UserGet, "etcdserverpb.Auth/UserGet"),
    ("auth/user/list", Rpc::UserList, "etcdserverpb.Auth/UserList"),
    ("auth/user/delete", Rpc::UserDelete, "etcdserverpb.Auth/UserDelete"),
    ("auth/user/changepw", Rpc::UserChangePassword, "etcdserverpb.Auth/UserChangePassword"),
    ("auth/user/grant", Rpc::UserGrantRole, "etcdserverpb.Auth/UserGrantRole"),
    ("auth/user/revoke", Rpc::UserRevokeRole, "etcdserverpb.Auth/UserRevokeRole"),
    ("auth/role/add", Rpc::RoleAdd, "etcdserverpb.Auth/RoleAdd"),
    ("auth/role/get", Rpc::RoleGet, "etcdserverpb.Auth/RoleGet"),
    ("auth/role/list", Rpc::RoleList, "etcdserverpb.Auth/RoleList"),
    ("auth/role/delete", Rpc::RoleDelete, "etcdserverpb.Auth/RoleDelete"),
    ("auth/role/grant", Rpc::RoleGrantPermission, "etcdserverpb.Auth/RoleGrantPermission"),
    ("auth/role/revoke", Rpc::RoleRevokePermission, "etcdserverpb.Auth/RoleRevokePermission"),
    ("lock/lock", Rpc::Lock, "v3lockpb.Lock/Lock"),
    ("lock/unlock", Rpc::Unlock, "v3lockpb.Lock/Unlock"),
    ("election/campaign", Rpc::Campaign, "v3electionpb.Election/Campaign"),
    ("election/proclaim", Rpc::Proclaim, "v3electionpb.Election/Proclaim"),
    ("election/leader", Rpc::Leader, "v3electionpb.Election/Leader"),
    ("election/observe", Rpc::Observe, "v3electionpb.Election/Observe"),
    ("election/resign", Rpc::Resign, "v3electionpb.Election/Resign"),
];

/// The gRPC methods etcd's gateway does not bind.
pub const UNBOUND: &[&str] = &[
    "etcdserverpb.Maintenance/HashKV",
    "etcdserverpb.Maintenance/Downgrade",
    "etcdserverpb.Auth/AuthStatus",
];

/// The version prefixes the gateway answers under.
pub const PREFIXES: [&str; 2] = ["/v3/", "/v3beta/"];

/// What a path names: a call, a path under a version prefix that names none, or nothing of
/// the gateway's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Call(Rpc),
    UnknownCall,
    Elsewhere,
}

/// What `path` names.
pub fn resolve(path: &str) -> Path {
    let Some(rest) = PREFIXES.iter().find_map(|p| path.strip_prefix(p)) else { return Path::Elsewhere };
    ROUTES.iter().find(|(p, _, _)| *p == rest).map_or(Path::UnknownCall, |(_, rpc, _)| Path::Call(*rpc))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prost::Message;

    use super::*;

    /// Just enough of `FileDescriptorSet` to list services and methods.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Set {
        #[prost(message, repeated, tag = "1")]
        file: Vec<File>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct File {
        #[prost(string, tag = "2")]
        package: String,
        #[prost(message, repeated, tag = "6")]
        service: Vec<Service>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct Service {
        #[prost(string, tag = "1")]
        name: String,
        #[prost(message, repeated, tag = "2")]
        method: Vec<Method>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct Method {
        #[prost(string, tag = "1")]
        name: String,
    }

    #[test]
    fn rpcs_and_paths_cover_every_method() {
        let set = Set::decode(kvset_proto::CLIENT_DESCRIPTOR_SET).expect("descriptor set");
        let mut methods = BTreeSet::new();
        for file in set
            .file
            .iter()
            .filter(|f| ["etcdserverpb", "v3lockpb", "v3electionpb"].contains(&f.package.as_str()))
        {
            for service in &file.service {
                for method in &service.method {
                    methods.insert(format!("{}.{}/{}", file.package, service.name, method.name));
                }
            }
        }
        let routed: BTreeSet<String> = ROUTES.iter().map(|(_, _, m)| m.to_string()).collect();
        let unbound: BTreeSet<String> = UNBOUND.iter().map(|m| m.to_string()).collect();
        let covered: BTreeSet<String> = routed.union(&unbound).cloned().collect();
        assert_eq!(
            methods, covered,
            "every method of etcd's eight services has a path or is listed as unbound"
        );
        // KV 5, Watch 1, Lease 5, Cluster 5, Maintenance 8, Auth 17, Lock 2, Election 5.
        assert_eq!(methods.len(), 48, "the protos' methods");
    }

    #[test]
    fn paths_resolve_under_both_prefixes_only() {
        assert_eq!(resolve("/v3/kv/range"), Path::Call(Rpc::Range));
        assert_eq!(resolve("/v3beta/kv/lease/revoke"), Path::Call(Rpc::LeaseRevoke));
        assert_eq!(resolve("/v3/lock/lock"), Path::Call(Rpc::Lock));
        assert_eq!(resolve("/v3/kv/range/"), Path::UnknownCall);
        assert_eq!(resolve("/v3/maintenance/hashkv"), Path::UnknownCall);
        assert_eq!(resolve("/v3alpha/kv/range"), Path::Elsewhere);
        assert_eq!(resolve("/V3/kv/range"), Path::Elsewhere);
        assert_eq!(resolve("/version"), Path::Elsewhere);
    }
}
