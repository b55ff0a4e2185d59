//! Google Ads lead forms: Google's JSON, checked by `google_key`, reaches the simulator as the
//! exact Leadsin payload; test leads, wrong keys and redeliveries behave as Google needs.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::app::{GatewayEnv, GatewayProcess, TestApp, client, start_sim, wait_received};
use crate::helpers::eventually;

const KEY: &str = "g00gle-lead-form-key-7f3a";

fn sources(extra_settings: &str) -> String {
    source_named("google", extra_settings)
}

/// The `google` source under another id (metrics tests use ids no other test uses).
fn source_named(id: &str, extra_settings: &str) -> String {
    format!(
        r#"
[[source]]
id = "{id}"
kind = "google"
google_key = "{KEY}"
phone_region = "GB"
unmapped_extra = "4444444"
{extra_settings}

[source.extra]
JOB_TITLE = "1000001"
"What is your budget?" = "1000002"
QUESTION_2 = "1000003"
lead_id = "1000010"
form_id = "1000011"
campaign_id = "1000012"
adgroup_id = "1000013"
creative_id = "1000014"
gcl_id = "1000015"

[source.limits]
total = "off"
"#
    )
}

/// A lead as Google posts it, with ids as JSON numbers (int64), as Google's page shows.
fn lead(lead_id: &str, columns: Value) -> Value {
    json!({
        "lead_id": lead_id,
        "user_column_data": columns,
        "api_version": "1.0",
        "form_id": 40000000001_i64,
        "campaign_id": 21000000001_i64,
        "google_key": KEY,
        "is_test": false,
        "gcl_id": "EAIaIQobChMI8fLk2pqZhgMVx0dBAh0test",
        "adgroup_id": 150000000001_i64,
        "creative_id": 680000000001_i64,
        "lead_stage": "NEW",
        "lead_submit_time": "2024-09-26T12:30:00Z",
        "a_field_google_adds_next_year": {"nested": true}
    })
}

fn column(id: &str, name: &str, value: &str) -> Value {
    json!({"column_name": name, "string_value": value, "column_id": id})
}

fn marta() -> Value {
    json!([
        column("FULL_NAME", "Full Name", "Marta Vidal Roig"),
        column("EMAIL", "User Email", "marta.vidal@example.com"),
        column("PHONE_NUMBER", "User Phone", "+44 20 7946 0321"),
        column("COMPANY_NAME", "Company Name", "Vidal Arquitectes"),
        column("JOB_TITLE", "Job Title", "Head of Operations"),
        column("STREET_ADDRESS", "Street Address", "12 Carrer del Sol"),
        column("CITY", "City", "Girona"),
        column("REGION", "Region", "Catalonia"),
        column("POSTAL_CODE", "Postal Code", "17001"),
        column("COUNTRY", "Country", "ES"),
        column("QUESTION_1", "What is your budget?", "€10k–€50k"),
        column("QUESTION_2", "When should we call?", "Mornings"),
        column("QUESTION_3", "Anything else?", "Parking for 3 vans"),
    ])
}

async fn post(app: &TestApp, body: &Value) -> reqwest::Response {
    post_to(app, "google", body).await
}

async fn post_to(app: &TestApp, source: &str, body: &Value) -> reqwest::Response {
    app.http
        .post(app.url(&format!("/in/{source}")))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Google counts only 200 as delivered.
async fn assert_plain_200(response: reqwest::Response) -> Value {
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn assert_nothing_queued(app: &TestApp) {
    let stats = app.stats().await;
    assert_eq!(
        stats.ready + stats.leased + stats.delayed + stats.dead + stats.delivered,
        0,
        "{stats:?}"
    );
    assert!(app.sim.received().is_empty());
}

#[tokio::test]
async fn a_google_lead_arrives_as_the_exact_leadsin_payload() {
    let app = TestApp::spawn_with(&sources(""), |_| {}).await;
    let body = assert_plain_200(post(&app, &lead("TeSt-lead-0001", marta())).await).await;
    assert_eq!(body["status"], "received");
    let leads = app.received(1).await;
    assert_eq!(
        leads[0].payload,
        json!({
            "FirstName": "Marta",
            "LastName": "Vidal Roig",
            "Phone": [{"Number": "+442079460321", "Type": "mobile"}],
            "Email": [{"Address": "marta.vidal@example.com", "Type": "work"}],
            "OrgName": "Vidal Arquitectes",
            "AddressLine1": "12 Carrer del Sol",
            "Postcode": "17001",
            "City": "Girona",
            "Region": "Catalonia",
            "Country": "ES",
            "Extra": [
                {"ID": "1000001", "Value": "Head of Operations"},
                {"ID": "1000002", "Value": "€10k–€50k"},
                {"ID": "1000003", "Value": "Mornings"},
                {"ID": "1000010", "Value": "TeSt-lead-0001"},
                {"ID": "1000011", "Value": "40000000001"},
                {"ID": "1000012", "Value": "21000000001"},
                {"ID": "1000013", "Value": "150000000001"},
                {"ID": "1000014", "Value": "680000000001"},
                {"ID": "1000015", "Value": "EAIaIQobChMI8fLk2pqZhgMVx0dBAh0test"},
                {"ID": "4444444", "Value": "QUESTION_3: Parking for 3 vans"}
            ]
        })
    );
}

#[tokio::test]
async fn a_test_lead_is_answered_200_and_not_forwarded() {
    let app = TestApp::spawn_with(&sources(""), |_| {}).await;
    let mut test = lead(
        "TeSter-123-ABCDEFGHIJKLMNOPQRSTUVWXYZ-abcdefghijklmnopqrstuvwxyz-0123456789-AaBb",
        json!([
            column("FULL_NAME", "Full Name", "FirstName LastName"),
            column("EMAIL", "User Email", "test@example.com"),
        ]),
    );
    test["is_test"] = json!(true);
    let body = assert_plain_200(post(&app, &test).await).await;
    assert_eq!(body["ids"], json!([]));
    assert_nothing_queued(&app).await;

    // A real lead after it is the only one that arrives.
    assert_plain_200(post(&app, &lead("real-0001", marta())).await).await;
    let leads = app.received(1).await;
    assert_eq!(leads[0].payload["FirstName"], "Marta");
}

#[tokio::test]
async fn a_test_lead_is_forwarded_when_the_source_asks_for_it() {
    let app = TestApp::spawn_with(&sources("forward_test_leads = true"), |_| {}).await;
    let mut test = lead(
        "TeSter-123-forwarded",
        json!([column("FULL_NAME", "Full Name", "FirstName LastName")]),
    );
    test["is_test"] = json!(true);
    assert_plain_200(post(&app, &test).await).await;
    let leads = app.received(1).await;
    assert_eq!(leads[0].payload["FirstName"], "FirstName");
    assert_eq!(leads[0].payload["LastName"], "LastName");
}

#[tokio::test]
async fn a_wrong_empty_or_missing_google_key_is_refused_and_nothing_queued() {
    let app = TestApp::spawn_with(&sources(""), |_| {}).await;
    for key in [json!("g00gle-lead-form-key-7f3b"), json!(""), Value::Null] {
        let mut body = lead("forged-0001", marta());
        match &key {
            Value::Null => {
                body.as_object_mut().unwrap().remove("google_key");
            }
            other => body["google_key"] = other.clone(),
        }
        let response = post(&app, &body).await;
        assert_eq!(response.status(), 403, "key {key}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "forbidden");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(!message.contains(KEY), "the answer must not reveal the key");
    }
    assert_nothing_queued(&app).await;
}

#[tokio::test]
async fn a_full_name_only_lead_is_split_and_a_single_word_takes_the_fallback() {
    let app = TestApp::spawn_with(&sources(""), |_| {}).await;
    let two_words = lead(
        "full-name-1",
        json!([column("FULL_NAME", "Full Name", "Oriol Puig")]),
    );
    let one_word = lead(
        "full-name-2",
        json!([column("FULL_NAME", "Full Name", "Ximena")]),
    );
    assert_plain_200(post(&app, &two_words).await).await;
    let first = app.received(1).await;
    assert_plain_200(post(&app, &one_word).await).await;
    let both = app.received(2).await;
    let names = |lead: &Value| (lead["FirstName"].clone(), lead["LastName"].clone());
    assert_eq!(names(&first[0].payload), (json!("Oriol"), json!("Puig")));
    assert_eq!(names(&both[1].payload), (json!("Ximena"), json!("-")));
    assert!(both[1].payload.get("Email").is_none());
}

#[tokio::test]
async fn an_invalid_email_from_google_is_forwarded_in_the_note_not_refused() {
    let app = TestApp::spawn_with(&sources(""), |_| {}).await;
    let body = lead(
        "bad-email-1",
        json!([
            column("FIRST_NAME", "First Name", "Paula"),
            column("EMAIL", "User Email", "paula at example dot com"),
        ]),
    );
    assert_plain_200(post(&app, &body).await).await;
    let leads = app.received(1).await;
    let payload = &leads[0].payload;
    assert_eq!(payload["FirstName"], "Paula");
    assert_eq!(payload["LastName"], "-");
    assert!(payload.get("Email").is_none());
    let note = payload["Extra"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["ID"] == "4444444")
        .unwrap();
    assert_eq!(note["Value"], "EMAIL (invalid): paula at example dot com");
}

#[tokio::test]
async fn a_valid_email_with_a_stray_control_character_arrives_cleaned_when_the_name_is_repaired() {
    // No fallback of its own: the missing last name is a repair, so the lenient mapping runs.
    let app = TestApp::spawn_with(&sources("last_name_fallback = \"\""), |_| {}).await;
    let body = lead(
        "control-char-email-1",
        json!([
            column("FIRST_NAME", "First Name", "Paula"),
            column("EMAIL", "User Email", "paula.serra@exa\u{7}mple.com\u{0}"),
        ]),
    );
    assert_plain_200(post(&app, &body).await).await;
    let leads = app.received(1).await;
    let payload = &leads[0].payload;
    assert_eq!(payload["LastName"], "-");
    assert_eq!(
        payload["Email"],
        json!([{"Address": "paula.serra@example.com", "Type": "work"}]),
        "{payload}"
    );
    let note = payload["Extra"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["ID"] == "4444444");
    assert!(
        note.is_none_or(|note| !note["Value"].as_str().unwrap().contains("invalid")),
        "{payload}"
    );
}

#[tokio::test]
async fn a_lead_with_an_invalid_email_is_counted_as_repaired_and_a_valid_one_is_not() {
    let app = TestApp::spawn_with(&source_named("google-repaired", ""), |_| {}).await;
    let series = r#"leadgate_leads_repaired_total{source="google-repaired"}"#;
    let before = app.metric(series).await;
    let invalid = lead(
        "repaired-1",
        json!([
            column("FULL_NAME", "Full Name", "Paula Serra"),
            column("EMAIL", "User Email", "paula at example dot com"),
        ]),
    );
    assert_plain_200(post_to(&app, "google-repaired", &invalid).await).await;
    assert_plain_200(post_to(&app, "google-repaired", &lead("valid-1", marta())).await).await;
    app.received(2).await;
    assert_eq!(app.metric(series).await - before, 1.0);
}

#[tokio::test]
async fn test_leads_are_counted_whether_they_are_forwarded_or_not() {
    let both = format!(
        "{}{}",
        source_named("google-tests-kept", ""),
        source_named("google-tests-sent", "forward_test_leads = true")
    );
    let app = TestApp::spawn_with(&both, |_| {}).await;
    let series = [
        r#"leadgate_test_leads_total{source="google-tests-kept",forwarded="false"}"#,
        r#"leadgate_leads_received_total{source="google-tests-kept",outcome="test"}"#,
        r#"leadgate_test_leads_total{source="google-tests-sent",forwarded="true"}"#,
        r#"leadgate_leads_received_total{source="google-tests-sent",outcome="queued"}"#,
        r#"leadgate_test_leads_total{source="google-tests-kept",forwarded="true"}"#,
        r#"leadgate_leads_received_total{source="google-tests-kept",outcome="queued"}"#,
        r#"leadgate_test_leads_total{source="google-tests-sent",forwarded="false"}"#,
    ];
    let mut before = Vec::new();
    for s in series {
        before.push(app.metric(s).await);
    }
    let mut test = lead(
        "TeSter-123-counted",
        json!([column("FULL_NAME", "Full Name", "FirstName LastName")]),
    );
    test["is_test"] = json!(true);
    for source in ["google-tests-kept", "google-tests-sent"] {
        assert_plain_200(post_to(&app, source, &test).await).await;
    }
    app.received(1).await;
    let mut changes = Vec::new();
    for (s, before) in series.iter().zip(before) {
        changes.push(app.metric(s).await - before);
    }
    assert_eq!(changes, [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0], "{series:#?}");
}

#[tokio::test]
async fn without_unmapped_extra_an_invalid_email_is_dropped_and_logged_masked_at_warn_level() {
    // Leadsin has no free-text field of its own: the note is the only place an invalid value
    // can go. Without one it is dropped — and the operator is told, without the address.
    let sim = Arc::new(start_sim(Vec::new()).await);
    let dir = tempfile::tempdir().unwrap();
    let text = sources("").replace("unmapped_extra = \"4444444\"\n", "");
    assert!(!text.contains("unmapped_extra"));
    let env = GatewayEnv::new(dir.path(), &sim, &text);
    let gateway = GatewayProcess::start(&env, &[]).await;
    let body = lead(
        "dropped-email-1",
        json!([
            column("FULL_NAME", "Full Name", "Paula Serra"),
            column("EMAIL", "User Email", "paula.serra@exa mple.com"),
        ]),
    );
    let response = client()
        .post(format!("{}/in/google", gateway.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_plain_200(response).await;
    let leads = wait_received(&sim, 1, Duration::from_secs(20)).await;
    let payload = &leads[0].payload;
    assert_eq!(payload["LastName"], "Serra");
    assert!(payload.get("Email").is_none(), "{payload}");
    assert!(!payload.to_string().contains("paula.serra"), "{payload}");

    let line = eventually(Duration::from_secs(10), "the warning", || async {
        gateway
            .log()
            .lines()
            .find(|line| line.contains("invalid values were dropped"))
            .map(str::to_owned)
    })
    .await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("EMAIL: p***@exa mple.com"), "{line}");
    assert!(!gateway.log().contains("paula.serra@"), "{}", gateway.log());
}

#[tokio::test]
async fn custom_questions_map_by_column_id_or_column_name() {
    let app = TestApp::spawn_with(&sources(""), |_| {}).await;
    let body = lead(
        "custom-1",
        json!([
            column("FULL_NAME", "Full Name", "Ana Soler"),
            // Mapped by its name (the sources file says "What is your budget?").
            column("QUESTION_7", "What is your budget?", "5.000 €"),
            // Mapped by its id.
            column("QUESTION_2", "Best time", "Tardes"),
            // An older payload without column_id: read by its name.
            {"column_name": "Comments", "string_value": "Cita en català"},
            // A qualifying question with no mapping: kept in the note by its id.
            column("COMPANY_SIZE", "Company size", "11-50"),
        ]),
    );
    assert_plain_200(post(&app, &body).await).await;
    let leads = app.received(1).await;
    let extra = &leads[0].payload["Extra"];
    assert_eq!(extra[0], json!({"ID": "1000002", "Value": "5.000 €"}));
    assert_eq!(extra[1], json!({"ID": "1000003", "Value": "Tardes"}));
    let note = extra
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["ID"] == "4444444")
        .unwrap();
    assert_eq!(
        note["Value"],
        "Comments: Cita en català\nCOMPANY_SIZE: 11-50"
    );
}

#[tokio::test]
async fn form_and_campaign_ids_above_2_pow_53_arrive_exact() {
    let app = TestApp::spawn_with(&sources(""), |_| {}).await;
    // 2^53 + 1 and 2^54 + 3: an f64 would round both.
    let mut as_numbers = lead("big-ids-1", marta());
    as_numbers["form_id"] = json!(9_007_199_254_740_993_i64);
    as_numbers["campaign_id"] = json!(18_014_398_509_481_987_i64);
    let mut as_strings = lead("big-ids-2", marta());
    as_strings["form_id"] = json!("9007199254740995");
    as_strings["campaign_id"] = json!("9223372036854775807");
    // Sent as text so the test's own JSON writer cannot round them either.
    for body in [as_numbers, as_strings] {
        let response = app
            .http
            .post(app.url("/in/google"))
            .header("content-type", "application/json")
            .body(serde_json::to_string(&body).unwrap())
            .send()
            .await
            .unwrap();
        assert_plain_200(response).await;
    }
    let leads = app.received(2).await;
    let ids = |payload: &Value| {
        let extra = payload["Extra"].as_array().unwrap();
        let value = |id: &str| extra.iter().find(|e| e["ID"] == id).unwrap()["Value"].clone();
        (value("1000011"), value("1000012"))
    };
    let mut found: Vec<_> = leads.iter().map(|l| ids(&l.payload)).collect();
    found.sort_by_key(|(form, _)| form.to_string());
    assert_eq!(
        found,
        [
            (json!("9007199254740993"), json!("18014398509481987")),
            (json!("9007199254740995"), json!("9223372036854775807")),
        ]
    );
}

#[tokio::test]
async fn the_same_lead_id_twice_is_one_lead() {
    let app = TestApp::spawn_with(&sources(""), |_| {}).await;
    let body = lead("dup-lead-0001", marta());
    let first = assert_plain_200(post(&app, &body).await).await;
    let again = assert_plain_200(post(&app, &body).await).await;
    assert_eq!(
        first["ids"], again["ids"],
        "the redelivery names the first lead"
    );
    let other = lead(
        "dup-lead-0002",
        json!([column("FULL_NAME", "Full Name", "Pau Ferrer")]),
    );
    assert_plain_200(post(&app, &other).await).await;
    let leads = app.received(2).await;
    let firsts: Vec<_> = leads
        .iter()
        .map(|l| l.payload["FirstName"].clone())
        .collect();
    assert!(firsts.contains(&json!("Marta")) && firsts.contains(&json!("Pau")));
}
