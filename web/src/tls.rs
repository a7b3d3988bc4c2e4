//! TLS on the master's port (`--tls-cert`, `--tls-key`): rustls, reloaded
//! from the same files on SIGHUP (new connections get the new certificate;
//! open ones, streams included, keep theirs). With `--agent-ca`, clients may
//! present a certificate: one that does not chain to that CA fails the
//! handshake, one that does names its holder by its DNS names, which the
//! agent link binds agent ids to. HTTP clients need none.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// Why TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} {path}: {detail}")]
    Read {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("the {what} {path} holds no PEM certificate")]
    Empty { what: &'static str, path: PathBuf },
    #[error("cannot set up TLS with {cert} and {key}: {detail}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        detail: String,
    },
}

/// Where the certificates are, read again on each reload.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA agents' client certificates must chain to.
    pub client_ca: Option<PathBuf>,
}

/// PEM certificates of `path`.
pub fn certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |detail: String| TlsError::Read {
        what,
        path: path.to_owned(),
        detail,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let failed = |detail: String| TlsError::Config {
        cert: files.cert.clone(),
        key: files.key.clone(),
        detail,
    };
    let certs = certificates("certificate (--tls-cert)", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Read {
        what: "private key (--tls-key)",
        path: files.key.clone(),
        detail: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| failed(e.to_string()))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("agent CA (--agent-ca)", ca)? {
                roots
                    .add(cert)
                    .map_err(|e| failed(format!("agent CA {}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| failed(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| failed(e.to_string()))?;
    // gRPC (the agent link) needs HTTP/2; browsers and curl may ask for either.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The server's TLS settings, swapped whole on reload.
pub struct Tls {
    files: TlsFiles,
    config: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let config = server_config(&files)?;
        Ok(Self {
            files,
            config: RwLock::new(config),
        })
    }

    /// What new connections use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reads the files again; on failure the old settings stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.files)?;
        *self
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
        Ok(())
    }
}

impl Tls {
    /// From `--tls-cert` and `--tls-key` (clap makes each require the
    /// other): None where TLS is off.
    pub fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
    ) -> Result<Option<Arc<Self>>, TlsError> {
        let (Some(cert), Some(key)) = (cert, key) else {
            return Ok(None);
        };
        let files = TlsFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            client_ca: client_ca.map(Path::to_owned),
        };
        Ok(Some(Arc::new(Self::load(files)?)))
    }
}

/// SIGHUP: the operator renewed the certificate; new connections get it
/// (open ones go on), and a file that cannot be used keeps the old one.
/// Without TLS, SIGHUP is taken and does nothing.
pub async fn reload_on_hangup(tls: Option<Arc<Tls>>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot watch for SIGHUP; the certificate stays until restart");
        return;
    };
    while hangups.recv().await.is_some() {
        let Some(tls) = &tls else { continue };
        match tls.reload() {
            Ok(()) => tracing::info!("SIGHUP: TLS certificate and key read again"),
            Err(error) => {
                tracing::error!(%error, "SIGHUP: the new certificate cannot be used; the old one stays")
            }
        }
    }
}

/// Who the connection's client certificate (verified against
/// `--agent-ca`) names: its DNS names, sorted, comma-joined; None without
/// one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity(pub Option<String>);

impl PeerIdentity {
    pub fn of(connection: &rustls::ServerConnection) -> Self {
        let name = connection
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|der| webpki::EndEntityCert::try_from(der).ok())
            .map(|cert| {
                let mut names: Vec<&str> = cert.valid_dns_names().collect();
                names.sort_unstable();
                names.join(",")
            })
            .filter(|names| !names.is_empty());
        Self(name)
    }
}
