//! TLS for every Shoal server (rustls on the aws-lc-rs provider): a server
//! configuration from PEM files, optionally requiring client certificates
//! signed by a CA (mutual TLS between fleet members), and a listener that
//! completes handshakes off the accept loop, so a client that stalls its
//! handshake holds up nobody else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::limit::{Connections, Permitted};

/// Why TLS could not be set up; each names the file and what to check.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{what} {path}: {reason}")]
    File {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: String,
        /// Why it is not usable.
        reason: String,
    },
    /// rustls refused the combination (a key that does not match the
    /// certificate, say).
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The crypto provider every Shoal TLS configuration uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Certificates (a chain, leaf first) from a PEM file.
pub fn read_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |reason: String| TlsError::File {
        what,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_error("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// A private key (PKCS#8, PKCS#1 or SEC1) from a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        what: "private key",
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Trust anchors from a PEM file of CA certificates.
pub fn read_roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(path, "CA certificate")? {
        roots.add(cert).map_err(|e| TlsError::File {
            what: "CA certificate",
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// What a server needs to speak TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the leaf.
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of
    /// these CAs (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// The rustls configuration (HTTP/1.1 by ALPN).
    pub fn config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.config_with_alpn(b"http/1.1")
    }

    /// The rustls configuration for gRPC (HTTP/2 by ALPN, which gRPC
    /// clients insist on), same certificate and client verification.
    pub fn grpc_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.config_with_alpn(b"h2")
    }

    fn config_with_alpn(&self, alpn: &[u8]) -> Result<Arc<ServerConfig>, TlsError> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(read_roots(ca)?),
                    provider(),
                )
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(read_certs(&self.cert, "certificate")?, read_key(&self.key)?)
            .map_err(|e| {
                TlsError::Config(format!(
                    "{e} (does {} hold the key of {}?)",
                    self.key.display(),
                    self.cert.display()
                ))
            })?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(config))
    }
}

/// How long a client may take to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A listener that hands out connections once their TLS handshake is done.
/// Handshakes run in tasks of their own; a failed or stalled one is
/// dropped (and logged at debug level) without delaying the others.
pub struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(Permitted<TlsStream<TcpStream>>, SocketAddr)>,
    local: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Accepts on `tcp` with `config`, while `connections` has room: a
    /// connection counts against it from its accept, handshake included.
    pub fn new(
        tcp: TcpListener,
        config: Arc<ServerConfig>,
        connections: Connections,
    ) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let accepting = tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = connections.admit_accepted(tcp.accept()) => accepted,
                    () = tx.closed() => return,
                };
                let (admitted, (stream, peer)) = match accepted {
                    (admitted, Ok(accepted)) => (admitted, accepted),
                    (_, Err(e)) => {
                        // Out of file descriptors and the like: back off
                        // rather than spin, as axum's own loop does.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((Permitted::new(tls, admitted), peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            ready,
            local,
            accepting,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl TlsListener {
    /// The next connection whose handshake is done, with its peer.
    pub async fn next(&mut self) -> (Permitted<TlsStream<TcpStream>>, SocketAddr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept task only ends when the receiver is gone.
            None => std::future::pending().await,
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = Permitted<TlsStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        self.next().await
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
