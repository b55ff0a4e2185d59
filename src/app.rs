//! Builds the gateway from its settings — queue, HTTP server, forwarder, and in sandbox mode
//! the in-process Onpipeline simulator — binds its own listener (port 0 in tests) and shuts
//! everything down in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpServer, web};
use anyhow::Context;
use secrecy::SecretString;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::{Settings, Sources, TokenSource};
use crate::forwarder::{DeliveryState, DeliveryStatus, Forwarder};
use crate::graph::{GraphClient, GraphSettings};
use crate::http::{self, AppState, StateOptions};
use crate::onpipeline::{ClientSettings, LeadsinClient};
use crate::queue::Queue;
use crate::sim::{SimConfig, Simulator, TokenKind};

/// The sources file shipped with the repository; the sandbox falls back to it when no file is
/// found, so `serve --sandbox` works from any directory.
pub const EXAMPLE_SOURCES: &str = include_str!("../leadgate.toml");

/// The token the sandbox's simulator accepts.
pub const SANDBOX_TOKEN: &str = "sandbox-leadsin-token";

/// Which parts of the gateway this process runs.
#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    /// Deliver to the in-process Onpipeline simulator instead of Onpipeline.
    pub sandbox: bool,
    /// Accept leads over HTTP (`/in/...`). Health routes are served either way.
    pub ingest: bool,
    /// Run the forwarder.
    pub forwarder: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            sandbox: false,
            ingest: true,
            forwarder: true,
        }
    }
}

/// A running gateway.
pub struct Gateway {
    addr: SocketAddr,
    server: ServerHandle,
    server_task: JoinHandle<std::io::Result<()>>,
    forwarder_task: Option<JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
    state: web::Data<AppState>,
    simulator: Option<Arc<Simulator>>,
    housekeeping: JoinHandle<()>,
    backfill: Vec<JoinHandle<()>>,
    /// How long the forwarder may take to stop: its own drain deadline, plus time to release
    /// the leases still unfinished then.
    forwarder_stop: Duration,
}

impl Gateway {
    pub async fn start(settings: Settings, options: ServeOptions) -> anyhow::Result<Self> {
        crate::tls::install_default_provider();

        let sources = load_sources(&settings, options.sandbox)?;
        if options.ingest {
            // Nothing could be received: refuse rather than run a gateway that 404s every lead.
            sources
                .require_some(&settings.sources)
                .context("the ingest role needs a source (run with --no-ingest to only deliver)")?;
        }

        // Bound before anything else starts: a second instance started by mistake on a taken
        // port must stop here, before it opens the queue and runs a forwarder on it.
        let listener = std::net::TcpListener::bind(settings.listen)
            .with_context(|| format!("cannot listen on {} (LEADGATE_LISTEN)", settings.listen))?;
        let addr = listener.local_addr()?;

        let simulator = if options.sandbox {
            let sim = Simulator::start(SimConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                tokens: vec![(SANDBOX_TOKEN.to_owned(), TokenKind::Leadsin)],
                allow_ips: Vec::new(),
                ca_out: None,
            })
            .await
            .context("starting the sandbox's Onpipeline simulator")?;
            warn!(
                upstream = %sim.base_url(),
                "SANDBOX MODE: leads are delivered to the built-in Onpipeline simulator, not to Onpipeline."
            );
            Some(Arc::new(sim))
        } else {
            None
        };

        let consumer = format!(
            "{}-{}-{:04x}",
            hostname(),
            std::process::id(),
            rand::random::<u16>()
        );
        let queue = Queue::open(&settings.backend(), settings.queue_settings(), &consumer)
            .await
            .context("opening the queue")?;
        info!(backend = queue.backend_name(), "Queue opened.");
        match queue.durability_warning().await {
            Ok(Some(warning)) => warn!(warning, "The queue's store puts accepted leads at risk."),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "Could not check the queue's durability settings."),
        }

        // Delivery: in the sandbox to the simulator; otherwise to Onpipeline when a token is set.
        let delivery_plan = if let Some(sim) = &simulator {
            let mut client = client_settings(&settings)?;
            client.endpoint = format!("{}/Leadsin", sim.base_url()).parse()?;
            client.extra_ca_pem.push(sim.ca_pem().as_bytes().to_vec());
            Some((
                client,
                TokenSource::Inline(SecretString::from(SANDBOX_TOKEN)),
            ))
        } else {
            match settings.token_source() {
                Some(token) => Some((client_settings(&settings)?, token)),
                None => None,
            }
        };
        let status = match (&delivery_plan, options.forwarder) {
            (_, false) => DeliveryStatus::Off {
                reason: "this process runs ingest only (--no-forwarder)".to_owned(),
            },
            (None, true) => DeliveryStatus::Held {
                reason: "no Onpipeline token: set LEADGATE_ONPIPELINE_TOKEN or LEADGATE_ONPIPELINE_TOKEN_FILE; leads are queued and wait".to_owned(),
            },
            // Checked now, so `/readyz` and the log say so from the start, not at the first
            // lead; the forwarder reads the file again until it can.
            (Some((_, token)), true) => match token.load() {
                Ok(_) => DeliveryStatus::Running,
                Err(e) => DeliveryStatus::Held {
                    reason: crate::forwarder::token_unreadable(&e),
                },
            },
        };
        if let DeliveryStatus::Held { reason } = &status {
            warn!(
                reason,
                "Delivery is held: leads are accepted and queued but not delivered."
            );
        }
        let delivery = DeliveryState::new(status);

        // Meta's Graph API: in the sandbox, the simulator's Graph side.
        let graph = GraphClient::new(&graph_settings(&settings, simulator.as_deref())?)?;

        let (shutdown, shutdown_rx) = watch::channel(false);
        // The delivery side also lists Meta forms (it needs no ingest, only the queue).
        let backfill = if options.forwarder {
            crate::backfill::spawn(
                &sources,
                queue.clone(),
                graph.clone(),
                delivery.clone(),
                shutdown_rx.clone(),
            )
        } else {
            Vec::new()
        };
        let forwarder_task = match (delivery_plan, options.forwarder) {
            (Some((client_settings, token)), true) => {
                let forwarder = Forwarder {
                    queue: queue.clone(),
                    client: LeadsinClient::new(&client_settings)?,
                    token,
                    policy: settings.retry_policy(),
                    concurrency: settings.delivery_concurrency,
                    state: delivery.clone(),
                    probe_max: settings.pause_probe_max,
                    drain_timeout: settings.shutdown_timeout,
                    upstream_rate: std::num::NonZeroU32::new(settings.onpipeline_rate),
                    lease_timeout: settings.lease_timeout,
                    graph,
                    sources: sources.clone(),
                    parked_retry: settings.graph_parked_retry,
                };
                Some(tokio::spawn(forwarder.run(shutdown_rx)))
            }
            _ => None,
        };

        let state = web::Data::new(AppState::new(
            sources,
            queue,
            StateOptions {
                trusted_proxies: settings.trusted_proxies.clone(),
                delivery,
                sandbox: simulator.clone(),
                ingest: options.ingest,
                admin_token: settings.admin_token.clone(),
                metrics_token: settings.metrics_token.clone(),
                body_timeout: settings.body_timeout,
            },
        ));
        // The recorder is installed by now: every series known in advance exists from here on.
        crate::telemetry::metric::register_known_series(&state.sources);
        let server_state = state.clone();
        let server =
            HttpServer::new(move || App::new().configure(http::configure(server_state.clone())))
                // Set rather than inherited: a request's head must arrive within 5 s (else
                // 408 and the connection closes), an idle keep-alive connection is closed after
                // 5 s, and a closing one is given 1 s. The body has its own deadline
                // (`LEADGATE_BODY_TIMEOUT`), kept by the ingest handler.
                .client_request_timeout(Duration::from_secs(5))
                .keep_alive(Duration::from_secs(5))
                .client_disconnect_timeout(Duration::from_secs(1))
                .listen(listener)?
                .disable_signals()
                .shutdown_timeout(10)
                .run();
        let handle = server.handle();
        let server_task = tokio::spawn(server);

        let housekeeping = tokio::spawn(housekeeping(state.clone()));

        info!(%addr, ingest = options.ingest, forwarder = options.forwarder, "leadgate is listening.");
        if options.sandbox {
            info!(
                "Sandbox: open http://{addr}/ for a demo form and http://{addr}/sandbox for what the simulator received."
            );
        }
        Ok(Self {
            addr,
            server: handle,
            server_task,
            forwarder_task,
            shutdown,
            state,
            simulator,
            housekeeping,
            backfill,
            forwarder_stop: settings.shutdown_timeout + Duration::from_secs(10),
        })
    }

    /// The address the HTTP server listens on (the real port when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn simulator(&self) -> Option<&Arc<Simulator>> {
        self.simulator.as_ref()
    }

    /// The queue this gateway writes to (tests read its counts).
    pub fn queue(&self) -> &Queue {
        &self.state.queue
    }

    pub fn delivery(&self) -> DeliveryStatus {
        self.state.delivery.get()
    }

    /// Runs until SIGINT or SIGTERM, then shuts down gracefully.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        wait_for_signal().await;
        info!("Signal received; shutting down.");
        self.shutdown().await;
        Ok(())
    }

    /// Stops accepting (new leads get 503), lets in-flight requests and deliveries finish, and
    /// stops.
    pub async fn shutdown(self) {
        self.state.stop_accepting();
        let _ = self.shutdown.send(true);
        if let Some(task) = self.forwarder_task
            && tokio::time::timeout(self.forwarder_stop, task)
                .await
                .is_err()
        {
            warn!("The forwarder did not stop in time; unfinished leases will be redelivered.");
        }
        for mut task in self.backfill {
            // A listing in flight only reads and enqueues (idempotently): cutting it is safe.
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
                warn!("A Meta backfill listing did not stop within 5 s; it was cut off.");
            }
        }
        self.server.stop(true).await;
        let _ = self.server_task.await;
        self.housekeeping.abort();
        if let Some(sim) = self.simulator
            && let Ok(sim) = Arc::try_unwrap(sim)
        {
            sim.stop().await;
        }
    }
}

/// Periodic chores: forget idle rate-limit keys, sample the queue into gauges, and let the
/// metrics recorder drain its histograms.
async fn housekeeping(state: web::Data<AppState>) {
    use crate::telemetry::metric;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut ticks: u64 = 0;
    loop {
        tick.tick().await;
        ticks += 1;
        if ticks.is_multiple_of(12) {
            state.limiters.forget_idle();
        }
        match state.queue.stats().await {
            Ok(stats) => {
                for (name, value) in [
                    ("ready", stats.ready),
                    ("leased", stats.leased),
                    ("delayed", stats.delayed),
                    ("dead", stats.dead),
                ] {
                    metrics::gauge!(metric::QUEUE_DEPTH, "state" => name).set(value as f64);
                }
                metrics::gauge!(metric::DELIVERED_RECORDS).set(stats.delivered as f64);
                metrics::gauge!(metric::QUEUE_OLDEST_READY)
                    .set(stats.oldest_ready_ms as f64 / 1000.0);
            }
            Err(e) => tracing::debug!(error = %e, "Could not sample the queue for metrics."),
        }
        state.metrics.run_upkeep();
    }
}

fn load_sources(settings: &Settings, sandbox: bool) -> anyhow::Result<Sources> {
    if sandbox && !settings.sources.exists() {
        warn!(
            path = %settings.sources.display(),
            "No sources file there; the sandbox uses the example shipped with leadgate."
        );
        return Ok(Sources::parse(
            "(built-in leadgate.toml)",
            EXAMPLE_SOURCES,
            |name| std::env::var(name).ok(),
        )?);
    }
    settings.load_sources()
}

fn client_settings(settings: &Settings) -> anyhow::Result<ClientSettings> {
    let mut extra_ca_pem = Vec::new();
    if let Some(path) = settings.ca_file() {
        extra_ca_pem.push(
            std::fs::read(path)
                .with_context(|| format!("cannot read LEADGATE_CA_FILE {}", path.display()))?,
        );
    }
    Ok(ClientSettings {
        endpoint: settings.onpipeline_endpoint()?,
        timeout: settings.onpipeline_timeout,
        egress_ip: settings.egress_ip,
        egress_proxy: settings.egress_proxy.clone(),
        extra_ca_pem,
        max_connections: settings.delivery_concurrency,
    })
}

fn graph_settings(
    settings: &Settings,
    sandbox: Option<&Simulator>,
) -> anyhow::Result<GraphSettings> {
    let mut extra_ca_pem = Vec::new();
    if let Some(path) = settings.ca_file() {
        extra_ca_pem.push(
            std::fs::read(path)
                .with_context(|| format!("cannot read LEADGATE_CA_FILE {}", path.display()))?,
        );
    }
    let base = match sandbox {
        Some(sim) => {
            extra_ca_pem.push(sim.ca_pem().as_bytes().to_vec());
            format!("{}/graph", sim.base_url()).parse()?
        }
        None => settings.graph_base()?,
    };
    Ok(GraphSettings { base, extra_ca_pem })
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "leadgate".to_owned())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
