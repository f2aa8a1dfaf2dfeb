//! Throwaway certificates for local clusters and tests (`kvset cluster up --tls`): a CA, a
//! certificate per member naming its `tls.member_dns_name` (and `localhost`, 127.0.0.1), and
//! client certificates. Production certificates come from cert-manager or your own CA; nothing
//! here is used by a member at run time.

use std::net::IpAddr;
use std::time::Duration;

use rcgen::BasicConstraints;
use rcgen::CertificateParams;
use rcgen::DnType;
use rcgen::ExtendedKeyUsagePurpose;
use rcgen::IsCa;
use rcgen::KeyPair;
use rcgen::KeyUsagePurpose;
use rcgen::SanType;

pub use rcgen::Error;

/// A certificate and its private key, PEM encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A certificate authority that can issue certificates.
pub struct Authority {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

/// What a certificate is for, and for how long.
#[derive(Debug, Clone)]
pub struct Request {
    pub common_name: String,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// Valid from `not_before` (an offset from now, negative: in the past) for `valid_for`.
    pub not_before: time::Duration,
    pub valid_for: Duration,
}

impl Request {
    /// A certificate for `common_name` with these names, valid for a year from an hour ago.
    pub fn named(common_name: &str, dns_names: Vec<String>, ips: Vec<IpAddr>) -> Self {
        Self {
            common_name: common_name.to_string(),
            dns_names,
            ips,
            not_before: -time::Duration::hours(1),
            valid_for: Duration::from_secs(365 * 24 * 3600),
        }
    }

    /// A member's certificate (server and client authentication) naming `dns_name`,
    /// `localhost` and 127.0.0.1, valid for a year.
    pub fn member(common_name: &str, dns_name: &str) -> Self {
        Self {
            common_name: common_name.to_string(),
            dns_names: vec![dns_name.to_string(), "localhost".into()],
            ips: vec![IpAddr::from([127, 0, 0, 1])],
            not_before: -time::Duration::hours(1),
            valid_for: Duration::from_secs(365 * 24 * 3600),
        }
    }

    /// A client certificate for `user` (its common name), valid for a year.
    pub fn client(user: &str) -> Self {
        Self {
            common_name: user.to_string(),
            dns_names: Vec::new(),
            ips: Vec::new(),
            not_before: -time::Duration::hours(1),
            valid_for: Duration::from_secs(365 * 24 * 3600),
        }
    }

    /// The same certificate, but one that expired an hour ago.
    pub fn expired(self) -> Self {
        Self { not_before: -time::Duration::days(2), valid_for: Duration::from_secs(24 * 3600), ..self }
    }
}

fn validity(params: &mut CertificateParams, not_before: time::Duration, valid_for: Duration) {
    let start = time::OffsetDateTime::now_utc() + not_before;
    params.not_before = start;
    params.not_after = start + valid_for;
}

impl Authority {
    /// A new self-signed CA named `common_name`, valid for ten years.
    pub fn new(common_name: &str) -> Result<Self, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        validity(&mut params, -time::Duration::hours(1), Duration::from_secs(10 * 365 * 24 * 3600));
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// The CA certificate, PEM encoded (the trust bundle).
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// Issues a certificate for `request`, usable for both server and client authentication.
    pub fn issue(&self, request: &Request) -> Result<Issued, Error> {
        let mut params = CertificateParams::new(request.dns_names.clone())?;
        params.subject_alt_names.extend(request.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.distinguished_name.push(DnType::CommonName, request.common_name.as_str());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params, request.not_before, request.valid_for);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}
