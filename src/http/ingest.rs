//! The one ingest handler, `POST /in/{source_id}`, and its CORS preflight. It only sequences
//! the road — limit → read → verify → parse → map → dedupe → enqueue → answer — each step
//! living in its own module.

use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::{Bytes, BytesMut};
use chrono::Utc;
use futures_util::StreamExt;
use reqwest::Url;
use serde::Serialize;
use tracing::info;

use super::{AppState, limits};
use crate::config::{Origin, Source, SourceKind};
use crate::error::IngestError;
use crate::lead::{LeadId, QueuedLead};
use crate::queue::{Enqueued, IdempotencyKey};
use crate::sources::{self, Submission};
use crate::telemetry::metric;

/// How the answer is given: JSON for programs, pages and redirects for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavor {
    Json,
    Browser,
}

#[derive(Serialize)]
struct Accepted {
    id: String,
    status: &'static str,
}

pub async fn ingest(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    // Before anything else, the source's existence included: whatever the answer, the
    // connection must not carry on after a body whose end is in doubt.
    if let Err(e) = check_length(&req) {
        return e.json_response();
    }
    let source_id = path.into_inner();
    let Some(source) = state.sources.get(&source_id).cloned() else {
        return IngestError::UnknownSource(source_id).json_response();
    };
    let flavor = flavor(&req, &source);
    let result = accept(&req, payload, &state, &source).await;
    let mut response = match result {
        Ok(accepted) => answer(&req, &state, &source, flavor, accepted),
        Err(e) => {
            e.log(&source.id);
            metrics::counter!(metric::RECEIVED, "source" => source.id.clone(), "outcome" => e.outcome())
                .increment(1);
            match flavor {
                Flavor::Json => e.json_response(),
                Flavor::Browser => e.html_response(),
            }
        }
    };
    add_cors(&req, &source, response.headers_mut());
    response
}

/// What the road produced for the answer.
struct Outcome {
    /// The ids of the leads queued (or, for a replay or redelivery, queued before).
    ids: Vec<LeadId>,
    /// The request's idempotency key was seen before: `ids` are the first request's.
    replayed: bool,
    /// The form's `_next` field, if any (checked before use).
    next: Option<String>,
}

/// Runs the road up to the durable enqueue of every lead the request carries.
async fn accept(
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    source: &Source,
) -> Result<Outcome, IngestError> {
    check_encoding(req)?;
    if !state.accepting() {
        return Err(IngestError::Unavailable {
            retry_after: Duration::from_secs(5),
            cause: None,
        });
    }
    let client = client_ip(req, state);
    // Forms have no credential, so their limits apply to every request. Senders that prove
    // who they are are charged only once verified: otherwise anyone could spend a platform's
    // budget with bad keys and have the platform's real deliveries refused.
    let charge_before_verify = matches!(source.kind, SourceKind::Form);
    if charge_before_verify {
        state.limiters.check(&source.id, client)?;
    }

    let mut header_key = idempotency_key(req, source)?;
    let body = read_body(req, payload, source.limits.max_body, state.body_timeout).await?;
    if let Some(key) = &mut header_key {
        // A retry sends the same bytes; a reuse of the key for another lead does not.
        use sha2::Digest;
        key.body_digest = Some(hex::encode(sha2::Sha256::digest(&body)));
    }
    let submission = Submission::new(req.headers().clone(), body, own_origin(req, state))
        .with_query(req.query_string());
    let verified = sources::verify(source, submission)?;
    if !charge_before_verify {
        state.limiters.check(&source.id, client)?;
    }
    let items = sources::parse(source, verified).await?;

    // Map everything first: a request is accepted whole or refused whole.
    let mut leads = Vec::with_capacity(items.len());
    let mut next = None;
    for item in &items {
        if let sources::Content::Fields(fields) = &item.content {
            next = next.or_else(|| {
                fields
                    .get("_next")
                    .and_then(|v| v.first())
                    .map(|v| v.trim().to_owned())
            });
        }
        let (work, repaired) = sources::to_work(source, &item.content)?;
        if item.test {
            // Counted and logged either way, so a marketer's "Send test data" can be seen.
            let forwarded = source.forwards_test_leads();
            info!(
                source = %source.id,
                platform_id = item.platform_id.as_deref().unwrap_or(""),
                forwarded,
                "A platform test lead arrived (Google's \"Send test data\")."
            );
            metrics::counter!(
                metric::TEST_LEADS,
                "source" => source.id.clone(),
                "forwarded" => if forwarded { "true" } else { "false" }
            )
            .increment(1);
            if !forwarded {
                metrics::counter!(metric::RECEIVED, "source" => source.id.clone(), "outcome" => "test")
                    .increment(1);
                continue;
            }
        }
        // The platform's own lead id dedupes redeliveries; otherwise the request's key does.
        let key = match &item.platform_id {
            Some(id) => Some(sources::platform_key(source, id)),
            None => header_key.clone(),
        };
        let lead = QueuedLead {
            id: LeadId::new(),
            source: source.id.clone(),
            received_at: Utc::now(),
            work,
            replayed_at: None,
        };
        leads.push((lead, key, repaired));
    }

    let mut ids = Vec::with_capacity(leads.len());
    let mut replayed = false;
    for (lead, key, repaired) in &leads {
        match state.queue.enqueue(lead, key.as_ref()).await? {
            Enqueued::Queued => {
                info!(source = %source.id, lead_id = %lead.id, "Lead queued.");
                metrics::counter!(metric::RECEIVED, "source" => source.id.clone(), "outcome" => "queued")
                    .increment(1);
                sources::note_repaired(source, repaired);
                ids.push(lead.id);
            }
            Enqueued::Replayed { first } => {
                info!(source = %source.id, lead_id = %first, "Already received; nothing new queued.");
                metrics::counter!(metric::RECEIVED, "source" => source.id.clone(), "outcome" => "duplicate")
                    .increment(1);
                ids.push(first);
                replayed = true;
            }
            Enqueued::Conflict { first } => {
                info!(source = %source.id, lead_id = %first, "An Idempotency-Key was reused with a different body; nothing queued.");
                return Err(IngestError::IdempotencyKeyReused);
            }
        }
    }
    Ok(Outcome {
        ids,
        replayed,
        next,
    })
}

fn answer(
    req: &HttpRequest,
    state: &AppState,
    source: &Source,
    flavor: Flavor,
    outcome: Outcome,
) -> HttpResponse {
    if source.kind.wants_plain_200() {
        // Ad platforms and some form tools treat anything but 200 as a failure and retry.
        return HttpResponse::Ok().json(serde_json::json!({
            "status": "received",
            "ids": outcome.ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
        }));
    }
    match flavor {
        Flavor::Json => {
            let mut response = HttpResponse::Accepted();
            if outcome.replayed {
                response.insert_header(("Idempotent-Replayed", "true"));
            }
            let id = outcome
                .ids
                .first()
                .map(ToString::to_string)
                .unwrap_or_default();
            response.json(Accepted {
                id,
                status: "queued",
            })
        }
        Flavor::Browser => {
            let location = redirect_target(req, state, source, outcome.next.as_deref());
            HttpResponse::SeeOther()
                .insert_header((header::LOCATION, location))
                .finish()
        }
    }
}

/// Where a browser goes after a successful post: `_next` when its origin is allowed (checked
/// here, never an open redirect), else the source's thank-you URL, else the built-in page.
fn redirect_target(
    req: &HttpRequest,
    state: &AppState,
    source: &Source,
    next: Option<&str>,
) -> String {
    let own = own_origin(req, state);
    if let Some(url) = next.and_then(|n| Url::parse(n).ok()) {
        let origin = url.origin().ascii_serialization();
        // Only an origin named exactly (or our own origin): `allowed_origins = ["*"]` opens CORS,
        // not redirects to anywhere.
        let named = source
            .allowed_origins
            .iter()
            .any(|o| matches!(o, Origin::Exact(exact) if exact.eq_ignore_ascii_case(&origin)));
        let own_origin = sources::form::is_own_origin(&origin, own.as_deref());
        if matches!(url.scheme(), "http" | "https") && (named || own_origin) {
            return url.to_string();
        }
    }
    match &source.thank_you_url {
        Some(url) => url.to_string(),
        None => format!("/thanks?source={}", source.id),
    }
}

fn flavor(req: &HttpRequest, source: &Source) -> Flavor {
    // Only people at browsers get pages and redirects; servers (partners, platforms) get JSON.
    if !matches!(source.kind, SourceKind::Form) {
        return Flavor::Json;
    }
    let headers = req.headers();
    let get = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let accept = get(header::ACCEPT);
    let content_type = get(header::CONTENT_TYPE).to_ascii_lowercase();
    let fetch_mode = headers.get("sec-fetch-mode").and_then(|v| v.to_str().ok());
    let wants_json = accept.contains("application/json")
        || content_type.starts_with("application/json")
        || content_type.contains("+json")
        || headers.contains_key("x-requested-with")
        || fetch_mode.is_some_and(|m| m != "navigate");
    if wants_json {
        Flavor::Json
    } else {
        Flavor::Browser
    }
}

fn client_ip(req: &HttpRequest, state: &AppState) -> std::net::IpAddr {
    let peer = req
        .peer_addr()
        .map(|a| a.ip())
        .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    // Proxies may add their own header line rather than extend the first: read them all, in
    // order, as one list.
    let forwarded: Vec<&str> = req
        .headers()
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .collect();
    let forwarded = (!forwarded.is_empty()).then(|| forwarded.join(","));
    limits::client_ip(peer, forwarded.as_deref(), &state.trusted_proxies)
}

/// The gateway's own origin as the browser addressed it, to recognise same-origin posts: the
/// scheme it was reached by and the `Host` header, as `https://leads.example.com`. The scheme
/// is `http` (the listener speaks plain HTTP) unless the peer is a trusted proxy, which ends
/// TLS and says so in `X-Forwarded-Proto`. `X-Forwarded-Host` is not consulted: a page must be
/// on the host this request was sent to.
fn own_origin(req: &HttpRequest, state: &AppState) -> Option<String> {
    let host = req.headers().get(header::HOST)?.to_str().ok()?;
    let from_trusted_proxy = req
        .peer_addr()
        .is_some_and(|peer| limits::is_trusted_proxy(peer.ip(), &state.trusted_proxies));
    let forwarded_proto = from_trusted_proxy
        .then(|| req.headers().get("x-forwarded-proto")?.to_str().ok())
        .flatten()
        // Each proxy may append its own; the first is the scheme the browser used.
        .and_then(|protos| protos.split(',').next())
        .map(|proto| proto.trim().to_ascii_lowercase())
        .filter(|proto| matches!(proto.as_str(), "http" | "https"));
    let scheme = forwarded_proto.unwrap_or_else(|| {
        if req.app_config().secure() {
            "https".to_owned()
        } else {
            "http".to_owned()
        }
    });
    let url = Url::parse(&format!("{scheme}://{host}")).ok()?;
    // Only a bare host[:port] makes an origin; anything else in `Host` is not ours.
    (url.path() == "/" && url.query().is_none() && url.username().is_empty())
        .then(|| url.origin().ascii_serialization())
}

/// Refuses a body framed both by `Content-Length` and by `Transfer-Encoding`: a proxy trusting
/// the one and we the other is request smuggling (RFC 9112 §6.1). The answer closes the
/// connection.
fn check_length(req: &HttpRequest) -> Result<(), IngestError> {
    let headers = req.headers();
    if headers.contains_key(header::CONTENT_LENGTH)
        && headers.contains_key(header::TRANSFER_ENCODING)
    {
        return Err(IngestError::AmbiguousLength);
    }
    Ok(())
}

/// Refuses a body in a `Content-Encoding` other than `identity`, which would otherwise be read
/// as if it were plain and refused for the wrong reason, or accepted garbled.
fn check_encoding(req: &HttpRequest) -> Result<(), IngestError> {
    for value in req.headers().get_all(header::CONTENT_ENCODING) {
        let text = String::from_utf8_lossy(value.as_bytes());
        let identity = text
            .split(',')
            .map(str::trim)
            .filter(|coding| !coding.is_empty())
            .all(|coding| coding.eq_ignore_ascii_case("identity"));
        if !identity {
            return Err(IngestError::UnsupportedEncoding(sources::body::shown_name(
                text.trim(),
            )));
        }
    }
    Ok(())
}

fn idempotency_key(
    req: &HttpRequest,
    source: &Source,
) -> Result<Option<IdempotencyKey>, IngestError> {
    let Some(value) = req.headers().get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| {
            IngestError::Malformed(
                "Idempotency-Key must be 1 to 255 visible ASCII characters".to_owned(),
            )
        })?;
    Ok(Some(IdempotencyKey {
        source: source.id.clone(),
        key: key.to_owned(),
        // Filled in once the body is read.
        body_digest: None,
    }))
}

/// The most a body buffer starts with, whatever `Content-Length` claims: the claim costs the
/// sender nothing, so memory is spent only as bytes actually arrive.
const INITIAL_BODY_CAPACITY: usize = 8 * 1024;

/// The least upload rate a body is allowed for: a phone on a poor mobile link still manages
/// this, and a sender that cannot is holding a connection rather than sending a lead.
const MIN_BODY_RATE: u64 = 16 * 1024;

/// The most a body's size adds to `LEADGATE_BODY_TIMEOUT`: a connection may not be held for
/// longer than this past the base, however large the body says it will be.
const MAX_BODY_ALLOWANCE: Duration = Duration::from_secs(120);

/// How long a body of `expected` bytes may take to arrive: `base` (`LEADGATE_BODY_TIMEOUT`)
/// plus a second for each [`MIN_BODY_RATE`] bytes, the extra at most [`MAX_BODY_ALLOWANCE`].
/// So a 1 MiB form over a slow uplink is not cut off, and a trickle is still bounded.
fn body_deadline(base: Duration, expected: usize) -> Duration {
    let expected = u64::try_from(expected).unwrap_or(u64::MAX);
    let allowance = Duration::from_millis(expected.saturating_mul(1000) / MIN_BODY_RATE);
    base.saturating_add(allowance.min(MAX_BODY_ALLOWANCE))
}

/// Reads the body, refusing with 413 as soon as it is known to exceed `limit` (at once from a
/// declared `Content-Length`, or as soon as a chunked body passes the limit) and with 408 when
/// the whole body has not arrived within its deadline ([`body_deadline`] of `base` and the
/// declared length, or of `limit` for a body of unknown length). The admin API reads its
/// bodies with it too.
pub(crate) async fn read_body(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
    base: Duration,
) -> Result<Bytes, IngestError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let deadline = body_deadline(base, declared.unwrap_or(limit).min(limit));
    collect_body(payload, declared, limit, deadline)
        .await
        .map(BytesMut::freeze)
}

/// The body-reading loop of [`read_body`], over any stream of chunks.
async fn collect_body<S, E>(
    mut stream: S,
    declared: Option<usize>,
    limit: usize,
    deadline: Duration,
) -> Result<BytesMut, IngestError>
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    if declared.is_some_and(|len| len > limit) {
        return Err(IngestError::TooLarge { limit });
    }
    let read = async move {
        let mut body = BytesMut::with_capacity(
            declared
                .unwrap_or(1024)
                .min(limit)
                .min(INITIAL_BODY_CAPACITY),
        );
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|e| IngestError::Malformed(format!("the body could not be read: {e}")))?;
            if body.len() + chunk.len() > limit {
                return Err(IngestError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    // One deadline for the whole body: a sender trickling a byte at a time would otherwise
    // hold its connection (and what it sent so far) for as long as it likes.
    tokio::time::timeout(deadline, read)
        .await
        .unwrap_or(Err(IngestError::BodyTimeout { after: deadline }))
}

/// `OPTIONS /in/{source_id}`: the CORS preflight. Only allow-listed origins of form sources
/// are granted; partners are servers and need no CORS.
pub async fn preflight(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let source_id = path.into_inner();
    let Some(source) = state.sources.get(&source_id).cloned() else {
        return IngestError::UnknownSource(source_id).json_response();
    };
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok());
    let requested_method = req
        .headers()
        .get(header::ACCESS_CONTROL_REQUEST_METHOD)
        .and_then(|v| v.to_str().ok());
    let origin_allowed = matches!(source.kind, SourceKind::Form)
        && origin.is_some_and(|o| {
            sources::form::is_allowed(&source, o, own_origin(&req, &state).as_deref())
        });
    let method_allowed =
        requested_method.is_none_or(|m| m.eq_ignore_ascii_case(Method::POST.as_str()));
    let methods = sources::allowed_methods(&source.kind);
    let mut response = match (origin_allowed, method_allowed) {
        (true, true) => HttpResponse::NoContent()
            .insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, methods))
            .insert_header((
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                "Content-Type, Accept, Idempotency-Key, X-Requested-With",
            ))
            .insert_header((header::ACCESS_CONTROL_MAX_AGE, "600"))
            .finish(),
        // The page may post, just not with that method: say which methods it may use.
        (true, false) => {
            let mut response = sources::method_not_allowed(&source).json_response();
            response.headers_mut().insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(methods),
            );
            response
        }
        (false, _) => {
            let origin = origin.unwrap_or("(no Origin header)").to_owned();
            IngestError::OriginNotAllowed(origin).json_response()
        }
    };
    add_cors(&req, &source, response.headers_mut());
    response
}

/// The answer headers a page's script may read: a refusal's wait, a replay's mark.
const EXPOSED_HEADERS: &str = "Retry-After, Idempotent-Replayed";

/// Echoes an allowed `Origin` (never `*`), always with `Vary: Origin` so caches keep answers
/// for different origins apart.
fn add_cors(req: &HttpRequest, source: &Source, headers: &mut header::HeaderMap) {
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    if !matches!(source.kind, SourceKind::Form) {
        return;
    }
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return;
    };
    let allowed = origin.to_str().is_ok_and(|o| source.allows_origin(o));
    if allowed {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSED_HEADERS),
        );
    }
}

/// `GET /in/{source_id}`: a platform's subscription handshake (Meta's `hub.challenge`).
pub async fn handshake(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let source_id = path.into_inner();
    let Some(source) = state.sources.get(&source_id).cloned() else {
        return IngestError::UnknownSource(source_id).json_response();
    };
    let mut response = match sources::handshake(&source, req.query_string()) {
        // The challenge is the sender's text echoed back: never let a browser sniff it as HTML.
        Ok(challenge) => HttpResponse::Ok()
            .content_type("text/plain; charset=utf-8")
            .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
            .body(challenge),
        Err(e) => {
            e.log(&source.id);
            e.json_response()
        }
    };
    add_cors(&req, &source, response.headers_mut());
    response
}

/// Any other method on `/in/{source_id}` (`PUT`, `DELETE`, …): `404 unknown_source` for a
/// source that does not exist, else `405 method_not_allowed` with the source's own `Allow`.
pub async fn other_method(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let source_id = path.into_inner();
    let Some(source) = state.sources.get(&source_id) else {
        return IngestError::UnknownSource(source_id).json_response();
    };
    let mut response = sources::method_not_allowed(source).json_response();
    add_cors(&req, source, response.headers_mut());
    response
}

/// `GET /thanks`: the built-in thank-you page.
pub async fn thanks() -> HttpResponse {
    HttpResponse::build(StatusCode::OK)
        .content_type("text/html; charset=utf-8")
        .body(super::pages::thanks_page().into_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(
        parts: &[&'static [u8]],
    ) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Unpin {
        futures_util::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn the_body_deadline_grows_with_the_expected_size_up_to_a_cap() {
        let base = Duration::from_secs(15);
        assert_eq!(body_deadline(base, 0), base);
        assert_eq!(
            body_deadline(base, 16 * 1024),
            Duration::from_secs(16),
            "a second per 16 KiB"
        );
        // A 1 MiB multipart form over a ~50 KB/s uplink takes about 21 s: it fits.
        let one_mib = body_deadline(base, 1024 * 1024);
        assert_eq!(one_mib, Duration::from_secs(15 + 64));
        assert!(one_mib > Duration::from_secs_f64(1024.0 * 1024.0 / 50_000.0));
        // However large the claim, the connection is held at most base + 120 s.
        assert_eq!(
            body_deadline(base, 100 * 1024 * 1024),
            base + MAX_BODY_ALLOWANCE
        );
        assert_eq!(body_deadline(base, usize::MAX), base + MAX_BODY_ALLOWANCE);
        assert_eq!(
            body_deadline(Duration::from_secs(1), 2000),
            Duration::from_millis(1122)
        );
    }

    #[tokio::test]
    async fn the_buffer_does_not_grow_to_the_declared_length_before_bytes_arrive() {
        let declared = 1024 * 1024;
        let body = collect_body(
            chunks(&[b"name=Ana"]),
            Some(declared),
            declared,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(&body[..], b"name=Ana");
        assert!(
            body.capacity() <= INITIAL_BODY_CAPACITY,
            "a 1 MiB Content-Length reserved {} bytes",
            body.capacity()
        );
    }

    #[tokio::test]
    async fn a_body_that_never_ends_is_cut_off_at_the_deadline() {
        let pending = futures_util::stream::pending::<Result<Bytes, std::convert::Infallible>>();
        let started = std::time::Instant::now();
        let error = collect_body(pending, Some(100), 1024, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(
            matches!(error, IngestError::BodyTimeout { .. }),
            "{error:?}"
        );
        assert_eq!(error.status(), StatusCode::REQUEST_TIMEOUT);
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_declared_length_beyond_the_limit_is_refused_before_reading() {
        let pending = futures_util::stream::pending::<Result<Bytes, std::convert::Infallible>>();
        let error = collect_body(pending, Some(2048), 1024, Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(
            matches!(error, IngestError::TooLarge { limit: 1024 }),
            "{error:?}"
        );
    }
}
