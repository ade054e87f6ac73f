//! Time as the exporter and the legacy files speak it: the wall clock in Unix
//! seconds, and the ISO-8601 strings stored in SQLite.
//!
//! This module sits at the bottom of the module graph: the state machine,
//! the store, the sampler and the HTTP server all use it, and it uses none
//! of them.

use chrono::{SecondsFormat, TimeZone, Utc};

/// The current time as Unix seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Formats Unix seconds the way the legacy monitor stored times
/// (`datetime.isoformat()` of an aware UTC time), cut (not rounded) to the
/// microsecond: the text then never names a later instant than `ts`, so a
/// call made before midnight is stored before midnight, and the day the
/// database gives it (`text_millis`, to the millisecond) is the day the
/// live spend counted it in (by comparing `ts` itself).
pub fn format_time(ts: f64) -> String {
    // `ts - floor(ts)` is exact in f64, and its microseconds cannot round up
    // to a whole second, so this is the floor of `ts` to the microsecond
    // (`ts * 1e6` could round across a second, or midnight).
    let secs = ts.floor();
    let micros = (secs as i64).saturating_mul(1_000_000).saturating_add(((ts - secs) * 1e6) as i64);
    match Utc.timestamp_micros(micros).single() {
        Some(t) => t.to_rfc3339_opts(SecondsFormat::Micros, false),
        None => String::from("1970-01-01T00:00:00.000000+00:00"),
    }
}

/// A number (or numeric text) whose whole part is at least this is taken as
/// Unix milliseconds rather than seconds (1e11 seconds is the year 5138;
/// 1e11 milliseconds is 1973).
pub(crate) const MILLIS_THRESHOLD: i64 = 100_000_000_000;

/// Numeric text with a longer whole part is no time (it would be past the
/// year 30000 even in milliseconds); the bound keeps the SQL twin's `CAST`
/// exact in every SQLite version.
const MAX_WHOLE_DIGITS: usize = 15;

/// The Unix epoch as a Julian day in milliseconds (2440587.5 × 86,400,000).
const UNIX_EPOCH_JD_MS: i64 = 210_866_760_000_000;

/// The largest Julian day in milliseconds SQLite accepts (9999-12-31
/// 23:59:59.999).
const MAX_JD_MS: i64 = 464_269_060_799_999;

/// Parses every time form found in legacy files, to Unix seconds: the
/// instant `text_millis` gives, in seconds. For `since=` and reading
/// `bot_status` back; comparisons with the database use `text_millis`.
pub fn parse_time(s: &str) -> Option<f64> {
    text_millis(s).map(|ms| ms as f64 / 1000.0)
}

/// The instant a `ts` held as text means, in whole Unix milliseconds (cut,
/// not rounded), exactly as `store::schema::TS_MS` computes it in SQL; a
/// test holds the two equal, form by form. Accepted:
///
/// - SQLite's date and time text: `YYYY-MM-DD`, then optionally `T` or
///   spaces and `HH:MM` or `HH:MM:SS`, then optionally spaces and `Z` or an
///   offset `±HH:MM`, e.g. `2025-11-24T16:00:00.123456+00:00`,
///   `2025-11-24 16:00:00` (naive: UTC, as the legacy monitor wrote), or
///   `2025-11-24` (midnight UTC). A fraction of a second of any length is
///   cut to the millisecond;
/// - a Unix number as text, seconds or (from `MILLIS_THRESHOLD`)
///   milliseconds, with an optional fraction.
///
/// Anything else — more than one `.`, a sign, spaces around a number,
/// `now` — is no time (`None`), never compared.
///
/// Why not `julianday(ts)` alone: SQLite has rounded fractions of a
/// millisecond since 3.42 (23:59:59.9996 is midnight) and cut them before,
/// so an index over it would differ between the exporter's SQLite and the
/// bots' usage logger's. The fraction is therefore read as text on both
/// sides, and `julianday` only ever sees whole seconds.
pub fn text_millis(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let dots = b.iter().filter(|&&c| c == b'.').count();
    if dots > 1 {
        return None;
    }
    if is_date_prefix(b) {
        let Some(dot) = b.iter().position(|&c| c == b'.') else {
            return julian_millis(b);
        };
        let after = &b[dot + 1..];
        let digits = after.iter().take_while(|c| c.is_ascii_digit()).count();
        let mut whole = Vec::with_capacity(b.len());
        whole.extend_from_slice(&b[..dot]);
        whole.extend_from_slice(&after[digits..]);
        return Some(julian_millis(&whole)? + fraction_millis(&after[..digits]));
    }
    if !b.iter().all(|c| c.is_ascii_digit() || *c == b'.') || !b.iter().any(u8::is_ascii_digit) {
        return None;
    }
    let dot = b.iter().position(|&c| c == b'.').unwrap_or(b.len());
    if dot > MAX_WHOLE_DIGITS {
        return None;
    }
    // At most 15 digits: no overflow.
    let whole = b[..dot].iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
    if whole >= MILLIS_THRESHOLD {
        return Some(whole);
    }
    let fraction = b.get(dot + 1..).unwrap_or_default();
    Some(whole * 1000 + fraction_millis(fraction))
}

/// The instant an integer `ts` means, in Unix milliseconds (the SQL twin's
/// integer branch): seconds, or milliseconds from `MILLIS_THRESHOLD`;
/// negative numbers are no time.
pub fn integer_millis(i: i64) -> Option<i64> {
    match i {
        i if i < 0 => None,
        i if i >= MILLIS_THRESHOLD => Some(i),
        i => Some(i * 1000),
    }
}

/// The instant a real `ts` means, in Unix milliseconds (the SQL twin's real
/// branch): the same IEEE operations as SQLite's `CAST(ts * 1000.0 AS
/// INTEGER)`, which cuts toward zero and saturates, as `as i64` does.
pub fn real_millis(f: f64) -> Option<i64> {
    if f.is_nan() || f < 0.0 {
        None
    } else if f >= MILLIS_THRESHOLD as f64 {
        Some(f as i64)
    } else {
        Some((f * 1000.0) as i64)
    }
}

/// The first three digits of a fraction of a second, as milliseconds
/// (`5` is 500, `123456` is 123).
fn fraction_millis(digits: &[u8]) -> i64 {
    let mut ms = 0;
    for i in 0..3 {
        ms = ms * 10 + digits.get(i).map_or(0, |d| i64::from(d - b'0'));
    }
    ms
}

/// Whether the text starts `YYYY-MM-DD` with digits (the SQL twin's `GLOB`).
fn is_date_prefix(b: &[u8]) -> bool {
    b.len() >= 10
        && b[..10].iter().enumerate().all(|(i, c)| if i == 4 || i == 7 { *c == b'-' } else { c.is_ascii_digit() })
}

/// SQLite's `isspace` (`sqlite3Isspace`).
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// `n` digits at the start of `b` as a number within `min..=max`.
fn digits(b: &[u8], n: usize, min: i32, max: i32) -> Option<i32> {
    let d = b.get(..n)?;
    if !d.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let v = d.iter().fold(0, |v, c| v * 10 + i32::from(c - b'0'));
    (min..=max).contains(&v).then_some(v)
}

/// SQLite's `julianday(text)` for text without a `.`, minus the Unix epoch,
/// in milliseconds: a port of `parseYyyyMmDd`, `parseHhMmSs`,
/// `parseTimezone` and `computeJD` of SQLite's `date.c` (3.20 to 3.46 parse
/// alike), so that what SQLite accepts and the day it normalises to (a
/// 31 February is 3 March) are the same here.
fn julian_millis(b: &[u8]) -> Option<i64> {
    if !is_date_prefix(b) {
        return None;
    }
    let y = digits(b, 4, 0, 9999)?;
    let m = digits(&b[5..], 2, 1, 12)?;
    let d = digits(&b[8..], 2, 1, 31)?;
    let mut rest = &b[10..];
    while let Some((&c, tail)) = rest.split_first() {
        if !(is_space(c) || c == b'T') {
            break;
        }
        rest = tail;
    }
    let (hms, tz) = match time_of_day(rest) {
        Some(t) => (t.0, t.1),
        None if rest.is_empty() => ((0, 0, 0), 0),
        None => return None,
    };
    let (mut y, mut mo) = (y, m);
    if mo <= 2 {
        y -= 1;
        mo += 12;
    }
    let a = y / 100;
    let b2 = 2 - a + a / 4;
    let x1 = 36525 * (y + 4716) / 100;
    let x2 = 306001 * (mo + 1) / 10000;
    // The day's arithmetic is exact in f64, as in SQLite.
    let mut jd = ((f64::from(x1 + x2 + d + b2) - 1524.5) * 86_400_000.0) as i64;
    let (h, mi, s) = hms;
    jd += i64::from(h) * 3_600_000 + i64::from(mi) * 60_000 + i64::from(s) * 1000;
    jd -= i64::from(tz) * 60_000;
    (0..=MAX_JD_MS).contains(&jd).then_some(jd - UNIX_EPOCH_JD_MS)
}

/// `HH:MM` or `HH:MM:SS`, then an optional zone: the hours, minutes and
/// seconds, and the zone's offset in minutes (`parseHhMmSs`).
fn time_of_day(b: &[u8]) -> Option<((i32, i32, i32), i32)> {
    let h = digits(b, 2, 0, 24)?;
    if b.get(2) != Some(&b':') {
        return None;
    }
    let m = digits(&b[3..], 2, 0, 59)?;
    let mut rest = &b[5..];
    let mut s = 0;
    if rest.first() == Some(&b':') {
        s = digits(&rest[1..], 2, 0, 59)?;
        rest = &rest[3..];
    }
    Some(((h, m, s), zone(rest)?))
}

/// Nothing, `Z`, or `±HH:MM`, with spaces around (`parseTimezone`).
fn zone(b: &[u8]) -> Option<i32> {
    let b = skip_spaces(b);
    let (sign, tail) = match b.first() {
        None => return Some(0),
        Some(b'Z' | b'z') => return skip_spaces(&b[1..]).is_empty().then_some(0),
        Some(b'+') => (1, &b[1..]),
        Some(b'-') => (-1, &b[1..]),
        Some(_) => return None,
    };
    let h = digits(tail, 2, 0, 14)?;
    if tail.get(2) != Some(&b':') {
        return None;
    }
    let m = digits(&tail[3..], 2, 0, 59)?;
    skip_spaces(&tail[5..]).is_empty().then_some(sign * (m + h * 60))
}

/// `b` without its leading spaces.
fn skip_spaces(mut b: &[u8]) -> &[u8] {
    while let Some((&c, tail)) = b.split_first() {
        if !is_space(c) {
            break;
        }
        b = tail;
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_round_trip() {
        let t = 1_764_000_000.123456;
        let s = format_time(t);
        assert_eq!(s, "2025-11-24T16:00:00.123456+00:00");
        // Read back to the millisecond, cut.
        assert_eq!(parse_time(&s), Some(1_764_000_000.123));
        assert_eq!(parse_time("2025-11-24T16:00:00.123456"), Some(1_764_000_000.123));
        assert_eq!(parse_time("2025-11-24 16:00:00"), Some(1_764_000_000.0));
        assert_eq!(parse_time("2025-11-24 11:00:00-05:00"), Some(1_764_000_000.0));
        assert_eq!(parse_time("2025-11-24T11:00:00-05:00"), Some(1_764_000_000.0));
        assert_eq!(parse_time("2025-11-24T16:00:00Z"), Some(1_764_000_000.0));
        assert_eq!(parse_time("2025-11-24"), Some(1_763_942_400.0));
        assert_eq!(parse_time("1764000000"), Some(1_764_000_000.0));
        assert_eq!(parse_time("1764000000.5"), Some(1_764_000_000.5));
        assert_eq!(parse_time("1764000000000"), Some(1_764_000_000.0));
        assert!(parse_time("yesterday").is_none());
        assert!(parse_time("").is_none());
    }

    /// The text of an instant never names a later one: a call a fraction of
    /// a microsecond before midnight is stored before midnight.
    #[test]
    fn format_time_cuts_to_the_microsecond() {
        let midnight = 1_764_028_800.0;
        for k in 1..1000 {
            let t = midnight - f64::from(k) * 1e-7;
            if t == midnight {
                continue;
            }
            let s = format_time(t);
            assert!(s.starts_with("2025-11-24T23:59:59.999"), "{t}: {s}");
            assert!(text_millis(&s).unwrap() < 1_764_028_800_000, "{s}");
        }
        assert_eq!(format_time(midnight), "2025-11-25T00:00:00.000000+00:00");
        assert_eq!(format_time(midnight - 0.0004), "2025-11-24T23:59:59.999599+00:00");
    }
}
