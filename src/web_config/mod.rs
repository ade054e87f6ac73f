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
//!
//! - `file`: the YAML, its validation, and the resulting [`WebConfig`].
//! - `tls`: the rustls server configuration and the certificate resolver
//!   that re-reads renewed certificates.
//! - `auth`: basic authentication with bcrypt and its verification cache.

mod auth;
mod file;
mod tls;

use std::path::{Path, PathBuf};

pub(crate) use auth::BasicAuth;
pub(crate) use file::WebConfig;

/// Why a web configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WebConfigError {
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

/// Resolves a path from the file against the file's directory.
pub(crate) fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

/// Reads a file named in the configuration, naming both in the error.
pub(crate) fn read(path: &Path, what: &'static str, file: &Path) -> Result<Vec<u8>, WebConfigError> {
    crate::regular_file::read(file).map_err(|source| WebConfigError::Read {
        path: path.to_owned(),
        what,
        file: file.to_owned(),
        source,
    })
}
