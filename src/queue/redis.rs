//! The Redis backend: a stream with a consumer group for ready leads, a sorted set for delayed
//! retries, a stream of dead letters, and plain string keys for delivered records and
//! idempotency keys. Every change that touches more than one key runs in one Lua script.
//!
//! # Key layout
//!
//! `P` is the configured prefix. Every key starts with the hash tag `{P}`, so all keys of one
//! queue live in the same Redis Cluster slot and the scripts below are legal in a cluster.
//!
//! | key | type | contents | written by | TTL |
//! |-----|------|----------|------------|-----|
//! | `{P}:ready` | stream, consumer group `forwarders` | one entry per queued lead, field `e` = entry JSON `{"lead": QueuedLead, "attempt": n, "last_error": …}`; the group's pending list holds the leased entries, each entry's delivery count is its lease token | enqueue (`XADD`), lease (promotion, `XAUTOCLAIM`, `XREADGROUP`), settle (`XACK` + `XDEL`) | none |
//! | `{P}:delayed` | sorted set | member = entry JSON (as above) of a retry copy, score = due time in ms (Redis server clock) | settle `RetryLater` (`ZADD`); lease moves due members into `{P}:ready` | none |
//! | `{P}:dead` | stream | field `d` = [`DeadLetter`] JSON | settle `Dead` (`XADD`) | none (kept until an operator trims it) |
//! | `{P}:delivered:<lead id>` | string | [`Delivery`] JSON | settle `Delivered` | `record_ttl` |
//! | `{P}:idem:<len(source)>:<source>:<key>` | string | id of the first lead queued with this key (the length prefix keeps `source`/`key` pairs from colliding) | enqueue (`SET NX PX`) | `idempotency_ttl` |
//!
//! A settle only acts when the entry is still pending with the delivery count its lease saw;
//! a lease that expired and was claimed again is stale and its settle is ignored, except that
//! a `Delivered` settle always writes the delivered record (the lead *was* delivered).
//!
//! Time for due dates comes from the Redis server (`TIME` inside the scripts), so replicas
//! with skewed clocks agree on when a retry is due.
//!
//! # Connections
//!
//! Commands go through one [`ConnectionManager`] (a multiplexed connection that reconnects by
//! itself). Enqueues are batched: a writer task drains a channel and sends everything pending
//! as one script call (up to [`MAX_BATCH`] leads, [`MAX_BATCHES_IN_FLIGHT`] calls in flight),
//! answering each caller through a oneshot. A blocking `XREADGROUP` would stall every other
//! command on a multiplexed connection, so waiting leases use a small pool of dedicated
//! connections.
//!
//! # Limits
//!
//! * Needs Redis 6.2 or newer (`XAUTOCLAIM`); tested against 7.0.
//! * Durability is Redis's: an acknowledged enqueue survives a Redis crash only with
//!   `appendonly yes` and `appendfsync always` (`everysec` may lose the last second).
//! * The keys are Cluster-ready (one slot per queue), but the client is a single-node
//!   [`ConnectionManager`]; a cluster client is not wired in.
//! * Consumers stay registered in the group after their process is gone (harmless: their
//!   pending entries are claimed by others); name consumers stably per replica.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, ErrorKind, RedisError, Script, ServerErrorKind};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::{
    DeadLetter, Delivery, Enqueued, Error, IdempotencyKey, Lease, LeaseHandle, QueueSettings,
    Result, Settle, Stats,
};
use crate::lead::{LeadId, QueuedLead};

/// The consumer group every forwarder joins.
const GROUP: &str = "forwarders";
/// How long establishing a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long Redis may take to answer a command. A command that times out may still have been
/// applied by the server (the answer was lost, not the write): callers answer 503 and the
/// sender's retry is made harmless by its idempotency key.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Upper bound on any one queue operation, reconnection included: a down Redis must turn into
/// a fast 503, never a hung request.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);
/// Leads per enqueue script call.
pub const MAX_BATCH: usize = 512;
/// Enqueue script calls in flight at once on the shared connection. Two keeps Redis busy (one
/// batch runs while the next fills up) and the batches large; more in flight made batches
/// smaller, and with `appendfsync always` every batch costs an fsync (measured: 2 beat 1, 4
/// and 16).
pub const MAX_BATCHES_IN_FLIGHT: usize = 2;
/// Enqueues waiting for the writer task before callers wait to hand theirs over.
const ENQUEUE_CHANNEL: usize = 8192;
/// Due retries moved into the ready stream per lease call.
const MAX_PROMOTIONS: usize = 1000;
/// A waiting lease wakes at least this often, to promote due retries and reclaim expired leases
/// (neither wakes a blocked `XREADGROUP`).
const MAX_BLOCK: Duration = Duration::from_secs(1);
/// Idle dedicated connections kept for blocking reads.
const MAX_IDLE_BLOCKING: usize = 4;

/// Appends one lead per `(id, entry, key index)` triple, claiming its idempotency key first.
const ENQUEUE_LUA: &str = r#"
-- KEYS[1]   ready stream
-- KEYS[2..] idempotency keys of the leads that carry one
-- ARGV[1]   idempotency TTL in ms
-- ARGV[2..] per lead: lead id, entry JSON, index into KEYS of its idempotency key (0 = none)
-- Returns one string per lead: '' when queued, else the id of the first lead with that key.
local ttl = ARGV[1]
local answers = {}
for i = 2, #ARGV, 3 do
  local id, entry, k = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local first = false
  if k > 0 and not redis.call('SET', KEYS[k], id, 'NX', 'PX', ttl) then
    first = redis.call('GET', KEYS[k])
  end
  if first then
    answers[#answers + 1] = first
  else
    redis.call('XADD', KEYS[1], '*', 'e', entry)
    answers[#answers + 1] = ''
  end
end
return answers
"#;

/// Promotes due retries, reclaims expired leases, then reads new entries.
const LEASE_LUA: &str = r#"
-- KEYS[1] ready stream, KEYS[2] delayed set
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] max entries, ARGV[4] lease timeout in ms,
-- ARGV[5] XAUTOCLAIM cursor, ARGV[6] max promotions
-- Returns {next cursor, ms until the next delayed entry is due (-1: none), {{id, deliveries, entry}, ...}}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, ARGV[6])
for _, entry in ipairs(due) do
  redis.call('XADD', KEYS[1], '*', 'e', entry)
  redis.call('ZREM', KEYS[2], entry)
end

local function field(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'e' then return fields[i + 1] end
  end
  return ''
end

local max = tonumber(ARGV[3])
local leased = {}
local cursor = '0-0'
local claimed = redis.pcall('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[4], ARGV[5], 'COUNT', max)
if claimed.err then
  -- The group vanishes with the stream (a Redis restarted without persistence, a flush).
  if not string.find(claimed.err, 'NOGROUP') then return redis.error_reply(claimed.err) end
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
else
  cursor = claimed[1]
  for _, msg in ipairs(claimed[2]) do
    if msg and msg[2] then
      local p = redis.call('XPENDING', KEYS[1], ARGV[1], msg[1], msg[1], 1)
      leased[#leased + 1] = {msg[1], p[1][4], field(msg[2])}
    end
  end
end

if #leased < max then
  local read = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', max - #leased,
    'STREAMS', KEYS[1], '>')
  if read then
    for _, msg in ipairs(read[1][2]) do
      leased[#leased + 1] = {msg[1], 1, field(msg[2])}
    end
  end
end

local next_due = -1
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if first[2] then next_due = math.max(0, tonumber(first[2]) - now) end
return {cursor, next_due, leased}
"#;

/// Shared by the settle scripts: is entry `id` still pending with the delivery count the lease saw?
const HOLDS_LUA: &str = r#"
local function holds(ready, group, id, deliveries)
  local p = redis.pcall('XPENDING', ready, group, id, id, 1)
  if p.err or not p[1] then return false end
  return tonumber(p[1][4]) == tonumber(deliveries)
end
"#;

const SETTLE_DELIVERED_LUA: &str = r#"
-- KEYS[1] ready stream, KEYS[2] delivered record
-- ARGV[1] group, ARGV[2] entry id, ARGV[3] deliveries, ARGV[4] Delivery JSON, ARGV[5] TTL ms
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
if not holds(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"#;

const SETTLE_RETRY_LUA: &str = r#"
-- KEYS[1] ready stream, KEYS[2] delayed set
-- ARGV[1] group, ARGV[2] entry id, ARGV[3] deliveries, ARGV[4] new entry JSON, ARGV[5] delay ms
if not holds(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[4])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"#;

const SETTLE_DEAD_LUA: &str = r#"
-- KEYS[1] ready stream, KEYS[2] dead stream
-- ARGV[1] group, ARGV[2] entry id, ARGV[3] deliveries, ARGV[4] DeadLetter JSON
if not holds(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
redis.call('XADD', KEYS[2], '*', 'd', ARGV[4])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"#;

const STATS_LUA: &str = r#"
-- KEYS[1] ready stream, KEYS[2] delayed set, KEYS[3] dead stream; ARGV[1] group
local len = redis.call('XLEN', KEYS[1])
local pending = 0
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1])
if not p.err then pending = p[1] end
return {len - pending, pending, redis.call('ZCARD', KEYS[2]), redis.call('XLEN', KEYS[3])}
"#;

/// What one stream entry or delayed member holds.
#[derive(Serialize, Deserialize)]
struct Entry<'a> {
    lead: std::borrow::Cow<'a, QueuedLead>,
    attempt: u32,
    last_error: Option<std::borrow::Cow<'a, str>>,
}

/// The names of a queue's keys.
struct Keys {
    tag: String,
    ready: String,
    delayed: String,
    dead: String,
}

impl Keys {
    fn new(prefix: &str) -> Result<Self> {
        if prefix.is_empty() || prefix.contains(['{', '}']) {
            return Err(Error::Other(anyhow::anyhow!(
                "the redis key prefix must be non-empty and contain no braces (it becomes the hash tag {{prefix}})"
            )));
        }
        let tag = format!("{{{prefix}}}");
        Ok(Self {
            ready: format!("{tag}:ready"),
            delayed: format!("{tag}:delayed"),
            dead: format!("{tag}:dead"),
            tag,
        })
    }

    fn delivered(&self, id: LeadId) -> String {
        format!("{}:delivered:{id}", self.tag)
    }

    fn idempotency(&self, key: &IdempotencyKey) -> String {
        format!(
            "{}:idem:{}:{}:{}",
            self.tag,
            key.source.len(),
            key.source,
            key.key
        )
    }
}

struct Scripts {
    enqueue: Script,
    lease: Script,
    delivered: Script,
    retry: Script,
    dead: Script,
    stats: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            enqueue: Script::new(ENQUEUE_LUA),
            lease: Script::new(LEASE_LUA),
            delivered: Script::new(&format!("{HOLDS_LUA}{SETTLE_DELIVERED_LUA}")),
            retry: Script::new(&format!("{HOLDS_LUA}{SETTLE_RETRY_LUA}")),
            dead: Script::new(&format!("{HOLDS_LUA}{SETTLE_DEAD_LUA}")),
            stats: Script::new(STATS_LUA),
        }
    }
}

/// One enqueue waiting for the writer task.
struct EnqueueRequest {
    lead_id: String,
    entry: String,
    idempotency_key: Option<String>,
    answer: oneshot::Sender<Result<Enqueued>>,
}

#[derive(Clone)]
pub struct RedisQueue {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    conn: ConnectionManager,
    keys: Keys,
    scripts: Arc<Scripts>,
    consumer: String,
    settings: QueueSettings,
    enqueues: mpsc::Sender<EnqueueRequest>,
    /// Idle dedicated connections for blocking reads.
    blocking: Mutex<Vec<MultiplexedConnection>>,
    /// Where the next `XAUTOCLAIM` scan of the pending list starts.
    claim_cursor: Mutex<String>,
}

impl RedisQueue {
    pub async fn open(
        url: &secrecy::SecretString,
        prefix: &str,
        settings: QueueSettings,
        consumer: &str,
    ) -> Result<Self> {
        let keys = Keys::new(prefix)?;
        // The URL may carry a password: errors about it must not echo it.
        let client = redis::Client::open(url.expose_secret()).map_err(|e| {
            Error::Other(anyhow::anyhow!(
                "the redis URL is not valid ({:?})",
                e.kind()
            ))
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            // Fail the waiting command quickly while Redis is down; the next command starts a
            // new reconnection attempt, so the queue recovers by itself.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_millis(500));
        let conn = timed(client.get_connection_manager_with_config(config)).await?;
        let mut setup = conn.clone();
        let created: redis::RedisResult<()> =
            setup.xgroup_create_mkstream(&keys.ready, GROUP, "0").await;
        match created {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(map_err(e)),
        }

        let scripts = Arc::new(Scripts::new());
        let (enqueues, requests) = mpsc::channel(ENQUEUE_CHANNEL);
        tokio::spawn(write_enqueues(
            conn.clone(),
            scripts.clone(),
            keys.ready.clone(),
            ttl_ms(settings.idempotency_ttl),
            requests,
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                conn,
                keys,
                scripts,
                consumer: consumer.to_owned(),
                settings,
                enqueues,
                blocking: Mutex::new(Vec::new()),
                claim_cursor: Mutex::new("0-0".to_owned()),
            }),
        })
    }

    pub async fn enqueue(
        &self,
        lead: &QueuedLead,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<Enqueued> {
        let entry = encode_entry(lead, 1, None)?;
        let (answer, answered) = oneshot::channel();
        let request = EnqueueRequest {
            lead_id: lead.id.to_string(),
            entry,
            idempotency_key: idempotency.map(|k| self.inner.keys.idempotency(k)),
            answer,
        };
        let handed_over = async {
            self.inner
                .enqueues
                .send(request)
                .await
                .map_err(|_| Error::Unavailable("the redis enqueue writer stopped".into()))?;
            answered
                .await
                .map_err(|_| Error::Unavailable("the redis enqueue writer stopped".into()))?
        };
        tokio::time::timeout(OPERATION_TIMEOUT, handed_over)
            .await
            .map_err(|_| timeout_error())?
    }

    pub async fn lease(&self, max: usize, wait: Duration) -> Result<Vec<Lease>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + wait;
        loop {
            let (leases, next_due) = self.lease_now(max).await?;
            let now = Instant::now();
            if !leases.is_empty() || now >= deadline {
                return Ok(leases);
            }
            let mut block = (deadline - now)
                .min(MAX_BLOCK)
                .min(self.inner.settings.lease_timeout / 2);
            if let Some(due) = next_due {
                block = block.min(due);
            }
            let leases = self.read_blocking(max, block).await?;
            if !leases.is_empty() {
                return Ok(leases);
            }
        }
    }

    pub async fn settle(&self, lease: Lease, how: Settle) -> Result<()> {
        let LeaseHandle::Redis {
            stream_id,
            deliveries,
        } = &lease.handle
        else {
            return Err(Error::Other(anyhow::anyhow!(
                "a lease of another backend was settled on the redis queue"
            )));
        };
        let keys = &self.inner.keys;
        let scripts = &self.inner.scripts;
        let mut conn = self.inner.conn.clone();
        let applied: i64 = match how {
            Settle::Delivered { delivery, .. } => {
                let record = serde_json::to_string(&delivery).map_err(anyhow::Error::from)?;
                timed(
                    scripts
                        .delivered
                        .key(&keys.ready)
                        .key(keys.delivered(lease.lead.id))
                        .arg(GROUP)
                        .arg(stream_id)
                        .arg(deliveries)
                        .arg(record)
                        .arg(ttl_ms(self.inner.settings.record_ttl))
                        .invoke_async(&mut conn),
                )
                .await?
            }
            Settle::RetryLater {
                delay,
                reason,
                count_attempt,
                ..
            } => {
                let attempt = if count_attempt {
                    lease.attempt.saturating_add(1)
                } else {
                    lease.attempt
                };
                let entry = encode_entry(&lease.lead, attempt, Some(&reason))?;
                timed(
                    scripts
                        .retry
                        .key(&keys.ready)
                        .key(&keys.delayed)
                        .arg(GROUP)
                        .arg(stream_id)
                        .arg(deliveries)
                        .arg(entry)
                        .arg(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
                        .invoke_async(&mut conn),
                )
                .await?
            }
            Settle::Dead { reason, .. } => {
                let letter = DeadLetter {
                    history: Vec::new(),
                    lead: lease.lead.clone(),
                    attempts: lease.attempt,
                    reason,
                    at: Utc::now(),
                };
                let letter = serde_json::to_string(&letter).map_err(anyhow::Error::from)?;
                timed(
                    scripts
                        .dead
                        .key(&keys.ready)
                        .key(&keys.dead)
                        .arg(GROUP)
                        .arg(stream_id)
                        .arg(deliveries)
                        .arg(letter)
                        .invoke_async(&mut conn),
                )
                .await?
            }
        };
        if applied == 0 {
            tracing::info!(
                lead_id = %lease.lead.id,
                "A settle came from a lease that had expired and been taken again; it was ignored."
            );
        }
        Ok(())
    }

    pub async fn delivery_of(&self, id: LeadId) -> Result<Option<Delivery>> {
        let mut conn = self.inner.conn.clone();
        let record: Option<String> = timed(conn.get(self.inner.keys.delivered(id))).await?;
        record
            .map(|r| serde_json::from_str(&r))
            .transpose()
            .map_err(|e| Error::Other(anyhow::Error::new(e).context("corrupt delivered record")))
    }

    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let mut conn = self.inner.conn.clone();
        let reply: redis::streams::StreamRangeReply =
            timed(conn.xrevrange_count(&self.inner.keys.dead, "+", "-", limit)).await?;
        reply
            .ids
            .iter()
            .map(|entry| {
                let letter: String = entry.get("d").unwrap_or_default();
                serde_json::from_str(&letter).map_err(|e| {
                    Error::Other(
                        anyhow::Error::new(e).context(format!("corrupt dead letter {}", entry.id)),
                    )
                })
            })
            .collect()
    }

    pub async fn stats(&self) -> Result<Stats> {
        let keys = &self.inner.keys;
        let mut conn = self.inner.conn.clone();
        let (ready, leased, delayed, dead): (u64, u64, u64, u64) = timed(
            self.inner
                .scripts
                .stats
                .key(&keys.ready)
                .key(&keys.delayed)
                .key(&keys.dead)
                .arg(GROUP)
                .invoke_async(&mut conn),
        )
        .await?;
        Ok(Stats {
            delivered: 0,
            oldest_ready_ms: 0,
            ready,
            leased,
            delayed,
            dead,
        })
    }

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
        let mut conn = self.inner.conn.clone();
        timed(redis::cmd("PING").query_async::<()>(&mut conn)).await
    }

    /// One lease script call: returns what it leased and how long until the next retry is due.
    async fn lease_now(&self, max: usize) -> Result<(Vec<Lease>, Option<Duration>)> {
        let inner = &self.inner;
        let cursor = inner.claim_cursor.lock().unwrap().clone();
        let mut conn = inner.conn.clone();
        let (next_cursor, next_due, leased): (String, i64, Vec<(String, i64, String)>) = timed(
            inner
                .scripts
                .lease
                .key(&inner.keys.ready)
                .key(&inner.keys.delayed)
                .arg(GROUP)
                .arg(&inner.consumer)
                .arg(max)
                .arg(ttl_ms(inner.settings.lease_timeout))
                .arg(cursor)
                .arg(MAX_PROMOTIONS)
                .invoke_async(&mut conn),
        )
        .await?;
        *inner.claim_cursor.lock().unwrap() = next_cursor;
        let leases = leased
            .into_iter()
            .filter_map(|(stream_id, deliveries, entry)| {
                decode_lease(stream_id, deliveries, &entry)
            })
            .collect();
        let next_due = u64::try_from(next_due).ok().map(Duration::from_millis);
        Ok((leases, next_due))
    }

    /// Waits up to `block` for new entries on a dedicated connection.
    async fn read_blocking(&self, max: usize, block: Duration) -> Result<Vec<Lease>> {
        let inner = &self.inner;
        let idle = inner.blocking.lock().unwrap().pop();
        let mut conn = match idle {
            Some(conn) => conn,
            None => {
                // Response timeouts are enforced below, per read, since each read blocks for
                // a different time.
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(None);
                timed(
                    inner
                        .client
                        .get_multiplexed_async_connection_with_config(&config),
                )
                .await?
            }
        };
        let block_ms = usize::try_from(block.as_millis())
            .unwrap_or(usize::MAX)
            .max(1);
        let options = StreamReadOptions::default()
            .group(GROUP, &inner.consumer)
            .count(max)
            .block(block_ms);
        let read = tokio::time::timeout(
            block + RESPONSE_TIMEOUT,
            conn.xread_options::<_, _, Option<StreamReadReply>>(
                &[&inner.keys.ready],
                &[">"],
                &options,
            ),
        )
        .await;
        // On any failure the connection is dropped: it may still be blocked server-side. An
        // entry the server hands to it meanwhile stays pending and is reclaimed after the
        // lease timeout.
        let reply = match read {
            Err(_) => return Err(timeout_error()),
            Ok(Err(e)) if e.code() == Some("NOGROUP") => return Ok(Vec::new()),
            Ok(Err(e)) => return Err(map_err(e)),
            Ok(Ok(reply)) => reply,
        };
        {
            let mut idle = inner.blocking.lock().unwrap();
            if idle.len() < MAX_IDLE_BLOCKING {
                idle.push(conn);
            }
        }
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .filter_map(|msg| {
                let entry: String = msg.get("e").unwrap_or_default();
                decode_lease(msg.id, 1, &entry)
            })
            .collect())
    }
}

/// Drains the enqueue channel into batched script calls until every sender is gone.
async fn write_enqueues(
    conn: ConnectionManager,
    scripts: Arc<Scripts>,
    ready: String,
    idempotency_ttl_ms: u64,
    mut requests: mpsc::Receiver<EnqueueRequest>,
) {
    let in_flight = Arc::new(Semaphore::new(MAX_BATCHES_IN_FLIGHT));
    loop {
        // Take the permit first, so everything that arrives while all calls are in flight
        // joins the next batch.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(MAX_BATCH);
        if requests.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let mut conn = conn.clone();
        let scripts = scripts.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            send_batch(&mut conn, &scripts, &ready, idempotency_ttl_ms, batch).await;
            drop(permit);
        });
    }
}

async fn send_batch(
    conn: &mut ConnectionManager,
    scripts: &Scripts,
    ready: &str,
    idempotency_ttl_ms: u64,
    batch: Vec<EnqueueRequest>,
) {
    let mut call = scripts.enqueue.prepare_invoke();
    call.key(ready).arg(idempotency_ttl_ms);
    let mut keys = 1;
    for request in &batch {
        let key_index = match &request.idempotency_key {
            Some(key) => {
                call.key(key);
                keys += 1;
                keys
            }
            None => 0,
        };
        call.arg(&request.lead_id)
            .arg(&request.entry)
            .arg(key_index);
    }
    let answers: Result<Vec<String>> = timed(call.invoke_async(conn)).await;
    match answers {
        Ok(answers) if answers.len() == batch.len() => {
            for (request, first) in batch.into_iter().zip(answers) {
                let answer = if first.is_empty() {
                    Ok(Enqueued::Queued)
                } else {
                    first
                        .parse()
                        .map(|first| Enqueued::Replayed { first })
                        .map_err(|e| {
                            Error::Other(
                                anyhow::Error::new(e).context("corrupt idempotency record"),
                            )
                        })
                };
                let _ = request.answer.send(answer);
            }
        }
        Ok(answers) => {
            let (got, sent) = (answers.len(), batch.len());
            for request in batch {
                let _ = request.answer.send(Err(Error::Other(anyhow::anyhow!(
                    "the enqueue script answered {got} results for {sent} leads"
                ))));
            }
        }
        Err(e) => {
            tracing::warn!(leads = batch.len(), error = %e, "A batch of enqueues failed.");
            for request in batch {
                let _ = request.answer.send(Err(copy_error(&e)));
            }
        }
    }
}

fn encode_entry(lead: &QueuedLead, attempt: u32, last_error: Option<&str>) -> Result<String> {
    let entry = Entry {
        lead: std::borrow::Cow::Borrowed(lead),
        attempt,
        last_error: last_error.map(std::borrow::Cow::Borrowed),
    };
    Ok(serde_json::to_string(&entry).map_err(anyhow::Error::from)?)
}

/// A corrupt entry is logged and skipped: it stays pending, so it is never lost, and comes back
/// (and is logged again) after each lease timeout until an operator removes it.
fn decode_lease(stream_id: String, deliveries: i64, entry: &str) -> Option<Lease> {
    match serde_json::from_str::<Entry>(entry) {
        Ok(entry) => Some(Lease {
            history: Vec::new(),
            lead: entry.lead.into_owned(),
            attempt: entry.attempt,
            last_error: entry.last_error.map(|e| e.into_owned()),
            handle: LeaseHandle::Redis {
                stream_id,
                deliveries,
            },
        }),
        Err(e) => {
            tracing::error!(stream_id, error = %e, "A queue entry could not be read; it is left pending.");
            None
        }
    }
}

/// Milliseconds for `PX` and friends, which reject 0.
fn ttl_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

async fn timed<T>(fut: impl Future<Output = redis::RedisResult<T>>) -> Result<T> {
    tokio::time::timeout(OPERATION_TIMEOUT, fut)
        .await
        .map_err(|_| timeout_error())?
        .map_err(map_err)
}

fn timeout_error() -> Error {
    Error::Unavailable(format!(
        "redis did not answer within {}s",
        OPERATION_TIMEOUT.as_secs()
    ))
}

/// Whatever says "Redis cannot take this now" becomes [`Error::Unavailable`] (a 503); only
/// answers that point at a bug or corrupt data (unexpected replies, script errors) are
/// [`Error::Other`].
fn map_err(e: RedisError) -> Error {
    let ours = match e.kind() {
        ErrorKind::UnexpectedReturnType | ErrorKind::Parse | ErrorKind::InvalidClientConfig => true,
        ErrorKind::Server(ServerErrorKind::ResponseError) => e.code() == Some("ERR"),
        _ => false,
    };
    if ours {
        Error::Other(anyhow::Error::new(e).context("redis queue"))
    } else {
        Error::Unavailable(format!("redis: {e}"))
    }
}

fn copy_error(e: &Error) -> Error {
    match e {
        Error::Unavailable(reason) => Error::Unavailable(reason.clone()),
        Error::Other(e) => Error::Other(anyhow::anyhow!("{e:#}")),
    }
}
