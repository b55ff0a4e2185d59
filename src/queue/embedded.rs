//! The embedded backend: one SQLite database (`queue.sqlite3` in the configured directory), in
//! WAL mode with `synchronous = FULL`, so a committed enqueue survives a crash of the process
//! and a power loss alike.
//!
//! # Group commit
//!
//! A dedicated writer thread owns the only write connection. It takes every command waiting
//! on its channel (enqueues, leases, settles; up to [`MAX_BATCH`]) and applies them in one
//! transaction, each inside its own savepoint so one failing command does not undo the others,
//! then commits once — one `fsync` for the whole batch — and only then answers each caller
//! through its oneshot. Reads (`stats`, `delivery_of`, `dead_letters`) use a separate
//! read-only connection, which WAL lets run beside the writer.
//!
//! # Schema
//!
//! ```sql
//! -- One row per lead from its enqueue on: the queue entry and the lead's record (LeadRecord)
//! -- in one, so an enqueue is one insert and each settle one update.
//! CREATE TABLE leads (
//!     id           INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: lease handles name it
//!     lead_id      TEXT    NOT NULL UNIQUE,           -- the lead's ULID
//!     source       TEXT    NOT NULL,
//!     received_at  TEXT    NOT NULL,                  -- RFC 3339, as in the lead's JSON
//!     state        TEXT    NOT NULL,                  -- queued | delivered | dead
//!     lead         TEXT,                              -- QueuedLead JSON (the personal data); NULL once purged
//!     attempt      INTEGER NOT NULL,                  -- the attempt the next lease makes (1 = first);
//!                                                     -- for a dead letter, the attempt it died at
//!     last_error   TEXT,                              -- reason of the previous attempt
//!     available_at INTEGER,                           -- ms: leasable from then on; NULL unless queued
//!     lease_token  INTEGER,                           -- NULL until leased; new random value per lease
//!     history      TEXT    NOT NULL DEFAULT '[]',     -- JSON array of Attempt, oldest first
//!     delivery     TEXT,                              -- Delivery JSON once delivered
//!     dead_reason  TEXT,
//!     dead_at      INTEGER,                           -- ms; set while the lead is a dead letter
//!     purge_at     INTEGER,                           -- ms: `lead` is purged from then on (pii_ttl after delivery)
//!     expires_at   INTEGER                            -- ms: the row goes from then on (record_ttl after
//!                                                     -- delivery or the deletion of its dead letter)
//! );
//! CREATE INDEX leads_available ON leads (available_at, lease_token) WHERE available_at IS NOT NULL;
//! CREATE INDEX leads_dead ON leads (dead_at) WHERE dead_at IS NOT NULL;
//! CREATE INDEX leads_purge ON leads (purge_at) WHERE purge_at IS NOT NULL;
//! CREATE INDEX leads_expiry ON leads (state, expires_at) WHERE expires_at IS NOT NULL;
//! -- Idempotency keys: the first lead queued with each (source, key), and the digest of the
//! -- body it came with (NULL: none, as for platform keys); expired rows are replaced.
//! CREATE TABLE idempotency (source TEXT NOT NULL, key TEXT NOT NULL, first_lead TEXT NOT NULL,
//!                           expires_at INTEGER NOT NULL, body_digest TEXT, UNIQUE (source, key));
//! -- Switches that outlive the process. One row today: name 'operator_pause', value the
//! -- OperatorPause JSON, present while an operator has paused delivery (kept across restarts).
//! CREATE TABLE control (name TEXT PRIMARY KEY, value TEXT NOT NULL);
//! ```
//!
//! `control` was added to version 2 without a version change: it is created when missing, and
//! an older build simply ignores it.
//!
//! One column says when a queued lead may next be leased: a new lead is available at once, a
//! retry when its delay has passed, and a leased lead when its lease expires — so an expired
//! lease is simply leasable again. States, as `stats` counts them: *ready* = not leased and
//! available; *delayed* = not leased and not yet available; *leased* = has a lease token
//! (including expired leases not yet taken again). The oldest ready lead's `available_at` is
//! when it became ready ([`Stats::oldest_ready_ms`]). Delivered and dead leads have no
//! `available_at`, so only queued leads are in the index leases read.
//!
//! A retry is the same row made available again later, with `attempt + 1` unless the attempt
//! does not count, its lease token cleared and the attempt appended to its history. A settle
//! only acts when the row still carries the lease's token, so the settle of a lease that
//! expired and was leased again is ignored — except that a `Delivered` settle always updates
//! the record (the lead *was* delivered), which also takes the lead out of the queue. Reads
//! treat data past `purge_at` and rows past `expires_at` as gone; the writer purges them (and
//! expired idempotency keys) every [`PURGE_EVERY`].
//!
//! `PRAGMA user_version` holds the schema version (2). A database of version 1 (queue entries
//! holding the leads, no records) is upgraded when it holds no queued lead or dead letter, and
//! refused otherwise: let the older leadgate deliver them first. An `idempotency` table without
//! `body_digest` (from before the digest) gets the column; its keys' digests are NULL.
//!
//! Times are wall-clock milliseconds of this host.
//!
//! # Upstream rate limit
//!
//! [`EmbeddedQueue::acquire_upstream`] is a `governor` limiter in this process: one process
//! uses a data directory, so it is the only one calling upstream for this queue.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use chrono::{DateTime, Utc};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rusqlite::{
    Connection, OpenFlags, OptionalExtension, TransactionBehavior, named_params, params,
};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::{
    Attempt, DeadLetter, Delivery, Enqueued, Error, Fsync, IdempotencyKey, LeadRecord, LeadState,
    Lease, LeaseHandle, OperatorPause, QueueSettings, Result, Settle, Stats,
};
use crate::lead::{LeadId, QueuedLead, Work};

/// Commands applied in one transaction.
pub const MAX_BATCH: usize = 1024;
/// How often expired records, purged data and idempotency keys are removed.
pub const PURGE_EVERY: Duration = Duration::from_secs(60);
/// Rows purged per table per pass, so a purge never holds the writer for long.
const PURGE_LIMIT: i64 = 10_000;
const DB_FILE: &str = "queue.sqlite3";
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS leads (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    lead_id      TEXT    NOT NULL UNIQUE,
    source       TEXT    NOT NULL,
    received_at  TEXT    NOT NULL,
    state        TEXT    NOT NULL,
    lead         TEXT,
    attempt      INTEGER NOT NULL,
    last_error   TEXT,
    available_at INTEGER,
    lease_token  INTEGER,
    history      TEXT    NOT NULL DEFAULT '[]',
    delivery     TEXT,
    dead_reason  TEXT,
    dead_at      INTEGER,
    purge_at     INTEGER,
    expires_at   INTEGER
);
CREATE INDEX IF NOT EXISTS leads_available ON leads (available_at, lease_token)
    WHERE available_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS leads_dead ON leads (dead_at) WHERE dead_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS leads_purge ON leads (purge_at) WHERE purge_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS leads_expiry ON leads (state, expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS idempotency (
    source     TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    first_lead TEXT    NOT NULL,
    expires_at INTEGER NOT NULL,
    body_digest TEXT,
    UNIQUE (source, key)
);
CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency (expires_at);
CREATE TABLE IF NOT EXISTS control (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

/// The `control` row of an operator's pause.
const OPERATOR_PAUSE: &str = "operator_pause";

/// The columns of `leads` a [`LeadRecord`] is read from, in [`RecordRow`] order.
const RECORD_COLUMNS: &str = "lead_id, source, received_at, state, history, delivery, dead_reason,
    CASE WHEN purge_at IS NOT NULL AND purge_at <= ?2 THEN NULL ELSE lead END,
    attempt, dead_at";

#[derive(Clone)]
pub struct EmbeddedQueue {
    inner: Arc<Inner>,
}

struct Inner {
    writer: mpsc::Sender<Command>,
    reader: Arc<Mutex<Connection>>,
    /// Woken after every commit that added an entry, so waiting leases look again.
    added: Arc<Notify>,
    /// The upstream rate limit, and the rate it was built for.
    upstream: Mutex<Option<(NonZeroU32, Arc<DefaultDirectRateLimiter>)>>,
    /// Dropped with the queue, which stops the checkpointer thread.
    _stop_checkpoints: mpsc::Sender<()>,
}

/// What the writer thread does.
enum Command {
    Enqueue {
        lead_id: String,
        source: String,
        received_at: String,
        lead: String,
        idempotency: Option<IdempotencyKey>,
        answer: oneshot::Sender<Result<Enqueued>>,
    },
    Lease {
        max: usize,
        answer: oneshot::Sender<Result<Leased>>,
    },
    Settle {
        entry_id: i64,
        lease_token: i64,
        lead_id: String,
        how: SettleRow,
        answer: oneshot::Sender<Result<()>>,
    },
    Revive {
        lead_id: String,
        work: Box<Work>,
        answer: oneshot::Sender<Result<bool>>,
    },
    DeleteDead {
        lead_id: String,
        answer: oneshot::Sender<Result<bool>>,
    },
    /// Sets a `control` row unless it exists (`Some`), or deletes it (`None`); answers whether
    /// the table changed.
    Control {
        name: &'static str,
        value: Option<String>,
        answer: oneshot::Sender<Result<bool>>,
    },
    Ping {
        answer: oneshot::Sender<Result<()>>,
    },
}

enum SettleRow {
    Delivered {
        record: String,
        attempt: Option<String>,
    },
    Retry {
        delay_ms: i64,
        reason: String,
        count_attempt: bool,
        attempt: Option<String>,
        /// The lead with its new work, as JSON.
        lead: Option<String>,
    },
    Dead {
        reason: String,
        attempt: Option<String>,
    },
}

struct Leased {
    token: i64,
    rows: Vec<LeasedRow>,
    /// Milliseconds until the next entry becomes available, if there is any entry.
    next_in_ms: Option<i64>,
}

struct LeasedRow {
    id: i64,
    lead_id: String,
    attempt: u32,
    last_error: Option<String>,
    /// `None` when the lead's data is missing.
    lead: Option<String>,
    history: String,
}

impl EmbeddedQueue {
    pub async fn open(dir: &Path, fsync: Fsync, settings: QueueSettings) -> Result<Self> {
        let dir = dir.to_owned();
        let (writer_conn, reader, checkpointer) = blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::Unavailable(format!("cannot create {}: {e}", dir.display())))?;
            let path = dir.join(DB_FILE);
            let mut writer = Connection::open(&path).map_err(map_sqlite)?;
            prepare_writer(&mut writer, fsync)?;
            let reader = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(map_sqlite)?;
            reader
                .busy_timeout(Duration::from_secs(5))
                .map_err(map_sqlite)?;
            let checkpointer = Connection::open(&path).map_err(map_sqlite)?;
            checkpointer
                .pragma_update(None, "wal_autocheckpoint", 0)
                .map_err(map_sqlite)?;
            Ok((writer, reader, checkpointer))
        })
        .await?;

        let (writer, commands) = mpsc::channel();
        let added = Arc::new(Notify::new());
        let writer_added = added.clone();
        std::thread::Builder::new()
            .name("leadgate-queue-writer".into())
            .spawn(move || run_writer(writer_conn, commands, writer_added, settings))
            .map_err(|e| {
                Error::Other(anyhow::Error::new(e).context("cannot start the queue writer"))
            })?;
        let (stop_checkpoints, stop) = mpsc::channel();
        std::thread::Builder::new()
            .name("leadgate-queue-checkpointer".into())
            .spawn(move || run_checkpointer(checkpointer, stop))
            .map_err(|e| {
                Error::Other(anyhow::Error::new(e).context("cannot start the queue checkpointer"))
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                writer,
                reader: Arc::new(Mutex::new(reader)),
                added,
                upstream: Mutex::new(None),
                _stop_checkpoints: stop_checkpoints,
            }),
        })
    }

    pub async fn enqueue(
        &self,
        lead: &QueuedLead,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<Enqueued> {
        let json = serde_json::to_string(lead).map_err(anyhow::Error::from)?;
        self.call(|answer| Command::Enqueue {
            lead_id: lead.id.to_string(),
            source: lead.source.clone(),
            received_at: timestamp(lead.received_at),
            lead: json,
            idempotency: idempotency.cloned(),
            answer,
        })
        .await
    }

    pub async fn lease(&self, max: usize, wait: Duration) -> Result<Vec<Lease>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + wait;
        loop {
            // Registered before looking, so an enqueue committed in between still wakes us.
            let added = self.inner.added.notified();
            tokio::pin!(added);
            added.as_mut().enable();

            let asked = std::time::Instant::now();
            let leased = self.call(|answer| Command::Lease { max, answer }).await?;
            let token = leased.token;
            let leases: Vec<Lease> = leased
                .rows
                .into_iter()
                .filter_map(|row| decode_lease(row, token, asked))
                .collect();
            let now = Instant::now();
            if !leases.is_empty() || now >= deadline {
                return Ok(leases);
            }
            let mut until = deadline;
            if let Some(ms) = leased.next_in_ms {
                let ms = u64::try_from(ms).unwrap_or(0).max(1);
                until = until.min(now + Duration::from_millis(ms));
            }
            tokio::select! {
                () = &mut added => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    pub async fn settle(&self, lease: Lease, how: Settle) -> Result<()> {
        let LeaseHandle::Embedded {
            entry_id,
            lease_token,
        } = lease.handle
        else {
            return Err(Error::Other(anyhow::anyhow!(
                "a lease of another backend was settled on the embedded queue"
            )));
        };
        let attempt_json = |attempt: Option<Attempt>| attempt.as_ref().map(to_json).transpose();
        let how = match how {
            Settle::Delivered { delivery, attempt } => SettleRow::Delivered {
                record: to_json(&delivery)?,
                attempt: attempt_json(attempt)?,
            },
            Settle::RetryLater {
                delay,
                reason,
                count_attempt,
                attempt,
                work,
            } => SettleRow::Retry {
                delay_ms: i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2),
                reason,
                count_attempt,
                attempt: attempt_json(attempt)?,
                lead: work
                    .map(|work| {
                        to_json(&QueuedLead {
                            work,
                            ..lease.lead.clone()
                        })
                    })
                    .transpose()?,
            },
            Settle::Dead { reason, attempt } => SettleRow::Dead {
                reason,
                attempt: attempt_json(attempt)?,
            },
        };
        self.call(|answer| Command::Settle {
            entry_id,
            lease_token,
            lead_id: lease.lead.id.to_string(),
            how,
            answer,
        })
        .await
    }

    pub async fn delivery_of(&self, id: LeadId) -> Result<Option<Delivery>> {
        let record: Option<String> = self
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT delivery FROM leads
                     WHERE lead_id = ?1 AND state = 'delivered' AND expires_at > ?2",
                )?
                .query_row(params![id.to_string(), now_ms()], |row| row.get(0))
                .optional()
            })
            .await?;
        record.map(|r| from_json(&r, "delivery")).transpose()
    }

    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows: Vec<RecordRow> = self
            .read(move |conn| {
                conn.prepare_cached(&format!(
                    "SELECT {RECORD_COLUMNS} FROM leads WHERE dead_at IS NOT NULL
                     ORDER BY dead_at DESC, rowid DESC LIMIT ?1"
                ))?
                .query_map(params![limit, now_ms()], RecordRow::read)?
                .collect()
            })
            .await?;
        rows.into_iter()
            .filter_map(|row| row.dead_letter().transpose())
            .collect()
    }

    pub async fn stats(&self) -> Result<Stats> {
        self.read(|conn| {
            let now = now_ms();
            let (ready, leased, delayed, oldest): (i64, i64, i64, Option<i64>) = conn
                .prepare_cached(
                    "SELECT
                        COALESCE(SUM(lease_token IS NULL AND available_at <= ?1), 0),
                        COALESCE(SUM(lease_token IS NOT NULL), 0),
                        COALESCE(SUM(lease_token IS NULL AND available_at > ?1), 0),
                        MIN(CASE WHEN lease_token IS NULL AND available_at <= ?1
                                 THEN available_at END)
                     FROM leads WHERE available_at IS NOT NULL",
                )?
                .query_row([now], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                })?;
            let dead: i64 = conn
                .prepare_cached("SELECT COUNT(*) FROM leads WHERE dead_at IS NOT NULL")?
                .query_row([], |row| row.get(0))?;
            let delivered: i64 = conn
                .prepare_cached(
                    "SELECT COUNT(*) FROM leads WHERE state = 'delivered' AND expires_at > ?1",
                )?
                .query_row([now], |row| row.get(0))?;
            let count = |n: i64| u64::try_from(n).unwrap_or(0);
            Ok(Stats {
                ready: count(ready),
                leased: count(leased),
                delayed: count(delayed),
                dead: count(dead),
                delivered: count(delivered),
                oldest_ready_ms: oldest.map_or(0, |at| count(now - at)),
            })
        })
        .await
    }

    pub async fn lead(&self, id: LeadId) -> Result<Option<LeadRecord>> {
        let row: Option<RecordRow> = self
            .read(move |conn| {
                conn.prepare_cached(&format!(
                    "SELECT {RECORD_COLUMNS} FROM leads
                     WHERE lead_id = ?1 AND (expires_at IS NULL OR expires_at > ?2)"
                ))?
                .query_row(params![id.to_string(), now_ms()], RecordRow::read)
                .optional()
            })
            .await?;
        row.map(RecordRow::record).transpose()
    }

    pub async fn dead_letter(&self, id: LeadId) -> Result<Option<DeadLetter>> {
        let row: Option<RecordRow> = self
            .read(move |conn| {
                conn.prepare_cached(&format!(
                    "SELECT {RECORD_COLUMNS} FROM leads
                     WHERE lead_id = ?1 AND dead_at IS NOT NULL"
                ))?
                .query_row(params![id.to_string(), now_ms()], RecordRow::read)
                .optional()
            })
            .await?;
        Ok(row.map(RecordRow::dead_letter).transpose()?.flatten())
    }

    pub async fn revive(&self, id: LeadId, work: Work) -> Result<bool> {
        self.call(|answer| Command::Revive {
            lead_id: id.to_string(),
            work: Box::new(work),
            answer,
        })
        .await
    }

    pub async fn delete_dead(&self, id: LeadId) -> Result<bool> {
        self.call(|answer| Command::DeleteDead {
            lead_id: id.to_string(),
            answer,
        })
        .await
    }

    /// In this process only (one process per data directory).
    pub async fn acquire_upstream(&self, per_second: NonZeroU32) -> Result<Duration> {
        let limiter = {
            let mut upstream = self
                .inner
                .upstream
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match &*upstream {
                Some((rate, limiter)) if *rate == per_second => limiter.clone(),
                _ => {
                    // One slot per period and no burst, like the Redis limiter.
                    let quota = Quota::per_second(per_second).allow_burst(NonZeroU32::MIN);
                    let limiter = Arc::new(RateLimiter::direct(quota));
                    *upstream = Some((per_second, limiter.clone()));
                    limiter
                }
            }
        };
        Ok(match limiter.check() {
            Ok(()) => Duration::ZERO,
            Err(not_until) => not_until.wait_time_from(DefaultClock::default().now()),
        })
    }

    pub async fn pause_delivery(&self, pause: &OperatorPause) -> Result<OperatorPause> {
        let value = serde_json::to_string(pause).map_err(anyhow::Error::from)?;
        self.call(|answer| Command::Control {
            name: OPERATOR_PAUSE,
            value: Some(value),
            answer,
        })
        .await?;
        // Read back: a pause already in force was kept, with its own time.
        Ok(self
            .operator_pause()
            .await?
            .unwrap_or_else(|| pause.clone()))
    }

    pub async fn resume_delivery(&self) -> Result<bool> {
        self.call(|answer| Command::Control {
            name: OPERATOR_PAUSE,
            value: None,
            answer,
        })
        .await
    }

    pub async fn operator_pause(&self) -> Result<Option<OperatorPause>> {
        let stored: Option<String> = self
            .read(|conn| {
                conn.prepare_cached("SELECT value FROM control WHERE name = ?1")?
                    .query_row(params![OPERATOR_PAUSE], |row| row.get(0))
                    .optional()
            })
            .await?;
        stored
            .map(|json| from_json(&json, "operator pause"))
            .transpose()
    }

    /// SQLite's durability is set by this process (`LEADGATE_EMBEDDED_FSYNC`), not by a server
    /// whose settings could surprise us.
    pub async fn durability_warning(&self) -> Result<Option<String>> {
        Ok(None)
    }

    /// Goes through the writer, so it also proves the writer thread is alive.
    pub async fn ping(&self) -> Result<()> {
        self.call(|answer| Command::Ping { answer }).await
    }

    /// Hands a command to the writer thread and waits for its answer.
    async fn call<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T>>) -> Command,
    ) -> Result<T> {
        let (answer, answered) = oneshot::channel();
        self.inner
            .writer
            .send(command(answer))
            .map_err(|_| writer_stopped())?;
        answered.await.map_err(|_| writer_stopped())?
    }

    async fn read<T: Send + 'static>(
        &self,
        query: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let reader = self.inner.reader.clone();
        blocking(move || {
            let conn = reader
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            query(&conn).map_err(map_sqlite)
        })
        .await
    }
}

fn prepare_writer(conn: &mut Connection, fsync: Fsync) -> Result<()> {
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(map_sqlite)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(map_sqlite)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Other(anyhow::anyhow!(
            "the queue database could not switch to WAL mode (it is in {mode} mode)"
        )));
    }
    // FULL syncs the WAL on every commit: an acknowledged enqueue survives a power loss, not
    // only a crash of this process; group commit pays for it. NORMAL writes the WAL without
    // syncing; the checkpointer syncs it several times a second.
    let synchronous = match fsync {
        Fsync::Always => "FULL",
        Fsync::Everysec => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", synchronous)
        .map_err(map_sqlite)?;
    // The checkpointer thread copies WAL pages back continuously from its own connection (see
    // `run_checkpointer`), but under sustained load it never catches the writer, and only a
    // checkpoint that has caught up lets the WAL restart from its beginning. So the writer
    // still checkpoints every ~40 MB of WAL; most pages are already copied by then, so that
    // pause is short. The WAL is cut back to this size after a restart.
    conn.pragma_update(None, "wal_autocheckpoint", 10_000)
        .map_err(map_sqlite)?;
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)
        .map_err(map_sqlite)?;
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(map_sqlite)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(map_sqlite)?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(map_sqlite)?;
    if version > SCHEMA_VERSION {
        return Err(Error::Other(anyhow::anyhow!(
            "the queue database has schema version {version}, newer than this build knows ({SCHEMA_VERSION})"
        )));
    }
    if version == 1 {
        upgrade_from_v1(&tx)?;
    }
    tx.execute_batch(SCHEMA).map_err(map_sqlite)?;
    add_body_digest_column(&tx)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(map_sqlite)?;
    tx.commit().map_err(map_sqlite)
}

/// Adds `idempotency.body_digest` to a table made before it existed (`CREATE TABLE IF NOT
/// EXISTS` leaves such a table as it was).
fn add_body_digest_column(tx: &Connection) -> Result<()> {
    let has_it: bool = tx
        .query_row(
            "SELECT COUNT(*) FROM pragma_table_info('idempotency') WHERE name = 'body_digest'",
            [],
            |row| row.get::<_, i64>(0),
        )
        .map(|n| n > 0)
        .map_err(map_sqlite)?;
    if !has_it {
        tx.execute_batch("ALTER TABLE idempotency ADD COLUMN body_digest TEXT")
            .map_err(map_sqlite)?;
    }
    Ok(())
}

/// Version 1 kept each lead's data in its entry and had no records. Its tables are replaced
/// when they hold no lead still to deliver; its delivered records then protect nothing (no
/// entry can be redelivered) and go with them.
fn upgrade_from_v1(tx: &Connection) -> Result<()> {
    let waiting: i64 = tx
        .query_row(
            "SELECT (SELECT COUNT(*) FROM entries) + (SELECT COUNT(*) FROM dead_letters)",
            [],
            |row| row.get(0),
        )
        .map_err(map_sqlite)?;
    if waiting > 0 {
        return Err(Error::Other(anyhow::anyhow!(
            "the queue database holds {waiting} queued leads or dead letters in the format of an \
             older leadgate (schema version 1); let that version deliver them (or move the \
             database away), then start this one"
        )));
    }
    tx.execute_batch("DROP TABLE entries; DROP TABLE dead_letters; DROP TABLE IF EXISTS delivered;")
        .map_err(map_sqlite)
}

/// The writer thread: group-commits commands until every [`EmbeddedQueue`] clone is dropped.
fn run_writer(
    mut conn: Connection,
    commands: mpsc::Receiver<Command>,
    added: Arc<Notify>,
    settings: QueueSettings,
) {
    let mut last_purge = std::time::Instant::now();
    loop {
        let first = match commands.recv_timeout(PURGE_EVERY) {
            Ok(command) => command,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                purge(&mut conn);
                last_purge = std::time::Instant::now();
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match commands.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        if apply_batch(&mut conn, batch, &settings) {
            added.notify_waiters();
        }
        if last_purge.elapsed() >= PURGE_EVERY {
            purge(&mut conn);
            last_purge = std::time::Instant::now();
        }
    }
}

/// How often the checkpointer runs. With [`Fsync::Everysec`] this bounds how long a commit
/// may stay off the disk.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);

/// Checkpoints from its own connection, so the writer never stalls copying WAL pages into the
/// database (that stall was most of the enqueue tail latency). A passive checkpoint first
/// syncs the WAL — making every commit so far durable, which is what [`Fsync::Everysec`]
/// relies on — then copies what no reader still needs, without blocking the writer. Stops,
/// after a last checkpoint, when the queue is dropped.
fn run_checkpointer(conn: Connection, stop: mpsc::Receiver<()>) {
    loop {
        let stopping = !matches!(
            stop.recv_timeout(CHECKPOINT_EVERY),
            Err(mpsc::RecvTimeoutError::Timeout)
        );
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "The embedded queue's checkpoint failed; retrying.");
        }
        if stopping {
            return;
        }
    }
}

/// The result of one command, held until the batch commits.
enum Outcome {
    Enqueued(Result<Enqueued>),
    Leased(Result<Leased>),
    Done(Result<()>),
    Changed(Result<bool>),
}

impl Outcome {
    fn is_err(&self) -> bool {
        match self {
            Outcome::Enqueued(r) => r.is_err(),
            Outcome::Leased(r) => r.is_err(),
            Outcome::Done(r) => r.is_err(),
            Outcome::Changed(r) => r.is_err(),
        }
    }

    /// Whether the command made an entry ready or due later (waiting leases should look again).
    fn added_entry(&self, command: &Command) -> bool {
        matches!(
            (command, self),
            (
                Command::Enqueue { .. },
                Outcome::Enqueued(Ok(Enqueued::Queued))
            ) | (
                Command::Settle {
                    how: SettleRow::Retry { .. },
                    ..
                },
                Outcome::Done(Ok(())),
            ) | (Command::Revive { .. }, Outcome::Changed(Ok(true)))
        )
    }
}

/// Applies a batch in one transaction and answers every command. Returns whether an entry was
/// added (waiting leases should look again).
///
/// The batch first runs without savepoints (they cost a sub-journal copy of every page
/// touched). If any command fails, that transaction is rolled back and the batch runs again
/// with one savepoint per command, so the failure undoes only its own command.
fn apply_batch(conn: &mut Connection, batch: Vec<Command>, settings: &QueueSettings) -> bool {
    let outcomes = match run_batch(conn, &batch, settings, false) {
        Ok(outcomes) if !outcomes.iter().any(Outcome::is_err) => Ok(outcomes),
        _ => run_batch(conn, &batch, settings, true),
    };
    match outcomes {
        Ok(outcomes) => {
            let added = batch
                .iter()
                .zip(&outcomes)
                .any(|(command, outcome)| outcome.added_entry(command));
            for (command, outcome) in batch.into_iter().zip(outcomes) {
                answer(command, outcome);
            }
            added
        }
        Err(e) => {
            tracing::error!(error = %e, commands = batch.len(), "The queue could not commit a batch.");
            for command in batch {
                answer(command, Outcome::Done(Err(copy_error(&e))));
            }
            false
        }
    }
}

/// Runs every command in one transaction and commits it; the outcomes are only valid if the
/// commit succeeded (the `Ok`). Without savepoints, a failed command leaves the transaction
/// uncommitted (rolled back on drop).
fn run_batch(
    conn: &mut Connection,
    batch: &[Command],
    settings: &QueueSettings,
    savepoints: bool,
) -> Result<Vec<Outcome>> {
    let now = now_ms();
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2);
    let retention = Retention {
        pii_ms: ms(settings.pii_ttl.min(settings.record_ttl)),
        record_ms: ms(settings.record_ttl),
    };
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(map_sqlite)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for command in batch {
        let outcome = match command {
            Command::Enqueue {
                lead_id,
                source,
                received_at,
                lead,
                idempotency,
                ..
            } => Outcome::Enqueued(guarded(&tx, savepoints, |conn| {
                let row = NewLead {
                    lead_id,
                    source,
                    received_at,
                    lead,
                };
                enqueue(
                    conn,
                    now,
                    ms(settings.idempotency_ttl),
                    &row,
                    idempotency.as_ref(),
                )
            })),
            Command::Lease { max, .. } => Outcome::Leased(guarded(&tx, savepoints, |conn| {
                lease(conn, now, ms(settings.lease_timeout), *max)
            })),
            Command::Settle {
                entry_id,
                lease_token,
                lead_id,
                how,
                ..
            } => Outcome::Done(guarded(&tx, savepoints, |conn| {
                settle(conn, now, retention, *entry_id, *lease_token, lead_id, how)
            })),
            Command::Revive { lead_id, work, .. } => {
                Outcome::Changed(guarded(&tx, savepoints, |conn| {
                    revive(conn, now, lead_id, work)
                }))
            }
            Command::DeleteDead { lead_id, .. } => {
                Outcome::Changed(guarded(&tx, savepoints, |conn| {
                    delete_dead(conn, now, retention, lead_id)
                }))
            }
            Command::Control { name, value, .. } => {
                Outcome::Changed(guarded(&tx, savepoints, |conn| {
                    control(conn, name, value.as_deref())
                }))
            }
            Command::Ping { .. } => Outcome::Done(Ok(())),
        };
        if !savepoints && outcome.is_err() {
            return Ok(vec![outcome]);
        }
        outcomes.push(outcome);
    }
    tx.commit().map_err(map_sqlite)?;
    Ok(outcomes)
}

/// Runs one command, inside its own savepoint when asked: then a failure undoes only its own
/// writes.
fn guarded<T>(
    conn: &Connection,
    savepoint: bool,
    run: impl FnOnce(&Connection) -> Result<T>,
) -> Result<T> {
    if !savepoint {
        return run(conn);
    }
    let exec = |sql: &str| {
        conn.prepare_cached(sql)
            .and_then(|mut s| s.execute([]))
            .map_err(map_sqlite)
    };
    exec("SAVEPOINT command")?;
    let out = run(conn);
    if out.is_err() {
        exec("ROLLBACK TO command")?;
    }
    exec("RELEASE command")?;
    out
}

fn answer(command: Command, outcome: Outcome) {
    // A caller that stopped waiting (its request was cancelled) is no error. A mismatch cannot
    // happen (outcomes are built from their commands); it would answer an error, never panic.
    fn mismatch<T>() -> Result<T> {
        Err(Error::Other(anyhow::anyhow!("queue outcome mismatch")))
    }
    let _ = match (command, outcome) {
        (Command::Enqueue { answer, .. }, Outcome::Enqueued(r)) => answer.send(r).map_err(drop),
        (Command::Lease { answer, .. }, Outcome::Leased(r)) => answer.send(r).map_err(drop),
        (Command::Settle { answer, .. } | Command::Ping { answer }, Outcome::Done(r)) => {
            answer.send(r).map_err(drop)
        }
        (
            Command::Revive { answer, .. }
            | Command::DeleteDead { answer, .. }
            | Command::Control { answer, .. },
            Outcome::Changed(r),
        ) => answer.send(r).map_err(drop),
        (command, Outcome::Done(Err(e))) => fail(command, &e),
        (command, _) => fail(command, &mismatch::<()>().unwrap_err()),
    };
}

fn fail(command: Command, e: &Error) -> std::result::Result<(), ()> {
    match command {
        Command::Enqueue { answer, .. } => answer.send(Err(copy_error(e))).map_err(drop),
        Command::Lease { answer, .. } => answer.send(Err(copy_error(e))).map_err(drop),
        Command::Settle { answer, .. } | Command::Ping { answer } => {
            answer.send(Err(copy_error(e))).map_err(drop)
        }
        Command::Revive { answer, .. }
        | Command::DeleteDead { answer, .. }
        | Command::Control { answer, .. } => answer.send(Err(copy_error(e))).map_err(drop),
    }
}

/// How long data and records are kept after delivery, in ms.
#[derive(Clone, Copy)]
struct Retention {
    pii_ms: i64,
    record_ms: i64,
}

/// A lead to enqueue, as its columns.
struct NewLead<'a> {
    lead_id: &'a str,
    source: &'a str,
    received_at: &'a str,
    lead: &'a str,
}

fn enqueue(
    conn: &Connection,
    now: i64,
    idempotency_ms: i64,
    row: &NewLead<'_>,
    idempotency: Option<&IdempotencyKey>,
) -> Result<Enqueued> {
    if let Some(key) = idempotency {
        // Claims the key unless a live claim exists: one statement in the common (new key)
        // case; an expired claim is taken over.
        let claimed = conn
            .prepare_cached(
                "INSERT INTO idempotency (source, key, first_lead, expires_at, body_digest)
                 VALUES (?1, ?2, ?3, ?4, ?6)
                 ON CONFLICT (source, key) DO UPDATE
                 SET first_lead = excluded.first_lead, expires_at = excluded.expires_at,
                     body_digest = excluded.body_digest
                 WHERE idempotency.expires_at <= ?5",
            )
            .and_then(|mut s| {
                s.execute(params![
                    key.source,
                    key.key,
                    row.lead_id,
                    now.saturating_add(idempotency_ms),
                    now,
                    key.body_digest
                ])
            })
            .map_err(map_sqlite)?;
        if claimed == 0 {
            let (first, digest): (String, Option<String>) = conn
                .prepare_cached(
                    "SELECT first_lead, body_digest FROM idempotency WHERE source = ?1 AND key = ?2",
                )
                .and_then(|mut s| {
                    s.query_row(params![key.source, key.key], |row| {
                        Ok((row.get(0)?, row.get(1)?))
                    })
                })
                .map_err(map_sqlite)?;
            let first = first.parse().map_err(|e| {
                Error::Other(anyhow::Error::new(e).context("corrupt idempotency record"))
            })?;
            return Ok(key.repeat(first, digest.as_deref()));
        }
    }
    conn.prepare_cached(
        "INSERT INTO leads (lead_id, source, received_at, state, lead, attempt, available_at)
         VALUES (?1, ?2, ?3, 'queued', ?4, 1, ?5)",
    )
    .and_then(|mut s| {
        s.execute(params![
            row.lead_id,
            row.source,
            row.received_at,
            row.lead,
            now
        ])
    })
    .map_err(map_sqlite)?;
    Ok(Enqueued::Queued)
}

fn lease(conn: &Connection, now: i64, lease_ms: i64, max: usize) -> Result<Leased> {
    let token: i64 = rand::random();
    let max = i64::try_from(max).unwrap_or(i64::MAX);
    let rows = conn
        .prepare_cached(
            "UPDATE leads SET lease_token = ?1, available_at = ?2
             WHERE id IN (SELECT id FROM leads WHERE available_at <= ?3
                          ORDER BY available_at, id LIMIT ?4)
             RETURNING id, lead_id, attempt, last_error, lead, history",
        )
        .and_then(|mut s| {
            s.query_map(
                params![token, now.saturating_add(lease_ms), now, max],
                |row| {
                    Ok(LeasedRow {
                        id: row.get(0)?,
                        lead_id: row.get(1)?,
                        attempt: row.get(2)?,
                        last_error: row.get(3)?,
                        lead: row.get(4)?,
                        history: row.get(5)?,
                    })
                },
            )?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(map_sqlite)?;
    let next: Option<i64> = conn
        .prepare_cached("SELECT MIN(available_at) FROM leads WHERE available_at IS NOT NULL")
        .and_then(|mut s| s.query_row([], |row| row.get(0)))
        .map_err(map_sqlite)?;
    Ok(Leased {
        token,
        rows,
        next_in_ms: next.map(|at| (at - now).max(0)),
    })
}

/// SQL appending the `:attempt` JSON, when not NULL, to a record's history.
macro_rules! append_history {
    () => {
        "CASE WHEN :attempt IS NULL THEN history
              ELSE json_insert(history, '$[#]', json(:attempt)) END"
    };
}

fn settle(
    conn: &Connection,
    now: i64,
    retention: Retention,
    entry_id: i64,
    lease_token: i64,
    lead_id: &str,
    how: &SettleRow,
) -> Result<()> {
    let run = |sql: &str, values: &[(&str, &dyn rusqlite::ToSql)]| -> Result<usize> {
        conn.prepare_cached(sql)
            .and_then(|mut s| s.execute(values))
            .map_err(map_sqlite)
    };
    let applied = match how {
        SettleRow::Delivered { record, attempt } => {
            let held: bool = conn
                .prepare_cached("SELECT lease_token IS ?2 FROM leads WHERE id = ?1")
                .and_then(|mut s| {
                    s.query_row(params![entry_id, lease_token], |row| row.get(0))
                        .optional()
                })
                .map_err(map_sqlite)?
                .unwrap_or(false);
            // Recorded even when the lease is stale: the lead *was* delivered. This also takes
            // it out of the queue, so no other lease hands it out again.
            run(
                concat!(
                    "UPDATE leads SET state = 'delivered', delivery = :delivery,
                        available_at = NULL, lease_token = NULL, dead_at = NULL,
                        purge_at = COALESCE(purge_at, :purge_at), expires_at = :expires_at,
                        history = ",
                    append_history!(),
                    " WHERE id = :id"
                ),
                named_params! {
                    ":id": entry_id,
                    ":delivery": record,
                    ":purge_at": now.saturating_add(retention.pii_ms),
                    ":expires_at": now.saturating_add(retention.record_ms),
                    ":attempt": attempt,
                },
            )?;
            held
        }
        SettleRow::Retry {
            delay_ms,
            reason,
            count_attempt,
            attempt,
            lead,
        } => {
            let increment = i64::from(*count_attempt);
            run(
                concat!(
                    "UPDATE leads SET attempt = attempt + :increment, last_error = :reason,
                        available_at = :available_at, lease_token = NULL,
                        lead = COALESCE(:lead, lead), history = ",
                    append_history!(),
                    " WHERE id = :id AND lease_token = :token AND state = 'queued'"
                ),
                named_params! {
                    ":id": entry_id,
                    ":token": lease_token,
                    ":increment": increment,
                    ":reason": reason,
                    ":available_at": now.saturating_add(*delay_ms),
                    ":lead": lead,
                    ":attempt": attempt,
                },
            )? == 1
        }
        SettleRow::Dead { reason, attempt } => {
            run(
                concat!(
                    "UPDATE leads SET state = 'dead', dead_reason = :reason, dead_at = :now,
                        available_at = NULL, lease_token = NULL, history = ",
                    append_history!(),
                    " WHERE id = :id AND lease_token = :token AND state = 'queued'"
                ),
                named_params! {
                    ":id": entry_id,
                    ":token": lease_token,
                    ":reason": reason,
                    ":now": now,
                    ":attempt": attempt,
                },
            )? == 1
        }
    };
    if !applied {
        tracing::info!(
            lead_id,
            "A settle came from a lease that had expired and been taken again; it was ignored."
        );
    }
    Ok(())
}

/// Returns false when the lead is not a dead letter. The history gains the replay's entry and
/// the next attempt is numbered after the last one made (see [`super::replay_entry`]).
fn revive(conn: &Connection, now: i64, lead_id: &str, work: &Work) -> Result<bool> {
    let row: Option<(Option<String>, String)> = conn
        .prepare_cached(
            "SELECT lead, history FROM leads WHERE lead_id = ?1 AND dead_at IS NOT NULL",
        )
        .and_then(|mut s| {
            s.query_row([lead_id], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()
        })
        .map_err(map_sqlite)?;
    let Some((Some(lead), history)) = row else {
        return Ok(false);
    };
    let lead: QueuedLead = from_json(&lead, "dead letter")?;
    let history =
        parse_history(&history).map_err(|e| Error::Other(e.context("corrupt history")))?;
    let replayed_at = Utc::now();
    let (entry, next_attempt) = super::replay_entry(&history, replayed_at);
    let revived = to_json(&QueuedLead {
        work: work.clone(),
        replayed_at: Some(replayed_at),
        ..lead
    })?;
    let entry = to_json(&entry)?;
    conn.prepare_cached(concat!(
        "UPDATE leads SET state = 'queued', lead = :lead, attempt = :next, last_error = NULL,
            available_at = :now, lease_token = NULL, dead_at = NULL, dead_reason = NULL,
            history = ",
        append_history!(),
        " WHERE lead_id = :lead_id"
    ))
    .and_then(|mut s| {
        s.execute(named_params! {
            ":lead_id": lead_id,
            ":lead": revived,
            ":next": next_attempt,
            ":now": now,
            ":attempt": entry,
        })
    })
    .map_err(map_sqlite)?;
    Ok(true)
}

/// Drops a dead letter's data at once; its record stays for `record_ttl`.
fn delete_dead(conn: &Connection, now: i64, retention: Retention, lead_id: &str) -> Result<bool> {
    let changed = conn
        .prepare_cached(
            "UPDATE leads SET lead = NULL, dead_at = NULL, purge_at = NULL, expires_at = ?2
             WHERE lead_id = ?1 AND dead_at IS NOT NULL",
        )
        .and_then(|mut s| s.execute(params![lead_id, now.saturating_add(retention.record_ms)]))
        .map_err(map_sqlite)?;
    Ok(changed == 1)
}

fn control(conn: &Connection, name: &str, value: Option<&str>) -> Result<bool> {
    let changed = match value {
        Some(value) => conn
            .prepare_cached("INSERT OR IGNORE INTO control (name, value) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![name, value])),
        None => conn
            .prepare_cached("DELETE FROM control WHERE name = ?1")
            .and_then(|mut s| s.execute(params![name])),
    }
    .map_err(map_sqlite)?;
    Ok(changed == 1)
}

fn purge(conn: &mut Connection) {
    let now = now_ms();
    let run = |sql: &str| conn.execute(sql, params![now, PURGE_LIMIT]);
    let purged = run("DELETE FROM idempotency WHERE rowid IN
                      (SELECT rowid FROM idempotency WHERE expires_at <= ?1 LIMIT ?2)")
    .and_then(|keys| {
        let data = run(
            "UPDATE leads SET lead = NULL, purge_at = NULL WHERE rowid IN
                            (SELECT rowid FROM leads WHERE purge_at <= ?1 LIMIT ?2)",
        )?;
        let records = run("DELETE FROM leads WHERE rowid IN
                               (SELECT rowid FROM leads WHERE state IN ('delivered', 'dead')
                                AND expires_at <= ?1 LIMIT ?2)")?;
        Ok((keys, data, records))
    });
    match purged {
        Ok((keys, data, records)) if keys + data + records > 0 => tracing::debug!(
            idempotency_keys = keys,
            lead_data = data,
            lead_records = records,
            "Expired queue records were purged."
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "Expired queue records could not be purged."),
    }
}

/// A lead whose record cannot be read is logged and skipped: its entry stays leased, so it is
/// never lost, and comes back (and is logged again) after each lease timeout until an
/// operator removes it.
fn decode_lease(row: LeasedRow, lease_token: i64, asked: std::time::Instant) -> Option<Lease> {
    let decoded = row
        .lead
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("the lead has no data"))
        .and_then(|lead| Ok(serde_json::from_str::<QueuedLead>(lead)?))
        .and_then(|lead| Ok((lead, parse_history(&row.history)?)));
    match decoded {
        Ok((lead, history)) => Some(Lease {
            lead,
            attempt: row.attempt,
            last_error: row.last_error,
            history,
            leased_at: asked,
            handle: LeaseHandle::Embedded {
                entry_id: row.id,
                lease_token,
            },
        }),
        Err(e) => {
            tracing::error!(entry_id = row.id, lead_id = row.lead_id, error = %e, "A queue entry could not be read; it is left leased.");
            None
        }
    }
}

/// One row of [`RECORD_COLUMNS`].
struct RecordRow {
    lead_id: String,
    source: String,
    received_at: String,
    state: String,
    history: String,
    delivery: Option<String>,
    dead_reason: Option<String>,
    lead: Option<String>,
    attempts: u32,
    dead_at: Option<i64>,
}

impl RecordRow {
    fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            lead_id: row.get(0)?,
            source: row.get(1)?,
            received_at: row.get(2)?,
            state: row.get(3)?,
            history: row.get(4)?,
            delivery: row.get(5)?,
            dead_reason: row.get(6)?,
            lead: row.get(7)?,
            attempts: row.get(8)?,
            dead_at: row.get(9)?,
        })
    }

    fn record(self) -> Result<LeadRecord> {
        let corrupt = |e: anyhow::Error| {
            Error::Other(e.context(format!("corrupt record of lead {}", self.lead_id)))
        };
        let state = match self.state.as_str() {
            "queued" => LeadState::Queued,
            "delivered" => LeadState::Delivered,
            "dead" => LeadState::Dead,
            other => return Err(corrupt(anyhow::anyhow!("unknown state {other:?}"))),
        };
        Ok(LeadRecord {
            id: self
                .lead_id
                .parse()
                .map_err(|e| corrupt(anyhow::Error::new(e)))?,
            received_at: DateTime::parse_from_rfc3339(&self.received_at)
                .map_err(|e| corrupt(anyhow::Error::new(e)))?
                .with_timezone(&Utc),
            state,
            attempts: parse_history(&self.history).map_err(corrupt)?,
            delivery: self
                .delivery
                .as_deref()
                .map(|d| from_json(d, "delivery"))
                .transpose()?,
            dead_reason: self.dead_reason.clone(),
            work: self
                .lead
                .as_deref()
                .map(|l| from_json::<QueuedLead>(l, "lead").map(|lead| lead.work))
                .transpose()?,
            source: self.source,
        })
    }

    /// `None` when the dead letter's data is gone.
    fn dead_letter(self) -> Result<Option<DeadLetter>> {
        let Some(lead) = self.lead.as_deref() else {
            return Ok(None);
        };
        Ok(Some(DeadLetter {
            lead: from_json(lead, "dead letter")?,
            attempts: self.attempts,
            reason: self.dead_reason.unwrap_or_default(),
            at: DateTime::<Utc>::from_timestamp_millis(self.dead_at.unwrap_or(0))
                .unwrap_or_default(),
            history: parse_history(&self.history).map_err(|e| {
                Error::Other(e.context(format!("corrupt record of lead {}", self.lead_id)))
            })?,
        }))
    }
}

fn parse_history(json: &str) -> anyhow::Result<Vec<Attempt>> {
    if json.is_empty() {
        return Ok(Vec::new());
    }
    Ok(serde_json::from_str(json)?)
}

/// The lead's receipt time as stored in its record: RFC 3339, as in the lead's JSON.
fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String> {
    Ok(serde_json::to_string(value).map_err(anyhow::Error::from)?)
}

fn from_json<T: serde::de::DeserializeOwned>(json: &str, what: &str) -> Result<T> {
    serde_json::from_str(json)
        .map_err(|e| Error::Other(anyhow::Error::new(e).context(format!("corrupt {what} record"))))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Other(anyhow::Error::new(e).context("queue task failed")))?
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn writer_stopped() -> Error {
    Error::Unavailable("the embedded queue writer stopped".into())
}

/// A full disk, an I/O error or a locked database is [`Error::Unavailable`] (a 503: try later);
/// anything else points at a bug or corruption.
fn map_sqlite(e: rusqlite::Error) -> Error {
    use rusqlite::ErrorCode::*;
    match e.sqlite_error_code() {
        Some(
            DatabaseBusy | DatabaseLocked | SystemIoFailure | DiskFull | CannotOpen | ReadOnly
            | PermissionDenied | OutOfMemory,
        ) => Error::Unavailable(format!("sqlite: {e}")),
        _ => Error::Other(anyhow::Error::new(e).context("embedded queue")),
    }
}

fn copy_error(e: &Error) -> Error {
    match e {
        Error::Unavailable(reason) => Error::Unavailable(reason.clone()),
        Error::Other(e) => Error::Other(anyhow::anyhow!("{e:#}")),
    }
}
