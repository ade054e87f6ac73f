//! The documentation says what the binary does: every flag of `--help` is in
//! docs/configuration.md, every metric family of a real scrape is in
//! docs/metrics.md, and the README stays an entry point.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::*;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The first backticked cell of every table row that starts with one.
fn first_cells(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(|c| c.split(['{', ' ', '=']).next().unwrap_or(c).to_owned())
        .collect()
}

/// The long flags a `--help` text lists.
fn help_flags(args: &[&str]) -> BTreeSet<String> {
    let (status, _, _) = run_binary(args);
    assert!(status.success());
    let out = std::process::Command::new(binary()).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l.strip_prefix("-h, ").or_else(|| l.strip_prefix("-V, ")).unwrap_or(l);
            l.strip_prefix("--").map(|rest| format!("--{}", rest.split([' ', '=', '[', '<']).next().unwrap_or(rest)))
        })
        .collect()
}

#[test]
fn every_flag_is_documented_in_configuration_md() {
    let mut flags = help_flags(&["--help"]);
    flags.extend(help_flags(&["send", "--help"]));
    assert!(flags.len() > 30, "parsing --help found only {flags:?}");
    let documented: BTreeSet<String> =
        first_cells(&read("docs/configuration.md")).into_iter().filter(|c| c.starts_with("--")).collect();
    let missing: Vec<_> = flags.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&flags).collect();
    assert!(missing.is_empty() && stale.is_empty(), "docs/configuration.md: missing {missing:?}, not a flag {stale:?}");
}

#[test]
fn every_metric_family_is_documented_in_metrics_md() {
    let tmp = tempfile::tempdir().unwrap();
    let pricing = tmp.path().join("prices.toml");
    std::fs::write(&pricing, "unknown_models = \"unpriced\"\n").unwrap();
    // The budget families exist only with a budgets file.
    let budgets = tmp.path().join("budgets.toml");
    std::fs::write(&budgets, "[[budget]]\nchannel = \"*\"\ndaily_usd = 1.0\n").unwrap();
    let e = Exporter::start_in(
        tmp.path(),
        &[
            &format!("--pricing.file={}", pricing.display()),
            &format!("--budgets.file={}", budgets.display()),
            "--sampler.interval=200ms",
            "--db.retention=0",
        ],
    );
    // This test process is the bot: its own pid, sent over its own
    // connection, so the sampler reads it and the process series appear.
    let pid = std::process::id();
    e.send(&format!(r#"{{"type": "register", "channel": "docs", "pid": {pid}, "features": {{"llm": true}}}}"#));
    e.send(r#"{"type": "llm_usage", "channel": "docs", "model": "gpt-4", "feature": "f", "tokens_in": 1, "tokens_out": 1, "latency_ms": 5, "ttft_ms": 2}"#);
    e.send(r#"{"type": "llm_usage", "channel": "docs", "model": "mystery-9000", "feature": "f", "tokens_in": 1, "tokens_out": 1}"#);
    wait_until("the process series", Duration::from_secs(15), || {
        e.scrape().contains("kissbot_bot_process_alive{") && e.scrape().contains("kissbot_llm_unpriced_requests_total{")
    });
    let families: BTreeSet<String> = e
        .scrape()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let documented: BTreeSet<String> = first_cells(&read("docs/metrics.md"))
        .into_iter()
        .filter(|c| c.starts_with("kissbot_") || c.starts_with("process_"))
        .collect();
    let missing: Vec<_> = families.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&families).collect();
    assert!(missing.is_empty() && stale.is_empty(), "docs/metrics.md: missing {missing:?}, not exported {stale:?}");
}

#[test]
fn the_readme_is_an_entry_point() {
    let readme = read("README.md");
    let lines = readme.lines().count();
    assert!(lines <= 300, "README.md has {lines} lines; move detail into docs/");
    assert!(readme.contains("## Contents"), "a table of contents");
    // CI runs exactly the README's test command.
    assert!(readme.contains("```sh\ncargo test\n```"));
    for doc in ["docs/configuration.md", "docs/metrics.md", "docs/pricing.md", "docs/database.md"] {
        assert!(readme.contains(doc), "README points to {doc}");
    }
}
