//! LLM budgets per bot: the `--budgets.file`, and the spend of each bot since
//! the start of the UTC day and the UTC month.
//!
//! The spend is read from `llm_usage` once at start (so a restart does not
//! reset it), then kept current from each call's cost, and set back to zero
//! when a period begins. Like the state machine, which owns it, the
//! tracker has no clock and no I/O: time is an argument.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Datelike, TimeZone, Utc};
use serde::Deserialize;

use crate::regular_file;

/// The channel of the entry that applies to every bot without its own.
pub(crate) const WILDCARD: &str = "*";

/// Most entries a budgets file may hold: it is read into memory and every
/// entry becomes two series.
pub(crate) const MAX_ENTRIES: usize = 10_000;

/// The largest budget accepted, in USD: anything above is a typo.
const MAX_USD: f64 = 1e9;

/// A budget period, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// The calendar day.
    Day,
    /// The calendar month.
    Month,
}

impl Period {
    /// Both periods, in the order they are rendered.
    pub(crate) const ALL: [Period; 2] = [Period::Day, Period::Month];

    /// The `period` label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    /// The Unix time at which the period containing `now` began.
    pub fn start(self, now: f64) -> f64 {
        let day = (now / 86_400.0).floor() * 86_400.0;
        match self {
            Period::Day => day,
            Period::Month => {
                let Some(t) = DateTime::from_timestamp(day as i64, 0) else { return day };
                Utc.with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0).single().map_or(day, |m| m.timestamp() as f64)
            }
        }
    }

    /// The Unix time at which the period after the one containing `now` begins.
    pub fn next_start(self, now: f64) -> f64 {
        match self {
            Period::Day => Period::Day.start(now) + 86_400.0,
            // Some day of the next month lies 32 days after the 1st.
            Period::Month => Period::Month.start(Period::Month.start(now) + 32.0 * 86_400.0),
        }
    }
}

/// The budgets of one bot, in USD; at least one is set.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct Budget {
    /// USD per UTC calendar day.
    pub(crate) daily_usd: Option<f64>,
    /// USD per UTC calendar month.
    pub(crate) monthly_usd: Option<f64>,
}

impl Budget {
    /// The budget of a period, if set.
    pub(crate) fn of(&self, period: Period) -> Option<f64> {
        match period {
            Period::Day => self.daily_usd,
            Period::Month => self.monthly_usd,
        }
    }
}

/// Why a budgets file was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BudgetError {
    /// The file could not be read.
    #[error("cannot read budgets file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("invalid budgets file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        message: String,
    },
    /// The file sets nothing: empty, or only whitespace and comments. It is
    /// far more likely a truncated write than a wish for no budgets, which
    /// `budget = []` says.
    #[error(
        "budgets file {path} is empty (or holds only comments); \
         write `budget = []` in it to run with no budgets on purpose"
    )]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// An entry is inconsistent.
    #[error("invalid budgets file {path}: budget {index}: {message}")]
    Entry {
        /// The file.
        path: PathBuf,
        /// 1-based position of the `[[budget]]` entry.
        index: usize,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    channel: String,
    daily_usd: Option<f64>,
    monthly_usd: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetsFile {
    /// None when the file does not mention `budget` at all: an empty file.
    budget: Option<Vec<FileEntry>>,
}

/// The budgets in force: one entry per named channel, and the `*` entry.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Budgets {
    explicit: HashMap<String, Budget>,
    wildcard: Option<Budget>,
}

impl Budgets {
    /// Reads and checks a budgets file: a regular file (or a symlink to
    /// one) of at most [`regular_file::MAX_BYTES`].
    pub(crate) fn load(path: &Path) -> Result<Budgets, BudgetError> {
        let text =
            regular_file::read_to_string(path).map_err(|source| BudgetError::Read { path: path.to_owned(), source })?;
        Budgets::parse(&text, path)
    }

    /// Parses a budgets file; `path` is only for the messages. A file that
    /// sets nothing is refused; `budget = []` means no budgets.
    pub(crate) fn parse(text: &str, path: &Path) -> Result<Budgets, BudgetError> {
        let file: BudgetsFile =
            toml::from_str(text).map_err(|e| BudgetError::Parse { path: path.to_owned(), message: e.to_string() })?;
        let entries = file.budget.ok_or_else(|| BudgetError::Empty { path: path.to_owned() })?;
        if entries.len() > MAX_ENTRIES {
            return Err(BudgetError::Parse {
                path: path.to_owned(),
                message: format!("{} budgets, more than the limit of {MAX_ENTRIES}", entries.len()),
            });
        }
        let mut budgets = Budgets::default();
        for (i, e) in entries.into_iter().enumerate() {
            let err = |message: String| BudgetError::Entry { path: path.to_owned(), index: i + 1, message };
            let channel = e.channel.trim().to_owned();
            if channel.is_empty() {
                return Err(err("channel is empty".into()));
            }
            if e.daily_usd.is_none() && e.monthly_usd.is_none() {
                return Err(err(format!("channel {channel:?} needs daily_usd, monthly_usd or both")));
            }
            for (what, v) in [("daily_usd", e.daily_usd), ("monthly_usd", e.monthly_usd)] {
                if let Some(v) = v {
                    if !v.is_finite() || v <= 0.0 || v > MAX_USD {
                        return Err(err(format!("{what} {v} must be above 0 and at most {MAX_USD} USD")));
                    }
                }
            }
            let budget = Budget { daily_usd: e.daily_usd, monthly_usd: e.monthly_usd };
            let duplicate = if channel == WILDCARD {
                budgets.wildcard.replace(budget).is_some()
            } else {
                budgets.explicit.insert(channel.clone(), budget).is_some()
            };
            if duplicate {
                return Err(err(format!("channel {channel:?} has more than one budget")));
            }
        }
        Ok(budgets)
    }

    /// The budget of a channel: its own entry, else the `*` entry.
    pub(crate) fn of(&self, channel: &str) -> Option<Budget> {
        self.explicit.get(channel).copied().or(self.wildcard)
    }

    /// Whether the channel has an entry of its own.
    pub(crate) fn is_explicit(&self, channel: &str) -> bool {
        self.explicit.contains_key(channel)
    }

    /// Number of entries, the `*` entry included.
    pub(crate) fn len(&self) -> usize {
        self.explicit.len() + usize::from(self.wildcard.is_some())
    }
}

/// What a bot spent in the current periods, in USD.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct Spend {
    /// Since the start of the UTC day.
    pub(crate) day_usd: f64,
    /// Since the start of the UTC month.
    pub(crate) month_usd: f64,
}

impl Spend {
    /// The spend of a period.
    pub(crate) fn of(&self, period: Period) -> f64 {
        match period {
            Period::Day => self.day_usd,
            Period::Month => self.month_usd,
        }
    }
}

/// One bot with a budget, as the metrics and `/api/budgets` show it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BudgetLine {
    /// The channel.
    pub(crate) channel: String,
    /// Its budget.
    pub(crate) budget: Budget,
    /// Whether the budget is the channel's own entry (else the `*` entry).
    pub(crate) explicit: bool,
    /// Its spend in the current periods.
    pub(crate) spend: Spend,
}

/// The budgets in force and the spend of the current UTC day and month.
///
/// Spend is kept for every channel with an entry of its own, and for up to
/// `max_other` other channels (the `*` bots, and channels that spent this
/// month and may be given a budget by a reload). The map is therefore
/// bounded by the file's entries plus `--limits.max-bots`.
#[derive(Debug, Clone)]
pub(crate) struct SpendTracker {
    budgets: Budgets,
    spend: HashMap<String, Spend>,
    /// Channels the `*` entry covered while their bot was tracked, and whose
    /// bot is gone (expired, forgotten, evicted): their spend series stay
    /// until the month ends, so that a sum over the series never falls when
    /// a bot goes. Always keys of `spend`, so bounded like it.
    departed: HashSet<String>,
    /// Entries whose channel has no entry of its own in the file.
    others: usize,
    max_other: usize,
    next_day: f64,
    next_month: f64,
}

impl SpendTracker {
    /// A tracker starting from `baseline` (channel, spend since the start of
    /// the current day and month), as read from the database at `now`.
    pub(crate) fn new(budgets: Budgets, baseline: HashMap<String, Spend>, now: f64, max_other: usize) -> SpendTracker {
        let mut t = SpendTracker {
            budgets,
            spend: HashMap::new(),
            departed: HashSet::new(),
            others: 0,
            max_other,
            next_day: Period::Day.next_start(now),
            next_month: Period::Month.next_start(now),
        };
        // Explicit channels first, then the biggest spenders, so the bound
        // keeps the figures that matter.
        let mut baseline: Vec<_> = baseline.into_iter().collect();
        baseline.sort_by(|a, b| {
            t.budgets
                .is_explicit(&b.0)
                .cmp(&t.budgets.is_explicit(&a.0))
                .then(b.1.month_usd.total_cmp(&a.1.month_usd))
                .then_with(|| a.0.cmp(&b.0))
        });
        for (channel, spend) in baseline {
            if let Some(s) = t.entry(&channel) {
                *s = spend;
            }
        }
        t
    }

    /// The entry of a channel, created while under the bound.
    fn entry(&mut self, channel: &str) -> Option<&mut Spend> {
        if !self.spend.contains_key(channel) {
            let explicit = self.budgets.is_explicit(channel);
            if !explicit && self.others >= self.max_other {
                return None;
            }
            self.others += usize::from(!explicit);
            self.spend.insert(channel.to_owned(), Spend::default());
        }
        self.spend.get_mut(channel)
    }

    /// Adds the cost of one call made at `now`.
    pub(crate) fn add(&mut self, channel: &str, cost_usd: f64, now: f64, tracked: impl Fn(&str) -> bool) {
        // A call just after midnight must not count for the day before, even
        // if the ticker has not turned yet.
        self.roll(now, tracked);
        if cost_usd <= 0.0 || !cost_usd.is_finite() {
            return;
        }
        if let Some(s) = self.entry(channel) {
            s.day_usd += cost_usd;
            s.month_usd += cost_usd;
        }
    }

    /// Starts a new day or month when `now` has reached it. At a new month,
    /// channels with no entry of their own that `tracked` no longer knows
    /// are forgotten.
    pub(crate) fn roll(&mut self, now: f64, tracked: impl Fn(&str) -> bool) {
        if now >= self.next_month {
            let budgets = &self.budgets;
            self.spend.retain(|c, _| budgets.is_explicit(c) || tracked(c));
            // A new month starts every spend at 0: no series to keep.
            self.departed.clear();
            for s in self.spend.values_mut() {
                *s = Spend::default();
            }
            self.recount();
            self.next_month = Period::Month.next_start(now);
        }
        if now >= self.next_day {
            for s in self.spend.values_mut() {
                s.day_usd = 0.0;
            }
            self.next_day = Period::Day.next_start(now);
        }
    }

    fn recount(&mut self) {
        self.others = self.spend.keys().filter(|c| !self.budgets.is_explicit(c)).count();
    }

    /// Replaces the budgets (on reload). Spend already counted stays.
    pub(crate) fn set_budgets(&mut self, budgets: Budgets) {
        self.budgets = budgets;
        self.recount();
    }

    /// The spend of a channel, if it is kept: a channel with an entry of
    /// its own or within the bound counts from 0 once it has a budget.
    pub(crate) fn spend(&self, channel: &str) -> Option<Spend> {
        match self.spend.get(channel) {
            Some(s) => Some(*s),
            None if self.budgets.of(channel).is_some() => Some(Spend::default()),
            None => None,
        }
    }

    /// The budgets in force.
    pub(crate) fn budgets(&self) -> &Budgets {
        &self.budgets
    }

    /// Keeps the spend series of a channel whose bot is no longer tracked
    /// until the month ends (see `departed`); nothing for a channel that
    /// spent nothing this month.
    pub(crate) fn bot_gone(&mut self, channel: &str) {
        if self.spend.contains_key(channel) {
            self.departed.insert(channel.to_owned());
        }
    }

    /// Every channel with a budget: its own entry, or the `*` entry for the
    /// `bots` (the tracked bots) that have none and for the departed ones.
    /// Sorted by channel.
    pub(crate) fn lines<'a>(&'a self, bots: impl Iterator<Item = &'a str>) -> Vec<BudgetLine> {
        let line = |channel: &str, budget: Budget, explicit: bool| BudgetLine {
            channel: channel.to_owned(),
            budget,
            explicit,
            spend: self.spend.get(channel).copied().unwrap_or_default(),
        };
        let mut out: Vec<BudgetLine> = self.budgets.explicit.iter().map(|(c, b)| line(c, *b, true)).collect();
        if let Some(w) = self.budgets.wildcard {
            out.extend(self.covered(bots).into_iter().map(|c| line(c, w, false)));
        }
        out.sort_by(|a, b| a.channel.cmp(&b.channel));
        out
    }

    /// The USD spent today by the `bots` (the tracked bots) and the departed
    /// channels: the fleet's spend today, which does not fall when a bot
    /// goes.
    pub(crate) fn day_total<'a>(&'a self, bots: impl Iterator<Item = &'a str>) -> f64 {
        self.with_departed(bots).iter().filter_map(|c| self.spend.get(*c)).map(|s| s.day_usd).sum()
    }

    /// The channels without an entry of their own among `bots` and the
    /// departed, each once.
    fn covered<'a>(&'a self, bots: impl Iterator<Item = &'a str>) -> BTreeSet<&'a str> {
        let mut channels = self.with_departed(bots);
        channels.retain(|c| !self.budgets.is_explicit(c));
        channels
    }

    /// `bots` (the tracked bots) and the departed channels, each once.
    fn with_departed<'a>(&'a self, bots: impl Iterator<Item = &'a str>) -> BTreeSet<&'a str> {
        let mut channels: BTreeSet<&str> = bots.collect();
        channels.extend(self.departed.iter().map(String::as_str));
        channels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-01T00:00:00Z.
    const DEC_1: f64 = 1_796_083_200.0;

    fn file(text: &str) -> Result<Budgets, BudgetError> {
        Budgets::parse(text, Path::new("b.toml"))
    }

    #[test]
    fn period_bounds_in_utc() {
        let t = DEC_1 + 13.5 * 3600.0;
        assert_eq!(Period::Day.start(t), DEC_1);
        assert_eq!(Period::Day.next_start(t), DEC_1 + 86_400.0);
        assert_eq!(Period::Month.start(t), DEC_1);
        assert_eq!(Period::Month.start(DEC_1 - 1.0), DEC_1 - 30.0 * 86_400.0, "November has 30 days");
        // December has 31 days: the next month is January 2027.
        assert_eq!(Period::Month.next_start(t), DEC_1 + 31.0 * 86_400.0);
        assert_eq!(Period::Month.next_start(DEC_1 - 1.0), DEC_1);
    }

    #[test]
    fn files_are_checked() {
        let b = file("[[budget]]\nchannel = \"a\"\ndaily_usd = 5.0\nmonthly_usd = 100.0\n[[budget]]\nchannel = \"*\"\nmonthly_usd = 10\n").unwrap();
        assert_eq!(b.of("a"), Some(Budget { daily_usd: Some(5.0), monthly_usd: Some(100.0) }));
        assert_eq!(b.of("z"), Some(Budget { daily_usd: None, monthly_usd: Some(10.0) }));
        assert_eq!(b.len(), 2);
        for empty in ["", " \n\t", "# budgets\n\n# none yet\n"] {
            assert!(matches!(file(empty), Err(BudgetError::Empty { .. })), "{empty:?}");
        }
        assert!(file("").unwrap_err().to_string().contains("write `budget = []`"));
        assert_eq!(file("budget = []").unwrap().len(), 0, "no budgets on purpose");
        let bad = |t: &str| file(t).unwrap_err().to_string();
        assert!(bad("[[budget]]\nchannel = \"a\"\n").contains("needs daily_usd"));
        assert!(bad("[[budget]]\nchannel = \"a\"\ndaily_usd = -1.0\n").contains("must be above 0"));
        assert!(bad("[[budget]]\nchannel = \"a\"\ndaily_usd = nan\n").contains("must be above 0"));
        assert!(bad("[[budget]]\nchannel = \" \"\ndaily_usd = 1.0\n").contains("channel is empty"));
        assert!(bad("[[budget]]\nchannel = \"a\"\ndaily_usd = 1\n[[budget]]\nchannel = \"a\"\ndaily_usd = 2\n")
            .contains("budget 2: channel \"a\" has more than one budget"));
        assert!(bad("[[budget]]\nchanel = \"a\"\ndaily_usd = 1.0\n").contains("unknown field"));
        assert!(bad("not toml").starts_with("invalid budgets file b.toml"));
    }

    #[test]
    fn shipped_example_file_parses() {
        let b = file(include_str!("../docs/budgets.example.toml")).expect("example parses");
        assert!(b.of("el_serda").is_some() && b.of("any-other-bot").is_some());
    }

    #[test]
    fn spend_accumulates_rolls_over_and_is_bounded() {
        let b = file("[[budget]]\nchannel = \"a\"\ndaily_usd = 5.0\n[[budget]]\nchannel = \"*\"\ndaily_usd = 1.0\n")
            .unwrap();
        let noon = DEC_1 + 12.0 * 3600.0;
        let baseline = HashMap::from([
            ("a".to_owned(), Spend { day_usd: 1.0, month_usd: 3.0 }),
            ("x".to_owned(), Spend { day_usd: 0.5, month_usd: 9.0 }),
            ("y".to_owned(), Spend { day_usd: 0.5, month_usd: 1.0 }),
        ]);
        // One channel besides the explicit ones: the bigger spender stays.
        let mut t = SpendTracker::new(b, baseline, noon, 1);
        let all = |_: &str| true;
        t.add("a", 0.25, noon, all);
        t.add("y", 0.25, noon, all);
        let lines = t.lines(["x", "y", "a"].into_iter());
        let spend: Vec<_> = lines.iter().map(|l| (l.channel.as_str(), l.spend, l.explicit)).collect();
        assert_eq!(
            spend,
            [
                ("a", Spend { day_usd: 1.25, month_usd: 3.25 }, true),
                ("x", Spend { day_usd: 0.5, month_usd: 9.0 }, false),
                ("y", Spend::default(), false),
            ]
        );
        // A call after midnight starts a new day, not a new month.
        t.add("a", 1.0, DEC_1 + 86_400.0 + 1.0, all);
        assert_eq!(t.spend["a"], Spend { day_usd: 1.0, month_usd: 4.25 });
        assert_eq!(t.spend["x"], Spend { day_usd: 0.0, month_usd: 9.0 });
        // A new month forgets channels no bot and no entry keeps.
        t.roll(DEC_1 + 31.0 * 86_400.0, |_| false);
        assert_eq!(t.spend.len(), 1);
        assert_eq!(t.spend["a"], Spend::default());
        t.add("y", 2.0, DEC_1 + 31.0 * 86_400.0, all);
        assert_eq!(t.spend["y"].month_usd, 2.0, "room again for another channel");
    }
}
