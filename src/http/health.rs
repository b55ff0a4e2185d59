//! `GET /healthz` (the process answers) and `GET /readyz` (the queue is reachable, and how
//! delivery is doing).

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::AppState;
use crate::forwarder::DeliveryStatus;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// 200 while leads can be accepted (the queue answers), with `status: "degraded"` when
/// delivery is held or paused or Meta leads are parked; 503 when the queue is unreachable or
/// the process is draining.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let queue = state.queue.ping().await;
    let delivery = state.delivery.get();
    let attention = state.delivery.attention();
    // A forwarder-only process is ready when its queue answers.
    let draining = state.ingest && !state.accepting();
    let status = match (&queue, &delivery, draining) {
        (Err(_), _, _) | (_, _, true) => "unavailable",
        (Ok(()), DeliveryStatus::Running | DeliveryStatus::Off { .. }, false)
            if attention.is_empty() =>
        {
            "ready"
        }
        (Ok(()), _, false) => "degraded",
    };
    let body = json!({
        "status": status,
        "accepting": state.accepting(),
        "ingest": state.ingest,
        "queue": {
            "backend": state.queue.backend_name(),
            "reachable": queue.is_ok(),
            "error": queue.err().map(|e| e.to_string()),
        },
        "delivery": delivery,
        // Meta pages whose leads are parked until their token or permissions are fixed.
        "attention": attention,
    });
    if status == "unavailable" {
        HttpResponse::ServiceUnavailable().json(body)
    } else {
        HttpResponse::Ok().json(body)
    }
}

/// `GET /metrics`: Prometheus text format. With `LEADGATE_METRICS_TOKEN` set it wants
/// `Authorization: Bearer <token>`.
pub async fn metrics(req: actix_web::HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if let Some(token) = &state.metrics_token
        && !super::admin::bearer_matches(&req, token)
    {
        return super::admin::unauthorized();
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}
