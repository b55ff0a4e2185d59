//! The Onpipeline simulator driven over real HTTPS on loopback, as leadgate's forwarder will
//! drive it: every documented answer, the scripted faults and the inspection endpoints.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use chrono::NaiveDateTime;
use leadgate::sim::{Fault, RequestOutcome, SimConfig, SimSettings, Simulator, TokenKind};
use reqwest::StatusCode;
use serde_json::{Value, json};

const LEAD_TOKEN: &str = "lead-source-token";
const RW_TOKEN: &str = "read-write-token";
const RO_TOKEN: &str = "read-only-token";

fn config() -> SimConfig {
    SimConfig {
        tokens: vec![
            (LEAD_TOKEN.to_owned(), TokenKind::Leadsin),
            (RW_TOKEN.to_owned(), TokenKind::ReadWrite),
            (RO_TOKEN.to_owned(), TokenKind::ReadOnly),
        ],
        ..SimConfig::default()
    }
}

async fn start() -> Simulator {
    Simulator::start(config()).await.expect("simulator starts")
}

/// A client that trusts only the simulator's CA and never goes through a proxy.
fn client_builder(sim: &Simulator) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .tls_backend_preconfigured(sim.client_tls_config().expect("client TLS config"))
        .no_proxy()
        .timeout(Duration::from_secs(10))
}

fn client(sim: &Simulator) -> reqwest::Client {
    client_builder(sim).build().expect("client builds")
}

/// The reference's own sample lead.
fn mike() -> Value {
    json!({
        "FirstName": "Mike", "LastName": "Smith", "OrgName": "Company Inc.",
        "Email": [{"Address": "mike@company.com", "Type": "work"}],
        "Phone": [{"Number": "111111111111", "Type": "work"}],
        "Extra": [{"ID": "1111111", "Value": "Managing Director"}]
    })
}

struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|err| panic!("answer is not JSON ({err}): {}", self.text))
    }

    /// Asserts the documented Error object: only an `Error` member, `Code` equal to the HTTP
    /// status, the message, a `YYYY-MM-DD HH:MM:SS` time and the caller's IP.
    fn assert_error(&self, status: u16, message_contains: &str, ip: &str) {
        assert_eq!(self.status.as_u16(), status, "{}", self.text);
        let body = self.json();
        let object = body.as_object().expect("an object");
        assert_eq!(object.len(), 1, "only the Error member: {body}");
        let error = &body["Error"];
        assert_eq!(error["Code"], json!(status.to_string()));
        let message = error["Message"].as_str().expect("Message is a string");
        assert!(
            message.contains(message_contains),
            "message {message:?} should contain {message_contains:?}"
        );
        let time = error["Time"].as_str().expect("Time is a string");
        NaiveDateTime::parse_from_str(time, "%Y-%m-%d %H:%M:%S")
            .unwrap_or_else(|err| panic!("Time {time:?} is not YYYY-MM-DD HH:MM:SS: {err}"));
        assert_eq!(error["IP"], json!(ip));
        assert_eq!(
            self.headers["content-type"].to_str().unwrap(),
            "application/json"
        );
    }
}

async fn send(
    client: &reqwest::Client,
    url: String,
    token: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> Answer {
    let mut request = client.post(url).body(body);
    if let Some(token) = token {
        request = request.header("Authorization", token);
    }
    let response = request.send().await.expect("an HTTP answer");
    Answer {
        status: response.status(),
        headers: response.headers().clone(),
        text: response.text().await.expect("a body"),
    }
}

async fn post_lead(sim: &Simulator, token: Option<&str>, lead: &Value) -> Answer {
    send(
        &client(sim),
        format!("{}/Leadsin", sim.base_url()),
        token,
        lead.to_string(),
    )
    .await
}

/// Polls `check` until it holds or five seconds pass.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn statuses(sim: &Simulator) -> Vec<Option<u16>> {
    sim.requests().iter().map(|r| r.status).collect()
}

#[tokio::test]
async fn accepted_lead_gets_201_with_the_documented_header_and_is_recorded() {
    let sim = start().await;
    let answer = post_lead(&sim, Some(LEAD_TOKEN), &mike()).await;

    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.text);
    let body = answer.json();
    assert_eq!(body["Header"]["Status"], "Created");
    assert_eq!(body["Header"]["Code"], "201");
    assert_eq!(body["Header"]["Endpoint"], "Leadsin");
    let time = body["Header"]["Time"].as_str().unwrap();
    assert!(
        NaiveDateTime::parse_from_str(time, "%Y-%m-%d %H:%M:%S").is_ok(),
        "{time}"
    );
    let lead_id = body["Data"]["LeadID"].as_str().expect("a LeadID");
    assert_eq!(
        lead_id.len(),
        19,
        "shaped like the reference's 123456789HSY7584306"
    );

    let received = sim.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].payload, mike());
    assert_eq!(received[0].lead_id, lead_id);
    assert_eq!(received[0].peer_ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(statuses(&sim), vec![Some(201)]);
    assert_eq!(sim.requests()[0].outcome, RequestOutcome::Answered);
    sim.stop().await;
}

#[tokio::test]
async fn each_accepted_lead_gets_its_own_lead_id() {
    let sim = start().await;
    let first = post_lead(&sim, Some(LEAD_TOKEN), &mike()).await.json();
    let second = post_lead(&sim, Some(LEAD_TOKEN), &mike()).await.json();
    assert_ne!(first["Data"]["LeadID"], second["Data"]["LeadID"]);
    assert_eq!(
        sim.received().len(),
        2,
        "duplicates are accepted while detection is off"
    );
    sim.stop().await;
}

#[tokio::test]
async fn missing_authorization_header_is_400() {
    let sim = start().await;
    post_lead(&sim, None, &mike())
        .await
        .assert_error(400, "Missing Token", "127.0.0.1");
    post_lead(&sim, Some(""), &mike())
        .await
        .assert_error(400, "Missing Token", "127.0.0.1");
    assert!(sim.received().is_empty());
    assert_eq!(statuses(&sim), vec![Some(400), Some(400)]);
    sim.stop().await;
}

#[tokio::test]
async fn unknown_token_is_401_invalid_token() {
    let sim = start().await;
    post_lead(&sim, Some("not-a-token"), &mike())
        .await
        .assert_error(401, "Invalid Token", "127.0.0.1");
    // The header carries the raw token; a "Bearer" prefix makes it a different, unknown token.
    post_lead(&sim, Some(&format!("Bearer {LEAD_TOKEN}")), &mike())
        .await
        .assert_error(401, "Invalid Token", "127.0.0.1");
    assert!(sim.received().is_empty());
    sim.stop().await;
}

#[tokio::test]
async fn read_only_token_is_403_but_leadsin_and_read_write_tokens_create_leads() {
    let sim = start().await;
    post_lead(&sim, Some(RO_TOKEN), &mike())
        .await
        .assert_error(403, "No permissions", "127.0.0.1");
    assert_eq!(
        post_lead(&sim, Some(RW_TOKEN), &mike()).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        post_lead(&sim, Some(LEAD_TOKEN), &mike()).await.status,
        StatusCode::CREATED
    );
    assert_eq!(sim.received().len(), 2);
    sim.stop().await;
}

#[tokio::test]
async fn peer_outside_the_allow_list_is_403_and_an_allowed_peer_gets_201() {
    let allowed = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let sim = Simulator::start(SimConfig {
        allow_ips: vec![allowed],
        ..config()
    })
    .await
    .unwrap();

    post_lead(&sim, Some(LEAD_TOKEN), &mike())
        .await
        .assert_error(403, "Invalid IP", "127.0.0.1");
    assert!(sim.received().is_empty());

    let from_allowed = client_builder(&sim).local_address(allowed).build().unwrap();
    let answer = send(
        &from_allowed,
        format!("{}/Leadsin", sim.base_url()),
        Some(LEAD_TOKEN),
        mike().to_string(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.text);
    assert_eq!(sim.received()[0].peer_ip, allowed);
    assert_eq!(sim.requests()[1].peer_ip, allowed);
    sim.stop().await;
}

#[tokio::test]
async fn token_is_checked_before_the_allow_list() {
    let sim = Simulator::start(SimConfig {
        allow_ips: vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))],
        ..config()
    })
    .await
    .unwrap();
    post_lead(&sim, Some("not-a-token"), &mike())
        .await
        .assert_error(401, "Invalid Token", "127.0.0.1");
    sim.stop().await;
}

#[tokio::test]
async fn invalid_json_is_406() {
    let sim = start().await;
    let answer = send(
        &client(&sim),
        format!("{}/Leadsin", sim.base_url()),
        Some(LEAD_TOKEN),
        "{\"FirstName\": \"Mike\",",
    )
    .await;
    answer.assert_error(406, "Invalid JSON", "127.0.0.1");
    post_lead(&sim, Some(LEAD_TOKEN), &json!(["not", "an", "object"]))
        .await
        .assert_error(406, "Invalid JSON", "127.0.0.1");
    assert!(sim.received().is_empty());
    sim.stop().await;
}

#[tokio::test]
async fn missing_or_blank_mandatory_names_are_406_naming_the_field() {
    let sim = start().await;
    let mut lead = mike();
    lead.as_object_mut().unwrap().remove("FirstName");
    post_lead(&sim, Some(LEAD_TOKEN), &lead).await.assert_error(
        406,
        "FirstName is mandatory",
        "127.0.0.1",
    );

    let mut lead = mike();
    lead["LastName"] = json!("   ");
    post_lead(&sim, Some(LEAD_TOKEN), &lead).await.assert_error(
        406,
        "LastName is mandatory",
        "127.0.0.1",
    );

    let mut lead = mike();
    lead["LastName"] = json!(42);
    post_lead(&sim, Some(LEAD_TOKEN), &lead).await.assert_error(
        406,
        "LastName must be a string",
        "127.0.0.1",
    );
    assert!(sim.received().is_empty());
    sim.stop().await;
}

#[tokio::test]
async fn email_and_phone_types_outside_the_documented_lists_are_406() {
    let sim = start().await;
    let mut lead = mike();
    lead["Email"][0]["Type"] = json!("mobile"); // valid for phones only
    post_lead(&sim, Some(LEAD_TOKEN), &lead).await.assert_error(
        406,
        "Email[0].Type must be work, home or other",
        "127.0.0.1",
    );

    let mut lead = mike();
    lead["Phone"] = json!([
        {"Number": "+1111111111111", "Type": "mobile"},
        {"Number": "+2222222222222", "Type": "fax"}
    ]);
    post_lead(&sim, Some(LEAD_TOKEN), &lead).await.assert_error(
        406,
        "Phone[1].Type must be work, home, mobile or other",
        "127.0.0.1",
    );

    let mut lead = mike();
    lead["Phone"][0]["Type"] = json!("mobile");
    lead["Email"][0]["Type"] = json!("other");
    assert_eq!(
        post_lead(&sim, Some(LEAD_TOKEN), &lead).await.status,
        StatusCode::CREATED
    );
    assert_eq!(sim.received().len(), 1);
    sim.stop().await;
}

#[tokio::test]
async fn wrongly_shaped_email_phone_and_extra_are_406() {
    let sim = start().await;
    let cases = [
        ("Email", json!("mike@company.com"), "Email must be an array"),
        (
            "Email",
            json!([{"Address": "mike@company.com"}]),
            "Email[0].Type",
        ),
        (
            "Email",
            json!(["mike@company.com"]),
            "Email[0] must be an object",
        ),
        (
            "Phone",
            json!({"Number": "1", "Type": "work"}),
            "Phone must be an array",
        ),
        (
            "Extra",
            json!([{"Value": "Managing Director"}]),
            "Extra[0].ID is mandatory",
        ),
        (
            "Extra",
            json!({"1111111": "Managing Director"}),
            "Extra must be an array",
        ),
        ("Extra", json!([{"ID": "1111111"}]), "Extra[0].Value"),
    ];
    for (field, value, message) in cases {
        let mut lead = mike();
        lead[field] = value;
        post_lead(&sim, Some(LEAD_TOKEN), &lead)
            .await
            .assert_error(406, message, "127.0.0.1");
    }
    assert!(sim.received().is_empty());
    sim.stop().await;
}

#[tokio::test]
async fn other_resources_are_404_except_for_leadsin_tokens_which_get_403() {
    let sim = start().await;
    let client = client(&sim);
    let url = format!("{}/PersonAdd", sim.base_url());
    send(&client, url.clone(), Some(RW_TOKEN), "{}")
        .await
        .assert_error(404, "Not Found", "127.0.0.1");
    send(&client, url.clone(), Some(LEAD_TOKEN), "{}")
        .await
        .assert_error(403, "No permissions", "127.0.0.1");
    send(&client, url.clone(), None, "{}")
        .await
        .assert_error(400, "Missing Token", "127.0.0.1");
    send(&client, url, Some("not-a-token"), "{}")
        .await
        .assert_error(401, "Invalid Token", "127.0.0.1");
    assert!(
        sim.requests().is_empty(),
        "only /Leadsin requests are logged"
    );
    sim.stop().await;
}

#[tokio::test]
async fn duplicate_detection_answers_409_for_the_same_payload_in_any_key_order() {
    let sim = start().await;
    sim.set_detect_duplicates(true);
    assert_eq!(
        post_lead(&sim, Some(LEAD_TOKEN), &mike()).await.status,
        StatusCode::CREATED
    );
    // Same lead, keys reordered and spaced differently.
    let reordered = r#"{ "Extra":[{"Value":"Managing Director","ID":"1111111"}],
        "Phone":[{"Type":"work","Number":"111111111111"}], "LastName":"Smith",
        "Email":[{"Type":"work","Address":"mike@company.com"}],
        "OrgName":"Company Inc.", "FirstName":"Mike" }"#;
    send(
        &client(&sim),
        format!("{}/Leadsin", sim.base_url()),
        Some(LEAD_TOKEN),
        reordered,
    )
    .await
    .assert_error(409, "Conflict - Duplicate", "127.0.0.1");

    let mut other = mike();
    other["FirstName"] = json!("Michael");
    assert_eq!(
        post_lead(&sim, Some(LEAD_TOKEN), &other).await.status,
        StatusCode::CREATED
    );
    assert_eq!(sim.received().len(), 2);
    assert_eq!(statuses(&sim), vec![Some(201), Some(409), Some(201)]);

    // The refused repeat is not stored as a lead, but it is recorded: which lead, when, from
    // where, and the body as sent.
    let repeats = sim.repeats();
    assert_eq!(repeats.len(), 1, "{repeats:?}");
    assert_eq!(repeats[0].lead_id, sim.received()[0].lead_id);
    assert_eq!(repeats[0].payload, mike());
    assert_eq!(repeats[0].peer_ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert!(repeats[0].at >= sim.received()[0].received_at);
    assert!(repeats[0].at <= sim.received()[1].received_at);
    sim.stop().await;
}

#[tokio::test]
async fn repeats_are_not_recorded_while_duplicate_detection_is_off() {
    let sim = start().await;
    post_lead(&sim, Some(LEAD_TOKEN), &mike()).await;
    post_lead(&sim, Some(LEAD_TOKEN), &mike()).await;
    assert_eq!(sim.received().len(), 2, "both stored as leads");
    assert!(sim.repeats().is_empty());
    sim.stop().await;
}

#[tokio::test]
async fn status_faults_answer_error_objects_in_script_order_with_retry_after() {
    let sim = start().await;
    sim.push_faults([
        Fault::retry_after(503, "7"),
        Fault::Status {
            status: 429,
            retry_after: None,
            message: Some("Too many requests - slow down".to_owned()),
        },
    ]);

    let first = post_lead(&sim, Some(LEAD_TOKEN), &mike()).await;
    first.assert_error(503, "Service Unavailable", "127.0.0.1");
    assert_eq!(first.headers["retry-after"], "7");
    let second = post_lead(&sim, Some(LEAD_TOKEN), &mike()).await;
    second.assert_error(429, "Too many requests - slow down", "127.0.0.1");
    assert!(second.headers.get("retry-after").is_none());
    let third = post_lead(&sim, Some(LEAD_TOKEN), &mike()).await;
    assert_eq!(third.status, StatusCode::CREATED);

    assert_eq!(sim.received().len(), 1, "faulted requests record no lead");
    assert_eq!(statuses(&sim), vec![Some(503), Some(429), Some(201)]);
    let times: Vec<_> = sim.requests().iter().map(|r| r.at).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert!(sim.pending_faults().is_empty());
    sim.stop().await;
}

#[tokio::test]
async fn a_2xx_status_fault_still_carries_an_error_object() {
    let sim = start().await;
    sim.push_faults([Fault::Status {
        status: 200,
        retry_after: None,
        message: Some("Something went wrong".to_owned()),
    }]);
    let answer = post_lead(&sim, Some(LEAD_TOKEN), &mike()).await;
    answer.assert_error(200, "Something went wrong", "127.0.0.1");
    assert!(sim.received().is_empty());
    sim.stop().await;
}

#[tokio::test]
async fn a_raw_fault_answers_exactly_the_scripted_body() {
    let sim = start().await;
    sim.push_faults([Fault::Raw {
        status: 201,
        content_type: Some("application/json".to_owned()),
        body: r#"{"Header":{"Code":"201"}}"#.to_owned(),
        retry_after: None,
    }]);
    let answer = post_lead(&sim, Some(LEAD_TOKEN), &mike()).await;
    assert_eq!(answer.status, StatusCode::CREATED);
    assert_eq!(answer.text, r#"{"Header":{"Code":"201"}}"#);
    assert!(sim.received().is_empty());
    sim.stop().await;
}

#[tokio::test]
async fn non_json_502_fault_answers_a_proxy_html_page() {
    let sim = start().await;
    sim.push_faults([Fault::NonJson502]);
    let answer = post_lead(&sim, Some(LEAD_TOKEN), &mike()).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert!(
        answer.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(answer.text.contains("502 Bad Gateway"));
    assert!(serde_json::from_str::<Value>(&answer.text).is_err());
    assert!(sim.received().is_empty());
    assert_eq!(statuses(&sim), vec![Some(502)]);
    sim.stop().await;
}

#[tokio::test]
async fn non_json_fault_answers_a_proxy_html_page_with_any_status() {
    let sim = start().await;
    sim.push_faults([
        Fault::NonJson { status: 400 },
        Fault::NonJson { status: 413 },
    ]);
    for (status, title) in [(400, "400 Bad Request"), (413, "413 Payload Too Large")] {
        let answer = post_lead(&sim, Some(LEAD_TOKEN), &mike()).await;
        assert_eq!(answer.status.as_u16(), status);
        assert!(
            answer.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        assert!(answer.text.contains(title), "{}", answer.text);
        assert!(serde_json::from_str::<Value>(&answer.text).is_err());
    }
    assert!(sim.received().is_empty());
    assert_eq!(statuses(&sim), vec![Some(400), Some(413)]);
    sim.stop().await;
}

#[tokio::test]
async fn success_status_fault_creates_the_lead_and_answers_200_or_202_in_the_documented_shape() {
    let sim = start().await;
    sim.push_faults([
        Fault::SuccessStatus { status: 200 },
        Fault::SuccessStatus { status: 202 },
    ]);
    for (status, header_status) in [(200u16, "OK"), (202, "Accepted")] {
        let answer = post_lead(&sim, Some(LEAD_TOKEN), &mike()).await;
        assert_eq!(answer.status.as_u16(), status, "{}", answer.text);
        let body = answer.json();
        assert_eq!(body["Header"]["Code"], json!(status.to_string()), "{body}");
        assert_eq!(body["Header"]["Status"], header_status, "{body}");
        assert_eq!(body["Header"]["Endpoint"], "Leadsin", "{body}");
        let lead_id = body["Data"]["LeadID"].as_str().expect("a LeadID");
        assert_eq!(sim.received().last().unwrap().lead_id, lead_id);
    }
    assert_eq!(sim.received().len(), 2);
    // A refusal is still a refusal: the fault only changes the status of a success.
    sim.push_faults([Fault::SuccessStatus { status: 202 }]);
    post_lead(&sim, Some("someone-else"), &mike())
        .await
        .assert_error(401, "Invalid Token", "127.0.0.1");
    assert_eq!(sim.received().len(), 2);
    sim.stop().await;
}

#[tokio::test]
async fn leadsin_with_another_method_than_post_is_405_and_creates_nothing() {
    let sim = start().await;
    let client = client(&sim);
    let url = format!("{}/Leadsin", sim.base_url());
    for method in [
        reqwest::Method::GET,
        reqwest::Method::PUT,
        reqwest::Method::PATCH,
        reqwest::Method::DELETE,
    ] {
        let response = client
            .request(method.clone(), &url)
            .header("Authorization", LEAD_TOKEN)
            .header("content-type", "application/json")
            .body(mike().to_string())
            .send()
            .await
            .unwrap();
        let answer = Answer {
            status: response.status(),
            headers: response.headers().clone(),
            text: response.text().await.unwrap(),
        };
        answer.assert_error(405, "Method Not Allowed", "127.0.0.1");
        assert_eq!(answer.headers["allow"], "POST", "{method}");
    }
    assert!(sim.received().is_empty(), "only a POST creates a lead");
    assert!(sim.requests().is_empty(), "{:?}", sim.requests());
    post_lead(&sim, Some(LEAD_TOKEN), &mike()).await;
    assert_eq!(sim.received().len(), 1);
    sim.stop().await;
}

#[tokio::test]
async fn drop_fault_closes_the_connection_without_any_http_answer() {
    let sim = start().await;
    sim.push_faults([Fault::Drop]);
    let client = client(&sim);
    let result = client
        .post(format!("{}/Leadsin", sim.base_url()))
        .header("Authorization", LEAD_TOKEN)
        .body(mike().to_string())
        .send()
        .await;
    let err = result.expect_err("no HTTP answer, not even a status line");
    assert!(
        !err.is_timeout(),
        "the connection closed rather than stalled: {err:?}"
    );
    assert!(err.status().is_none());

    assert!(sim.received().is_empty());
    let log = sim.requests();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].status, None);
    assert_eq!(log[0].outcome, RequestOutcome::Dropped);

    // The server is unharmed: the next request is handled normally.
    assert_eq!(
        post_lead(&sim, Some(LEAD_TOKEN), &mike()).await.status,
        StatusCode::CREATED
    );
    sim.stop().await;
}

#[tokio::test]
async fn drop_after_accept_records_the_lead_but_the_client_gets_no_answer() {
    let sim = start().await;
    sim.set_detect_duplicates(true);
    sim.push_faults([Fault::DropAfterAccept]);
    let client = client(&sim);
    let url = format!("{}/Leadsin", sim.base_url());
    let result = client
        .post(&url)
        .header("Authorization", LEAD_TOKEN)
        .body(mike().to_string())
        .send()
        .await;
    assert!(
        result.is_err(),
        "no answer to the request that created the lead"
    );
    assert_eq!(sim.received().len(), 1);
    assert_eq!(sim.requests()[0].outcome, RequestOutcome::Dropped);

    // The client's retry of the same lead is then a duplicate.
    send(&client, url, Some(LEAD_TOKEN), mike().to_string())
        .await
        .assert_error(409, "Conflict - Duplicate", "127.0.0.1");
    assert_eq!(sim.received().len(), 1);
    sim.stop().await;
}

#[tokio::test]
async fn delay_fault_answers_normally_after_the_delay() {
    let sim = start().await;
    sim.push_faults([Fault::Delay { ms: 300 }]);
    let started = Instant::now();
    let answer = post_lead(&sim, Some(LEAD_TOKEN), &mike()).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(answer.status, StatusCode::CREATED);
    assert_eq!(sim.received().len(), 1);
    sim.stop().await;
}

#[tokio::test]
async fn client_giving_up_during_a_delay_cancels_the_request_and_records_nothing() {
    let sim = start().await;
    sim.push_faults([Fault::Delay { ms: 60_000 }]);
    let impatient = client_builder(&sim)
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let result = impatient
        .post(format!("{}/Leadsin", sim.base_url()))
        .header("Authorization", LEAD_TOKEN)
        .body(mike().to_string())
        .send()
        .await;
    assert!(result.expect_err("the client gives up").is_timeout());
    drop(impatient);

    // The Cancelled outcome is written only when the handler's future is dropped, so once it
    // shows, the lead can no longer be recorded.
    eventually("the handler is cancelled", || {
        sim.requests()
            .first()
            .is_some_and(|r| r.outcome == RequestOutcome::Cancelled)
    })
    .await;
    assert!(sim.received().is_empty());
    assert_eq!(statuses(&sim), vec![None]);
    sim.stop().await;
}

#[tokio::test]
async fn an_answer_delay_creates_the_lead_at_once_and_answers_late() {
    let sim = start().await;
    sim.set_answer_delay(Duration::from_millis(300));
    let posting = tokio::spawn({
        let client = client(&sim);
        let url = format!("{}/Leadsin", sim.base_url());
        async move {
            let started = Instant::now();
            let answer = send(&client, url, Some(LEAD_TOKEN), mike().to_string()).await;
            (answer.status, started.elapsed())
        }
    });
    // Created before the answer leaves.
    eventually("the lead is created", || sim.received().len() == 1).await;
    assert_eq!(sim.requests()[0].outcome, RequestOutcome::InFlight);
    let (status, took) = posting.await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert_eq!(statuses(&sim), vec![Some(201)]);
    sim.stop().await;
}

#[tokio::test]
async fn a_client_giving_up_on_a_late_answer_leaves_the_lead_created_and_its_retry_is_a_repeat() {
    let sim = start().await;
    sim.set_detect_duplicates(true);
    sim.set_answer_delay(Duration::from_secs(60));
    let impatient = client_builder(&sim)
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let url = format!("{}/Leadsin", sim.base_url());
    let result = impatient
        .post(&url)
        .header("Authorization", LEAD_TOKEN)
        .body(mike().to_string())
        .send()
        .await;
    assert!(result.expect_err("the client gives up").is_timeout());
    drop(impatient);
    eventually("the request is abandoned", || {
        sim.requests()
            .first()
            .is_some_and(|r| r.outcome == RequestOutcome::Abandoned)
    })
    .await;
    assert_eq!(sim.received().len(), 1, "the lead stays created");
    assert_eq!(statuses(&sim), vec![None]);

    // The client tries again (now answered at once): Onpipeline already has it.
    sim.set_answer_delay(Duration::ZERO);
    send(&client(&sim), url, Some(LEAD_TOKEN), mike().to_string())
        .await
        .assert_error(409, "Conflict - Duplicate", "127.0.0.1");
    assert_eq!(sim.received().len(), 1);
    assert_eq!(sim.repeats().len(), 1);
    assert_eq!(sim.repeats()[0].lead_id, sim.received()[0].lead_id);
    sim.stop().await;
}

#[tokio::test]
async fn persistent_latency_delays_every_request() {
    let sim = start().await;
    sim.set_latency(Duration::from_millis(200));
    for _ in 0..2 {
        let started = Instant::now();
        let answer = post_lead(&sim, Some(LEAD_TOKEN), &mike()).await;
        assert_eq!(answer.status, StatusCode::CREATED);
        assert!(started.elapsed() >= Duration::from_millis(200));
    }
    assert_eq!(
        sim.settings(),
        SimSettings {
            detect_duplicates: false,
            latency_ms: 200,
            answer_delay_ms: 0,
            custom_fields: None,
        }
    );
    sim.stop().await;
}

#[tokio::test]
async fn control_endpoints_script_faults_settings_and_expose_what_was_received() {
    let sim = start().await;
    let client = client(&sim);
    let base = sim.base_url();

    let scripted = client
        .post(format!("{base}/_sim/faults"))
        .body(r#"[{"kind":"status","status":503,"retry_after":"1"},{"kind":"non_json_502"}]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(scripted.status(), StatusCode::OK);
    assert_eq!(
        scripted.json::<Value>().await.unwrap(),
        json!({"pending": 2})
    );
    let one = client
        .post(format!("{base}/_sim/faults"))
        .body(r#"{"kind":"drop"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(one.json::<Value>().await.unwrap(), json!({"pending": 3}));
    assert_eq!(sim.pending_faults().len(), 3);
    let cleared = client
        .delete(format!("{base}/_sim/faults"))
        .send()
        .await
        .unwrap();
    assert_eq!(cleared.status(), StatusCode::NO_CONTENT);
    assert!(sim.pending_faults().is_empty());
    client
        .post(format!("{base}/_sim/faults"))
        .body(r#"[{"kind":"status","status":503}]"#)
        .send()
        .await
        .unwrap();

    let settings: Value = client
        .post(format!("{base}/_sim/settings"))
        .body(r#"{"detect_duplicates": true}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        settings,
        json!({"detect_duplicates": true, "latency_ms": 0, "answer_delay_ms": 0, "custom_fields": null})
    );
    assert!(sim.settings().detect_duplicates);

    let bad = client
        .post(format!("{base}/_sim/settings"))
        .body(r#"{"detect_duplicates": "yes"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    post_lead(&sim, Some(LEAD_TOKEN), &mike())
        .await
        .assert_error(503, "Service Unavailable", "127.0.0.1");
    post_lead(&sim, Some(LEAD_TOKEN), &mike()).await;
    post_lead(&sim, Some(LEAD_TOKEN), &mike())
        .await
        .assert_error(409, "Duplicate", "127.0.0.1");

    let leads: Value = client
        .get(format!("{base}/_sim/leads"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(leads, serde_json::to_value(sim.received()).unwrap());
    assert_eq!(leads[0]["payload"], mike());
    assert_eq!(leads[0]["peer_ip"], "127.0.0.1");

    let requests: Value = client
        .get(format!("{base}/_sim/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let got: Vec<(Value, Value)> = requests
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["status"].clone(), r["outcome"].clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (json!(503), json!("answered")),
            (json!(201), json!("answered")),
            (json!(409), json!("answered")),
        ]
    );

    let repeats: Value = client
        .get(format!("{base}/_sim/repeats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(repeats, serde_json::to_value(sim.repeats()).unwrap());
    assert_eq!(repeats.as_array().unwrap().len(), 1);
    assert_eq!(repeats[0]["lead_id"], leads[0]["lead_id"]);
    assert_eq!(repeats[0]["payload"], mike());

    let reset = client
        .delete(format!("{base}/_sim/leads"))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), StatusCode::NO_CONTENT);
    assert!(sim.received().is_empty());
    assert!(sim.requests().is_empty());
    assert!(sim.repeats().is_empty());
    // The duplicate memory went with the leads.
    assert_eq!(
        post_lead(&sim, Some(LEAD_TOKEN), &mike()).await.status,
        StatusCode::CREATED
    );
    sim.stop().await;
}

#[tokio::test]
async fn the_certificate_verifies_only_against_the_simulators_ca() {
    let sim = start().await;

    // Public roots only: the simulator's certificate must not be trusted.
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let public_only = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let untrusting = reqwest::Client::builder()
        .tls_backend_preconfigured(public_only)
        .no_proxy()
        .build()
        .unwrap();
    let err = untrusting
        .post(format!("{}/Leadsin", sim.base_url()))
        .header("Authorization", LEAD_TOKEN)
        .body(mike().to_string())
        .send()
        .await
        .expect_err("an unknown issuer is refused");
    assert!(err.is_connect(), "{err:?}");
    assert!(sim.requests().is_empty(), "nothing reached the handler");

    // With the CA from its PEM, the name `localhost` verifies as well as the IP.
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(sim.ca_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let trusting = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(trusting)
        .no_proxy()
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/Leadsin", sim.addr().port());
    let answer = send(&client, url, Some(LEAD_TOKEN), mike().to_string()).await;
    assert_eq!(answer.status, StatusCode::CREATED);
    sim.stop().await;
}

#[tokio::test]
async fn ca_out_writes_the_ca_pem_for_clients() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sim-ca.pem");
    let sim = Simulator::start(SimConfig {
        ca_out: Some(path.clone()),
        ..config()
    })
    .await
    .unwrap();
    let written = std::fs::read_to_string(&path).unwrap();
    assert_eq!(written, sim.ca_pem());
    assert!(written.starts_with("-----BEGIN CERTIFICATE-----"));
    sim.stop().await;
}

#[tokio::test]
async fn simulator_serves_on_ipv6_loopback() {
    let sim = Simulator::start(SimConfig {
        listen: "[::1]:0".parse::<SocketAddr>().unwrap(),
        ..config()
    })
    .await
    .unwrap();
    assert!(
        sim.base_url().starts_with("https://[::1]:"),
        "{}",
        sim.base_url()
    );
    let answer = post_lead(&sim, Some(LEAD_TOKEN), &mike()).await;
    assert_eq!(answer.status, StatusCode::CREATED);
    assert_eq!(sim.received()[0].peer_ip, "::1".parse::<IpAddr>().unwrap());
    sim.stop().await;
}

#[tokio::test]
async fn stop_closes_the_listener() {
    let sim = start().await;
    let url = format!("{}/Leadsin", sim.base_url());
    let client = client(&sim);
    assert_eq!(
        send(&client, url.clone(), Some(LEAD_TOKEN), mike().to_string())
            .await
            .status,
        StatusCode::CREATED
    );
    drop(client);
    let fresh = client_builder(&sim).build().unwrap();
    let started = Instant::now();
    sim.stop().await;
    assert!(started.elapsed() < Duration::from_secs(5), "stop is prompt");
    let err = fresh
        .post(url)
        .header("Authorization", LEAD_TOKEN)
        .body(mike().to_string())
        .send()
        .await
        .expect_err("nothing listens any more");
    assert!(err.is_connect(), "{err:?}");
}

#[tokio::test]
async fn an_extra_id_the_account_does_not_have_is_refused_with_406() {
    let sim = start().await;
    sim.set_custom_fields(&["1111111"]);
    let mut lead = mike();
    lead["Extra"] = json!([{"ID": "1111111", "Value": "ok"}]);
    assert_eq!(
        post_lead(&sim, Some(LEAD_TOKEN), &lead).await.status,
        StatusCode::CREATED
    );
    lead["Extra"] = json!([{"ID": "9999999", "Value": "unknown field"}]);
    let answer = post_lead(&sim, Some(LEAD_TOKEN), &lead).await;
    assert_eq!(answer.status, StatusCode::NOT_ACCEPTABLE);
    assert!(answer.text.contains("9999999"), "{}", answer.text);
    sim.set_custom_fields(&[]);
    assert_eq!(
        post_lead(&sim, Some(LEAD_TOKEN), &lead).await.status,
        StatusCode::CREATED
    );
    sim.stop().await;
}

// ---- The Graph API side, driven over HTTPS as a test script or an operator would ---------

/// A GET on the simulator: status, and the body as text (Graph answers are `\u`-escaped).
async fn get(client: &reqwest::Client, url: String) -> (StatusCode, String) {
    let response = client.get(url).send().await.expect("an HTTP answer");
    (response.status(), response.text().await.expect("a body"))
}

/// The Graph error code and subcode of an answer, or `None` for an answer without an error.
fn graph_error(text: &str) -> Option<(i64, Option<i64>)> {
    let body: Value = serde_json::from_str(text).expect("Graph answers JSON");
    let error = body.get("error")?;
    Some((error["code"].as_i64()?, error["error_subcode"].as_i64()))
}

fn graph_lead(id: &str, form: &str, created: &str, name: &str) -> Value {
    json!({
        "id": id, "form_id": form, "created_time": created,
        "ad_id": "120210000000000001", "platform": "ig",
        "field_data": [{"name": "full_name", "values": [name]}],
    })
}

#[tokio::test]
async fn graph_leads_registered_over_http_are_served_by_id_and_listed_by_form_newest_first() {
    let sim = start().await;
    let client = client(&sim);
    let base = sim.base_url();
    // Both control routes live under /_sim/graph, which the /_sim scope would answer 404 if
    // it were registered first.
    let registered = client
        .post(format!("{base}/_sim/graph/leads"))
        .body(
            json!([
                graph_lead("9100", "77", "2024-05-01T10:00:00+0000", "Åsa Berg"),
                graph_lead("9101", "77", "2024-05-01T11:00:00+0000", "Leo Berg"),
            ])
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), StatusCode::OK);
    assert_eq!(
        registered.json::<Value>().await.unwrap(),
        json!({"registered": 2})
    );
    let one = client
        .post(format!("{base}/_sim/graph/leads"))
        .body(graph_lead("9200", "78", "2024-05-01T09:00:00+0000", "Other Form").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(one.json::<Value>().await.unwrap(), json!({"registered": 1}));

    let (status, text) = get(
        &client,
        format!("{base}/graph/9100?fields=field_data,form_id&access_token=EAAB-any"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(text.is_ascii() && text.contains(r"\u00c5sa"), "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap(),
        json!({"id": "9100", "field_data": [{"name": "full_name", "values": ["Åsa Berg"]}],
               "form_id": "77"}),
        "only the asked fields, and the id"
    );

    let (status, text) = get(
        &client,
        format!("{base}/graph/77/leads?access_token=EAAB-any"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let listing: Value = serde_json::from_str(&text).unwrap();
    let ids: Vec<&str> = listing["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|lead| lead["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["9101", "9100"]);

    // A lead the simulator does not know gets Graph's 100/33.
    let (status, text) = get(&client, format!("{base}/graph/9999?access_token=EAAB-any")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(graph_error(&text), Some((100, Some(33))));
}

#[tokio::test]
async fn graph_errors_scripted_over_http_answer_one_lead_until_cleared_and_the_next_n_calls() {
    let sim = start().await;
    let client = client(&sim);
    let base = sim.base_url();
    client
        .post(format!("{base}/_sim/graph/leads"))
        .body(
            json!([
                graph_lead("9300", "79", "2024-05-01T10:00:00+0000", "Ines Costa"),
                graph_lead("9301", "79", "2024-05-01T10:05:00+0000", "Rui Costa"),
            ])
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    let scripted = client
        .post(format!("{base}/_sim/graph/errors"))
        .body(
            r#"[{"code": 190, "error_subcode": 463, "lead_id": "9300"},
                {"code": 17, "times": 2}]"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(scripted.status(), StatusCode::OK);
    assert_eq!(
        scripted.json::<Value>().await.unwrap(),
        json!({"pending": 2})
    );
    let read = |id: &str| get(&client, format!("{base}/graph/{id}?access_token=EAAB-any"));

    // The next two calls of any kind (here a read and a listing) get the rate limit…
    let (status, text) = read("9301").await;
    assert_eq!(
        (status, graph_error(&text)),
        (StatusCode::BAD_REQUEST, Some((17, None)))
    );
    let (_, text) = get(
        &client,
        format!("{base}/graph/79/leads?access_token=EAAB-any"),
    )
    .await;
    assert_eq!(graph_error(&text), Some((17, None)));
    // …then they are used up.
    let (status, text) = read("9301").await;
    assert_eq!((status, graph_error(&text)), (StatusCode::OK, None));
    // The error for one lead answers only that lead, every time, until cleared.
    for _ in 0..2 {
        let (status, text) = read("9300").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(graph_error(&text), Some((190, Some(463))));
    }
    let cleared = client
        .delete(format!("{base}/_sim/graph/errors"))
        .send()
        .await
        .unwrap();
    assert_eq!(cleared.status(), StatusCode::NO_CONTENT);
    let (status, text) = read("9300").await;
    assert_eq!((status, graph_error(&text)), (StatusCode::OK, None));

    let calls: Value = client
        .get(format!("{base}/_sim/graph/calls"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let log: Vec<(&str, &str, u64)> = calls
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["method"].as_str().unwrap(),
                c["path"].as_str().unwrap(),
                c["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        log,
        [
            ("GET", "/9301", 400),
            ("GET", "/79/leads", 400),
            ("GET", "/9301", 200),
            ("GET", "/9300", 400),
            ("GET", "/9300", 400),
            ("GET", "/9300", 200),
        ]
    );

    // A rate limit can say how long to wait.
    client
        .post(format!("{base}/_sim/graph/errors"))
        .body(r#"{"code": 4, "times": 1, "retry_after": 7}"#)
        .send()
        .await
        .unwrap();
    let limited = client
        .get(format!("{base}/graph/9301?access_token=EAAB-any"))
        .send()
        .await
        .unwrap();
    assert_eq!(limited.headers()["retry-after"], "7");
    assert_eq!(graph_error(&limited.text().await.unwrap()), Some((4, None)));
}

#[tokio::test]
async fn graph_settings_over_http_admit_only_the_given_tokens_check_the_proof_and_the_log_hides_both()
 {
    use hmac::{Hmac, Mac};

    let sim = start().await;
    let client = client(&sim);
    let base = sim.base_url();
    client
        .post(format!("{base}/_sim/graph/leads"))
        .body(graph_lead("9400", "80", "2024-05-01T10:00:00+0000", "Mia Lund").to_string())
        .send()
        .await
        .unwrap();
    let set = client
        .post(format!("{base}/_sim/graph/settings"))
        .body(r#"{"tokens": ["EAAB-good-token"], "app_secret": "app-secret-0001"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), StatusCode::NO_CONTENT);
    let proof = |token: &str| {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"app-secret-0001").unwrap();
        mac.update(token.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    };
    let read = |token: &str, proof: String| {
        get(
            &client,
            format!("{base}/graph/9400?access_token={token}&appsecret_proof={proof}"),
        )
    };
    let (_, text) = read("EAAB-other-token", proof("EAAB-other-token")).await;
    assert_eq!(graph_error(&text), Some((190, Some(463))), "{text}");
    let (_, text) = read("EAAB-good-token", proof("EAAB-other-token")).await;
    assert_eq!(graph_error(&text).map(|e| e.0), Some(100), "{text}");
    let (status, text) = read("EAAB-good-token", proof("EAAB-good-token")).await;
    assert_eq!(
        (status, graph_error(&text)),
        (StatusCode::OK, None),
        "{text}"
    );

    let bad_settings = client
        .post(format!("{base}/_sim/graph/settings"))
        .body(r#"{"tokenz": []}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad_settings.status(), StatusCode::BAD_REQUEST);

    let (status, calls) = get(&client, format!("{base}/_sim/graph/calls")).await;
    assert_eq!(status, StatusCode::OK);
    let calls: Value = serde_json::from_str(&calls).unwrap();
    assert_eq!(calls.as_array().unwrap().len(), 3);
    for call in calls.as_array().unwrap() {
        assert_eq!(
            call["query"], "access_token=***&appsecret_proof=***",
            "{call}"
        );
    }
}
