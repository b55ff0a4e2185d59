//! The simulator's routes: Onpipeline's API surface (`/Leadsin`, every other resource) and the
//! `/_sim/*` control endpoints that tests and operators use to inspect and script it.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, ContentType};
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::state::{Admission, Shared};
use super::{Fault, RequestOutcome, SettingsUpdate, TokenKind};
use super::{graph, leadsin};
use crate::telemetry::{mask_email, mask_phone};

/// Largest body read; the reference's largest upload (an mp3 on `/CallRecord`) is 70 MB, but a
/// lead is a few kilobytes, so this only stops a runaway client.
pub(crate) const MAX_BODY: usize = 8 * 1024 * 1024;

pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    // Before the `/_sim` scope, which would otherwise take `/_sim/graph/…` and answer 404.
    graph::routes(cfg);
    cfg.service(
        web::scope("/_sim")
            .route("/leads", web::get().to(get_leads))
            .route("/leads", web::delete().to(delete_leads))
            .route("/requests", web::get().to(get_requests))
            .route("/repeats", web::get().to(get_repeats))
            .route("/faults", web::get().to(get_faults))
            .route("/faults", web::post().to(post_faults))
            .route("/faults", web::delete().to(delete_faults))
            .route("/settings", web::get().to(get_settings))
            .route("/settings", web::post().to(post_settings)),
    )
    .service(
        web::resource("/Leadsin")
            .route(web::post().to(leadsin))
            .default_service(web::to(leadsin_wrong_method)),
    )
    .default_service(web::to(other_resource));
}

/// An answer in Onpipeline's Error shape.
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    #[serde(rename = "Error")]
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ErrorBody<'a> {
    code: String,
    message: &'a str,
    time: String,
    #[serde(rename = "IP")]
    ip: String,
}

#[derive(Serialize)]
struct CreatedEnvelope<'a> {
    #[serde(rename = "Header")]
    header: CreatedHeader,
    #[serde(rename = "Data")]
    data: CreatedData<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CreatedHeader {
    status: &'static str,
    code: &'static str,
    time: String,
    endpoint: &'static str,
}

#[derive(Serialize)]
struct CreatedData<'a> {
    #[serde(rename = "LeadID")]
    lead_id: &'a str,
}

/// The reference's DATETIME format.
fn onpipeline_time() -> String {
    Utc::now().format("%Y-%m-%d %H:%M:%S").to_string()
}

fn error_response(
    status: StatusCode,
    message: &str,
    peer_ip: IpAddr,
    retry_after: Option<&str>,
) -> HttpResponse {
    let body = ErrorEnvelope {
        error: ErrorBody {
            code: status.as_u16().to_string(),
            message,
            time: onpipeline_time(),
            ip: peer_ip.to_string(),
        },
    };
    let mut builder = HttpResponse::build(status);
    if let Some(after) = retry_after {
        builder.insert_header((header::RETRY_AFTER, after));
    }
    builder.json(body)
}

fn created_response(lead_id: &str) -> HttpResponse {
    success_response(StatusCode::CREATED, lead_id)
}

/// The reference's success shape with any of its success statuses (200, 201, 202): `Header`
/// with `Code` equal to the HTTP status, and `Data.LeadID`.
fn success_response(status: StatusCode, lead_id: &str) -> HttpResponse {
    let (header_status, code) = match status.as_u16() {
        200 => ("OK", "200"),
        202 => ("Accepted", "202"),
        _ => ("Created", "201"),
    };
    HttpResponse::build(status).json(CreatedEnvelope {
        header: CreatedHeader {
            status: header_status,
            code,
            time: onpipeline_time(),
            endpoint: "Leadsin",
        },
        data: CreatedData { lead_id },
    })
}

/// What a proxy, WAF or load balancer in front of an API answers on its own: nginx's HTML page
/// for the status, not the API's JSON.
fn proxy_page(status: StatusCode) -> HttpResponse {
    let title = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    HttpResponse::build(status)
        .content_type(ContentType::html())
        .body(format!(
            "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n\
             <center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n\
             </body>\r\n</html>\r\n"
        ))
}

/// A response whose body stream fails before yielding anything. actix-http encodes the status
/// line and headers into its write buffer but flushes that buffer only after the body has been
/// polled; a body error aborts the connection first, so the client receives no byte of an HTTP
/// answer and sees the TLS connection closed mid-request (reqwest: "connection closed before
/// message completed"). This is the closest actix comes to a server or network dying without
/// touching the socket directly; actix logs the aborted body at error level, which is expected.
/// Over HTTP/2 (offered by actix's ALPN) the same error resets only the stream (RST_STREAM).
fn dropped_connection() -> HttpResponse {
    HttpResponse::Ok().streaming(futures_util::stream::once(async {
        Err::<Bytes, _>(std::io::Error::other(
            "simulated Onpipeline connection drop (a scripted fault, not a bug)",
        ))
    }))
}

fn peer_ip(req: &HttpRequest) -> IpAddr {
    req.peer_addr()
        .map(|addr| addr.ip().to_canonical())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// Header, token and IP checks, shared by every resource. The token is looked up before the IP
/// because Onpipeline's allow-list belongs to the account a token identifies.
fn authenticate(
    req: &HttpRequest,
    shared: &Shared,
    peer_ip: IpAddr,
) -> Result<TokenKind, ApiError> {
    let token = match req.headers().get(header::AUTHORIZATION) {
        None => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "Bad Request - Missing Token",
            ));
        }
        Some(value) => match value.to_str() {
            Ok(token) if !token.trim().is_empty() => token.trim(),
            Ok(_) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "Bad Request - Missing Token",
                ));
            }
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "Bad Request - Invalid Header",
                ));
            }
        },
    };
    let Some(kind) = shared.access.tokens.get(token).copied() else {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "Invalid Token"));
    };
    let allowed = &shared.access.allow_ips;
    if !allowed.is_empty() && !allowed.iter().any(|ip| ip.to_canonical() == peer_ip) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden - Invalid IP",
        ));
    }
    Ok(kind)
}

/// The checks of `POST /Leadsin`, in this order (the first failing one answers):
/// 1. `Authorization` header missing, blank or not text → 400
/// 2. token unknown → 401
/// 3. peer IP not on a non-empty allow-list → 403
/// 4. token is `read-only` (no write operations) → 403
/// 5. body is not JSON → 406
/// 6. body is not a lead as the reference describes (mandatory names, types, shapes) → 406
/// 7. duplicate detection on and the same canonical payload already accepted → 409 (the
///    repeat is recorded, nothing is stored)
/// 8. otherwise the lead is stored → 201 with a new `LeadID`
///
/// Authentication comes before anything about the body so an unauthenticated caller learns
/// nothing about validation; duplicates come last because only a valid lead can be a duplicate.
fn create_lead(
    req: &HttpRequest,
    body: &[u8],
    shared: &Shared,
    peer_ip: IpAddr,
) -> Result<String, ApiError> {
    let kind = authenticate(req, shared, peer_ip)?;
    if kind == TokenKind::ReadOnly {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden - No permissions for write operations",
        ));
    }
    let payload: serde_json::Value = serde_json::from_slice(body)
        .map_err(|_| ApiError::new(StatusCode::NOT_ACCEPTABLE, "Not acceptable - Invalid JSON"))?;
    leadsin::validate(&payload)
        .map_err(|message| ApiError::new(StatusCode::NOT_ACCEPTABLE, message))?;
    if let Some(known) = shared.settings().custom_fields {
        leadsin::check_custom_fields(&payload, &known)
            .map_err(|message| ApiError::new(StatusCode::NOT_ACCEPTABLE, message))?;
    }
    let canonical = leadsin::canonical(&payload);
    let emails = masked(&payload, "Email", "Address", mask_email);
    let phones = masked(&payload, "Phone", "Number", mask_phone);
    match shared.admit(payload, canonical, peer_ip) {
        Admission::Created(lead_id) => {
            tracing::info!(
                %lead_id, %peer_ip, email = %emails, phone = %phones,
                "Simulated Onpipeline created a lead"
            );
            Ok(lead_id)
        }
        Admission::Duplicate => Err(ApiError::new(StatusCode::CONFLICT, "Conflict - Duplicate")),
    }
}

fn masked(payload: &serde_json::Value, array: &str, key: &str, mask: fn(&str) -> String) -> String {
    leadsin::contact_values(payload, array, key)
        .into_iter()
        .map(mask)
        .collect::<Vec<_>>()
        .join(",")
}

/// One `/Leadsin` request in the log. If the handler's future is dropped before it settles the
/// entry (actix drops it when the client hangs up), the entry is marked cancelled, or abandoned
/// when the request had been handled and only its answer was still held back.
struct InFlight {
    shared: web::Data<Shared>,
    id: u64,
    settled: bool,
    handled: bool,
}

impl InFlight {
    fn settle(mut self, response: HttpResponse, outcome: RequestOutcome) -> HttpResponse {
        let status = (outcome == RequestOutcome::Answered).then(|| response.status().as_u16());
        self.shared.settle(self.id, status, outcome);
        self.settled = true;
        response
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.settled {
            let outcome = if self.handled {
                RequestOutcome::Abandoned
            } else {
                RequestOutcome::Cancelled
            };
            self.shared.settle(self.id, None, outcome);
        }
    }
}

async fn leadsin(req: HttpRequest, body: Bytes, shared: web::Data<Shared>) -> HttpResponse {
    let peer_ip = peer_ip(&req);
    let (id, fault, settings) = shared.arrive(peer_ip);
    let mut in_flight = InFlight {
        shared: shared.clone(),
        id,
        settled: false,
        handled: false,
    };
    if settings.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(settings.latency_ms)).await;
    }
    if let Some(fault) = &fault {
        tracing::info!(?fault, %peer_ip, "Simulated Onpipeline applies a scripted fault");
    }
    let answer = |result: Result<String, ApiError>| match result {
        Ok(lead_id) => created_response(&lead_id),
        Err(error) => {
            tracing::info!(
                status = error.status.as_u16(), reason = %error.message, %peer_ip,
                "Simulated Onpipeline refused a Leadsin request"
            );
            error_response(error.status, &error.message, peer_ip, None)
        }
    };
    let response = match fault {
        None => {
            in_flight.handled = true;
            answer(create_lead(&req, &body, &shared, peer_ip))
        }
        Some(Fault::Delay { ms }) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            in_flight.handled = true;
            answer(create_lead(&req, &body, &shared, peer_ip))
        }
        Some(Fault::Status {
            status,
            retry_after,
            message,
        }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let message = message.unwrap_or_else(|| {
                status
                    .canonical_reason()
                    .unwrap_or("Unknown error")
                    .to_owned()
            });
            error_response(status, &message, peer_ip, retry_after.as_deref())
        }
        Some(Fault::Raw {
            status,
            content_type,
            body,
            retry_after,
        }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut builder = HttpResponse::build(status);
            if let Some(content_type) = content_type {
                builder.insert_header((header::CONTENT_TYPE, content_type));
            }
            if let Some(after) = retry_after {
                builder.insert_header((header::RETRY_AFTER, after));
            }
            builder.body(body)
        }
        Some(Fault::NonJson { status }) => {
            proxy_page(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        }
        Some(Fault::NonJson502) => proxy_page(StatusCode::BAD_GATEWAY),
        Some(Fault::SuccessStatus { status }) => match create_lead(&req, &body, &shared, peer_ip) {
            Ok(lead_id) => {
                let status = StatusCode::from_u16(status)
                    .ok()
                    .filter(StatusCode::is_success)
                    .unwrap_or(StatusCode::CREATED);
                success_response(status, &lead_id)
            }
            Err(error) => answer(Err(error)),
        },
        Some(Fault::Drop) => {
            return in_flight.settle(dropped_connection(), RequestOutcome::Dropped);
        }
        Some(Fault::DropAfterAccept) => match create_lead(&req, &body, &shared, peer_ip) {
            Ok(_) => return in_flight.settle(dropped_connection(), RequestOutcome::Dropped),
            Err(error) => answer(Err(error)),
        },
    };
    if in_flight.handled && settings.answer_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(settings.answer_delay_ms)).await;
    }
    in_flight.settle(response, RequestOutcome::Answered)
}

/// `/Leadsin` with any method but POST: 405 in the documented Error shape, and nothing is
/// created or logged as a Leadsin request (only a POST creates a lead).
async fn leadsin_wrong_method(req: HttpRequest) -> HttpResponse {
    let peer_ip = peer_ip(&req);
    let mut response = error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method Not Allowed - Leadsin accepts POST only",
        peer_ip,
        None,
    );
    response
        .headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
    response
}

/// Every resource but `/Leadsin`: the simulator implements no other, so after the shared checks a
/// `leadsin` token is refused (it may use nothing else) and any other token gets 404.
async fn other_resource(req: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    let peer_ip = peer_ip(&req);
    let error = match authenticate(&req, &shared, peer_ip) {
        Err(error) => error,
        Ok(TokenKind::Leadsin) => ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden - No permissions to access this resource",
        ),
        Ok(_) => ApiError::new(StatusCode::NOT_FOUND, "Not Found - Resource name not found"),
    };
    error_response(error.status, &error.message, peer_ip, None)
}

// ---- control endpoints -------------------------------------------------------------------

fn bad_control_request(what: &str, err: serde_json::Error) -> HttpResponse {
    HttpResponse::BadRequest().json(serde_json::json!({ "error": format!("{what}: {err}") }))
}

async fn get_leads(shared: web::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok().json(shared.received())
}

async fn delete_leads(shared: web::Data<Shared>) -> HttpResponse {
    shared.reset();
    HttpResponse::NoContent().finish()
}

async fn get_requests(shared: web::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok().json(shared.requests())
}

async fn get_repeats(shared: web::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok().json(shared.repeats())
}

async fn get_faults(shared: web::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok().json(shared.pending_faults())
}

/// Either one fault or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    Many(Vec<Fault>),
    One(Fault),
}

async fn post_faults(body: Bytes, shared: web::Data<Shared>) -> HttpResponse {
    let faults = match serde_json::from_slice::<OneOrMany>(&body) {
        Ok(OneOrMany::Many(faults)) => faults,
        Ok(OneOrMany::One(fault)) => vec![fault],
        Err(err) => return bad_control_request("expected a fault or a list of faults", err),
    };
    let pending = shared.push_faults(faults);
    HttpResponse::Ok().json(serde_json::json!({ "pending": pending }))
}

async fn delete_faults(shared: web::Data<Shared>) -> HttpResponse {
    shared.clear_faults();
    HttpResponse::NoContent().finish()
}

async fn get_settings(shared: web::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok().json(shared.settings())
}

async fn post_settings(body: Bytes, shared: web::Data<Shared>) -> HttpResponse {
    match serde_json::from_slice::<SettingsUpdate>(&body) {
        Ok(update) => HttpResponse::Ok().json(shared.update_settings(update)),
        Err(err) => bad_control_request("expected settings", err),
    }
}
