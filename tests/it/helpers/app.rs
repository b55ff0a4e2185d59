//! Spawning the real gateway for tests — in-process (fast, most tests) or as a child process
//! of the built binary (kill -9, restart) — next to a real Onpipeline simulator over HTTPS.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use leadgate::app::{Gateway, ServeOptions};
use leadgate::config::Settings;
use leadgate::sim::{ReceivedLead, RepeatedLead, SimConfig, Simulator, TokenKind};
use serde_json::Value;
use tempfile::TempDir;

pub const TOKEN: &str = "test-leadsin-token-0001";
pub const PARTNER_KEY: &str = "acme-partner-key-0123456789";
/// The admin token tests set with `LEADGATE_ADMIN_TOKEN` when they use the admin API.
pub const ADMIN_TOKEN: &str = "admin-token-0123456789";

/// The sources file most tests use: the documented example, with rate limits off so tests
/// never trip them by accident.
pub fn default_sources() -> String {
    format!(
        r#"
[[source]]
id = "website"
kind = "form"
allowed_origins = ["https://www.example.com"]
thank_you_url = "https://www.example.com/thanks"
phone_region = "GB"
last_name_fallback = "-"
unmapped_extra = "4444444"

[source.fields]
first_name = "FirstName"
last_name = "LastName"
name = "FullName"
email = "Email.work"
phone = "Phone.mobile"
company = "OrgName"
street = "AddressLine1"
zip = "Postcode"
city = "City"
state = "Region"
country = "Country"

[source.extra]
budget = "1111111"
utm_campaign = "2222222"

[source.constants]
"3333333" = "Website form"

[source.limits]
per_ip = "off"
total = "off"
max_body = "64KiB"

[[source]]
id = "acme"
kind = "partner"
api_keys = ["{PARTNER_KEY}"]
phone_region = "ES"

[source.extra]
campaign = "5555555"

[source.constants]
"6666666" = "Partner ACME"

[source.limits]
total = "off"
"#
    )
}

/// Makes sure rustls has its provider and logs go to the test output (once).
pub fn init() {
    leadgate::tls::install_default_provider();
    leadgate::telemetry::init_for_tests();
}

/// Starts a simulator that accepts [`TOKEN`] (and a read-only token `read-only-token`).
pub async fn start_sim(allow_ips: Vec<IpAddr>) -> Simulator {
    init();
    Simulator::start(SimConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        tokens: vec![
            (TOKEN.to_owned(), TokenKind::Leadsin),
            ("read-only-token".to_owned(), TokenKind::ReadOnly),
        ],
        allow_ips,
        ca_out: None,
    })
    .await
    .expect("the simulator starts")
}

/// Environment for a gateway delivering to `sim`, with quick retries for tests.
pub struct GatewayEnv {
    pub vars: Vec<(String, String)>,
    pub dir: PathBuf,
}

impl GatewayEnv {
    /// `dir` holds the sources file, the CA file and the embedded queue.
    pub fn new(dir: &Path, sim: &Simulator, sources: &str) -> Self {
        let sources_path = dir.join("leadgate.toml");
        std::fs::write(&sources_path, sources).unwrap();
        let ca_path = dir.join("sim-ca.pem");
        std::fs::write(&ca_path, sim.ca_pem()).unwrap();
        let vars = [
            ("LEADGATE_LISTEN", "127.0.0.1:0".to_owned()),
            ("LEADGATE_SOURCES", sources_path.display().to_string()),
            ("LEADGATE_DATA_DIR", dir.join("data").display().to_string()),
            ("LEADGATE_ONPIPELINE_URL", sim.base_url()),
            ("LEADGATE_GRAPH_URL", format!("{}/graph", sim.base_url())),
            ("LEADGATE_ONPIPELINE_TOKEN", TOKEN.to_owned()),
            ("LEADGATE_CA_FILE", ca_path.display().to_string()),
            ("LEADGATE_RETRY_BASE", "50ms".to_owned()),
            ("LEADGATE_RETRY_MAX_DELAY", "400ms".to_owned()),
            ("LEADGATE_LEASE_TIMEOUT", "3s".to_owned()),
            ("LEADGATE_PAUSE_PROBE_MAX", "300ms".to_owned()),
            ("LEADGATE_ONPIPELINE_TIMEOUT", "2s".to_owned()),
            ("LEADGATE_ONPIPELINE_RATE", "1000".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Self {
            vars,
            dir: dir.to_owned(),
        }
    }

    pub fn set(&mut self, name: &str, value: impl Into<String>) -> &mut Self {
        self.unset(name);
        self.vars.push((name.to_owned(), value.into()));
        self
    }

    pub fn unset(&mut self, name: &str) -> &mut Self {
        self.vars.retain(|(k, _)| k != name);
        self
    }

    pub fn settings(&self) -> Settings {
        Settings::from_vars(self.vars.clone()).expect("test settings are valid")
    }
}

/// A gateway running inside the test process, with its simulator.
pub struct TestApp {
    pub gateway: Option<Gateway>,
    pub sim: Arc<Simulator>,
    pub base: String,
    pub http: reqwest::Client,
    pub env: GatewayEnv,
    _dir: Option<TempDir>,
}

impl TestApp {
    /// The default sources, a fresh embedded queue, a simulator allowing everyone.
    pub async fn spawn() -> Self {
        Self::spawn_with(&default_sources(), |_| {}).await
    }

    pub async fn spawn_with(sources: &str, configure: impl FnOnce(&mut GatewayEnv)) -> Self {
        let sim = Arc::new(start_sim(Vec::new()).await);
        Self::spawn_against(sim, sources, configure).await
    }

    /// A gateway delivering to the given simulator.
    pub async fn spawn_against(
        sim: Arc<Simulator>,
        sources: &str,
        configure: impl FnOnce(&mut GatewayEnv),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut env = GatewayEnv::new(dir.path(), &sim, sources);
        configure(&mut env);
        let mut app = Self {
            gateway: None,
            sim,
            base: String::new(),
            http: client(),
            env,
            _dir: Some(dir),
        };
        app.start().await;
        app
    }

    /// Starts (or restarts) the gateway with the current environment.
    pub async fn start(&mut self) {
        let gateway = Gateway::start(self.env.settings(), ServeOptions::default())
            .await
            .expect("the gateway starts");
        self.base = format!("http://{}", gateway.addr());
        self.gateway = Some(gateway);
    }

    pub async fn stop(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.shutdown().await;
        }
    }

    pub fn gateway(&self) -> &Gateway {
        self.gateway.as_ref().expect("the gateway runs")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post_form(&self, source: &str, fields: &[(&str, &str)]) -> reqwest::Response {
        let body = serde_urlencoded(fields);
        self.http
            .post(self.url(&format!("/in/{source}")))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn post_json(&self, source: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/in/{source}")))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn post_partner(&self, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url("/in/acme"))
            .bearer_auth(PARTNER_KEY)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Waits until the simulator has received `n` leads; returns them.
    pub async fn received(&self, n: usize) -> Vec<ReceivedLead> {
        wait_received(&self.sim, n, Duration::from_secs(20)).await
    }

    /// The value of one series on `/metrics`, written as Prometheus prints it
    /// (`name{label="value",…}`); 0 when the series does not exist yet. Counters are shared by
    /// every gateway in the test process, so tests compare before and after, for a source id
    /// no other test uses.
    pub async fn metric(&self, series: &str) -> f64 {
        super::metrics::Metrics::scrape(&self.url(""))
            .await
            .get(series)
    }

    pub async fn stats(&self) -> leadgate::queue::Stats {
        self.gateway().queue().stats().await.unwrap()
    }
}

/// An HTTP client that does not follow redirects (tests look at them).
pub fn client() -> reqwest::Client {
    init();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// `application/x-www-form-urlencoded` encoding of UTF-8 pairs.
pub fn serde_urlencoded(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", form_escape(k), form_escape(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn form_escape(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                out.push(byte as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// Polls the simulator until it holds `n` leads, failing after `timeout`; also fails when it
/// holds more than `n` (a duplicate) once they arrived.
pub async fn wait_received(sim: &Simulator, n: usize, timeout: Duration) -> Vec<ReceivedLead> {
    let deadline = Instant::now() + timeout;
    loop {
        let leads = sim.received();
        if leads.len() >= n {
            assert_eq!(
                leads.len(),
                n,
                "the simulator received more leads than expected"
            );
            return leads;
        }
        if Instant::now() > deadline {
            panic!(
                "the simulator received {} of {n} leads within {timeout:?}",
                leads.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The distinct last names the simulator received, failing on any duplicate.
pub fn exactly_once(leads: &[ReceivedLead]) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for lead in leads {
        let name = lead.payload["LastName"].as_str().unwrap().to_owned();
        assert!(seen.insert(name.clone()), "{name} reached Onpipeline twice");
    }
    seen
}

/// Asserts that leads Onpipeline already had were sent to it again at most `bound` times (the
/// POSTs the simulator refused with 409, duplicate detection on), and returns those repeats.
/// `window` says what the bound stands for, for the failure message.
pub fn assert_resends_at_most(sim: &Simulator, bound: usize, window: &str) -> Vec<RepeatedLead> {
    let repeats = sim.repeats();
    assert!(
        repeats.len() <= bound,
        "{} leads Onpipeline already had were sent again; {window} allows {bound}: {:?}",
        repeats.len(),
        repeats
            .iter()
            .map(|r| (&r.lead_id, r.at, r.peer_ip))
            .collect::<Vec<_>>()
    );
    repeats
}

/// The gateway as a separate process of the built binary, for kill -9 and restarts.
pub struct GatewayProcess {
    child: Option<Child>,
    pub base: String,
    env: Vec<(String, String)>,
    args: Vec<String>,
    listen: SocketAddr,
    log: PathBuf,
}

impl GatewayProcess {
    /// Starts `leadgate serve` with `env` on a free port, and waits until it answers.
    pub async fn start(env: &GatewayEnv, args: &[&str]) -> Self {
        let listen = free_port();
        let mut vars = env.vars.clone();
        vars.retain(|(k, _)| k != "LEADGATE_LISTEN");
        vars.push(("LEADGATE_LISTEN".into(), listen.to_string()));
        let mut process = Self {
            child: None,
            base: format!("http://{listen}"),
            env: vars,
            args: args.iter().map(|a| a.to_string()).collect(),
            listen,
            log: env.dir.join(format!("gateway-{}.log", listen.port())),
        };
        process.spawn().await;
        process
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_leadgate"))
            .arg("serve")
            .args(&self.args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("the leadgate binary starts");
        self.child = Some(child);
        let http = client();
        let url = format!("{}/healthz", self.base);
        let log = self.log.clone();
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "leadgate exited with {status} at start-up:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if http
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return;
            }
            if Instant::now() > deadline {
                panic!("leadgate did not answer on {url} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // An already exited child refuses the signal; that is fine.
            let _ = child.kill();
            child.wait().unwrap();
        }
    }

    /// SIGTERM: the graceful shutdown a supervisor asks for.
    pub fn sigterm(&self) {
        let pid = self.child.as_ref().expect("the gateway runs").id();
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit on its own, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .expect("the gateway runs")
                .try_wait()
                .unwrap()
            {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!("leadgate did not exit within {timeout:?}:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts again on the same port with the same settings, changed by `change`.
    pub async fn restart(&mut self, change: impl FnOnce(&mut Vec<(String, String)>)) {
        self.kill9();
        change(&mut self.env);
        self.env.retain(|(k, _)| k != "LEADGATE_LISTEN");
        self.env
            .push(("LEADGATE_LISTEN".into(), self.listen.to_string()));
        self.spawn().await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /metrics` of this process (whose counters are its own), parsed.
    pub async fn metrics(&self) -> super::metrics::Metrics {
        super::metrics::Metrics::scrape(&self.base).await
    }

    /// A request to the admin API (the environment must set `LEADGATE_ADMIN_TOKEN` to
    /// [`ADMIN_TOKEN`]).
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        client()
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN)
    }

    /// `GET` on the admin API, as JSON; `None` when it does not answer JSON.
    pub async fn admin_get(&self, path: &str) -> Option<Value> {
        self.admin(reqwest::Method::GET, path)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    /// `GET /readyz`, as JSON; `None` when it does not answer JSON.
    pub async fn readyz(&self) -> Option<Value> {
        client()
            .get(format!("{}/readyz", self.base))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    pub async fn admin_stats(&self) -> Option<Value> {
        self.admin_get("/admin/stats").await
    }

    /// Waits until the queue holds nothing ready, leased or delayed: every lead is delivered or
    /// dead, and no lease of a killed process is left to be taken over.
    pub async fn wait_idle(&self, timeout: Duration) -> Value {
        crate::helpers::eventually(timeout, "the queue to empty", || async {
            let stats = self.admin_stats().await?;
            (stats["ready"] == 0 && stats["leased"] == 0 && stats["delayed"] == 0).then_some(stats)
        })
        .await
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A free loopback port (bound then released).
pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}
