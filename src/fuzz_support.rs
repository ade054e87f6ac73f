//! The properties the fuzz targets check, shared with the test that replays
//! the checked-in corpus in `cargo test`. Each function panics when a
//! property is violated, which is how a fuzzer recognises a finding.

use crate::event::{parse_line, Event, MAX_LABEL_BYTES, MAX_TOKENS};
use crate::frame::Framer;

/// Parsing never panics, and whatever is accepted is within the limits.
pub fn parse_line_properties(data: &[u8]) {
    if let Ok(event) = parse_line(data) {
        assert!(!event.channel().is_empty() && event.channel().len() <= MAX_LABEL_BYTES);
        if let Event::LlmUsage(u) = event {
            assert!(u.tokens_in <= MAX_TOKENS && u.tokens_out <= MAX_TOKENS);
            assert!(u.tokens_cached <= u.tokens_in);
            // Names are kept whole; the flag says whether their labels are cut.
            assert!(!u.model.is_empty() && !u.feature.is_empty());
            assert_eq!(u.truncated, u.model.len() > MAX_LABEL_BYTES || u.feature.len() > MAX_LABEL_BYTES);
            assert_eq!(u.error, u.error_type.is_some());
            for v in [u.latency_ms, u.ttft_ms, u.reported_cost_usd].into_iter().flatten() {
                assert!(v.is_finite() && v >= 0.0);
            }
        }
    }
}

/// The line limit the framing target uses; small, to reach the long-line paths.
pub const FRAMING_MAX: usize = 256;

/// Framing and parsing as a connection sees them: the input (after its
/// first 8 bytes, which choose where reads are cut) is fed in pieces; no
/// returned line is longer than the limit or contains a newline.
pub fn framing_properties(data: &[u8]) {
    let (cuts, stream) = data.split_at(data.len().min(8));
    let mut framer = Framer::new(FRAMING_MAX);
    let mut rest = stream;
    let mut i = 0;
    while !rest.is_empty() {
        let cut = cuts.get(i % cuts.len().max(1)).copied().unwrap_or(63);
        let n = (usize::from(cut) + 1).min(rest.len());
        i += 1;
        let frames = framer.push(&rest[..n]);
        for line in &frames.lines {
            assert!(line.len() <= FRAMING_MAX);
            assert!(!line.contains(&b'\n'));
            parse_line_properties(line);
        }
        rest = &rest[n..];
    }
    if let Some(last) = framer.finish() {
        parse_line_properties(last);
    }
}
