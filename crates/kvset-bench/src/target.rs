//! The systems a benchmark can drive, behind one small interface.

use kvset_client::pb;
use kvset_client::Client;

/// A server under load. Errors come back as a short kind, counted in the report.
#[derive(Clone)]
pub enum Target {
    /// kvset through its own client.
    Kvset(Client),
    /// etcd through `etcd-client`.
    #[cfg(feature = "etcd")]
    Etcd(etcd_client::Client),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn kind(e: &kvset_client::Error) -> String {
    match e {
        kvset_client::Error::InvalidArgument(_) => "invalid-argument",
        kvset_client::Error::Unavailable { .. } => "unavailable",
        kvset_client::Error::Indeterminate(_) => "indeterminate",
        kvset_client::Error::DeadlineExceeded(_) => "deadline",
        kvset_client::Error::Unimplemented(_) => "unimplemented",
        kvset_client::Error::FailedPrecondition(_) => "failed-precondition",
        kvset_client::Error::BadEndpoint(_) => "bad-endpoint",
        kvset_client::Error::Server { .. } => "server",
    }
    .to_string()
}

impl Target {
    /// The target's name in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Target::Kvset(_) => "kvset",
            #[cfg(feature = "etcd")]
            Target::Etcd(_) => "etcd",
        }
    }

    /// Connects to etcd at `endpoints`.
    #[cfg(feature = "etcd")]
    pub async fn etcd(endpoints: &[String]) -> Result<Self, String> {
        let urls: Vec<String> = endpoints.iter().map(|e| format!("http://{e}")).collect();
        etcd_client::Client::connect(urls, None).await.map(Target::Etcd).map_err(|e| e.to_string())
    }

    /// Puts `key` = `value`.
    pub async fn put(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), String> {
        match self {
            Target::Kvset(c) => c.put(key, value).await.map(|_| ()).map_err(|e| kind(&e)),
            #[cfg(feature = "etcd")]
            Target::Etcd(c) => {
                c.kv_client().put(key, value, None).await.map(|_| ()).map_err(|e| etcd_kind(&e))
            }
        }
    }

    /// Gets `key`, linearizably unless `serializable`.
    pub async fn get(&self, key: Vec<u8>, serializable: bool) -> Result<(), String> {
        match self {
            Target::Kvset(c) => {
                let consistency = if serializable {
                    pb::ReadConsistency::Serializable
                } else {
                    pb::ReadConsistency::Linearizable
                };
                c.get_request(pb::GetRequest { key, consistency: consistency as i32 })
                    .await
                    .map(|_| ())
                    .map_err(|e| kind(&e))
            }
            #[cfg(feature = "etcd")]
            Target::Etcd(c) => {
                let opts = serializable.then(|| etcd_client::GetOptions::new().with_serializable());
                c.kv_client().get(key, opts).await.map(|_| ()).map_err(|e| etcd_kind(&e))
            }
        }
    }

    /// A compare-and-swap transaction whose compare always holds: version(key) > -1, then put.
    pub async fn txn(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), String> {
        match self {
            Target::Kvset(c) => {
                let req = pb::TxnRequest {
                    compare: vec![pb::Compare {
                        result: pb::compare::Result::Greater as i32,
                        target: pb::compare::Target::Version as i32,
                        key: key.clone(),
                        target_union: Some(pb::compare::TargetUnion::Version(-1)),
                    }],
                    success: vec![pb::RequestOp {
                        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                            key,
                            value,
                            ..Default::default()
                        })),
                    }],
                    failure: vec![],
                };
                c.txn(req).await.map(|_| ()).map_err(|e| kind(&e))
            }
            #[cfg(feature = "etcd")]
            Target::Etcd(c) => {
                use etcd_client::Compare;
                use etcd_client::CompareOp;
                use etcd_client::Txn;
                use etcd_client::TxnOp;
                let txn = Txn::new()
                    .when([Compare::version(key.clone(), CompareOp::Greater, -1)])
                    .and_then([TxnOp::put(key, value, None)]);
                c.kv_client().txn(txn).await.map(|_| ()).map_err(|e| etcd_kind(&e))
            }
        }
    }
}

#[cfg(feature = "etcd")]
fn etcd_kind(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => format!("etcd-{:?}", s.code()).to_lowercase(),
        _ => "etcd-transport".into(),
    }
}
