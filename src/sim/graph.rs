//! The simulator's Meta Graph API side, on the same HTTPS listener, so
//! `LEADGATE_GRAPH_URL=https://127.0.0.1:PORT/graph` points at it.
//!
//! | endpoint | body / answer |
//! |---|---|
//! | `GET /graph/{lead_id}?fields=…&access_token=…` | the lead's Graph JSON (only the asked `fields`, plus `id`) |
//! | `GET /graph/{form_id}/leads?filtering=…&limit=…&after=…` | `{"data": [...], "paging": {...}}`, newest first; `filtering` on `time_created` with `GREATER_THAN`/`LESS_THAN` is applied |
//! | `POST /_sim/graph/leads` | one lead (Graph JSON with `id`, `form_id`, `created_time`, `field_data`) or a list; `{"registered": N}` |
//! | `POST /_sim/graph/errors` | a [`GraphFault`] or a list, appended; `{"pending": N}` |
//! | `DELETE /_sim/graph/errors` | 204; drops the scripted errors |
//! | `POST /_sim/graph/settings` | [`GraphSettingsUpdate`]: the accepted page tokens and the app secret |
//! | `GET /_sim/graph/calls` | `[GraphCall]`: every Graph call, its query with token values hidden |
//!
//! Like Graph, answers escape non-ASCII text as `\uXXXX`, errors are the Graph error object
//! `{"error": {"message", "type", "code", "error_subcode", "fbtrace_id"}}`, and a lead unknown
//! to the simulator gets Graph's `100/33` "does not exist, cannot be loaded due to missing
//! permissions" answer. When page tokens are registered, any other `access_token` is answered
//! `190/463` (expired session); when an app secret is set, a wrong `appsecret_proof` is
//! answered `100`.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// A scripted Graph error. JSON form: `{"code": 190, "error_subcode": 463, "status": 400,
/// "message": "...", "type": "OAuthException", "lead_id": "…", "times": 2, "retry_after": 1}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphFault {
    /// HTTP status of the answer; Graph answers most errors with 400.
    #[serde(default = "default_status")]
    pub status: u16,
    pub code: i64,
    #[serde(default)]
    pub error_subcode: Option<i64>,
    /// Default: a message like Graph's for the code.
    #[serde(default)]
    pub message: Option<String>,
    /// Default: `OAuthException`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Only calls reading this lead; unset: the next calls of any kind.
    #[serde(default)]
    pub lead_id: Option<String>,
    /// How many matching calls it answers; unset: every one until cleared.
    #[serde(default)]
    pub times: Option<u32>,
    /// Seconds sent as `Retry-After` with the error (how a rate limit says how long to wait).
    #[serde(default)]
    pub retry_after: Option<u64>,
}

fn default_status() -> u16 {
    400
}

impl GraphFault {
    /// An error with Graph's usual status (400) and message for `code`, answering the next
    /// `times` calls of any kind.
    pub fn next(code: i64, times: u32) -> Self {
        Self {
            status: default_status(),
            code,
            error_subcode: None,
            message: None,
            kind: None,
            lead_id: None,
            times: Some(times),
            retry_after: None,
        }
    }

    /// The same error for every call reading `lead_id`, until cleared.
    pub fn for_lead(code: i64, lead_id: &str) -> Self {
        Self {
            lead_id: Some(lead_id.to_owned()),
            times: None,
            ..Self::next(code, 0)
        }
    }
}

/// A partial change of the Graph side's settings.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphSettingsUpdate {
    /// The page access tokens Graph accepts; empty: any non-empty token.
    #[serde(default)]
    pub tokens: Option<Vec<String>>,
    /// When set, a present `appsecret_proof` must be the HMAC of the token with this secret.
    #[serde(default)]
    pub app_secret: Option<String>,
}

/// One call to the Graph side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphCall {
    pub at: DateTime<Utc>,
    pub method: String,
    /// The path under `/graph`, e.g. `/901` or `/77/leads`.
    pub path: String,
    /// The query string with the values of `access_token` and `appsecret_proof` replaced by
    /// `***`.
    pub query: String,
    pub status: u16,
}

#[derive(Default)]
struct State {
    /// Registered leads in order, each with its id, form id and creation time.
    leads: Vec<StoredLead>,
    faults: Vec<GraphFault>,
    calls: Vec<GraphCall>,
    tokens: Vec<String>,
    app_secret: Option<String>,
    next_trace: u64,
}

struct StoredLead {
    id: String,
    form_id: Option<String>,
    created: Option<i64>,
    json: Map<String, Value>,
}

/// The Graph side's memory.
#[derive(Default)]
pub struct GraphSim {
    state: Mutex<State>,
}

impl GraphSim {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a lead (Graph JSON with at least `id`). A lead with the same id is replaced.
    pub fn add_lead(&self, lead: Value) -> Result<(), String> {
        let Value::Object(json) = lead else {
            return Err("a lead is a JSON object".to_owned());
        };
        let id = id_text(json.get("id")).ok_or("a lead needs an id")?;
        let form_id = id_text(json.get("form_id"));
        let created = json
            .get("created_time")
            .and_then(Value::as_str)
            .and_then(crate::sources::facebook::parse_time)
            .map(|t| t.timestamp());
        let mut state = self.lock();
        state.leads.retain(|l| l.id != id);
        state.leads.push(StoredLead {
            id,
            form_id,
            created,
            json,
        });
        Ok(())
    }

    pub fn push_fault(&self, fault: GraphFault) -> usize {
        let mut state = self.lock();
        state.faults.push(fault);
        state.faults.len()
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    pub fn update(&self, update: GraphSettingsUpdate) {
        let mut state = self.lock();
        if let Some(tokens) = update.tokens {
            state.tokens = tokens;
        }
        if update.app_secret.is_some() {
            state.app_secret = update.app_secret;
        }
    }

    /// Accept only these page tokens from now on.
    pub fn set_tokens(&self, tokens: &[&str]) {
        self.update(GraphSettingsUpdate {
            tokens: Some(tokens.iter().map(|t| (*t).to_owned()).collect()),
            app_secret: None,
        });
    }

    pub fn calls(&self) -> Vec<GraphCall> {
        self.lock().calls.clone()
    }

    /// Takes the fault that answers a call about `lead_id` (None for a listing), if any.
    fn take_fault(state: &mut State, lead_id: Option<&str>) -> Option<GraphFault> {
        let index = state.faults.iter().position(|f| match &f.lead_id {
            Some(id) => Some(id.as_str()) == lead_id,
            None => true,
        })?;
        let taken = state.faults[index].clone();
        if let Some(n) = &mut state.faults[index].times {
            *n = n.saturating_sub(1);
            if *n == 0 {
                state.faults.remove(index);
            }
        }
        Some(taken)
    }
}

fn id_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        _ => None,
    }
}

pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/_sim/graph")
            .route("/leads", web::post().to(post_leads))
            .route("/errors", web::post().to(post_errors))
            .route("/errors", web::delete().to(delete_errors))
            .route("/settings", web::post().to(post_settings))
            .route("/calls", web::get().to(get_calls)),
    )
    .service(
        web::scope("/graph")
            .route("/{form_id}/leads", web::get().to(list_leads))
            .route("/{lead_id}", web::get().to(get_lead)),
    );
}

/// Graph serialises JSON as ASCII, with `\uXXXX` escapes (surrogate pairs beyond the BMP).
/// Non-ASCII characters only occur inside strings, so escaping them after serialisation is
/// exact.
fn ascii_json(value: &Value) -> String {
    let text = value.to_string();
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

fn graph_json(status: StatusCode, value: &Value) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/json; charset=UTF-8")
        .body(ascii_json(value))
}

fn error_response(state: &mut State, fault: &GraphFault) -> HttpResponse {
    state.next_trace += 1;
    let message = fault.message.clone().unwrap_or_else(|| {
        match fault.code {
            190 => "Error validating access token: Session has expired on Monday, 01-Jan-24 00:00:00 PST.",
            102 => "Session key invalid or no longer valid",
            10 => "(#10) Application does not have permission for this action",
            200..=299 => "(#200) Requires leads_retrieval permission to manage the object",
            4 => "(#4) Application request limit reached",
            17 => "(#17) User request limit reached",
            32 => "(#32) Page request limit reached",
            613 => "(#613) Calls to this api have exceeded the rate limit.",
            100 => "(#100) Invalid parameter",
            1 => "An unknown error occurred",
            2 => "An unexpected error has occurred. Please retry your request later.",
            _ => "An unknown error has occurred.",
        }
        .to_owned()
    });
    let mut error = json!({
        "message": message,
        "type": fault.kind.clone().unwrap_or_else(|| "OAuthException".to_owned()),
        "code": fault.code,
        "fbtrace_id": format!("SimTrace{:06}", state.next_trace),
    });
    if let Some(subcode) = fault.error_subcode {
        error["error_subcode"] = json!(subcode);
    }
    let status = StatusCode::from_u16(fault.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut response = graph_json(status, &json!({ "error": error }));
    if let Some(seconds) = fault.retry_after {
        response.headers_mut().insert(
            actix_web::http::header::RETRY_AFTER,
            actix_web::http::header::HeaderValue::from(seconds),
        );
    }
    response
}

/// The query with secret values hidden, for the call log.
fn logged_query(query: &str) -> String {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if name == "access_token" || name == "appsecret_proof" => {
                format!("{name}=***")
            }
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Checks the access token and proof like Graph; the error to answer if they fail.
fn check_access(state: &State, params: &HashMap<String, String>) -> Option<GraphFault> {
    let token = params.get("access_token").map(String::as_str).unwrap_or("");
    if token.is_empty() {
        return Some(GraphFault {
            code: 104,
            message: Some("An access token is required to request this resource.".to_owned()),
            ..GraphFault::next(104, 1)
        });
    }
    if !state.tokens.is_empty() && !state.tokens.iter().any(|t| t == token) {
        return Some(GraphFault {
            error_subcode: Some(463),
            ..GraphFault::next(190, 1)
        });
    }
    if let (Some(secret), Some(proof)) = (&state.app_secret, params.get("appsecret_proof")) {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
            .expect("HMAC takes keys of any length");
        mac.update(token.as_bytes());
        if hex::encode(mac.finalize().into_bytes()) != *proof {
            return Some(GraphFault {
                message: Some("Invalid appsecret_proof provided in the API argument".to_owned()),
                ..GraphFault::next(100, 1)
            });
        }
    }
    None
}

fn params(req: &HttpRequest) -> HashMap<String, String> {
    web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .unwrap_or_default()
}

/// Records the call with the status it was answered.
fn log_call(state: &mut State, req: &HttpRequest, response: &HttpResponse) {
    let path = req
        .path()
        .strip_prefix("/graph")
        .unwrap_or(req.path())
        .to_owned();
    state.calls.push(GraphCall {
        at: Utc::now(),
        method: req.method().to_string(),
        path,
        query: logged_query(req.query_string()),
        status: response.status().as_u16(),
    });
}

async fn get_lead(
    req: HttpRequest,
    path: web::Path<String>,
    sim: web::Data<GraphSim>,
) -> HttpResponse {
    let lead_id = path.into_inner();
    let params = params(&req);
    let mut state = sim.lock();
    let response = if let Some(fault) = check_access(&state, &params) {
        error_response(&mut state, &fault)
    } else if let Some(fault) = GraphSim::take_fault(&mut state, Some(&lead_id)) {
        error_response(&mut state, &fault)
    } else {
        match state.leads.iter().find(|l| l.id == lead_id) {
            Some(lead) => {
                let body = select_fields(&lead.json, params.get("fields").map(String::as_str));
                graph_json(StatusCode::OK, &body)
            }
            None => {
                let fault = GraphFault {
                    error_subcode: Some(33),
                    kind: Some("GraphMethodException".to_owned()),
                    message: Some(format!(
                        "Unsupported get request. Object with ID '{lead_id}' does not exist, cannot be loaded due to missing permissions, or does not support this operation. Please read the Graph API documentation at https://developers.facebook.com/docs/graph-api"
                    )),
                    ..GraphFault::next(100, 1)
                };
                error_response(&mut state, &fault)
            }
        }
    };
    log_call(&mut state, &req, &response);
    response
}

/// The lead's `id` and the asked fields that it has; every field when none are asked.
fn select_fields(lead: &Map<String, Value>, fields: Option<&str>) -> Value {
    let Some(fields) = fields else {
        return Value::Object(lead.clone());
    };
    let mut out = Map::new();
    if let Some(id) = lead.get("id") {
        out.insert("id".to_owned(), id.clone());
    }
    for name in fields.split(',').map(str::trim) {
        if let Some(value) = lead.get(name) {
            out.insert(name.to_owned(), value.clone());
        }
    }
    Value::Object(out)
}

#[derive(Deserialize)]
struct Filter {
    field: String,
    operator: String,
    value: Value,
}

async fn list_leads(
    req: HttpRequest,
    path: web::Path<String>,
    sim: web::Data<GraphSim>,
) -> HttpResponse {
    let form_id = path.into_inner();
    let params = params(&req);
    let mut state = sim.lock();
    let response = if let Some(fault) = check_access(&state, &params) {
        error_response(&mut state, &fault)
    } else if let Some(fault) = GraphSim::take_fault(&mut state, None) {
        error_response(&mut state, &fault)
    } else {
        let filters: Vec<Filter> = params
            .get("filtering")
            .and_then(|f| serde_json::from_str(f).ok())
            .unwrap_or_default();
        let keep = |created: Option<i64>| {
            filters
                .iter()
                .filter(|f| f.field == "time_created")
                .all(|f| {
                    let (Some(created), Some(value)) = (created, f.value.as_i64()) else {
                        return false;
                    };
                    match f.operator.as_str() {
                        "GREATER_THAN" => created > value,
                        "LESS_THAN" => created < value,
                        _ => true,
                    }
                })
        };
        let mut matching: Vec<&StoredLead> = state
            .leads
            .iter()
            .filter(|l| l.form_id.as_deref() == Some(form_id.as_str()) && keep(l.created))
            .collect();
        // Newest first, as Graph lists them.
        matching.sort_by_key(|l| std::cmp::Reverse(l.created));
        let limit = params
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l > 0)
            .unwrap_or(25);
        let offset = params
            .get("after")
            .and_then(|a| a.parse::<usize>().ok())
            .unwrap_or(0);
        let fields = params.get("fields").map(String::as_str);
        let data: Vec<Value> = matching
            .iter()
            .skip(offset)
            .take(limit)
            .map(|l| select_fields(&l.json, fields))
            .collect();
        let end = offset + data.len();
        let mut paging = json!({
            "cursors": {"before": offset.to_string(), "after": end.to_string()}
        });
        if end < matching.len() {
            // Graph's `next` repeats the token; the simulator never echoes secrets.
            paging["next"] = json!(format!("/graph/{form_id}/leads?after={end}&limit={limit}"));
        }
        graph_json(StatusCode::OK, &json!({ "data": data, "paging": paging }))
    };
    log_call(&mut state, &req, &response);
    response
}

/// Either one item or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    Many(Vec<T>),
    One(T),
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::Many(items) => items,
            OneOrMany::One(item) => vec![item],
        }
    }
}

fn bad_request(message: String) -> HttpResponse {
    HttpResponse::BadRequest().json(json!({ "error": message }))
}

async fn post_leads(body: Bytes, sim: web::Data<GraphSim>) -> HttpResponse {
    let leads = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Array(leads)) => leads,
        Ok(lead) => vec![lead],
        Err(e) => return bad_request(format!("expected a lead or a list of leads: {e}")),
    };
    let count = leads.len();
    for lead in leads {
        if let Err(message) = sim.add_lead(lead) {
            return bad_request(message);
        }
    }
    HttpResponse::Ok().json(json!({ "registered": count }))
}

async fn post_errors(body: Bytes, sim: web::Data<GraphSim>) -> HttpResponse {
    match serde_json::from_slice::<OneOrMany<GraphFault>>(&body) {
        Ok(faults) => {
            let mut pending = 0;
            for fault in faults.into_vec() {
                pending = sim.push_fault(fault);
            }
            HttpResponse::Ok().json(json!({ "pending": pending }))
        }
        Err(e) => bad_request(format!("expected a Graph error or a list of them: {e}")),
    }
}

async fn delete_errors(sim: web::Data<GraphSim>) -> HttpResponse {
    sim.clear_faults();
    HttpResponse::NoContent().finish()
}

async fn post_settings(body: Bytes, sim: web::Data<GraphSim>) -> HttpResponse {
    match serde_json::from_slice::<GraphSettingsUpdate>(&body) {
        Ok(update) => {
            sim.update(update);
            HttpResponse::NoContent().finish()
        }
        Err(e) => bad_request(format!("expected Graph settings: {e}")),
    }
}

async fn get_calls(sim: web::Data<GraphSim>) -> HttpResponse {
    HttpResponse::Ok().json(sim.calls())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_escape_non_ascii_text_like_graph() {
        let value = json!({"name": "Zoë 王 😀"});
        let text = ascii_json(&value);
        assert_eq!(text, r#"{"name":"Zo\u00eb \u738b \ud83d\ude00"}"#);
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), value);
    }

    #[test]
    fn the_call_log_hides_token_values() {
        assert_eq!(
            logged_query("fields=id&access_token=EAAB123&appsecret_proof=ab12"),
            "fields=id&access_token=***&appsecret_proof=***"
        );
    }

    #[test]
    fn a_fault_for_the_next_calls_is_used_up_and_one_for_a_lead_stays() {
        let sim = GraphSim::default();
        sim.push_fault(GraphFault::for_lead(190, "7"));
        sim.push_fault(GraphFault::next(17, 2));
        let mut state = sim.lock();
        assert_eq!(
            GraphSim::take_fault(&mut state, Some("8")).unwrap().code,
            17
        );
        assert_eq!(GraphSim::take_fault(&mut state, None).unwrap().code, 17);
        assert!(GraphSim::take_fault(&mut state, Some("8")).is_none());
        assert_eq!(
            GraphSim::take_fault(&mut state, Some("7")).unwrap().code,
            190
        );
        assert_eq!(
            GraphSim::take_fault(&mut state, Some("7")).unwrap().code,
            190
        );
    }
}
