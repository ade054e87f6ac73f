//! Fuzzes framing plus parsing as a connection sees them (reads cut at
//! positions taken from the input's first bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kissbot_exporter::fuzz_support::framing_properties(data));
