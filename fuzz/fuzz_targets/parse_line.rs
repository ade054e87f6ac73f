//! Fuzzes the line parser; the properties live in the library so that
//! `cargo test` replays the corpus against the same checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kissbot_exporter::fuzz_support::parse_line_properties(data));
