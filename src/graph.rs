//! Meta's Graph API client: reads one lead (`GET {base}/{leadgen_id}`) and lists a form's
//! leads (`GET {base}/{form_id}/leads`), and classifies every answer into a [`GraphError`].
//! Policy — park, retry, dead-letter — lives in the forwarder; this module only says what an
//! answer meant.
//!
//! The page access token travels in the query string (`access_token`, with `appsecret_proof`,
//! the HMAC-SHA256 of the token keyed with the app secret, so apps that require it work), as
//! Graph documents. So no request URL is ever logged or put into an error: transport errors
//! are stripped of their URL, and Graph's own messages have the token redacted.

use std::time::{Duration, SystemTime};

use anyhow::Context;
use hmac::{Hmac, Mac};
use reqwest::Url;
use reqwest::header::HeaderMap;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;
use sha2::Sha256;

use crate::retry::parse_retry_after;
use crate::sources::facebook::meta_id;

/// The fields asked of one lead. Without `fields`, Graph answers only a default subset.
pub const LEAD_FIELDS: &str =
    "id,created_time,ad_id,adset_id,campaign_id,form_id,field_data,is_organic,platform";

/// The fields asked when listing a form's leads: only what the queue needs; each lead is then
/// read in full like a notified one.
const LIST_FIELDS: &str = "id,created_time,ad_id,form_id";

/// Leads per page of a listing (Graph's maximum for this edge is larger; 100 keeps answers
/// small).
pub const LIST_PAGE_SIZE: u32 = 100;

/// How long one Graph request may take.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// What a failed Graph call means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GraphError {
    /// The token is expired or invalid, or lacks a permission (codes 190, 102, 10, 200–299,
    /// and 100 when its message is about permissions): retrying cannot help until a person
    /// fixes the token or the app's access.
    NeedsAttention { message: String },
    /// Graph asked us to slow down (codes 4, 17, 32, 613, 80000–80014, or HTTP 429), not
    /// before `after` when it said how long.
    RateLimited {
        message: String,
        after: Option<Duration>,
    },
    /// A transient fault: the network, a timeout, a 5xx, or Graph's codes 1 and 2.
    Temporary { message: String },
    /// Anything else: the same request will fail the same way.
    Rejected { message: String },
}

impl GraphError {
    pub fn message(&self) -> &str {
        match self {
            GraphError::NeedsAttention { message }
            | GraphError::RateLimited { message, .. }
            | GraphError::Temporary { message }
            | GraphError::Rejected { message } => message,
        }
    }

    fn map_message(self, f: impl Fn(&str) -> String) -> Self {
        match self {
            GraphError::NeedsAttention { message } => GraphError::NeedsAttention {
                message: f(&message),
            },
            GraphError::RateLimited { message, after } => GraphError::RateLimited {
                message: f(&message),
                after,
            },
            GraphError::Temporary { message } => GraphError::Temporary {
                message: f(&message),
            },
            GraphError::Rejected { message } => GraphError::Rejected {
                message: f(&message),
            },
        }
    }
}

/// One lead as the Graph API returns it. Ids are strings, read exactly whatever their JSON
/// type.
#[derive(Clone, Deserialize)]
pub struct GraphLead {
    #[serde(with = "meta_id")]
    pub id: String,
    #[serde(default)]
    pub created_time: Option<String>,
    #[serde(default, with = "meta_id::option")]
    pub ad_id: Option<String>,
    #[serde(default, with = "meta_id::option")]
    pub adset_id: Option<String>,
    #[serde(default, with = "meta_id::option")]
    pub campaign_id: Option<String>,
    #[serde(default, with = "meta_id::option")]
    pub form_id: Option<String>,
    #[serde(default)]
    pub field_data: Vec<FieldData>,
    #[serde(default)]
    pub is_organic: Option<bool>,
    #[serde(default)]
    pub platform: Option<String>,
}

impl std::fmt::Debug for GraphLead {
    /// Ids and question keys only: the answers are personal data.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphLead")
            .field("id", &self.id)
            .field("form_id", &self.form_id)
            .field(
                "questions",
                &self.field_data.iter().map(|d| &d.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// One answer of a lead form: the question's key and its values (always strings in Meta's
/// documentation; numbers and booleans are accepted and written out).
#[derive(Clone, Deserialize)]
pub struct FieldData {
    pub name: String,
    #[serde(default, deserialize_with = "scalars")]
    pub values: Vec<String>,
}

fn scalars<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let values = Option::<Vec<Value>>::deserialize(d)?.unwrap_or_default();
    Ok(values
        .into_iter()
        .filter_map(|v| match v {
            Value::String(s) => Some(s),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        })
        .collect())
}

/// One page of a form's leads.
#[derive(Debug)]
pub struct LeadsPage {
    pub leads: Vec<GraphLead>,
    /// The cursor of the next page, when there is one.
    pub after: Option<String>,
}

/// What a call presents: the page's access token and the app secret (for `appsecret_proof`).
pub struct Credentials<'a> {
    pub token: &'a SecretString,
    pub app_secret: &'a SecretString,
}

#[derive(Clone, Debug)]
pub struct GraphSettings {
    /// `LEADGATE_GRAPH_URL`, version included, e.g. `https://graph.facebook.com/v21.0`.
    pub base: Url,
    /// Extra trusted root CAs (PEM): `LEADGATE_CA_FILE`, the sandbox simulator's CA.
    pub extra_ca_pem: Vec<Vec<u8>>,
}

#[derive(Clone)]
pub struct GraphClient {
    http: reqwest::Client,
    base: Url,
}

impl GraphClient {
    pub fn new(settings: &GraphSettings) -> anyhow::Result<Self> {
        let extra: Vec<&[u8]> = settings.extra_ca_pem.iter().map(Vec::as_slice).collect();
        let tls = crate::tls::client_config(&extra)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(true)
            .timeout(TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("leadgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the Graph API HTTP client")?;
        Ok(Self {
            http,
            base: settings.base.clone(),
        })
    }

    pub fn base(&self) -> &Url {
        &self.base
    }

    /// Reads one lead with [`LEAD_FIELDS`].
    pub async fn lead(
        &self,
        leadgen_id: &str,
        credentials: &Credentials<'_>,
    ) -> Result<GraphLead, GraphError> {
        let value = self
            .get(&[leadgen_id], &[("fields", LEAD_FIELDS)], credentials)
            .await?;
        serde_json::from_value(value).map_err(|e| GraphError::Rejected {
            message: format!("the Graph API answered a lead that cannot be read: {e}"),
        })
    }

    /// One page of a form's leads created after `since` (Unix seconds), newest first.
    pub async fn form_leads(
        &self,
        form_id: &str,
        since: i64,
        after: Option<&str>,
        credentials: &Credentials<'_>,
    ) -> Result<LeadsPage, GraphError> {
        let filtering =
            format!(r#"[{{"field":"time_created","operator":"GREATER_THAN","value":{since}}}]"#);
        let limit = LIST_PAGE_SIZE.to_string();
        let mut query = vec![
            ("fields", LIST_FIELDS),
            ("filtering", filtering.as_str()),
            ("limit", limit.as_str()),
        ];
        if let Some(after) = after {
            query.push(("after", after));
        }
        let value = self.get(&[form_id, "leads"], &query, credentials).await?;
        Ok(leads_page(&value))
    }

    async fn get(
        &self,
        path: &[&str],
        query: &[(&str, &str)],
        credentials: &Credentials<'_>,
    ) -> Result<Value, GraphError> {
        let token = credentials.token.expose_secret();
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| GraphError::Rejected {
                message: "LEADGATE_GRAPH_URL cannot take a path".to_owned(),
            })?
            .pop_if_empty()
            .extend(path);
        url.query_pairs_mut()
            .extend_pairs(query)
            .append_pair("access_token", token)
            .append_pair(
                "appsecret_proof",
                &appsecret_proof(credentials.app_secret, credentials.token),
            );
        let result = async {
            let response = self
                .http
                .get(url)
                .send()
                .await
                .map_err(|e| transport_failure(&e))?;
            let status = response.status().as_u16();
            let hint = wait_hint(response.headers(), SystemTime::now());
            let body = response.bytes().await.map_err(|e| transport_failure(&e))?;
            classify(status, hint, &body)
        }
        .await;
        result.map_err(|e| e.map_message(|m| redact(m, token)))
    }
}

/// `appsecret_proof`: hex HMAC-SHA256 of the access token, keyed with the app secret.
pub fn appsecret_proof(app_secret: &SecretString, token: &SecretString) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(app_secret.expose_secret().as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(token.expose_secret().as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Replaces every occurrence of the token (Graph sometimes quotes what it was given).
fn redact(message: &str, token: &str) -> String {
    if token.is_empty() {
        message.to_owned()
    } else {
        message.replace(token, "<redacted token>")
    }
}

fn transport_failure(e: &reqwest::Error) -> GraphError {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    // The URL carries the access token: drop it from the error before writing anything.
    let mut detail = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        detail.push_str(": ");
        detail.push_str(&cause.to_string());
        source = cause.source();
    }
    GraphError::Temporary {
        message: format!("Graph API {kind}{detail}"),
    }
}

/// How long Graph asks us to wait: `Retry-After`, or the largest
/// `estimated_time_to_regain_access` (minutes) of `X-Business-Use-Case-Usage`.
pub fn wait_hint(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let retry_after = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, now));
    let usage = headers
        .get("x-business-use-case-usage")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| serde_json::from_str::<Value>(v).ok())
        .and_then(|usage| {
            usage
                .as_object()?
                .values()
                .filter_map(Value::as_array)
                .flatten()
                .filter_map(|entry| entry.get("estimated_time_to_regain_access")?.as_u64())
                .max()
        })
        .filter(|minutes| *minutes > 0)
        .map(|minutes| Duration::from_secs(minutes.saturating_mul(60)));
    retry_after.max(usage)
}

/// Graph's error object; only `message`, `type`, `code` and `fbtrace_id` are always there.
#[derive(Deserialize)]
struct ErrorObject {
    #[serde(default)]
    message: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    error_subcode: Option<i64>,
    #[serde(default)]
    is_transient: Option<bool>,
    #[serde(default)]
    fbtrace_id: Option<String>,
}

/// Reads a Graph answer. Most application errors come with HTTP 400, so the error object's
/// `code` decides, not the status; the status decides only when there is no error object.
pub fn classify(status: u16, hint: Option<Duration>, body: &[u8]) -> Result<Value, GraphError> {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    let error = parsed
        .as_ref()
        .and_then(|v| v.get("error"))
        .filter(|e| e.is_object())
        .and_then(|e| ErrorObject::deserialize(e).ok());
    if let Some(error) = error {
        return Err(classify_error(status, hint, &error));
    }
    match (status, parsed) {
        (200..=299, Some(value)) if value.is_object() => Ok(value),
        (200..=299, _) => Err(GraphError::Temporary {
            message: format!(
                "the Graph API answered HTTP {status} with a body that is not a JSON object"
            ),
        }),
        (429, _) => Err(GraphError::RateLimited {
            message: "the Graph API answered HTTP 429".to_owned(),
            after: hint,
        }),
        (408 | 500..=599, _) => Err(GraphError::Temporary {
            message: format!("the Graph API answered HTTP {status}"),
        }),
        // Not Graph speaking (no error object): most likely LEADGATE_GRAPH_URL or a proxy.
        (401 | 403 | 404, _) => Err(GraphError::NeedsAttention {
            message: format!(
                "HTTP {status} without a Graph error object; check LEADGATE_GRAPH_URL"
            ),
        }),
        _ => Err(GraphError::Rejected {
            message: format!("the Graph API answered HTTP {status} without an error object"),
        }),
    }
}

fn classify_error(status: u16, hint: Option<Duration>, error: &ErrorObject) -> GraphError {
    let code = error.code.unwrap_or(0);
    let mut message = format!("Graph error {code}");
    if let Some(subcode) = error.error_subcode {
        message.push_str(&format!("/{subcode}"));
    }
    if let Some(kind) = &error.kind {
        message.push_str(&format!(" ({kind})"));
    }
    message.push_str(&format!(", HTTP {status}: {}", error.message));
    if let Some(trace) = &error.fbtrace_id {
        message.push_str(&format!(" [fbtrace_id {trace}]"));
    }
    let about_permissions = error.message.to_ascii_lowercase().contains("permission");
    match code {
        190 | 102 | 10 | 200..=299 => GraphError::NeedsAttention { message },
        100 if about_permissions => GraphError::NeedsAttention { message },
        4 | 17 | 32 | 613 | 80000..=80014 => GraphError::RateLimited {
            message,
            after: hint,
        },
        _ if status == 429 => GraphError::RateLimited {
            message,
            after: hint,
        },
        1 | 2 => GraphError::Temporary { message },
        _ if error.is_transient == Some(true) || status >= 500 => GraphError::Temporary { message },
        _ => GraphError::Rejected { message },
    }
}

/// `{"data": [...], "paging": {"cursors": {"after": …}, "next": …}}`: a lead that cannot be
/// read is skipped (the others still count); the next cursor is used only when Graph says
/// there is a next page.
fn leads_page(value: &Value) -> LeadsPage {
    let leads = value
        .get("data")
        .and_then(Value::as_array)
        .map(|data| {
            data.iter()
                .filter_map(|lead| match GraphLead::deserialize(lead) {
                    Ok(lead) => Some(lead),
                    Err(e) => {
                        tracing::warn!(error = %e, "Skipped a listed Meta lead that cannot be read.");
                        None
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let paging = value.get("paging");
    let has_next = paging
        .and_then(|p| p.get("next"))
        .is_some_and(Value::is_string);
    let after = paging
        .and_then(|p| p.pointer("/cursors/after"))
        .and_then(Value::as_str)
        .filter(|_| has_next)
        .map(str::to_owned);
    LeadsPage { leads, after }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_body(code: i64, subcode: Option<i64>, message: &str) -> Vec<u8> {
        serde_json::json!({"error": {
            "message": message, "type": "OAuthException", "code": code,
            "error_subcode": subcode, "fbtrace_id": "AbCdEf123"
        }})
        .to_string()
        .into_bytes()
    }

    fn kind(result: Result<Value, GraphError>) -> &'static str {
        match result {
            Ok(_) => "ok",
            Err(GraphError::NeedsAttention { .. }) => "attention",
            Err(GraphError::RateLimited { .. }) => "rate_limited",
            Err(GraphError::Temporary { .. }) => "temporary",
            Err(GraphError::Rejected { .. }) => "rejected",
        }
    }

    #[test]
    fn graph_errors_are_classified_by_their_code() {
        let table = [
            (
                400,
                190,
                Some(463),
                "Error validating access token: Session has expired",
                "attention",
            ),
            (
                400,
                190,
                Some(460),
                "The session has been invalidated because the user changed their password",
                "attention",
            ),
            (
                400,
                102,
                None,
                "Session key invalid or no longer valid",
                "attention",
            ),
            (
                403,
                10,
                None,
                "Application does not have permission for this action",
                "attention",
            ),
            (
                403,
                200,
                None,
                "Requires leads_retrieval permission to manage the object",
                "attention",
            ),
            (
                400,
                100,
                Some(33),
                "Unsupported get request. Object with ID '1' does not exist, cannot be loaded due to missing permissions, or does not support this operation",
                "attention",
            ),
            (400, 100, None, "Invalid parameter", "rejected"),
            (
                400,
                4,
                None,
                "Application request limit reached",
                "rate_limited",
            ),
            (400, 17, None, "User request limit reached", "rate_limited"),
            (400, 32, None, "Page request limit reached", "rate_limited"),
            (
                400,
                613,
                None,
                "Calls to this api have exceeded the rate limit",
                "rate_limited",
            ),
            (
                400,
                80005,
                None,
                "There have been too many leadgen api calls",
                "rate_limited",
            ),
            (429, 9999, None, "Slow down", "rate_limited"),
            (500, 1, None, "An unknown error occurred", "temporary"),
            (503, 2, None, "Service temporarily unavailable", "temporary"),
            (500, 12345, None, "Something broke", "temporary"),
            (
                400,
                803,
                None,
                "Some of the aliases you requested do not exist",
                "rejected",
            ),
        ];
        for (status, code, subcode, message, expected) in table {
            let result = classify(status, None, &error_body(code, subcode, message));
            assert_eq!(kind(result), expected, "{status} {code} {message}");
        }
    }

    #[test]
    fn the_message_names_code_subcode_type_and_trace_id() {
        let Err(error) = classify(
            400,
            None,
            &error_body(190, Some(463), "Session has expired"),
        ) else {
            panic!("an error");
        };
        assert_eq!(
            error.message(),
            "Graph error 190/463 (OAuthException), HTTP 400: Session has expired [fbtrace_id AbCdEf123]"
        );
    }

    #[test]
    fn answers_without_an_error_object_are_classified_by_status() {
        assert_eq!(kind(classify(200, None, br#"{"id":"1"}"#)), "ok");
        assert_eq!(kind(classify(200, None, b"<html>")), "temporary");
        assert_eq!(
            kind(classify(502, None, b"<html>bad gateway</html>")),
            "temporary"
        );
        assert_eq!(kind(classify(429, None, b"")), "rate_limited");
        assert_eq!(kind(classify(404, None, b"not found")), "attention");
        assert_eq!(kind(classify(418, None, b"")), "rejected");
    }

    #[test]
    fn a_rate_limit_carries_the_wait_graph_asked_for() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-business-use-case-usage",
            r#"{"112233":[{"type":"leadgen","call_count":100,"total_cputime":5,"total_time":5,"estimated_time_to_regain_access":7}]}"#
                .parse()
                .unwrap(),
        );
        let hint = wait_hint(&headers, SystemTime::now());
        assert_eq!(hint, Some(Duration::from_secs(420)));
        let result = classify(400, hint, &error_body(80005, None, "too many"));
        assert_eq!(
            result.err().unwrap(),
            GraphError::RateLimited {
                message:
                    "Graph error 80005 (OAuthException), HTTP 400: too many [fbtrace_id AbCdEf123]"
                        .to_owned(),
                after: Some(Duration::from_secs(420)),
            }
        );
        headers.insert("retry-after", "900".parse().unwrap());
        assert_eq!(
            wait_hint(&headers, SystemTime::now()),
            Some(Duration::from_secs(900))
        );
        assert_eq!(wait_hint(&HeaderMap::new(), SystemTime::now()), None);
    }

    #[test]
    fn the_token_is_redacted_from_messages() {
        assert_eq!(
            redact(
                "Malformed access token EAAB-secret-token",
                "EAAB-secret-token"
            ),
            "Malformed access token <redacted token>"
        );
    }

    #[test]
    fn appsecret_proof_is_the_hex_hmac_of_the_token() {
        // The widely published HMAC-SHA256 example (key "key", the quick brown fox).
        let proof = appsecret_proof(
            &SecretString::from("key"),
            &SecretString::from("The quick brown fox jumps over the lazy dog"),
        );
        assert_eq!(
            proof,
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }

    #[tokio::test]
    async fn a_transport_failure_says_what_failed_without_the_url_or_token() {
        // A loopback port with nothing listening.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = GraphClient::new(&GraphSettings {
            base: format!("https://127.0.0.1:{port}/graph").parse().unwrap(),
            extra_ca_pem: Vec::new(),
        })
        .unwrap();
        let token = SecretString::from("EAAB-secret-page-token");
        let credentials = Credentials {
            token: &token,
            app_secret: &SecretString::from("app-secret"),
        };
        let error = client.lead("901", &credentials).await.unwrap_err();
        assert!(matches!(error, GraphError::Temporary { .. }), "{error:?}");
        let message = error.message();
        assert!(
            message.starts_with("Graph API connection failed"),
            "{message}"
        );
        assert!(!message.contains("EAAB-secret-page-token"), "{message}");
        assert!(!message.contains("access_token"), "{message}");
    }

    #[test]
    fn a_listing_page_keeps_readable_leads_and_its_next_cursor() {
        let page = leads_page(&serde_json::json!({
            "data": [
                {"id": "901", "created_time": "2024-05-01T10:20:30+0000", "form_id": 18014398509481985u64},
                {"created_time": "no id"},
                {"id": 902}
            ],
            "paging": {"cursors": {"before": "b", "after": "MjA="}, "next": "https://graph/next"}
        }));
        let ids: Vec<&str> = page.leads.iter().map(|l| l.id.as_str()).collect();
        assert_eq!(ids, ["901", "902"]);
        assert_eq!(page.leads[0].form_id.as_deref(), Some("18014398509481985"));
        assert_eq!(page.after.as_deref(), Some("MjA="));
        let last = leads_page(&serde_json::json!({
            "data": [], "paging": {"cursors": {"before": "b", "after": "c"}}
        }));
        assert!(last.after.is_none());
    }
}
