//! How Shoal's clients (the CLI, replicas, gateways, peers) verify the
//! servers they call over `https://`: trust anchors from `--ca` (or the
//! system's roots when none is given) and, for mutual TLS, a client
//! certificate. Set once per process with [`configure`], at start-up,
//! before any client exists; every connector made afterwards uses it.
//! Plain `http://` URLs keep working beside `https://` ones.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use shoal_http::tls::{TlsError, provider, read_certs, read_key, read_roots};

/// What a process's clients trust and present.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM CA certificates to trust instead of the system's roots.
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS.
    pub cert: Option<PathBuf>,
    /// Its private key.
    pub key: Option<PathBuf>,
}

static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();

impl ClientTls {
    /// The rustls configuration.
    pub fn config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let roots = match &self.ca {
            Some(ca) => read_roots(ca)?,
            None => system_roots(),
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots);
        // ALPN is left to the connector (HTTP/1.1).
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(read_certs(cert, "client certificate")?, read_key(key)?)
                .map_err(|e| TlsError::Config(e.to_string()))?,
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(TlsError::Config(
                    "--client-cert and --client-key go together".into(),
                ));
            }
        };
        Ok(Arc::new(config))
    }
}

fn system_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        let _ = roots.add(cert);
    }
    roots
}

/// Sets the process's client TLS. Call once, before any client exists;
/// a second call is refused.
pub fn configure(tls: &ClientTls) -> Result<(), TlsError> {
    let config = tls.config()?;
    CONFIG
        .set(config)
        .map_err(|_| TlsError::Config("client TLS was configured twice".into()))
}

/// The process's client TLS configuration (system roots unless
/// [`configure`] said otherwise).
pub fn client_config() -> Arc<rustls::ClientConfig> {
    CONFIG
        .get_or_init(|| {
            ClientTls::default()
                .config()
                .unwrap_or_else(|_| unreachable_config())
        })
        .clone()
}

fn unreachable_config() -> Arc<rustls::ClientConfig> {
    // Building with system roots and no client certificate cannot fail
    // for want of files; keep a working (trust-nothing) fallback anyway.
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the provider supports the default TLS versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    )
}

/// A connector for `http://` and `https://` URLs with the process's TLS.
pub fn connector(mut http: HttpConnector) -> HttpsConnector<HttpConnector> {
    http.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*client_config()).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}
