//! The web configuration file (`--web.config.file`): basic authentication
//! and TLS for the HTTP server.
//!
//! The format is the one of the Prometheus exporter toolkit, so a file
//! written for node_exporter works here for the parts this exporter
//! supports:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt          # PEM; relative paths start at this file's directory
//!   key_file: server.key
//!   client_ca_file: clients-ca.crt # optional: client certificates (mutual TLS)
//!   client_auth_type: RequireAndVerifyClientCert
//!   min_version: TLS12             # TLS12 (default) or TLS13
//!   max_version: TLS13
//! http_server_config:
//!   headers:                       # added to every response
//!     Strict-Transport-Security: max-age=31536000
//! basic_auth_users:
//!   prometheus: $2y$10$...         # bcrypt hash
//! ```
//!
//! Unknown keys are refused, so that a typo cannot silently turn off
//! authentication or TLS. The file is read once, at start; the certificate
//! and key files are re-read when they change on disk, so that renewed
//! certificates are picked up without a restart.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use serde::Deserialize;
use tracing::{info, warn};

/// The realm announced in `WWW-Authenticate`.
pub const REALM: &str = "kissbot-exporter";

/// How long the outcome of a bcrypt verification is remembered.
const AUTH_CACHE_TTL: Duration = Duration::from_secs(60);

/// Most remembered verification outcomes; failures are forgotten first.
const AUTH_CACHE_CAPACITY: usize = 1024;

/// Why a web configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    /// A file could not be read.
    #[error("web config {path}: cannot read {what} {file}: {source}")]
    Read {
        /// The web configuration file.
        path: PathBuf,
        /// Which file it was (`the file`, `cert_file`, ...).
        what: &'static str,
        /// The file that could not be read.
        file: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML or has unknown keys.
    #[error("web config {path}: {reason}")]
    Parse {
        /// The web configuration file.
        path: PathBuf,
        /// What the YAML parser reported.
        reason: String,
    },
    /// A value is invalid.
    #[error("web config {path}: {reason}")]
    Invalid {
        /// The web configuration file.
        path: PathBuf,
        /// What is wrong, naming the key.
        reason: String,
    },
}

/// The file as written; every section refuses unknown keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebConfig {
    #[serde(default)]
    tls_server_config: Option<RawTlsConfig>,
    #[serde(default)]
    http_server_config: Option<RawHttpConfig>,
    #[serde(default)]
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTlsConfig {
    #[serde(default)]
    cert_file: Option<String>,
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttpConfig {
    /// Accepted for compatibility; this server speaks HTTP/1.1 only.
    #[serde(default)]
    http2: Option<bool>,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
}

/// Response headers that `http_server_config.headers` may set (the exporter
/// toolkit's list).
const ALLOWED_HEADERS: &[&str] = &[
    "Strict-Transport-Security",
    "X-Content-Type-Options",
    "X-Frame-Options",
    "X-XSS-Protection",
    "Content-Security-Policy",
];

/// A validated web configuration. The default is plain HTTP without
/// authentication.
#[derive(Clone, Default)]
pub struct WebConfig {
    path: Option<PathBuf>,
    tls: Option<Arc<ServerConfig>>,
    auth: Option<Arc<BasicAuth>>,
    headers: Vec<(String, String)>,
}

impl fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebConfig")
            .field("path", &self.path)
            .field("tls", &self.tls.is_some())
            .field("basic_auth_users", &self.auth.as_ref().map(|a| a.users.keys().collect::<Vec<_>>()))
            .field("headers", &self.headers)
            .finish()
    }
}

impl WebConfig {
    /// Reads and validates a web configuration file: YAML syntax, known
    /// keys, bcrypt hashes, and that the certificate, key and client CA
    /// files load. An empty file is valid and changes nothing.
    pub fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| WebConfigError::Read {
            path: path.to_owned(),
            what: "the file",
            file: path.to_owned(),
            source,
        })?;
        WebConfig::parse(path, &text)
    }

    /// [`WebConfig::load`] when a path is given; the default otherwise.
    pub fn load_optional(path: Option<&Path>) -> Result<WebConfig, WebConfigError> {
        match path {
            Some(p) => WebConfig::load(p),
            None => Ok(WebConfig::default()),
        }
    }

    /// Validates `text` as the content of the file at `path` (relative
    /// paths inside start at the directory of `path`).
    pub fn parse(path: &Path, text: &str) -> Result<WebConfig, WebConfigError> {
        let invalid = |reason: String| WebConfigError::Invalid { path: path.to_owned(), reason };
        let raw: RawWebConfig = serde_yaml_ng::from_str::<Option<RawWebConfig>>(text)
            .map_err(|e| WebConfigError::Parse { path: path.to_owned(), reason: e.to_string() })?
            .unwrap_or_default();
        let base = path.parent().unwrap_or_else(|| Path::new("."));

        let auth = match raw.basic_auth_users {
            Some(users) if !users.is_empty() => Some(Arc::new(BasicAuth::new(users).map_err(invalid)?)),
            _ => None,
        };
        let tls = match raw.tls_server_config {
            Some(t) => Some(Arc::new(tls_config(path, base, t)?)),
            None => None,
        };
        let mut headers = Vec::new();
        if let Some(http) = raw.http_server_config {
            let _ = http.http2;
            for (name, value) in http.headers.unwrap_or_default() {
                let Some(allowed) = ALLOWED_HEADERS.iter().find(|h| h.eq_ignore_ascii_case(&name)) else {
                    return Err(invalid(format!(
                        "http_server_config.headers: {name:?} is not allowed (allowed: {})",
                        ALLOWED_HEADERS.join(", ")
                    )));
                };
                if hyper::header::HeaderValue::from_str(&value).is_err() {
                    return Err(invalid(format!(
                        "http_server_config.headers: the value of {name} is not a valid header value"
                    )));
                }
                headers.push(((*allowed).to_owned(), value));
            }
        }
        Ok(WebConfig { path: Some(path.to_owned()), tls, auth, headers })
    }

    /// The file this configuration was read from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The rustls server configuration when TLS is on.
    pub fn tls(&self) -> Option<Arc<ServerConfig>> {
        self.tls.clone()
    }

    /// The basic-auth verifier when users are configured.
    pub fn basic_auth(&self) -> Option<Arc<BasicAuth>> {
        self.auth.clone()
    }

    /// Extra response headers from `http_server_config.headers`.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }
}

/// Resolves a path from the file against the file's directory.
fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

fn tls_version(key: &str, v: &str) -> Result<&'static rustls::SupportedProtocolVersion, String> {
    match v {
        "TLS12" => Ok(&rustls::version::TLS12),
        "TLS13" => Ok(&rustls::version::TLS13),
        "TLS10" | "TLS11" => Err(format!("tls_server_config.{key}: {v} is not supported (TLS12 or TLS13)")),
        other => Err(format!("tls_server_config.{key}: unknown version {other:?} (TLS12 or TLS13)")),
    }
}

fn tls_config(path: &Path, base: &Path, t: RawTlsConfig) -> Result<ServerConfig, WebConfigError> {
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

fn read(path: &Path, what: &'static str, file: &Path) -> Result<Vec<u8>, WebConfigError> {
    std::fs::read(file).map_err(|source| WebConfigError::Read {
        path: path.to_owned(),
        what,
        file: file.to_owned(),
        source,
    })
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

/// Checks `Authorization: Basic` headers against the configured users.
///
/// bcrypt is slow by design (tens of milliseconds at cost 10), so
/// verifications run on the blocking pool, one at a time (a flood of wrong
/// passwords queues instead of taking every core), and their outcome is
/// remembered for a minute under the SHA-256 of the header, so that a
/// scraper presenting the same credentials every few seconds costs one
/// verification a minute.
pub struct BasicAuth {
    users: HashMap<String, String>,
    dummy_cost: u32,
    dummy: OnceLock<String>,
    cache: Mutex<HashMap<[u8; 32], (bool, Instant)>>,
    verify_slot: tokio::sync::Semaphore,
}

impl BasicAuth {
    fn new(users: BTreeMap<String, String>) -> Result<BasicAuth, String> {
        let mut dummy_cost = 10;
        for (user, hash) in &users {
            if user.is_empty() || user.contains(':') {
                return Err(format!("basic_auth_users: {user:?} is not a valid user name (empty or with a ':')"));
            }
            dummy_cost = validate_hash(hash).map_err(|e| format!("basic_auth_users.{user}: {e}"))?;
        }
        Ok(BasicAuth {
            users: users.into_iter().collect(),
            dummy_cost,
            dummy: OnceLock::new(),
            cache: Mutex::new(HashMap::new()),
            verify_slot: tokio::sync::Semaphore::new(1),
        })
    }

    /// The configured user names.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }

    /// Whether the `Authorization` header value names a configured user
    /// with the right password.
    pub async fn check(self: &Arc<Self>, header: Option<&[u8]>) -> bool {
        let Some(header) = header else { return false };
        let key: [u8; 32] = match ring::digest::digest(&ring::digest::SHA256, header).as_ref().try_into() {
            Ok(k) => k,
            Err(_) => return false,
        };
        if let Some(ok) = self.cached(&key) {
            return ok;
        }
        let Some((user, password)) = parse_basic(header) else { return false };
        // One verification at a time; a request that waited may find the
        // answer cached by the one before it.
        let Ok(_permit) = self.verify_slot.acquire().await else { return false };
        if let Some(ok) = self.cached(&key) {
            return ok;
        }
        let this = self.clone();
        let ok = tokio::task::spawn_blocking(move || this.verify(&user, &password)).await.unwrap_or(false);
        self.remember(key, ok);
        ok
    }

    /// bcrypt verification (blocking). An unknown user is checked against a
    /// dummy hash of the same cost, so that timing does not tell which
    /// user names exist.
    fn verify(&self, user: &str, password: &str) -> bool {
        match self.users.get(user) {
            Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            None => {
                let dummy =
                    self.dummy.get_or_init(|| bcrypt::hash("kissbot-exporter", self.dummy_cost).unwrap_or_default());
                let _ = bcrypt::verify(password, dummy);
                false
            }
        }
    }

    fn cached(&self, key: &[u8; 32]) -> Option<bool> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(key).filter(|(_, expires)| *expires > Instant::now()).map(|(ok, _)| *ok)
    }

    fn remember(&self, key: [u8; 32], ok: bool) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if cache.len() >= AUTH_CACHE_CAPACITY {
            cache.retain(|_, (ok, expires)| *ok && *expires > now);
            if cache.len() >= AUTH_CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(key, (ok, now + AUTH_CACHE_TTL));
    }
}

/// Checks that `hash` is a bcrypt hash (`$2a$`, `$2b$` or `$2y$`) and
/// returns its cost.
fn validate_hash(hash: &str) -> Result<u32, String> {
    let prefix_ok = ["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p));
    if !prefix_ok {
        return Err("not a bcrypt hash (expected $2a$, $2b$ or $2y$, e.g. from htpasswd -nBC 10)".into());
    }
    let parts: bcrypt::HashParts = hash.parse().map_err(|e| format!("not a valid bcrypt hash: {e}"))?;
    let cost = parts.get_cost();
    if !(4..=31).contains(&cost) {
        return Err(format!("bcrypt cost {cost} is outside 4..=31"));
    }
    Ok(cost)
}

/// Splits `Basic base64(user:password)` into user and password.
fn parse_basic(header: &[u8]) -> Option<(String, String)> {
    let header = std::str::from_utf8(header).ok()?.trim();
    let (scheme, value) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(value.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hash of `secret` at cost 4, to keep the tests fast.
    fn secret_hash() -> String {
        bcrypt::hash("secret", 4).expect("hash")
    }

    fn parse(text: &str) -> Result<WebConfig, WebConfigError> {
        WebConfig::parse(Path::new("/nonexistent/web.yml"), text)
    }

    #[test]
    fn empty_file_is_plain_http() {
        let c = parse("").expect("empty");
        assert!(c.tls().is_none() && c.basic_auth().is_none());
        let c = parse("# nothing\n").expect("comment only");
        assert!(c.tls().is_none());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = parse("basic_auth_user:\n  a: b\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `basic_auth_user`"), "{e}");
        let e = parse("tls_server_config:\n  certfile: x\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `certfile`"), "{e}");
    }

    #[test]
    fn hashes_are_validated() {
        let ok = parse(&format!("basic_auth_users:\n  prometheus: {}\n", secret_hash())).expect("valid");
        assert_eq!(ok.basic_auth().expect("auth").users().collect::<Vec<_>>(), ["prometheus"]);
        let e = parse("basic_auth_users:\n  prometheus: secret\n").unwrap_err().to_string();
        assert!(e.contains("basic_auth_users.prometheus: not a bcrypt hash"), "{e}");
        let e = parse("basic_auth_users:\n  prometheus: $2y$10$short\n").unwrap_err().to_string();
        assert!(e.contains("not a valid bcrypt hash"), "{e}");
    }

    #[test]
    fn tls_needs_cert_and_key() {
        let e = parse("tls_server_config:\n  key_file: k.pem\n").unwrap_err().to_string();
        assert!(e.contains("cert_file is required"), "{e}");
        let e = parse("tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n").unwrap_err().to_string();
        assert!(e.contains("cannot read cert_file /nonexistent/c.pem"), "{e}");
        let e = parse("tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n  min_version: TLS10\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("min_version: TLS10 is not supported"), "{e}");
    }

    #[test]
    fn headers_are_restricted() {
        let c = parse("http_server_config:\n  headers:\n    x-frame-options: deny\n").expect("valid");
        assert_eq!(c.headers(), [("X-Frame-Options".to_owned(), "deny".to_owned())]);
        let e = parse("http_server_config:\n  headers:\n    Server: x\n").unwrap_err().to_string();
        assert!(e.contains("\"Server\" is not allowed"), "{e}");
    }

    /// The example in the security documentation loads as written. (If the
    /// section moves to another file, point `include_str!` there.)
    #[tokio::test]
    async fn documented_example_loads() {
        let doc = include_str!("../SECURITY.md");
        let yaml = doc
            .split("```yaml\n")
            .skip(1)
            .filter_map(|b| b.split("```").next())
            .find(|b| b.contains("tls_server_config:"))
            .expect("the web config example");
        let dir = tempfile::tempdir().expect("tempdir");
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
        std::fs::write(dir.path().join("server.crt"), ck.cert.pem()).expect("write cert");
        std::fs::write(dir.path().join("server.key"), ck.signing_key.serialize_pem()).expect("write key");
        let path = dir.path().join("web.yml");
        std::fs::write(&path, yaml).expect("write config");
        let c = WebConfig::load(&path).expect("the documented example loads");
        assert!(c.tls().is_some());
        assert_eq!(c.headers().len(), 2);
        let auth = c.basic_auth().expect("auth");
        let header = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("prometheus:change-me"));
        assert!(auth.check(Some(header.as_bytes())).await);
    }

    #[test]
    fn basic_header_parsing() {
        // "user:pa:ss"
        assert_eq!(parse_basic(b"Basic dXNlcjpwYTpzcw=="), Some(("user".into(), "pa:ss".into())));
        assert_eq!(parse_basic(b"basic dXNlcjpwYTpzcw=="), Some(("user".into(), "pa:ss".into())));
        assert_eq!(parse_basic(b"Bearer abc"), None);
        assert_eq!(parse_basic(b"Basic !!!"), None);
    }

    #[tokio::test]
    async fn checks_and_caches() {
        let c = parse(&format!("basic_auth_users:\n  prometheus: {}\n", secret_hash())).expect("valid");
        let auth = c.basic_auth().expect("auth");
        let good = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("prometheus:secret"));
        let bad = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("prometheus:wrong"));
        let nobody = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("nobody:secret"));
        assert!(auth.check(Some(good.as_bytes())).await);
        let key: [u8; 32] =
            ring::digest::digest(&ring::digest::SHA256, good.as_bytes()).as_ref().try_into().expect("32 bytes");
        assert_eq!(auth.cached(&key), Some(true), "a success is remembered");
        assert!(auth.check(Some(good.as_bytes())).await, "cached");
        assert!(!auth.check(Some(bad.as_bytes())).await);
        assert!(!auth.check(Some(nobody.as_bytes())).await);
        assert!(!auth.check(None).await);
    }
}
