//! Form and partner submissions travel the whole road and reach the simulator as the exact
//! Leadsin payload.

use serde_json::{Value, json};

use crate::helpers::app::{TestApp, serde_urlencoded};

fn multipart(boundary: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, filename, content) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(file) => body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

fn website_fields() -> Vec<(&'static str, &'static str)> {
    vec![
        ("name", "Ana María López"),
        ("email", "ana@example.com"),
        ("phone", "020 7946 0018"),
        ("company", "Ácme Ltd"),
        ("street", "1 High St"),
        ("zip", "SW1A 1AA"),
        ("city", "London"),
        ("state", "Greater London"),
        ("country", "UK"),
        ("budget", "10k-50k"),
        ("utm_campaign", "spring"),
        ("message", "Hola 👋 привет 你好"),
    ]
}

fn expected_website_payload() -> Value {
    json!({
        "FirstName": "Ana",
        "LastName": "María López",
        "Phone": [{"Number": "+442079460018", "Type": "mobile"}],
        "Email": [{"Address": "ana@example.com", "Type": "work"}],
        "OrgName": "Ácme Ltd",
        "AddressLine1": "1 High St",
        "Postcode": "SW1A 1AA",
        "City": "London",
        "Region": "Greater London",
        "Country": "UK",
        "Extra": [
            {"ID": "1111111", "Value": "10k-50k"},
            {"ID": "2222222", "Value": "spring"},
            {"ID": "3333333", "Value": "Website form"},
            {"ID": "4444444", "Value": "message: Hola 👋 привет 你好"}
        ]
    })
}

#[tokio::test]
async fn urlencoded_form_arrives_as_the_exact_leadsin_payload() {
    let app = TestApp::spawn().await;
    let response = app.post_form("website", &website_fields()).await;
    assert_eq!(response.status(), 303);
    assert_eq!(
        response.headers()["location"],
        "https://www.example.com/thanks"
    );
    let leads = app.received(1).await;
    assert_eq!(leads[0].payload, expected_website_payload());
}

#[tokio::test]
async fn json_form_post_gets_202_with_an_id_and_the_same_payload() {
    let app = TestApp::spawn().await;
    let body: serde_json::Map<String, Value> = website_fields()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
        .collect();
    let response = app.post_json("website", &Value::Object(body)).await;
    assert_eq!(response.status(), 202);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["status"], "queued");
    assert_eq!(answer["id"].as_str().unwrap().len(), 26, "a ULID: {answer}");
    let leads = app.received(1).await;
    assert_eq!(leads[0].payload, expected_website_payload());
}

#[tokio::test]
async fn multipart_form_with_a_file_part_forwards_the_text_fields_only() {
    let app = TestApp::spawn().await;
    let boundary = "----leadgateTestBoundary7MA4YWxk";
    let fields = website_fields();
    let mut parts: Vec<(&str, Option<&str>, &[u8])> = fields
        .iter()
        .map(|(k, v)| (*k, None, v.as_bytes()))
        .collect();
    let file = vec![0u8, 159, 146, 150, 255, 10, 13, 45, 45];
    parts.insert(3, ("cv", Some("cv.pdf"), &file));
    let response = app
        .http
        .post(app.url("/in/website"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .header("accept", "application/json")
        .body(multipart(boundary, &parts))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let leads = app.received(1).await;
    assert_eq!(leads[0].payload, expected_website_payload());
}

#[tokio::test]
async fn iso_8859_1_form_is_decoded_by_its_charset() {
    let app = TestApp::spawn().await;
    // "José Muñoz", "Málaga" in ISO-8859-1, percent-encoded byte by byte.
    let body = "name=Jos%E9+Mu%F1oz&email=jose%40example.es&city=M%E1laga";
    let response = app
        .http
        .post(app.url("/in/website"))
        .header(
            "content-type",
            "application/x-www-form-urlencoded; charset=ISO-8859-1",
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303);
    let leads = app.received(1).await;
    assert_eq!(
        leads[0].payload,
        json!({
            "FirstName": "José",
            "LastName": "Muñoz",
            "Email": [{"Address": "jose@example.es", "Type": "work"}],
            "City": "Málaga",
            "Extra": [{"ID": "3333333", "Value": "Website form"}]
        })
    );
}

#[tokio::test]
async fn repeated_keys_and_bracketed_names_keep_every_value() {
    let app = TestApp::spawn().await;
    let body = serde_urlencoded(&[
        ("first_name", "Li"),
        ("last_name", "Wei"),
        ("interest[]", "pricing"),
        ("interest[]", "demo"),
        ("utm_campaign", "a"),
        ("utm_campaign", "b"),
        ("email", "li@example.com"),
        ("email", "wei@example.org"),
    ]);
    let response = app
        .http
        .post(app.url("/in/website"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303);
    let lead = &app.received(1).await[0].payload;
    assert_eq!(
        *lead,
        json!({
            "FirstName": "Li",
            "LastName": "Wei",
            "Email": [
                {"Address": "li@example.com", "Type": "work"},
                {"Address": "wei@example.org", "Type": "work"}
            ],
            "Extra": [
                {"ID": "2222222", "Value": "a, b"},
                {"ID": "3333333", "Value": "Website form"},
                {"ID": "4444444", "Value": "interest: pricing, demo"}
            ]
        })
    );
}

#[tokio::test]
async fn a_single_name_gets_the_fallback_last_name() {
    let app = TestApp::spawn().await;
    let response = app
        .post_form(
            "website",
            &[("name", "Cher"), ("email", "cher@example.com")],
        )
        .await;
    assert_eq!(response.status(), 303);
    let lead = &app.received(1).await[0].payload;
    assert_eq!(lead["FirstName"], "Cher");
    assert_eq!(lead["LastName"], "-");
}

#[tokio::test]
async fn next_field_is_honoured_only_for_an_allowed_origin() {
    let app = TestApp::spawn().await;
    let allowed = app
        .post_form(
            "website",
            &[
                ("name", "Ana Ruiz"),
                ("_next", "https://www.example.com/merci?x=1"),
            ],
        )
        .await;
    assert_eq!(allowed.status(), 303);
    assert_eq!(
        allowed.headers()["location"],
        "https://www.example.com/merci?x=1"
    );
    let foreign = app
        .post_form(
            "website",
            &[
                ("name", "Ana Ruiz"),
                ("_next", "https://evil.example/phish"),
            ],
        )
        .await;
    assert_eq!(foreign.status(), 303);
    assert_eq!(
        foreign.headers()["location"],
        "https://www.example.com/thanks"
    );
    let leads = app.received(2).await;
    assert!(
        leads
            .iter()
            .all(|l| !l.payload.to_string().contains("_next")),
        "control fields are never forwarded"
    );
}

#[tokio::test]
async fn partner_leadsin_shaped_body_is_forwarded_with_constants() {
    let app = TestApp::spawn().await;
    let body = json!({
        "FirstName": "Jordi",
        "LastName": "Puig i Ferrer",
        "OrgName": "Cooperativa Ñ",
        "Email": [{"Address": "jordi@example.cat", "Type": "home"}],
        "Phone": [{"Number": "912 345 678", "Type": "work"}],
        "Extra": [{"ID": "7777777", "Value": "VIP"}]
    });
    let response = app.post_partner(&body).await;
    assert_eq!(response.status(), 202);
    let lead = &app.received(1).await[0].payload;
    assert_eq!(
        *lead,
        json!({
            "FirstName": "Jordi",
            "LastName": "Puig i Ferrer",
            "OrgName": "Cooperativa Ñ",
            "Email": [{"Address": "jordi@example.cat", "Type": "home"}],
            "Phone": [{"Number": "+34912345678", "Type": "work"}],
            "Extra": [{"ID": "7777777", "Value": "VIP"}, {"ID": "6666666", "Value": "Partner ACME"}]
        })
    );
}

#[tokio::test]
async fn partner_flat_body_uses_the_partner_mapping() {
    let app = TestApp::spawn().await;
    let body =
        json!({"first_name": "Marta", "last_name": "Gil", "phone": "612345678", "campaign": 2026});
    let response = app.post_partner(&body).await;
    assert_eq!(response.status(), 202);
    let lead = &app.received(1).await[0].payload;
    assert_eq!(
        lead["Phone"],
        json!([{"Number": "+34612345678", "Type": "work"}])
    );
    assert_eq!(
        lead["Extra"],
        json!([{"ID": "5555555", "Value": "2026"}, {"ID": "6666666", "Value": "Partner ACME"}])
    );
}

#[tokio::test]
async fn idempotency_key_replay_returns_the_first_answer_and_one_lead() {
    let app = TestApp::spawn().await;
    let body = json!({"FirstName": "Iker", "LastName": "Casas"});
    let send = || {
        app.http
            .post(app.url("/in/acme"))
            .bearer_auth(crate::helpers::app::PARTNER_KEY)
            .header("idempotency-key", "order-42")
            .json(&body)
            .send()
    };
    let first: Value = send().await.unwrap().json().await.unwrap();
    let second = send().await.unwrap();
    assert_eq!(second.status(), 202);
    let second: Value = second.json().await.unwrap();
    assert_eq!(first, second);
    app.received(1).await;
    // Give a second lead time to show up if one had been queued.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(app.sim.received().len(), 1);
}

#[tokio::test]
async fn a_wildcard_origin_opens_cors_but_never_redirects_elsewhere() {
    let sources = crate::helpers::app::default_sources().replacen(
        "allowed_origins = [\"https://www.example.com\"]",
        "allowed_origins = [\"*\"]",
        1,
    );
    let app = TestApp::spawn_with(&sources, |_| {}).await;
    let response = app
        .post_form(
            "website",
            &[
                ("name", "Ana Ruiz"),
                ("_next", "https://phish.example/login"),
            ],
        )
        .await;
    assert_eq!(response.status(), 303);
    assert_eq!(
        response.headers()["location"],
        "https://www.example.com/thanks"
    );
}

/// Every value of `name` in the answer's headers.
fn header_values(response: &reqwest::Response, name: &str) -> Vec<String> {
    response
        .headers()
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

async fn preflight(app: &TestApp, origin: &str, method: &str) -> reqwest::Response {
    app.http
        .request(reqwest::Method::OPTIONS, app.url("/in/website"))
        .header("origin", origin)
        .header("access-control-request-method", method)
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_preflight_from_an_allowed_origin_is_granted_with_vary_origin() {
    let app = TestApp::spawn().await;
    let granted = preflight(&app, "https://www.example.com", "POST").await;
    assert_eq!(granted.status(), 204);
    assert_eq!(
        header_values(&granted, "access-control-allow-origin"),
        ["https://www.example.com"],
        "the origin is echoed, never *"
    );
    assert_eq!(
        header_values(&granted, "access-control-allow-methods"),
        ["POST, OPTIONS"]
    );
    let allowed_headers = header_values(&granted, "access-control-allow-headers").join(",");
    for needed in ["Content-Type", "Accept", "Idempotency-Key"] {
        assert!(allowed_headers.contains(needed), "{allowed_headers}");
    }
    assert_eq!(header_values(&granted, "vary"), ["Origin"]);
}

#[tokio::test]
async fn a_preflight_from_a_foreign_origin_is_refused_without_allow_origin() {
    let app = TestApp::spawn().await;
    for origin in [
        "https://evil.example",
        "https://www.example.com.evil.example",
        "http://www.example.com",
    ] {
        let refused = preflight(&app, origin, "POST").await;
        assert_eq!(refused.status(), 403, "{origin}");
        assert!(
            header_values(&refused, "access-control-allow-origin").is_empty(),
            "{origin} is not granted"
        );
        assert!(header_values(&refused, "access-control-allow-methods").is_empty());
        assert_eq!(header_values(&refused, "vary"), ["Origin"]);
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["code"], "origin_not_allowed", "{body}");
    }
    // An allowed page asking for another method than POST is not granted it: it is told the
    // methods it may use, which do not include the one it asked for.
    let other_method = preflight(&app, "https://www.example.com", "DELETE").await;
    assert_eq!(other_method.status(), 405);
    assert_eq!(
        header_values(&other_method, "access-control-allow-methods"),
        ["POST, OPTIONS"]
    );
    assert_eq!(header_values(&other_method, "allow"), ["POST, OPTIONS"]);
    assert_eq!(header_values(&other_method, "vary"), ["Origin"]);
}

#[tokio::test]
async fn answers_echo_only_an_allowed_origin_and_always_vary_on_origin() {
    let app = TestApp::spawn().await;
    let post = |origin: Option<&'static str>, body: Value| {
        let mut request = app.http.post(app.url("/in/website")).json(&body);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        request.send()
    };
    let allowed = post(Some("https://www.example.com"), json!({"name": "Ana Ruiz"}))
        .await
        .unwrap();
    assert_eq!(allowed.status(), 202);
    assert_eq!(
        header_values(&allowed, "access-control-allow-origin"),
        ["https://www.example.com"]
    );
    assert_eq!(header_values(&allowed, "vary"), ["Origin"]);

    // An error answer to an allowed page carries the grant too, so its script can read it.
    let invalid = post(
        Some("https://www.example.com"),
        json!({"email": "ana@example.com"}),
    )
    .await
    .unwrap();
    assert_eq!(invalid.status(), 422);
    assert_eq!(
        header_values(&invalid, "access-control-allow-origin"),
        ["https://www.example.com"]
    );
    assert_eq!(header_values(&invalid, "vary"), ["Origin"]);

    let foreign = post(Some("https://evil.example"), json!({"name": "Ana Ruiz"}))
        .await
        .unwrap();
    assert_eq!(foreign.status(), 403);
    assert!(header_values(&foreign, "access-control-allow-origin").is_empty());
    assert_eq!(header_values(&foreign, "vary"), ["Origin"]);

    let no_origin = post(None, json!({"name": "Ana Ruiz"})).await.unwrap();
    assert_eq!(no_origin.status(), 202);
    assert!(header_values(&no_origin, "access-control-allow-origin").is_empty());
    assert_eq!(header_values(&no_origin, "vary"), ["Origin"]);
    app.received(2).await;
}

#[tokio::test]
async fn control_characters_are_stripped_and_cannot_forge_lines_in_the_unmapped_note() {
    let app = TestApp::spawn().await;
    let response = app
        .post_form(
            "website",
            &[
                ("name", "Ana\u{0} María\r\nLópez"),
                ("email", "ana@example.com\u{7}"),
                ("company", "Acme\tLtd\u{9b}"),
                ("budget", "10k\r\n50k"),
                ("message", "Hello\r\nutm_campaign: forged\u{85}x"),
                ("evil\nkey", "v"),
            ],
        )
        .await;
    assert_eq!(response.status(), 303);
    let lead = &app.received(1).await[0].payload;
    assert_eq!(
        *lead,
        json!({
            "FirstName": "Ana",
            "LastName": "María López",
            "Email": [{"Address": "ana@example.com", "Type": "work"}],
            "OrgName": "Acme Ltd",
            "Extra": [
                {"ID": "1111111", "Value": "10k\n50k"},
                {"ID": "3333333", "Value": "Website form"},
                {"ID": "4444444", "Value": "message: Hello utm_campaign: forged x\nevil key: v"}
            ]
        })
    );
}

#[tokio::test]
async fn invisible_characters_are_stripped_on_entry_and_emoji_joiners_survive() {
    let app = TestApp::spawn().await;
    let family = "\u{1f468}\u{200d}\u{1f469}\u{200d}\u{1f467}";
    let body = json!({
        "first_name": "Ana\u{202e}",
        "last_name": "\u{2066}L\u{f3}pez\u{2069}\u{feff}",
        "email": "x@example.com\u{200b}",
        "company": format!("Acme {family}"),
    });
    let response = app.post_json("website", &body).await;
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let lead = &app.received(1).await[0].payload;
    assert_eq!(lead["FirstName"], "Ana", "{lead}");
    assert_eq!(lead["LastName"], "L\u{f3}pez", "{lead}");
    assert_eq!(
        lead["Email"],
        json!([{"Address": "x@example.com", "Type": "work"}])
    );
    assert_eq!(lead["OrgName"], format!("Acme {family}"), "{lead}");

    // A joiner is kept in text, but has no place in an address.
    let body = json!({"name": "Ana Lopez", "email": "x\u{200d}@example.com"});
    let response = app.post_json("website", &body).await;
    assert_eq!(response.status(), 422);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "validation_failed", "{error}");
    assert!(error["error"]["fields"]["email"].is_array(), "{error}");
}
