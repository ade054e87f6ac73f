//! Every repository path and relative link named in the README, docs/,
//! alerts/, deploy/ and docker-compose.yml exists, and every `#anchor` into a
//! Markdown file names one of its headings.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The files whose references are checked.
fn sources() -> Vec<PathBuf> {
    let mut out = vec![root().join("README.md"), root().join("docker-compose.yml")];
    for dir in ["docs", "alerts", "deploy"] {
        walk(&root().join(dir), &mut out);
    }
    out.retain(|p| p.extension().is_some_and(|e| e == "md" || e == "yml" || e == "yaml" || e == "service"));
    out
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            walk(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(markdown: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(markdown).unwrap_or_default();
    let mut fenced = false;
    text.lines()
        .filter(|l| {
            if l.starts_with("```") {
                fenced = !fenced;
            }
            !fenced
        })
        .filter_map(|l| l.strip_prefix('#').map(|h| h.trim_start_matches('#')))
        .map(slug)
        .collect()
}

/// Top-level entries a bare path may start with to count as a repository path.
const ROOTS: &[&str] =
    &["src/", "docs/", "alerts/", "deploy/", "grafana/", "tests/", "bench/", "tools/", "crates/", "fuzz/", ".ci/"];

/// The references one file makes: Markdown link targets, and paths written in
/// backticks or as YAML values.
fn references(file: &Path, text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let md = file.extension().is_some_and(|e| e == "md");
    if md {
        let mut rest = text;
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            if let Some(end) = rest.find(')') {
                out.push(rest[..end].trim().to_owned());
            }
        }
    }
    for token in text.split(|c: char| c.is_whitespace() || matches!(c, '`' | '"' | '\'' | '(' | ')' | ',' | '[' | ']'))
    {
        let token = token.trim_end_matches(['.', ':', ';']);
        // An image reference such as `grafana/grafana:11.6.0` is no path; a
        // bind mount `./dir:/container/dir` is.
        if token.split_once(':').is_some_and(|(_, after)| !after.starts_with('/')) {
            continue;
        }
        if ROOTS.iter().any(|r| token.starts_with(r)) || (token.starts_with("./") && !md) {
            out.push(token.to_owned());
        }
    }
    out
}

#[test]
fn every_named_path_and_link_exists() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in sources() {
        let text = std::fs::read_to_string(&file).unwrap();
        let base = file.parent().unwrap();
        for r in references(&file, &text) {
            if r.is_empty() || r.contains("://") || r.starts_with("mailto:") || r.contains('$') || r.contains('*') {
                continue;
            }
            let (path, anchor) = match r.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (r.as_str(), None),
            };
            // Compose bind mounts name host paths as `./dir:/container/dir`.
            let path = path.split(':').next().unwrap_or(path);
            let target = if path.is_empty() {
                file.clone()
            } else if ROOTS.iter().any(|root| path.starts_with(root)) && !base.join(path).exists() {
                root().join(path)
            } else {
                base.join(path)
            };
            checked += 1;
            if !target.exists() {
                broken.push(format!("{}: {r} (no {})", file.display(), target.display()));
                continue;
            }
            if let Some(a) = anchor.filter(|a| !a.is_empty()) {
                if target.extension().is_some_and(|e| e == "md") && !anchors(&target).contains(a) {
                    broken.push(format!("{}: {r} (no heading #{a})", file.display()));
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} references found; the extraction is broken");
    assert!(broken.is_empty(), "broken references:\n{}", broken.join("\n"));
}
