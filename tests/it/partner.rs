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

/// Posts raw JSON text (numbers that `serde_json::Value` could not hold) to a source.
async fn post_raw_json(app: &TestApp, source: &str, body: &str) -> reqwest::Response {
    let mut request = app
        .http
        .post(app.url(&format!("/in/{source}")))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if source == "acme" {
        request = request.bearer_auth(crate::helpers::app::PARTNER_KEY);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn json_numbers_are_forwarded_exactly_as_written() {
    let app = TestApp::spawn().await;
    let flat = r#"{"first_name": "Ana", "last_name": "Ruiz", "campaign": 18446744073709551616123}"#;
    assert_eq!(post_raw_json(&app, "acme", flat).await.status(), 202);
    let leadsin = r#"{"FirstName": "Luis", "LastName": "Gil",
        "Extra": [{"ID": 7777777, "Value": 1e3}, {"ID": "8888888", "Value": 1.50}]}"#;
    assert_eq!(post_raw_json(&app, "acme", leadsin).await.status(), 202);
    let form = r#"{"name": "Eva Sanz", "budget": 2.5E+3, "utm_campaign": -0.0}"#;
    assert_eq!(post_raw_json(&app, "website", form).await.status(), 202);

    let leads = app.received(3).await;
    let extra = |last: &str| {
        leads
            .iter()
            .find(|l| l.payload["LastName"] == last)
            .map(|l| l.payload["Extra"].clone())
            .unwrap()
    };
    assert_eq!(
        extra("Ruiz"),
        json!([{"ID": "5555555", "Value": "18446744073709551616123"},
               {"ID": "6666666", "Value": "Partner ACME"}])
    );
    assert_eq!(
        extra("Gil"),
        json!([{"ID": "7777777", "Value": "1e3"}, {"ID": "8888888", "Value": "1.50"},
               {"ID": "6666666", "Value": "Partner ACME"}])
    );
    assert_eq!(
        extra("Sanz"),
        json!([{"ID": "1111111", "Value": "2.5E+3"}, {"ID": "2222222", "Value": "-0.0"},
               {"ID": "3333333", "Value": "Website form"}])
    );
}

#[tokio::test]
async fn a_leadsin_body_with_a_plain_string_email_is_told_the_shape_email_needs() {
    let app = TestApp::spawn().await;
    let body = json!({"FirstName": "Ana", "LastName": "Ruiz", "Email": "ana@example.com"});
    let error = error_of(app.post_partner(&body).await, 422).await;
    assert_eq!(error["error"]["code"], "validation_failed", "{error}");
    let fields = error["error"]["fields"].as_object().unwrap();
    assert_eq!(
        fields.keys().collect::<Vec<_>>(),
        ["Email"],
        "only Email is wrong: {error}"
    );
    let message = fields["Email"][0].as_str().unwrap();
    assert!(
        message.contains("list of {Address, Type} objects") && message.contains("\"Address\""),
        "{message}"
    );
    assert_nothing_queued(&app).await;

    // The same lead with Email as Leadsin writes it goes through.
    let body = json!({"FirstName": "Ana", "LastName": "Ruiz",
        "Email": [{"Address": "ana@example.com", "Type": "work"}]});
    assert_eq!(app.post_partner(&body).await.status(), 202);
    let lead = &app.received(1).await[0].payload;
    assert_eq!(
        lead["Email"],
        json!([{"Address": "ana@example.com", "Type": "work"}])
    );
}

#[tokio::test]
async fn a_flat_partner_body_with_an_org_name_key_is_read_as_flat_fields() {
    let app = TestApp::spawn().await;
    let body = json!({"name": "Ana Lopez", "email": "ana@example.com", "OrgName": "Acme"});
    let response = app.post_partner(&body).await;
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let lead = &app.received(1).await[0].payload;
    assert_eq!(lead["FirstName"], "Ana", "{lead}");
    assert_eq!(lead["LastName"], "Lopez", "{lead}");
    assert_eq!(
        lead["Email"],
        json!([{"Address": "ana@example.com", "Type": "work"}])
    );
}

#[tokio::test]
async fn a_leadsin_extra_entry_with_a_blank_id_is_422_like_one_without_an_id() {
    let app = TestApp::spawn().await;
    let body = json!({"FirstName": "Ana", "LastName": "Ruiz",
        "Extra": [{"ID": "", "Value": "x"}, {"Value": "y"}]});
    let error = error_of(app.post_partner(&body).await, 422).await;
    assert_eq!(error["error"]["code"], "validation_failed", "{error}");
    assert_eq!(
        error["error"]["fields"],
        json!({"Extra[0].ID": ["is required"], "Extra[1].ID": ["is required"]})
    );
    assert_nothing_queued(&app).await;
}

#[tokio::test]
async fn an_idempotency_key_reused_with_another_body_is_422_and_the_new_body_is_not_queued() {
    let app = TestApp::spawn().await;
    let post = |body: &'static str| {
        app.http
            .post(app.url("/in/acme"))
            .bearer_auth(crate::helpers::app::PARTNER_KEY)
            .header("content-type", "application/json")
            .header("idempotency-key", "order-77")
            .body(body)
            .send()
    };
    let first = post(r#"{"name": "Ana Ruiz", "email": "ana@example.com"}"#)
        .await
        .unwrap();
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();

    // A retry of the same bytes is answered with the first id.
    let retry = post(r#"{"name": "Ana Ruiz", "email": "ana@example.com"}"#)
        .await
        .unwrap();
    assert_eq!(retry.status(), 202);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let retry: Value = retry.json().await.unwrap();
    assert_eq!(retry["id"], first["id"]);

    // Another lead under the same key is refused, not swallowed.
    let reused = post(r#"{"name": "Bea Gil", "email": "bea@example.com"}"#)
        .await
        .unwrap();
    let error = error_of(reused, 422).await;
    assert_eq!(error["error"]["code"], "idempotency_key_reused", "{error}");
    assert!(
        !error.to_string().contains("bea@example.com"),
        "the body is not echoed: {error}"
    );

    let leads = app.received(1).await;
    assert_eq!(leads[0].payload["FirstName"], "Ana");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(app.sim.received().len(), 1, "only the first lead arrives");
}
