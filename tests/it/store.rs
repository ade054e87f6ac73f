//! The database defects of the issue, each pinned by a test that failed
//! before its fix: names kept whole in `llm_usage`, exact time comparisons,
//! a schema checked at every open, one backup per schema step, and the real
//! cause of a directory the exporter cannot write.

use std::time::Duration;

use crate::common::*;

// 10. Names longer than the label limit are cut in the metrics only.
#[test]
fn long_model_and_feature_names_are_stored_whole_and_cut_in_labels_only() {
    let e = Exporter::start(&[]);
    let model = format!("gpt-{}", "m".repeat(196));
    let feature = "é".repeat(150);
    let provider = "p".repeat(200);
    e.send(&format!(
        r#"{{"type": "llm_usage", "channel": "long", "model": "{model}", "feature": "{feature}", "provider": "{provider}", "tokens_in": 1, "tokens_out": 2, "latency_ms": 5}}"#
    ));
    wait_until("the row", Duration::from_secs(10), || {
        e.count("SELECT COUNT(*) FROM llm_usage WHERE channel = 'long'") == 1
    });
    let (m, f, p): (String, String, String) = e
        .db()
        .query_row("SELECT model, feature, provider FROM llm_usage WHERE channel = 'long'", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!((m.len(), f.len(), p.len()), (200, 300, 200), "the row holds the names as sent");
    assert!(m == model && f == feature && p == provider);
    // The labels are cut to 128 bytes on a character boundary, and counted.
    let cut_model = &model[..128];
    let cut_feature = &feature[..128];
    e.wait_metric(
        &format!(r#"kissbot_llm_requests_total{{channel="long",model="{cut_model}",feature="{cut_feature}"}}"#),
        1.0,
    );
    assert_eq!(e.metric(r#"kissbot_exporter_label_overflow_total{label="length"}"#), Some(1.0));
}
