//! A member's TLS (docs/architecture.md, "Security"): its certificate on the client and peer
//! ports, mutual TLS between members, and certificate rotation without a restart.
//!
//! * **Peer port**: mutual TLS only. A connecting member must present a certificate that chains
//!   to `tls.ca_file` *and* names some ordinal's `tls.member_dns_name`; a member dialling
//!   ordinal N accepts only a certificate naming N's name (whatever address N is reached at),
//!   so a pod cannot pose as another ordinal with its own certificate.
//! * **Client port**: TLS, with client certificates required when `tls.client_cert_auth` (they
//!   must chain to `tls.client_ca_file`, or to `tls.ca_file` for members calling each other).
//! * **Rotation**: [`watch_files`] re-reads the files every `tls.reload_interval_ms`; when any
//!   byte changed and the new set loads, new handshakes (both directions) use it. Established
//!   connections keep the session they negotiated, as in etcd. A set that fails to load (a
//!   half-written Secret) is logged and the previous one stays in use.
//! * **Refusals** (no TLS, unknown CA, expired, wrong name) are logged with the remote address
//!   and counted; the connection is closed before any request is read.

use std::path::Path;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::RwLock;
use std::task::Context;
use std::task::Poll;
use std::time::Duration;

use kvset_proto::tls as wire;
use kvset_proto::tls::rustls;
use kvset_proto::tls::ClientTls;
use kvset_proto::tls::TlsError;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls::ServerConfig;
use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;
use tokio::io::ReadBuf;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::Config;
use crate::identity::AddressBook;
use crate::metrics::Metrics;

/// How long a client has to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The files a member's TLS is read from (`{name}` already replaced).
#[derive(Debug, Clone)]
struct Paths {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    client_ca: Option<PathBuf>,
}

impl Paths {
    fn all(&self) -> Vec<&Path> {
        let mut all = vec![self.cert.as_path(), self.key.as_path(), self.ca.as_path()];
        all.extend(self.client_ca.as_deref());
        all
    }
}

/// What one load of the files produced.
#[derive(Debug)]
struct Loaded {
    /// The bytes read, to tell whether anything changed.
    bytes: Vec<Vec<u8>>,
    peer: Arc<ServerConfig>,
    client: Arc<ServerConfig>,
    /// The ops port's (HTTP/1.1, no client certificate).
    ops: Arc<ServerConfig>,
    /// Checks that a certificate shown on the client port is a member's (chains to the
    /// members' CA), not merely a client's that names a member.
    members: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    /// When the member's certificate and the earliest-expiring CA of `tls.ca_file` expire
    /// (Unix seconds), for `kvset_tls_certificate_expiry_timestamp_seconds`.
    expiry: Vec<(&'static str, i64)>,
}

/// The TLS material of a member, replaced as a whole on rotation.
#[derive(Debug)]
pub struct MemberTls {
    paths: Paths,
    /// The DNS name this member's own certificate must prove.
    own_name: String,
    client_cert_auth: bool,
    book: AddressBook,
    loaded: RwLock<Arc<Loaded>>,
    /// What this member presents and trusts when it dials other members.
    dial: Arc<ClientTls>,
}

impl MemberTls {
    /// The member's TLS, or `None` when `tls.cert_file` is empty. Every file must load.
    pub fn from_config(config: &Config, book: AddressBook) -> Result<Option<Arc<Self>>, TlsError> {
        let t = &config.tls;
        if !t.enabled() {
            return Ok(None);
        }
        let path = |p: &str| PathBuf::from(p.replace("{name}", &config.name));
        let paths = Paths {
            cert: path(&t.cert_file),
            key: path(&t.key_file),
            ca: path(&t.ca_file),
            client_ca: (!t.client_ca_file.is_empty()).then(|| path(&t.client_ca_file)),
        };
        let own_name = crate::identity::Identity::from_name(&config.name)
            .map(|id| book.tls_name(id.ordinal))
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let bytes = read_all(&paths)?;
        let (loaded, dial) = build(&paths, &own_name, t.client_cert_auth, bytes)?;
        Ok(Some(Arc::new(Self {
            paths,
            own_name,
            client_cert_auth: t.client_cert_auth,
            book,
            loaded: RwLock::new(Arc::new(loaded)),
            dial: ClientTls::new(dial),
        })))
    }

    fn current(&self) -> Arc<Loaded> {
        self.loaded.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Re-reads the files; `Ok(true)` when they changed and the new material is in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let bytes = read_all(&self.paths)?;
        if bytes == self.current().bytes {
            return Ok(false);
        }
        let (loaded, dial) = build(&self.paths, &self.own_name, self.client_cert_auth, bytes)?;
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(loaded);
        self.dial.replace(dial);
        Ok(true)
    }

    /// When the certificates in use expire, Unix seconds: `member` (this member's own) and
    /// `ca` (the earliest of the CA bundle).
    pub fn expiry(&self) -> Vec<(&'static str, i64)> {
        self.current().expiry.clone()
    }

    /// Publishes [`Self::expiry`] in `metrics`.
    pub fn report_expiry(&self, metrics: &Metrics) {
        metrics.cert_expiry.clear();
        for (cert, at) in self.expiry() {
            metrics.cert_expiry.get_or_create(&crate::metrics::CertLabel { cert }).set(at);
        }
    }

    /// The client configuration for dialling other members (their peer and client ports).
    pub fn dial(&self) -> &Arc<ClientTls> {
        &self.dial
    }

    /// The DNS name the member called `name` (`<set>-<N>`) must prove.
    pub fn member_dns_name(&self, name: &str) -> Option<String> {
        crate::identity::Identity::from_name(name).ok().map(|id| self.book.tls_name(id.ordinal))
    }

    /// The ordinal a peer's (already verified) certificate names, or why it names none.
    fn peer_ordinal(&self, certs: Option<&[CertificateDer<'static>]>) -> Result<u32, String> {
        let leaf = certs.and_then(|c| c.first()).ok_or("no client certificate")?;
        let cert =
            webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("unparsable certificate: {e}"))?;
        let names: Vec<&str> = cert.valid_dns_names().collect();
        names.iter().find_map(|n| self.book.ordinal_of_tls_name(n)).ok_or_else(|| {
            format!(
                "its certificate names no member of this set (expected e.g. {}, got {names:?})",
                self.book.tls_name(0)
            )
        })
    }
}

fn read_all(paths: &Paths) -> Result<Vec<Vec<u8>>, TlsError> {
    paths.all().into_iter().map(wire::read_file).collect()
}

/// The server configurations of both ports and the dialling configuration, from file bytes
/// (in the order of [`Paths::all`]). The member's own certificate must be one its peers will
/// accept: chaining to the CA bundle, valid now, naming `own_name`.
fn build(
    paths: &Paths,
    own_name: &str,
    client_cert_auth: bool,
    bytes: Vec<Vec<u8>>,
) -> Result<(Loaded, rustls::ClientConfig), TlsError> {
    let (certs, key) = wire::parse_identity((&paths.cert, &bytes[0]), (&paths.key, &bytes[1]))?;
    let members = wire::parse_roots(&paths.ca, &bytes[2])?;
    check_own(&certs, &members, own_name).map_err(|reason| {
        TlsError::Config(format!(
            "{} is not a certificate the other members will accept: {reason} (checked against {} for the name {own_name})",
            paths.cert.display(),
            paths.ca.display()
        ))
    })?;
    let config = |e: rustls::Error| TlsError::Config(e.to_string());
    let verifier = |roots: RootCertStore| {
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), wire::provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))
    };
    let server = || {
        ServerConfig::builder_with_provider(wire::provider())
            .with_safe_default_protocol_versions()
            .map_err(config)
    };
    let h2 = |mut c: ServerConfig| {
        c.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(c)
    };

    let peer = server()?
        .with_client_cert_verifier(verifier(members.clone())?)
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(config)?;
    let client = if client_cert_auth {
        let mut roots = match (&paths.client_ca, bytes.get(3)) {
            (Some(path), Some(b)) => wire::parse_roots(path, b)?,
            _ => RootCertStore::empty(),
        };
        roots.roots.extend(members.roots.iter().cloned());
        server()?.with_client_cert_verifier(verifier(roots)?)
    } else {
        server()?.with_no_client_auth()
    }
    .with_single_cert(certs.clone(), key.clone_key())
    .map_err(config)?;
    let mut ops =
        server()?.with_no_client_auth().with_single_cert(certs.clone(), key.clone_key()).map_err(config)?;
    ops.alpn_protocols = vec![b"http/1.1".to_vec()];
    let members_verifier = verifier(members.clone())?;
    // Peers also check it as a client certificate (client-auth usage) when this member dials.
    if let Some((leaf, rest)) = certs.split_first() {
        members_verifier.verify_client_cert(leaf, rest, rustls::pki_types::UnixTime::now()).map_err(|e| {
            TlsError::Config(format!(
                "{} is not a certificate the other members will accept from this member as a client: {e}",
                paths.cert.display()
            ))
        })?;
    }
    let mut expiry = Vec::new();
    expiry.extend(certs.first().and_then(|c| not_after(c)).map(|at| ("member", at)));
    let cas = wire::parse_certs(&paths.ca, &bytes[2]).unwrap_or_default();
    expiry.extend(cas.iter().filter_map(|c| not_after(c)).min().map(|at| ("ca", at)));
    let dial = wire::client_config(members, Some((certs, key)))?;
    // The client port also serves etcd's JSON gateway over HTTP/1.1 (gRPC clients offer h2,
    // which comes first).
    let mut client = client;
    client.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((
        Loaded {
            bytes,
            peer: h2(peer),
            client: Arc::new(client),
            ops: Arc::new(ops),
            members: members_verifier,
            expiry,
        },
        dial,
    ))
}

/// Verifies a member's own chain as its peers will: against `roots`, now, for `name`.
fn check_own(certs: &[CertificateDer<'static>], roots: &RootCertStore, name: &str) -> Result<(), String> {
    use rustls::client::danger::ServerCertVerifier;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots.clone()),
        wire::provider(),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let (leaf, intermediates) = certs.split_first().ok_or("no certificate")?;
    verifier
        .verify_server_cert(leaf, intermediates, &server_name, &[], rustls::pki_types::UnixTime::now())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Re-reads `tls`'s files every `interval` until `stop`; logs what changed or failed, and keeps
/// the certificates' expiry in `metrics`.
pub async fn watch_files(
    tls: Arc<MemberTls>,
    metrics: Arc<Metrics>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut failing = false;
    tls.report_expiry(&metrics);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let t = tls.clone();
        match tokio::task::spawn_blocking(move || t.reload()).await {
            Ok(Ok(true)) => {
                failing = false;
                tls.report_expiry(&metrics);
                tracing::info!(cert = %tls.paths.cert.display(), "TLS certificates reloaded: new connections use them");
            }
            Ok(Ok(false)) => failing = false,
            Ok(Err(e)) => {
                if !failing {
                    tracing::error!(error = %e, "TLS files changed but do not load; the previous certificates stay in use");
                }
                failing = true;
            }
            Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
        }
    }
}

/// Which listener a connection arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Client,
    Peer,
    Ops,
}

impl Port {
    fn name(self) -> &'static str {
        match self {
            Port::Client => "client",
            Port::Peer => "peer",
            Port::Ops => "ops",
        }
    }
}

/// An accepted connection: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum Conn {
    Plain(TcpStream),
    /// With what its verified certificate says, read once at the handshake.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, Verified),
}

/// What a connection's verified client certificate says.
#[derive(Debug, Clone, Default)]
pub struct Verified {
    /// The member ordinal it names (a member's certificate).
    pub member: Option<u32>,
    /// Its subject's common name (the user, once access control is on).
    pub common_name: Option<Arc<str>>,
}

/// What a handler can learn about its connection (a request extension).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote_addr: Option<std::net::SocketAddr>,
    /// The common name of the client's verified certificate, when it presented one.
    pub common_name: Option<Arc<str>>,
    /// The member ordinal the certificate names (on the client port, `None` for clients).
    pub member: Option<u32>,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        match self {
            Conn::Plain(s) => ConnInfo { remote_addr: s.peer_addr().ok(), common_name: None, member: None },
            Conn::Tls(s, verified) => ConnInfo {
                remote_addr: s.get_ref().0.peer_addr().ok(),
                common_name: verified.common_name.clone(),
                member: verified.member,
            },
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, ..) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, ..) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, ..) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s, ..) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, ..) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, ..) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepts connections on `listener` until the returned stream is dropped: plain TCP when
/// `tls` is `None`, else only completed TLS handshakes (and, on the peer port, only members of
/// this set). Nagle is off on every connection: the builder's `tcp_nodelay` does not reach
/// connections from a custom incoming stream, and Nagle plus delayed ACKs adds ~40 ms stalls
/// to small Raft and client messages.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<MemberTls>>,
    port: Port,
    metrics: Arc<Metrics>,
) -> ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: the server decides (it logs and goes on).
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Some(tls) = tls.clone() else {
                if tx.send(Ok(Conn::Plain(tcp))).await.is_err() {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&tls, tcp, port)).await {
                    Ok(Ok(conn)) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(refusal)) => {
                        metrics.tls_refused(port.name(), refusal.reason);
                        tracing::warn!(port = port.name(), %remote, reason = refusal.reason, detail = %refusal.detail,
                            "TLS connection refused");
                    }
                    Err(_) => {
                        metrics.tls_refused(port.name(), "timeout");
                        tracing::warn!(port = port.name(), %remote, "TLS connection refused: no handshake within 10 s");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Why a connection was refused: a short reason (a metric label) and the detail (logged).
#[derive(Debug)]
struct Refusal {
    reason: &'static str,
    detail: String,
}

async fn handshake(tls: &MemberTls, tcp: TcpStream, port: Port) -> Result<Conn, Refusal> {
    // A TLS connection opens with a handshake record (content type 22); anything else is a
    // plaintext client (an HTTP/2 preface starts with "PRI").
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(1) if first[0] == 0x16 => {}
        Ok(0) => return Err(Refusal { reason: "closed", detail: "closed before the handshake".into() }),
        Ok(_) => {
            return Err(Refusal {
                reason: "plaintext",
                detail: "a plaintext (non-TLS) client: this port serves TLS only".into(),
            })
        }
        Err(e) => return Err(Refusal { reason: "io", detail: e.to_string() }),
    }
    let loaded = tls.current();
    let config = match port {
        Port::Client => loaded.client.clone(),
        Port::Peer => loaded.peer.clone(),
        Port::Ops => loaded.ops.clone(),
    };
    let stream = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await.map_err(|e| {
        let reason = match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            // Ours to judge: their certificate is missing, unknown, expired or unfit.
            Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) => {
                "certificate"
            }
            // Theirs: they refused ours (unknown CA, wrong name) or gave up.
            Some(rustls::Error::AlertReceived(_)) => "alert",
            _ => "handshake",
        };
        Refusal { reason, detail: e.to_string() }
    })?;
    let member = match port {
        Port::Ops => None,
        // A member calling another's client port (administrative forwards) shows its own
        // certificate; a client's certificate names no member.
        Port::Client => {
            let certs = stream.get_ref().1.peer_certificates();
            let member_ca = certs.and_then(|c| c.split_first()).is_some_and(|(leaf, rest)| {
                loaded.members.verify_client_cert(leaf, rest, rustls::pki_types::UnixTime::now()).is_ok()
            });
            if member_ca {
                tls.peer_ordinal(certs).ok()
            } else {
                None
            }
        }
        Port::Peer => {
            let certs = stream.get_ref().1.peer_certificates();
            Some(tls.peer_ordinal(certs).map_err(|detail| Refusal { reason: "not_a_member", detail })?)
        }
    };
    let common_name = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| common_name(leaf.as_ref()))
        .map(Arc::from);
    Ok(Conn::Tls(Box::new(stream), Verified { member, common_name }))
}

/// The ops port's listener when `tls.ops` is on: the same concurrent handshakes as the gRPC
/// ports (refusals logged and counted), for axum.
#[derive(Debug)]
pub struct OpsListener {
    connections: ReceiverStream<std::io::Result<Conn>>,
    local: std::net::SocketAddr,
}

impl OpsListener {
    /// TLS on `listener` with `tls`'s certificate.
    pub fn new(listener: TcpListener, tls: Arc<MemberTls>, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self { connections: incoming(listener, Some(tls), Port::Ops, metrics), local })
    }
}

impl axum::serve::Listener for OpsListener {
    type Io = Conn;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Conn, std::net::SocketAddr) {
        use tokio_stream::StreamExt;
        loop {
            match self.connections.next().await {
                Some(Ok(conn)) => {
                    let remote = match &conn {
                        Conn::Plain(s) => s.peer_addr(),
                        Conn::Tls(s, ..) => s.get_ref().0.peer_addr(),
                    };
                    if let Ok(remote) = remote {
                        return (conn, remote);
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "ops port: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // The accept task is gone: nothing more will come.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        Ok(self.local)
    }
}

/// The common name (OID 2.5.4.3) in a certificate's subject, read with a small DER walk
/// (webpki, which verified the chain, exposes the subject only as bytes).
pub fn common_name(cert_der: &[u8]) -> Option<String> {
    let der = kvset_proto::tls::rustls::pki_types::CertificateDer::from(cert_der);
    let cert = webpki::EndEntityCert::try_from(&der).ok()?;
    subject_common_name(cert.subject())
}

/// When a certificate stops being valid (its `notAfter`), Unix seconds; `None` when the DER
/// cannot be read. A small walk of the X.509 structure (RFC 5280 §4.1): webpki, which
/// verifies chains, does not expose the validity period.
pub fn not_after(cert_der: &[u8]) -> Option<i64> {
    let (_, cert, _) = der(cert_der)?;
    let (_, tbs, _) = der(cert)?;
    let (tag, _, after_version) = der(tbs)?;
    let fields = if tag == 0xa0 { after_version } else { tbs };
    let (_, _, rest) = der(fields)?; // serialNumber
    let (_, _, rest) = der(rest)?; // signature
    let (_, _, rest) = der(rest)?; // issuer
    let (_, validity, _) = der(rest)?;
    let (_, _, rest) = der(validity)?; // notBefore
    let (tag, time, _) = der(rest)?;
    let text = std::str::from_utf8(time).ok()?.strip_suffix('Z')?;
    let (year, rest) = match (tag, text.len()) {
        // UTCTime: YYMMDDHHMMSS, years 1950..2049.
        (0x17, 12) => {
            let yy: i64 = text[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        // GeneralizedTime: YYYYMMDDHHMMSS.
        (0x18, 14) => (text[..4].parse().ok()?, &text[4..]),
        _ => return None,
    };
    let field = |i: usize| rest.get(i..i + 2).and_then(|f| f.parse::<i64>().ok());
    let (month, day, hour, minute, second) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// One DER element: (tag, contents, rest).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The common name in a DER `Name` (the contents of its SEQUENCE, as webpki gives it); `None`
/// when there is none, or more than one (Go, and so etcd, would take the last: refusing is
/// safer than picking).
pub fn subject_common_name(mut name: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let mut found: Option<String> = None;
    while !name.is_empty() {
        let (set_tag, set, rest) = der(name)?;
        name = rest;
        if set_tag != 0x31 {
            return None;
        }
        let mut atvs = set;
        while !atvs.is_empty() {
            let (seq_tag, atv, more) = der(atvs)?;
            atvs = more;
            if seq_tag != 0x30 {
                return None;
            }
            let (oid_tag, oid, value) = der(atv)?;
            if oid_tag == 0x06 && oid == CN {
                let (string_tag, text, _) = der(value)?;
                // UTF8String, PrintableString, IA5String, T61String.
                if !matches!(string_tag, 0x0c | 0x13 | 0x16 | 0x14) || found.is_some() {
                    return None;
                }
                found = Some(String::from_utf8(text.to_vec()).ok()?);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devcerts::Authority;
    use crate::devcerts::Request;

    #[test]
    fn not_after_reads_a_certificates_validity() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 12, 7), 20_794);
        let ca = Authority::new("test CA").expect("CA");
        // Expired a day ago: valid for 24 h from two days ago.
        let issued = ca.issue(&Request::member("kvset-0", "kvset-0.kvset-peers").expired()).expect("issue");
        let certs = wire::parse_certs(Path::new("member.pem"), issued.cert_pem.as_bytes()).expect("PEM");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .expect("clock");
        let at = not_after(&certs[0]).expect("notAfter");
        assert!((at - (now - 86_400)).abs() < 60, "notAfter {at}, now {now}");
        assert_eq!(not_after(b"not a certificate"), None);
    }
}
