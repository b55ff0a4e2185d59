//! Form tools' webhooks (Typeform, Unbounce, Elementor, Webflow, Jotform): each tool's request,
//! built from its documented shape, reaches the simulator as the exact Leadsin payload; a bad
//! or missing signature or key is refused and nothing is queued.

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use std::sync::Arc;
use std::time::Duration;

use crate::helpers::app::{
    GatewayEnv, GatewayProcess, TestApp, client, serde_urlencoded, start_sim, wait_received,
};
use crate::helpers::eventually;

const TYPEFORM_SECRET: &str = "typeform-webhook-secret";
const WEBFLOW_SECRET: &str = "webflow-oauth-client-secret-5c1e";
const UNBOUNCE_KEY: &str = "unbounce-shared-key-0a1b2c";
const ELEMENTOR_KEY: &str = "elementor-shared-key-3d4e5f";
const JOTFORM_KEY: &str = "jotform-shared-key-6a7b8c";

fn sources() -> String {
    format!(
        r#"
[[source]]
id = "typeform"
kind = "webhook"
preset = "typeform"
secret = "{TYPEFORM_SECRET}"
phone_region = "ES"
unmapped_extra = "4444444"
[source.extra]
products = "2000001"
"Team size" = "2000002"
utm_campaign = "2000003"
token = "2000004"
form_id = "2000005"

[[source]]
id = "unbounce"
kind = "webhook"
preset = "unbounce"
secret = "{UNBOUNCE_KEY}"
phone_region = "GB"
unmapped_extra = "4444444"
[source.extra]
how_did_you_hear = "3000001"
page_id = "3000002"
variant = "3000003"

[[source]]
id = "elementor"
kind = "webhook"
preset = "elementor"
secret = "{ELEMENTOR_KEY}"
phone_region = "FR"
unmapped_extra = "4444444"
[source.extra]
Message = "4000001"
field_3a9c = "4000002"
form_name = "4000003"
page_url = "4000004"

[[source]]
id = "webflow"
kind = "webhook"
preset = "webflow"
secret = "{WEBFLOW_SECRET}"
phone_region = "GB"
unmapped_extra = "4444444"
[source.extra]
Budget = "5000001"
form_name = "5000002"

[[source]]
id = "jotform"
kind = "webhook"
preset = "jotform"
secret = "{JOTFORM_KEY}"
phone_region = "DE"
unmapped_extra = "4444444"
[source.extra]
interestedIn = "6000001"
preferredDate = "6000002"
submission_id = "6000003"
"#
    )
}

async fn spawn() -> TestApp {
    TestApp::spawn_with(&sources(), |_| {}).await
}

async fn post(
    app: &TestApp,
    path: &str,
    content_type: &str,
    headers: &[(&str, String)],
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut request = app
        .http
        .post(app.url(path))
        .header("content-type", content_type);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    request.body(body).send().await.unwrap()
}

/// Elementor (and Google, Meta) count only an exact 200 as success.
async fn assert_plain_200(response: reqwest::Response) -> Value {
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn assert_forbidden(response: reqwest::Response) {
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden", "{body}");
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

fn hmac(secret: &str, parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

// ---- Typeform ---------------------------------------------------------------------------

/// A Typeform delivery as sent: non-ASCII text `\u`-escaped, so the signed bytes differ from
/// any re-serialisation of the parsed JSON.
const TYPEFORM_BODY: &str = r#"{"event_id":"01HXZ3K8Q7V2N9T4W6Y8A0B2C4","event_type":"form_response","form_response":{"form_id":"lT4Z3j","token":"a3a12ec67a1365927098a606107fac15","landed_at":"2024-05-01T09:58:11Z","submitted_at":"2024-05-01T10:00:03Z","hidden":{"utm_source":"newsletter","utm_campaign":"spring"},"calculated":{"score":0},"variables":[],"definition":{"id":"lT4Z3j","title":"Request a demo","fields":[{"id":"Xa1b2c","title":"What's your first name?","type":"short_text","ref":"first_name","properties":{}},{"id":"Yd3e4f","title":"And your last name?","type":"short_text","ref":"last_name","properties":{}},{"id":"Zg5h6i","title":"Your work email","type":"email","ref":"3f6a0c1e-8d4b-4c2e-9f1a-2b7c8d9e0f11","properties":{}},{"id":"Wj7k8l","title":"A phone number we can call","type":"phone_number","ref":"5b1d9e2f-7a3c-4e6b-8d0f-1a2b3c4d5e6f","properties":{}},{"id":"Vm9n0o","title":"Company","type":"short_text","ref":"company","properties":{}},{"id":"Up1q2r","title":"Which products interest you?","type":"multiple_choice","ref":"products","allow_multiple_selections":true,"allow_other_choice":true,"properties":{},"choices":[{"id":"c1","label":"CRM"},{"id":"c2","label":"Invoicing"}]},{"id":"Ts3t4u","title":"Team size","type":"multiple_choice","ref":"9c8b7a6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d","properties":{},"choices":[{"id":"c3","label":"1-10"},{"id":"c4","label":"11-50"}]},{"id":"Sv5w6x","title":"Anything else?","type":"long_text","ref":"notes","properties":{}}]},"answers":[{"type":"text","text":"Jos\u00e9","field":{"id":"Xa1b2c","type":"short_text","ref":"first_name"}},{"type":"text","text":"Garc\u00eda Mart\u00ednez","field":{"id":"Yd3e4f","type":"short_text","ref":"last_name"}},{"type":"email","email":"jose.garcia@example.es","field":{"id":"Zg5h6i","type":"email","ref":"3f6a0c1e-8d4b-4c2e-9f1a-2b7c8d9e0f11"}},{"type":"phone_number","phone_number":"+34911234567","field":{"id":"Wj7k8l","type":"phone_number","ref":"5b1d9e2f-7a3c-4e6b-8d0f-1a2b3c4d5e6f"}},{"type":"text","text":"Cer\u00e1micas del Sur S.L.","field":{"id":"Vm9n0o","type":"short_text","ref":"company"}},{"type":"choices","choices":{"labels":["CRM","Invoicing"],"other":"Field service"},"field":{"id":"Up1q2r","type":"multiple_choice","ref":"products"}},{"type":"choice","choice":{"label":"11-50"},"field":{"id":"Ts3t4u","type":"multiple_choice","ref":"9c8b7a6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d"}},{"type":"text","text":"Call after 4pm \u2014 gracias","field":{"id":"Sv5w6x","type":"long_text","ref":"notes"}}],"ending":{"id":"DEFAULT","ref":"default_tys"}}}"#;

fn typeform_signature(body: &[u8]) -> String {
    let mac = hmac(TYPEFORM_SECRET, &[body]);
    format!(
        "sha256={}",
        base64::engine::general_purpose::STANDARD.encode(mac)
    )
}

#[tokio::test]
async fn a_signed_typeform_response_with_escaped_text_arrives_decoded_and_exact() {
    let app = spawn().await;
    let signature = typeform_signature(TYPEFORM_BODY.as_bytes());
    let response = post(
        &app,
        "/in/typeform",
        "application/json",
        &[("typeform-signature", signature)],
        TYPEFORM_BODY,
    )
    .await;
    assert_plain_200(response).await;
    let leads = app.received(1).await;
    assert_eq!(
        leads[0].payload,
        json!({
            "FirstName": "José",
            "LastName": "García Martínez",
            "Phone": [{"Number": "+34911234567", "Type": "work"}],
            "Email": [{"Address": "jose.garcia@example.es", "Type": "work"}],
            "OrgName": "Cerámicas del Sur S.L.",
            "Extra": [
                {"ID": "2000001", "Value": "CRM, Invoicing, Field service"},
                {"ID": "2000002", "Value": "11-50"},
                {"ID": "2000003", "Value": "spring"},
                {"ID": "2000004", "Value": "a3a12ec67a1365927098a606107fac15"},
                {"ID": "2000005", "Value": "lT4Z3j"},
                {"ID": "4444444", "Value": "notes: Call after 4pm — gracias\nutm_source: newsletter"}
            ]
        })
    );
}

#[tokio::test]
async fn a_typeform_request_with_a_forged_or_missing_signature_or_an_altered_byte_is_refused() {
    let app = spawn().await;
    let body = TYPEFORM_BODY.as_bytes();
    let forged = {
        let mac = hmac("not-the-secret", &[body]);
        format!(
            "sha256={}",
            base64::engine::general_purpose::STANDARD.encode(mac)
        )
    };
    let hex_not_base64 = format!("sha256={}", hex::encode(hmac(TYPEFORM_SECRET, &[body])));
    for headers in [
        vec![("typeform-signature", forged)],
        vec![("typeform-signature", hex_not_base64)],
        vec![],
    ] {
        let response = post(&app, "/in/typeform", "application/json", &headers, body).await;
        assert_forbidden(response).await;
    }
    // One byte changed after signing ("José" → "Josù").
    let altered = TYPEFORM_BODY.replacen(r"Jos\u00e9", r"Jos\u00f9", 1);
    assert_ne!(altered, TYPEFORM_BODY);
    let response = post(
        &app,
        "/in/typeform",
        "application/json",
        &[("typeform-signature", typeform_signature(body))],
        altered,
    )
    .await;
    assert_forbidden(response).await;
    assert_nothing_queued(&app).await;
}

#[tokio::test]
async fn a_typeform_response_delivered_twice_is_one_lead() {
    let app = spawn().await;
    let signature = typeform_signature(TYPEFORM_BODY.as_bytes());
    let mut ids = Vec::new();
    for _ in 0..2 {
        let response = post(
            &app,
            "/in/typeform",
            "application/json",
            &[("typeform-signature", signature.clone())],
            TYPEFORM_BODY,
        )
        .await;
        ids.push(assert_plain_200(response).await["ids"].clone());
    }
    assert_eq!(ids[0].as_array().map(Vec::len), Some(1), "{}", ids[0]);
    assert_eq!(ids[0], ids[1], "the redelivery names the first lead");
    app.received(1).await;
}

// ---- Unbounce ---------------------------------------------------------------------------

fn unbounce_body() -> String {
    unbounce_submission("liam.oconnor@example.co.uk", "10:57 PM UTC")
}

/// One Unbounce submission, as Unbounce posts it, from the given address at the given time.
fn unbounce_submission(email: &str, time_submitted: &str) -> String {
    let data = json!({
        "first_name": ["Liam"],
        "last_name": ["O'Connor"],
        "email": [email],
        "phone_number": ["020 7946 0734"],
        "company_name": ["Harbour Tech Ltd"],
        "how_did_you_hear": ["Podcast"],
        "interests": ["Pricing", "Demo"],
        "ip_address": ["203.0.113.7"],
        "page_uuid": ["0b7f1c2e-3d4a-4b5c-9e8f-7a6b5c4d3e2f"],
        "variant": ["b"],
        "time_submitted": [time_submitted],
        "date_submitted": ["2024-05-01"],
        "page_url": ["https://offers.example.co.uk/spring/"],
        "page_name": ["Spring Offer"]
    });
    serde_urlencoded(&[
        ("page_id", "0b7f1c2e-3d4a-4b5c-9e8f-7a6b5c4d3e2f"),
        ("page_url", "https://offers.example.co.uk/spring/"),
        ("page_name", "Spring Offer"),
        ("variant", "b"),
        ("data.json", &data.to_string()),
        ("data.xml", "<?xml version=\"1.0\"?><form_data></form_data>"),
    ])
}

const FORM: &str = "application/x-www-form-urlencoded";

#[tokio::test]
async fn an_unbounce_submission_with_the_key_in_the_url_arrives_exact() {
    let app = spawn().await;
    let path = format!("/in/unbounce?key={UNBOUNCE_KEY}");
    assert_plain_200(post(&app, &path, FORM, &[], unbounce_body()).await).await;
    let leads = app.received(1).await;
    assert_eq!(
        leads[0].payload,
        json!({
            "FirstName": "Liam",
            "LastName": "O'Connor",
            "Phone": [{"Number": "+442079460734", "Type": "work"}],
            "Email": [{"Address": "liam.oconnor@example.co.uk", "Type": "work"}],
            "OrgName": "Harbour Tech Ltd",
            "Extra": [
                {"ID": "3000001", "Value": "Podcast"},
                {"ID": "3000002", "Value": "0b7f1c2e-3d4a-4b5c-9e8f-7a6b5c4d3e2f"},
                {"ID": "3000003", "Value": "b"},
                {"ID": "4444444", "Value": "interests: Pricing, Demo"}
            ]
        })
    );
}

#[tokio::test]
async fn an_unbounce_submission_without_the_right_key_is_refused() {
    let app = spawn().await;
    for path in [
        "/in/unbounce".to_owned(),
        "/in/unbounce?key=".to_owned(),
        format!("/in/unbounce?key={UNBOUNCE_KEY}x"),
        format!("/in/unbounce?key={ELEMENTOR_KEY}"),
    ] {
        assert_forbidden(post(&app, &path, FORM, &[], unbounce_body()).await).await;
    }
    assert_nothing_queued(&app).await;
}

#[tokio::test]
async fn an_unbounce_submission_posted_twice_is_acknowledged_twice_and_is_one_lead() {
    let app = spawn().await;
    let path = format!("/in/unbounce?key={UNBOUNCE_KEY}");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let answer = assert_plain_200(post(&app, &path, FORM, &[], unbounce_body()).await).await;
        ids.push(answer["ids"].clone());
    }
    assert_eq!(ids[0].as_array().map(Vec::len), Some(1), "{}", ids[0]);
    assert_eq!(ids[0], ids[1], "the redelivery names the first lead");
    app.received(1).await;
    // Give a wrongly queued second copy the time to reach the simulator.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(app.sim.received().len(), 1);
    assert_eq!(app.stats().await.delivered, 1);
}

#[tokio::test]
async fn two_different_unbounce_submissions_are_two_leads() {
    let app = spawn().await;
    let path = format!("/in/unbounce?key={UNBOUNCE_KEY}");
    let submissions = [
        unbounce_submission("liam.oconnor@example.co.uk", "10:57 PM UTC"),
        // The same visitor, a minute later, with another address.
        unbounce_submission("liam@harbourtech.example.co.uk", "10:58 PM UTC"),
    ];
    let mut ids = Vec::new();
    for body in submissions {
        let answer = assert_plain_200(post(&app, &path, FORM, &[], body).await).await;
        ids.push(answer["ids"][0].as_str().unwrap().to_owned());
    }
    assert_ne!(ids[0], ids[1]);
    let leads = app.received(2).await;
    let mut emails: Vec<&str> = leads
        .iter()
        .map(|lead| lead.payload["Email"][0]["Address"].as_str().unwrap())
        .collect();
    emails.sort_unstable();
    assert_eq!(
        emails,
        [
            "liam.oconnor@example.co.uk",
            "liam@harbourtech.example.co.uk"
        ]
    );
}

#[tokio::test]
async fn an_unbounce_lead_with_only_a_first_name_and_an_invalid_email_is_repaired_counted_and_logged_masked()
 {
    // A form tool cannot fix its data: the lead is forwarded with what is valid — even from a
    // source whose `last_name_fallback = ""` would make a web form refuse it.
    let sim = Arc::new(start_sim(Vec::new()).await);
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[[source]]
id = "unbounce-repair"
kind = "webhook"
preset = "unbounce"
secret = "{UNBOUNCE_KEY}"
last_name_fallback = ""
unmapped_extra = "4444444"
[source.extra]
page_id = "3000002"
"#
    );
    let env = GatewayEnv::new(dir.path(), &sim, &text);
    let gateway = GatewayProcess::start(&env, &[]).await;
    let data = json!({
        "first_name": ["Siobhan"],
        "email": ["siobhan.kelly(at)example.ie"],
        "date_submitted": ["2024-05-02"],
        "time_submitted": ["09:14 AM UTC"]
    });
    let body = serde_urlencoded(&[
        ("page_id", "9d8c7b6a-0000-4000-8000-00000000c0de"),
        ("variant", "a"),
        ("data.json", &data.to_string()),
    ]);
    let response = client()
        .post(format!(
            "{}/in/unbounce-repair?key={UNBOUNCE_KEY}",
            gateway.base
        ))
        .header("content-type", FORM)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_plain_200(response).await;

    let leads = wait_received(&sim, 1, Duration::from_secs(20)).await;
    assert_eq!(
        leads[0].payload,
        json!({
            "FirstName": "Siobhan",
            "LastName": "-",
            "Extra": [
                {"ID": "3000002", "Value": "9d8c7b6a-0000-4000-8000-00000000c0de"},
                {"ID": "4444444", "Value": "email (invalid): siobhan.kelly(at)example.ie"}
            ]
        })
    );

    let metrics = gateway.metrics().await;
    assert_eq!(
        metrics.value(
            "leadgate_leads_repaired_total",
            &[("source", "unbounce-repair")]
        ),
        Some(1.0),
        "{}",
        metrics.text
    );

    let line = eventually(Duration::from_secs(10), "the repair warning", || async {
        gateway
            .log()
            .lines()
            .find(|line| line.contains("forwarded with what was valid"))
            .map(str::to_owned)
    })
    .await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("unbounce-repair"), "{line}");
    // Field names only: with a note to keep them in, the values are not logged at all.
    assert!(line.contains(r#"fields="email, "#), "{line}");
    assert!(line.contains("last_name"), "{line}");
    let log = gateway.log();
    assert!(!log.contains("siobhan.kelly"), "{log}");
    assert!(!log.contains("Siobhan"), "{log}");
}

// ---- Elementor --------------------------------------------------------------------------

#[tokio::test]
async fn the_same_elementor_post_sent_twice_is_one_lead() {
    let app = spawn().await;
    let body = serde_urlencoded(&[
        ("Name", "Élodie Martin"),
        ("Email", "elodie.martin@example.fr"),
        ("Date", "May 1, 2024"),
        ("Time", "10:00"),
        ("form_id", "7c1e2f3"),
    ]);
    let path = format!("/in/elementor?key={ELEMENTOR_KEY}");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let answer = assert_plain_200(post(&app, &path, FORM, &[], body.clone()).await).await;
        ids.push(answer["ids"].clone());
    }
    assert_eq!(ids[0], ids[1], "the second post names the first lead");
    app.received(1).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(app.sim.received().len(), 1);
}

/// Posts `body` twice to `path` and checks it became two leads, both delivered.
async fn posted_twice_is_two_leads(app: &TestApp, path: &str, body: String) {
    let mut ids = Vec::new();
    for _ in 0..2 {
        let answer = assert_plain_200(post(app, path, FORM, &[], body.clone()).await).await;
        ids.push(answer["ids"][0].as_str().unwrap().to_owned());
    }
    assert_ne!(ids[0], ids[1], "a second lead, not a redelivery");
    assert_eq!(app.received(2).await.len(), 2);
}

/// Without the Date and Time rows nothing tells a resent post from the visitor submitting the
/// same thing again, so both are leads.
#[tokio::test]
async fn the_same_elementor_content_without_date_and_time_sent_twice_is_two_leads() {
    let app = spawn().await;
    let body = serde_urlencoded(&[
        ("Name", "Élodie Martin"),
        ("Email", "elodie.martin@example.fr"),
        ("form_id", "7c1e2f3"),
    ]);
    posted_twice_is_two_leads(&app, &format!("/in/elementor?key={ELEMENTOR_KEY}"), body).await;
}

#[tokio::test]
async fn the_same_unbounce_content_without_its_submission_time_sent_twice_is_two_leads() {
    let app = spawn().await;
    let data = json!({
        "first_name": ["Liam"],
        "last_name": ["O'Connor"],
        "email": ["liam.oconnor@example.co.uk"],
    });
    let body = serde_urlencoded(&[
        ("page_id", "0b7f1c2e-3d4a-4b5c-9e8f-7a6b5c4d3e2f"),
        ("data.json", &data.to_string()),
    ]);
    posted_twice_is_two_leads(&app, &format!("/in/unbounce?key={UNBOUNCE_KEY}"), body).await;
}

#[tokio::test]
async fn an_elementor_simple_format_post_is_answered_exactly_200_and_arrives_exact() {
    let app = spawn().await;
    // What WordPress's http_build_query makes of Elementor's simple format: labels as keys,
    // then the metadata rows, then form_id and form_name.
    let body = serde_urlencoded(&[
        ("Name", "Élodie Martin"),
        ("Email", "elodie.martin@example.fr"),
        ("Phone", "01 23 45 67 89"),
        ("Message", "Bonjour, je voudrais un devis."),
        ("Date", "1 mai 2024"),
        ("Time", "10:00"),
        ("Page URL", "https://www.example.fr/contact/"),
        ("User Agent", "Mozilla/5.0"),
        ("Remote IP", "198.51.100.23"),
        ("Powered by", "Elementor"),
        ("form_id", "7c1e2f3"),
        ("form_name", "Formulaire de contact"),
    ]);
    let path = format!("/in/elementor?key={ELEMENTOR_KEY}");
    let response = post(
        &app,
        &path,
        "application/x-www-form-urlencoded; charset=UTF-8",
        &[],
        body,
    )
    .await;
    assert_plain_200(response).await;
    let leads = app.received(1).await;
    assert_eq!(
        leads[0].payload,
        json!({
            "FirstName": "Élodie",
            "LastName": "Martin",
            "Phone": [{"Number": "+33123456789", "Type": "work"}],
            "Email": [{"Address": "elodie.martin@example.fr", "Type": "work"}],
            "Extra": [
                {"ID": "4000001", "Value": "Bonjour, je voudrais un devis."},
                {"ID": "4000003", "Value": "Formulaire de contact"},
                {"ID": "4000004", "Value": "https://www.example.fr/contact/"}
            ]
        })
    );
}

#[tokio::test]
async fn an_elementor_advanced_format_post_with_the_key_header_arrives_exact() {
    let app = spawn().await;
    let body = serde_urlencoded(&[
        ("form[id]", "7c1e2f3"),
        ("form[name]", "Devis solaire"),
        ("fields[name][id]", "name"),
        ("fields[name][type]", "text"),
        ("fields[name][title]", "Nom"),
        ("fields[name][value]", "Hugo Lefèvre"),
        ("fields[name][raw_value]", "Hugo Lefèvre"),
        ("fields[name][required]", "1"),
        ("fields[email][id]", "email"),
        ("fields[email][type]", "email"),
        ("fields[email][title]", "E-mail"),
        ("fields[email][value]", "hugo.lefevre@example.fr"),
        ("fields[email][raw_value]", "hugo.lefevre@example.fr"),
        ("fields[email][required]", "1"),
        ("fields[field_3a9c][id]", "field_3a9c"),
        ("fields[field_3a9c][type]", "checkbox"),
        ("fields[field_3a9c][title]", "Intéressé par"),
        ("fields[field_3a9c][value]", "Panneaux, Batteries"),
        ("fields[field_3a9c][raw_value][0]", "Panneaux"),
        ("fields[field_3a9c][raw_value][1]", "Batteries"),
        ("fields[field_3a9c][required]", "0"),
        ("fields[message][id]", "message"),
        ("fields[message][type]", "textarea"),
        ("fields[message][title]", "Message"),
        ("fields[message][value]", "Toit orienté sud"),
        ("fields[message][required]", "0"),
        ("meta[date][title]", "Date"),
        ("meta[date][value]", "1 mai 2024"),
        ("meta[page_url][title]", "Page URL"),
        ("meta[page_url][value]", "https://www.example.fr/devis/"),
        ("meta[credit][title]", "Powered by"),
        ("meta[credit][value]", "Elementor"),
    ]);
    let response = post(
        &app,
        "/in/elementor",
        FORM,
        &[("x-leadgate-key", ELEMENTOR_KEY.to_owned())],
        body,
    )
    .await;
    assert_plain_200(response).await;
    let leads = app.received(1).await;
    assert_eq!(
        leads[0].payload,
        json!({
            "FirstName": "Hugo",
            "LastName": "Lefèvre",
            "Email": [{"Address": "hugo.lefevre@example.fr", "Type": "work"}],
            // `message` is read by its label, `Message`, because the sources file maps the
            // label: a form switched to the advanced format keeps its mapping.
            "Extra": [
                {"ID": "4000001", "Value": "Toit orienté sud"},
                {"ID": "4000002", "Value": "Panneaux, Batteries"},
                {"ID": "4000003", "Value": "Devis solaire"},
                {"ID": "4000004", "Value": "https://www.example.fr/devis/"}
            ]
        })
    );
}

#[tokio::test]
async fn a_sixty_field_elementor_advanced_post_is_answered_exactly_200_and_arrives_exact() {
    let app = spawn().await;
    // Six keys a field (id, type, title, value, raw_value, required) and sixteen of form and
    // metadata: 376 keys for 60 fields, far past the 200 a browser form may send.
    let mut fields: Vec<(String, String, String, String)> = vec![
        (
            "name".into(),
            "text".into(),
            "Nom".into(),
            "Camille Durand".into(),
        ),
        (
            "email".into(),
            "email".into(),
            "E-mail".into(),
            "camille.durand@example.fr".into(),
        ),
        (
            "phone".into(),
            "tel".into(),
            "Téléphone".into(),
            "06 12 34 56 78".into(),
        ),
        (
            "message".into(),
            "textarea".into(),
            "Message".into(),
            "Rappelez-moi".into(),
        ),
        (
            "field_3a9c".into(),
            "checkbox".into(),
            "Intéressé par".into(),
            "Batteries".into(),
        ),
    ];
    for n in 1..=55 {
        fields.push((
            format!("q{n:02}"),
            "text".into(),
            format!("Question {n}"),
            format!("Réponse {n}"),
        ));
    }
    assert_eq!(fields.len(), 60);
    let mut pairs: Vec<(String, String)> = vec![
        ("form[id]".into(), "7c1e2f3".into()),
        ("form[name]".into(), "Grand questionnaire".into()),
    ];
    for (id, kind, title, value) in &fields {
        for (part, text) in [
            ("id", id.as_str()),
            ("type", kind.as_str()),
            ("title", title.as_str()),
            ("value", value.as_str()),
            ("raw_value", value.as_str()),
            ("required", "0"),
        ] {
            pairs.push((format!("fields[{id}][{part}]"), text.to_owned()));
        }
    }
    for (key, title, value) in [
        ("date", "Date", "1 mai 2024"),
        ("time", "Time", "10:00"),
        (
            "page_url",
            "Page URL",
            "https://www.example.fr/questionnaire/",
        ),
        ("page_title", "Page Title", "Questionnaire"),
        ("user_agent", "User Agent", "Mozilla/5.0"),
        ("remote_ip", "Remote IP", "198.51.100.23"),
        ("credit", "Powered by", "Elementor"),
    ] {
        pairs.push((format!("meta[{key}][title]"), title.to_owned()));
        pairs.push((format!("meta[{key}][value]"), value.to_owned()));
    }
    assert_eq!(pairs.len(), 376);
    let pairs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let path = format!("/in/elementor?key={ELEMENTOR_KEY}");
    let response = post(&app, &path, FORM, &[], serde_urlencoded(&pairs)).await;
    let body = assert_plain_200(response).await;
    assert_eq!(body["ids"].as_array().unwrap().len(), 1, "{body}");

    let note: Vec<String> = (1..=55).map(|n| format!("q{n:02}: Réponse {n}")).collect();
    let leads = app.received(1).await;
    assert_eq!(
        leads[0].payload,
        json!({
            "FirstName": "Camille",
            "LastName": "Durand",
            "Phone": [{"Number": "+33612345678", "Type": "work"}],
            "Email": [{"Address": "camille.durand@example.fr", "Type": "work"}],
            "Extra": [
                {"ID": "4000001", "Value": "Rappelez-moi"},
                {"ID": "4000002", "Value": "Batteries"},
                {"ID": "4000003", "Value": "Grand questionnaire"},
                {"ID": "4000004", "Value": "https://www.example.fr/questionnaire/"},
                {"ID": "4444444", "Value": note.join("\n")}
            ]
        })
    );
}

#[tokio::test]
async fn an_elementor_post_without_the_key_is_refused() {
    let app = spawn().await;
    let body = serde_urlencoded(&[("Name", "Hugo Lefèvre"), ("Email", "hugo@example.fr")]);
    let wrong = vec![("x-leadgate-key", UNBOUNCE_KEY.to_owned())];
    for headers in [vec![], wrong] {
        assert_forbidden(post(&app, "/in/elementor", FORM, &headers, body.clone()).await).await;
    }
    assert_nothing_queued(&app).await;
}

// ---- Webflow ----------------------------------------------------------------------------

const WEBFLOW_BODY: &str = r#"{"triggerType":"form_submission","payload":{"name":"Contact Us","siteId":"65427cf400e02b306eaa049c","data":{"First Name":"Zo\u00eb","Last Name":"Bennett","email":"zoe.bennett@example.co.uk","Phone Number":442079460815,"Company":"Bennett & Co","Budget":5000},"schema":[{"fieldName":"First Name","fieldType":"FormTextInput","fieldElementId":"5f1a2b3c-0000-4000-8000-000000000001"},{"fieldName":"Last Name","fieldType":"FormTextInput","fieldElementId":"5f1a2b3c-0000-4000-8000-000000000002"},{"fieldName":"email","fieldType":"FormTextInput","fieldElementId":"5f1a2b3c-0000-4000-8000-000000000003"},{"fieldName":"Phone Number","fieldType":"FormTextInput","fieldElementId":"5f1a2b3c-0000-4000-8000-000000000004"},{"fieldName":"Company","fieldType":"FormTextInput","fieldElementId":"5f1a2b3c-0000-4000-8000-000000000005"},{"fieldName":"Budget","fieldType":"FormTextInput","fieldElementId":"5f1a2b3c-0000-4000-8000-000000000006"}],"submittedAt":"2024-05-01T10:00:00.000Z","id":"6632a8f0a0e1b2c3d4e5f601","formId":"65429eadebe8a9f3a30f62d0","formElementId":"4e038d2c-6a1f-8ebc-8e53-4a7e4b3c9a01"}}"#;

fn webflow_headers(secret: &str, timestamp_ms: i64, body: &str) -> Vec<(&'static str, String)> {
    let timestamp = timestamp_ms.to_string();
    let signature = hex::encode(hmac(secret, &[timestamp.as_bytes(), b":", body.as_bytes()]));
    vec![
        ("x-webflow-timestamp", timestamp),
        ("x-webflow-signature", signature),
    ]
}

#[tokio::test]
async fn a_signed_webflow_submission_with_number_values_arrives_exact() {
    let app = spawn().await;
    let now = chrono::Utc::now().timestamp_millis();
    let headers = webflow_headers(WEBFLOW_SECRET, now, WEBFLOW_BODY);
    let response = post(
        &app,
        "/in/webflow",
        "application/json",
        &headers,
        WEBFLOW_BODY,
    )
    .await;
    assert_plain_200(response).await;
    let leads = app.received(1).await;
    assert_eq!(
        leads[0].payload,
        json!({
            "FirstName": "Zoë",
            "LastName": "Bennett",
            "Phone": [{"Number": "+442079460815", "Type": "work"}],
            "Email": [{"Address": "zoe.bennett@example.co.uk", "Type": "work"}],
            "OrgName": "Bennett & Co",
            "Extra": [
                {"ID": "5000001", "Value": "5000"},
                {"ID": "5000002", "Value": "Contact Us"}
            ]
        })
    );
}

#[tokio::test]
async fn a_webflow_submission_with_a_stale_timestamp_or_a_bad_signature_is_refused() {
    let app = spawn().await;
    let now = chrono::Utc::now().timestamp_millis();
    let six_minutes = 6 * 60 * 1000;
    let mut moved_timestamp = webflow_headers(WEBFLOW_SECRET, now, WEBFLOW_BODY);
    moved_timestamp[0].1 = (now + 1).to_string();
    for headers in [
        // Correctly signed, but sent six minutes ago (a replay) or dated in the future.
        webflow_headers(WEBFLOW_SECRET, now - six_minutes, WEBFLOW_BODY),
        webflow_headers(WEBFLOW_SECRET, now + six_minutes, WEBFLOW_BODY),
        webflow_headers("another-apps-secret", now, WEBFLOW_BODY),
        moved_timestamp,
        vec![],
    ] {
        let response = post(
            &app,
            "/in/webflow",
            "application/json",
            &headers,
            WEBFLOW_BODY,
        )
        .await;
        assert_forbidden(response).await;
    }
    assert_nothing_queued(&app).await;
}

// ---- Jotform ----------------------------------------------------------------------------

fn multipart(boundary: &str, parts: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in parts {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

fn jotform_body(boundary: &str) -> Vec<u8> {
    let raw = json!({
        "slug": "submit/241234567890123",
        "jsExecutionTracker": "build-date-1714557600000=>init-started:1714557600100",
        "submitSource": "form",
        "buildDate": "1714557600000",
        "q3_name": {"first": "Noah", "last": "Fischer"},
        "q4_email": "noah.fischer@example.de",
        "q5_phoneNumber": {"full": "030 901820"},
        "q6_company": "Fischer Bau GmbH",
        "q7_interestedIn": ["Beratung", "Schulung"],
        "q8_preferredDate": {"month": "06", "day": "14", "year": "2024"},
        "q9_comments": "Bitte vormittags anrufen – danke!",
        "event_id": "1714557612345_241234567890123_abc1234",
        "timeToSubmit": "42",
        "validatedNewRequiredFieldIDs": "{\"new\":1}",
        "path": "/submit/241234567890123"
    });
    multipart(
        boundary,
        &[
            ("formID", "241234567890123"),
            ("submissionID", "5912345678901234567"),
            ("webhookURL", "https://leads.example.com/in/jotform?key=…"),
            ("ip", "192.0.2.44"),
            ("formTitle", "Kontaktformular"),
            (
                "pretty",
                "Name:Noah Fischer, E-Mail:noah.fischer@example.de",
            ),
            ("username", "fischerbau"),
            ("rawRequest", &raw.to_string()),
            ("type", "WEB"),
        ],
    )
}

#[tokio::test]
async fn a_jotform_multipart_submission_arrives_exact_and_its_redelivery_is_one_lead() {
    let app = spawn().await;
    let boundary = "------------------------d74496d66958873e";
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let path = format!("/in/jotform?key={JOTFORM_KEY}");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let response = post(&app, &path, &content_type, &[], jotform_body(boundary)).await;
        ids.push(assert_plain_200(response).await["ids"].clone());
    }
    assert_eq!(ids[0].as_array().map(Vec::len), Some(1), "{}", ids[0]);
    assert_eq!(ids[0], ids[1], "the redelivery names the first lead");
    let leads = app.received(1).await;
    assert_eq!(
        leads[0].payload,
        json!({
            "FirstName": "Noah",
            "LastName": "Fischer",
            "Phone": [{"Number": "+4930901820", "Type": "work"}],
            "Email": [{"Address": "noah.fischer@example.de", "Type": "work"}],
            "OrgName": "Fischer Bau GmbH",
            "Extra": [
                {"ID": "6000001", "Value": "Beratung, Schulung"},
                {"ID": "6000002", "Value": "2024-06-14"},
                {"ID": "6000003", "Value": "5912345678901234567"},
                {"ID": "4444444", "Value": "comments: Bitte vormittags anrufen – danke!"}
            ]
        })
    );
}

#[tokio::test]
async fn a_jotform_submission_without_the_key_is_refused() {
    let app = spawn().await;
    let boundary = "------------------------d74496d66958873e";
    let content_type = format!("multipart/form-data; boundary={boundary}");
    for path in ["/in/jotform", "/in/jotform?key=jotform-shared-key-000000"] {
        let response = post(&app, path, &content_type, &[], jotform_body(boundary)).await;
        assert_forbidden(response).await;
    }
    assert_nothing_queued(&app).await;
}
