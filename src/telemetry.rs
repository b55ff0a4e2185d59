//! Logging set-up and the masks that keep personal data out of logs.

use tracing_subscriber::EnvFilter;

/// Log output format, chosen with `--log-format` or `LEADGATE_LOG_FORMAT`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber once; later calls (tests) are ignored. The level comes from
/// `RUST_LOG` (default `info`). Lines are written to stdout by a background thread, so a
/// request never waits on the terminal or a pipe; it blocks rather than drop lines when that
/// thread falls behind. Keep the returned guard alive: dropping it flushes what is pending.
pub fn init(format: LogFormat) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stdout());
    let ansi = std::io::stdout().is_terminal();
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(writer.clone())
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_ansi(ansi)
            .with_writer(writer)
    });
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(ClientFaults::new(std::env::var("RUST_LOG").ok().as_deref()))
        .with(text)
        .with(json)
        .try_init();
    installed.ok().map(|()| guard)
}

/// For tests: logs go through the test harness's capture, written synchronously.
pub fn init_for_tests() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// actix-http logs `stream error: …` at ERROR for every connection a client spoke malformed
/// HTTP on, or broke off mid-request: the client's fault, not the server's, and an alert on
/// ERROR lines would fire on every scanner. This layer counts each such line in
/// [`metric::HTTP_CLIENT_FAULTS`] and drops it, unless `RUST_LOG` names `actix_http` (an
/// operator who asks for actix's own lines gets them, at actix's level).
pub struct ClientFaults {
    pass_through: bool,
}

impl ClientFaults {
    const TARGET: &'static str = "actix_http::h1::dispatcher";

    /// The layer for this `RUST_LOG` value.
    pub fn new(rust_log: Option<&str>) -> Self {
        Self {
            pass_through: rust_log.is_some_and(|directives| directives.contains("actix_http")),
        }
    }

    /// Whether the event is actix's line about a client's fault.
    fn is_client_fault(event: &tracing::Event<'_>) -> bool {
        let metadata = event.metadata();
        if metadata.target() != Self::TARGET || *metadata.level() != tracing::Level::ERROR {
            return false;
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        message.0.starts_with("stream error")
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ClientFaults {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        if Self::is_client_fault(event) {
            metrics::counter!(metric::HTTP_CLIENT_FAULTS).increment(1);
            return self.pass_through;
        }
        true
    }
}

/// The `message` of an event, as text.
struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

/// `ana.lopez@example.com` → `a***@example.com`. Anything without an `@` is fully masked.
pub fn mask_email(email: &str) -> String {
    match email.trim().rsplit_once('@') {
        Some((local, domain)) if !local.is_empty() => {
            let first = local.chars().next().unwrap_or('*');
            format!("{first}***@{domain}")
        }
        _ => "***".to_owned(),
    }
}

/// `+442079460018` → `+44********18`: keeps a leading `+`, the first two and the last two
/// digits, and hides each digit between them with a `*`.
pub fn mask_phone(phone: &str) -> String {
    let digits: Vec<char> = phone.chars().filter(|c| c.is_ascii_digit()).collect();
    if digits.len() < 6 {
        return "***".to_owned();
    }
    let plus = if phone.trim_start().starts_with('+') {
        "+"
    } else {
        ""
    };
    let head: String = digits[..2].iter().collect();
    let tail: String = digits[digits.len() - 2..].iter().collect();
    format!("{plus}{head}{}{tail}", "*".repeat(digits.len() - 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_mask_keeps_first_letter_and_domain() {
        assert_eq!(mask_email("ana.lopez@example.com"), "a***@example.com");
        assert_eq!(mask_email("not-an-email"), "***");
        assert_eq!(mask_email("@example.com"), "***");
    }

    #[test]
    fn phone_mask_hides_the_middle_digits() {
        assert_eq!(mask_phone("+442079460018"), "+44********18");
        assert_eq!(mask_phone("0207 946 0018"), "02*******18");
        assert_eq!(mask_phone("12345"), "***");
    }
}

/// Prometheus metrics: the names, and the one place they are registered. Counters are emitted
/// next to the log line that tells the same event.
pub mod metric {
    use std::sync::OnceLock;

    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

    /// Leads received, by `source` and `outcome` (queued, duplicate, rejected, rate_limited,
    /// unauthorized, test, unavailable).
    pub const RECEIVED: &str = "leadgate_leads_received_total";
    /// Leads a platform sent with data that had to be repaired (never refused), by `source`.
    pub const REPAIRED: &str = "leadgate_leads_repaired_total";
    /// A platform's test leads (Google's "Send test data"), by `source` and `forwarded`
    /// (`true` when the source forwards them, which then also count as `queued` or
    /// `duplicate` in [`RECEIVED`]; `false` otherwise, also counted as `test` there).
    pub const TEST_LEADS: &str = "leadgate_test_leads_total";
    /// Entries in the queue, by `state` (ready, leased, delayed, dead).
    pub const QUEUE_DEPTH: &str = "leadgate_queue_depth";
    /// Age of the oldest lead ready for delivery.
    pub const QUEUE_OLDEST_READY: &str = "leadgate_queue_oldest_ready_seconds";
    /// Delivered leads whose record is kept.
    pub const DELIVERED_RECORDS: &str = "leadgate_delivered_records";
    /// Delivery attempts, by `outcome` (delivered, duplicate, retry, rejected, paused) and
    /// `status` (Onpipeline's HTTP status, or `none`).
    pub const ATTEMPTS: &str = "leadgate_delivery_attempts_total";
    /// Time Onpipeline took to answer one Leadsin request.
    pub const UPSTREAM_LATENCY: &str = "leadgate_upstream_request_duration_seconds";
    /// Leads moved to the dead letters.
    pub const DEAD_LETTERED: &str = "leadgate_dead_lettered_total";
    /// 1 while delivery is paused (Onpipeline refused our token or address, or an operator
    /// paused it), else 0.
    pub const PAUSED: &str = "leadgate_delivery_paused";
    /// Connections a client spoke malformed HTTP on or broke off mid-request (actix-http's
    /// `stream error` lines, which are not logged; see [`super::ClientFaults`]).
    pub const HTTP_CLIENT_FAULTS: &str = "leadgate_http_client_faults_total";

    /// Exports every series whose labels are known at start-up, at 0 when it has no value yet,
    /// so it exists before its first event: Prometheus' `increase()` misses the first count of
    /// a series born mid-window, and `absent()` cannot tell "nothing happened yet" from "not
    /// scraped". Series that already have a value keep it. Call after [`install`].
    pub fn register_known_series(sources: &crate::config::Sources) {
        describe();
        for source in sources.iter() {
            let id = source.id.clone();
            for outcome in crate::error::IngestError::RECEIVED_OUTCOMES {
                metrics::counter!(RECEIVED, "source" => id.clone(), "outcome" => outcome)
                    .increment(0);
            }
            if source.kind.is_platform() {
                metrics::counter!(REPAIRED, "source" => id.clone()).increment(0);
            }
            if matches!(source.kind, crate::config::SourceKind::Google { .. }) {
                metrics::counter!(RECEIVED, "source" => id.clone(), "outcome" => "test")
                    .increment(0);
                for forwarded in ["true", "false"] {
                    metrics::counter!(TEST_LEADS, "source" => id.clone(), "forwarded" => forwarded)
                        .increment(0);
                }
            }
        }
        for (outcome, status) in crate::onpipeline::known_attempt_labels() {
            metrics::counter!(ATTEMPTS, "outcome" => outcome, "status" => status).increment(0);
        }
        metrics::counter!(DEAD_LETTERED).increment(0);
        metrics::counter!(HTTP_CLIENT_FAULTS).increment(0);
        for state in ["ready", "leased", "delayed", "dead"] {
            metrics::gauge!(QUEUE_DEPTH, "state" => state).increment(0.0);
        }
        metrics::gauge!(QUEUE_OLDEST_READY).increment(0.0);
        metrics::gauge!(DELIVERED_RECORDS).increment(0.0);
        metrics::gauge!(PAUSED).increment(0.0);
        // A histogram with no sample yet is exported with every bucket at 0.
        let _ = metrics::histogram!(UPSTREAM_LATENCY);
    }

    /// The `# HELP` line of each metric.
    fn describe() {
        use metrics::{describe_counter, describe_gauge, describe_histogram};
        describe_counter!(RECEIVED, "Leads received, by source and outcome.");
        describe_counter!(
            REPAIRED,
            "Platform leads forwarded with repaired data (counted once per lead queued new)."
        );
        describe_counter!(
            TEST_LEADS,
            "Platform test leads received, forwarded or not."
        );
        describe_gauge!(QUEUE_DEPTH, "Entries in the queue, by state.");
        describe_gauge!(
            QUEUE_OLDEST_READY,
            "How long the longest-waiting ready lead has waited, in seconds."
        );
        describe_gauge!(DELIVERED_RECORDS, "Delivered leads whose record is kept.");
        describe_counter!(
            ATTEMPTS,
            "Delivery attempts, by outcome and Onpipeline's HTTP status."
        );
        describe_histogram!(
            UPSTREAM_LATENCY,
            metrics::Unit::Seconds,
            "Time Onpipeline took to answer one Leadsin request."
        );
        describe_counter!(DEAD_LETTERED, "Leads moved to the dead letters.");
        describe_gauge!(PAUSED, "1 while delivery is paused, else 0.");
        describe_counter!(
            HTTP_CLIENT_FAULTS,
            "Connections closed for malformed HTTP or broken off by the client."
        );
    }

    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

    /// Installs the process-wide Prometheus recorder once and returns its handle (later
    /// calls, e.g. several gateways in one test process, share it).
    pub fn install() -> PrometheusHandle {
        HANDLE
            .get_or_init(|| {
                let builder = PrometheusBuilder::new()
                    .set_buckets_for_metric(
                        Matcher::Full(UPSTREAM_LATENCY.to_owned()),
                        &[0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
                    )
                    .expect("the bucket list is not empty");
                match builder.install_recorder() {
                    Ok(handle) => handle,
                    // Another recorder is installed (an embedding program): keep a private one
                    // so /metrics still answers, without our series.
                    Err(_) => PrometheusBuilder::new().build_recorder().handle(),
                }
            })
            .clone()
    }
}
