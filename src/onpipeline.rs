//! The Leadsin client: builds the request, sends it over HTTPS from the configured egress, and
//! classifies Onpipeline's answer into an [`Outcome`]. Policy (when to retry, when to pause)
//! lives in the forwarder and [`crate::retry`]; this module only says what the answer meant.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use crate::lead::LeadsinPayload;
use crate::retry::parse_retry_after;

/// What one delivery attempt came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Onpipeline created the lead (200/201/202 with a `Header`).
    Delivered {
        lead_id: Option<String>,
        status: u16,
    },
    /// Onpipeline already has this lead (409): counts as delivered.
    Duplicate,
    /// A temporary failure: try again later, not before `after` when Onpipeline said so.
    RetryLater {
        reason: String,
        status: Option<u16>,
        after: Option<Duration>,
    },
    /// Onpipeline refused the data for good: its `Error` object says 400, 406, 413 or 422
    /// (whatever the HTTP status). A bare status without that object is never a rejection.
    Rejected { reason: String, status: u16 },
    /// Our credentials or egress are wrong (401, 403, 404): stop all delivery until fixed.
    Paused { reason: String, status: u16 },
}

impl Outcome {
    /// The `outcome` label of the attempts metric.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Delivered { .. } => "delivered",
            Outcome::Duplicate => "duplicate",
            Outcome::RetryLater { .. } => "retry",
            Outcome::Rejected { .. } => "rejected",
            Outcome::Paused { .. } => "paused",
        }
    }

    /// Onpipeline's HTTP status, when an answer came.
    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Delivered { status, .. }
            | Outcome::Rejected { status, .. }
            | Outcome::Paused { status, .. } => Some(*status),
            Outcome::Duplicate => Some(409),
            Outcome::RetryLater { status, .. } => *status,
        }
    }
}

/// How to reach Onpipeline.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    pub endpoint: Url,
    pub timeout: Duration,
    pub egress_ip: Option<IpAddr>,
    /// `http://user:pass@proxy:3128` — may hold credentials, so it is a secret.
    pub egress_proxy: Option<SecretString>,
    /// Extra trusted root CAs (PEM): `LEADGATE_CA_FILE`, the sandbox simulator's CA.
    pub extra_ca_pem: Vec<Vec<u8>>,
    pub max_connections: usize,
}

#[derive(Clone)]
pub struct LeadsinClient {
    http: reqwest::Client,
    endpoint: Url,
}

impl LeadsinClient {
    pub fn new(settings: &ClientSettings) -> anyhow::Result<Self> {
        let extra: Vec<&[u8]> = settings.extra_ca_pem.iter().map(Vec::as_slice).collect();
        let tls = crate::tls::client_config(&extra)?;
        let mut builder = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(true)
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(settings.max_connections)
            .user_agent(concat!("leadgate/", env!("CARGO_PKG_VERSION")));
        if let Some(ip) = settings.egress_ip {
            builder = builder.local_address(ip);
        }
        if let Some(proxy) = &settings.egress_proxy {
            let proxy = reqwest::Proxy::all(proxy.expose_secret())
                .map_err(|_| anyhow::anyhow!("LEADGATE_EGRESS_PROXY is not a usable proxy URL"))?;
            builder = builder.proxy(proxy);
        }
        let http = builder
            .build()
            .context("building the Onpipeline HTTP client")?;
        Ok(Self {
            http,
            endpoint: settings.endpoint.clone(),
        })
    }

    pub fn endpoint(&self) -> &Url {
        &self.endpoint
    }

    /// One delivery attempt. Never fails: transport errors are outcomes too.
    pub async fn send(&self, token: &SecretString, payload: &LeadsinPayload) -> Outcome {
        let request = self
            .http
            .post(self.endpoint.clone())
            .header(reqwest::header::AUTHORIZATION, token.expose_secret())
            .header(reqwest::header::ACCEPT, "application/json")
            .json(payload);
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => return transport_failure(&e),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        match response.bytes().await {
            Ok(body) => classify(status, retry_after.as_deref(), &body, SystemTime::now()),
            Err(e) => {
                // The status arrived but the body did not: Onpipeline may or may not have
                // created the lead. Retrying is safe because a repeat is answered 409.
                let mut outcome = transport_failure(&e);
                if let Outcome::RetryLater { status: s, .. } = &mut outcome {
                    *s = Some(status);
                }
                outcome
            }
        }
    }
}

fn transport_failure(e: &reqwest::Error) -> Outcome {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "the answer was cut off"
    } else {
        "request failed"
    };
    // reqwest's Display carries the URL but never headers, so no token can leak here.
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        detail.push_str(": ");
        detail.push_str(&cause.to_string());
        source = cause.source();
    }
    Outcome::RetryLater {
        reason: format!("{kind}: {detail}"),
        status: None,
        after: None,
    }
}

/// Statuses of a success answer (with Onpipeline's `Header`).
const DELIVERED: [u16; 3] = [200, 201, 202];
/// Codes of an `Error` object that refuse the data for good.
const REJECTED: [u16; 4] = [400, 406, 413, 422];
/// Statuses (and `Error` codes) that mean our credentials, egress or URL are wrong.
const PAUSED: [u16; 3] = [401, 403, 404];
/// Retry statuses common enough to export from start-up: rate limiting, Onpipeline's own 500,
/// and a proxy's or load balancer's 502, 503 and 504. Any other status is retried too, its
/// series appearing when first met.
const RETRY_EXPECTED: [u16; 5] = [429, 500, 502, 503, 504];

/// The (`outcome`, `status`) labels of the attempts metric known in advance, from the same
/// lists [`classify`] matches on (and `retry`/`none`: no answer came), so the metric's series
/// and the classification cannot drift apart.
pub fn known_attempt_labels() -> Vec<(&'static str, String)> {
    let with = |outcome: &'static str, statuses: &[u16]| {
        statuses
            .iter()
            .map(move |s| (outcome, s.to_string()))
            .collect::<Vec<_>>()
    };
    let mut labels = with("delivered", &DELIVERED);
    labels.extend(with("duplicate", &[409]));
    labels.extend(with("rejected", &REJECTED));
    labels.extend(with("paused", &PAUSED));
    labels.extend(with("retry", &RETRY_EXPECTED));
    labels.push(("retry", "none".to_owned()));
    labels
}

/// Reads an answer of Onpipeline, following its API reference: a JSON body with `Header` and
/// `Data` on success, or an `Error` object (`Code`, `Message`) — which is an error even when
/// the HTTP status is 2xx. The code in the body wins over the HTTP status when both exist.
///
/// Onpipeline's API always answers JSON, so an answer without an `Error` object and without a
/// `Header` did not come from it: a proxy, a WAF or a load balancer in between answered (an
/// HTML 400, 413 or 502 page, an empty body). Such an answer says nothing about the lead, so it
/// is retried — never dead-lettered — except 401, 403 and 404, which still pause delivery: they
/// mean our credentials, egress or URL are wrong, and pausing loses nothing while it probes.
///
/// This is the one place answers are classified; the table in the README follows it row by row.
pub fn classify(status: u16, retry_after: Option<&str>, body: &[u8], now: SystemTime) -> Outcome {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let error = json
        .as_ref()
        .and_then(|j| j.get("Error"))
        .filter(|e| e.is_object());
    let after = retry_after.and_then(|v| parse_retry_after(v, now));

    if let Some(error) = error {
        let code = error
            .get("Code")
            .and_then(|c| match c {
                Value::String(s) => s.trim().parse::<u16>().ok(),
                Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                _ => None,
            })
            .filter(|c| *c >= 400)
            .unwrap_or(if status >= 400 { status } else { 500 });
        let message = error
            .get("Message")
            .and_then(Value::as_str)
            .unwrap_or("no message")
            .chars()
            .take(300)
            .collect::<String>();
        let reason = format!("Onpipeline error {code}: {}", mask_contacts(&message));
        return match code {
            409 => Outcome::Duplicate,
            code if REJECTED.contains(&code) => Outcome::Rejected {
                reason,
                status: code,
            },
            code if PAUSED.contains(&code) => Outcome::Paused {
                reason,
                status: code,
            },
            _ => Outcome::RetryLater {
                reason,
                status: Some(code),
                after,
            },
        };
    }

    let header = json.as_ref().and_then(|j| j.get("Header"));
    match status {
        status if DELIVERED.contains(&status) && header.is_some() => {
            let lead_id = json
                .as_ref()
                .and_then(|j| j.pointer("/Data/LeadID"))
                .and_then(|id| match id {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                });
            Outcome::Delivered { lead_id, status }
        }
        // A 2xx that is not Onpipeline's JSON (a proxy page, an empty body): we cannot tell
        // whether the lead was created, so try again; a repeat is answered 409.
        200..=299 => Outcome::RetryLater {
            reason: format!(
                "HTTP {status} without Onpipeline's Header: {}",
                snippet(body)
            ),
            status: Some(status),
            after,
        },
        status if PAUSED.contains(&status) => Outcome::Paused {
            reason: format!("HTTP {status}: {}", snippet(body)),
            status,
        },
        _ => Outcome::RetryLater {
            reason: format!(
                "HTTP {status} without Onpipeline's Error object: {}",
                snippet(body)
            ),
            status: Some(status),
            after,
        },
    }
}

/// The first bytes of a body, as text on one line, for reasons and logs.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.is_empty() {
        "empty body".to_owned()
    } else {
        mask_contacts(&line)
    }
}

/// Masks what looks like an email address or a phone number in Onpipeline's free text (its
/// `Error.Message`, a proxy's page), which may quote the lead: reasons are logged, stored with
/// dead letters and shown by the admin API. A word with an `@` is an address; a run of digits
/// and phone punctuation is a number when it holds 9 or more digits, or starts with `+` and
/// holds 7 — so the 7-digit custom field IDs Onpipeline names in its errors stay readable.
fn mask_contacts(text: &str) -> String {
    let is_phone_char =
        |c: char| c.is_ascii_digit() || matches!(c, '+' | '-' | '(' | ')' | '.' | ' ');
    let is_word_break = |c: char| {
        c.is_whitespace()
            || matches!(
                c,
                '<' | '>' | '(' | ')' | '[' | ']' | '{' | '}' | ',' | ';' | ':' | '"' | '\'' | '='
            )
    };
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if is_word_break(c) && c != ' ' && c != '(' {
            out.push(c);
            rest = &rest[c.len_utf8()..];
            continue;
        }
        // A word (up to the next break) holding an `@` is an address.
        let word_end = rest.find(is_word_break).unwrap_or(rest.len());
        let word = &rest[..word_end];
        if let Some(at) = word.find('@')
            && at > 0
            && at + 1 < word.len()
        {
            out.push_str(&crate::telemetry::mask_email(word));
            rest = &rest[word_end..];
            continue;
        }
        if c.is_ascii_digit() || c == '+' || c == '(' {
            let run_end = rest.find(|c: char| !is_phone_char(c)).unwrap_or(rest.len());
            let run = rest[..run_end].trim_end_matches([' ', '-', '.', '(']);
            let digits = run.chars().filter(char::is_ascii_digit).count();
            if digits >= 9 || (run.starts_with('+') && digits >= 7) {
                out.push_str(&crate::telemetry::mask_phone(run));
                rest = &rest[run.len()..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_and_phone_numbers_in_onpipeline_s_text_are_masked() {
        assert_eq!(
            mask_contacts("Email leak.me@example.com is invalid, phone +44 7911 123456."),
            "Email l***@example.com is invalid, phone +44********56."
        );
        assert_eq!(
            mask_contacts("<html>leak2.me@example.com (020) 7946-0018</html>"),
            "<html>l***@example.com (020) 7946-0018</html>".replace(
                "(020) 7946-0018",
                &crate::telemetry::mask_phone("(020) 7946-0018")
            )
        );
        assert_eq!(
            mask_contacts("Onpipeline error 406: FirstName is required"),
            "Onpipeline error 406: FirstName is required"
        );
        assert_eq!(
            mask_contacts("Extra[0].ID 9999999 is not a custom field of this account"),
            "Extra[0].ID 9999999 is not a custom field of this account"
        );
        assert_eq!(mask_contacts("call +44 20 7946"), "call +44****46");
        let reason = match classify(
            406,
            None,
            br#"{"Error":{"Code":406,"Message":"Email ana@example.com, phone 07911123456"}}"#,
            now(),
        ) {
            Outcome::Rejected { reason, .. } => reason,
            other => panic!("{other:?}"),
        };
        assert!(
            !reason.contains("ana@example.com") && !reason.contains("07911123456"),
            "{reason}"
        );
        let reason = match classify(
            502,
            None,
            b"<h1>Bad gateway</h1> for bob@example.org",
            now(),
        ) {
            Outcome::RetryLater { reason, .. } => reason,
            other => panic!("{other:?}"),
        };
        assert!(
            reason.contains("b***@example.org") && !reason.contains("bob@"),
            "{reason}"
        );
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn labels(outcome: &Outcome) -> (&'static str, String) {
        (
            outcome.label(),
            outcome
                .status()
                .map_or_else(|| "none".to_owned(), |s| s.to_string()),
        )
    }

    /// Every answer classify can make, over every status with Onpipeline's error object, its
    /// success shape, and a proxy's page: each one that is not a retry of an unusual status
    /// has its series exported from start-up, and every exported series is one classify makes.
    #[test]
    fn every_classified_outcome_is_in_the_known_attempt_labels_and_every_label_is_made() {
        let known = known_attempt_labels();
        let mut made = std::collections::BTreeSet::new();
        for status in 100..=599u16 {
            let code = status.to_string();
            let bodies = [
                serde_json::to_vec(&serde_json::json!({"Error": {"Code": code, "Message": "m"}}))
                    .unwrap(),
                br#"{"Header": {"Status": "ok"}, "Data": {"LeadID": "1"}}"#.to_vec(),
                b"<html>proxy</html>".to_vec(),
            ];
            for body in bodies {
                let outcome = classify(status, None, &body, now());
                let pair = labels(&outcome);
                let unusual_retry = matches!(outcome, Outcome::RetryLater { .. })
                    && !RETRY_EXPECTED.contains(&status);
                if !unusual_retry {
                    assert!(known.contains(&pair), "{status}: {pair:?} is not exported");
                }
                made.insert(pair);
            }
        }
        made.insert(labels(&Outcome::RetryLater {
            reason: "timed out".to_owned(),
            status: None,
            after: None,
        }));
        for pair in &known {
            assert!(made.contains(pair), "{pair:?} is exported but never made");
        }
        let unique: std::collections::BTreeSet<_> = known.iter().collect();
        assert_eq!(unique.len(), known.len(), "a label pair is listed twice");
    }

    fn error_body(code: &str, message: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "Error": {"Code": code, "Message": message, "Time": "2026-12-03 10:00:00", "IP": "127.0.0.1"}
        }))
        .unwrap()
    }

    const CREATED: &[u8] = br#"{"Header":{"Status":"Created","Code":"201","Time":"2026-12-03 10:00:00","Endpoint":"Leadsin"},"Data":{"LeadID":"123456789HSY7584306"}}"#;

    #[test]
    fn created_with_header_is_delivered_with_the_lead_id() {
        assert_eq!(
            classify(201, None, CREATED, now()),
            Outcome::Delivered {
                lead_id: Some("123456789HSY7584306".into()),
                status: 201
            }
        );
        assert!(matches!(
            classify(200, None, CREATED, now()),
            Outcome::Delivered { .. }
        ));
    }

    #[test]
    fn an_error_object_is_an_error_even_with_status_200() {
        let outcome = classify(200, None, &error_body("406", "Not acceptable"), now());
        assert!(
            matches!(outcome, Outcome::Rejected { status: 406, .. }),
            "{outcome:?}"
        );
        let outcome = classify(201, None, &error_body("401", "Invalid Token"), now());
        assert!(
            matches!(outcome, Outcome::Paused { status: 401, .. }),
            "{outcome:?}"
        );
    }

    #[test]
    fn each_status_row_classifies_as_the_reference_says() {
        let rows: [(u16, &str); 9] = [
            (400, "rejected"),
            (401, "paused"),
            (403, "paused"),
            (404, "paused"),
            (406, "rejected"),
            (409, "duplicate"),
            (429, "retry"),
            (500, "retry"),
            (503, "retry"),
        ];
        for (status, expected) in rows {
            let outcome = classify(status, None, &error_body(&status.to_string(), "x"), now());
            let got = match outcome {
                Outcome::Rejected { .. } => "rejected",
                Outcome::Paused { .. } => "paused",
                Outcome::Duplicate => "duplicate",
                Outcome::RetryLater { .. } => "retry",
                Outcome::Delivered { .. } => "delivered",
            };
            assert_eq!(got, expected, "status {status}");
        }
    }

    #[test]
    fn retry_after_is_read_on_429() {
        let outcome = classify(429, Some("7"), &error_body("429", "slow down"), now());
        assert_eq!(
            outcome,
            Outcome::RetryLater {
                reason: "Onpipeline error 429: slow down".into(),
                status: Some(429),
                after: Some(Duration::from_secs(7))
            }
        );
    }

    #[test]
    fn a_non_json_502_page_is_retried() {
        let outcome = classify(502, None, b"<html><body>Bad Gateway</body></html>", now());
        assert!(
            matches!(&outcome, Outcome::RetryLater { reason, status: Some(502), .. } if reason.contains("Bad Gateway")),
            "{outcome:?}"
        );
    }

    /// Answers that are not Onpipeline's JSON come from something in between (a proxy, a WAF):
    /// they say nothing about the lead, so they are retried, except the three statuses that
    /// mean our credentials, egress or URL are wrong, which pause delivery.
    #[test]
    fn an_answer_without_onpipeline_s_error_object_is_retried_unless_it_means_pause() {
        let html = b"<html><head><title>400 Bad Request</title></head><body>nginx</body></html>";
        let rows: [(u16, &[u8], &str); 14] = [
            (400, html, "retry"),
            (406, html, "retry"),
            (413, b"<html>Request Entity Too Large</html>", "retry"),
            (422, b"Unprocessable", "retry"),
            (409, html, "retry"),
            (400, b"", "retry"),
            (406, b"{}", "retry"),
            (400, br#"{"Error":"not an object"}"#, "retry"),
            (429, html, "retry"),
            (502, html, "retry"),
            (401, html, "paused"),
            (403, b"<html>403 Forbidden</html>", "paused"),
            (404, b"", "paused"),
            (403, b"{}", "paused"),
        ];
        for (status, body, expected) in rows {
            let outcome = classify(status, Some("3"), body, now());
            assert_eq!(outcome.label(), expected, "HTTP {status}: {outcome:?}");
            assert_eq!(outcome.status(), Some(status), "{outcome:?}");
            if let Outcome::RetryLater { after, .. } = outcome {
                assert_eq!(after, Some(Duration::from_secs(3)), "Retry-After is kept");
            }
        }
    }

    #[test]
    fn a_html_400_page_gives_its_text_as_the_reason() {
        let outcome = classify(
            400,
            None,
            b"<html>\r\n<title>400 Bad Request</title>",
            now(),
        );
        match outcome {
            Outcome::RetryLater { reason, .. } => {
                assert!(
                    reason.starts_with("HTTP 400 without Onpipeline's Error object"),
                    "{reason}"
                );
                assert!(reason.contains("400 Bad Request"), "{reason}");
            }
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn a_2xx_without_header_is_retried_not_trusted() {
        assert!(matches!(
            classify(200, None, b"", now()),
            Outcome::RetryLater { .. }
        ));
        assert!(matches!(
            classify(201, None, b"{}", now()),
            Outcome::RetryLater { .. }
        ));
    }

    #[test]
    fn a_numeric_error_code_is_understood() {
        let body = br#"{"Error":{"Code":409,"Message":"Duplicate"}}"#;
        assert_eq!(classify(409, None, body, now()), Outcome::Duplicate);
    }
}
