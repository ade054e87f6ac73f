//! Time as the exporter and the legacy files speak it: the wall clock in Unix
//! seconds, and the ISO-8601 strings stored in SQLite.
//!
//! This module sits at the bottom of the module graph: the state machine,
//! the store, the sampler and the HTTP server all use it, and it uses none
//! of them.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, TimeZone, Utc};

/// The current time as Unix seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Formats Unix seconds the way the legacy monitor stored times
/// (`datetime.isoformat()` of an aware UTC time).
pub fn format_time(ts: f64) -> String {
    let micros = (ts * 1e6).round() as i64;
    match Utc.timestamp_micros(micros).single() {
        Some(t) => t.to_rfc3339_opts(SecondsFormat::Micros, false),
        None => String::from("1970-01-01T00:00:00.000000+00:00"),
    }
}

/// A number above this is taken as Unix milliseconds rather than seconds
/// (1e11 seconds is the year 5138; 1e11 milliseconds is 1973).
pub(crate) const MILLIS_THRESHOLD: f64 = 1e11;

/// Parses every time format found in legacy files, to Unix seconds:
///
/// - RFC 3339 with an offset (`2025-11-24T16:00:00.123456+00:00`, `...-05:00`, `...Z`);
/// - a naive ISO-8601 time with `T` or a space (`2025-11-24 16:00:00`), taken
///   as UTC: the legacy monitor wrote UTC (`datetime.now(timezone.utc)` and
///   SQLite's `CURRENT_TIMESTAMP`), so a naive string is UTC without its suffix;
/// - a space-separated time with an offset (`2025-11-24 16:00:00-05:00`);
/// - a date alone (`2025-11-24`), midnight UTC;
/// - a Unix number, seconds or (above `MILLIS_THRESHOLD`) milliseconds.
///
/// The SQL twin of this function is `store::schema::TS_SECONDS`; the two
/// must agree, and a test checks that they do.
pub fn parse_time(s: &str) -> Option<f64> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_micros() as f64 / 1e6);
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(t.and_utc().timestamp_micros() as f64 / 1e6);
        }
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f%:z", "%Y-%m-%d %H:%M:%S%.f %:z", "%Y-%m-%d %H:%M:%S%.fZ"] {
        if let Ok(t) = DateTime::parse_from_str(s, fmt) {
            return Some(t.timestamp_micros() as f64 / 1e6);
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return d.and_hms_opt(0, 0, 0).map(|t| t.and_utc().timestamp() as f64);
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let n: f64 = s.parse().ok()?;
        return Some(if n > MILLIS_THRESHOLD { n / 1000.0 } else { n });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_round_trip() {
        let t = 1_764_000_000.123456;
        let s = format_time(t);
        assert_eq!(s, "2025-11-24T16:00:00.123456+00:00");
        assert!((parse_time(&s).unwrap() - t).abs() < 1e-6);
        assert!((parse_time("2025-11-24T16:00:00.123456").unwrap() - t).abs() < 1e-6);
        assert!((parse_time("2025-11-24 16:00:00").unwrap() - 1_764_000_000.0).abs() < 1e-6);
        assert!((parse_time("2025-11-24 11:00:00-05:00").unwrap() - 1_764_000_000.0).abs() < 1e-6);
        assert!((parse_time("2025-11-24T11:00:00-05:00").unwrap() - 1_764_000_000.0).abs() < 1e-6);
        assert!((parse_time("2025-11-24T16:00:00Z").unwrap() - 1_764_000_000.0).abs() < 1e-6);
        assert_eq!(parse_time("2025-11-24"), Some(1_763_942_400.0));
        assert_eq!(parse_time("1764000000"), Some(1_764_000_000.0));
        assert_eq!(parse_time("1764000000.5"), Some(1_764_000_000.5));
        assert_eq!(parse_time("1764000000000"), Some(1_764_000_000.0));
        assert!(parse_time("yesterday").is_none());
        assert!(parse_time("").is_none());
    }
}
