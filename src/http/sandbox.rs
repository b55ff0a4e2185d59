//! The sandbox's pages: a demo form at `/` and the simulator's inbox at `/sandbox`.
//! Outside `--sandbox` both answer 404.

use actix_web::{HttpResponse, web};

use super::{AppState, pages};

/// The source the demo form posts to.
pub const DEMO_SOURCE: &str = "website";

pub async fn demo(state: web::Data<AppState>) -> HttpResponse {
    if state.sandbox.is_none() {
        return super::not_found().await;
    }
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(pages::demo_page(DEMO_SOURCE).into_string())
}

pub async fn inbox(state: web::Data<AppState>) -> HttpResponse {
    let Some(sim) = &state.sandbox else {
        return super::not_found().await;
    };
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(pages::sandbox_page(&sim.received()).into_string())
}
