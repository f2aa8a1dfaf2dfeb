//! One cache of gRPC channels to other members, shared by every part that talks to them: Raft
//! messages (`network`), forwarded client requests (`forward`), membership probes and joins.
//!
//! Channels connect lazily, reconnect by themselves and re-resolve DNS on each reconnect, so a
//! rescheduled pod with a new IP is found again under its stable name. A channel is one HTTP/2
//! connection multiplexing every call to that address.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::Channel;
use tonic::transport::Endpoint;

/// Opens a lazily connecting channel to `host:port`.
pub fn lazy_channel(addr: &str, connect_timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// Channels by `host:port`, created on first use.
#[derive(Debug)]
pub struct PeerChannels {
    connect_timeout: Duration,
    channels: Mutex<HashMap<String, Channel>>,
}

/// An address that is not a valid `host:port`.
#[derive(Debug, thiserror::Error)]
#[error("address {addr:?} is invalid: {source}")]
pub struct BadAddress {
    pub addr: String,
    source: tonic::transport::Error,
}

impl PeerChannels {
    /// A cache whose channels give up connecting after `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        Self { connect_timeout, channels: Mutex::default() }
    }

    /// The channel to `addr`.
    pub fn get(&self, addr: &str) -> Result<Channel, BadAddress> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let c = lazy_channel(addr, self.connect_timeout)
            .map_err(|source| BadAddress { addr: addr.to_string(), source })?;
        channels.insert(addr.to_string(), c.clone());
        Ok(c)
    }
}
