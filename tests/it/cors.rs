//! What browsers and HTTP clients see around the lead itself: the gateway's own origin (scheme,
//! host and port), CORS preflights and the headers a page's script may read, `405` with
//! `Allow`, and `HEAD` on the health routes.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::app::TestApp;

async fn post_from(app: &TestApp, origin: &str, extra: &[(&str, &str)]) -> reqwest::Response {
    let mut request = app
        .http
        .post(app.url("/in/website"))
        .header("origin", origin)
        .json(&json!({"name": "Ana Ruiz"}));
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn only_the_gateway_s_own_scheme_host_and_port_count_as_its_own_origin() {
    let app = TestApp::spawn().await;
    let port = app.gateway().addr().port();
    assert_eq!(
        post_from(&app, &format!("http://127.0.0.1:{port}"), &[])
            .await
            .status(),
        202
    );
    for foreign in [
        format!("https://127.0.0.1:{port}"),
        format!("http://127.0.0.1:{}", port + 1),
        format!("http://localhost:{port}"),
    ] {
        let response = post_from(&app, &foreign, &[]).await;
        assert_eq!(response.status(), 403, "{foreign}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "origin_not_allowed", "{foreign}");
    }
    // X-Forwarded-Proto from a peer that is not a trusted proxy changes nothing.
    let claimed = post_from(
        &app,
        &format!("https://127.0.0.1:{port}"),
        &[("x-forwarded-proto", "https")],
    )
    .await;
    assert_eq!(claimed.status(), 403);
    app.received(1).await;
}

#[tokio::test]
async fn behind_a_trusted_tls_proxy_the_own_origin_is_https() {
    let app = TestApp::spawn_with(&crate::helpers::app::default_sources(), |env| {
        env.set("LEADGATE_TRUSTED_PROXIES", "127.0.0.1/32");
    })
    .await;
    let proxied = [
        ("host", "leads.example.org"),
        ("x-forwarded-proto", "https"),
    ];
    assert_eq!(
        post_from(&app, "https://leads.example.org", &proxied)
            .await
            .status(),
        202
    );
    assert_eq!(
        post_from(&app, "http://leads.example.org", &proxied)
            .await
            .status(),
        403,
        "the page's scheme must be the one the proxy was reached by"
    );
    assert_eq!(
        post_from(
            &app,
            "https://leads.example.org",
            &[("host", "leads.example.org")]
        )
        .await
        .status(),
        403,
        "without X-Forwarded-Proto the gateway was reached over http"
    );
    app.received(1).await;
}

async fn preflight(app: &TestApp, origin: &str, method: &str) -> reqwest::Response {
    app.http
        .request(reqwest::Method::OPTIONS, app.url("/in/website"))
        .header("origin", origin)
        .header("access-control-request-method", method)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_preflight_for_a_method_other_than_post_is_told_which_methods_are_allowed() {
    let app = TestApp::spawn().await;
    let granted = preflight(&app, "https://www.example.com", "POST").await;
    assert_eq!(granted.status(), 204);
    assert_eq!(
        granted.headers()["access-control-allow-methods"],
        "POST, OPTIONS"
    );

    let put = preflight(&app, "https://www.example.com", "PUT").await;
    assert_eq!(put.status(), 405);
    assert_eq!(put.headers()["allow"], "POST, OPTIONS");
    assert_eq!(
        put.headers()["access-control-allow-methods"],
        "POST, OPTIONS"
    );
    assert_eq!(
        put.headers()["access-control-allow-origin"],
        "https://www.example.com"
    );
    assert_eq!(put.headers()["vary"], "Origin");
    let body: Value = put.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("POST, OPTIONS"),
        "{body}"
    );

    // A foreign origin is refused for its origin, whatever the method.
    let foreign = preflight(&app, "https://evil.example", "PUT").await;
    assert_eq!(foreign.status(), 403);
    assert!(
        foreign
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

#[tokio::test]
async fn cors_answers_expose_the_headers_a_script_needs() {
    let app = TestApp::spawn().await;
    let send = || {
        app.http
            .post(app.url("/in/website"))
            .header("origin", "https://www.example.com")
            .header("idempotency-key", "cors-replay-1")
            .json(&json!({"name": "Ana Ruiz"}))
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), 202);
    let replay = send().await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let exposed = replay.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        exposed.contains("Idempotent-Replayed") && exposed.contains("Retry-After"),
        "{exposed}"
    );
    // Not for an origin the source does not allow.
    let foreign = post_from(&app, "https://evil.example", &[]).await;
    assert!(
        foreign
            .headers()
            .get("access-control-expose-headers")
            .is_none()
    );
    app.received(1).await;
}

#[tokio::test]
async fn a_405_names_the_allowed_methods() {
    let app = TestApp::spawn().await;
    // GET on a source without a handshake.
    let get = app
        .http
        .get(app.url("/in/website"))
        .header("origin", "https://www.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 405);
    assert_eq!(get.headers()["allow"], "POST, OPTIONS");
    assert_eq!(get.headers()["vary"], "Origin");
    // A method no route takes on a path that exists.
    let put = app
        .http
        .put(app.url("/in/website"))
        .json(&json!({"name": "Ana Ruiz"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 405);
    assert_eq!(
        put.headers()["allow"],
        "POST, OPTIONS",
        "the same Allow as the source's GET"
    );
    assert_eq!(put.headers()["vary"], "Origin");
    let body: Value = put.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
    // Another method on a source that does not exist: the source is what is missing.
    let unknown = app
        .http
        .put(app.url("/in/no-such-source"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert!(unknown.headers().get("allow").is_none());
    let body: Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unknown_source");
    let delete = app.http.delete(app.url("/healthz")).send().await.unwrap();
    assert_eq!(delete.status(), 405);
    assert_eq!(delete.headers()["allow"], "GET, HEAD");
    let body: Value = delete.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
    // A path two routes match lists both routes' methods.
    let replay = app
        .http
        .get(app.url("/admin/dead/replay"))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 405);
    assert_eq!(replay.headers()["allow"], "POST, DELETE");
    // A path that does not exist is still a 404.
    let nowhere = app.http.put(app.url("/nowhere")).send().await.unwrap();
    assert_eq!(nowhere.status(), 404);
    let stats = app.stats().await;
    assert_eq!(stats.ready + stats.leased + stats.delayed, 0);
}

/// Sends `request` on a fresh connection and returns the raw answer, up to its close.
async fn raw(app: &TestApp, request: &str) -> String {
    let mut stream = TcpStream::connect(app.gateway().addr()).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the gateway closes the connection")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn head_on_the_health_routes_answers_like_get_without_a_body() {
    let app = TestApp::spawn().await;
    for path in ["/healthz", "/readyz"] {
        let answer = raw(
            &app,
            &format!("HEAD {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        )
        .await;
        let (head, body) = answer.split_once("\r\n\r\n").expect("a complete head");
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{path}: {head}"
        );
        assert_eq!(body, "", "{path}: a HEAD answer has no body");
    }
}
