//! The HTTP side: the route table (on one screen, below), the shared state handlers read, and
//! the handlers themselves — ingest in [`ingest`], health in [`health`], the sandbox pages in
//! [`sandbox`].

pub mod admin;
pub mod health;
pub mod ingest;
pub mod limits;
pub mod pages;
pub mod sandbox;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use actix_web::dev::ResourceDef;
use actix_web::{HttpRequest, HttpResponse, web};
use ipnet::IpNet;

use crate::config::Sources;
use crate::error::{ErrorBody, ErrorDetail, IngestError};
use crate::forwarder::DeliveryState;
use crate::queue::Queue;
use crate::sim::Simulator;
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::SecretString;

/// What every handler can read.
pub struct AppState {
    pub sources: Sources,
    pub queue: Queue,
    pub limiters: limits::Limiters,
    pub trusted_proxies: Vec<IpNet>,
    pub delivery: Arc<DeliveryState>,
    /// The in-process simulator in `--sandbox` mode (its inbox is shown at `/sandbox`).
    pub sandbox: Option<Arc<Simulator>>,
    /// False in a forwarder-only process: `/in/...` answers 503.
    pub ingest: bool,
    /// `LEADGATE_ADMIN_TOKEN`: without it the admin API is off (404).
    pub admin_token: Option<SecretString>,
    /// `LEADGATE_METRICS_TOKEN`: when set, `/metrics` wants it as a bearer token.
    pub metrics_token: Option<SecretString>,
    pub metrics: PrometheusHandle,
    /// `LEADGATE_BODY_TIMEOUT`: how long a request's whole body may take to arrive, before
    /// the allowance for its size.
    pub body_timeout: Duration,
    accepting: AtomicBool,
}

/// What [`AppState::new`] needs besides the sources and the queue.
pub struct StateOptions {
    pub trusted_proxies: Vec<IpNet>,
    pub delivery: Arc<DeliveryState>,
    pub sandbox: Option<Arc<Simulator>>,
    pub ingest: bool,
    pub admin_token: Option<SecretString>,
    pub metrics_token: Option<SecretString>,
    pub body_timeout: Duration,
}

impl AppState {
    pub fn new(sources: Sources, queue: Queue, options: StateOptions) -> Self {
        let limiters = limits::Limiters::new(&sources);
        Self {
            sources,
            queue,
            limiters,
            trusted_proxies: options.trusted_proxies,
            delivery: options.delivery,
            sandbox: options.sandbox,
            ingest: options.ingest,
            admin_token: options.admin_token,
            metrics_token: options.metrics_token,
            metrics: crate::telemetry::metric::install(),
            body_timeout: options.body_timeout,
            accepting: AtomicBool::new(true),
        }
    }

    /// False once shutdown began: new leads are answered 503 so senders retry elsewhere.
    pub fn accepting(&self) -> bool {
        self.ingest && self.accepting.load(Ordering::Relaxed)
    }

    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Relaxed);
    }
}

/// Declares the routes once: registers them and lists them (the list is checked against
/// `openapi.yaml` by a test).
macro_rules! routes {
    ($( $method:ident $path:literal => $handler:path ),* $(,)?) => {
        /// Every `(method, path)` the gateway serves.
        pub const ROUTES: &[(&str, &str)] = &[ $( (stringify!($method), $path) ),* ];

        fn register(cfg: &mut web::ServiceConfig) {
            $( cfg.route($path, web::method(actix_web::http::Method::$method).to($handler)); )*
        }
    };
}

routes! {
    POST "/in/{source_id}" => ingest::ingest,
    GET "/in/{source_id}" => ingest::handshake,
    OPTIONS "/in/{source_id}" => ingest::preflight,
    GET "/thanks" => ingest::thanks,
    GET "/healthz" => health::healthz,
    HEAD "/healthz" => health::healthz,
    GET "/readyz" => health::readyz,
    HEAD "/readyz" => health::readyz,
    GET "/metrics" => health::metrics,
    GET "/admin/stats" => admin::stats,
    GET "/admin/leads/{id}" => admin::lead,
    GET "/admin/dead" => admin::dead,
    POST "/admin/dead/replay" => admin::replay,
    DELETE "/admin/dead/{id}" => admin::delete_dead,
    POST "/admin/pause" => admin::pause,
    POST "/admin/resume" => admin::resume,
    GET "/" => sandbox::demo,
    GET "/sandbox" => sandbox::inbox,
}

/// Builds the routes on an actix app.
pub fn configure(state: web::Data<AppState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(state);
        register(cfg);
        // Every other method on a source: its answer depends on the source (unknown → 404, else
        // its own `Allow`), so it goes to the ingest side, which knows the source.
        cfg.route(SOURCE_PATH, web::route().to(ingest::other_method));
        cfg.default_service(web::to(fallback));
    }
}

/// The path of the sources' routes.
const SOURCE_PATH: &str = "/in/{source_id}";

/// Each path of [`ROUTES`] but the sources', compiled once, with the methods it takes, for
/// [`fallback`].
static PATHS: LazyLock<Vec<(ResourceDef, Vec<&'static str>)>> = LazyLock::new(|| {
    let mut paths: Vec<(&str, Vec<&str>)> = Vec::new();
    for &(method, path) in ROUTES.iter().filter(|(_, path)| *path != SOURCE_PATH) {
        match paths.iter_mut().find(|(known, _)| *known == path) {
            Some((_, methods)) => methods.push(method),
            None => paths.push((path, vec![method])),
        }
    }
    paths
        .into_iter()
        .map(|(path, methods)| (ResourceDef::new(path), methods))
        .collect()
});

/// What no route answers: `405 method_not_allowed` with `Allow` when the path is served for
/// other methods, `404 not_found` when it is not served at all. (`/in/{source_id}` never gets
/// here: see [`configure`].)
async fn fallback(req: HttpRequest) -> HttpResponse {
    // Several patterns may match one path (`/admin/dead/replay` is also `/admin/dead/{id}`).
    let mut allowed: Vec<&str> = Vec::new();
    for (_, methods) in PATHS.iter().filter(|(path, _)| path.is_match(req.path())) {
        for method in methods {
            if !allowed.contains(method) {
                allowed.push(method);
            }
        }
    }
    if allowed.is_empty() {
        return not_found().await;
    }
    IngestError::MethodNotAllowed {
        allowed: allowed.join(", ").into(),
    }
    .json_response()
}

async fn not_found() -> HttpResponse {
    HttpResponse::NotFound().json(ErrorBody {
        error: ErrorDetail {
            code: "not_found",
            message: "there is no such route; leads are posted to /in/{source_id}".to_owned(),
            fields: None,
        },
    })
}
