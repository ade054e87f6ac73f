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

/// What a new user copies from the docs runs as written: `send` examples work
/// right after the quick start's `cargo run` (nothing installed yet), every
/// install is `--locked` (the versions CI tested), and the flag table names
/// every log format.
#[test]
fn the_readme_commands_run_as_written() {
    let readme = read("README.md");
    let mut in_sh = false;
    for line in readme.lines() {
        if line.starts_with("```") {
            in_sh = line == "```sh";
            continue;
        }
        if in_sh && line.trim_start().starts_with("kissbot-exporter send") {
            panic!("a send example needs an installed binary; use `cargo run -q --release -- send`: {line}");
        }
        if in_sh && line.contains("[--") {
            panic!("an optional argument in brackets does not run as written: {line}");
        }
    }
    for doc in ["README.md", "docs/MIGRATION.md", "deploy/systemd/kissbot-exporter.service"] {
        for line in read(doc).lines().filter(|l| l.contains("cargo install ")) {
            assert!(line.contains("--locked"), "{doc}: install without --locked: {line}");
        }
    }
    let flags = readme.lines().find(|l| l.starts_with("| `--log.format`")).expect("--log.format in the flag table");
    for format in ["`text`", "`logfmt`", "`json`"] {
        assert!(flags.contains(format), "the flag table omits {format}: {flags}");
    }
}

/// The modules a source file of the exporter names through `crate::`, outside
/// its unit tests and comments.
fn crate_paths(source: &str) -> BTreeSet<String> {
    let code = source.split("#[cfg(test)]\nmod tests").next().unwrap_or(source);
    let mut found = BTreeSet::new();
    for line in code.lines().map(str::trim_start).filter(|l| !l.starts_with("//")) {
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            // `use crate::{a::X, b::Y}` names several modules at once.
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group.split('}').next().unwrap_or("").split(',').collect(),
                None => vec![rest],
            };
            for name in names {
                let name: String = name.trim().chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                if !name.is_empty() && name != "testing" {
                    found.insert(name);
                }
            }
        }
    }
    found
}

#[test]
fn the_module_graph_in_architecture_md_is_the_real_one_and_has_no_cycle() {
    let root = env!("CARGO_MANIFEST_DIR");
    // The real graph: every top-level module of src/ and what its files name.
    let mut real: std::collections::BTreeMap<String, BTreeSet<String>> = Default::default();
    let mut stack = vec![std::path::PathBuf::from(format!("{root}/src"))];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(format!("{root}/src")).unwrap().to_string_lossy().into_owned();
            let module = rel.split('/').next().unwrap().trim_end_matches(".rs").to_owned();
            if module == "lib" || module == "main" {
                continue;
            }
            let mut uses = crate_paths(&std::fs::read_to_string(&path).unwrap());
            uses.remove(&module);
            real.entry(module).or_default().extend(uses);
        }
    }
    // The documented graph: `a ───▶ b, c` lines and the list of leaves.
    let doc = read("ARCHITECTURE.md");
    let block = doc.split("## Module graph").nth(1).and_then(|s| s.split("```").nth(1)).expect("module graph block");
    let mut documented: std::collections::BTreeMap<String, BTreeSet<String>> = Default::default();
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        if let Some((from, to)) = line.split_once('▶') {
            let from = from.trim_end_matches(['─', ' ']).trim().to_owned();
            let to = to.split('(').next().unwrap();
            documented.insert(from, to.split(',').map(|m| m.trim().to_owned()).filter(|m| !m.is_empty()).collect());
        } else if let Some(leaves) = line.strip_suffix(": no crate module") {
            for leaf in leaves.split(',') {
                documented.insert(leaf.trim().to_owned(), BTreeSet::new());
            }
        }
    }
    assert_eq!(real, documented, "ARCHITECTURE.md's module graph differs from the `crate::` paths of src/");
    // No cycle: repeatedly remove the modules that use nothing left.
    let mut left = real.clone();
    while !left.is_empty() {
        let leaves: Vec<String> = left
            .iter()
            .filter(|(_, uses)| uses.iter().all(|u| !left.contains_key(u)))
            .map(|(m, _)| m.clone())
            .collect();
        assert!(!leaves.is_empty(), "the modules {:?} use each other in a cycle", left.keys().collect::<Vec<_>>());
        for m in leaves {
            left.remove(&m);
        }
    }
}
