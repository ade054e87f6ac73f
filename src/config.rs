//! Command-line flags and environment variables, parsed with clap.
//!
//! Every flag also reads `KISSBOT_EXPORTER_<NAME>` (dots and dashes become
//! underscores), so containers can be configured without a command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// The default HTTP port. 8377 lies outside the 9100-9999 block that the
/// Prometheus exporter port registry has handed out, so it does not collide
/// with node_exporter and friends on the same host.
pub const DEFAULT_PORT: u16 = 8377;

/// Runtime configuration of the exporter. Every field has a working default.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Path of the Unix socket the bots write to.
    #[arg(long = "socket.path", env = "KISSBOT_EXPORTER_SOCKET_PATH", default_value = kissbot_client::DEFAULT_SOCKET_PATH)]
    pub socket_path: PathBuf,

    /// Permissions of the socket file, in octal; applied at creation time.
    #[arg(long = "socket.mode", env = "KISSBOT_EXPORTER_SOCKET_MODE", default_value = "0660", value_parser = parse_mode)]
    pub socket_mode: u32,

    /// Group that owns the socket (name or numeric gid); with mode 0660 only
    /// its members (and the owner) can connect.
    #[arg(long = "socket.group", env = "KISSBOT_EXPORTER_SOCKET_GROUP")]
    pub socket_group: Option<String>,

    /// Only these peer uids may send (comma-separated); empty allows every
    /// process that can open the socket. Checked with SO_PEERCRED.
    #[arg(long = "socket.allowed-uids", env = "KISSBOT_EXPORTER_SOCKET_ALLOWED_UIDS", value_delimiter = ',')]
    pub socket_allowed_uids: Vec<u32>,

    /// Compare each message's pid with the sending process's pid (when the
    /// kernel can tell it): `off`, `warn` (count and log), `enforce` (reject).
    #[arg(long = "socket.verify-pid", env = "KISSBOT_EXPORTER_SOCKET_VERIFY_PID", value_enum, default_value_t = VerifyPid::Warn)]
    pub socket_verify_pid: VerifyPid,

    /// Most socket connections served at once; at the limit, a new connection evicts the one that
    /// has gone longest without completing a line, so a bot always gets through.
    #[arg(long = "socket.max-connections", env = "KISSBOT_EXPORTER_SOCKET_MAX_CONNECTIONS", default_value_t = 8192)]
    pub socket_max_connections: usize,

    /// A line must be complete this long after its first byte arrived, or the connection is closed
    /// (a sender trickling bytes must not hold a connection slot).
    #[arg(long = "socket.line-timeout", env = "KISSBOT_EXPORTER_SOCKET_LINE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub socket_line_timeout: Duration,

    /// A connection that sends nothing for this long is closed.
    #[arg(long = "socket.idle-timeout", env = "KISSBOT_EXPORTER_SOCKET_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub socket_idle_timeout: Duration,

    /// Longest accepted line in bytes; longer lines are skipped and counted.
    #[arg(long = "socket.max-line-bytes", env = "KISSBOT_EXPORTER_SOCKET_MAX_LINE_BYTES", default_value_t = 64 * 1024)]
    pub socket_max_line_bytes: usize,

    /// SQLite database file (created, or migrated in place if it exists).
    #[arg(long = "db.path", env = "KISSBOT_EXPORTER_DB_PATH", default_value = "kissbot_monitor.db")]
    pub db_path: PathBuf,

    /// Most rows the writer commits in one transaction.
    #[arg(long = "db.batch-size", env = "KISSBOT_EXPORTER_DB_BATCH_SIZE", default_value_t = 4096)]
    pub db_batch_size: usize,

    /// Address of the HTTP server (metrics, landing page, health, API):
    /// `host:port`, `[::1]:port`, a host name such as `localhost:8377`, or
    /// `:port` for every interface. Give it more than once (or comma-separated
    /// in the environment variable) to listen on several addresses.
    #[arg(long = "web.listen-address", env = "KISSBOT_EXPORTER_WEB_LISTEN_ADDRESS", default_value = "127.0.0.1:8377", value_delimiter = ',', value_parser = parse_listen_address)]
    pub web_listen_address: Vec<ListenAddress>,

    /// Enable the lifecycle endpoints `POST /-/reload` (re-reads the pricing and budgets files) and
    /// `POST /api/bots/{channel}/forget` (forgets a dead or stale bot).
    #[arg(long = "web.enable-lifecycle", env = "KISSBOT_EXPORTER_WEB_ENABLE_LIFECYCLE")]
    pub web_enable_lifecycle: bool,

    /// TOML price table consulted before the embedded one; re-read on SIGHUP.
    #[arg(long = "pricing.file", env = "KISSBOT_EXPORTER_PRICING_FILE")]
    pub pricing_file: Option<PathBuf>,

    /// TOML file of LLM budgets per bot (USD per UTC day and month); re-read
    /// with the pricing file on SIGHUP and `POST /-/reload`.
    #[arg(long = "budgets.file", env = "KISSBOT_EXPORTER_BUDGETS_FILE")]
    pub budgets_file: Option<PathBuf>,

    /// Path under which the metrics are served.
    #[arg(long = "web.telemetry-path", env = "KISSBOT_EXPORTER_WEB_TELEMETRY_PATH", default_value = "/metrics")]
    pub web_telemetry_path: String,

    /// Web configuration file (exporter-toolkit YAML): TLS and basic authentication.
    #[arg(long = "web.config.file", env = "KISSBOT_EXPORTER_WEB_CONFIG_FILE")]
    pub web_config_file: Option<PathBuf>,

    /// Most HTTP connections open at once; when full, the one idle longest
    /// (or still sending its request) is closed to make room.
    #[arg(long = "web.max-connections", env = "KISSBOT_EXPORTER_WEB_MAX_CONNECTIONS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub web_max_connections: u32,

    /// Most `/api/usage` queries run at once; beyond it, 503 with `Retry-After`.
    #[arg(long = "web.max-usage-queries", env = "KISSBOT_EXPORTER_WEB_MAX_USAGE_QUERIES", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub web_max_usage_queries: u32,

    /// A `/api/usage` query still running after this long is stopped (503).
    #[arg(long = "web.usage-query-timeout", env = "KISSBOT_EXPORTER_WEB_USAGE_QUERY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub web_usage_query_timeout: Duration,

    /// Most memory, in MiB, that large response bodies (metrics, landing
    /// page, bots list) may hold across all connections still sending them.
    /// Beyond it scrapes share the newest rendered body and the other pages
    /// answer 503, so clients that never read cannot exhaust memory.
    #[arg(long = "web.max-response-memory-mib", env = "KISSBOT_EXPORTER_WEB_MAX_RESPONSE_MEMORY_MIB", default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    pub web_max_response_memory_mib: u64,

    /// A bot without a heartbeat for this long is marked stale.
    #[arg(long = "heartbeat.stale-after", env = "KISSBOT_EXPORTER_HEARTBEAT_STALE_AFTER", default_value = "90s", value_parser = parse_duration)]
    pub heartbeat_stale_after: Duration,

    /// An offline bot keeps its series this long, then they are removed; dead and stale bots
    /// keep theirs until they come back, unregister or are forgotten.
    #[arg(long = "bot.expiry", env = "KISSBOT_EXPORTER_BOT_EXPIRY", default_value = "1h", value_parser = parse_duration)]
    pub bot_expiry: Duration,

    /// How long a write waits for a lock held by another process before it
    /// fails and is retried.
    #[arg(long = "db.busy-timeout", env = "KISSBOT_EXPORTER_DB_BUSY_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub db_busy_timeout: Duration,

    /// Largest size of the database file in MiB (`PRAGMA max_page_count`); 0 for no limit.
    /// When it is reached writes fail, rows stay queued and are counted, and
    /// writing resumes once space is freed (e.g. by retention).
    #[arg(long = "db.max-size-mib", env = "KISSBOT_EXPORTER_DB_MAX_SIZE_MIB", default_value_t = 0)]
    pub db_max_size_mib: u64,

    /// Delete `bot_metrics` and `bot_events` rows (process samples and
    /// lifecycle events) older than this; `0` keeps them all. Never touches
    /// `llm_usage`, the cost ledger: see `--db.llm-usage-retention`.
    #[arg(long = "db.retention", env = "KISSBOT_EXPORTER_DB_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub db_retention: Duration,

    /// Delete `llm_usage` rows (the LLM cost ledger) older than this; `0`
    /// (the default) keeps every row forever.
    #[arg(long = "db.llm-usage-retention", env = "KISSBOT_EXPORTER_DB_LLM_USAGE_RETENTION", default_value = "0", value_parser = parse_duration)]
    pub db_llm_usage_retention: Duration,

    /// Before the first schema change to an existing database file, write a
    /// consistent copy next to it (`<file>.v<version>-<time>.bak`, SQLite's
    /// online backup); `false` skips it.
    #[arg(long = "db.migration-backup", env = "KISSBOT_EXPORTER_DB_MIGRATION_BACKUP", default_value_t = true, action = clap::ArgAction::Set)]
    pub db_migration_backup: bool,

    /// How often the bots' processes are sampled for CPU and memory.
    #[arg(long = "sampler.interval", env = "KISSBOT_EXPORTER_SAMPLER_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub sampler_interval: Duration,

    /// Test hook: an artificial delay added to every sampler pass, to prove a
    /// slow sampler cannot stall ingest or scrapes.
    #[arg(long = "sampler.test-delay", env = "KISSBOT_EXPORTER_SAMPLER_TEST_DELAY", default_value = "0", value_parser = parse_duration, hide = true)]
    pub sampler_test_delay: Duration,

    /// Most bots tracked at once; a new bot evicts the offline, else dead or stale, bot gone
    /// longest, and is rejected and counted only when every bot is online.
    #[arg(long = "limits.max-bots", env = "KISSBOT_EXPORTER_LIMITS_MAX_BOTS", default_value_t = 10_000)]
    pub limits_max_bots: usize,

    /// Most (channel, model, feature) LLM series; beyond it calls count under `other`.
    #[arg(long = "limits.max-llm-series", env = "KISSBOT_EXPORTER_LIMITS_MAX_LLM_SERIES", default_value_t = 10_000)]
    pub limits_max_llm_series: usize,

    /// Most features kept per bot (each is a `kissbot_bot_feature_enabled`
    /// series); further ones in a register are ignored and counted.
    #[arg(
        long = "limits.max-features-per-bot",
        env = "KISSBOT_EXPORTER_LIMITS_MAX_FEATURES_PER_BOT",
        default_value_t = 64
    )]
    pub limits_max_features_per_bot: usize,

    /// Capacity of the queue between ingest and the database writer, in rows.
    #[arg(long = "queue.capacity", env = "KISSBOT_EXPORTER_QUEUE_CAPACITY", default_value_t = 65536)]
    pub queue_capacity: usize,

    /// Log format.
    #[arg(long = "log.format", env = "KISSBOT_EXPORTER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log level: `debug`, `info`, `warn` or `error`; or comma-separated `target=level` directives
    /// (e.g. `info,kissbot_exporter=debug`). Anything else is refused.
    #[arg(long = "log.level", env = "KISSBOT_EXPORTER_LOG_LEVEL", default_value = "info", value_parser = LogLevel::parse)]
    pub log_level: LogLevel,
}

/// A validated `--log.level`: a level, or `target=level` directives.
///
/// tracing's own filter syntax takes a bare word as a target name, so a typo
/// such as `wanr` would quietly mean "log only target `wanr`", which is to
/// say nothing at all. Only the forms an operator means are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLevel(String);

/// The level names `--log.level` accepts, alone or after `target=`.
const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

impl LogLevel {
    /// Checks `s`: each comma-separated part is a level, or a Rust module
    /// path, `=` and a level.
    pub fn parse(s: &str) -> std::result::Result<LogLevel, String> {
        let expected = "expected debug, info, warn or error, or target=level directives such as kissbot_exporter=debug";
        if s.trim().is_empty() {
            return Err(format!("empty log level; {expected}"));
        }
        for part in s.split(',').map(str::trim) {
            let (target, level) = match part.split_once('=') {
                Some((t, l)) => (Some(t), l),
                None => (None, part),
            };
            if !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
                return Err(format!("{level:?} is not a log level; {expected}"));
            }
            if let Some(t) = target {
                let valid = !t.is_empty()
                    && t.split("::")
                        .all(|seg| !seg.is_empty() && seg.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
                if !valid {
                    return Err(format!("{t:?} is not a module path; {expected}"));
                }
            }
        }
        Ok(LogLevel(s.to_owned()))
    }

    /// The filter text, as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What to do when a message's pid is not the sending process's pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VerifyPid {
    /// Do not compare.
    Off,
    /// Count in `kissbot_exporter_peer_pid_mismatches_total` and log.
    Warn,
    /// Count, log, and reject the message (`peer_pid_mismatch`).
    Enforce,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines: time, level, target, message, `key=value` fields.
    Text,
    /// logfmt with Prometheus's own (promslog) keys: `time=… level=… source=… msg=… key=value`.
    Logfmt,
    /// One JSON object per line.
    Json,
}

/// One `--web.listen-address`, as given; resolved when the server binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddress {
    /// The host part (`0.0.0.0` for `:port`), without IPv6 brackets.
    pub host: String,
    /// The port.
    pub port: u16,
}

impl std::fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl ListenAddress {
    /// The socket addresses the host resolves to (a name may give several;
    /// the server binds the first that works, as the exporter toolkit does).
    pub fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        use std::net::ToSocketAddrs;
        Ok((self.host.as_str(), self.port).to_socket_addrs()?.collect())
    }
}

/// Parses `host:port`, `[v6]:port`, `name:port` or `:port` (every interface),
/// the forms Prometheus exporters accept.
pub fn parse_listen_address(s: &str) -> Result<ListenAddress, String> {
    let s = s.trim();
    let bad = |why: &str| format!("{s:?}: {why} (expected host:port, [::1]:port or :port)");
    let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let port: u16 = port.parse().map_err(|_| bad("the port is not a number from 0 to 65535"))?;
    let host = if host.is_empty() {
        "0.0.0.0".to_owned()
    } else if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().map_err(|_| bad("not an IPv6 address in brackets"))?;
        v6.to_owned()
    } else if host.contains(':') {
        return Err(bad("an IPv6 address needs brackets"));
    } else if host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-') {
        host.to_owned()
    } else {
        return Err(bad("not a host name or address"));
    };
    Ok(ListenAddress { host, port })
}

impl Config {
    /// Parses a configuration from command-line style arguments (the first
    /// item is the program name); environment variables apply as for the binary.
    pub fn try_from_args<I, T>(args: I) -> Result<Config, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            config: Config,
        }
        Wrapper::try_parse_from(args).map(|w| w.config)
    }
}

/// Parses a duration such as `90s`, `5m`, `1h`, `1h30m` or `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 90s, 5m, 1h)"))
}

/// Parses an octal file mode such as `0660` or `660`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.trim().trim_start_matches("0o");
    let mode = u32::from_str_radix(digits, 8).map_err(|_| format!("{s:?} is not an octal mode"))?;
    if mode > 0o777 {
        return Err(format!("{s:?} is larger than 0777"));
    }
    Ok(mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn listen_addresses() {
        let p = |s: &str| parse_listen_address(s).map(|a| a.to_string());
        assert_eq!(p(":8377"), Ok("0.0.0.0:8377".into()));
        assert_eq!(p("localhost:9377"), Ok("localhost:9377".into()));
        assert_eq!(p("[::1]:8377"), Ok("[::1]:8377".into()));
        assert_eq!(p("127.0.0.1:0"), Ok("127.0.0.1:0".into()));
        assert!(p("8377").is_err());
        assert!(p("::1:8377").is_err());
        assert!(p("host:99999").is_err());
        assert!(p("a b:1").is_err());
        let c =
            Config::try_from_args(["x", "--web.listen-address=:8377", "--web.listen-address=localhost:9377"]).unwrap();
        assert_eq!(c.web_listen_address.len(), 2);
        assert!(parse_listen_address("localhost:9377")
            .unwrap()
            .resolve()
            .unwrap()
            .iter()
            .all(|a| a.ip().is_loopback()));
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("1777").is_err());
    }

    #[test]
    fn defaults() {
        let c = Config::try_from_args(["kissbot-exporter"]).expect("defaults parse");
        assert_eq!(c.web_listen_address, [ListenAddress { host: "127.0.0.1".into(), port: DEFAULT_PORT }]);
        assert_eq!(c.socket_mode, 0o660);
        assert_eq!(c.heartbeat_stale_after, Duration::from_secs(90));
    }
}
