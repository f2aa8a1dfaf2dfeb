//! Who this member is, and where every ordinal can be reached (docs/architecture.md, "Identity").
//!
//! A pod named `<set>-<N>` has ordinal N; its name comes from the `name` config key, else
//! `POD_NAME`, else `HOSTNAME`. Addresses of every ordinal are rendered from the same template,
//! so any member can compute where any other ordinal lives without a registry:
//!
//! ```text
//! advertise_host = "{set}-{ordinal}.{service}.{namespace}.svc.cluster.local"   (Kubernetes)
//! advertise_host = "127.0.0.1", port_stride = 10                               (one host)
//! ```
//!
//! Ports of ordinal N are the base ports + N × `port_stride`. Explicit `peer_addrs` /
//! `client_addrs` lists (index = ordinal) override the template, for bare metal and tests.
//!
//! The Raft node id is *not* the ordinal: it lives in the volume (see
//! `kvset_storage::volume`).

use kvset_storage::Member;

use crate::config::Config;

/// A member's name, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The full name, e.g. `kvset-2`.
    pub name: String,
    /// The StatefulSet name, e.g. `kvset`.
    pub set: String,
    /// The ordinal, e.g. 2.
    pub ordinal: u32,
}

/// The member name carries no ordinal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "member name {0:?} has no StatefulSet ordinal: expected `<set>-<N>` (e.g. kvset-0); \
     set `name`, KVSET_NAME, POD_NAME or HOSTNAME"
)]
pub struct IdentityError(pub String);

/// Largest ordinal accepted (a StatefulSet of a consensus group never gets near it).
pub const MAX_ORDINAL: u32 = 999;

impl Identity {
    /// Parses `<set>-<N>`.
    pub fn from_name(name: &str) -> Result<Self, IdentityError> {
        let err = || IdentityError(name.to_string());
        let (set, ordinal) = name.rsplit_once('-').ok_or_else(err)?;
        if set.is_empty() || ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        if ordinal.len() > 1 && ordinal.starts_with('0') {
            return Err(err()); // `kvset-01` is not a StatefulSet pod name
        }
        let ordinal: u32 = ordinal.parse().map_err(|_| err())?;
        if ordinal > MAX_ORDINAL {
            return Err(err());
        }
        Ok(Self { name: name.to_string(), set: set.to_string(), ordinal })
    }

    /// The name of a sibling ordinal.
    pub fn sibling(&self, ordinal: u32) -> String {
        format!("{}-{}", self.set, ordinal)
    }
}

/// Renders the addresses of every ordinal.
#[derive(Debug, Clone)]
pub struct AddressBook {
    set: String,
    service: String,
    namespace: String,
    host_template: String,
    tls_name_template: String,
    client_port: u16,
    peer_port: u16,
    ops_port: u16,
    stride: u16,
    peer_addrs: Vec<String>,
    client_addrs: Vec<String>,
}

impl AddressBook {
    /// An address book for the StatefulSet `set`.
    pub fn new(config: &Config, set: &str) -> Self {
        Self {
            set: set.to_string(),
            service: config.service.clone(),
            namespace: config.namespace.clone(),
            host_template: config.advertise_host.clone(),
            tls_name_template: config.tls.member_dns_name.clone(),
            client_port: config.client_port,
            peer_port: config.peer_port,
            ops_port: config.ops_port,
            stride: config.port_stride,
            peer_addrs: config.peer_addrs.clone(),
            client_addrs: config.client_addrs.clone(),
        }
    }

    fn render(&self, template: &str, ordinal: u32) -> String {
        template
            .replace("{set}", &self.set)
            .replace("{ordinal}", &ordinal.to_string())
            .replace("{service}", &self.service)
            .replace("{namespace}", &self.namespace)
    }

    /// The host of `ordinal`.
    pub fn host(&self, ordinal: u32) -> String {
        self.render(&self.host_template, ordinal)
    }

    /// The DNS name `ordinal`'s TLS certificate must carry (`tls.member_dns_name`).
    pub fn tls_name(&self, ordinal: u32) -> String {
        self.render(&self.tls_name_template, ordinal)
    }

    /// The ordinal whose `tls_name` is `dns_name` (compared without case, as DNS names are).
    pub fn ordinal_of_tls_name(&self, dns_name: &str) -> Option<u32> {
        let (before, after) = self.tls_name_template.split_once("{ordinal}")?;
        let none = |t: &str| self.render(t, 0);
        let (prefix, suffix) = (none(before).to_ascii_lowercase(), none(after).to_ascii_lowercase());
        let name = dns_name.to_ascii_lowercase();
        let digits = name.strip_prefix(&prefix)?.strip_suffix(&suffix)?;
        let identity = Identity::from_name(&format!("{}-{digits}", self.set)).ok()?;
        (self.tls_name(identity.ordinal).eq_ignore_ascii_case(dns_name)).then_some(identity.ordinal)
    }

    fn port(&self, base: u16, ordinal: u32) -> u16 {
        (base as u32 + ordinal * self.stride as u32).min(u16::MAX as u32) as u16
    }

    /// host:port of `ordinal`'s peer endpoint.
    pub fn peer_addr(&self, ordinal: u32) -> String {
        match self.peer_addrs.get(ordinal as usize) {
            Some(addr) => addr.clone(),
            None => format!("{}:{}", self.host(ordinal), self.port(self.peer_port, ordinal)),
        }
    }

    /// host:port of `ordinal`'s client endpoint.
    pub fn client_addr(&self, ordinal: u32) -> String {
        match self.client_addrs.get(ordinal as usize) {
            Some(addr) => addr.clone(),
            None => format!("{}:{}", self.host(ordinal), self.port(self.client_port, ordinal)),
        }
    }

    /// Port `ordinal` listens on for clients.
    pub fn client_listen_port(&self, ordinal: u32) -> u16 {
        listen_port(self.client_addrs.get(ordinal as usize))
            .unwrap_or_else(|| self.port(self.client_port, ordinal))
    }

    /// Port `ordinal` listens on for peers.
    pub fn peer_listen_port(&self, ordinal: u32) -> u16 {
        listen_port(self.peer_addrs.get(ordinal as usize))
            .unwrap_or_else(|| self.port(self.peer_port, ordinal))
    }

    /// Port `ordinal` serves its ops HTTP endpoints on.
    pub fn ops_listen_port(&self, ordinal: u32) -> u16 {
        self.port(self.ops_port, ordinal)
    }

    /// The membership record of `ordinal`.
    pub fn member(&self, ordinal: u32) -> Member {
        Member {
            ordinal,
            name: format!("{}-{}", self.set, ordinal),
            peer_addr: self.peer_addr(ordinal),
            client_addr: self.client_addr(ordinal),
        }
    }
}

fn listen_port(addr: Option<&String>) -> Option<u16> {
    addr?.rsplit_once(':')?.1.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_ordinals() {
        let id = Identity::from_name("kvset-12").unwrap();
        assert_eq!((id.set.as_str(), id.ordinal), ("kvset", 12));
        let id = Identity::from_name("my-db-0").unwrap();
        assert_eq!((id.set.as_str(), id.ordinal), ("my-db", 0));
        assert_eq!(id.sibling(3), "my-db-3");
    }

    #[test]
    fn names_without_ordinals_are_clear_errors() {
        for bad in ["kvset", "kvset-", "-1", "kvset-x", "kvset-01", "kvset-1a", "", "kvset-99999999999"] {
            let err = Identity::from_name(bad).unwrap_err();
            assert!(err.to_string().contains("ordinal"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn kubernetes_addresses() {
        let c = Config { namespace: "prod".into(), ..Default::default() };
        let book = AddressBook::new(&c, "kvset");
        assert_eq!(book.peer_addr(2), "kvset-2.kvset-peers.prod.svc.cluster.local:2380");
        assert_eq!(book.client_addr(0), "kvset-0.kvset-peers.prod.svc.cluster.local:2379");
        assert_eq!(book.client_listen_port(2), 2379);
    }

    #[test]
    fn loopback_addresses_with_a_port_stride() {
        let c = Config { advertise_host: "127.0.0.1".into(), port_stride: 10, ..Default::default() };
        let book = AddressBook::new(&c, "kvset");
        assert_eq!(book.peer_addr(1), "127.0.0.1:2390");
        assert_eq!(book.client_addr(2), "127.0.0.1:2399");
        assert_eq!(book.ops_listen_port(2), 2401);
    }

    #[test]
    fn tls_names_of_ordinals_round_trip() {
        let c = Config { namespace: "prod".into(), ..Default::default() };
        let book = AddressBook::new(&c, "kvset");
        assert_eq!(book.tls_name(2), "kvset-2.kvset-peers.prod.svc.cluster.local");
        assert_eq!(book.ordinal_of_tls_name("kvset-2.kvset-peers.prod.svc.cluster.local"), Some(2));
        assert_eq!(book.ordinal_of_tls_name("KVSET-12.kvset-peers.prod.svc.cluster.local"), Some(12));
        for other in [
            "kvset-2.kvset-peers.dev.svc.cluster.local",
            "kvset-02.kvset-peers.prod.svc.cluster.local",
            "kvset-.kvset-peers.prod.svc.cluster.local",
            "kvset-x.kvset-peers.prod.svc.cluster.local",
            "other-2.kvset-peers.prod.svc.cluster.local",
            "kvset-2.kvset-peers.prod.svc.cluster.local.evil.example",
            "kvset-1000.kvset-peers.prod.svc.cluster.local",
            "*.kvset-peers.prod.svc.cluster.local",
        ] {
            assert_eq!(book.ordinal_of_tls_name(other), None, "{other}");
        }
    }

    #[test]
    fn explicit_addresses_win() {
        let c = Config { peer_addrs: vec!["10.0.0.1:7000".into()], ..Default::default() };
        let book = AddressBook::new(&c, "kvset");
        assert_eq!(book.peer_addr(0), "10.0.0.1:7000");
        assert_eq!(book.peer_listen_port(0), 7000);
        assert!(book.peer_addr(1).ends_with(":2380"));
    }
}
