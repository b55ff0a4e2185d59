//! The admin API, under `/admin/`: queue counts, one lead's story, dead letters (list, replay,
//! delete), and pausing delivery. Off (404) unless `LEADGATE_ADMIN_TOKEN` is set; then every
//! call wants `Authorization: Bearer <token>`. JSON in and out. `leadgate admin …` is its
//! command-line client.

use actix_web::{HttpRequest, HttpResponse, web};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};

use super::AppState;
use crate::error::{ErrorBody, ErrorDetail};
use crate::lead::{LeadId, Work};
use crate::queue::DeadLetter;
use crate::sources;

/// Whether the request carries `Authorization: Bearer <token>` (compared in constant time).
pub fn bearer_matches(req: &HttpRequest, token: &SecretString) -> bool {
    sources::partner::bearer(req.headers()).is_some_and(|presented| {
        sources::partner::matches_any(presented, std::slice::from_ref(token))
    })
}

pub fn unauthorized() -> HttpResponse {
    error(
        actix_web::http::StatusCode::UNAUTHORIZED,
        "unauthorized",
        "a valid `Authorization: Bearer <token>` header is required".to_owned(),
    )
}

fn error(status: actix_web::http::StatusCode, code: &str, message: String) -> HttpResponse {
    let mut response = HttpResponse::build(status);
    if status == actix_web::http::StatusCode::UNAUTHORIZED {
        response.insert_header((actix_web::http::header::WWW_AUTHENTICATE, "Bearer"));
    }
    response.json(ErrorBody {
        error: ErrorDetail {
            code,
            message,
            fields: None,
        },
    })
}

fn queue_error(e: crate::queue::Error) -> HttpResponse {
    warn!(error = %e, "An admin call failed on the queue.");
    error(
        actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        format!("the queue did not answer: {e}"),
    )
}

/// Runs `handler` when the admin API is on and the caller presents its token.
fn guard(req: &HttpRequest, state: &AppState) -> Result<(), HttpResponse> {
    match &state.admin_token {
        None => Err(error(
            actix_web::http::StatusCode::NOT_FOUND,
            "not_found",
            "the admin API is off; set LEADGATE_ADMIN_TOKEN to turn it on".to_owned(),
        )),
        Some(token) if bearer_matches(req, token) => Ok(()),
        Some(_) => Err(unauthorized()),
    }
}

/// The most an admin request's body may hold: a replay of about 2,000 ids (`{"all": true}`
/// replays any number).
pub const MAX_BODY: usize = 64 * 1024;

/// Reads an admin request's body within `LEADGATE_BODY_TIMEOUT` and [`MAX_BODY`], as the
/// ingest handler reads a lead's.
async fn read_body(
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
) -> Result<web::Bytes, HttpResponse> {
    super::ingest::read_body(req, payload, MAX_BODY, state.body_timeout)
        .await
        .map_err(|e| match e {
            crate::error::IngestError::TooLarge { limit } => error(
                actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("an admin request's body may be at most {limit} bytes"),
            ),
            // A timeout closes the connection (the rest of the body may still be coming).
            other => other.json_response(),
        })
}

fn bad_request(message: String) -> HttpResponse {
    error(
        actix_web::http::StatusCode::BAD_REQUEST,
        "malformed_body",
        message,
    )
}

/// A lead id as a ULID: case does not matter (`01j…` is `01J…`), and answers name it in its
/// canonical upper-case form.
fn parse_id(text: &str) -> Result<LeadId, HttpResponse> {
    text.trim().parse().map_err(|_| {
        error(
            actix_web::http::StatusCode::BAD_REQUEST,
            "malformed_body",
            format!("{text:?} is not a lead id"),
        )
    })
}

/// `GET /admin/stats`.
pub async fn stats(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if let Err(denied) = guard(&req, &state) {
        return denied;
    }
    let operator_pause = match state.queue.operator_pause().await {
        Ok(pause) => pause,
        Err(e) => return queue_error(e),
    };
    match state.queue.stats().await {
        Ok(stats) => HttpResponse::Ok().json(json!({
            "backend": state.queue.backend_name(),
            "ready": stats.ready,
            "leased": stats.leased,
            "delayed": stats.delayed,
            "dead": stats.dead,
            "delivered": stats.delivered,
            "oldest_ready_ms": stats.oldest_ready_ms,
            "delivery": state.delivery.get(),
            "operator_pause": operator_pause,
        })),
        Err(e) => queue_error(e),
    }
}

/// `GET /admin/leads/{id}`: received, each attempt, and the outcome.
pub async fn lead(
    req: HttpRequest,
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    if let Err(denied) = guard(&req, &state) {
        return denied;
    }
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(bad) => return bad,
    };
    match state.queue.lead(id).await {
        Ok(Some(record)) => HttpResponse::Ok().json(record),
        Ok(None) => error(
            actix_web::http::StatusCode::NOT_FOUND,
            "not_found",
            format!("no lead {id} (or its record has expired)"),
        ),
        Err(e) => queue_error(e),
    }
}

#[derive(Deserialize)]
pub struct DeadQuery {
    limit: Option<usize>,
}

/// A dead letter as the list shows it: no personal data (see `GET /admin/leads/{id}`).
#[derive(Serialize)]
struct DeadSummary<'a> {
    id: String,
    source: &'a str,
    received_at: chrono::DateTime<chrono::Utc>,
    dead_at: chrono::DateTime<chrono::Utc>,
    attempts: u32,
    reason: &'a str,
    history: &'a [crate::queue::Attempt],
}

impl<'a> From<&'a DeadLetter> for DeadSummary<'a> {
    fn from(letter: &'a DeadLetter) -> Self {
        Self {
            id: letter.lead.id.to_string(),
            source: &letter.lead.source,
            received_at: letter.lead.received_at,
            dead_at: letter.at,
            attempts: letter.attempts,
            reason: &letter.reason,
            history: &letter.history,
        }
    }
}

/// `GET /admin/dead?limit=N`: dead letters, newest first, with their reasons.
pub async fn dead(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if let Err(denied) = guard(&req, &state) {
        return denied;
    }
    // Parsed after the token check, so strangers learn nothing from parse errors.
    let query = match web::Query::<DeadQuery>::from_query(req.query_string()) {
        Ok(query) => query,
        Err(e) => return bad_request(format!("invalid query: {e}")),
    };
    let limit = query.limit.unwrap_or(100).clamp(1, 10_000);
    match state.queue.dead_letters(limit).await {
        Ok(letters) => {
            let summaries: Vec<DeadSummary<'_>> = letters.iter().map(DeadSummary::from).collect();
            HttpResponse::Ok().json(json!({ "dead": summaries }))
        }
        Err(e) => queue_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    all: bool,
}

#[derive(Serialize)]
struct ReplayFailure {
    id: String,
    error: String,
}

/// `POST /admin/dead/replay` with `{"ids": [...]}` or `{"all": true}`: each dead letter is
/// mapped again from what its sender sent, with the source's current rules (so a fixed mapping
/// takes effect), and queued again with a fresh retry schedule; its history is kept, with the
/// replay marked in it.
pub async fn replay(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    // The token is checked before a byte of the body is read (actix closes the connection of
    // an answer sent with its body unread): a stranger's slow or endless body must not hold a
    // connection, or memory, here.
    if let Err(denied) = guard(&req, &state) {
        return denied;
    }
    let body = match read_body(&req, payload, &state).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let body: ReplayRequest = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(e) => return bad_request(format!("the body is not a replay request: {e}")),
    };
    let names_ids = !body.ids.is_empty();
    // Exactly one of the two forms.
    if body.all == names_ids {
        return error(
            actix_web::http::StatusCode::BAD_REQUEST,
            "malformed_body",
            "send either {\"ids\": [...]} or {\"all\": true}".to_owned(),
        );
    }
    let mut replayed = Vec::new();
    let mut failed = Vec::new();
    let letters: Vec<DeadLetter> = if body.all {
        match state.queue.dead_letters(usize::MAX).await {
            Ok(letters) => letters,
            Err(e) => return queue_error(e),
        }
    } else {
        // Every id is checked before any is replayed, and each is answered once, by its
        // canonical form, however often and in whatever case it was named.
        let mut ids: Vec<LeadId> = Vec::with_capacity(body.ids.len());
        for text in &body.ids {
            match parse_id(text) {
                Ok(id) if !ids.contains(&id) => ids.push(id),
                Ok(_) => {}
                Err(bad) => return bad,
            }
        }
        let mut letters = Vec::new();
        for id in ids {
            match state.queue.dead_letter(id).await {
                Ok(Some(letter)) => letters.push(letter),
                Ok(None) => failed.push(ReplayFailure {
                    id: id.to_string(),
                    error: "no such dead letter".to_owned(),
                }),
                Err(e) => return queue_error(e),
            }
        }
        letters
    };
    for letter in letters {
        let id = letter.lead.id;
        match remap(&state, &letter) {
            Err(message) => failed.push(ReplayFailure {
                id: id.to_string(),
                error: message,
            }),
            Ok(work) => match state.queue.revive(id, work).await {
                Ok(true) => {
                    info!(lead_id = %id, source = %letter.lead.source, "Dead letter replayed.");
                    replayed.push(id.to_string());
                }
                Ok(false) => failed.push(ReplayFailure {
                    id: id.to_string(),
                    error: "no such dead letter (replayed or deleted meanwhile)".to_owned(),
                }),
                Err(e) => return queue_error(e),
            },
        }
    }
    HttpResponse::Ok().json(json!({ "replayed": replayed, "failed": failed }))
}

/// The work to queue again for a dead letter: its sender's input mapped with the source's
/// current rules; a Meta lead is read from the Graph API again.
fn remap(state: &AppState, letter: &DeadLetter) -> Result<Work, String> {
    match &letter.lead.work {
        Work::FetchMeta { .. } => Ok(letter.lead.work.clone()),
        Work::Deliver { input, .. } => {
            let source = state.sources.get(&letter.lead.source).ok_or_else(|| {
                format!(
                    "its source {:?} is no longer configured",
                    letter.lead.source
                )
            })?;
            sources::remap(source, input)
                .map_err(|e| format!("{} ({})", e.public_message(), e.code()))
        }
    }
}

/// `DELETE /admin/dead/{id}`.
pub async fn delete_dead(
    req: HttpRequest,
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    if let Err(denied) = guard(&req, &state) {
        return denied;
    }
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(bad) => return bad,
    };
    match state.queue.delete_dead(id).await {
        Ok(true) => {
            info!(lead_id = %id, "Dead letter deleted by an operator.");
            HttpResponse::NoContent().finish()
        }
        Ok(false) => error(
            actix_web::http::StatusCode::NOT_FOUND,
            "not_found",
            format!("no dead letter {id}"),
        ),
        Err(e) => queue_error(e),
    }
}

/// `POST /admin/pause`: stops delivery in every process on the queue until `POST
/// /admin/resume` (to any of them). The pause is stored in the queue first — the other
/// processes follow it within [`crate::forwarder::OPERATOR_PAUSE_POLL`] — then applied here at
/// once.
pub async fn pause(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if let Err(denied) = guard(&req, &state) {
        return denied;
    }
    let pause = match state.queue.pause_delivery(chrono::Utc::now()).await {
        Ok(pause) => pause,
        Err(e) => return queue_error(e),
    };
    state.delivery.pause_by_operator(pause.since);
    warn!(since = %pause.since, "Delivery paused by an operator, for every process on the queue.");
    HttpResponse::Ok().json(json!({
        "delivery": state.delivery.get(),
        "operator_pause": pause,
    }))
}

/// `POST /admin/resume`: ends the operator's pause in every process on the queue, and in this
/// process also a pause Onpipeline caused, at once (the others keep probing for themselves).
pub async fn resume(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if let Err(denied) = guard(&req, &state) {
        return denied;
    }
    if let Err(e) = state.queue.resume_delivery().await {
        return queue_error(e);
    }
    if state.delivery.resume() {
        info!("Delivery resumed by an operator.");
    }
    HttpResponse::Ok().json(json!({
        "delivery": state.delivery.get(),
        "operator_pause": null,
    }))
}
