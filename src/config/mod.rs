//! Process settings from the environment (`LEADGATE_*`, read with envy) and the sources file.
//! Everything is validated once at start-up; a bad value stops the process with a message
//! naming the variable, or the file, line and key.

pub mod check;
pub mod sources;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use ipnet::IpNet;
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

use crate::queue::{Backend, QueueSettings};
use crate::retry::RetryPolicy;
use crate::telemetry::LogFormat;

pub use sources::{BackfillForm, Limits, MetaSource, Origin, Source, SourceKind, Sources};

/// Every `LEADGATE_*` variable. The README's configuration table lists the same set. Its
/// `Debug` shows every secret (tokens, the Redis URL, the proxy URL) as `[REDACTED]`.
#[derive(Debug, Deserialize)]
pub struct Settings {
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    #[serde(default = "defaults::sources")]
    pub sources: PathBuf,
    pub redis_url: Option<SecretString>,
    /// `LEADGATE_REDIS_URL` lists the seed nodes of a Redis Cluster, comma-separated.
    #[serde(default)]
    pub redis_cluster: bool,
    #[serde(default = "defaults::redis_prefix")]
    pub redis_prefix: String,
    #[serde(default = "defaults::data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub embedded_fsync: crate::queue::Fsync,
    #[serde(default = "defaults::onpipeline_url")]
    pub onpipeline_url: String,
    pub onpipeline_token: Option<SecretString>,
    pub onpipeline_token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub egress_ip: Option<IpAddr>,
    pub egress_proxy: Option<SecretString>,
    #[serde(default, deserialize_with = "cidr_list")]
    pub trusted_proxies: Vec<IpNet>,
    #[serde(default)]
    pub log_format: LogFormat,
    #[serde(default = "defaults::concurrency")]
    pub delivery_concurrency: usize,
    /// Requests per second to Onpipeline, shared by every process on the same queue; 0: no limit.
    #[serde(default = "defaults::onpipeline_rate")]
    pub onpipeline_rate: u32,
    #[serde(
        default = "defaults::onpipeline_timeout",
        deserialize_with = "duration"
    )]
    pub onpipeline_timeout: Duration,
    #[serde(default = "defaults::lease_timeout", deserialize_with = "duration")]
    pub lease_timeout: Duration,
    #[serde(default = "defaults::retry_base", deserialize_with = "duration")]
    pub retry_base: Duration,
    #[serde(default = "defaults::retry_max_delay", deserialize_with = "duration")]
    pub retry_max_delay: Duration,
    #[serde(default = "defaults::retry_max_age", deserialize_with = "duration")]
    pub retry_max_age: Duration,
    #[serde(default = "defaults::pause_probe_max", deserialize_with = "duration")]
    pub pause_probe_max: Duration,
    #[serde(default = "defaults::shutdown_timeout", deserialize_with = "duration")]
    pub shutdown_timeout: Duration,
    #[serde(default = "defaults::pii_retention", deserialize_with = "duration")]
    pub pii_retention: Duration,
    #[serde(default = "defaults::record_retention", deserialize_with = "duration")]
    pub record_retention: Duration,
    pub admin_token: Option<SecretString>,
    pub metrics_token: Option<SecretString>,
    /// Meta's Graph API base, version included (`kind = "facebook"` sources read leads there).
    #[serde(default = "defaults::graph_url")]
    pub graph_url: String,
    /// How often a parked Meta lead (its page token expired or lacks a permission) is tried
    /// again; one Graph call per page and interval.
    #[serde(
        default = "defaults::graph_parked_retry",
        deserialize_with = "duration"
    )]
    pub graph_parked_retry: Duration,
    /// The base of how long a request's whole body may take to arrive (the ingest handler adds
    /// an allowance for the body's size); a slower body is answered `408`.
    #[serde(default = "defaults::body_timeout", deserialize_with = "duration")]
    pub body_timeout: Duration,
}

mod defaults {
    use super::*;
    pub fn listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 8080))
    }
    pub fn sources() -> PathBuf {
        PathBuf::from("./leadgate.toml")
    }
    pub fn redis_prefix() -> String {
        "leadgate".to_owned()
    }
    pub fn data_dir() -> PathBuf {
        PathBuf::from("./leadgate-data")
    }
    pub fn onpipeline_url() -> String {
        "https://api.onpipeline.com".to_owned()
    }
    pub fn concurrency() -> usize {
        8
    }
    pub fn onpipeline_rate() -> u32 {
        10
    }
    pub fn onpipeline_timeout() -> Duration {
        Duration::from_secs(15)
    }
    pub fn lease_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn retry_base() -> Duration {
        Duration::from_secs(10)
    }
    pub fn retry_max_delay() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn retry_max_age() -> Duration {
        Duration::from_secs(72 * 3600)
    }
    pub fn pause_probe_max() -> Duration {
        Duration::from_secs(300)
    }
    pub fn shutdown_timeout() -> Duration {
        Duration::from_secs(20)
    }
    pub fn pii_retention() -> Duration {
        Duration::from_secs(7 * 24 * 3600)
    }
    pub fn record_retention() -> Duration {
        Duration::from_secs(90 * 24 * 3600)
    }
    pub fn graph_url() -> String {
        "https://graph.facebook.com/v21.0".to_owned()
    }
    pub fn graph_parked_retry() -> Duration {
        Duration::from_secs(300)
    }
    pub fn body_timeout() -> Duration {
        Duration::from_secs(15)
    }
}

/// Durations are written like `250ms`, `30s`, `1h`.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(text.trim())
        .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration like 30s: {e}")))
}

/// A comma-separated list of CIDRs, `10.0.0.0/8, ::1/128`: blanks around an entry are
/// ignored, and so is an empty entry (a trailing comma); a bad entry is named.
fn cidr_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let text = String::deserialize(d)?;
    parse_cidr_list(&text).map_err(serde::de::Error::custom)
}

fn parse_cidr_list(text: &str) -> Result<Vec<IpNet>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            entry.parse::<IpNet>().map_err(|e| {
                format!("entry {entry:?} is not a CIDR like 10.0.0.0/8 or 2001:db8::/32 ({e})")
            })
        })
        .collect()
}

/// Variables whose parse errors may quote what they hold: lists of addresses, never secrets.
/// Any other variable's value is kept out of error messages.
const SHOWN_IN_ERRORS: &[&str] = &["LEADGATE_TRUSTED_PROXIES"];

/// Where the Onpipeline token comes from. A file is read again whenever delivery is paused and
/// probes, so a rotated token is picked up without a restart.
#[derive(Clone)]
pub enum TokenSource {
    Inline(SecretString),
    File(PathBuf),
}

impl TokenSource {
    pub fn load(&self) -> anyhow::Result<SecretString> {
        match self {
            TokenSource::Inline(token) => Ok(token.clone()),
            TokenSource::File(path) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!(
                        "cannot read LEADGATE_ONPIPELINE_TOKEN_FILE {}",
                        path.display()
                    )
                })?;
                let token = text.trim();
                if token.is_empty() {
                    bail!("LEADGATE_ONPIPELINE_TOKEN_FILE {} is empty", path.display());
                }
                Ok(SecretString::from(token.to_owned()))
            }
        }
    }
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Inline(_) => f.write_str("TokenSource::Inline(<redacted>)"),
            TokenSource::File(path) => write!(f, "TokenSource::File({})", path.display()),
        }
    }
}

impl Settings {
    /// Reads `LEADGATE_*` from the process environment.
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_vars(std::env::vars())
    }

    /// Reads settings from the given `(name, value)` pairs (tests pass their own).
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<Self> {
        let vars: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(name, _)| name.starts_with("LEADGATE_"))
            .collect();
        let settings: Settings = match envy::prefixed("LEADGATE_").from_iter(vars.clone()) {
            Ok(settings) => settings,
            Err(e) => bail!("invalid environment: {}", name_the_culprit(&vars, e)),
        };
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.onpipeline_endpoint()?;
        self.graph_base()?;
        if self.graph_parked_retry.is_zero() {
            bail!("LEADGATE_GRAPH_PARKED_RETRY must be positive");
        }
        if self.body_timeout.is_zero() {
            bail!("LEADGATE_BODY_TIMEOUT must be positive");
        }
        if self.onpipeline_token.is_some() && self.onpipeline_token_file.is_some() {
            bail!("set LEADGATE_ONPIPELINE_TOKEN or LEADGATE_ONPIPELINE_TOKEN_FILE, not both");
        }
        if let Some(url) = &self.redis_url {
            // With LEADGATE_REDIS_CLUSTER, a comma-separated list of seed nodes (blanks around
            // each are ignored).
            let seeds = crate::queue::redis::seed_urls(url.expose_secret());
            if !seeds
                .first()
                .is_some_and(|url| url.starts_with("redis://") || url.starts_with("rediss://"))
            {
                bail!("LEADGATE_REDIS_URL must start with redis:// or rediss://");
            }
            if !self.redis_cluster && seeds.len() > 1 {
                bail!(
                    "LEADGATE_REDIS_URL lists several URLs: set LEADGATE_REDIS_CLUSTER=true for a Redis Cluster"
                );
            }
        }
        if let Some(proxy) = &self.egress_proxy {
            Url::parse(proxy.expose_secret())
                .map_err(|_| anyhow::anyhow!("LEADGATE_EGRESS_PROXY is not a valid URL"))?;
        }
        if self.delivery_concurrency == 0 {
            bail!("LEADGATE_DELIVERY_CONCURRENCY must be at least 1");
        }
        if self.lease_timeout <= self.onpipeline_timeout {
            bail!(
                "LEADGATE_LEASE_TIMEOUT must be longer than LEADGATE_ONPIPELINE_TIMEOUT: a lease \
                 that expires while its request is still running would send the lead twice"
            );
        }
        for (name, token) in [
            ("LEADGATE_ADMIN_TOKEN", &self.admin_token),
            ("LEADGATE_METRICS_TOKEN", &self.metrics_token),
        ] {
            if token.as_ref().is_some_and(|t| t.expose_secret().len() < 16) {
                bail!("{name} must be at least 16 characters");
            }
        }
        if self.retry_base.is_zero() || self.retry_max_delay < self.retry_base {
            bail!("LEADGATE_RETRY_BASE must be positive and at most LEADGATE_RETRY_MAX_DELAY");
        }
        Ok(())
    }

    /// `{LEADGATE_ONPIPELINE_URL}/Leadsin`; plain `http://` is refused: Onpipeline serves HTTPS only.
    pub fn onpipeline_endpoint(&self) -> anyhow::Result<Url> {
        let base = Url::parse(self.onpipeline_url.trim_end_matches('/')).with_context(|| {
            format!(
                "LEADGATE_ONPIPELINE_URL {:?} is not a URL",
                self.onpipeline_url
            )
        })?;
        if base.scheme() != "https" {
            bail!(
                "LEADGATE_ONPIPELINE_URL must use https:// (Onpipeline accepts HTTPS only), got {:?}",
                self.onpipeline_url
            );
        }
        let mut endpoint = base;
        let path = format!("{}/Leadsin", endpoint.path().trim_end_matches('/'));
        endpoint.set_path(&path);
        Ok(endpoint)
    }

    /// `LEADGATE_GRAPH_URL` without a trailing slash; HTTPS only (it carries page tokens).
    pub fn graph_base(&self) -> anyhow::Result<Url> {
        let base = Url::parse(self.graph_url.trim_end_matches('/'))
            .with_context(|| format!("LEADGATE_GRAPH_URL {:?} is not a URL", self.graph_url))?;
        if base.scheme() != "https" {
            bail!(
                "LEADGATE_GRAPH_URL must use https:// (page access tokens travel in it), got {:?}",
                self.graph_url
            );
        }
        Ok(base)
    }

    pub fn token_source(&self) -> Option<TokenSource> {
        match (&self.onpipeline_token, &self.onpipeline_token_file) {
            (Some(token), _) => Some(TokenSource::Inline(token.clone())),
            (None, Some(path)) => Some(TokenSource::File(path.clone())),
            (None, None) => None,
        }
    }

    pub fn backend(&self) -> Backend {
        match &self.redis_url {
            Some(url) => Backend::Redis {
                url: url.clone(),
                prefix: self.redis_prefix.clone(),
                cluster: self.redis_cluster,
                ca_file: self.ca_file.clone(),
            },
            None => Backend::Embedded {
                dir: self.data_dir.clone(),
                fsync: self.embedded_fsync,
            },
        }
    }

    pub fn queue_settings(&self) -> QueueSettings {
        QueueSettings {
            lease_timeout: self.lease_timeout,
            pii_ttl: self.pii_retention,
            record_ttl: self.record_retention.max(self.pii_retention),
            ..QueueSettings::default()
        }
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            base: self.retry_base,
            max_delay: self.retry_max_delay,
            max_age: self.retry_max_age,
        }
    }

    pub fn load_sources(&self) -> anyhow::Result<Sources> {
        Sources::load(&self.sources)
    }

    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }
}

/// envy's parse errors do not always say which variable was wrong, and may quote the value
/// (which can be a secret). Find the variable by parsing each one alone, and report only its
/// name and the reason.
fn name_the_culprit(vars: &[(String, String)], e: envy::Error) -> String {
    if let envy::Error::MissingValue(field) = &e {
        return format!("LEADGATE_{} is required", field.to_uppercase());
    }
    for var in vars {
        if let Err(alone) = envy::prefixed("LEADGATE_").from_iter::<_, Settings>([var.clone()]) {
            let reason = alone.to_string();
            let reason = reason
                .split(" while parsing value")
                .next()
                .unwrap_or(&reason);
            let reason = if reason.contains(&var.1) && !SHOWN_IN_ERRORS.contains(&var.0.as_str()) {
                "invalid value"
            } else {
                reason
            };
            return format!("{}: {reason}", var.0);
        }
    }
    "a LEADGATE_ variable has an invalid value".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> anyhow::Result<Settings> {
        Settings::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_apply_with_an_empty_environment() {
        let s = env(&[]).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.sources, PathBuf::from("./leadgate.toml"));
        assert!(matches!(s.backend(), Backend::Embedded { .. }));
        assert_eq!(
            s.onpipeline_endpoint().unwrap().as_str(),
            "https://api.onpipeline.com/Leadsin"
        );
        assert!(s.token_source().is_none());
        assert_eq!(
            s.graph_base().unwrap().as_str(),
            "https://graph.facebook.com/v21.0"
        );
        assert_eq!(s.body_timeout, Duration::from_secs(15));
    }

    #[test]
    fn graph_url_must_be_https() {
        let err = env(&[("LEADGATE_GRAPH_URL", "http://127.0.0.1:9/graph")])
            .err()
            .unwrap();
        assert!(err.to_string().contains("LEADGATE_GRAPH_URL"), "{err}");
        let s = env(&[("LEADGATE_GRAPH_URL", "https://127.0.0.1:9443/graph/")]).unwrap();
        assert_eq!(
            s.graph_base().unwrap().as_str(),
            "https://127.0.0.1:9443/graph"
        );
    }

    #[test]
    fn plain_http_upstream_is_refused() {
        let err = env(&[("LEADGATE_ONPIPELINE_URL", "http://api.onpipeline.com")])
            .err()
            .unwrap();
        assert!(err.to_string().contains("https://"), "{err}");
    }

    #[test]
    fn upstream_with_a_path_keeps_it() {
        let s = env(&[("LEADGATE_ONPIPELINE_URL", "https://127.0.0.1:9443/onp/")]).unwrap();
        assert_eq!(
            s.onpipeline_endpoint().unwrap().as_str(),
            "https://127.0.0.1:9443/onp/Leadsin"
        );
    }

    #[test]
    fn durations_and_lists_parse() {
        let s = env(&[
            ("LEADGATE_RETRY_BASE", "250ms"),
            ("LEADGATE_TRUSTED_PROXIES", "10.0.0.0/8,127.0.0.1/32"),
        ])
        .unwrap();
        assert_eq!(s.retry_base, Duration::from_millis(250));
        assert_eq!(s.trusted_proxies.len(), 2);
    }

    #[test]
    fn trusted_proxies_may_have_blanks_around_entries_and_a_bad_entry_is_named() {
        let s = env(&[(
            "LEADGATE_TRUSTED_PROXIES",
            " 10.0.0.0/8, ::1/128 ,\t192.168.0.0/16,",
        )])
        .unwrap();
        let nets: Vec<String> = s.trusted_proxies.iter().map(ToString::to_string).collect();
        assert_eq!(nets, ["10.0.0.0/8", "::1/128", "192.168.0.0/16"]);

        for (value, entry) in [
            ("10.0.0.0/8, 10.1.2.300/32", "10.1.2.300/32"),
            ("10.0.0.0/33", "10.0.0.0/33"),
        ] {
            let err = env(&[("LEADGATE_TRUSTED_PROXIES", value)]).err().unwrap();
            let text = format!("{err:#}");
            assert!(text.contains("LEADGATE_TRUSTED_PROXIES"), "{text}");
            assert!(text.contains(&format!("{entry:?}")), "{text}");
        }
    }

    #[test]
    fn redis_seed_urls_may_have_blanks_after_commas() {
        let urls = "redis://10.0.0.1:6379, redis://10.0.0.2:6379";
        let s = env(&[
            ("LEADGATE_REDIS_URL", urls),
            ("LEADGATE_REDIS_CLUSTER", "true"),
        ])
        .unwrap();
        assert!(matches!(s.backend(), Backend::Redis { cluster: true, .. }));
        // Without LEADGATE_REDIS_CLUSTER the list is still recognised as one.
        let err = env(&[("LEADGATE_REDIS_URL", urls)]).err().unwrap();
        assert!(err.to_string().contains("LEADGATE_REDIS_CLUSTER"), "{err}");
    }

    #[test]
    fn a_bad_value_names_the_variable_but_not_the_value() {
        let err = env(&[("LEADGATE_EGRESS_IP", "secret-looking-value")])
            .err()
            .unwrap();
        let text = err.to_string();
        assert!(text.contains("LEADGATE_EGRESS_IP"), "{text}");
        assert!(!text.contains("secret-looking-value"), "{text}");
    }

    #[test]
    fn redis_cluster_takes_a_list_of_seed_urls() {
        let urls = "redis://10.0.0.1:6379,redis://10.0.0.2:6379";
        let s = env(&[
            ("LEADGATE_REDIS_URL", urls),
            ("LEADGATE_REDIS_CLUSTER", "true"),
        ])
        .unwrap();
        assert!(matches!(s.backend(), Backend::Redis { cluster: true, .. }));
        let err = env(&[("LEADGATE_REDIS_URL", urls)]).err().unwrap();
        assert!(err.to_string().contains("LEADGATE_REDIS_CLUSTER"), "{err}");
    }

    #[test]
    fn a_lease_shorter_than_a_request_is_refused() {
        let err = env(&[
            ("LEADGATE_LEASE_TIMEOUT", "5s"),
            ("LEADGATE_ONPIPELINE_TIMEOUT", "5s"),
        ])
        .err()
        .unwrap();
        assert!(err.to_string().contains("LEADGATE_LEASE_TIMEOUT"), "{err}");
    }

    #[test]
    fn a_short_admin_token_is_refused() {
        assert!(env(&[("LEADGATE_ADMIN_TOKEN", "short")]).is_err());
        assert!(env(&[("LEADGATE_ADMIN_TOKEN", "a-long-enough-admin-token")]).is_ok());
    }

    #[test]
    fn debug_of_the_settings_never_shows_a_secret() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "file-token-secret-0042\n").unwrap();
        let secrets = [
            "inline-token-secret-0041",
            "file-token-secret-0042",
            "admin-token-secret-0043",
            "metrics-token-secret-0044",
            "redis-pass-secret-0045",
            "proxy-pass-secret-0046",
        ];
        let common = [
            ("LEADGATE_ADMIN_TOKEN", "admin-token-secret-0043"),
            ("LEADGATE_METRICS_TOKEN", "metrics-token-secret-0044"),
            (
                "LEADGATE_REDIS_URL",
                "redis://leadgate:redis-pass-secret-0045@127.0.0.1:6379/0",
            ),
            (
                "LEADGATE_EGRESS_PROXY",
                "http://egress:proxy-pass-secret-0046@proxy.example:3128",
            ),
        ];
        let file = token_file.display().to_string();
        for token in [
            ("LEADGATE_ONPIPELINE_TOKEN", "inline-token-secret-0041"),
            ("LEADGATE_ONPIPELINE_TOKEN_FILE", file.as_str()),
        ] {
            let mut pairs = common.to_vec();
            pairs.push(token);
            let settings = env(&pairs).unwrap();
            let token = settings.token_source().expect("a token is configured");
            let printed = [
                format!("{settings:?}"),
                format!("{settings:#?}"),
                format!("{token:?}"),
                format!("{:?}", token.load().unwrap()),
                format!("{:?}", settings.backend()),
            ];
            for text in &printed {
                for secret in secrets {
                    assert!(!text.contains(secret), "{secret} shown in {text}");
                }
            }
            // The secrets are there, only hidden.
            assert!(printed[0].contains("REDACTED"), "{}", printed[0]);
            assert_eq!(
                token.load().unwrap().expose_secret(),
                match settings.onpipeline_token_file {
                    Some(_) => "file-token-secret-0042",
                    None => "inline-token-secret-0041",
                }
            );
        }
    }

    #[test]
    fn token_and_token_file_together_are_refused() {
        assert!(
            env(&[
                ("LEADGATE_ONPIPELINE_TOKEN", "t"),
                ("LEADGATE_ONPIPELINE_TOKEN_FILE", "/tmp/t")
            ])
            .is_err()
        );
    }
}
