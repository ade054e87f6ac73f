//! What both subcommands report: percentiles of timings, and the JSON
//! report written to `--out`.

use std::path::Path;

use anyhow::Context;

/// The `p`th percentile of sorted nanosecond timings, in milliseconds
/// (nearest rank; 0 when there are none).
pub(crate) fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    millis(sorted[i.min(sorted.len() - 1)])
}

/// The largest of sorted nanosecond timings, in milliseconds (0 when there
/// are none).
pub(crate) fn max(sorted: &[u32]) -> f64 {
    sorted.last().map(|v| millis(*v)).unwrap_or(0.0)
}

/// The smallest of sorted nanosecond timings, in milliseconds (0 when there
/// are none).
pub(crate) fn min(sorted: &[u32]) -> f64 {
    sorted.first().map(|v| millis(*v)).unwrap_or(0.0)
}

/// Nanoseconds to milliseconds.
fn millis(ns: u32) -> f64 {
    f64::from(ns) / 1e6
}

/// A duration in nanoseconds, saturated to `u32` (4.3 s) to keep a million
/// timings small.
pub(crate) fn nanos(d: std::time::Duration) -> u32 {
    d.as_nanos().min(u128::from(u32::MAX)) as u32
}

/// Writes the JSON report to `--out`, if given.
pub(crate) fn save(out: Option<&Path>, report: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(path) = out {
        std::fs::write(path, format!("{report}\n")).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_sorted_timings() {
        let t: Vec<u32> = (1..=101).map(|ms| ms * 1_000_000).collect();
        assert_eq!((percentile(&t, 50.0), percentile(&t, 99.0)), (51.0, 100.0));
        assert_eq!((min(&t), max(&t)), (1.0, 101.0));
        assert_eq!((percentile(&[], 50.0), min(&[]), max(&[])), (0.0, 0.0, 0.0));
        assert_eq!(nanos(std::time::Duration::from_secs(10)), u32::MAX);
    }
}
