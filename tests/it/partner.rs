//! Partner bodies in Leadsin's own shape: the same caps as flat fields, numbers forwarded as
//! written, and precise answers for the wrong shape.

use serde_json::{Value, json};

use crate::helpers::app::TestApp;

async fn assert_nothing_queued(app: &TestApp) {
    let stats = app.stats().await;
    assert_eq!(
        stats.ready + stats.leased + stats.delayed + stats.dead,
        0,
        "{stats:?}"
    );
    assert!(app.sim.received().is_empty());
}

async fn error_of(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status);
    response.json().await.expect("a JSON error document")
}

#[tokio::test]
async fn a_huge_extra_value_in_leadsin_shape_is_413_naming_its_path() {
    let app = TestApp::spawn().await;
    let huge = "x".repeat(70 * 1024);
    let body = json!({
        "FirstName": "Ana", "LastName": "Ruiz",
        "Extra": [{"ID": "1111111", "Value": "fine"}, {"ID": "2222222", "Value": huge}]
    });
    let error = error_of(app.post_partner(&body).await, 413).await;
    assert_eq!(error["error"]["code"], "payload_too_large", "{error}");
    assert_eq!(
        error["error"]["fields"],
        json!({"Extra[1].Value": ["is longer than 65536 bytes"]}),
        "{error}"
    );
    assert_nothing_queued(&app).await;
}

#[tokio::test]
async fn a_thousand_extra_entries_are_413_and_the_field_cap_counts_entries() {
    let app = TestApp::spawn().await;
    let entries = |n: usize| -> Vec<Value> {
        (0..n)
            .map(|i| json!({"ID": "7777777", "Value": i}))
            .collect()
    };
    let body = json!({"FirstName": "Ana", "LastName": "Ruiz", "Extra": entries(1000)});
    let error = error_of(app.post_partner(&body).await, 413).await;
    assert_eq!(error["error"]["code"], "payload_too_large", "{error}");
    let messages = error["error"]["fields"]["Extra"]
        .as_array()
        .expect("a message for Extra");
    assert!(
        messages[0].as_str().unwrap().contains("1000 entries"),
        "{error}"
    );
    assert_nothing_queued(&app).await;

    // Exactly at the partner's cap of 200 fields: two names and 198 entries are accepted.
    let body = json!({"FirstName": "Ana", "LastName": "Ruiz", "Extra": entries(198)});
    assert_eq!(app.post_partner(&body).await.status(), 202);
    app.received(1).await;
}
