//! Bad input gets a precise 4xx with a stable code and nothing is queued.

use serde_json::{Value, json};

use crate::helpers::app::{PARTNER_KEY, TestApp};

async fn assert_error(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status(), status, "expected {status} {code}");
    let body: Value = response.json().await.expect("a JSON error document");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

async fn assert_nothing_queued(app: &TestApp) {
    let stats = app.stats().await;
    assert_eq!(
        stats.ready + stats.leased + stats.delayed + stats.dead,
        0,
        "{stats:?}"
    );
    assert!(app.sim.received().is_empty());
}

#[tokio::test]
async fn malformed_json_is_400_malformed_body() {
    let app = TestApp::spawn().await;
    let response = app
        .http
        .post(app.url("/in/website"))
        .header("content-type", "application/json")
        .body("{\"name\": \"Ana\",")
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "malformed_body").await;
    assert_nothing_queued(&app).await;
}

#[tokio::test]
async fn wrong_content_type_is_415() {
    let app = TestApp::spawn().await;
    let response = app
        .http
        .post(app.url("/in/website"))
        .header("content-type", "text/plain")
        .header("accept", "application/json")
        .body("name=Ana")
        .send()
        .await
        .unwrap();
    assert_error(response, 415, "unsupported_media_type").await;
    let partner_form = app
        .http
        .post(app.url("/in/acme"))
        .bearer_auth(PARTNER_KEY)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("first_name=Ana&last_name=Ruiz")
        .send()
        .await
        .unwrap();
    assert_error(partner_form, 415, "unsupported_media_type").await;
    assert_nothing_queued(&app).await;
}

#[tokio::test]
async fn no_name_at_all_is_422_name_required() {
    let app = TestApp::spawn().await;
    let response = app
        .post_json(
            "website",
            &json!({"email": "ana@example.com", "company": "Acme"}),
        )
        .await;
    assert_error(response, 422, "name_required").await;
    assert_nothing_queued(&app).await;
}

#[tokio::test]
async fn invalid_email_is_422_with_a_message_for_that_field() {
    let app = TestApp::spawn().await;
    let response = app
        .post_json(
            "website",
            &json!({"name": "Ana Ruiz", "email": "ana.example.com"}),
        )
        .await;
    let body = assert_error(response, 422, "validation_failed").await;
    let messages = body["error"]["fields"]["email"]
        .as_array()
        .expect("a message for email");
    assert!(!messages.is_empty());
    assert!(
        !body.to_string().contains("ana.example.com"),
        "values are not echoed: {body}"
    );
    assert_nothing_queued(&app).await;
}

#[tokio::test]
async fn browser_post_with_an_invalid_email_gets_a_readable_page() {
    let app = TestApp::spawn().await;
    let response = app
        .post_form("website", &[("name", "Ana Ruiz"), ("email", "nope")])
        .await;
    assert_eq!(response.status(), 422);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = response.text().await.unwrap();
    assert!(page.contains("Please check the form"), "{page}");
    assert!(page.contains("email"), "{page}");
    assert_nothing_queued(&app).await;
}

#[tokio::test]
async fn oversize_body_is_413_whether_declared_or_chunked() {
    let app = TestApp::spawn().await;
    let big = format!("name=Ana+Ruiz&message={}", "x".repeat(70 * 1024));
    let declared = app
        .http
        .post(app.url("/in/website"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("accept", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_error(declared, 413, "payload_too_large").await;

    // No Content-Length: the body streams in chunks and is refused once past the limit.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big
        .into_bytes()
        .chunks(8 * 1024)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let chunked = app
        .http
        .post(app.url("/in/website"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("accept", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_error(chunked, 413, "payload_too_large").await;
    assert_nothing_queued(&app).await;
}

#[tokio::test]
async fn a_bad_or_missing_bearer_key_is_401() {
    let app = TestApp::spawn().await;
    let body = json!({"FirstName": "Ana", "LastName": "Ruiz"});
    let wrong = app
        .http
        .post(app.url("/in/acme"))
        .bearer_auth("acme-partner-key-0123456788")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.headers()["www-authenticate"], "Bearer");
    assert_error(wrong, 401, "unauthorized").await;
    let missing = app
        .http
        .post(app.url("/in/acme"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_error(missing, 401, "unauthorized").await;
    let basic = app
        .http
        .post(app.url("/in/acme"))
        .basic_auth("acme", Some(PARTNER_KEY))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_error(basic, 401, "unauthorized").await;
    assert_nothing_queued(&app).await;
}

#[tokio::test]
async fn an_unknown_source_is_a_404_json_error() {
    let app = TestApp::spawn().await;
    let response = app.post_json("nope", &json!({"name": "Ana Ruiz"})).await;
    assert_error(response, 404, "unknown_source").await;
    assert_nothing_queued(&app).await;
}

#[tokio::test]
async fn a_page_on_a_foreign_origin_may_not_post() {
    let app = TestApp::spawn().await;
    let response = app
        .http
        .post(app.url("/in/website"))
        .header("origin", "https://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("accept", "application/json")
        .body("name=Ana+Ruiz")
        .send()
        .await
        .unwrap();
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    assert_error(response, 403, "origin_not_allowed").await;
    assert_nothing_queued(&app).await;
}

/// The default sources with the website form limited to 2 requests a minute per client.
fn two_per_minute_per_ip() -> String {
    crate::helpers::app::default_sources().replacen(
        "per_ip = \"off\"\ntotal = \"off\"",
        "per_ip = \"2/minute\"\ntotal = \"off\"",
        1,
    )
}

#[tokio::test]
async fn the_per_address_rate_limit_answers_429_with_retry_after() {
    let app = TestApp::spawn_with(&two_per_minute_per_ip(), |_| {}).await;
    for _ in 0..2 {
        let ok = app.post_json("website", &json!({"name": "Ana Ruiz"})).await;
        assert_eq!(ok.status(), 202);
    }
    let limited = app.post_json("website", &json!({"name": "Ana Ruiz"})).await;
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_error(limited, 429, "rate_limited").await;
    app.received(2).await;
}

#[tokio::test]
async fn requests_with_bad_keys_do_not_spend_a_partner_s_rate_budget() {
    let sources = crate::helpers::app::default_sources().replacen(
        "[source.limits]\ntotal = \"off\"",
        "[source.limits]\ntotal = \"3/minute\"",
        1,
    );
    let app = TestApp::spawn_with(&sources, |_| {}).await;
    let body = json!({"FirstName": "Ana", "LastName": "Ruiz"});
    for _ in 0..10 {
        let forged = app
            .http
            .post(app.url("/in/acme"))
            .bearer_auth("not-the-partner-key-000")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(forged.status(), 401);
    }
    for _ in 0..3 {
        assert_eq!(
            app.post_partner(&body).await.status(),
            202,
            "the partner's budget is intact"
        );
    }
    assert_eq!(app.post_partner(&body).await.status(), 429);
}

/// Posts a JSON lead as if through a proxy that says the client is `client`.
async fn post_forwarded_for(app: &TestApp, client: &str) -> reqwest::Response {
    app.http
        .post(app.url("/in/website"))
        .header("x-forwarded-for", client)
        .json(&json!({"name": "Ana Ruiz"}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_rate_budget() {
    let app = TestApp::spawn_with(&two_per_minute_per_ip(), |env| {
        env.set("LEADGATE_TRUSTED_PROXIES", "127.0.0.1/32");
    })
    .await;
    for _ in 0..2 {
        assert_eq!(post_forwarded_for(&app, "198.51.100.1").await.status(), 202);
    }
    let limited = post_forwarded_for(&app, "198.51.100.1").await;
    assert_error(limited, 429, "rate_limited").await;
    // Another client behind the same proxy, and the proxy's own hop appended after it.
    assert_eq!(post_forwarded_for(&app, "198.51.100.2").await.status(), 202);
    assert_eq!(
        post_forwarded_for(&app, "198.51.100.2, 127.0.0.1")
            .await
            .status(),
        202
    );
    assert_error(
        post_forwarded_for(&app, "198.51.100.2").await,
        429,
        "rate_limited",
    )
    .await;
    app.received(4).await;
}

#[tokio::test]
async fn without_trusted_proxies_x_forwarded_for_is_ignored_and_the_peer_s_budget_is_shared() {
    let app = TestApp::spawn_with(&two_per_minute_per_ip(), |env| {
        env.unset("LEADGATE_TRUSTED_PROXIES");
    })
    .await;
    assert_eq!(post_forwarded_for(&app, "198.51.100.1").await.status(), 202);
    assert_eq!(post_forwarded_for(&app, "198.51.100.2").await.status(), 202);
    // A third "client" is the same peer: claiming another address buys no budget.
    let limited = post_forwarded_for(&app, "198.51.100.3").await;
    assert_error(limited, 429, "rate_limited").await;
    app.received(2).await;
}

/// Sends `head` (ending in the blank line) and `body` on a fresh connection and reads until the
/// gateway closes it, or 5 s pass.
async fn raw_exchange(app: &TestApp, head: &str, body: &[u8]) -> (String, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(app.gateway().addr())
        .await
        .unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut answer),
    )
    .await
    .is_ok();
    (String::from_utf8_lossy(&answer).into_owned(), closed)
}

#[tokio::test]
async fn content_length_with_chunked_transfer_encoding_is_400_and_the_connection_is_closed() {
    let app = TestApp::spawn().await;
    let addr = app.gateway().addr();
    let body = "name=Ana+Ruiz";
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let head = format!(
        "POST /in/website HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Accept: application/json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let (answer, closed) = raw_exchange(&app, &head, chunked.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"ambiguous_length\""), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(closed, "the connection stays open: {answer}");
    assert_eq!(
        answer.matches("HTTP/1.1 ").count(),
        1,
        "one request, one answer: {answer}"
    );
    assert_nothing_queued(&app).await;

    // On a source that does not exist too: the connection is not trusted to carry on.
    let head = format!(
        "POST /in/nope HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let (answer, closed) = raw_exchange(&app, &head, chunked.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(closed, "the connection stays open: {answer}");

    // Chunked alone is fine.
    let head = format!(
        "POST /in/website HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Accept: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    let (answer, _) = raw_exchange(&app, &head, chunked.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
}

#[tokio::test]
async fn a_content_encoding_other_than_identity_is_415_unsupported_encoding() {
    let app = TestApp::spawn().await;
    // A gzip-compressed `{"name":"Ana Lopez"}`: read as plain it would be a misleading 422.
    let gzip: &[u8] = &[
        0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x03, 0xab, 0x56, 0xca, 0x4b, 0xcc,
        0x4d, 0x55, 0xb2, 0x52, 0x72, 0xcc, 0x4b, 0x54, 0xf0, 0xc9, 0x2f, 0x48, 0xad, 0x52, 0xaa,
        0x05, 0x00, 0x17, 0xcd, 0xa1, 0x3b, 0x14, 0x00, 0x00, 0x00,
    ];
    let long = format!("x-{}\"<", "z".repeat(5000));
    for (encoding, body, shown) in [
        ("gzip", gzip.to_vec(), "\"gzip\"".to_owned()),
        (
            "foo",
            b"{\"name\":\"Ana Lopez\"}".to_vec(),
            "\"foo\"".to_owned(),
        ),
        (
            "identity, br",
            b"{\"name\":\"Ana Lopez\"}".to_vec(),
            "\"identity, br\"".to_owned(),
        ),
        (
            long.as_str(),
            b"{\"name\":\"Ana Lopez\"}".to_vec(),
            format!("\"x-{}\"", "z".repeat(58)),
        ),
    ] {
        let response = app
            .http
            .post(app.url("/in/website"))
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .body(body)
            .send()
            .await
            .unwrap();
        let error = assert_error(response, 415, "unsupported_encoding").await;
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(&shown), "{encoding:.20}: {message}");
        assert!(message.len() < 200, "{message}");
    }
    assert_nothing_queued(&app).await;

    // `identity` is the absence of an encoding.
    let response = app
        .http
        .post(app.url("/in/website"))
        .header("content-type", "application/json")
        .header("content-encoding", "Identity")
        .body("{\"name\":\"Ana Lopez\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}

#[tokio::test]
async fn an_unknown_source_s_message_quotes_at_most_60_characters_of_its_id() {
    let app = TestApp::spawn().await;
    let id = "a".repeat(5000);
    for method in [
        reqwest::Method::POST,
        reqwest::Method::GET,
        reqwest::Method::OPTIONS,
    ] {
        let response = app
            .http
            .request(method.clone(), app.url(&format!("/in/{id}")))
            .header("content-type", "application/json")
            .body("{\"name\":\"Ana Ruiz\"}")
            .send()
            .await
            .unwrap();
        let error = assert_error(response, 404, "unknown_source").await;
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("\"{}\"", "a".repeat(60))) && message.len() < 120,
            "{method}: {} bytes: {message:.100}",
            message.len()
        );
    }
}
