//! `/metrics`: which series exist before anything happened, and what the counters count.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::helpers::app::{GatewayEnv, GatewayProcess, TestApp, default_sources, start_sim};

const GOOGLE_KEY: &str = "g00gle-metrics-key-0123";

/// A Google Ads source under `id` (counters are shared by the gateways of one test process, so
/// each test counts on a source id no other test uses).
fn google_source(id: &str) -> String {
    format!(
        r#"
[[source]]
id = "{id}"
kind = "google"
google_key = "{GOOGLE_KEY}"
unmapped_extra = "4444444"

[source.limits]
total = "off"
"#
    )
}

fn google_lead(lead_id: &str, email: &str, test: bool) -> Value {
    let column = |id: &str, value: &str| json!({"column_id": id, "string_value": value});
    json!({
        "lead_id": lead_id,
        "google_key": GOOGLE_KEY,
        "is_test": test,
        "user_column_data": [column("FULL_NAME", "Paula Serra"), column("EMAIL", email)],
    })
}

/// A series for every label set known at start-up exists at 0 on a fresh process, before any
/// lead, attempt, dead letter or pause: alerts written with `increase()` or `absent()` work
/// from the first scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_gateway_exports_every_known_series_at_zero() {
    let sim = Arc::new(start_sim(Vec::new()).await);
    let dir = tempfile::tempdir().unwrap();
    let sources = format!("{}{}", default_sources(), google_source("google-fresh"));
    let env = GatewayEnv::new(dir.path(), &sim, &sources);
    let gateway = GatewayProcess::start(&env, &[]).await;
    let metrics = gateway.metrics().await;
    let text = &metrics.text;
    let value = |series: &str| metrics.printed(series);
    for series in [
        "leadgate_dead_lettered_total",
        "leadgate_delivery_paused",
        r#"leadgate_delivery_attempts_total{outcome="delivered",status="201"}"#,
        r#"leadgate_delivery_attempts_total{outcome="retry",status="none"}"#,
        r#"leadgate_delivery_attempts_total{outcome="rejected",status="406"}"#,
        r#"leadgate_delivery_attempts_total{outcome="rejected",status="413"}"#,
        r#"leadgate_delivery_attempts_total{outcome="rejected",status="422"}"#,
        r#"leadgate_delivery_attempts_total{outcome="retry",status="502"}"#,
        r#"leadgate_delivery_attempts_total{outcome="retry",status="504"}"#,
        r#"leadgate_delivery_attempts_total{outcome="paused",status="401"}"#,
        r#"leadgate_delivery_attempts_total{outcome="duplicate",status="409"}"#,
        r#"leadgate_leads_received_total{source="website",outcome="queued"}"#,
        r#"leadgate_leads_received_total{source="website",outcome="rejected"}"#,
        r#"leadgate_leads_received_total{source="acme",outcome="unauthorized"}"#,
        r#"leadgate_leads_received_total{source="google-fresh",outcome="test"}"#,
        r#"leadgate_leads_repaired_total{source="google-fresh"}"#,
        r#"leadgate_test_leads_total{source="google-fresh",forwarded="false"}"#,
        r#"leadgate_queue_depth{state="ready"}"#,
        r#"leadgate_queue_depth{state="dead"}"#,
        "leadgate_queue_oldest_ready_seconds",
        "leadgate_delivered_records",
        "leadgate_upstream_request_duration_seconds_count",
        r#"leadgate_upstream_request_duration_seconds_bucket{le="0.025"}"#,
    ] {
        assert_eq!(value(series), Some("0"), "{series} at 0 in:\n{text}");
    }
    // A form is not a platform: nothing of it is repaired, and it has no such series.
    assert_eq!(
        value(r#"leadgate_leads_repaired_total{source="website"}"#),
        None
    );
    assert!(
        text.contains("# HELP leadgate_dead_lettered_total"),
        "{text}"
    );
}

/// The repaired counter counts a lead forwarded with repaired data once, when it is queued
/// new: not its redelivery, and not a test lead that is only logged.
#[tokio::test]
async fn a_repaired_lead_is_counted_once_and_only_when_queued_new() {
    let id = "google-repaired-once";
    let app = TestApp::spawn_with(&google_source(id), |_| {}).await;
    let series = |name: &str, labels: &str| format!("{name}{{source=\"{id}\"{labels}}}");
    let repaired = series("leadgate_leads_repaired_total", "");
    let duplicate = series("leadgate_leads_received_total", ",outcome=\"duplicate\"");
    let test = series("leadgate_leads_received_total", ",outcome=\"test\"");
    let before = [
        app.metric(&repaired).await,
        app.metric(&duplicate).await,
        app.metric(&test).await,
    ];
    let post = |lead: Value| {
        let app = &app;
        async move {
            let response = app
                .http
                .post(app.url(&format!("/in/{id}")))
                .json(&lead)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
    };
    let invalid = google_lead("repaired-once-1", "paula at example dot com", false);
    post(invalid.clone()).await;
    // Google redelivers the same lead: it is a duplicate, not a second repaired lead.
    post(invalid).await;
    // A test lead with the same flaw, not forwarded (the source does not forward them).
    post(google_lead(
        "repaired-once-test",
        "paula at example dot com",
        true,
    ))
    .await;
    app.received(1).await;
    let after = [
        app.metric(&repaired).await,
        app.metric(&duplicate).await,
        app.metric(&test).await,
    ];
    let changes: Vec<f64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    assert_eq!(
        changes,
        [1.0, 1.0, 1.0],
        "repaired, duplicate, test: {repaired}"
    );
}
