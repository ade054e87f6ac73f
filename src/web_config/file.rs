//! The YAML file itself: its sections, validation, and the resulting
//! [`WebConfig`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use serde::Deserialize;

use super::auth::BasicAuth;
use super::tls::{tls_config, RawTlsConfig};
use super::WebConfigError;

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
pub(crate) struct WebConfig {
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
            .field("basic_auth_users", &self.auth.as_ref().map(|a| a.users().collect::<Vec<_>>()))
            .field("headers", &self.headers)
            .finish()
    }
}

impl WebConfig {
    /// Reads and validates a web configuration file: YAML syntax, known
    /// keys, bcrypt hashes, and that the certificate, key and client CA
    /// files load. An empty file is valid and changes nothing.
    pub(crate) fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
        let text = crate::regular_file::read_to_string(path).map_err(|source| WebConfigError::Read {
            path: path.to_owned(),
            what: "the file",
            file: path.to_owned(),
            source,
        })?;
        WebConfig::parse(path, &text)
    }

    /// [`WebConfig::load`] when a path is given; the default otherwise.
    pub(crate) fn load_optional(path: Option<&Path>) -> Result<WebConfig, WebConfigError> {
        match path {
            Some(p) => WebConfig::load(p),
            None => Ok(WebConfig::default()),
        }
    }

    /// Validates `text` as the content of the file at `path` (relative
    /// paths inside start at the directory of `path`).
    pub(crate) fn parse(path: &Path, text: &str) -> Result<WebConfig, WebConfigError> {
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

    /// The rustls server configuration when TLS is on.
    pub(crate) fn tls(&self) -> Option<Arc<ServerConfig>> {
        self.tls.clone()
    }

    /// The basic-auth verifier when users are configured.
    pub(crate) fn basic_auth(&self) -> Option<Arc<BasicAuth>> {
        self.auth.clone()
    }

    /// Extra response headers from `http_server_config.headers`.
    pub(crate) fn headers(&self) -> &[(String, String)] {
        &self.headers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

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
        let doc = include_str!("../../SECURITY.md");
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
