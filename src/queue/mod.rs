//! The delivery queue: one contract, two backends (Redis, embedded SQLite).
//!
//! # The contract
//!
//! 1. **Enqueue is durable before the 2xx.** [`Queue::enqueue`] returns only once the lead is
//!    written where a crash of this process cannot lose it (a committed SQLite transaction on
//!    disk; a Redis write acknowledged by the server — its own persistence settings decide the
//!    rest, see [`Queue::durability_warning`] and the README). An enqueue that fails or times out
//!    is answered `503`: it may still have landed, which is why idempotency keys exist.
//! 2. **Idempotency.** An enqueue carrying an [`IdempotencyKey`] already seen within its time to
//!    live queues nothing and returns [`Enqueued::Replayed`] with the first lead's id — or
//!    [`Enqueued::Conflict`] when both carry a body digest and the digests differ (the key was
//!    reused for another body). The key, its digest, the lead and its [`LeadRecord`] are
//!    written atomically.
//! 3. **Leases.** A consumer leases ready entries with [`Queue::lease`]. An entry is ready when it
//!    is new, when its retry delay has passed, or when a lease on it was not settled within the
//!    visibility timeout (the consumer died): then it is redelivered to any consumer. A lease
//!    carries the lead's attempt history ([`Lease::history`]).
//! 4. **Each lease settles exactly once**, with [`Queue::settle`]; the settle's [`Attempt`], when
//!    it has one, is appended to the lead's history in the same atomic step:
//!    * [`Settle::Delivered`] records the delivery (see [`Queue::delivery_of`]) and removes the
//!      entry, atomically: a redelivered lease of a lead already recorded as delivered is
//!      recognised by the forwarder and not sent again (and a copy of a delivered lead met by a
//!      later lease is dropped by the queue itself);
//!    * [`Settle::RetryLater`] makes the lead ready again after the delay (as a new copy of the
//!      entry: the lease that settled it is spent), with `attempt + 1` when the attempt counts
//!      (it does not when delivery is paused or the process is shutting down), the history so
//!      far, and the new [`Work`] when one is given;
//!    * [`Settle::Dead`] moves the entry to the dead letters with its reason and history.
//!
//!    Settling a lease that has expired and been redelivered meanwhile is harmless: it is
//!    ignored, except that a `Delivered` settle is always recorded (the lead *was* delivered),
//!    which makes the second delivery a no-op.
//! 5. Nothing else removes an entry. No lead is dropped. A dead letter stays, with its data,
//!    until an operator revives it ([`Queue::revive`]: a fresh ready copy whose attempts go on
//!    numbering after the last one made, its history kept with a [`AttemptOutcome::Replayed`]
//!    entry marking the replay) or deletes it ([`Queue::delete_dead`]).
//! 6. **Records and retention.** Every lead has a [`LeadRecord`] from its enqueue on (state,
//!    source, received_at, attempts, delivery, dead reason, data), changed in the same atomic
//!    step as each settle. After delivery the lead's personal data (its [`Work`]) is kept for
//!    [`QueueSettings::pii_ttl`] and then purged; the rest of the record — which is what
//!    [`Queue::delivery_of`] reads to prevent a second delivery — is kept for
//!    [`QueueSettings::record_ttl`]. A deleted dead letter loses its data at once and keeps a
//!    record for `record_ttl`. Records of queued and dead leads never expire.
//! 7. **Shared upstream rate.** [`Queue::acquire_upstream`] hands out request slots at no more
//!    than the given rate across every process using the same store (Redis), or across the
//!    process (embedded, one process per data directory).
//! 8. **Operator pause.** [`Queue::pause_delivery`] records an operator's pause of delivery in
//!    the store, so every process using it sees the same [`OperatorPause`] through
//!    [`Queue::operator_pause`] (a pause already in force is kept, with its time);
//!    [`Queue::resume_delivery`] clears it. It lasts until cleared, across restarts. The queue
//!    only stores it: forwarders read it and stop leasing while it is set. Pauses caused by
//!    Onpipeline's answers are not stored here: each process finds and probes those itself.

pub mod embedded;
pub mod redis;

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::lead::{LeadId, QueuedLead, Work};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store cannot be reached or did not answer in time: callers answer `503`.
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    /// Anything else (corrupt entry, schema problem).
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Settings common to both backends.
#[derive(Clone, Debug)]
pub struct QueueSettings {
    /// An unsettled lease is redelivered after this long.
    pub lease_timeout: Duration,
    /// How long an idempotency key is remembered.
    pub idempotency_ttl: Duration,
    /// How long after delivery a lead's personal data (its [`Work`]) is kept for inspection;
    /// then it is purged and only the [`LeadRecord`] without data remains.
    pub pii_ttl: Duration,
    /// How long a lead's record (id, timestamps, attempts, outcome, Onpipeline LeadID) is kept
    /// after delivery. The delivered record that prevents a second delivery lives this long.
    /// `pii_ttl` beyond it is cut to it.
    pub record_ttl: Duration,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            lease_timeout: Duration::from_secs(60),
            idempotency_ttl: Duration::from_secs(48 * 3600),
            pii_ttl: Duration::from_secs(7 * 24 * 3600),
            record_ttl: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// Where the queue lives.
#[derive(Clone, Debug)]
pub enum Backend {
    /// `redis://` or `rediss://` URL (may carry a password: never logged), and the key prefix.
    Redis {
        /// With `cluster`, a comma-separated list of seed node URLs.
        url: secrecy::SecretString,
        prefix: String,
        /// Talk to a Redis Cluster (every key of the queue lives in the slot of `{prefix}`).
        cluster: bool,
        /// PEM CA certificate(s) a `rediss://` server's certificate must chain to; without it,
        /// the system's trust store is used.
        ca_file: Option<PathBuf>,
    },
    /// Directory holding the SQLite database, and when commits reach the disk.
    Embedded { dir: PathBuf, fsync: Fsync },
}

/// When the embedded queue's commits are forced to disk (`LEADGATE_EMBEDDED_FSYNC`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// Every commit is fsynced before the enqueue returns: an acknowledged lead survives a
    /// power loss. Concurrent enqueues share each fsync (group commit).
    #[default]
    Always,
    /// Commits reach the operating system at once (they survive `kill -9` and crashes of the
    /// process) and the disk when the checkpointer next syncs, within about 50 ms: a power loss
    /// of the host may lose that last moment of leads — the kind of window Redis has with
    /// `appendfsync everysec`.
    Everysec,
}

/// A sender-chosen key that makes a repeated submission a no-op: scoped per source.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    pub source: String,
    pub key: String,
    /// A digest of the request body the key came with (a sender's `Idempotency-Key`), so a
    /// reuse with another body is told apart from a retry; `None` for keys that dedupe by
    /// identity alone (a platform's lead id, whose redeliveries may differ in envelope).
    pub body_digest: Option<String>,
}

impl IdempotencyKey {
    /// What a repeat of this key answers, given what the first claim stored.
    fn repeat(&self, first: LeadId, stored_digest: Option<&str>) -> Enqueued {
        match (self.body_digest.as_deref(), stored_digest) {
            (Some(now), Some(then)) if now != then => Enqueued::Conflict { first },
            _ => Enqueued::Replayed { first },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// The lead was written.
    Queued,
    /// The idempotency key was seen before: nothing written; this is the first lead's id.
    Replayed { first: LeadId },
    /// The idempotency key was seen before with a different body: nothing written.
    Conflict { first: LeadId },
}

/// One leased entry. `attempt` is the number of the delivery attempt about to be made (1 for a
/// fresh lead; after a replay, numbering goes on — see [`Lease::schedule_attempt`]). Cloning a
/// lease does not duplicate it: settling either copy settles it.
#[derive(Clone, Debug)]
pub struct Lease {
    pub lead: QueuedLead,
    pub attempt: u32,
    /// The reason of the previous attempt, if any.
    pub last_error: Option<String>,
    /// Every attempt made so far, oldest first (carried from copy to copy).
    pub history: Vec<Attempt>,
    /// Taken just before the lease was asked for, so no later than the moment it began: the
    /// lease runs for at least the visibility timeout from here.
    pub leased_at: std::time::Instant,
    pub(crate) handle: LeaseHandle,
}

impl Lease {
    /// The number of the attempt about to be made within the lead's current delivery schedule:
    /// [`Lease::attempt`] counts every attempt since the lead arrived, while a replay starts a
    /// new schedule (its back-off starts over) that counts from the replay.
    pub fn schedule_attempt(&self) -> u32 {
        let replayed_after = self
            .history
            .iter()
            .rev()
            .find(|a| a.outcome == AttemptOutcome::Replayed)
            .map_or(0, |a| a.number);
        self.attempt.saturating_sub(replayed_after).max(1)
    }
}

/// The history entry a revive appends, and the number of the lead's next attempt: attempts go
/// on numbering after the highest one in `history`, and the entry carries that highest number
/// (like an uncounted attempt, it repeats the number before it).
pub(crate) fn replay_entry(history: &[Attempt], at: DateTime<Utc>) -> (Attempt, u32) {
    let last = history.iter().map(|a| a.number).max().unwrap_or(0);
    let entry = Attempt {
        number: last,
        at,
        duration_ms: 0,
        status: None,
        outcome: AttemptOutcome::Replayed,
        reason: Some("replayed from the dead letters by an operator".to_owned()),
    };
    (entry, last + 1)
}

/// One delivery attempt, as kept in a lead's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// The attempt number it was made as (an uncounted attempt repeats the number).
    pub number: u32,
    pub at: DateTime<Utc>,
    pub duration_ms: u64,
    /// Onpipeline's HTTP status, when an answer came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub outcome: AttemptOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    Delivered,
    Duplicate,
    /// A temporary failure; tried again later.
    Retry,
    /// Onpipeline refused the data; dead-lettered.
    Rejected,
    /// Onpipeline refused our credentials or address; delivery paused, attempt not counted.
    Paused,
    /// Reading the lead from the platform failed (Meta Graph API).
    FetchFailed,
    /// Not an attempt: an operator replayed the dead letter here; a new delivery schedule
    /// starts, and attempts go on numbering after this entry's number.
    Replayed,
    /// An outcome this version does not know, written by a newer one sharing the queue (a
    /// rolling upgrade, a rollback): read as this so the history stays readable. Never written
    /// by this version.
    #[serde(other)]
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attempt_outcome_of_a_newer_version_is_read_as_unknown() {
        let attempt: Attempt = serde_json::from_str(
            r#"{"number":2,"at":"2026-12-04T10:00:00Z","duration_ms":0,"outcome":"redirected"}"#,
        )
        .unwrap();
        assert_eq!(attempt.outcome, AttemptOutcome::Unknown);
        let replayed: AttemptOutcome = serde_json::from_str(r#""replayed""#).unwrap();
        assert_eq!(replayed, AttemptOutcome::Replayed);
    }
}

/// Backend-specific identity of a leased entry.
#[derive(Clone, Debug)]
pub(crate) enum LeaseHandle {
    /// `deliveries` is the entry's delivery count when it was leased: any later claim raises
    /// it, which makes this lease's settle stale.
    Redis { stream_id: String, deliveries: i64 },
    /// `entry_id` is the lead's row. `lease_token` is drawn afresh by every lease, so a settle
    /// of an expired lease that was leased again is recognised as stale.
    Embedded { entry_id: i64, lease_token: i64 },
}

/// What Onpipeline said when it took the lead.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// `Data.LeadID` from Onpipeline, when it gave one (not on a 409 duplicate).
    pub onpipeline_lead_id: Option<String>,
    /// Onpipeline answered 409: it already had this lead.
    pub duplicate: bool,
    pub at: DateTime<Utc>,
}

/// How a lease ends. `attempt` is the attempt just made, appended to the lead's history; it is
/// `None` when no request was made (shutdown release, a lead already delivered).
#[allow(
    clippy::large_enum_variant,
    reason = "one per settle, moved rather than copied"
)]
#[derive(Clone, Debug)]
pub enum Settle {
    Delivered {
        delivery: Delivery,
        attempt: Option<Attempt>,
    },
    RetryLater {
        delay: Duration,
        reason: String,
        /// false when the attempt must not count (delivery paused, shutdown release).
        count_attempt: bool,
        attempt: Option<Attempt>,
        /// Replaces the lead's work in the new copy (a Meta lead once read from the Graph API
        /// becomes a payload to deliver, so a retry does not read it again).
        work: Option<Work>,
    },
    Dead {
        reason: String,
        attempt: Option<Attempt>,
    },
}

/// A dead-lettered lead and why.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeadLetter {
    pub lead: QueuedLead,
    pub attempts: u32,
    pub reason: String,
    pub at: DateTime<Utc>,
    /// Every attempt, oldest first.
    #[serde(default)]
    pub history: Vec<Attempt>,
}

/// Where a lead is on its road.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeadState {
    /// Waiting, leased, or waiting for a retry.
    Queued,
    Delivered,
    Dead,
}

/// Everything known about one lead (`GET /admin/leads/{id}`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeadRecord {
    pub id: LeadId,
    pub source: String,
    pub received_at: DateTime<Utc>,
    pub state: LeadState,
    pub attempts: Vec<Attempt>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_reason: Option<String>,
    /// The lead's data; `None` once purged (`pii_ttl` after delivery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work: Option<Work>,
}

/// An operator's pause of delivery (`POST /admin/pause`), shared by every process on the queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorPause {
    /// When the pause began (the first of several pause calls).
    pub since: DateTime<Utc>,
}

/// Counts by state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Entries a lease would take now: new leads, and retry copies whose delay has passed.
    pub ready: u64,
    /// Entries leased and not yet settled (including leases that expired and wait to be taken
    /// again).
    pub leased: u64,
    /// Retry copies whose delay has not passed.
    pub delayed: u64,
    pub dead: u64,
    /// Delivered leads whose record is still kept (`record_ttl`).
    pub delivered: u64,
    /// How long the longest-waiting ready entry has been ready, in milliseconds (0 when none
    /// is): since its enqueue for a new lead (or its revival), since its retry delay ended for
    /// a retry copy. This is the forwarders' lag — it grows when nothing leases — and not the
    /// lead's age: a lead received days ago whose retry just came due counts from its due time.
    pub oldest_ready_ms: u64,
}

/// The queue, whichever backend holds it. The rest of the code never knows which.
#[derive(Clone)]
pub enum Queue {
    Redis(redis::RedisQueue),
    Embedded(embedded::EmbeddedQueue),
}

macro_rules! dispatch {
    ($self:ident, $q:ident => $call:expr) => {
        match $self {
            Queue::Redis($q) => $call,
            Queue::Embedded($q) => $call,
        }
    };
}

impl Queue {
    /// Opens (creating if needed) the queue. `consumer` names this process among the consumers
    /// sharing the queue (unique per replica).
    pub async fn open(backend: &Backend, settings: QueueSettings, consumer: &str) -> Result<Self> {
        Ok(match backend {
            Backend::Redis {
                url,
                prefix,
                cluster,
                ca_file,
            } => Queue::Redis(
                redis::RedisQueue::open(
                    &redis::Connect {
                        url,
                        cluster: *cluster,
                        ca_file: ca_file.as_deref(),
                    },
                    prefix,
                    settings,
                    consumer,
                )
                .await?,
            ),
            Backend::Embedded { dir, fsync } => {
                Queue::Embedded(embedded::EmbeddedQueue::open(dir, *fsync, settings).await?)
            }
        })
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Queue::Redis(_) => "redis",
            Queue::Embedded(_) => "embedded",
        }
    }

    pub async fn enqueue(
        &self,
        lead: &QueuedLead,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<Enqueued> {
        dispatch!(self, q => q.enqueue(lead, idempotency).await)
    }

    /// Leases up to `max` ready entries, waiting up to `wait` for at least one.
    pub async fn lease(&self, max: usize, wait: Duration) -> Result<Vec<Lease>> {
        dispatch!(self, q => q.lease(max, wait).await)
    }

    pub async fn settle(&self, lease: Lease, how: Settle) -> Result<()> {
        dispatch!(self, q => q.settle(lease, how).await)
    }

    /// The delivery record of a lead, if it was delivered.
    pub async fn delivery_of(&self, id: LeadId) -> Result<Option<Delivery>> {
        dispatch!(self, q => q.delivery_of(id).await)
    }

    /// The newest `limit` dead letters, newest first.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        dispatch!(self, q => q.dead_letters(limit).await)
    }

    pub async fn stats(&self) -> Result<Stats> {
        dispatch!(self, q => q.stats().await)
    }

    /// Cheap reachability check for `/readyz`.
    pub async fn ping(&self) -> Result<()> {
        dispatch!(self, q => q.ping().await)
    }

    /// Everything known about one lead, whatever its state.
    pub async fn lead(&self, id: LeadId) -> Result<Option<LeadRecord>> {
        dispatch!(self, q => q.lead(id).await)
    }

    /// One dead letter.
    pub async fn dead_letter(&self, id: LeadId) -> Result<Option<DeadLetter>> {
        dispatch!(self, q => q.dead_letter(id).await)
    }

    /// Moves a dead letter back to the ready queue with `work` (mapped again by the caller with
    /// the source's current rules), starting a fresh schedule; its history is kept, with a
    /// [`AttemptOutcome::Replayed`] entry appended, and its next attempt is numbered after the
    /// last one made (see [`replay_entry`]). Atomic; false when there is no such dead letter.
    pub async fn revive(&self, id: LeadId, work: Work) -> Result<bool> {
        dispatch!(self, q => q.revive(id, work).await)
    }

    /// Deletes a dead letter for good; false when there is none.
    pub async fn delete_dead(&self, id: LeadId) -> Result<bool> {
        dispatch!(self, q => q.delete_dead(id).await)
    }

    /// Takes one slot of the upstream rate limit, shared by every process on this queue
    /// (GCRA: at most `per_second` requests in any second, no burst beyond one). Returns zero
    /// when the slot is taken, or how long to wait before asking again.
    pub async fn acquire_upstream(&self, per_second: std::num::NonZeroU32) -> Result<Duration> {
        dispatch!(self, q => q.acquire_upstream(per_second).await)
    }

    /// Records an operator's pause of delivery for every process on this queue. A pause already
    /// in force is kept as it is. Returns the pause in force.
    pub async fn pause_delivery(&self, since: DateTime<Utc>) -> Result<OperatorPause> {
        let pause = OperatorPause { since };
        dispatch!(self, q => q.pause_delivery(&pause).await)
    }

    /// Clears the operator's pause; false when there was none.
    pub async fn resume_delivery(&self) -> Result<bool> {
        dispatch!(self, q => q.resume_delivery().await)
    }

    /// The operator's pause in force, if any.
    pub async fn operator_pause(&self) -> Result<Option<OperatorPause>> {
        dispatch!(self, q => q.operator_pause().await)
    }

    /// A warning when the store's own settings put accepted leads at risk, to log at start-up:
    /// Redis without its append-only file (with the loss window that leaves), with
    /// `appendfsync no`, or with a `maxmemory-policy` that may evict queued leads (`allkeys-*`)
    /// or idempotency keys and delivery records (`volatile-*`); or a warning that they could
    /// not be checked when Redis refuses `CONFIG GET` (managed Redis). `None` for the embedded
    /// queue, whose durability this process sets.
    pub async fn durability_warning(&self) -> Result<Option<String>> {
        dispatch!(self, q => q.durability_warning().await)
    }
}
