//! TLS for the gRPC transport, shared by members and clients: reading PEM files into rustls
//! types, and channels that dial through rustls with whatever client configuration is
//! *current* when they connect, so a rotated certificate or CA bundle is used by the next
//! connection without rebuilding the channel.
//!
//! rustls with the `ring` provider; TLS 1.2 and 1.3; ALPN `h2` (gRPC needs HTTP/2, and etcd's
//! Go clients refuse a server that does not negotiate it).

use std::future::Future;
use std::path::Path;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::RwLock;
use std::task::Context;
use std::task::Poll;
use std::time::Duration;

use hyper_util::rt::TokioIo;
pub use rustls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use rustls::RootCertStore;
use tokio::net::TcpStream;
pub use tokio_rustls;
use tonic::codegen::http::Uri;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

/// Why TLS material could not be used; every variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("{path} is not valid PEM: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("CA bundle {path}: a certificate is not a usable trust anchor: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("certificate {cert} and key {key} do not belong together: {reason}")]
    KeyMismatch { cert: PathBuf, key: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The cryptography every kvset TLS configuration uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a whole file, naming it in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })
}

/// Every certificate in PEM `bytes` (read from `path`), leaf first.
pub fn parse_certs(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem { path: path.to_path_buf(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_path_buf() });
    }
    Ok(certs)
}

/// The first private key in PEM `bytes` (read from `path`).
pub fn parse_key(path: &Path, bytes: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey { path: path.to_path_buf() },
        e => TlsError::Pem { path: path.to_path_buf(), reason: e.to_string() },
    })
}

/// A trust store of every certificate in PEM `bytes` (read from `path`).
pub fn parse_roots(path: &Path, bytes: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(path, bytes)? {
        roots.add(cert).map_err(|e| TlsError::BadCa { path: path.to_path_buf(), reason: e.to_string() })?;
    }
    Ok(roots)
}

/// A certificate chain and its key, checked to belong together.
pub fn parse_identity(
    (cert_path, cert): (&Path, &[u8]),
    (key_path, key): (&Path, &[u8]),
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs = parse_certs(cert_path, cert)?;
    let key = parse_key(key_path, key)?;
    let mismatch = |reason: String| TlsError::KeyMismatch {
        cert: cert_path.to_path_buf(),
        key: key_path.to_path_buf(),
        reason,
    };
    let signing =
        provider().key_provider.load_private_key(key.clone_key()).map_err(|e| mismatch(e.to_string()))?;
    rustls::sign::CertifiedKey::new(certs.clone(), signing)
        .keys_match()
        .map_err(|e| mismatch(e.to_string()))?;
    Ok((certs, key))
}

/// A client configuration trusting `roots`, presenting `identity` if given, speaking `h2`.
pub fn client_config(
    roots: RootCertStore,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((certs, key)) => {
            builder.with_client_auth_cert(certs, key).map_err(|e| TlsError::Config(e.to_string()))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A client configuration that can be replaced while channels use it: each new connection
/// takes the configuration current at that moment.
#[derive(Debug)]
pub struct ClientTls {
    current: RwLock<Arc<ClientConfig>>,
}

impl ClientTls {
    /// Starts with `config`.
    pub fn new(config: ClientConfig) -> Arc<Self> {
        Arc::new(Self { current: RwLock::new(Arc::new(config)) })
    }

    /// The configuration new connections use.
    pub fn current(&self) -> Arc<ClientConfig> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the configuration for connections opened from now on.
    pub fn replace(&self, config: ClientConfig) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    }
}

/// Dials TCP and completes a TLS handshake that must prove `server_name`.
#[derive(Debug, Clone)]
pub struct TlsConnector {
    tls: Arc<ClientTls>,
    server_name: ServerName<'static>,
}

impl TlsConnector {
    /// A connector verifying that the server's certificate names `server_name` (a DNS name or
    /// an IP address).
    pub fn new(tls: Arc<ClientTls>, server_name: &str) -> Result<Self, TlsError> {
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|_| TlsError::Config(format!("{server_name:?} is not a DNS name or IP address")))?;
        Ok(Self { tls, server_name })
    }
}

/// A connection that could not be opened (TCP, or the TLS handshake): nothing was sent on it,
/// so a request that failed with it certainly had no effect ([`crate::is_connect_error`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConnectError(#[source] pub std::io::Error);

type Connecting = Pin<
    Box<
        dyn Future<Output = Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, ConnectError>> + Send,
    >,
>;

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = ConnectError;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.tls.current();
        let server_name = self.server_name.clone();
        Box::pin(async move {
            let host =
                uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await.map_err(ConnectError)?;
            tcp.set_nodelay(true).map_err(ConnectError)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await
                .map_err(ConnectError)?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// Options of a lazily connecting channel.
#[derive(Debug, Clone, Copy)]
pub struct ChannelOptions {
    pub connect_timeout: Duration,
    /// HTTP/2 keep-alive pings (members keep idle links to each other alive).
    pub keep_alive: Option<(Duration, Duration)>,
}

/// A channel to `addr` (`host:port`) that connects on first use and reconnects by itself: in
/// plain text when `tls` is `None`, else through TLS proving `server_name`.
pub fn lazy_channel(
    addr: &str,
    tls: Option<(&Arc<ClientTls>, &str)>,
    options: ChannelOptions,
) -> Result<Channel, ChannelError> {
    let bad = |reason: String| ChannelError { addr: addr.to_string(), reason };
    let mut endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true);
    if let Some((interval, timeout)) = options.keep_alive {
        endpoint = endpoint
            .http2_keep_alive_interval(interval)
            .keep_alive_timeout(timeout)
            .keep_alive_while_idle(true);
    }
    Ok(match tls {
        None => endpoint.connect_lazy(),
        Some((tls, server_name)) => {
            let connector = TlsConnector::new(tls.clone(), server_name).map_err(|e| bad(e.to_string()))?;
            endpoint.connect_with_connector_lazy(connector)
        }
    })
}

/// An address a channel cannot be made for.
#[derive(Debug, Clone, thiserror::Error)]
#[error("address {addr:?} is invalid: {reason}")]
pub struct ChannelError {
    pub addr: String,
    pub reason: String,
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A client configuration from files: trust the CA bundle `ca`; present `cert` and `key`
/// when given (both or neither).
pub fn client_tls_from_files(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientTls>, TlsError> {
    let roots = parse_roots(ca, &read_file(ca)?)?;
    let identity = match identity {
        Some((cert, key)) => Some(parse_identity((cert, &read_file(cert)?), (key, &read_file(key)?))?),
        None => None,
    };
    Ok(ClientTls::new(client_config(roots, identity)?))
}
