//! The Prometheus text exposition, read back: samples, values, families.

/// One sample line: the series as written (`name{labels}`), the metric name,
/// and the value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    /// `name{labels}` exactly as in the text.
    pub series: &'a str,
    /// The metric name (the series up to `{`).
    pub name: &'a str,
    /// The value.
    pub value: f64,
}

/// Every sample of an exposition; comments and malformed lines are skipped.
pub fn samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let value = value.trim().parse().ok()?;
        Some(Sample { series, name: series.split('{').next().unwrap_or(series), value })
    })
}

/// The value of one series written exactly as in the exposition, e.g.
/// `kissbot_bot_up{channel="a"}`.
pub fn value(text: &str, series: &str) -> Option<f64> {
    samples(text).find(|s| s.series == series).map(|s| s.value)
}

/// The families an exposition declares with `# TYPE`.
pub fn families(text: &str) -> Vec<&str> {
    text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split_whitespace().next()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_values_and_families() {
        let text = "# HELP a_total x\n# TYPE a_total counter\na_total{k=\"v w\"} 3\nb 1.5\nbad line\n";
        assert_eq!(value(text, "a_total{k=\"v w\"}"), Some(3.0));
        assert_eq!(value(text, "b"), Some(1.5));
        assert_eq!(value(text, "a_total"), None);
        assert_eq!(families(text), ["a_total"]);
        assert_eq!(samples(text).map(|s| s.name).collect::<Vec<_>>(), ["a_total", "b"]);
    }
}
