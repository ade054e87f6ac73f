//! Turns token counts into USD.
//!
//! The exporter is the one place where cost is computed, from a price table
//! the operator controls: the embedded table in `src/prices.toml` (the bots'
//! legacy prices plus current list prices, each entry citing its source),
//! optionally preceded by a pricing file in the same format.
//!
//! Which cost counts: a cost the sender reported wins; otherwise the table's
//! exact name or pattern; otherwise the default price for unknown models (the
//! *fallback*); otherwise none. A call priced by neither the sender nor a
//! table entry is counted as unpriced whether or not the fallback applied, so
//! a guessed price is never mistaken for a known one.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::regular_file;

/// The embedded table.
pub(crate) const BUILTIN_TOML: &str = include_str!("prices.toml");

/// Price of one model, in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Price {
    /// USD per 1M input (prompt) tokens.
    pub(crate) input: f64,
    /// USD per 1M output (completion) tokens.
    pub(crate) output: f64,
    /// USD per 1M cached input tokens; `None` prices them as plain input.
    pub(crate) cached_input: Option<f64>,
}

impl Price {
    /// The cost in USD of calls with these token counts (sums of several
    /// calls are fine); `tokens_cached` is the part of `tokens_in` served
    /// from the cache. Dividing once, at the end, keeps results such as
    /// 145 x $30 + 87 x $60 exactly the decimal people expect.
    pub(crate) fn usd(&self, tokens_in: f64, tokens_cached: f64, tokens_out: f64) -> f64 {
        let cached = tokens_cached.min(tokens_in);
        let micro = (tokens_in - cached) * self.input
            + cached * self.cached_input.unwrap_or(self.input)
            + tokens_out * self.output;
        micro / 1e6
    }
}

/// Where the cost of a call came from; stored with every `llm_usage` row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CostSource {
    /// The sender reported the cost itself.
    Reported,
    /// Computed from an exact name or a pattern of the price table.
    Table,
    /// Computed from the default price for models no entry names.
    Fallback,
    /// No price at all (`unknown_models = "unpriced"`): the call adds no
    /// cost and is counted as unpriced, never as a silent $0.
    Unpriced,
}

impl CostSource {
    /// The `cost_source` label values of `kissbot_llm_cost_usd_total`, in the
    /// order of [`CostSource::label_index`].
    pub(crate) const LABELS: [&'static str; 3] = ["reported", "table", "fallback"];

    /// The value stored in `llm_usage.cost_source`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CostSource::Reported => "reported",
            CostSource::Table => "table",
            CostSource::Fallback => "fallback",
            CostSource::Unpriced => "unpriced",
        }
    }

    /// The index in [`CostSource::LABELS`] of the series the call's cost is
    /// added to. A call with no price at all adds 0 to the `fallback`
    /// series: the fallback policy is what left it without a price, and the
    /// label set stays closed at three values.
    pub(crate) fn label_index(self) -> usize {
        match self {
            CostSource::Reported => 0,
            CostSource::Table => 1,
            CostSource::Fallback | CostSource::Unpriced => 2,
        }
    }

    /// Whether the call counts in `kissbot_llm_unpriced_requests_total`:
    /// neither the sender nor a table entry priced it, whether or not the
    /// default price was applied.
    pub(crate) fn is_unpriced(self) -> bool {
        matches!(self, CostSource::Fallback | CostSource::Unpriced)
    }
}

/// Why a pricing file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    /// The file could not be read.
    #[error("cannot read pricing file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("invalid pricing file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        message: String,
    },
    /// The file sets nothing: empty, or only whitespace and comments. It is
    /// far more likely a truncated write than a wish for the embedded
    /// table alone, which `model = []` says.
    #[error(
        "pricing file {path} is empty (or holds only comments); \
         write `model = []` in it to use the embedded table alone on purpose"
    )]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// An entry is inconsistent.
    #[error("invalid pricing file {path}: entry {index}: {message}")]
    Entry {
        /// The file.
        path: PathBuf,
        /// 1-based position of the `[[model]]` entry.
        index: usize,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    name: Option<String>,
    pattern: Option<String>,
    input: f64,
    output: f64,
    cached_input: Option<f64>,
    #[allow(dead_code)] // Documentation for people; parsed so typos are caught.
    source: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDefault {
    input: f64,
    output: f64,
    cached_input: Option<f64>,
    #[allow(dead_code)] // As above.
    source: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum UnknownModels {
    /// Use the `[default]` price (the file's, else the embedded one); what
    /// a file without `unknown_models` gets.
    Default,
    /// Leave models that match nothing unpriced.
    Unpriced,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PricingFile {
    /// Consult the embedded table after this file's entries (default true).
    builtin: Option<bool>,
    /// What to do with models no entry matches (default: the default price).
    unknown_models: Option<UnknownModels>,
    /// None when the file does not mention `model` at all.
    model: Option<Vec<FileEntry>>,
    default: Option<FileDefault>,
}

impl PricingFile {
    /// Whether the file sets no key at all: empty, or only comments.
    fn is_empty(&self) -> bool {
        self.builtin.is_none() && self.unknown_models.is_none() && self.model.is_none() && self.default.is_none()
    }
}

/// How a table entry names its models.
#[derive(Debug, Clone)]
enum Matcher {
    /// One name, lower-cased.
    Exact(String),
    /// A glob pattern (`*`, `?`, `[57]`), matched against the lower-cased name.
    /// `glob` rather than `globset`: a handful of patterns matched one by one
    /// need no regex engine, and compiling one at start-up would page in
    /// half a megabyte of code that the idle exporter otherwise never runs.
    Glob(glob::Pattern),
}

/// A price table: exact names, then glob patterns in order, then a default.
#[derive(Debug, Clone)]
pub struct PriceTable {
    entries: Vec<(Matcher, Price)>,
    default: Option<Price>,
}

impl Default for PriceTable {
    fn default() -> Self {
        PriceTable::builtin()
    }
}

fn check_price(input: f64, output: f64, cached: Option<f64>) -> Result<Price, String> {
    for (what, v) in [("input", Some(input)), ("output", Some(output)), ("cached_input", cached)] {
        if let Some(v) = v {
            if !v.is_finite() || !(0.0..=100_000.0).contains(&v) {
                return Err(format!("{what} price {v} must be between 0 and 100000 USD per 1M tokens"));
            }
        }
    }
    Ok(Price { input, output, cached_input: cached })
}

impl PriceTable {
    /// The embedded table.
    pub fn builtin() -> PriceTable {
        // The embedded file is part of the build and covered by a unit test,
        // so parsing it cannot fail at run time; an empty table with the
        // legacy default is the harmless fallback should it ever.
        PriceTable::parse(BUILTIN_TOML, Path::new("<builtin>"), None).unwrap_or(PriceTable {
            entries: Vec::new(),
            default: Some(Price { input: 1.0, output: 2.0, cached_input: None }),
        })
    }

    /// Loads a pricing file on top of the embedded table: a regular file
    /// (or a symlink to one) of at most [`regular_file::MAX_BYTES`].
    pub(crate) fn load(path: &Path) -> Result<PriceTable, PricingError> {
        let text = regular_file::read_to_string(path)
            .map_err(|source| PricingError::Read { path: path.to_owned(), source })?;
        PriceTable::parse(&text, path, Some(PriceTable::builtin()))
    }

    /// Loads the table in force: the file if one is given, else the builtin.
    pub(crate) fn from_config(path: Option<&Path>) -> Result<PriceTable, PricingError> {
        match path {
            Some(p) => PriceTable::load(p),
            None => Ok(PriceTable::builtin()),
        }
    }

    /// Parses a table; `base` is consulted after it when the file allows.
    /// A file that sets no key at all is refused; `model = []` is enough.
    pub(crate) fn parse(text: &str, path: &Path, base: Option<PriceTable>) -> Result<PriceTable, PricingError> {
        let file: PricingFile =
            toml::from_str(text).map_err(|e| PricingError::Parse { path: path.to_owned(), message: e.to_string() })?;
        if file.is_empty() {
            return Err(PricingError::Empty { path: path.to_owned() });
        }
        let mut exact = Vec::new();
        let mut globs = Vec::new();
        for (i, e) in file.model.unwrap_or_default().into_iter().enumerate() {
            let err = |message: String| PricingError::Entry { path: path.to_owned(), index: i + 1, message };
            let price = check_price(e.input, e.output, e.cached_input).map_err(err)?;
            match (e.name, e.pattern) {
                (Some(n), None) if !n.trim().is_empty() => exact.push((Matcher::Exact(n.trim().to_lowercase()), price)),
                (None, Some(p)) if !p.trim().is_empty() => {
                    let pattern = p.trim().to_lowercase();
                    // `glob` reads braces literally, and a pattern that could
                    // never match a model name would fail in silence.
                    if pattern.contains(['{', '}']) {
                        return Err(err(format!(
                            "pattern {pattern:?}: `{{a,b}}` alternatives are not supported; write one entry per alternative"
                        )));
                    }
                    let glob = glob::Pattern::new(&pattern).map_err(|e| err(format!("pattern {pattern:?}: {e}")))?;
                    globs.push((Matcher::Glob(glob), price))
                }
                _ => return Err(err("needs exactly one of `name` or `pattern`".into())),
            }
        }
        let own_default =
            match file.default {
                Some(d) => Some(check_price(d.input, d.output, d.cached_input).map_err(|message| {
                    PricingError::Entry { path: path.to_owned(), index: 0, message: format!("[default]: {message}") }
                })?),
                None => None,
            };
        let mut entries = exact;
        entries.extend(globs);
        let use_base = file.builtin.unwrap_or(true);
        let mut default = own_default;
        if let Some(base) = base.filter(|_| use_base) {
            // The file's exact names and patterns come first, then the base's.
            entries.extend(base.entries);
            default = default.or(base.default);
        }
        if file.unknown_models == Some(UnknownModels::Unpriced) {
            default = None;
        }
        Ok(PriceTable { entries, default })
    }

    /// The price the table itself names for a model (an exact name or a
    /// pattern), ignoring the default price for unknown models. Matching is
    /// case-insensitive and ignores a `provider/` prefix; exact names win
    /// over patterns, patterns in file order.
    pub(crate) fn table_price(&self, model: &str) -> Option<Price> {
        let name = model.rsplit('/').next().unwrap_or(model).trim();
        // Model names are nearly always lower-case ASCII already; this runs
        // for every call, so it allocates only when there is something to
        // lower.
        let name: std::borrow::Cow<'_, str> = if name.is_ascii() && !name.bytes().any(|b| b.is_ascii_uppercase()) {
            name.into()
        } else {
            name.to_lowercase().into()
        };
        let exact = self.entries.iter().find(|(m, _)| matches!(m, Matcher::Exact(n) if *n == name));
        exact
            .or_else(|| self.entries.iter().find(|(m, _)| matches!(m, Matcher::Glob(g) if g.matches(&name))))
            .map(|(_, p)| *p)
    }

    /// The cost of a call and where it came from. A reported cost wins.
    /// `tokens_cached` is the part of `tokens_in` served from the cache.
    pub(crate) fn cost(
        &self,
        model: &str,
        tokens_in: u64,
        tokens_cached: u64,
        tokens_out: u64,
        reported: Option<f64>,
    ) -> (Option<f64>, CostSource) {
        if let Some(c) = reported {
            return (Some(c), CostSource::Reported);
        }
        let (price, source) = match self.table_price(model) {
            Some(p) => (Some(p), CostSource::Table),
            None => (self.default, CostSource::Fallback),
        };
        match price {
            Some(p) => (Some(p.usd(tokens_in as f64, tokens_cached as f64, tokens_out as f64)), source),
            None => (None, CostSource::Unpriced),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-12)
    }

    #[test]
    fn builtin_table_parses_and_has_legacy_prices() {
        let t = PriceTable::parse(BUILTIN_TOML, Path::new("builtin"), None).expect("embedded table parses");
        let (c, s) = t.cost("gpt-4o-mini", 1_000_000, 0, 0, None);
        assert_eq!(s, CostSource::Table);
        assert!(close(c, 0.15), "{c:?}");
        assert!(close(t.cost("gpt-4", 145, 0, 87, None).0, 0.00957));
        assert!(close(t.cost("gpt-4-turbo", 1_000_000, 0, 1_000_000, None).0, 40.0));
        assert!(close(t.cost("gpt-3.5-turbo", 1_000_000, 0, 1_000_000, None).0, 2.0));
        assert!(close(t.cost("mistral-7b-instruct", 1_000_000, 0, 1_000_000, None).0, 0.0));
        assert!(close(t.cost("some-new-model", 1_000_000, 0, 1_000_000, None).0, 3.0), "legacy default");
        assert_eq!(t.cost("some-new-model", 1, 0, 1, None).1, CostSource::Fallback, "the default is no table entry");
        assert_eq!(t.cost("gpt-4o-2024-08-06", 1, 0, 1, None).1, CostSource::Table, "a pattern is a table entry");
    }

    #[test]
    fn provider_prefixes_case_and_patterns() {
        let t = PriceTable::builtin();
        assert!(close(t.cost("OpenAI/GPT-4o", 0, 0, 1_000_000, None).0, 10.0));
        assert!(close(t.cost("openrouter/openai/gpt-4o-mini", 1_000_000, 0, 0, None).0, 0.15));
        // A dated snapshot matches its family pattern; -mini before the plain family.
        assert!(close(t.cost("gpt-4o-mini-2024-07-18", 1_000_000, 0, 0, None).0, 0.15));
        assert!(close(t.cost("gpt-4o-2024-08-06", 1_000_000, 0, 0, None).0, 2.5));
        assert!(close(t.cost("anthropic/claude-3-5-sonnet-20241022", 1_000_000, 0, 0, None).0, 3.0));
        assert!(close(t.cost("claude-3-7-sonnet-latest", 1_000_000, 0, 0, None).0, 3.0));
        assert!(close(t.cost("claude-opus-4-5-20251101", 1_000_000, 0, 0, None).0, 5.0));
        assert!(close(t.cost("claude-opus-4-1", 1_000_000, 0, 0, None).0, 15.0));
    }

    #[test]
    fn file_overrides_extends_and_orders_patterns() {
        let file = r#"
            [[model]]
            pattern = "acme-*-large"
            input = 9.0
            output = 9.0
            [[model]]
            pattern = "acme-*"
            input = 1.0
            output = 1.0
            [[model]]
            name = "gpt-4o"
            input = 5.0
            output = 20.0
            cached_input = 0.5
        "#;
        let t = PriceTable::parse(file, Path::new("f"), Some(PriceTable::builtin())).unwrap();
        assert!(close(t.cost("acme-x-large", 1_000_000, 0, 0, None).0, 9.0), "first pattern in file order wins");
        assert!(close(t.cost("acme-x-small", 1_000_000, 0, 0, None).0, 1.0));
        assert!(close(t.cost("gpt-4o", 1_000_000, 0, 0, None).0, 5.0), "file overrides builtin");
        assert!(close(t.cost("gpt-4", 1_000_000, 0, 0, None).0, 30.0), "builtin still extends");
        // 1M input of which 400k cached: 600k x 5 + 400k x 0.5.
        assert!(close(t.cost("gpt-4o", 1_000_000, 400_000, 0, None).0, 3.2));
    }

    #[test]
    fn cached_tokens_without_cached_price_cost_as_input() {
        let t = PriceTable::builtin();
        assert!(close(t.cost("gpt-4", 1_000_000, 500_000, 0, None).0, 30.0));
        assert!(close(t.cost("gpt-4o", 1_000_000, 1_000_000, 0, None).0, 1.25));
        // More cached than input is capped, never negative.
        assert!(close(t.cost("gpt-4o", 10, 50, 0, None).0, 10.0 * 1.25 / 1e6));
    }

    #[test]
    fn reported_cost_wins_and_unknown_models_can_be_unpriced() {
        let t = PriceTable::builtin();
        assert_eq!(t.cost("gpt-4", 1, 0, 1, Some(0.25)), (Some(0.25), CostSource::Reported));
        assert!(!CostSource::Reported.is_unpriced() && !CostSource::Table.is_unpriced());
        assert!(CostSource::Fallback.is_unpriced() && CostSource::Unpriced.is_unpriced());
        assert_eq!(CostSource::LABELS[CostSource::Unpriced.label_index()], "fallback");
        let t =
            PriceTable::parse("unknown_models = \"unpriced\"", Path::new("f"), Some(PriceTable::builtin())).unwrap();
        assert_eq!(t.cost("mystery", 1, 0, 1, None), (None, CostSource::Unpriced));
        assert_eq!(t.cost("gpt-4", 1_000_000, 0, 0, None).1, CostSource::Table);
        let t = PriceTable::parse("builtin = false", Path::new("f"), Some(PriceTable::builtin())).unwrap();
        assert_eq!(t.cost("gpt-4", 1, 0, 1, None).1, CostSource::Unpriced, "no builtin, no default");
    }

    #[test]
    fn bad_files_are_refused_with_clear_errors() {
        let bad = |text: &str| PriceTable::parse(text, Path::new("p.toml"), None).unwrap_err().to_string();
        assert!(bad("[[model]]\nname = \"x\"\ninput = -1.0\noutput = 1.0").contains("entry 1"));
        assert!(bad("[[model]]\nname = \"x\"\ninput = nan\noutput = 1.0").contains("between 0 and"));
        assert!(bad("[[model]]\nname = \"x\"\ninput = 1e9\noutput = 1.0").contains("between 0 and"));
        assert!(bad("[[model]]\ninput = 1.0\noutput = 1.0").contains("exactly one of"));
        assert!(bad("[[model]]\nname = \"x\"\npattern = \"y\"\ninput = 1.0\noutput = 1.0").contains("exactly one of"));
        assert!(bad("[[model]]\nnmae = \"x\"\ninput = 1.0\noutput = 1.0").contains("unknown field"));
        assert!(bad("this is not toml").starts_with("invalid pricing file p.toml"));
        for empty in ["", "\n \t\n", "# prices\n# none yet\n"] {
            assert!(bad(empty).contains("is empty"), "{empty:?}");
        }
        assert!(bad("").contains("write `model = []`"));
        // Any key says the file means it, `model = []` the least.
        let accepted = |text: &str| PriceTable::parse(text, Path::new("p.toml"), Some(PriceTable::builtin())).is_ok();
        assert!(accepted("model = []") && accepted("builtin = true") && accepted("unknown_models = \"default\""));
    }

    #[test]
    fn shipped_example_file_parses() {
        let text = include_str!("../docs/pricing.example.toml");
        let t = PriceTable::parse(text, Path::new("example"), Some(PriceTable::builtin())).expect("example parses");
        assert!(close(t.cost("gpt-4.1-mini", 1_000_000, 0, 0, None).0, 0.40));
        assert!(close(t.cost("gpt-4o-mini-2024-07-18", 1_000_000, 0, 0, None).0, 0.12));
        assert!(close(t.cost("gpt-4o-mini", 1_000_000, 0, 0, None).0, 0.15), "exact builtin name beats a file pattern");
        assert_eq!(t.cost("who-knows", 1, 0, 1, None).1, CostSource::Unpriced);
    }

    #[test]
    fn globs() {
        let glob = |p: &str, n: &str| glob::Pattern::new(p).unwrap().matches(n);
        assert!(glob("gpt-4o-*", "gpt-4o-2024"));
        assert!(!glob("gpt-4o-*", "gpt-4o"));
        assert!(glob("claude-3-[57]-sonnet*", "claude-3-7-sonnet-latest"));
        assert!(!glob("claude-3-[57]-sonnet*", "claude-3-6-sonnet"));
        assert!(glob("a?c", "abc"));
        assert!(glob("*", ""));
        // Alternatives are refused rather than matched literally.
        let e = PriceTable::parse(
            "[[model]]\npattern = \"gpt-{4o,4.1}-*\"\ninput = 1.0\noutput = 1.0\n",
            Path::new("p.toml"),
            None,
        );
        assert!(e.unwrap_err().to_string().contains("alternatives are not supported"));
        // A broken pattern is refused when the file is loaded.
        let e = PriceTable::parse(
            "[[model]]\npattern = \"gpt-[4\"\ninput = 1.0\noutput = 1.0\n",
            Path::new("p.toml"),
            None,
        );
        assert!(e.is_err());
    }
}
