//! Certificates for TLS tests, laid out as the members' `tls.*` keys expect: per member
//! `kvset-N.pem`, `kvset-N-key.pem` and its own CA bundle `kvset-N-ca.pem` (so one member can
//! be given another CA), plus helpers to replace them while members run, as a Secret update
//! or a cert-manager renewal would.

use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kvset_client::Client;
use kvset_client::ClientOptions;
use kvset_client::ClientTls;
use kvset_server::devcerts::Authority;
use kvset_server::devcerts::Issued;
use kvset_server::devcerts::Request;
use kvset_server::Config;

/// Ordinals the member certificates are written for.
pub const ORDINALS: u32 = 5;

/// A test PKI in a temporary directory.
#[derive(Debug)]
pub struct Pki {
    dir: tempfile::TempDir,
    /// The CA every member certificate is issued by at first.
    pub ca: Authority,
}

/// The DNS name of ordinal `n` under the test cluster's defaults (namespace `test`).
pub fn member_dns_name(ordinal: u32) -> String {
    format!("kvset-{ordinal}.kvset-peers.test.svc.cluster.local")
}

/// A member certificate for `ordinal`'s name, issued by `ca`.
pub fn member_cert(ca: &Authority, ordinal: u32) -> Issued {
    ca.issue(&Request::member(&format!("kvset-{ordinal}"), &member_dns_name(ordinal))).expect("issue")
}

/// Writes `text` to `path` atomically (a temporary file renamed over it).
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

impl Pki {
    /// A CA and a certificate for each of the first [`ORDINALS`] members, each trusting the CA.
    pub fn new() -> Self {
        let pki = Self {
            dir: tempfile::tempdir().expect("tempdir"),
            ca: Authority::new("kvset test CA").expect("CA"),
        };
        for o in 0..ORDINALS {
            pki.install_member(o, &member_cert(&pki.ca, o));
            pki.install_ca(o, &[&pki.ca]);
        }
        pki
    }

    /// The directory of the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The member configuration: TLS on, client certificates required, a quick reload.
    pub fn tweak(&self) -> impl Fn(&mut Config) + Send + Sync + 'static {
        let dir = self.dir.path().to_path_buf();
        move |c: &mut Config| {
            c.tls.cert_file = dir.join("{name}.pem").display().to_string();
            c.tls.key_file = dir.join("{name}-key.pem").display().to_string();
            c.tls.ca_file = dir.join("{name}-ca.pem").display().to_string();
            c.tls.client_cert_auth = true;
            c.tls.reload_interval_ms = 200;
        }
    }

    /// Replaces member `ordinal`'s certificate and key (the key first, then the certificate,
    /// as a non-atomic Secret update may).
    pub fn install_member(&self, ordinal: u32, issued: &Issued) {
        write_atomic(&self.path(&format!("kvset-{ordinal}-key.pem")), &issued.key_pem);
        write_atomic(&self.path(&format!("kvset-{ordinal}.pem")), &issued.cert_pem);
    }

    /// Replaces member `ordinal`'s CA bundle with `cas`.
    pub fn install_ca(&self, ordinal: u32, cas: &[&Authority]) {
        let bundle: String = cas.iter().map(|ca| ca.cert_pem()).collect();
        write_atomic(&self.path(&format!("kvset-{ordinal}-ca.pem")), &bundle);
    }

    /// A client TLS configuration trusting `cas`, presenting `identity` if given.
    pub fn client_tls(&self, cas: &[&Authority], identity: Option<&Issued>) -> Arc<ClientTls> {
        let n = rand::random::<u64>();
        let ca = self.path(&format!("client-{n}-ca.pem"));
        write_atomic(&ca, &cas.iter().map(|ca| ca.cert_pem()).collect::<String>());
        let files = identity.map(|id| {
            let (cert, key) =
                (self.path(&format!("client-{n}.pem")), self.path(&format!("client-{n}-key.pem")));
            write_atomic(&cert, &id.cert_pem);
            write_atomic(&key, &id.key_pem);
            (cert, key)
        });
        kvset_client::client_tls_from_files(&ca, files.as_ref().map(|(c, k)| (c.as_path(), k.as_path())))
            .expect("client TLS")
    }

    /// A client certificate for `user` from the first CA.
    pub fn user(&self, user: &str) -> Issued {
        self.ca.issue(&Request::client(user)).expect("issue")
    }

    /// A client of `endpoints` that trusts the first CA and presents a certificate for `root`.
    pub fn client(&self, endpoints: &[String]) -> Client {
        let tls = self.client_tls(&[&self.ca], Some(&self.user("root")));
        client_with(endpoints, Some(tls))
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// A client of `endpoints` (no leader following, 2 s deadline) with `tls`.
pub fn client_with(endpoints: &[String], tls: Option<Arc<ClientTls>>) -> Client {
    Client::new(
        endpoints.to_vec(),
        ClientOptions { timeout: Duration::from_secs(2), prefer_leader: false, tls, ..Default::default() },
    )
    .expect("client")
}
