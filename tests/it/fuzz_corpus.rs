//! Replays the checked-in fuzz corpus (`fuzz/corpus/*`) against the same
//! properties the fuzz targets check, so every finding stays fixed.

use std::path::Path;

use kissbot_exporter::fuzz_support::{framing_properties, parse_line_properties};

fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let r = std::panic::catch_unwind(|| check(&data));
        assert!(r.is_ok(), "corpus file {} violates a property", path.display());
        n += 1;
    }
    n
}

#[test]
fn parse_line_corpus() {
    assert!(replay("parse_line", parse_line_properties) >= 10, "the seed corpus is checked in");
}

#[test]
fn framing_corpus() {
    assert!(replay("framing", framing_properties) >= 3, "the seed corpus is checked in");
    // Every parse_line seed is also a stream.
    replay("parse_line", framing_properties);
}
