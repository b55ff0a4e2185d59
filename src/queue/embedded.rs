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
//! -- Queued leads: ready, leased or delayed.
//! CREATE TABLE entries (
//!     id           INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: lease handles name it
//!     lead_id      TEXT    NOT NULL,                  -- the lead's ULID
//!     lead         TEXT    NOT NULL,                  -- QueuedLead as JSON
//!     attempt      INTEGER NOT NULL,                  -- the attempt the next lease makes (1 = first)
//!     last_error   TEXT,                              -- reason of the previous attempt
//!     available_at INTEGER NOT NULL,                  -- ms since the epoch: leasable from then on
//!     lease_token  INTEGER                            -- NULL until leased; new random value per lease
//! );
//! CREATE INDEX entries_available ON entries (available_at);
//! ```
//!
//! One column says when an entry may next be leased: a new entry is available at once, a
//! retry copy when its delay has passed, and a leased entry when its lease expires — so an
//! expired lease is simply leasable again. States, as `stats` counts them: *ready* = not
//! leased and available; *delayed* = not leased and not yet available; *leased* = has a
//! lease token (including expired leases not yet taken again).
//!
//! ```sql
//! -- What Onpipeline answered for delivered leads; rows past expires_at are ignored and purged.
//! CREATE TABLE delivered (lead_id TEXT PRIMARY KEY, delivery TEXT NOT NULL, expires_at INTEGER NOT NULL);
//! -- Idempotency keys: the first lead queued with each (source, key); expired rows are replaced.
//! CREATE TABLE idempotency (source TEXT NOT NULL, key TEXT NOT NULL, first_lead TEXT NOT NULL,
//!                           expires_at INTEGER NOT NULL, UNIQUE (source, key));
//! -- Dead letters, newest last; kept until an operator removes them.
//! CREATE TABLE dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, lead_id TEXT NOT NULL,
//!                            lead TEXT NOT NULL, attempts INTEGER NOT NULL, reason TEXT NOT NULL,
//!                            at INTEGER NOT NULL);
//! ```
//!
//! A retry deletes the leased row and inserts a new copy (attempt + 1 unless the attempt does
//! not count) in the same savepoint; a settle only acts when the row still carries the lease's
//! token, so the settle of a lease that expired and was leased again is ignored — except that a
//! `Delivered` settle always writes the delivered record. The writer purges expired delivered
//! records and idempotency keys every [`PURGE_EVERY`].
//!
//! Times are wall-clock milliseconds of this host.

use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::{
    DeadLetter, Delivery, Enqueued, Error, Fsync, IdempotencyKey, Lease, LeaseHandle,
    QueueSettings, Result, Settle, Stats,
};
use crate::lead::{LeadId, QueuedLead};

/// Commands applied in one transaction.
pub const MAX_BATCH: usize = 1024;
/// How often expired delivered records and idempotency keys are purged.
pub const PURGE_EVERY: Duration = Duration::from_secs(60);
/// Rows purged per table per pass, so a purge never holds the writer for long.
const PURGE_LIMIT: i64 = 10_000;
const DB_FILE: &str = "queue.sqlite3";
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS entries (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    lead_id      TEXT    NOT NULL,
    lead         TEXT    NOT NULL,
    attempt      INTEGER NOT NULL,
    last_error   TEXT,
    available_at INTEGER NOT NULL,
    lease_token  INTEGER
);
CREATE INDEX IF NOT EXISTS entries_available ON entries (available_at);
CREATE TABLE IF NOT EXISTS delivered (
    lead_id    TEXT PRIMARY KEY,
    delivery   TEXT    NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS delivered_expiry ON delivered (expires_at);
CREATE TABLE IF NOT EXISTS idempotency (
    source     TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    first_lead TEXT    NOT NULL,
    expires_at INTEGER NOT NULL,
    UNIQUE (source, key)
);
CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency (expires_at);
CREATE TABLE IF NOT EXISTS dead_letters (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    lead_id  TEXT    NOT NULL,
    lead     TEXT    NOT NULL,
    attempts INTEGER NOT NULL,
    reason   TEXT    NOT NULL,
    at       INTEGER NOT NULL
);
";

#[derive(Clone)]
pub struct EmbeddedQueue {
    inner: Arc<Inner>,
}

struct Inner {
    writer: mpsc::Sender<Command>,
    reader: Arc<Mutex<Connection>>,
    /// Woken after every commit that added an entry, so waiting leases look again.
    added: Arc<Notify>,
    /// Dropped with the queue, which stops the checkpointer thread.
    _stop_checkpoints: mpsc::Sender<()>,
}

/// What the writer thread does.
enum Command {
    Enqueue {
        lead_id: String,
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
    Ping {
        answer: oneshot::Sender<Result<()>>,
    },
}

enum SettleRow {
    Delivered {
        record: String,
    },
    Retry {
        delay_ms: i64,
        reason: String,
        count_attempt: bool,
    },
    Dead {
        reason: String,
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
    lead: String,
    attempt: u32,
    last_error: Option<String>,
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

            let leased = self.call(|answer| Command::Lease { max, answer }).await?;
            let token = leased.token;
            let leases: Vec<Lease> = leased
                .rows
                .into_iter()
                .filter_map(|row| decode_lease(row, token))
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
        let how = match how {
            Settle::Delivered { delivery, .. } => SettleRow::Delivered {
                record: serde_json::to_string(&delivery).map_err(anyhow::Error::from)?,
            },
            Settle::RetryLater {
                delay,
                reason,
                count_attempt,
                ..
            } => SettleRow::Retry {
                delay_ms: i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2),
                reason,
                count_attempt,
            },
            Settle::Dead { reason, .. } => SettleRow::Dead { reason },
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
                    "SELECT delivery FROM delivered WHERE lead_id = ?1 AND expires_at > ?2",
                )?
                .query_row(params![id.to_string(), now_ms()], |row| row.get(0))
                .optional()
            })
            .await?;
        record
            .map(|r| serde_json::from_str(&r))
            .transpose()
            .map_err(|e| Error::Other(anyhow::Error::new(e).context("corrupt delivered record")))
    }

    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows: Vec<(String, u32, String, i64)> = self
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT lead, attempts, reason, at FROM dead_letters ORDER BY id DESC LIMIT ?1",
                )?
                .query_map([limit], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                })?
                .collect()
            })
            .await?;
        rows.into_iter()
            .map(|(lead, attempts, reason, at)| {
                Ok(DeadLetter {
                    history: Vec::new(),
                    lead: serde_json::from_str(&lead).map_err(|e| {
                        Error::Other(anyhow::Error::new(e).context("corrupt dead letter"))
                    })?,
                    attempts,
                    reason,
                    at: DateTime::<Utc>::from_timestamp_millis(at).unwrap_or_default(),
                })
            })
            .collect()
    }

    pub async fn stats(&self) -> Result<Stats> {
        self.read(|conn| {
            let now = now_ms();
            let (ready, leased, delayed): (i64, i64, i64) = conn
                .prepare_cached(
                    "SELECT
                        COALESCE(SUM(lease_token IS NULL AND available_at <= ?1), 0),
                        COALESCE(SUM(lease_token IS NOT NULL), 0),
                        COALESCE(SUM(lease_token IS NULL AND available_at > ?1), 0)
                     FROM entries",
                )?
                .query_row([now], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
            let dead: i64 = conn
                .prepare_cached("SELECT COUNT(*) FROM dead_letters")?
                .query_row([], |row| row.get(0))?;
            let count = |n: i64| u64::try_from(n).unwrap_or(0);
            Ok(Stats {
                delivered: 0,
                oldest_ready_ms: 0,
                ready: count(ready),
                leased: count(leased),
                delayed: count(delayed),
                dead: count(dead),
            })
        })
        .await
    }

    /// Goes through the writer, so it also proves the writer thread is alive.
    pub async fn lead(&self, id: LeadId) -> Result<Option<super::LeadRecord>> {
        let _ = id;
        unimplemented!("issue 4: lead records")
    }

    pub async fn dead_letter(&self, id: LeadId) -> Result<Option<DeadLetter>> {
        let _ = id;
        unimplemented!("issue 4: dead_letter")
    }

    pub async fn revive(&self, id: LeadId, work: crate::lead::Work) -> Result<bool> {
        let _ = (id, work);
        unimplemented!("issue 4: revive")
    }

    pub async fn delete_dead(&self, id: LeadId) -> Result<bool> {
        let _ = id;
        unimplemented!("issue 4: delete_dead")
    }

    pub async fn acquire_upstream(&self, per_second: std::num::NonZeroU32) -> Result<Duration> {
        let _ = per_second;
        unimplemented!("issue 4: shared upstream rate limit")
    }

    pub async fn durability_warning(&self) -> Result<Option<String>> {
        unimplemented!("issue 4: durability warning")
    }

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
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(map_sqlite)?;
    if version > SCHEMA_VERSION {
        return Err(Error::Other(anyhow::anyhow!(
            "the queue database has schema version {version}, newer than this build knows ({SCHEMA_VERSION})"
        )));
    }
    let tx = conn.transaction().map_err(map_sqlite)?;
    tx.execute_batch(SCHEMA).map_err(map_sqlite)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(map_sqlite)?;
    tx.commit().map_err(map_sqlite)
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
}

impl Outcome {
    fn is_err(&self) -> bool {
        match self {
            Outcome::Enqueued(r) => r.is_err(),
            Outcome::Leased(r) => r.is_err(),
            Outcome::Done(r) => r.is_err(),
        }
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
            let added = batch.iter().zip(&outcomes).any(|(command, outcome)| {
                matches!(
                    (command, outcome),
                    (
                        Command::Enqueue { .. },
                        Outcome::Enqueued(Ok(Enqueued::Queued))
                    ) | (
                        Command::Settle {
                            how: SettleRow::Retry { .. },
                            ..
                        },
                        Outcome::Done(Ok(()))
                    )
                )
            });
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
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(map_sqlite)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for command in batch {
        let outcome = match command {
            Command::Enqueue {
                lead_id,
                lead,
                idempotency,
                ..
            } => Outcome::Enqueued(guarded(&tx, savepoints, |conn| {
                let ttl = ms(settings.idempotency_ttl);
                enqueue(conn, now, ttl, lead_id, lead, idempotency.as_ref())
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
                let ttl = ms(settings.record_ttl);
                settle(conn, now, ttl, *entry_id, *lease_token, lead_id, how).map(drop)
            })),
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
        (command, Outcome::Done(Err(e))) => fail(command, &e),
        (Command::Enqueue { answer, .. }, _) => answer.send(mismatch()).map_err(drop),
        (Command::Lease { answer, .. }, _) => answer.send(mismatch()).map_err(drop),
        (Command::Settle { answer, .. } | Command::Ping { answer }, _) => {
            answer.send(mismatch()).map_err(drop)
        }
    };
}

fn fail(command: Command, e: &Error) -> std::result::Result<(), ()> {
    match command {
        Command::Enqueue { answer, .. } => answer.send(Err(copy_error(e))).map_err(drop),
        Command::Lease { answer, .. } => answer.send(Err(copy_error(e))).map_err(drop),
        Command::Settle { answer, .. } | Command::Ping { answer } => {
            answer.send(Err(copy_error(e))).map_err(drop)
        }
    }
}

fn enqueue(
    conn: &Connection,
    now: i64,
    idempotency_ms: i64,
    lead_id: &str,
    lead: &str,
    idempotency: Option<&IdempotencyKey>,
) -> Result<Enqueued> {
    if let Some(key) = idempotency {
        // Claims the key unless a live claim exists: one statement in the common (new key)
        // case; an expired claim is taken over.
        let claimed = conn
            .prepare_cached(
                "INSERT INTO idempotency (source, key, first_lead, expires_at)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (source, key) DO UPDATE
                 SET first_lead = excluded.first_lead, expires_at = excluded.expires_at
                 WHERE idempotency.expires_at <= ?5",
            )
            .and_then(|mut s| {
                s.execute(params![
                    key.source,
                    key.key,
                    lead_id,
                    now.saturating_add(idempotency_ms),
                    now
                ])
            })
            .map_err(map_sqlite)?;
        if claimed == 0 {
            let first: String = conn
                .prepare_cached("SELECT first_lead FROM idempotency WHERE source = ?1 AND key = ?2")
                .and_then(|mut s| s.query_row(params![key.source, key.key], |row| row.get(0)))
                .map_err(map_sqlite)?;
            let first = first.parse().map_err(|e| {
                Error::Other(anyhow::Error::new(e).context("corrupt idempotency record"))
            })?;
            return Ok(Enqueued::Replayed { first });
        }
    }
    conn.prepare_cached(
        "INSERT INTO entries (lead_id, lead, attempt, available_at) VALUES (?1, ?2, 1, ?3)",
    )
    .and_then(|mut s| s.execute(params![lead_id, lead, now]))
    .map_err(map_sqlite)?;
    Ok(Enqueued::Queued)
}

fn lease(conn: &Connection, now: i64, lease_ms: i64, max: usize) -> Result<Leased> {
    let token: i64 = rand::random();
    let max = i64::try_from(max).unwrap_or(i64::MAX);
    let rows = conn
        .prepare_cached(
            "UPDATE entries SET lease_token = ?1, available_at = ?2
             WHERE id IN (SELECT id FROM entries WHERE available_at <= ?3
                          ORDER BY available_at, id LIMIT ?4)
             RETURNING id, lead, attempt, last_error",
        )
        .and_then(|mut s| {
            s.query_map(
                params![token, now.saturating_add(lease_ms), now, max],
                |row| {
                    Ok(LeasedRow {
                        id: row.get(0)?,
                        lead: row.get(1)?,
                        attempt: row.get(2)?,
                        last_error: row.get(3)?,
                    })
                },
            )?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(map_sqlite)?;
    let next: Option<i64> = conn
        .prepare_cached("SELECT MIN(available_at) FROM entries")
        .and_then(|mut s| s.query_row([], |row| row.get(0)))
        .map_err(map_sqlite)?;
    Ok(Leased {
        token,
        rows,
        next_in_ms: next.map(|at| (at - now).max(0)),
    })
}

/// Returns whether an entry was added (a retry copy).
fn settle(
    conn: &Connection,
    now: i64,
    delivered_ms: i64,
    entry_id: i64,
    lease_token: i64,
    lead_id: &str,
    how: &SettleRow,
) -> Result<bool> {
    let take = |conn: &Connection| -> Result<Option<(String, u32)>> {
        conn.prepare_cached(
            "DELETE FROM entries WHERE id = ?1 AND lease_token = ?2 RETURNING lead, attempt",
        )
        .and_then(|mut s| {
            s.query_row(params![entry_id, lease_token], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()
        })
        .map_err(map_sqlite)
    };
    let stale = || {
        tracing::info!(
            lead_id,
            "A settle came from a lease that had expired and been taken again; it was ignored."
        );
    };
    match how {
        SettleRow::Delivered { record } => {
            conn.prepare_cached(
                "INSERT INTO delivered (lead_id, delivery, expires_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (lead_id) DO UPDATE
                 SET delivery = excluded.delivery, expires_at = excluded.expires_at",
            )
            .and_then(|mut s| s.execute(params![lead_id, record, now.saturating_add(delivered_ms)]))
            .map_err(map_sqlite)?;
            if take(conn)?.is_none() {
                stale();
            }
            Ok(false)
        }
        SettleRow::Retry {
            delay_ms,
            reason,
            count_attempt,
        } => {
            let Some((lead, attempt)) = take(conn)? else {
                stale();
                return Ok(false);
            };
            let attempt = if *count_attempt {
                attempt.saturating_add(1)
            } else {
                attempt
            };
            conn.prepare_cached(
                "INSERT INTO entries (lead_id, lead, attempt, last_error, available_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    lead_id,
                    lead,
                    attempt,
                    reason,
                    now.saturating_add(*delay_ms)
                ])
            })
            .map_err(map_sqlite)?;
            Ok(true)
        }
        SettleRow::Dead { reason } => {
            let Some((lead, attempt)) = take(conn)? else {
                stale();
                return Ok(false);
            };
            conn.prepare_cached(
                "INSERT INTO dead_letters (lead_id, lead, attempts, reason, at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut s| s.execute(params![lead_id, lead, attempt, reason, now]))
            .map_err(map_sqlite)?;
            Ok(false)
        }
    }
}

fn purge(conn: &mut Connection) {
    let now = now_ms();
    let purged = conn
        .execute(
            "DELETE FROM idempotency WHERE rowid IN
             (SELECT rowid FROM idempotency WHERE expires_at <= ?1 LIMIT ?2)",
            params![now, PURGE_LIMIT],
        )
        .and_then(|keys| {
            conn.execute(
                "DELETE FROM delivered WHERE rowid IN
                 (SELECT rowid FROM delivered WHERE expires_at <= ?1 LIMIT ?2)",
                params![now, PURGE_LIMIT],
            )
            .map(|records| (keys, records))
        });
    match purged {
        Ok((keys, records)) if keys + records > 0 => tracing::debug!(
            idempotency_keys = keys,
            delivered_records = records,
            "Expired queue records were purged."
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "Expired queue records could not be purged."),
    }
}

/// A corrupt row is logged and skipped: it stays leased, so it is never lost, and comes back
/// (and is logged again) after each lease timeout until an operator removes it.
fn decode_lease(row: LeasedRow, lease_token: i64) -> Option<Lease> {
    match serde_json::from_str(&row.lead) {
        Ok(lead) => Some(Lease {
            history: Vec::new(),
            lead,
            attempt: row.attempt,
            last_error: row.last_error,
            handle: LeaseHandle::Embedded {
                entry_id: row.id,
                lease_token,
            },
        }),
        Err(e) => {
            tracing::error!(entry_id = row.id, error = %e, "A queue entry could not be read; it is left leased.");
            None
        }
    }
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
