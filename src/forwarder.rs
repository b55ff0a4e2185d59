//! The forwarder: lease leads, deliver them to Leadsin with bounded concurrency, settle each
//! lease by the outcome. Policy lives here, in one place:
//!
//! * delivered or duplicate (409) → record the delivery and ack;
//! * temporary failure → a new copy later, per [`RetryPolicy`] (and `Retry-After`), until the
//!   lead is too old, then dead-letter;
//! * rejected data (Onpipeline's `Error` object with 400 or 406) → dead-letter with its answer;
//! * 401/403/404, with or without an `Error` object → **pause all delivery**: the lead goes back uncounted, nothing more is leased,
//!   and one probe is sent after a growing back-off (re-reading a token file first) until
//!   Onpipeline accepts again.
//!
//! That pause is this process's own: each replica meets Onpipeline's answers and probes for
//! itself. An **operator's pause** is shared instead: it is stored in the queue
//! ([`Queue::pause_delivery`]) and every forwarder on the queue follows it within
//! [`OPERATOR_PAUSE_POLL`], leasing nothing until it is cleared.
//!
//! A lead whose delivery is already recorded (its earlier lease expired after Onpipeline took
//! it) is acked without being sent again.
//!
//! A Meta lead ([`Work::FetchMeta`]) is first read from the Graph API, then mapped and
//! delivered in the same attempt ([`Forwarder::fetch_meta`]):
//!
//! * read → mapped leniently (platform data is never refused) and sent; if Onpipeline then
//!   asks for a retry, the retry carries the mapped payload, so Graph is not read again;
//! * token expired or invalid, permission missing, no token configured for the page →
//!   **parked**: the lead goes back uncounted and is tried again after
//!   `LEADGATE_GRAPH_PARKED_RETRY`; the page is listed under `attention` in `/readyz` and an
//!   alert logged once; while a page is parked, only one of its leads calls Graph per interval
//!   (the others wait without a call), and the first success un-parks it. Like any lead, one
//!   still parked `LEADGATE_RETRY_MAX_AGE` after it arrived is dead-lettered with the reason;
//! * rate limit or transient fault → retry later like an Onpipeline failure (Graph's wait as a
//!   floor);
//! * any other Graph error → dead-letter with Graph's message (token redacted).

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::{SourceKind, Sources, TokenSource};
use crate::graph::{Credentials, GraphClient, GraphError};
use crate::lead::{LeadsinPayload, MetaLeadRef, Work};
use crate::onpipeline::{LeadsinClient, Outcome};
use crate::queue::{Attempt, AttemptOutcome, Delivery, Lease, Queue, Settle};
use crate::retry::{Decision, RetryPolicy};
use crate::telemetry::metric;

/// Whether delivery runs, as `/readyz` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum DeliveryStatus {
    Running,
    /// This process does not deliver by design (`--no-forwarder`); another one does.
    Off {
        reason: String,
    },
    /// Delivery cannot run: no Onpipeline token is configured, or its file cannot be read
    /// (re-read with back-off until it can; then delivery starts). Leads wait in the queue.
    Held {
        reason: String,
    },
    /// Onpipeline refused our credentials or address (probing until it accepts again), or an
    /// operator paused delivery (until an operator resumes it).
    Paused {
        reason: String,
        since: chrono::DateTime<Utc>,
        by_operator: bool,
    },
}

/// A Meta page whose leads cannot be read from the Graph API until a person acts (its token
/// expired, lacks a permission, or is not configured). Its leads are parked meanwhile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Attention {
    pub source: String,
    pub page_id: String,
    /// Graph's message (token redacted), or what is missing.
    pub reason: String,
    pub since: DateTime<Utc>,
}

#[derive(Debug)]
struct Parked {
    attention: Attention,
    /// When a lead of this page last called Graph.
    last_probe: Instant,
}

/// Shared between the forwarder, which writes it, and the HTTP side, which reports it.
#[derive(Debug)]
pub struct DeliveryState {
    status: RwLock<DeliveryStatus>,
    resume: Notify,
    parked: Mutex<Vec<Parked>>,
}

impl DeliveryState {
    pub fn new(status: DeliveryStatus) -> Arc<Self> {
        Arc::new(Self {
            status: RwLock::new(status),
            resume: Notify::new(),
            parked: Mutex::new(Vec::new()),
        })
    }

    /// The Meta pages whose leads are parked, as `/readyz` lists them.
    pub fn attention(&self) -> Vec<Attention> {
        self.parked_pages()
            .iter()
            .map(|p| p.attention.clone())
            .collect()
    }

    fn parked_pages(&self) -> std::sync::MutexGuard<'_, Vec<Parked>> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks a page as needing attention (the reason is updated); returns whether it was newly
    /// marked, so the alert is logged once.
    pub fn park(&self, source: &str, page_id: &str, reason: &str) -> bool {
        let mut parked = self.parked_pages();
        let found = parked
            .iter_mut()
            .find(|p| p.attention.source == source && p.attention.page_id == page_id);
        match found {
            Some(p) => {
                p.attention.reason = reason.to_owned();
                p.last_probe = Instant::now();
                false
            }
            None => {
                parked.push(Parked {
                    attention: Attention {
                        source: source.to_owned(),
                        page_id: page_id.to_owned(),
                        reason: reason.to_owned(),
                        since: Utc::now(),
                    },
                    last_probe: Instant::now(),
                });
                true
            }
        }
    }

    /// Whether a lead of this page may call Graph now: always when the page is not parked;
    /// once per `interval` when it is (the call that is allowed is the probe).
    fn may_call_graph(&self, source: &str, page_id: &str, interval: Duration) -> bool {
        let mut parked = self.parked_pages();
        match parked
            .iter_mut()
            .find(|p| p.attention.source == source && p.attention.page_id == page_id)
        {
            None => true,
            Some(p) if p.last_probe.elapsed() >= interval => {
                p.last_probe = Instant::now();
                true
            }
            Some(_) => false,
        }
    }

    /// Un-parks a page; returns whether it was parked.
    pub fn unpark(&self, source: &str, page_id: &str) -> bool {
        let mut parked = self.parked_pages();
        let before = parked.len();
        parked.retain(|p| !(p.attention.source == source && p.attention.page_id == page_id));
        parked.len() != before
    }

    pub fn get(&self) -> DeliveryStatus {
        self.status
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn is_paused(&self) -> bool {
        matches!(self.get(), DeliveryStatus::Paused { .. })
    }

    fn is_paused_by_operator(&self) -> bool {
        matches!(
            self.get(),
            DeliveryStatus::Paused {
                by_operator: true,
                ..
            }
        )
    }

    fn is_held(&self) -> bool {
        matches!(self.get(), DeliveryStatus::Held { .. })
    }

    /// While held, says why anew (the token file's error may have changed).
    fn still_held(&self, reason: String) {
        let mut status = self.status.write().unwrap_or_else(|e| e.into_inner());
        if matches!(*status, DeliveryStatus::Held { .. }) {
            *status = DeliveryStatus::Held { reason };
        }
    }

    /// Ends the hold once the token file can be read: delivery runs, or stays paused when an
    /// operator's pause (`since`) is in force on the queue. Returns whether it was held.
    fn end_hold(&self, operator_pause: Option<DateTime<Utc>>) -> bool {
        let mut status = self.status.write().unwrap_or_else(|e| e.into_inner());
        if !matches!(*status, DeliveryStatus::Held { .. }) {
            return false;
        }
        *status = match operator_pause {
            Some(since) => DeliveryStatus::Paused {
                reason: "paused by an operator".to_owned(),
                since,
                by_operator: true,
            },
            None => DeliveryStatus::Running,
        };
        metrics::gauge!(metric::PAUSED).set(if operator_pause.is_some() { 1.0 } else { 0.0 });
        true
    }

    /// Pauses delivery because Onpipeline refused us (first reason wins); returns whether this
    /// call paused it. An operator's pause is left alone.
    fn pause(&self, reason: &str) -> bool {
        let mut status = self.status.write().unwrap_or_else(|e| e.into_inner());
        if !matches!(*status, DeliveryStatus::Running) {
            return false;
        }
        *status = DeliveryStatus::Paused {
            reason: reason.to_owned(),
            since: Utc::now(),
            by_operator: false,
        };
        metrics::gauge!(metric::PAUSED).set(1.0);
        true
    }

    /// Pauses delivery until an operator resumes it, with the time the operator's pause began
    /// (shared by every process on the queue); returns false when this process does not
    /// deliver (off or held) or was already paused by the operator.
    pub fn pause_by_operator(&self, since: DateTime<Utc>) -> bool {
        let mut status = self.status.write().unwrap_or_else(|e| e.into_inner());
        if matches!(
            *status,
            DeliveryStatus::Off { .. }
                | DeliveryStatus::Held { .. }
                | DeliveryStatus::Paused {
                    by_operator: true,
                    ..
                }
        ) {
            return false;
        }
        *status = DeliveryStatus::Paused {
            reason: "paused by an operator".to_owned(),
            since,
            by_operator: true,
        };
        metrics::gauge!(metric::PAUSED).set(1.0);
        true
    }

    /// Ends an operator's pause (another process was told to resume); a pause Onpipeline caused
    /// stays, since this process finds out for itself when Onpipeline accepts again.
    fn end_operator_pause(&self) -> bool {
        self.is_paused_by_operator() && self.resume()
    }

    /// Ends a pause Onpipeline caused, once it accepted a lead again; an operator's pause stays.
    fn resume_after_acceptance(&self) -> bool {
        let paused_by_onpipeline = matches!(
            self.get(),
            DeliveryStatus::Paused {
                by_operator: false,
                ..
            }
        );
        paused_by_onpipeline && self.resume()
    }

    /// Resumes delivery at once (an operator; a successful probe). Returns false when this
    /// process does not deliver (off or held).
    pub fn resume(&self) -> bool {
        let mut status = self.status.write().unwrap_or_else(|e| e.into_inner());
        if matches!(
            *status,
            DeliveryStatus::Off { .. } | DeliveryStatus::Held { .. }
        ) {
            return false;
        }
        *status = DeliveryStatus::Running;
        drop(status);
        metrics::gauge!(metric::PAUSED).set(0.0);
        self.resume.notify_waiters();
        true
    }
}

pub struct Forwarder {
    pub queue: Queue,
    pub client: LeadsinClient,
    pub token: TokenSource,
    pub policy: RetryPolicy,
    pub concurrency: usize,
    pub state: Arc<DeliveryState>,
    /// Longest wait between probes while paused.
    pub probe_max: Duration,
    /// Reads Meta leads; the sources give each Meta source's page tokens and mapping.
    pub graph: GraphClient,
    pub sources: Sources,
    /// How long a parked Meta lead waits before it is tried again.
    pub parked_retry: Duration,
    /// At shutdown, how long deliveries in flight may take to finish before their leases are
    /// released for another process.
    pub drain_timeout: Duration,
    /// Requests per second to Onpipeline, shared by every process on the queue; `None`: no limit.
    pub upstream_rate: Option<std::num::NonZeroU32>,
    /// The queue's visibility timeout: a delivery must settle well within it.
    pub lease_timeout: Duration,
}

/// How long the lead's current delivery schedule has run, for `LEADGATE_RETRY_MAX_AGE`: since
/// it arrived, or since an operator replayed it from the dead letters.
fn schedule_age(lease: &Lease) -> Duration {
    let start = lease.lead.replayed_at.unwrap_or(lease.lead.received_at);
    (Utc::now() - start).to_std().unwrap_or_default()
}

/// Leases being delivered, so the ones still unfinished at the shutdown deadline can be
/// released.
#[derive(Default)]
struct InFlight {
    next: std::sync::atomic::AtomicU64,
    leases: std::sync::Mutex<std::collections::HashMap<u64, Lease>>,
}

impl InFlight {
    fn add(&self, lease: &Lease) -> u64 {
        let key = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().insert(key, lease.clone());
        key
    }

    fn remove(&self, key: u64) {
        self.lock().remove(&key);
    }

    fn take_all(&self) -> Vec<Lease> {
        self.lock().drain().map(|(_, lease)| lease).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Lease>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why delivery is held when the token (its file) cannot be read, as `/readyz` says it.
pub fn token_unreadable(e: &anyhow::Error) -> String {
    format!("the Onpipeline token cannot be read ({e:#}); leads are queued and wait until it can")
}

/// How long one lease call waits for work before looking at shutdown and pause again.
const LEASE_WAIT: Duration = Duration::from_millis(500);

/// How often the operator's pause stored in the queue is read: a pause or resume sent to one
/// process reaches the others within this.
pub const OPERATOR_PAUSE_POLL: Duration = Duration::from_millis(500);

/// Follows the operator's pause stored in the queue (`POST /admin/pause` on any process
/// sharing it), until shutdown. It acts on what changed since its last read, so it leaves alone
/// the process that took the call (which applied it at once); a read that raced with a call
/// is set right by the next one.
async fn follow_operator_pause(
    queue: Queue,
    state: Arc<DeliveryState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last: Option<Option<crate::queue::OperatorPause>> = None;
    while !*shutdown.borrow() {
        match queue.operator_pause().await {
            Ok(pause) if last.as_ref() != Some(&pause) => {
                match &pause {
                    Some(p) if state.pause_by_operator(p.since) => {
                        warn!("Delivery paused by an operator (through another process).");
                    }
                    None if state.end_operator_pause() => {
                        info!("Delivery resumed by an operator (through another process).");
                    }
                    _ => {}
                }
                last = Some(pause);
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "Could not read the operator's pause."),
        }
        tokio::select! {
            _ = tokio::time::sleep(OPERATOR_PAUSE_POLL) => {}
            _ = shutdown.changed() => {}
        }
    }
}

impl Forwarder {
    /// Runs until `shutdown` turns true, then waits for in-flight deliveries to settle.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.concurrency));
        let in_flight = Arc::new(InFlight::default());
        let mut tasks = JoinSet::new();
        let follower = tokio::spawn(follow_operator_pause(
            this.queue.clone(),
            this.state.clone(),
            shutdown.clone(),
        ));
        let first_probe_delay = Duration::from_secs(1).min(this.probe_max);
        let mut probe_delay = first_probe_delay;
        info!(
            endpoint = %this.client.endpoint(),
            concurrency = this.concurrency,
            "Forwarder started."
        );

        while !*shutdown.borrow() {
            while tasks.try_join_next().is_some() {}

            if this.state.is_held() {
                // The token file could not be read at start-up: nothing is leased until it can.
                tokio::select! {
                    _ = tokio::time::sleep(probe_delay) => {}
                    _ = shutdown.changed() => continue,
                }
                probe_delay = (probe_delay * 2).min(this.probe_max);
                this.try_end_hold().await;
                continue;
            }
            if this.state.is_paused() {
                // Wait for in-flight attempts to finish before probing, so one probe means one
                // request.
                while tasks.join_next().await.is_some() {}
                if this.state.is_paused_by_operator() {
                    // The poll also catches a resume that came between the check and the wait.
                    tokio::select! {
                        _ = this.state.resume.notified() => {}
                        _ = tokio::time::sleep(OPERATOR_PAUSE_POLL) => {}
                        _ = shutdown.changed() => {}
                    }
                    continue;
                }
                tokio::select! {
                    _ = tokio::time::sleep(probe_delay) => {}
                    _ = this.state.resume.notified() => {}
                    _ = shutdown.changed() => continue,
                }
                probe_delay = (probe_delay * 2).min(this.probe_max);
                if this.state.is_paused() {
                    this.probe().await;
                }
                continue;
            }
            probe_delay = first_probe_delay;

            let free = slots.available_permits();
            if free == 0 {
                tokio::select! {
                    _ = tasks.join_next() => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            // Not raced against shutdown: a lease call dropped half-way may already have taken
            // leads (Redis's XREADGROUP, the SQLite writer), which would then wait out the lease
            // timeout. It returns within LEASE_WAIT; what it took at shutdown is handed back.
            let leases = this.queue.lease(free, LEASE_WAIT).await;
            let leases = match leases {
                Ok(leases) => leases,
                Err(e) => {
                    warn!(error = %e, "Could not lease leads; retrying in a second.");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if this.state.is_paused() || *shutdown.borrow() {
                // Paused, or told to stop, while this lease call waited: hand the leads back
                // untouched, for another replica or the next start.
                let why = if *shutdown.borrow() {
                    "released at shutdown"
                } else {
                    "delivery paused"
                };
                for lease in leases {
                    this.put_back(lease, Duration::ZERO, why.to_owned()).await;
                }
                continue;
            }
            for lease in leases {
                let permit = slots
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore is never closed");
                let this = this.clone();
                let in_flight = in_flight.clone();
                let key = in_flight.add(&lease);
                tasks.spawn(async move {
                    this.deliver(lease).await;
                    in_flight.remove(key);
                    drop(permit);
                });
            }
        }

        info!(
            in_flight = tasks.len(),
            "Forwarder stopping; finishing deliveries in flight."
        );
        let drained = tokio::time::timeout(this.drain_timeout, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            let unfinished = in_flight.take_all();
            warn!(
                count = unfinished.len(),
                "Deliveries still running at the shutdown deadline; releasing their leases."
            );
            for lease in unfinished {
                // The request may have reached Onpipeline: a repeat is answered 409, which
                // counts as delivered.
                this.put_back(lease, Duration::ZERO, "released at shutdown".to_owned())
                    .await;
            }
        }
        follower.abort();
        info!("Forwarder stopped.");
    }

    /// Reads the token file again while delivery is held for it; starts delivery once it reads.
    async fn try_end_hold(&self) {
        if let Err(e) = self.token.load() {
            self.state.still_held(token_unreadable(&e));
            return;
        }
        // An operator's pause stored meanwhile was not applied while held: apply it now.
        match self.queue.operator_pause().await {
            Ok(pause) => {
                if self.state.end_hold(pause.map(|p| p.since)) {
                    info!("The Onpipeline token can be read now; delivery starts.");
                }
            }
            Err(e) => {
                warn!(error = %e, "Could not read the operator's pause; delivery stays held a while longer.");
            }
        }
    }

    /// Sends one lead while paused; resumes delivery when Onpipeline takes it.
    async fn probe(&self) {
        let lease = match self.queue.lease(1, LEASE_WAIT).await {
            Ok(mut leases) if !leases.is_empty() => leases.remove(0),
            Ok(_) => {
                // Nothing to probe with: resume; the next lead will tell.
                info!("Delivery resumes: no lead is waiting to probe with.");
                self.state.resume();
                return;
            }
            Err(e) => {
                warn!(error = %e, "Could not lease a lead to probe with.");
                return;
            }
        };
        info!(lead_id = %lease.lead.id, "Probing Onpipeline while delivery is paused.");
        self.deliver(lease).await;
    }

    async fn deliver(&self, lease: Lease) {
        let span = info_span!(
            "deliver",
            source = %lease.lead.source,
            lead_id = %lease.lead.id,
            attempt = lease.attempt
        );
        self.deliver_in_span(lease).instrument(span).await
    }

    async fn deliver_in_span(&self, lease: Lease) {
        let token = match self.token.load() {
            Ok(token) => token,
            Err(e) => {
                let reason = format!("the Onpipeline token cannot be read: {e:#}");
                if self.state.pause(&reason) {
                    error!(reason, "ALERT: delivery paused.");
                }
                self.put_back(lease, Duration::ZERO, reason).await;
                return;
            }
        };

        // `fetched` is the work a Meta lead became once read: a retry carries it instead.
        let (payload, fetched) = match &lease.lead.work {
            Work::Deliver { payload, .. } => (payload.clone(), None),
            Work::FetchMeta { lead } => match self.fetch_meta(&lease, lead).await {
                Ok((payload, work, repaired)) => (payload, Some((work, repaired))),
                Err(settle) => {
                    self.settle(lease, settle).await;
                    return;
                }
            },
        };

        if !self.wait_for_upstream_slot().await {
            // Waiting longer would let the lease expire while we still hold the lead.
            self.put_back(
                lease,
                Duration::ZERO,
                "waited too long for an upstream slot".into(),
            )
            .await;
            return;
        }
        // Checked last, just before sending: a lead whose earlier lease expired after
        // Onpipeline took it is recorded by now and must not be sent again.
        match self.queue.delivery_of(lease.lead.id).await {
            Ok(Some(delivery)) => {
                info!("Lead was already delivered; acknowledging without sending it again.");
                let settle = Settle::Delivered {
                    delivery,
                    attempt: None,
                };
                self.settle(lease, settle).await;
                return;
            }
            Ok(None) => {}
            Err(e) => {
                // Without knowing, sending could duplicate: put it back for later.
                warn!(error = %e, "Could not read the delivery record; will retry.");
                self.put_back(lease, Duration::from_secs(1), format!("queue error: {e}"))
                    .await;
                return;
            }
        }
        // A Meta lead counts as repaired when its mapped payload is first sent: not again when
        // it is read once more (a put-back, an expired lease, a replay after Onpipeline saw it).
        let fetched = fetched.map(|(work, repaired)| {
            let sent_before = lease.history.iter().any(|a| {
                !matches!(
                    a.outcome,
                    AttemptOutcome::FetchFailed | AttemptOutcome::Replayed
                )
            });
            if let Some(source) = self.sources.get(&lease.lead.source)
                && !sent_before
            {
                crate::sources::note_repaired(source, &repaired);
            }
            work
        });
        let at = Utc::now();
        let started = std::time::Instant::now();
        let outcome = self.client.send(&token, &payload).await;
        let elapsed = started.elapsed();
        let duration_ms = elapsed.as_millis() as u64;
        metrics::histogram!(metric::UPSTREAM_LATENCY).record(elapsed.as_secs_f64());
        metrics::counter!(
            metric::ATTEMPTS,
            "outcome" => outcome.label(),
            "status" => outcome.status().map_or_else(|| "none".to_owned(), |s| s.to_string())
        )
        .increment(1);
        let record = |outcome: AttemptOutcome, status: Option<u16>, reason: Option<&str>| {
            Some(Attempt {
                number: lease.attempt,
                at,
                duration_ms,
                status,
                outcome,
                reason: reason.map(str::to_owned),
            })
        };
        if matches!(outcome, Outcome::Delivered { .. } | Outcome::Duplicate)
            && self.state.resume_after_acceptance()
        {
            info!("Onpipeline accepts our requests again; delivery resumes.");
        }
        let settle = match outcome {
            Outcome::Delivered { lead_id, status } => {
                info!(
                    onpipeline_lead_id = lead_id.as_deref().unwrap_or(""),
                    "Lead delivered."
                );
                Settle::Delivered {
                    delivery: Delivery {
                        onpipeline_lead_id: lead_id,
                        duplicate: false,
                        at: Utc::now(),
                    },
                    attempt: record(AttemptOutcome::Delivered, Some(status), None),
                }
            }
            Outcome::Duplicate => {
                info!("Onpipeline already had this lead (409); counted as delivered.");
                Settle::Delivered {
                    delivery: Delivery {
                        onpipeline_lead_id: None,
                        duplicate: true,
                        at: Utc::now(),
                    },
                    attempt: record(AttemptOutcome::Duplicate, Some(409), None),
                }
            }
            Outcome::RetryLater {
                reason,
                status,
                after,
            } => {
                let attempt = record(AttemptOutcome::Retry, status, Some(&reason));
                let age = schedule_age(&lease);
                match self.policy.after_failure(
                    lease.schedule_attempt(),
                    age,
                    rand::random::<f64>(),
                    after,
                ) {
                    Decision::RetryAfter(delay) => {
                        warn!(
                            reason,
                            delay_ms = delay.as_millis() as u64,
                            "Delivery failed; will retry."
                        );
                        Settle::RetryLater {
                            delay,
                            reason,
                            count_attempt: true,
                            attempt,
                            work: fetched,
                        }
                    }
                    Decision::GiveUp => {
                        error!(
                            reason,
                            "Delivery kept failing past the retry limit; dead-lettered."
                        );
                        Settle::Dead {
                            reason: format!(
                                "gave up after {} attempts over {}: {reason}",
                                lease.attempt,
                                humantime::format_duration(Duration::from_secs(age.as_secs()))
                            ),
                            attempt,
                        }
                    }
                }
            }
            Outcome::Rejected { reason, status } => {
                error!(reason, "Onpipeline rejected the lead; dead-lettered.");
                let attempt = record(AttemptOutcome::Rejected, Some(status), Some(&reason));
                Settle::Dead { reason, attempt }
            }
            Outcome::Paused { reason, status } => {
                if self.state.pause(&reason) {
                    error!(
                        reason,
                        "ALERT: Onpipeline refused our token or address; delivery paused until it accepts again."
                    );
                }
                let attempt = record(AttemptOutcome::Paused, Some(status), Some(&reason));
                Settle::RetryLater {
                    delay: Duration::ZERO,
                    reason,
                    count_attempt: false,
                    attempt,
                    work: fetched,
                }
            }
        };
        self.settle(lease, settle).await;
    }

    /// Reads a Meta lead from the Graph API and maps it with its source's rules. On failure,
    /// returns how to settle the lease, per the policy at the top of this module.
    async fn fetch_meta(
        &self,
        lease: &Lease,
        lead: &MetaLeadRef,
    ) -> Result<(LeadsinPayload, Work, crate::mapping::Repairs), Settle> {
        let source_id = &lease.lead.source;
        let Some(source) = self.sources.get(source_id) else {
            let reason = format!(
                "source {source_id:?} is no longer in the sources file; a Meta lead needs its page token and mapping"
            );
            error!(reason, "Dead-lettered.");
            return Err(Settle::Dead {
                reason,
                attempt: None,
            });
        };
        let SourceKind::Facebook(meta) = &source.kind else {
            let reason = format!("source {source_id:?} is no longer a facebook source");
            error!(reason, "Dead-lettered.");
            return Err(Settle::Dead {
                reason,
                attempt: None,
            });
        };
        let page_id = &lead.page_id;
        let Some(page_token) = meta.page_token(page_id) else {
            let reason = format!(
                "no access token is configured for Meta page {page_id}: add it to the source's page_tokens"
            );
            return Err(self.park(lease, page_id, reason, None));
        };
        if !self
            .state
            .may_call_graph(source_id, page_id, self.parked_retry)
        {
            let reason = "this Meta page needs attention; another of its leads probes Graph";
            return Err(self.parked(lease, reason.to_owned(), None));
        }

        let at = Utc::now();
        let started = Instant::now();
        let credentials = Credentials {
            token: page_token,
            app_secret: &meta.app_secret,
        };
        let result = self.graph.lead(&lead.leadgen_id, &credentials).await;
        let failed = |reason: &str| {
            Some(Attempt {
                number: lease.attempt,
                at,
                duration_ms: started.elapsed().as_millis() as u64,
                status: None,
                outcome: AttemptOutcome::FetchFailed,
                reason: Some(reason.to_owned()),
            })
        };
        match result {
            Ok(graph_lead) => {
                if self.state.unpark(source_id, page_id) {
                    info!(
                        page_id,
                        "The Graph API reads this Meta page's leads again; its parked leads follow."
                    );
                }
                Ok(crate::sources::facebook::to_deliver(
                    source,
                    lead,
                    &graph_lead,
                ))
            }
            Err(GraphError::NeedsAttention { message }) => {
                let attempt = failed(&message);
                Err(self.park(lease, page_id, message, attempt))
            }
            Err(e @ (GraphError::RateLimited { .. } | GraphError::Temporary { .. })) => {
                let after = match &e {
                    GraphError::RateLimited { after, .. } => *after,
                    _ => None,
                };
                let reason = e.message().to_owned();
                let attempt = failed(&reason);
                let age = schedule_age(lease);
                match self.policy.after_failure(
                    lease.schedule_attempt(),
                    age,
                    rand::random::<f64>(),
                    after,
                ) {
                    Decision::RetryAfter(delay) => {
                        warn!(
                            reason,
                            delay_ms = delay.as_millis() as u64,
                            "Reading a Meta lead from the Graph API failed; will retry."
                        );
                        Err(Settle::RetryLater {
                            delay,
                            reason,
                            count_attempt: true,
                            attempt,
                            work: None,
                        })
                    }
                    Decision::GiveUp => {
                        error!(
                            reason,
                            "Reading a Meta lead kept failing past the retry limit; dead-lettered."
                        );
                        Err(Settle::Dead {
                            reason: format!(
                                "gave up reading the lead from the Graph API: {reason}"
                            ),
                            attempt,
                        })
                    }
                }
            }
            Err(GraphError::Rejected { message }) => {
                let reason = format!("the Graph API did not give the lead: {message}");
                error!(reason, "Dead-lettered.");
                let attempt = failed(&reason);
                Err(Settle::Dead { reason, attempt })
            }
        }
    }

    /// Parks a Meta lead and lists its page in `/readyz`; the alert is logged when the page
    /// becomes parked.
    fn park(
        &self,
        lease: &Lease,
        page_id: &str,
        reason: String,
        attempt: Option<Attempt>,
    ) -> Settle {
        if self.state.park(&lease.lead.source, page_id, &reason) {
            error!(
                page_id,
                reason,
                "ALERT: Meta leads of this page cannot be read from the Graph API; they are parked until its page token or the app's permissions are fixed."
            );
        }
        self.parked(lease, reason, attempt)
    }

    /// A parked lead goes back uncounted, to be tried after `parked_retry`. Like every lead,
    /// one still failing `LEADGATE_RETRY_MAX_AGE` after it arrived is dead-lettered (with the
    /// reason, for a replay): a lead Graph says does not exist (`100/33`, which Graph cannot
    /// tell apart from a permission problem) must not stay parked for ever.
    fn parked(&self, lease: &Lease, reason: String, attempt: Option<Attempt>) -> Settle {
        let age = schedule_age(lease);
        if age > self.policy.max_age {
            error!(
                reason,
                "A Meta lead stayed parked past the retry limit; dead-lettered."
            );
            return Settle::Dead {
                reason: format!(
                    "parked for {} without being read from the Graph API: {reason}",
                    humantime::format_duration(Duration::from_secs(age.as_secs()))
                ),
                attempt,
            };
        }
        Settle::RetryLater {
            delay: self.parked_retry,
            reason: format!("parked: {reason}"),
            count_attempt: false,
            attempt,
            work: None,
        }
    }

    /// Takes a slot of the upstream rate limit, waiting as long as the limit says, but no longer
    /// than a third of the lease timeout (false then: the lease must go back before it expires).
    /// If the queue cannot be asked (Redis down), paces at this process's share and sends: the
    /// limit protects Onpipeline from bursts, not leads from delivery.
    async fn wait_for_upstream_slot(&self) -> bool {
        let Some(rate) = self.upstream_rate else {
            return true;
        };
        let deadline = tokio::time::Instant::now() + self.lease_timeout / 3;
        loop {
            match self.queue.acquire_upstream(rate).await {
                Ok(wait) if wait.is_zero() => return true,
                Ok(wait) => {
                    if tokio::time::Instant::now() + wait > deadline {
                        return false;
                    }
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    warn!(error = %e, "Could not take an upstream rate slot; pacing locally.");
                    tokio::time::sleep(Duration::from_secs(1) / rate.get()).await;
                    return true;
                }
            }
        }
    }

    /// Returns a lead to the queue without counting an attempt (no request was made).
    async fn put_back(&self, lease: Lease, delay: Duration, reason: String) {
        let settle = Settle::RetryLater {
            delay,
            reason,
            count_attempt: false,
            attempt: None,
            work: None,
        };
        self.settle(lease, settle).await;
    }

    /// Settles a lease, retrying when the queue fails.
    ///
    /// A delivery is retried until shortly before the lease runs out: a lead whose delivery is
    /// not recorded by then is leased again and sent again (the crash window; Onpipeline's 409
    /// then counts it as delivered), while recording it late is safe — a `Delivered` settle is
    /// recorded even for a lease that expired meanwhile (contract §4 in `queue`). So a queue
    /// outage shorter than the lease does not send the lead twice. Any other settle is tried a
    /// few times: one that fails leaves the lease to expire, and the lead is simply leased
    /// again.
    async fn settle(&self, lease: Lease, how: Settle) {
        if matches!(how, Settle::Dead { .. }) {
            metrics::counter!(metric::DEAD_LETTERED).increment(1);
        }
        let delivered = matches!(how, Settle::Delivered { .. });
        // Leaves time for a last try to land before the lease runs out.
        let lease_ends = lease.leased_at + self.lease_timeout.mul_f64(0.9);
        let (max_wait, max_tries) = if delivered {
            (Duration::from_secs(2), u32::MAX)
        } else {
            (Duration::from_secs(5), 6)
        };
        let mut wait = Duration::from_millis(100);
        let mut attempt = 0;
        let error = loop {
            attempt += 1;
            let e = match self.queue.settle(lease.clone(), how.clone()).await {
                Ok(()) => return,
                Err(e) => e,
            };
            if attempt >= max_tries || (delivered && Instant::now() + wait >= lease_ends) {
                break e;
            }
            warn!(error = %e, attempt, "Could not settle a lease; retrying.");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(max_wait);
        };
        if delivered {
            error!(
                error = %error,
                attempts = attempt,
                "Could not record a delivery before its lease ran out; the lead will be sent again (a 409 then counts as delivered)."
            );
        } else {
            error!(
                error = %error,
                attempts = attempt,
                "Giving up settling a lease; it will be redelivered after its timeout."
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lead::{Input, LeadId, LeadsinPayload, QueuedLead};
    use crate::queue::LeaseHandle;

    fn lease(received_ago: chrono::Duration, replayed_ago: Option<chrono::Duration>) -> Lease {
        let now = Utc::now();
        Lease {
            lead: QueuedLead {
                id: LeadId::new(),
                source: "website".into(),
                received_at: now - received_ago,
                work: Work::Deliver {
                    payload: LeadsinPayload::default(),
                    input: Input::Fields { fields: Vec::new() },
                },
                replayed_at: replayed_ago.map(|ago| now - ago),
            },
            attempt: 1,
            last_error: None,
            history: Vec::new(),
            leased_at: std::time::Instant::now(),
            handle: LeaseHandle::Embedded {
                entry_id: 1,
                lease_token: 1,
            },
        }
    }

    fn about(age: Duration, expected: Duration) -> bool {
        age.abs_diff(expected) < Duration::from_secs(2)
    }

    #[test]
    fn a_lead_s_schedule_runs_from_its_arrival() {
        let age = schedule_age(&lease(chrono::Duration::hours(3), None));
        assert!(about(age, Duration::from_secs(3 * 3600)), "{age:?}");
    }

    #[test]
    fn a_replayed_lead_s_back_off_counts_from_the_replay_while_its_numbering_goes_on() {
        let mut replayed = lease(
            chrono::Duration::hours(1),
            Some(chrono::Duration::minutes(1)),
        );
        let died = Attempt {
            number: 4,
            at: Utc::now(),
            duration_ms: 30,
            status: Some(406),
            outcome: AttemptOutcome::Rejected,
            reason: None,
        };
        let (entry, next) = crate::queue::replay_entry(std::slice::from_ref(&died), Utc::now());
        assert_eq!(
            (entry.number, entry.outcome, next),
            (4, AttemptOutcome::Replayed, 5)
        );
        replayed.history = vec![died, entry];
        replayed.attempt = next;
        assert_eq!(replayed.schedule_attempt(), 1);
        replayed.attempt = next + 2;
        assert_eq!(replayed.schedule_attempt(), 3);
        // A lead never replayed: the two are one.
        let fresh = lease(chrono::Duration::hours(1), None);
        assert_eq!(fresh.schedule_attempt(), fresh.attempt);
    }

    #[test]
    fn a_replayed_dead_letter_s_schedule_restarts_at_the_replay() {
        let age = schedule_age(&lease(
            chrono::Duration::hours(73),
            Some(chrono::Duration::minutes(10)),
        ));
        assert!(about(age, Duration::from_secs(600)), "{age:?}");
    }
}
