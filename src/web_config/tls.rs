//! TLS for the HTTP server: the rustls configuration from
//! `tls_server_config`, and a certificate resolver that re-reads the
//! certificate and key when they change on disk.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use serde::Deserialize;
use tracing::{info, warn};

use super::{read, resolve, WebConfigError};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTlsConfig {
    #[serde(default)]
    pub(super) cert_file: Option<String>,
    #[serde(default)]
    key_file: Option<String>,
    #[serde(default)]
    client_ca_file: Option<String>,
    #[serde(default)]
    client_auth_type: Option<String>,
    #[serde(default)]
    min_version: Option<String>,
    #[serde(default)]
    max_version: Option<String>,
}

fn tls_version(key: &str, v: &str) -> Result<&'static rustls::SupportedProtocolVersion, String> {
    match v {
        "TLS12" => Ok(&rustls::version::TLS12),
        "TLS13" => Ok(&rustls::version::TLS13),
        "TLS10" | "TLS11" => Err(format!("tls_server_config.{key}: {v} is not supported (TLS12 or TLS13)")),
        other => Err(format!("tls_server_config.{key}: unknown version {other:?} (TLS12 or TLS13)")),
    }
}

pub(super) fn tls_config(path: &Path, base: &Path, t: RawTlsConfig) -> Result<ServerConfig, WebConfigError> {
    let invalid = |reason: String| WebConfigError::Invalid { path: path.to_owned(), reason };
    let nonempty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
    let (cert_file, key_file) = match (nonempty(t.cert_file), nonempty(t.key_file)) {
        (Some(c), Some(k)) => (resolve(base, &c), resolve(base, &k)),
        (None, _) => return Err(invalid("tls_server_config: cert_file is required".into())),
        (_, None) => return Err(invalid("tls_server_config: key_file is required".into())),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let min = tls_version("min_version", t.min_version.as_deref().unwrap_or("TLS12")).map_err(invalid)?;
    let max = tls_version("max_version", t.max_version.as_deref().unwrap_or("TLS13")).map_err(invalid)?;
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = [&rustls::version::TLS12, &rustls::version::TLS13]
        .into_iter()
        .filter(|v| {
            let rank = |x: &rustls::SupportedProtocolVersion| u16::from(x.version);
            rank(v) >= rank(min) && rank(v) <= rank(max)
        })
        .collect();
    if versions.is_empty() {
        return Err(invalid("tls_server_config: min_version is above max_version".into()));
    }

    let client_ca = nonempty(t.client_ca_file).map(|c| resolve(base, &c));
    let auth_type = t.client_auth_type.unwrap_or_default();
    let require = match auth_type.as_str() {
        "" | "NoClientCert" => None,
        "VerifyClientCertIfGiven" => Some(false),
        "RequireAndVerifyClientCert" => Some(true),
        "RequestClientCert" | "RequireAnyClientCert" | "RequireClientCert" => {
            return Err(invalid(format!(
                "tls_server_config.client_auth_type: {auth_type} (client certificates without verification) is not \
                 supported; use VerifyClientCertIfGiven or RequireAndVerifyClientCert with client_ca_file"
            )))
        }
        other => {
            return Err(invalid(format!(
                "tls_server_config.client_auth_type: unknown value {other:?} (NoClientCert, VerifyClientCertIfGiven \
                 or RequireAndVerifyClientCert)"
            )))
        }
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| invalid(format!("tls_server_config: {e}")))?;
    let builder = match (require, client_ca) {
        (None, None) => builder.with_no_client_auth(),
        (None, Some(_)) => {
            return Err(invalid(
                "tls_server_config: client_ca_file is set but client_auth_type is not; set it to \
                 RequireAndVerifyClientCert (or VerifyClientCertIfGiven)"
                    .into(),
            ))
        }
        (Some(_), None) => {
            return Err(invalid(format!("tls_server_config: client_auth_type {auth_type} needs client_ca_file")))
        }
        (Some(required), Some(ca_file)) => {
            let pem = read(path, "client_ca_file", &ca_file)?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| invalid(format!("client_ca_file {}: {e}", ca_file.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| invalid(format!("client_ca_file {}: bad certificate: {e}", ca_file.display())))?;
            }
            if roots.is_empty() {
                return Err(invalid(format!("client_ca_file {}: no certificate in the file", ca_file.display())));
            }
            let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            if !required {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier =
                verifier.build().map_err(|e| invalid(format!("client_ca_file {}: {e}", ca_file.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let resolver = CertResolver::new(path, cert_file, key_file, provider)?;
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The modification time and size of the certificate and key files, to
/// notice a renewal.
type Stamp = Option<(SystemTime, u64, SystemTime, u64)>;

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let c = std::fs::metadata(cert).ok()?;
    let k = std::fs::metadata(key).ok()?;
    Some((c.modified().ok()?, c.len(), k.modified().ok()?, k.len()))
}

/// Serves the certificate and key from their files, and re-reads them when
/// they change (at most every few seconds). A renewal that does not load
/// is logged and the previous pair stays in use.
struct CertResolver {
    config_path: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Mutex<CurrentCert>,
}

struct CurrentCert {
    key: Arc<CertifiedKey>,
    stamp: Stamp,
    checked: Instant,
}

/// How often at most the certificate files are checked for a change.
const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(5);

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver").field("cert_file", &self.cert_file).field("key_file", &self.key_file).finish()
    }
}

impl CertResolver {
    fn new(
        config_path: &Path,
        cert_file: PathBuf,
        key_file: PathBuf,
        provider: Arc<CryptoProvider>,
    ) -> Result<CertResolver, WebConfigError> {
        let stamp = stamp(&cert_file, &key_file);
        let key = load_certified_key(config_path, &cert_file, &key_file, &provider)?;
        Ok(CertResolver {
            config_path: config_path.to_owned(),
            cert_file,
            key_file,
            provider,
            current: Mutex::new(CurrentCert { key: Arc::new(key), stamp, checked: Instant::now() }),
        })
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if cur.checked.elapsed() >= CERT_CHECK_INTERVAL {
            cur.checked = Instant::now();
            let now = stamp(&self.cert_file, &self.key_file);
            if now.is_some() && now != cur.stamp {
                cur.stamp = now;
                match load_certified_key(&self.config_path, &self.cert_file, &self.key_file, &self.provider) {
                    Ok(key) => {
                        cur.key = Arc::new(key);
                        info!(cert_file = %self.cert_file.display(), "tls certificate reloaded");
                    }
                    Err(e) => warn!(error = %e, "tls certificate changed but does not load; the previous one stays"),
                }
            }
        }
        Some(cur.key.clone())
    }
}

fn load_certified_key(
    path: &Path,
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, WebConfigError> {
    let invalid = |reason: String| WebConfigError::Invalid { path: path.to_owned(), reason };
    let cert_pem = read(path, "cert_file", cert_file)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("cert_file {}: {e}", cert_file.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!("cert_file {}: no certificate in the file", cert_file.display())));
    }
    let key_pem = read(path, "key_file", key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| invalid(format!("key_file {}: no usable private key: {e}", key_file.display())))?;
    CertifiedKey::from_der(certs, key, provider)
        .map_err(|e| invalid(format!("cert_file {} and key_file {}: {e}", cert_file.display(), key_file.display())))
}
