//! The systems a benchmark can drive, behind one small interface.

use kvset_client::pb;
use kvset_client::Client;

/// A server under load. Errors come back as a short kind, counted in the report.
#[derive(Clone)]
pub enum Target {
    /// kvset through its own client.
    Kvset(Client),
    /// A server speaking etcd's v3 API (etcd, or kvset's etcd API) through `etcd-client`, with
    /// its name in reports.
    #[cfg(feature = "etcd")]
    Etcd(etcd_client::Client, &'static str),
    /// A server's etcd JSON gateway over HTTP/1.1 (put and get only).
    #[cfg(feature = "etcd")]
    Gateway(crate::gateway::Gateway),
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
        kvset_client::Error::NotFound(_) => "not-found",
        kvset_client::Error::OutOfRange(_) => "out-of-range",
        kvset_client::Error::BadEndpoint(_) => "bad-endpoint",
        kvset_client::Error::Io(_) => "io",
        kvset_client::Error::Server { .. } => "server",
    }
    .to_string()
}

/// A lease being renewed over one keep-alive stream (the lease-keepalive workload).
#[allow(missing_debug_implementations)]
pub enum Renewer {
    Kvset(kvset_client::KeepAliveStream),
    #[cfg(feature = "etcd")]
    Etcd(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream),
}

impl Renewer {
    /// Renews once and waits for the answer.
    pub async fn renew(&mut self) -> Result<(), String> {
        match self {
            Renewer::Kvset(s) => match s.renew().await {
                Ok(ttl) if ttl > 0 => Ok(()),
                Ok(_) => Err("lease-gone".into()),
                Err(e) => Err(kind(&e)),
            },
            #[cfg(feature = "etcd")]
            Renewer::Etcd(keeper, stream) => {
                keeper.keep_alive().await.map_err(|e| etcd_kind(&e))?;
                match stream.message().await {
                    Ok(Some(r)) if r.ttl() > 0 => Ok(()),
                    Ok(_) => Err("lease-gone".into()),
                    Err(e) => Err(etcd_kind(&e)),
                }
            }
        }
    }
}

impl Target {
    /// Puts `key` = `value`; returns the revision it was written at.
    pub async fn put_revision(&self, key: Vec<u8>, value: Vec<u8>) -> Result<i64, String> {
        match self {
            Target::Kvset(c) => {
                c.put(key, value).await.map(|r| r.header.map_or(0, |h| h.revision)).map_err(|e| kind(&e))
            }
            #[cfg(feature = "etcd")]
            Target::Etcd(c, _) => c
                .kv_client()
                .put(key, value, None)
                .await
                .map(|r| r.header().map_or(0, |h| h.revision()))
                .map_err(|e| etcd_kind(&e)),
            #[cfg(feature = "etcd")]
            Target::Gateway(_) => Err(UNSUPPORTED.into()),
        }
    }

    /// Watches every key with `prefix` from now on; the receiver gets the revision of every
    /// event delivered.
    pub async fn watch_prefix(&self, prefix: Vec<u8>) -> Result<tokio::sync::mpsc::Receiver<i64>, String> {
        let (tx, rx) = tokio::sync::mpsc::channel(100_000);
        match self {
            Target::Kvset(c) => {
                let options =
                    kvset_client::WatchOptions { prefix: true, allow_leaderless: true, ..Default::default() };
                let mut watch = c.watch(prefix, options).await.map_err(|e| kind(&e))?;
                // The watch is created once its first answer arrives; wait for the stream.
                tokio::spawn(async move {
                    while let Some(Ok(delivery)) = watch.next().await {
                        if let kvset_client::WatchEvent::Events { events, .. } = delivery {
                            for e in events {
                                if tx.send(e.kv.map_or(0, |kv| kv.mod_revision)).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
                // Give the stream its round trip to be created before writes start.
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            #[cfg(feature = "etcd")]
            Target::Etcd(c, _) => {
                let mut stream = c
                    .watch_client()
                    .watch(prefix, Some(etcd_client::WatchOptions::new().with_prefix()))
                    .await
                    .map_err(|e| etcd_kind(&e))?;
                tokio::spawn(async move {
                    while let Ok(Some(r)) = stream.message().await {
                        for e in r.events() {
                            if tx.send(e.kv().map_or(0, |kv| kv.mod_revision())).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
            #[cfg(feature = "etcd")]
            Target::Gateway(_) => return Err(UNSUPPORTED.into()),
        }
        Ok(rx)
    }

    /// Grants a lease of `ttl` seconds and opens a keep-alive stream for it.
    pub async fn lease_renewer(&self, ttl: i64) -> Result<Renewer, String> {
        match self {
            Target::Kvset(c) => {
                let id = c.lease_grant(ttl, 0).await.map_err(|e| kind(&e))?.id;
                Ok(Renewer::Kvset(c.keep_alive_stream(id).await.map_err(|e| kind(&e))?))
            }
            #[cfg(feature = "etcd")]
            Target::Etcd(c, _) => {
                let mut leases = c.lease_client();
                let id = leases.grant(ttl, None).await.map_err(|e| etcd_kind(&e))?.id();
                let (keeper, stream) = leases.keep_alive(id).await.map_err(|e| etcd_kind(&e))?;
                Ok(Renewer::Etcd(keeper, stream))
            }
            #[cfg(feature = "etcd")]
            Target::Gateway(_) => Err(UNSUPPORTED.into()),
        }
    }

    /// The target's name in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Target::Kvset(_) => "kvset.v1",
            #[cfg(feature = "etcd")]
            Target::Etcd(_, name) => name,
            #[cfg(feature = "etcd")]
            Target::Gateway(g) => g.name,
        }
    }

    /// Connects to etcd at `endpoints`.
    #[cfg(feature = "etcd")]
    pub async fn etcd(endpoints: &[String]) -> Result<Self, String> {
        Self::etcd_api(endpoints, "etcd").await
    }

    /// Connects `etcd-client` to any server of etcd's v3 API at `endpoints` (kvset serves it
    /// too), named `name` in reports.
    #[cfg(feature = "etcd")]
    pub async fn etcd_api(endpoints: &[String], name: &'static str) -> Result<Self, String> {
        let urls: Vec<String> = endpoints.iter().map(|e| format!("http://{e}")).collect();
        etcd_client::Client::connect(urls, None)
            .await
            .map(|c| Target::Etcd(c, name))
            .map_err(|e| e.to_string())
    }

    /// The JSON gateway of the server at `endpoint` (etcd's or kvset's), named `name` in
    /// reports.
    #[cfg(feature = "etcd")]
    pub fn gateway(endpoint: &str, name: &'static str) -> Self {
        Target::Gateway(crate::gateway::Gateway::new(endpoint, name))
    }

    /// Puts `key` = `value`.
    pub async fn put(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), String> {
        match self {
            Target::Kvset(c) => c.put(key, value).await.map(|_| ()).map_err(|e| kind(&e)),
            #[cfg(feature = "etcd")]
            Target::Etcd(c, _) => {
                c.kv_client().put(key, value, None).await.map(|_| ()).map_err(|e| etcd_kind(&e))
            }
            #[cfg(feature = "etcd")]
            Target::Gateway(g) => g.put(&key, &value).await,
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
                c.get_request(pb::GetRequest { key, consistency: consistency as i32, revision: 0 })
                    .await
                    .map(|_| ())
                    .map_err(|e| kind(&e))
            }
            #[cfg(feature = "etcd")]
            Target::Etcd(c, _) => {
                let opts = serializable.then(|| etcd_client::GetOptions::new().with_serializable());
                c.kv_client().get(key, opts).await.map(|_| ()).map_err(|e| etcd_kind(&e))
            }
            #[cfg(feature = "etcd")]
            Target::Gateway(g) => g.get(&key, serializable).await,
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
            Target::Etcd(c, _) => {
                use etcd_client::Compare;
                use etcd_client::CompareOp;
                use etcd_client::Txn;
                use etcd_client::TxnOp;
                let txn = Txn::new()
                    .when([Compare::version(key.clone(), CompareOp::Greater, -1)])
                    .and_then([TxnOp::put(key, value, None)]);
                c.kv_client().txn(txn).await.map(|_| ()).map_err(|e| etcd_kind(&e))
            }
            #[cfg(feature = "etcd")]
            Target::Gateway(_) => Err(UNSUPPORTED.into()),
        }
    }
}

/// The error of a workload the gateway target does not run.
#[cfg(feature = "etcd")]
const UNSUPPORTED: &str = "unsupported-over-gateway";

#[cfg(feature = "etcd")]
fn etcd_kind(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => format!("etcd-{:?}", s.code()).to_lowercase(),
        _ => "etcd-transport".into(),
    }
}
