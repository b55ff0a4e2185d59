//! What a refused request's answer and the gateway's log may hold, as the README says: an
//! answer may quote what the request said wrong (escaped), never a field's value, and the log
//! keeps only the refusal's code.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::app::{
    GatewayEnv, GatewayProcess, PARTNER_KEY, client, default_sources, start_sim,
};
use crate::helpers::eventually;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_quote_the_request_escaped_never_a_field_s_value_and_log_only_their_code() {
    let sim = Arc::new(start_sim(Vec::new()).await);
    let dir = tempfile::tempdir().unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &default_sources());
    // Refusals are logged at debug level: look at everything.
    env.set("RUST_LOG", "info,leadgate=debug");
    let gateway = GatewayProcess::start(&env, &[]).await;
    let http = client();
    let (email, phone, name) = (
        "zebedee.quux@@example.com",
        "+44 7700 900461",
        "Zebedee Quux",
    );

    // An invalid email: the message names the field, not the value.
    let response = http
        .post(format!("{}/in/website", gateway.base))
        .json(&json!({"name": name, "email": email, "phone": phone}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let body = response.text().await.unwrap();
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        answer["error"]["fields"]["email"],
        json!(["is not a valid email address"]),
        "{body}"
    );
    for value in [email, phone, "Zebedee", "Quux"] {
        assert!(!body.contains(value), "{value} echoed: {body}");
    }

    // An unknown email Type (partner, Leadsin's shape): quoted, as a JSON string.
    let response = http
        .post(format!("{}/in/acme", gateway.base))
        .bearer_auth(PARTNER_KEY)
        .json(&json!({
            "FirstName": "Zebedee",
            "LastName": "Quux",
            "Email": [{"Address": "zebedee@example.com", "Type": "<b>\"office\"</b>"}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let answer: Value = response.json().await.unwrap();
    let message = answer["error"]["fields"]["Email[0].Type"][0]
        .as_str()
        .unwrap_or_else(|| panic!("a message for Email[0].Type: {answer}"));
    assert!(
        message.ends_with(r#"not "<b>\"office\"</b>""#),
        "the Type is quoted: {message}"
    );
    assert!(
        !answer.to_string().contains("zebedee@example.com"),
        "{answer}"
    );

    // A browser post naming an unknown charset: quoted on the page, HTML-escaped.
    let response = http
        .post(format!("{}/in/website", gateway.base))
        .header(
            "content-type",
            "application/x-www-form-urlencoded; charset=<script>x</script>",
        )
        .header("accept", "text/html")
        .body("name=Zebedee+Quux&email=zebedee%40example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let page = response.text().await.unwrap();
    assert!(page.contains("&lt;script&gt;x&lt;/script&gt;"), "{page}");
    assert!(!page.contains("<script>"), "{page}");
    assert!(!page.contains("zebedee@example.com"), "{page}");

    // The log knows each refusal by its code, and nothing the requests carried.
    let log = eventually(
        Duration::from_secs(5),
        "the refusals in the log",
        || async {
            let log = gateway.log();
            (log.matches("Refused a request").count() >= 3).then_some(log)
        },
    )
    .await;
    for code in ["validation_failed", "malformed_body"] {
        assert!(log.contains(code), "{code} logged:\n{log}");
    }
    for value in [
        email,
        phone,
        "Zebedee",
        "zebedee@example.com",
        "office",
        "<script>",
    ] {
        assert!(!log.contains(value), "{value} in the log:\n{log}");
    }
}
