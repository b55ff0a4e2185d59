//! Meta (Facebook/Instagram) Lead Ads end to end: the subscription handshake, signed
//! notifications, the Graph API read (the simulator's Graph side, over HTTPS), mapping, the
//! parked state for token problems, retries, dead letters and the backfill.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use leadgate::sim::graph::{GraphFault, GraphSettingsUpdate};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::helpers::app::{GatewayEnv, GatewayProcess, TestApp, client, start_sim, wait_received};
use crate::helpers::eventually;

const APP_SECRET: &str = "meta-app-secret-for-tests-0001";
const VERIFY_TOKEN: &str = "meta-verify-token-0001";
/// Beyond 2^53, like real page, form and lead ids.
const PAGE: &str = "112233445566778899";
const FORM: &str = "998877665544332211";
const AD: &str = "120210000000000001";
const PAGE_TOKEN: &str = "EAAB-page-token-current";

/// A facebook source `fb` with the given page token; `more` adds keys to the source table.
fn sources(page_token: &str, more: &str) -> String {
    format!(
        r#"
[[source]]
id = "fb"
kind = "facebook"
app_secret = "{APP_SECRET}"
verify_token = "{VERIFY_TOKEN}"
page_tokens = {{ "{PAGE}" = "{page_token}" }}
unmapped_extra = "4444444"
{more}

[source.extra]
leadgen_id = "7000001"
form_id = "7000002"
created_time = "7000003"
"你想要什么产品" = "7000004"
job_title = "7000005"
"#
    )
}

/// A gateway with the `fb` source and a simulator whose Graph side accepts [`PAGE_TOKEN`] and
/// checks `appsecret_proof` against [`APP_SECRET`].
async fn meta_app(page_token: &str, more: &str) -> TestApp {
    meta_app_with(&sources(page_token, more)).await
}

/// The same, with the given sources file.
async fn meta_app_with(sources: &str) -> TestApp {
    let sim = Arc::new(start_sim(Vec::new()).await);
    sim.graph().update(GraphSettingsUpdate {
        tokens: Some(vec![PAGE_TOKEN.to_owned()]),
        app_secret: Some(APP_SECRET.to_owned()),
    });
    TestApp::spawn_against(sim, sources, |env| {
        env.set("LEADGATE_GRAPH_PARKED_RETRY", "300ms");
    })
    .await
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(APP_SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A notification as Meta sends it: one entry per lead, ids as strings.
fn notification(leads: &[&str]) -> String {
    let entries: Vec<Value> = leads
        .iter()
        .map(|id| {
            json!({"id": PAGE, "time": 1714558830, "changes": [{"field": "leadgen", "value": {
                "ad_id": AD, "form_id": FORM, "leadgen_id": id, "created_time": 1714558830,
                "page_id": PAGE, "adgroup_id": AD
            }}]})
        })
        .collect();
    json!({"object": "page", "entry": entries}).to_string()
}

/// A lead as the Graph API returns it.
fn graph_lead(id: &str, created: DateTime<Utc>, answers: &[(&str, &str)]) -> Value {
    let field_data: Vec<Value> = answers
        .iter()
        .map(|(name, value)| json!({"name": name, "values": [value]}))
        .collect();
    json!({
        "id": id,
        "created_time": created.format("%Y-%m-%dT%H:%M:%S+0000").to_string(),
        "ad_id": AD,
        "form_id": FORM,
        "field_data": field_data,
        "platform": "fb",
        "is_organic": false,
    })
}

async fn post_signed(app: &TestApp, body: &str, signature: Option<&str>) -> reqwest::Response {
    post_signed_to(app, "fb", body, signature).await
}

async fn post_signed_to(
    app: &TestApp,
    source: &str,
    body: &str,
    signature: Option<&str>,
) -> reqwest::Response {
    let mut request = app
        .http
        .post(app.url(&format!("/in/{source}")))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(signature) = signature {
        request = request.header("x-hub-signature-256", signature);
    }
    request.send().await.unwrap()
}

async fn notify(app: &TestApp, leads: &[&str]) -> Value {
    let body = notification(leads);
    let response = post_signed(app, &body, Some(&sign(body.as_bytes()))).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn extra(payload: &Value, id: &str) -> Option<String> {
    payload["Extra"]
        .as_array()?
        .iter()
        .find(|e| e["ID"] == id)
        .and_then(|e| e["Value"].as_str())
        .map(str::to_owned)
}

async fn readyz(app: &TestApp) -> Value {
    app.http
        .get(app.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Graph calls reading one lead.
fn reads_of(app: &TestApp, lead: &str) -> usize {
    let path = format!("/{lead}");
    app.sim
        .graph()
        .calls()
        .iter()
        .filter(|c| c.path == path)
        .count()
}

/// Waits until no lead is waiting, leased or delayed.
async fn settled(app: &TestApp) {
    eventually(Duration::from_secs(20), "the queue to settle", || async {
        let s = app.stats().await;
        (s.ready + s.leased + s.delayed == 0).then_some(())
    })
    .await;
}

async fn handshake(app: &TestApp, query: &str) -> reqwest::Response {
    app.http
        .get(app.url(&format!("/in/fb?{query}")))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn meta_handshake_with_the_verify_token_answers_the_challenge_as_plain_text() {
    let app = meta_app(PAGE_TOKEN, "").await;
    let response = handshake(
        &app,
        &format!("hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token={VERIFY_TOKEN}"),
    )
    .await;
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    assert_eq!(
        response.headers()["x-content-type-options"],
        "nosniff",
        "an echoed challenge is never sniffed into HTML"
    );
    assert_eq!(response.text().await.unwrap(), "1158201444");
}

#[tokio::test]
async fn meta_handshake_with_a_wrong_token_is_refused() {
    let app = meta_app(PAGE_TOKEN, "").await;
    let response = handshake(
        &app,
        "hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=guessed",
    )
    .await;
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "handshake_refused");
    assert!(!body.to_string().contains("1158201444"));
}

#[tokio::test]
async fn another_method_on_a_meta_source_lists_its_handshake_in_allow() {
    let app = meta_app(PAGE_TOKEN, "").await;
    let put = app.http.put(app.url("/in/fb")).send().await.unwrap();
    assert_eq!(put.status(), 405);
    assert_eq!(put.headers()["allow"], "POST, GET, OPTIONS");
    let body: Value = put.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

#[tokio::test]
async fn meta_handshake_never_verifies_when_the_configured_token_is_empty() {
    let sim = Arc::new(start_sim(Vec::new()).await);
    let text = sources(PAGE_TOKEN, "").replace(
        &format!("verify_token = \"{VERIFY_TOKEN}\""),
        "verify_token = \"\"",
    );
    let app = TestApp::spawn_against(sim, &text, |_| {}).await;
    for query in [
        "hub.mode=subscribe&hub.challenge=42&hub.verify_token=",
        "hub.mode=subscribe&hub.challenge=42",
    ] {
        assert_eq!(handshake(&app, query).await.status(), 403, "{query}");
    }
}

#[tokio::test]
async fn a_batched_notification_with_two_entries_queues_two_leads_that_both_reach_onpipeline() {
    let app = meta_app(PAGE_TOKEN, "").await;
    let now = Utc::now();
    let graph = app.sim.graph();
    graph
        .add_lead(graph_lead(
            "9007199254740993",
            now,
            &[
                ("full_name", "Ingrid Solberg"),
                ("email", "ingrid.solberg@example.no"),
            ],
        ))
        .unwrap();
    graph
        .add_lead(graph_lead(
            "9007199254740995",
            now,
            &[
                ("first_name", "Tomás"),
                ("last_name", "Ferreira"),
                ("phone_number", "+351912345678"),
                ("city", "Porto"),
            ],
        ))
        .unwrap();
    // Two entries, plus a change of another field that must be ignored.
    let mut body: Value =
        serde_json::from_str(&notification(&["9007199254740993", "9007199254740995"])).unwrap();
    body["entry"][0]["changes"]
        .as_array_mut()
        .unwrap()
        .push(json!({"field": "feed", "value": {"item": "status", "verb": "add"}}));
    let body = body.to_string();
    let response = post_signed(&app, &body, Some(&sign(body.as_bytes()))).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["ids"].as_array().unwrap().len(), 2, "{answer}");

    let mut leads = app.received(2).await;
    leads.sort_by_key(|l| extra(&l.payload, "7000001"));
    let ingrid = &leads[0].payload;
    assert_eq!(ingrid["FirstName"], "Ingrid");
    assert_eq!(ingrid["LastName"], "Solberg");
    assert_eq!(ingrid["Email"][0]["Address"], "ingrid.solberg@example.no");
    assert_eq!(extra(ingrid, "7000001").unwrap(), "9007199254740993");
    assert_eq!(extra(ingrid, "7000002").unwrap(), FORM);
    let tomas = &leads[1].payload;
    assert_eq!(tomas["FirstName"], "Tomás");
    assert_eq!(tomas["Phone"][0]["Number"], "+351912345678");
    assert_eq!(tomas["Phone"][0]["Type"], "mobile");
    assert_eq!(tomas["City"], "Porto");
    settled(&app).await;
    assert_eq!(app.sim.received().len(), 2);
}

#[tokio::test]
async fn a_signed_body_with_unicode_escapes_verifies_and_the_decoded_text_reaches_onpipeline() {
    let app = meta_app(PAGE_TOKEN, "").await;
    // The simulator serves Graph answers \u-escaped, as Graph does.
    app.sim
        .graph()
        .add_lead(graph_lead(
            "5001",
            Utc::now(),
            &[
                ("full_name", "Zoë Ångström"),
                ("你想要什么产品", "乌龙茶 🍵"),
            ],
        ))
        .unwrap();
    // Meta signs the escaped, pure-ASCII bytes; the signature must be checked over exactly
    // those, not over the text re-serialised after decoding. A notification carries only ids,
    // none of them text: its non-ASCII `ad_name` is signed but never forwarded, so what the
    // notification does forward, its `leadgen_id`, is sent escaped too ("5001" as
    // `\u0035\u0030\u0030\u0031`) and must arrive decoded — in the Graph read and in its Extra
    // ID. The non-ASCII text that reaches Onpipeline comes from Graph's own escaped answer.
    let body = format!(
        r#"{{"object":"page","entry":[{{"id":"{PAGE}","time":1714558830,"changes":[{{"field":"leadgen","value":{{"ad_id":"{AD}","form_id":"{FORM}","leadgen_id":"\u0035\u0030\u0030\u0031","created_time":1714558830,"page_id":"{PAGE}","ad_name":"Caf\u00e9 \u00e9t\u00e9 \ud83c\udf75"}}}}]}}]}}"#
    );
    assert!(body.is_ascii() && body.contains(r"\u00e9") && !body.contains("5001"));
    let response = post_signed(&app, &body, Some(&sign(body.as_bytes()))).await;
    assert_eq!(response.status(), 200);

    let leads = app.received(1).await;
    let payload = &leads[0].payload;
    assert_eq!(extra(payload, "7000001").unwrap(), "5001");
    assert_eq!(reads_of(&app, "5001"), 1);
    assert_eq!(payload["FirstName"], "Zoë");
    assert_eq!(payload["LastName"], "Ångström");
    assert_eq!(extra(payload, "7000004").unwrap(), "乌龙茶 🍵");
}

#[tokio::test]
async fn a_forged_or_missing_signature_is_refused_and_nothing_is_queued() {
    let app = meta_app(PAGE_TOKEN, "").await;
    app.sim
        .graph()
        .add_lead(graph_lead(
            "6001",
            Utc::now(),
            &[("full_name", "Forged Lead")],
        ))
        .unwrap();
    let body = notification(&["6001"]);
    let mut forger = Hmac::<Sha256>::new_from_slice(b"not-the-app-secret").unwrap();
    forger.update(body.as_bytes());
    let forged = format!("sha256={}", hex::encode(forger.finalize().into_bytes()));
    for signature in [Some(forged.as_str()), None, Some("sha256=nothex")] {
        let response = post_signed(&app, &body, signature).await;
        assert_eq!(response.status(), 403, "{signature:?}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "invalid_signature");
    }
    assert_eq!(app.stats().await, leadgate::queue::Stats::default());
    assert!(app.sim.graph().calls().is_empty());
}

#[tokio::test]
async fn a_body_altered_by_one_byte_is_refused_and_nothing_is_queued() {
    let app = meta_app(PAGE_TOKEN, "").await;
    let body = notification(&["6101"]);
    let signature = sign(body.as_bytes());
    // The signature of the original, with one digit of the lead id changed.
    let altered = body.replacen("6101", "6102", 1);
    assert_eq!(altered.len(), body.len());
    let response = post_signed(&app, &altered, Some(&signature)).await;
    assert_eq!(response.status(), 403);
    assert_eq!(app.stats().await, leadgate::queue::Stats::default());
    assert!(app.sim.graph().calls().is_empty());
}

#[tokio::test]
async fn the_same_leadgen_id_delivered_three_times_becomes_one_lead() {
    let app = meta_app(PAGE_TOKEN, "").await;
    app.sim
        .graph()
        .add_lead(graph_lead(
            "7001",
            Utc::now(),
            &[
                ("full_name", "Amara Okafor"),
                ("email", "amara.okafor@example.ng"),
            ],
        ))
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let answer = notify(&app, &["7001"]).await;
        ids.push(answer["ids"][0].as_str().unwrap().to_owned());
    }
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    let leads = app.received(1).await;
    assert_eq!(leads[0].payload["FirstName"], "Amara");
    settled(&app).await;
    assert_eq!(app.sim.received().len(), 1);
    assert_eq!(reads_of(&app, "7001"), 1);
}

#[tokio::test]
async fn an_expired_page_token_parks_the_lead_until_the_token_is_fixed_then_it_is_delivered_once() {
    let expired = "EAAB-page-token-expired";
    let mut app = meta_app(expired, "").await;
    app.sim
        .graph()
        .add_lead(graph_lead(
            "8001",
            Utc::now(),
            &[
                ("full_name", "Keiko Tanaka"),
                ("email", "keiko.tanaka@example.jp"),
            ],
        ))
        .unwrap();
    notify(&app, &["8001"]).await;

    let ready = eventually(Duration::from_secs(10), "the page to be parked", || async {
        let body = readyz(&app).await;
        (!body["attention"].as_array()?.is_empty()).then_some(body)
    })
    .await;
    assert_eq!(ready["status"], "degraded", "{ready}");
    let parked = &ready["attention"][0];
    assert_eq!(parked["source"], "fb");
    assert_eq!(parked["page_id"], PAGE);
    let reason = parked["reason"].as_str().unwrap();
    assert!(reason.contains("Graph error 190/463"), "{reason}");
    assert!(
        !ready.to_string().contains(expired),
        "the token leaked: {ready}"
    );
    assert!(app.sim.received().is_empty());

    // Parked means no hot loop: one Graph call per LEADGATE_GRAPH_PARKED_RETRY (300 ms).
    let before = reads_of(&app, "8001");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let during = reads_of(&app, "8001") - before;
    assert!(during <= 6, "{during} Graph calls in 1.2 s while parked");
    let stats = app.stats().await;
    assert_eq!(stats.dead, 0, "a parked lead is not dead-lettered");

    // The marketer puts the renewed token in the sources file and restarts.
    app.stop().await;
    std::fs::write(app.env.dir.join("leadgate.toml"), sources(PAGE_TOKEN, "")).unwrap();
    app.start().await;
    let leads = wait_received(&app.sim, 1, Duration::from_secs(20)).await;
    assert_eq!(leads[0].payload["FirstName"], "Keiko");
    assert_eq!(extra(&leads[0].payload, "7000001").unwrap(), "8001");
    settled(&app).await;
    assert_eq!(app.sim.received().len(), 1);
    let ready = readyz(&app).await;
    assert_eq!(ready["attention"], json!([]), "{ready}");
    assert_eq!(ready["status"], "ready", "{ready}");
}

#[tokio::test]
async fn an_expired_page_token_is_alerted_once_at_error_level_in_the_log_without_the_token() {
    // The real binary, so the log it writes is what an operator reads.
    let expired = "EAAB-page-token-expired-7f3a";
    let sim = Arc::new(start_sim(Vec::new()).await);
    sim.graph().update(GraphSettingsUpdate {
        tokens: Some(vec![PAGE_TOKEN.to_owned()]),
        app_secret: Some(APP_SECRET.to_owned()),
    });
    let dir = tempfile::tempdir().unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &sources(expired, ""));
    env.set("LEADGATE_GRAPH_PARKED_RETRY", "300ms");
    let gateway = GatewayProcess::start(&env, &[]).await;
    for id in ["8301", "8302"] {
        sim.graph()
            .add_lead(graph_lead(
                id,
                Utc::now(),
                &[("full_name", "Keiko Tanaka"), ("email", "keiko@example.jp")],
            ))
            .unwrap();
    }
    // Two leads of the same page: the page is what needs attention, so one alert.
    let body = notification(&["8301", "8302"]);
    let response = client()
        .post(format!("{}/in/fb", gateway.base))
        .header("content-type", "application/json")
        .header("x-hub-signature-256", sign(body.as_bytes()))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let alerts = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|line| line.contains("ALERT: Meta leads of this page cannot be read"))
            .map(str::to_owned)
            .collect()
    };
    let first = eventually(Duration::from_secs(10), "the alert in the log", || async {
        alerts(&gateway.log()).into_iter().next()
    })
    .await;
    assert!(first.contains("ERROR"), "{first}");
    assert!(first.contains(PAGE), "the alert names the page: {first}");
    assert!(
        first.contains("190"),
        "the alert gives Graph's code: {first}"
    );

    // Three seconds parked: the probes keep going (one per 300 ms), the alert is not repeated.
    let calls_before = sim.graph().calls().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let probes = sim.graph().calls().len() - calls_before;
    assert!(
        (1..=14).contains(&probes),
        "{probes} Graph calls in 3 s while parked"
    );
    let log = gateway.log();
    assert_eq!(alerts(&log).len(), 1, "{log}");
    assert!(
        !log.contains(expired),
        "the token leaked into the log:\n{log}"
    );
    assert!(!log.contains(APP_SECRET), "the app secret leaked:\n{log}");
    assert!(!log.contains("keiko@example.jp"), "{log}");
    assert!(sim.received().is_empty());
}

#[tokio::test]
async fn a_missing_permission_parks_the_lead_and_it_is_delivered_once_meta_grants_it() {
    let app = meta_app(PAGE_TOKEN, "").await;
    let graph = app.sim.graph();
    graph
        .add_lead(graph_lead(
            "8101",
            Utc::now(),
            &[("full_name", "Priya Raman")],
        ))
        .unwrap();
    graph.push_fault(GraphFault::for_lead(200, "8101"));
    notify(&app, &["8101"]).await;
    eventually(Duration::from_secs(10), "the page to be parked", || async {
        let body = readyz(&app).await;
        let reason = body["attention"][0]["reason"].as_str()?.to_owned();
        reason.contains("leads_retrieval").then_some(())
    })
    .await;
    assert!(app.sim.received().is_empty());

    // The page admin grants leads_retrieval: Graph answers again, with no restart.
    graph.clear_faults();
    let leads = app.received(1).await;
    assert_eq!(leads[0].payload["FirstName"], "Priya");
    eventually(
        Duration::from_secs(10),
        "the page to leave attention",
        || async {
            let body = readyz(&app).await;
            (body["attention"] == json!([])).then_some(())
        },
    )
    .await;
    settled(&app).await;
    assert_eq!(app.sim.received().len(), 1);
}

#[tokio::test]
async fn a_graph_rate_limit_is_retried_later_and_the_lead_delivered_once() {
    let app = meta_app(PAGE_TOKEN, "").await;
    let graph = app.sim.graph();
    graph
        .add_lead(graph_lead(
            "8201",
            Utc::now(),
            &[("full_name", "Lars Eriksen")],
        ))
        .unwrap();
    // User request limit (17) saying how long to wait, then page request limit (32).
    graph.push_fault(GraphFault {
        retry_after: Some(1),
        ..GraphFault::next(17, 1)
    });
    graph.push_fault(GraphFault::next(32, 1));
    notify(&app, &["8201"]).await;
    let leads = app.received(1).await;
    assert_eq!(leads[0].payload["LastName"], "Eriksen");
    let calls: Vec<_> = graph
        .calls()
        .into_iter()
        .filter(|c| c.path == "/8201")
        .collect();
    let statuses: Vec<u16> = calls.iter().map(|c| c.status).collect();
    assert_eq!(statuses, [400, 400, 200]);
    // The back-off has full jitter from LEADGATE_RETRY_BASE (50 ms here), so it has no floor
    // of its own; Graph's wait is the floor. Without it the retry would come within ~50 ms.
    // (The queue keeps times in milliseconds, hence the 10 ms of slack.)
    let waited = (calls[1].at - calls[0].at).to_std().unwrap();
    assert!(
        waited >= Duration::from_millis(990),
        "the retry came {waited:?} after a rate limit that asked for 1 s"
    );
    settled(&app).await;
    assert_eq!(app.sim.received().len(), 1);
    // A rate limit is not a token problem.
    assert_eq!(readyz(&app).await["attention"], json!([]));
}

#[tokio::test]
async fn an_unknown_graph_error_dead_letters_the_lead_with_graphs_message_and_no_token() {
    let app = meta_app(PAGE_TOKEN, "").await;
    let graph = app.sim.graph();
    graph
        .add_lead(graph_lead(
            "8301",
            Utc::now(),
            &[("full_name", "Nadia Haddad")],
        ))
        .unwrap();
    graph.push_fault(GraphFault {
        message: Some(format!("(#100) Invalid parameter near {PAGE_TOKEN}")),
        ..GraphFault::for_lead(100, "8301")
    });
    notify(&app, &["8301"]).await;
    let dead = eventually(Duration::from_secs(10), "a dead letter", || async {
        let letters = app.gateway().queue().dead_letters(10).await.ok()?;
        letters.into_iter().next()
    })
    .await;
    assert!(dead.reason.contains("Graph error 100"), "{}", dead.reason);
    assert!(dead.reason.contains("Invalid parameter"), "{}", dead.reason);
    assert!(!dead.reason.contains(PAGE_TOKEN), "{}", dead.reason);
    assert_eq!(reads_of(&app, "8301"), 1, "no retry of a permanent error");
    assert!(app.sim.received().is_empty());
}

#[tokio::test]
async fn a_single_word_full_name_gets_the_fallback_last_name() {
    let app = meta_app(PAGE_TOKEN, "").await;
    app.sim
        .graph()
        .add_lead(graph_lead(
            "8401",
            Utc::now(),
            &[("full_name", "Madonna"), ("email", "not-an-email")],
        ))
        .unwrap();
    notify(&app, &["8401"]).await;
    let leads = app.received(1).await;
    let payload = &leads[0].payload;
    assert_eq!(payload["FirstName"], "Madonna");
    assert_eq!(payload["LastName"], "-");
    // An invalid email is not refused either: it is kept in the unmapped-fields note.
    assert!(payload.get("Email").is_none(), "{payload}");
    assert_eq!(
        extra(payload, "4444444").unwrap(),
        "email (invalid): not-an-email"
    );
}

#[tokio::test]
async fn a_meta_lead_with_an_invalid_email_is_counted_as_repaired_once_it_is_read() {
    let text = sources(PAGE_TOKEN, "").replace("id = \"fb\"", "id = \"fb-repaired\"");
    let app = meta_app_with(&text).await;
    let series = r#"leadgate_leads_repaired_total{source="fb-repaired"}"#;
    let before = app.metric(series).await;
    let graph = app.sim.graph();
    graph
        .add_lead(graph_lead(
            "8451",
            Utc::now(),
            &[
                ("full_name", "Noor Haddad"),
                ("email", "noor(at)example.jo"),
            ],
        ))
        .unwrap();
    graph
        .add_lead(graph_lead(
            "8452",
            Utc::now(),
            &[("full_name", "Rami Haddad"), ("email", "rami@example.jo")],
        ))
        .unwrap();
    let body = notification(&["8451", "8452"]);
    let response = post_signed_to(&app, "fb-repaired", &body, Some(&sign(body.as_bytes()))).await;
    assert_eq!(response.status(), 200);
    let leads = app.received(2).await;
    assert!(leads.iter().any(|l| l.payload.get("Email").is_none()));
    assert_eq!(app.metric(series).await - before, 1.0);
}

#[tokio::test]
async fn the_ad_adgroup_and_page_ids_map_into_extra_ids_through_source_extra() {
    let text = format!(
        "{}ad_id = \"7000006\"\nadgroup_id = \"7000007\"\npage_id = \"7000008\"\n",
        sources(PAGE_TOKEN, "")
    );
    let app = meta_app_with(&text).await;
    app.sim
        .graph()
        .add_lead(graph_lead(
            "8551",
            Utc::now(),
            &[("full_name", "Chidi Okeke")],
        ))
        .unwrap();
    // Meta sends the ad id under both names; a different `adgroup_id` here shows that each
    // name carries its own value.
    let adgroup = "120210000000000002";
    let body = notification(&["8551"]).replace(
        &format!("\"adgroup_id\":\"{AD}\""),
        &format!("\"adgroup_id\":\"{adgroup}\""),
    );
    assert!(body.contains(adgroup), "{body}");
    let response = post_signed(&app, &body, Some(&sign(body.as_bytes()))).await;
    assert_eq!(response.status(), 200);
    let leads = app.received(1).await;
    let payload = &leads[0].payload;
    assert_eq!(extra(payload, "7000006").as_deref(), Some(AD));
    assert_eq!(extra(payload, "7000007").as_deref(), Some(adgroup));
    assert_eq!(extra(payload, "7000008").as_deref(), Some(PAGE));
    // Mapped metadata never lands in the unmapped-fields note.
    assert_eq!(extra(payload, "4444444"), None, "{payload}");
}

#[tokio::test]
async fn a_custom_question_in_chinese_maps_to_an_extra_id() {
    let app = meta_app(PAGE_TOKEN, "").await;
    app.sim
        .graph()
        .add_lead(json!({
            "id": "8501",
            "created_time": "2024-05-01T10:20:30+0000",
            "form_id": FORM,
            "field_data": [
                {"name": "full_name", "values": ["Wang Fang"]},
                {"name": "你想要什么产品", "values": ["乌龙茶"]},
                {"name": "job_title", "values": ["采购经理"]},
                {"name": "preferred_contact_time?", "values": ["morning"]},
            ],
        }))
        .unwrap();
    notify(&app, &["8501"]).await;
    let leads = app.received(1).await;
    let payload = &leads[0].payload;
    assert_eq!(extra(payload, "7000004").unwrap(), "乌龙茶");
    assert_eq!(extra(payload, "7000005").unwrap(), "采购经理");
    assert_eq!(extra(payload, "7000003").unwrap(), "2024-05-01 10:20:30");
    assert_eq!(
        extra(payload, "4444444").unwrap(),
        "preferred_contact_time?: morning"
    );
}

#[tokio::test]
async fn a_lead_id_beyond_two_to_the_53_sent_as_a_json_number_is_read_exactly() {
    let app = meta_app(PAGE_TOKEN, "").await;
    let id = "123456789012345678";
    app.sim
        .graph()
        .add_lead(graph_lead(id, Utc::now(), &[("full_name", "Big Number")]))
        .unwrap();
    let body = notification(&[id]).replace(&format!("\"{id}\""), id);
    assert!(body.contains(&format!("\"leadgen_id\":{id}")), "{body}");
    let response = post_signed(&app, &body, Some(&sign(body.as_bytes()))).await;
    assert_eq!(response.status(), 200);
    let leads = app.received(1).await;
    assert_eq!(extra(&leads[0].payload, "7000001").unwrap(), id);
    assert_eq!(reads_of(&app, id), 1);
}

#[tokio::test]
async fn backfill_finds_a_lead_that_had_no_notification() {
    let app = meta_app(
        PAGE_TOKEN,
        &format!("backfill_forms = [\"{FORM}\"]\nbackfill_every = \"200ms\""),
    )
    .await;
    let graph = app.sim.graph();
    let now = Utc::now();
    // Never notified: only the backfill can find it.
    graph
        .add_lead(graph_lead(
            "9001",
            now - chrono::Duration::minutes(3),
            &[("full_name", "Olu Adeyemi")],
        ))
        .unwrap();
    // Notified too: the backfill lists it as well, and it must still arrive once.
    graph
        .add_lead(graph_lead("9002", now, &[("full_name", "Sofia Rossi")]))
        .unwrap();
    // Older than the backfill's first window: not listed.
    graph
        .add_lead(graph_lead(
            "9003",
            now - chrono::Duration::days(2),
            &[("full_name", "Too Old")],
        ))
        .unwrap();
    notify(&app, &["9002"]).await;

    let leads = app.received(2).await;
    let mut names: Vec<&str> = leads
        .iter()
        .map(|l| l.payload["FirstName"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["Olu", "Sofia"]);

    // Several more listings overlap the first; nothing arrives twice.
    let listings = |app: &TestApp| {
        let path = format!("/{FORM}/leads");
        app.sim
            .graph()
            .calls()
            .iter()
            .filter(|c| c.path == path)
            .count()
    };
    let seen = listings(&app);
    eventually(Duration::from_secs(10), "three more listings", || async {
        (listings(&app) >= seen + 3).then_some(())
    })
    .await;
    settled(&app).await;
    assert_eq!(app.sim.received().len(), 2);
    assert_eq!(reads_of(&app, "9001"), 1);
    assert_eq!(reads_of(&app, "9002"), 1);
    assert_eq!(reads_of(&app, "9003"), 0);
    let listing = app
        .sim
        .graph()
        .calls()
        .into_iter()
        .find(|c| c.path.ends_with("/leads"))
        .unwrap();
    assert!(listing.query.contains("filtering="), "{}", listing.query);
    assert!(
        listing.query.contains("access_token=***"),
        "{}",
        listing.query
    );
}

#[tokio::test]
async fn a_lead_graph_cannot_find_is_parked_then_dead_lettered_past_the_retry_age() {
    let sim = Arc::new(start_sim(Vec::new()).await);
    let app = TestApp::spawn_against(sim, &sources(PAGE_TOKEN, ""), |env| {
        env.set("LEADGATE_GRAPH_PARKED_RETRY", "200ms");
        env.set("LEADGATE_RETRY_MAX_AGE", "1s");
    })
    .await;
    // Never registered: Graph answers 100/33, "does not exist, cannot be loaded due to missing
    // permissions" — which cannot be told apart from a permission problem, so it parks.
    notify(&app, &["8601"]).await;
    eventually(Duration::from_secs(10), "the page to be parked", || async {
        let body = readyz(&app).await;
        let reason = body["attention"][0]["reason"].as_str()?.to_owned();
        reason.contains("Graph error 100/33").then_some(())
    })
    .await;
    let dead = eventually(Duration::from_secs(10), "a dead letter", || async {
        let letters = app.gateway().queue().dead_letters(10).await.ok()?;
        letters.into_iter().next()
    })
    .await;
    assert!(dead.reason.starts_with("parked for "), "{}", dead.reason);
    assert!(dead.reason.contains("does not exist"), "{}", dead.reason);
    assert!(app.sim.received().is_empty());
}

#[tokio::test]
async fn a_lead_of_a_page_without_a_configured_token_is_parked_without_calling_graph() {
    let app = meta_app(PAGE_TOKEN, "").await;
    let other_page = "556677889900112233";
    let body = notification(&["8701"]).replace(PAGE, other_page);
    let response = post_signed(&app, &body, Some(&sign(body.as_bytes()))).await;
    assert_eq!(response.status(), 200);
    let ready = eventually(Duration::from_secs(10), "the page to be parked", || async {
        let body = readyz(&app).await;
        (body["attention"][0]["page_id"] == other_page).then_some(body)
    })
    .await;
    let reason = ready["attention"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("page_tokens"), "{reason}");
    assert!(app.sim.graph().calls().is_empty());
}
