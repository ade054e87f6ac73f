//! Turns token counts into USD.
//!
//! The table is the one the bots themselves used (USD per million tokens,
//! input and output priced separately, with a fallback for unknown models),
//! so the exporter's numbers match what operators already saw in their bots.

/// Price of one model, in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    /// USD per 1M input (prompt) tokens.
    pub input: f64,
    /// USD per 1M output (completion) tokens.
    pub output: f64,
}

/// Where the cost of a call came from; stored with every `llm_usage` row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CostSource {
    /// The sender reported the cost itself.
    Reported,
    /// Computed from the price table.
    Table,
    /// Neither: the call is counted as unpriced, never as a silent $0.
    Unpriced,
}

impl CostSource {
    /// The value stored in `llm_usage.cost_source`.
    pub fn as_str(self) -> &'static str {
        match self {
            CostSource::Reported => "reported",
            CostSource::Table => "table",
            CostSource::Unpriced => "unpriced",
        }
    }
}

/// The legacy price table from the bots (model, input, output).
const LEGACY: &[(&str, f64, f64)] = &[
    ("gpt-4", 30.0, 60.0),
    ("gpt-4-turbo", 10.0, 30.0),
    ("gpt-4.1-mini", 0.15, 0.60),
    ("gpt-4o", 2.50, 10.0),
    ("gpt-4o-mini", 0.15, 0.60),
    ("gpt-3.5-turbo", 0.50, 1.50),
    ("mistral-7b-instruct", 0.0, 0.0),
];

/// The legacy fallback for models missing from the table.
const LEGACY_DEFAULT: Price = Price { input: 1.0, output: 2.0 };

/// A price table: exact names, matched case-insensitively, plus a default.
#[derive(Debug, Clone)]
pub struct PriceTable {
    exact: Vec<(String, Price)>,
    default: Option<Price>,
}

impl Default for PriceTable {
    fn default() -> Self {
        PriceTable::legacy()
    }
}

impl PriceTable {
    /// The bots' own table, with its default price.
    pub fn legacy() -> PriceTable {
        PriceTable {
            exact: LEGACY.iter().map(|(m, i, o)| ((*m).to_owned(), Price { input: *i, output: *o })).collect(),
            default: Some(LEGACY_DEFAULT),
        }
    }

    /// Finds the price of a model, tolerating case and a `provider/` prefix.
    pub fn lookup(&self, model: &str) -> Option<Price> {
        let name = model.rsplit('/').next().unwrap_or(model);
        self.exact.iter().find(|(m, _)| m.eq_ignore_ascii_case(name)).map(|(_, p)| *p).or(self.default)
    }

    /// The cost of a call and where it came from. A reported cost wins.
    pub fn cost(
        &self,
        model: &str,
        tokens_in: u64,
        tokens_out: u64,
        reported: Option<f64>,
    ) -> (Option<f64>, CostSource) {
        if let Some(c) = reported {
            return (Some(c), CostSource::Reported);
        }
        match self.lookup(model) {
            Some(p) => (
                // Dividing once, at the end, keeps results such as 145 x $30 + 87 x $60
                // exactly representable as the decimal people expect.
                Some((tokens_in as f64 * p.input + tokens_out as f64 * p.output) / 1e6),
                CostSource::Table,
            ),
            None => (None, CostSource::Unpriced),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_prices() {
        let t = PriceTable::legacy();
        let (c, s) = t.cost("gpt-4o-mini", 1_000_000, 0, None);
        assert_eq!(s, CostSource::Table);
        assert!((c.unwrap() - 0.15).abs() < 1e-12);
        let (c, _) = t.cost("gpt-4", 145, 87, None);
        assert!((c.unwrap() - (145.0 * 30.0 + 87.0 * 60.0) / 1e6).abs() < 1e-12);
        let (c, _) = t.cost("OpenAI/GPT-4o", 0, 1_000_000, None);
        assert!((c.unwrap() - 10.0).abs() < 1e-12);
        let (c, _) = t.cost("some-new-model", 1_000_000, 1_000_000, None);
        assert!((c.unwrap() - 3.0).abs() < 1e-12);
        assert_eq!(t.cost("gpt-4", 1, 1, Some(0.25)), (Some(0.25), CostSource::Reported));
    }
}
