//! Basic authentication: bcrypt hashes checked on the blocking pool, one at
//! a time, with a cache of recent outcomes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;

/// How long the outcome of a bcrypt verification is remembered.
const AUTH_CACHE_TTL: Duration = Duration::from_secs(60);

/// Most remembered verification outcomes; failures are forgotten first.
const AUTH_CACHE_CAPACITY: usize = 1024;

/// Checks `Authorization: Basic` headers against the configured users.
///
/// bcrypt is slow by design (tens of milliseconds at cost 10), so
/// verifications run on the blocking pool, one at a time (a flood of wrong
/// passwords queues instead of taking every core), and their outcome is
/// remembered for a minute under the SHA-256 of the header, so that a
/// scraper presenting the same credentials every few seconds costs one
/// verification a minute.
pub(crate) struct BasicAuth {
    users: HashMap<String, String>,
    dummy_cost: u32,
    dummy: OnceLock<String>,
    cache: Mutex<HashMap<[u8; 32], (bool, Instant)>>,
    verify_slot: tokio::sync::Semaphore,
}

impl BasicAuth {
    pub(super) fn new(users: BTreeMap<String, String>) -> Result<BasicAuth, String> {
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
    pub(crate) fn users(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }

    /// Whether the `Authorization` header value names a configured user
    /// with the right password.
    pub(crate) async fn check(self: &Arc<Self>, header: Option<&[u8]>) -> bool {
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

    pub(super) fn cached(&self, key: &[u8; 32]) -> Option<bool> {
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

    #[test]
    fn basic_header_parsing() {
        // "user:pa:ss"
        assert_eq!(parse_basic(b"Basic dXNlcjpwYTpzcw=="), Some(("user".into(), "pa:ss".into())));
        assert_eq!(parse_basic(b"basic dXNlcjpwYTpzcw=="), Some(("user".into(), "pa:ss".into())));
        assert_eq!(parse_basic(b"Bearer abc"), None);
        assert_eq!(parse_basic(b"Basic !!!"), None);
    }
}
