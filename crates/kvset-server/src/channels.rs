//! One cache of gRPC channels to other members, shared by every part that talks to them: Raft
//! messages (`network`), forwarded client requests (`forward`), membership probes and joins.
//!
//! Channels connect lazily, reconnect by themselves and re-resolve DNS on each reconnect, so a
//! rescheduled pod with a new IP is found again under its stable name. A channel is one HTTP/2
//! connection multiplexing every call to that address.
//!
//! With TLS on, every channel dials through TLS and accepts only a certificate naming the
//! member it was opened for (its `tls.member_dns_name`), whatever address it dials; each
//! connection takes the member's TLS configuration current when it connects, so rotated
//! certificates need no new channels.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use kvset_proto::tls::ChannelOptions;
use kvset_proto::tls::ClientTls;
use kvset_proto::v1::cluster_client::ClusterClient;
use tonic::transport::Channel;

use crate::identity::AddressBook;
use crate::identity::Identity;

/// Opens a lazily connecting plaintext channel to `host:port`.
pub fn lazy_channel(addr: &str, connect_timeout: Duration) -> Result<Channel, BadAddress> {
    kvset_proto::tls::lazy_channel(addr, None, options(connect_timeout)).map_err(BadAddress::from)
}

fn options(connect_timeout: Duration) -> ChannelOptions {
    ChannelOptions { connect_timeout, keep_alive: Some((Duration::from_secs(10), Duration::from_secs(5))) }
}

/// How channels dial when TLS is on: with this configuration, verifying members' names from
/// this address book.
#[derive(Debug, Clone)]
pub struct DialTls {
    pub config: Arc<ClientTls>,
    pub book: AddressBook,
}

/// Channels by member and `host:port`, created on first use.
#[derive(Debug)]
pub struct PeerChannels {
    connect_timeout: Duration,
    tls: Option<DialTls>,
    /// By (member name, address): the name decides which certificate the channel accepts.
    channels: Mutex<HashMap<(String, String), Channel>>,
}

/// An address (or member name) a channel cannot be opened for.
#[derive(Debug, thiserror::Error)]
#[error("address {addr:?} is invalid: {reason}")]
pub struct BadAddress {
    pub addr: String,
    reason: String,
}

impl From<kvset_proto::tls::ChannelError> for BadAddress {
    fn from(e: kvset_proto::tls::ChannelError) -> Self {
        Self { addr: e.addr, reason: e.reason }
    }
}

impl PeerChannels {
    /// A cache whose channels give up connecting after `connect_timeout`, dialling through
    /// `tls` when given.
    pub fn new(connect_timeout: Duration, tls: Option<DialTls>) -> Self {
        Self { connect_timeout, tls, channels: Mutex::default() }
    }

    /// The channel to member `name` (`<set>-<N>`) at `addr`.
    pub fn get(&self, name: &str, addr: &str) -> Result<Channel, BadAddress> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let key = (name.to_string(), addr.to_string());
        if let Some(c) = channels.get(&key) {
            return Ok(c.clone());
        }
        let c = match &self.tls {
            None => lazy_channel(addr, self.connect_timeout)?,
            Some(tls) => {
                let ordinal = Identity::from_name(name)
                    .map_err(|e| BadAddress { addr: addr.to_string(), reason: e.to_string() })?
                    .ordinal;
                let server_name = tls.book.tls_name(ordinal);
                kvset_proto::tls::lazy_channel(
                    addr,
                    Some((&tls.config, &server_name)),
                    options(self.connect_timeout),
                )?
            }
        };
        channels.insert(key, c.clone());
        Ok(c)
    }

    /// A `Cluster` client for another member's client port, for its `Status` (which needs no
    /// credentials; the ops page, the quota task and defragmentation ask it). Requests that need
    /// the leader never take this way: they go to its peer port.
    pub fn status_client(&self, name: &str, addr: &str) -> Result<ClusterClient<Channel>, BadAddress> {
        Ok(ClusterClient::new(self.get(name, addr)?))
    }
}
