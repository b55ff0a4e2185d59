//! A simulator of Onpipeline's API, because Onpipeline has no sandbox. It follows the reference
//! (shared/reference/onpipeline-api.txt: Authentication, Leads IN, HTTP Responses / Errors):
//! HTTPS only, the raw token in `Authorization`, `POST /Leadsin` answering the documented
//! `Header`/`Data` or `Error` objects with the same HTTP status (any other method on `/Leadsin`
//! is a 405 `Error` and creates nothing).
//!
//! It serves three callers: `leadgate sim` ([`run`]), `leadgate serve --sandbox` and the
//! integration tests (both through [`Simulator::start`]). Beyond the API it can be scripted
//! with faults ([`Fault`], consumed one per `/Leadsin` request) and inspected, in process or over
//! HTTP on the same listener:
//!
//! | endpoint | body / answer |
//! |---|---|
//! | `GET /_sim/leads` | `[ReceivedLead]`, same as [`Simulator::received`] |
//! | `DELETE /_sim/leads` | 204; forgets leads, duplicate memory, repeats and request log |
//! | `GET /_sim/repeats` | `[RepeatedLead]`, same as [`Simulator::repeats`]: each 409'd repeat |
//! | `GET /_sim/requests` | `[RequestLog]`, same as [`Simulator::requests`] |
//! | `GET /_sim/faults` | the faults not yet consumed |
//! | `POST /_sim/faults` | a [`Fault`] or a list of them, appended; answers `{"pending": N}` |
//! | `DELETE /_sim/faults` | 204; drops the pending faults |
//! | `GET /_sim/settings` | [`SimSettings`] |
//! | `POST /_sim/settings` | [`SettingsUpdate`] (fields optional); answers the new [`SimSettings`] |
//!
//! It also plays Meta's Graph API under `/graph/` (leads to read and list, scripted Graph
//! errors, a call log under `/_sim/graph/`): see [`graph`].

pub mod graph;
mod leadsin;
mod server;
mod state;
mod tls;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpServer, web};
use anyhow::Context;
use chrono::{DateTime, Utc};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use self::graph::GraphSim;
use self::state::{Access, Shared};
use self::tls::SimPki;

/// The token `leadgate sim` accepts when no `--token` is given.
pub const DEFAULT_TOKEN: &str = "sandbox-token";

/// `leadgate sim` options.
#[derive(clap::Args, Clone, Debug)]
pub struct SimArgs {
    /// Address to serve HTTPS on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// An API token the simulator accepts, as NAME:KIND where NAME is the token itself and KIND
    /// is leadsin, read-write or read-only. Repeatable. Default: sandbox-token:leadsin.
    #[arg(long = "token", value_name = "NAME:KIND", value_parser = parse_token)]
    pub tokens: Vec<(String, TokenKind)>,
    /// A client IP allowed to call (Onpipeline's IP whitelist). Repeatable. Default: any IP.
    #[arg(long = "allow-ip", value_name = "IP")]
    pub allow_ips: Vec<IpAddr>,
    /// Where to write the simulator's CA certificate (PEM) for clients to trust.
    /// Default: leadgate-sim-ca.pem in the system's temporary directory.
    #[arg(long, value_name = "PATH")]
    pub ca_out: Option<PathBuf>,
    /// Answer 409 to a lead whose payload equals one already accepted.
    #[arg(long)]
    pub detect_duplicates: bool,
}

/// What a token may do, as Onpipeline issues them: `leadsin` (lead sources: only `/Leadsin`),
/// `read-write` (everything), `read-only` (no write operations, so not `/Leadsin`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenKind {
    Leadsin,
    ReadWrite,
    ReadOnly,
}

impl FromStr for TokenKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "leadsin" => Ok(Self::Leadsin),
            "read-write" => Ok(Self::ReadWrite),
            "read-only" => Ok(Self::ReadOnly),
            _ => Err(format!(
                "token kind must be leadsin, read-write or read-only, not {s:?}"
            )),
        }
    }
}

impl fmt::Display for TokenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Leadsin => "leadsin",
            Self::ReadWrite => "read-write",
            Self::ReadOnly => "read-only",
        })
    }
}

/// Parses `NAME:KIND`; the kind is after the last colon. The error never repeats the token.
pub fn parse_token(s: &str) -> Result<(String, TokenKind), String> {
    let (name, kind) = s
        .rsplit_once(':')
        .ok_or_else(|| "expected NAME:KIND, e.g. sandbox-token:leadsin".to_owned())?;
    if name.trim().is_empty() {
        return Err("the token NAME must not be empty".to_owned());
    }
    Ok((name.trim().to_owned(), kind.parse()?))
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub listen: SocketAddr,
    pub tokens: Vec<(String, TokenKind)>,
    /// Empty: every peer is allowed.
    pub allow_ips: Vec<IpAddr>,
    pub ca_out: Option<PathBuf>,
}

impl Default for SimConfig {
    /// Loopback on a free port, the [`DEFAULT_TOKEN`] as a `leadsin` token, any peer IP.
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            tokens: vec![(DEFAULT_TOKEN.to_owned(), TokenKind::Leadsin)],
            allow_ips: Vec::new(),
            ca_out: None,
        }
    }
}

/// A lead the simulator accepted with 201.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReceivedLead {
    /// The JSON body as received.
    pub payload: serde_json::Value,
    pub peer_ip: IpAddr,
    /// The `LeadID` answered.
    pub lead_id: String,
    pub received_at: DateTime<Utc>,
}

/// A POST refused with 409 because it repeated a lead already accepted (duplicate detection
/// on). Nothing is stored for it, so [`Simulator::received`] never shows the repeat; this record
/// is how a test counts how often a lead Onpipeline already had was sent again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RepeatedLead {
    /// The `LeadID` of the accepted lead it repeats.
    pub lead_id: String,
    /// The repeated JSON body as received.
    pub payload: serde_json::Value,
    pub peer_ip: IpAddr,
    pub at: DateTime<Utc>,
}

/// One request to `/Leadsin`, logged when its handler starts (the body has been read).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestLog {
    pub at: DateTime<Utc>,
    pub peer_ip: IpAddr,
    /// The HTTP status answered; None when no answer was given (see `outcome`).
    pub status: Option<u16>,
    pub outcome: RequestOutcome,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestOutcome {
    /// Still being handled (e.g. a delay fault).
    InFlight,
    /// An HTTP answer was produced; `status` says which.
    Answered,
    /// The connection was closed without an answer, by a `drop` or `drop_after_accept` fault.
    Dropped,
    /// The client hung up before the request was handled; nothing was recorded.
    Cancelled,
    /// The client hung up after the request was handled, while its answer was held back
    /// ([`SimSettings::answer_delay_ms`]): what it did stays (a lead created, a repeat refused
    /// and recorded), but the client never heard. A slow Onpipeline that commits, then answers
    /// after the client's timeout.
    Abandoned,
}

/// A scripted misbehaviour, consumed by the next `/Leadsin` request. JSON form (over
/// `POST /_sim/faults`), tagged by `kind`:
/// `{"kind":"status","status":503,"retry_after":"2","message":"..."}`,
/// `{"kind":"raw","status":500,"content_type":"text/plain","body":"oops"}`,
/// `{"kind":"delay","ms":1500}`, `{"kind":"drop"}`, `{"kind":"drop_after_accept"}`,
/// `{"kind":"non_json","status":400}`, `{"kind":"non_json_502"}`,
/// `{"kind":"success_status","status":202}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Answer `status` with the documented Error object (even for a 2xx status, which clients
    /// must still treat as an error), with `Retry-After` when given. The default message is the
    /// status's reason phrase. No lead is recorded.
    Status {
        status: u16,
        #[serde(default)]
        retry_after: Option<String>,
        #[serde(default)]
        message: Option<String>,
    },
    /// Answer exactly this status and body. No lead is recorded.
    Raw {
        status: u16,
        #[serde(default)]
        content_type: Option<String>,
        #[serde(default)]
        body: String,
        #[serde(default)]
        retry_after: Option<String>,
    },
    /// Wait, then handle the request normally. If the client hangs up meanwhile, the handler is
    /// cancelled and nothing is recorded.
    Delay { ms: u64 },
    /// Close the connection without any HTTP answer. No lead is recorded. (Over HTTP/2, which
    /// actix offers by ALPN, the same fault resets the stream instead; leadgate speaks HTTP/1.1.)
    Drop,
    /// Handle the request normally and, if the lead is created, close the connection without
    /// answering: the lead exists but the client cannot know (the retry-after-success case).
    DropAfterAccept,
    /// An HTML error page with this status, as a proxy, WAF or load balancer in front of the
    /// API answers (nginx's page for the status: `400 Bad Request`, `413 Request Entity Too
    /// Large`, …), not Onpipeline's JSON. No lead is recorded.
    NonJson { status: u16 },
    /// Shorthand for `{"kind":"non_json","status":502}`: the page a proxy gives when the API
    /// behind it is down.
    #[serde(rename = "non_json_502")]
    NonJson502,
    /// Handle the request normally and, if the lead is created, answer this success status
    /// (the reference's 200 or 202) instead of 201, in the same documented shape: `Header`
    /// with `Code` equal to the status, and `Data.LeadID`. Refusals are answered as usual.
    SuccessStatus { status: u16 },
}

impl Fault {
    /// The Error object with this status and its default message, no `Retry-After`.
    pub fn status(status: u16) -> Self {
        Self::Status {
            status,
            retry_after: None,
            message: None,
        }
    }

    /// The Error object with this status and a `Retry-After` header (seconds or HTTP date).
    pub fn retry_after(status: u16, after: impl Into<String>) -> Self {
        Self::Status {
            status,
            retry_after: Some(after.into()),
            message: None,
        }
    }
}

/// Behaviour switches that persist until changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimSettings {
    /// Answer 409 to a lead whose canonical payload equals an accepted one (and record the
    /// repeat, see [`RepeatedLead`]). Off by default.
    pub detect_duplicates: bool,
    /// Added before every `/Leadsin` request is handled (faults included). A client that hangs
    /// up meanwhile cancels the request: nothing is recorded.
    pub latency_ms: u64,
    /// Added after a `/Leadsin` request is handled and before it is answered (not to faults
    /// that answer without handling it): the lead is created at once, the answer comes late.
    /// A client that gives up meanwhile leaves the lead created
    /// ([`RequestOutcome::Abandoned`]).
    #[serde(default)]
    pub answer_delay_ms: u64,
    /// The account's custom field IDs. When set, a lead whose `Extra` names another ID is
    /// refused with 406, as an account without that custom field would. Unset: any ID.
    #[serde(default)]
    pub custom_fields: Option<Vec<String>>,
}

/// A partial change of [`SimSettings`], e.g. `{"detect_duplicates": true}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsUpdate {
    #[serde(default)]
    pub detect_duplicates: Option<bool>,
    #[serde(default)]
    pub latency_ms: Option<u64>,
    #[serde(default)]
    pub answer_delay_ms: Option<u64>,
    /// Sets the account's custom field IDs; an empty list clears it (any ID accepted).
    #[serde(default)]
    pub custom_fields: Option<Vec<String>>,
}

/// A running simulator. Dropping it stops the server too, without waiting.
pub struct Simulator {
    addr: SocketAddr,
    pki: SimPki,
    shared: Arc<Shared>,
    graph: Arc<GraphSim>,
    handle: ServerHandle,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Simulator {
    /// Generates a fresh CA and server certificate, writes the CA to `cfg.ca_out` if set, binds
    /// `cfg.listen` (port 0 picks a free port) and serves in the background on the current
    /// tokio runtime (a plain `#[tokio::test]` or actix's own). Handlers run on one actix worker
    /// thread of their own.
    pub async fn start(cfg: SimConfig) -> anyhow::Result<Self> {
        let pki = SimPki::generate()?;
        if let Some(path) = &cfg.ca_out {
            write_ca(path, &pki.ca_pem)?;
        }
        let listener = std::net::TcpListener::bind(cfg.listen)
            .with_context(|| format!("binding the Onpipeline simulator to {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(Access {
            tokens: cfg.tokens.into_iter().collect::<HashMap<_, _>>(),
            allow_ips: cfg.allow_ips,
        }));
        let data = web::Data::from(Arc::clone(&shared));
        let graph = Arc::new(GraphSim::default());
        let graph_data = web::Data::from(Arc::clone(&graph));
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(graph_data.clone())
                .app_data(web::PayloadConfig::new(server::MAX_BODY))
                .configure(server::routes)
        })
        .workers(1)
        // The host process (leadgate serve, a test) owns Ctrl-C and SIGTERM.
        .disable_signals()
        // Idle keep-alive connections count as open during a graceful stop; don't wait long.
        .shutdown_timeout(1)
        // A client that hangs up must cancel its handler (the delay fault relies on it).
        .h1_allow_half_closed(false)
        .listen_rustls_0_23(listener, pki.server_config()?)?
        .run();
        let handle = server.handle();
        let task = tokio::spawn(server);
        Ok(Self {
            addr,
            pki,
            shared,
            graph,
            handle,
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://IP:PORT`; an unspecified bind address is replaced by loopback.
    pub fn base_url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("https://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// The CA certificate, PEM, that signed the server certificate.
    pub fn ca_pem(&self) -> &str {
        &self.pki.ca_pem
    }

    /// The same CA certificate, DER.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.pki.ca_der.clone()
    }

    /// A rustls client configuration (ring provider) trusting only this simulator's CA.
    pub fn client_tls_config(&self) -> anyhow::Result<rustls::ClientConfig> {
        self.pki.client_config()
    }

    /// The Graph API side: register leads, script errors, read the call log.
    pub fn graph(&self) -> &GraphSim {
        &self.graph
    }

    /// Accepted leads, in order.
    pub fn received(&self) -> Vec<ReceivedLead> {
        self.shared.received()
    }

    /// The POSTs refused with 409 as repeats of an accepted lead, in order (only while duplicate
    /// detection is on; with it off a repeat is stored as a new lead).
    pub fn repeats(&self) -> Vec<RepeatedLead> {
        self.shared.repeats()
    }

    /// Every `/Leadsin` request, in arrival order.
    pub fn requests(&self) -> Vec<RequestLog> {
        self.shared.requests()
    }

    /// Appends faults to the script.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.push_faults(faults);
    }

    /// The faults not yet consumed.
    pub fn pending_faults(&self) -> Vec<Fault> {
        self.shared.pending_faults()
    }

    pub fn clear_faults(&self) {
        self.shared.clear_faults();
    }

    /// Makes `ids` the account's only custom fields (an empty list: any ID).
    pub fn set_custom_fields(&self, ids: &[&str]) {
        self.shared.update_settings(SettingsUpdate {
            custom_fields: Some(ids.iter().map(|id| id.to_string()).collect()),
            ..SettingsUpdate::default()
        });
    }

    pub fn set_detect_duplicates(&self, on: bool) {
        self.shared.update_settings(SettingsUpdate {
            detect_duplicates: Some(on),
            ..SettingsUpdate::default()
        });
    }

    /// Latency added to every `/Leadsin` request from now on.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.update_settings(SettingsUpdate {
            latency_ms: Some(u64::try_from(latency.as_millis()).unwrap_or(u64::MAX)),
            ..SettingsUpdate::default()
        });
    }

    /// From now on, each request is handled at once and answered this much later (a slow
    /// Onpipeline that commits before it answers); zero turns it off.
    pub fn set_answer_delay(&self, delay: Duration) {
        self.shared.update_settings(SettingsUpdate {
            answer_delay_ms: Some(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)),
            ..SettingsUpdate::default()
        });
    }

    pub fn settings(&self) -> SimSettings {
        self.shared.settings()
    }

    /// Forgets received leads (and so the duplicate memory), the repeats and the request log.
    pub fn reset(&self) {
        self.shared.reset();
    }

    /// Stops accepting, lets in-flight requests finish (idle connections get about a second),
    /// and waits for the server task.
    pub async fn stop(mut self) {
        self.handle.stop(true).await;
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        if self.task.is_some() {
            // Sending the command is immediate; the returned future only waits for completion.
            drop(self.handle.stop(false));
        }
    }
}

fn write_ca(path: &Path, pem: &str) -> anyhow::Result<()> {
    std::fs::write(path, pem)
        .with_context(|| format!("writing the simulator CA to {}", path.display()))
}

/// `leadgate sim`: serve until Ctrl-C or SIGTERM.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let defaulted = args.tokens.is_empty();
    let tokens = if defaulted {
        vec![(DEFAULT_TOKEN.to_owned(), TokenKind::Leadsin)]
    } else {
        args.tokens
    };
    let token_kinds: Vec<String> = tokens.iter().map(|(_, kind)| kind.to_string()).collect();
    let ca_out = args
        .ca_out
        .unwrap_or_else(|| std::env::temp_dir().join("leadgate-sim-ca.pem"));
    let sim = Simulator::start(SimConfig {
        listen: args.listen,
        tokens,
        allow_ips: args.allow_ips.clone(),
        ca_out: Some(ca_out.clone()),
    })
    .await?;
    sim.set_detect_duplicates(args.detect_duplicates);

    println!("Onpipeline simulator listening on {}", sim.base_url());
    println!("  POST {}/Leadsin", sim.base_url());
    println!("  CA certificate written to {}", ca_out.display());
    if defaulted {
        println!("  token: {DEFAULT_TOKEN} (leadsin); set others with --token NAME:KIND");
    } else {
        // The tokens are the operator's own secrets: print only their kinds.
        println!(
            "  tokens: {} ({})",
            token_kinds.len(),
            token_kinds.join(", ")
        );
    }
    if args.allow_ips.is_empty() {
        println!("  allowed IPs: any");
    } else {
        let ips: Vec<String> = args.allow_ips.iter().map(IpAddr::to_string).collect();
        println!("  allowed IPs: {}", ips.join(", "));
    }
    println!(
        "  duplicate detection: {}",
        if args.detect_duplicates { "on" } else { "off" }
    );
    println!(
        "  inspect: GET {base}/_sim/leads, GET {base}/_sim/requests, GET {base}/_sim/repeats",
        base = sim.base_url()
    );

    shutdown_signal().await;
    println!("Stopping the Onpipeline simulator");
    sim.stop().await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_argument_splits_name_and_kind() {
        assert_eq!(
            parse_token("abc:read-only"),
            Ok(("abc".to_owned(), TokenKind::ReadOnly))
        );
        assert!(parse_token("abc").is_err());
        assert!(parse_token(":leadsin").is_err());
        let err = parse_token("secret-token:admin").unwrap_err();
        assert!(!err.contains("secret-token"), "{err}");
    }

    #[test]
    fn sim_arguments_parse_with_documented_defaults() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            sim: SimArgs,
        }
        let defaults = Cli::try_parse_from(["sim"]).unwrap().sim;
        assert_eq!(defaults.listen, "127.0.0.1:8443".parse().unwrap());
        assert!(defaults.tokens.is_empty() && defaults.allow_ips.is_empty());
        assert!(defaults.ca_out.is_none() && !defaults.detect_duplicates);

        let args = Cli::try_parse_from([
            "sim",
            "--listen",
            "[::1]:0",
            "--token",
            "a:leadsin",
            "--token",
            "b:read-only",
            "--allow-ip",
            "127.0.0.2",
            "--ca-out",
            "/tmp/ca.pem",
            "--detect-duplicates",
        ])
        .unwrap()
        .sim;
        assert_eq!(
            args.tokens,
            vec![
                ("a".to_owned(), TokenKind::Leadsin),
                ("b".to_owned(), TokenKind::ReadOnly)
            ]
        );
        assert_eq!(args.allow_ips, vec!["127.0.0.2".parse::<IpAddr>().unwrap()]);
        assert!(args.detect_duplicates);
        assert!(Cli::try_parse_from(["sim", "--token", "a:admin"]).is_err());
    }

    #[test]
    fn fault_json_uses_the_documented_kinds() {
        let faults: Vec<Fault> = serde_json::from_str(
            r#"[{"kind":"status","status":503,"retry_after":"2"},{"kind":"delay","ms":5},
                {"kind":"drop"},{"kind":"drop_after_accept"},{"kind":"non_json_502"},
                {"kind":"raw","status":200,"body":"ok"},{"kind":"non_json","status":400},
                {"kind":"success_status","status":202}]"#,
        )
        .unwrap();
        assert_eq!(faults[0], Fault::retry_after(503, "2"));
        assert_eq!(faults[1], Fault::Delay { ms: 5 });
        assert_eq!(faults[2], Fault::Drop);
        assert_eq!(faults[3], Fault::DropAfterAccept);
        assert_eq!(faults[4], Fault::NonJson502);
        assert!(matches!(faults[5], Fault::Raw { status: 200, .. }));
        assert_eq!(faults[6], Fault::NonJson { status: 400 });
        assert_eq!(faults[7], Fault::SuccessStatus { status: 202 });
    }
}
