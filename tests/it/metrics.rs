//! `/metrics`: what the counters count.

use serde_json::{Value, json};

use crate::helpers::app::TestApp;

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
