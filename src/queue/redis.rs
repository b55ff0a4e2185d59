//! The Redis backend: a stream with a consumer group for ready leads, a sorted set for delayed
//! retries, one hash per lead holding its data and record, sorted sets indexing dead letters
//! and delivered records, and a capped stream logging every dead-lettering for operators. Every
//! change that touches more than one key runs in one Lua script.
//!
//! # Key layout
//!
//! `P` is the configured prefix. Every key starts with the hash tag `{P}`, so all keys of one
//! queue live in the same Redis Cluster slot and the scripts below are legal in a cluster.
//! Scripts only touch keys passed to them in `KEYS`.
//!
//! | key | type | contents | written by | TTL |
//! |-----|------|----------|------------|-----|
//! | `{P}:schema` | string | `2`, the version of this layout | open | none |
//! | `{P}:ready` | stream, consumer group `forwarders` | one entry per ready or leased copy of a lead, field `i` = the lead id (the data lives in its record); the group's pending list holds the leased entries, each entry's delivery count is its lease token | enqueue (`XADD`), lease (promotion, `XAUTOCLAIM`, `XREADGROUP`), settle (`XACK` + `XDEL`), revive | none |
//! | `{P}:delayed` | sorted set | member = lead id of a retry copy, score = due time in ms (Redis server clock) | settle `RetryLater`; lease moves due members into `{P}:ready` | none |
//! | `{P}:lead:<id>` | hash | the lead's record: `lead` ([`QueuedLead`] JSON — the personal data — while queued or dead); `state` (`queued`, `delivered`, `dead`; absent = `queued`); `attempt` (the attempt the next lease makes, or the last one made for a dead letter; absent = 1); `last_error`; `history` (JSON array of [`Attempt`]); `delivery` ([`Delivery`] JSON); `dead_reason`; `dead_at` (ms); `source` and `received_at` (RFC 3339), written when `lead` goes (until then they are read from it) | enqueue (`HSET lead`, the only extra write per lead), every settle, revive, delete_dead | none while queued or dead; `record_ttl` from delivery, or from the deletion of its dead letter |
//! | `{P}:work:<id>` | string | the [`QueuedLead`] JSON of a delivered lead, moved out of its record at delivery | settle `Delivered` | `pii_ttl` |
//! | `{P}:dead` | sorted set (not a stream: revive and delete_dead find a dead letter by its lead id, which `ZREM`/`ZSCORE` do in the same script as the record change, while a stream entry is addressed only by its own entry id; `ZREVRANGE` lists newest first) | member = lead id of a dead letter, score = when it died (ms) | settle `Dead`; revive and delete_dead remove | none (kept until an operator acts) |
//! | `{P}:deadlog` | stream, capped at about [`DEADLOG_MAXLEN`] entries (`XTRIM MAXLEN ~`: the oldest go first) and kept no longer than `record_ttl` (a reason may quote the lead's data, e.g. Onpipeline's error message): `XADD MINID` drops older entries at each dead-lettering, and the stats script (sampled every few seconds by every serving process) with `XTRIM MINID` | the dead-letter log, an audit trail for operators (`XREAD`/`XRANGE` it, or tail it with `XREAD BLOCK 0 STREAMS {P}:deadlog $`): one entry per dead-lettering, fields `lead_id`, `source`, `reason` and `at` (ms, Redis server clock; the entry id carries the same time). Only written, never read by leadgate: replay and delete go by `{P}:dead` | settle `Dead`, in the same script as the record and `{P}:dead`; stats (trim only) | none (entries trimmed by age and by the cap) |
//! | `{P}:delivered` | sorted set | member = lead id, score = when it was delivered (ms): counts the delivered records kept; members older than `record_ttl` are trimmed at each delivery | settle `Delivered` | none |
//! | `{P}:idem:<len(source)>:<source>:<key>` | string | id of the first lead queued with this key, then a space and the digest of its body when it came with one (a sender's `Idempotency-Key`; values written before digests existed hold the id alone); the length prefix keeps `source`/`key` pairs from colliding | enqueue (`SET NX PX`) | `idempotency_ttl` |
//! | `{P}:upstream` | string | the shared upstream rate limit's theoretical arrival time (GCRA), µs on the Redis server clock | acquire_upstream | a second past it |
//! | `{P}:paused` | string | an operator's pause of delivery, [`OperatorPause`] JSON (`{"since": …}`); absent = not paused. Every forwarder on the queue reads it and leases nothing while it exists | pause_delivery (`SET NX`: a pause in force keeps its time), resume_delivery (`DEL`) | none (until an operator resumes) |
//!
//! A lead has at most one entry (in `{P}:ready` or `{P}:delayed`) at a time. A settle only acts
//! when the entry is still pending with the delivery count its lease saw; a lease that expired
//! and was claimed again is stale and its settle is ignored, except that a `Delivered` settle
//! always updates the record (the lead *was* delivered). A lease that meets the entry of a lead
//! already recorded as delivered drops the entry instead of handing it out.
//!
//! Time for due dates, records and the rate limit comes from the Redis server (`TIME` inside
//! the scripts), so replicas with skewed clocks agree.
//!
//! [`Stats::oldest_ready_ms`] is read from the stream: the first entry after the group's
//! last-delivered id is the oldest one nobody leased, and its id carries the server time it
//! was added. A retry copy is added when a lease promotes it, within a second of its due
//! time while a forwarder runs; due copies not yet promoted count from their due time.
//!
//! # Connections
//!
//! Commands go through one [`ConnectionManager`] (a multiplexed connection that reconnects by
//! itself), or with `cluster` one cluster connection (which follows the slot map and
//! redirections by itself). Enqueues are batched: a writer task drains a channel and sends
//! everything pending as one script call (up to [`MAX_BATCH`] leads, [`MAX_BATCHES_IN_FLIGHT`]
//! calls in flight), answering each caller through a oneshot. A blocking `XREADGROUP` would
//! stall every other command on a multiplexed connection, so waiting leases use a small pool
//! of dedicated connections (in a cluster, dedicated cluster connections: the read goes to the
//! node serving the slot).
//!
//! `rediss://` URLs use TLS (rustls); the server's certificate must chain to the CA file given
//! (`LEADGATE_CA_FILE`), or to the system's trust store when none is.
//!
//! # Limits
//!
//! * Needs Redis 6.2 or newer (`XAUTOCLAIM`, exclusive `XRANGE`); tested against 7.0.
//! * Durability is Redis's: an acknowledged enqueue survives a Redis crash only with
//!   `appendonly yes` and `appendfsync always` (`everysec` may lose the last second);
//!   [`RedisQueue::durability_warning`] says so at start-up when it is not the case.
//! * Records of delivered leads are kept in memory for `record_ttl` (90 days by default):
//!   about 0.5 KB each plus their data for `pii_ttl`; size `maxmemory` for it.
//! * A queue written by an older leadgate (before lead records, no `{P}:schema`) is opened only
//!   once it is empty: let the older version drain it first.
//! * A consumer stays registered in the group after its process is gone until a later
//!   [`RedisQueue::open`] prunes it: consumers with no pending entries that have not read for
//!   [`CONSUMER_PRUNE_IDLE`] are removed then (their pending entries, if any, are claimed by
//!   the others first).

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, ErrorKind, RedisError, Script, ServerErrorKind, TlsCertificates};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::{
    Attempt, DeadLetter, Delivery, Enqueued, Error, IdempotencyKey, LeadRecord, LeadState, Lease,
    LeaseHandle, OperatorPause, QueueSettings, Result, Settle, Stats,
};
use crate::lead::{LeadId, QueuedLead, Work};

/// The consumer group every forwarder joins.
const GROUP: &str = "forwarders";
/// The key layout version this build writes (`{P}:schema`).
const SCHEMA_VERSION: i64 = 2;
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
/// A consumer idle this long with nothing pending belongs to a process that is gone (a live
/// forwarder reads at least every [`MAX_BLOCK`]); [`RedisQueue::open`] removes it from the group.
pub const CONSUMER_PRUNE_IDLE: Duration = Duration::from_secs(600);
/// Longest time to live handed to Redis (`PX` refuses values that overflow its clock).
const MAX_TTL_MS: u64 = 1 << 50;
/// Entries the dead-letter log `{P}:deadlog` keeps, about (`MAXLEN ~` trims whole stream
/// nodes, so slightly more may stay): ~0.2 KB each, ~2 MB in all.
pub const DEADLOG_MAXLEN: u64 = 10_000;

/// Removes consumers that hold no pending entry and have been idle for at least ARGV[2] ms,
/// except ARGV[3] (the caller). Atomic: a consumer cannot lease an entry between the check and
/// the removal, and removing one with pending entries would strand them.
const PRUNE_LUA: &str = r#"
-- KEYS[1] ready stream; ARGV[1] group, ARGV[2] min idle in ms, ARGV[3] the caller's name
-- Returns the number of consumers removed.
local removed = 0
for _, fields in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local c = {}
  for i = 1, #fields, 2 do c[fields[i]] = fields[i + 1] end
  if c.pending == 0 and c.idle >= tonumber(ARGV[2]) and c.name ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], c.name)
    removed = removed + 1
  end
end
return removed
"#;

/// Stamps the layout version, or refuses a queue that still holds data of the older layout.
/// The older layout is recognised by its contents (stream entries with an `e` field, delayed
/// members that are JSON, a dead-letter stream), not by the missing stamp: a Redis restarted
/// without persistence loses the stamp while replicas go on writing this layout.
const OPEN_LUA: &str = r#"
-- KEYS[1] schema, KEYS[2] ready stream, KEYS[3] delayed set, KEYS[4] dead letters
-- ARGV[1] the version this build writes
-- Returns the version found ('' when there was none and ours is now written), or 'old'.
local found = redis.call('GET', KEYS[1])
if found then return found end
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if first[1] and first[1][2][1] == 'e' then return 'old' end
local delayed = redis.call('ZRANGE', KEYS[3], 0, 0)
if delayed[1] and string.sub(delayed[1], 1, 1) == '{' then return 'old' end
if redis.call('TYPE', KEYS[4])['ok'] == 'stream' then
  if redis.call('XLEN', KEYS[4]) > 0 then return 'old' end
  -- An empty dead-letter stream of the older layout: the dead letters are a sorted set now.
  redis.call('DEL', KEYS[4])
end
redis.call('SET', KEYS[1], ARGV[1])
return ''
"#;

/// Appends one lead per argument group, claiming its idempotency key first.
const ENQUEUE_LUA: &str = r#"
-- KEYS[1]   ready stream
-- KEYS[2..] per lead: its record, then its idempotency key when it carries one
-- ARGV[1]   idempotency TTL in ms
-- ARGV[2..] per lead: lead id, lead JSON, index into KEYS of its record, index into KEYS of
--           its idempotency key (0 = none), the value claiming that key (the id, and a digest)
-- Returns one string per lead: '' when queued, else the value of the key's first claim.
-- The record starts as the lead alone (state queued, attempt 1 are implied): one field is the
-- cheapest hash to create, and enqueue is the hot path.
local ttl = ARGV[1]
local answers = {}
for i = 2, #ARGV, 5 do
  local id, lead = ARGV[i], ARGV[i + 1]
  local r, k = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local first = false
  if k > 0 and not redis.call('SET', KEYS[k], ARGV[i + 4], 'NX', 'PX', ttl) then
    first = redis.call('GET', KEYS[k])
  end
  if first then
    answers[#answers + 1] = first
  else
    redis.call('HSET', KEYS[r], 'lead', lead)
    redis.call('XADD', KEYS[1], '*', 'i', id)
    answers[#answers + 1] = ''
  end
end
return answers
"#;

/// Promotes due retries, reclaims expired leases, then reads new entries. The leads' records
/// are read by [`HYDRATE_LUA`], whose keys are known once this returns.
const LEASE_LUA: &str = r#"
-- KEYS[1] ready stream, KEYS[2] delayed set
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] max entries, ARGV[4] lease timeout in ms,
-- ARGV[5] XAUTOCLAIM cursor, ARGV[6] max promotions
-- Returns {next cursor, ms until the next delayed entry is due (-1: none),
--          {{stream id, deliveries, lead id}, ...}}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, ARGV[6])
for _, id in ipairs(due) do
  redis.call('XADD', KEYS[1], '*', 'i', id)
  redis.call('ZREM', KEYS[2], id)
end

local function field(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'i' then return fields[i + 1] end
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

/// Reads the records of freshly leased entries; drops entries of leads already delivered.
const HYDRATE_LUA: &str = r#"
-- KEYS[1] ready stream, KEYS[2..] the records of the leased entries, in order
-- ARGV[1] group, ARGV[2..] the entries' stream ids
-- Returns per entry {'ok', lead JSON, attempt, last error, history JSON}, {'delivered'} (the
-- entry was removed) or {'missing'} (no record or no data: left pending, logged by the caller).
local out = {}
for i = 2, #KEYS do
  local f = redis.call('HMGET', KEYS[i], 'state', 'lead', 'attempt', 'last_error', 'history')
  if f[1] == 'delivered' then
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    redis.call('XDEL', KEYS[1], ARGV[i])
    out[#out + 1] = {'delivered'}
  elseif not f[2] then
    out[#out + 1] = {'missing'}
  else
    out[#out + 1] = {'ok', f[2], f[3] or '1', f[4] or '', f[5] or ''}
  end
end
return out
"#;

/// Shared by the settle scripts.
const SETTLE_COMMON_LUA: &str = r#"
-- Is entry `id` still pending with the delivery count the lease saw?
local function holds(ready, group, id, deliveries)
  local p = redis.pcall('XPENDING', ready, group, id, id, 1)
  if p.err or not p[1] then return false end
  return tonumber(p[1][4]) == tonumber(deliveries)
end

local function remove(ready, group, id)
  redis.call('XACK', ready, group, id)
  redis.call('XDEL', ready, id)
end

-- Appends one Attempt JSON object to the record's JSON array, without decoding it.
local function append_history(record, attempt)
  if attempt == '' then return end
  local h = redis.call('HGET', record, 'history')
  if not h or h == '' or h == '[]' then
    h = '[' .. attempt .. ']'
  else
    h = string.sub(h, 1, -2) .. ',' .. attempt .. ']'
  end
  redis.call('HSET', record, 'history', h)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The oldest dead-letter log entry id kept `ttl` ms after `now`, for XADD/XTRIM MINID.
local function kept_since(now, ttl)
  return string.format('%.0f', math.max(0, now - tonumber(ttl)))
end
"#;

const SETTLE_DELIVERED_LUA: &str = r#"
-- KEYS[1] ready stream, KEYS[2] record, KEYS[3] work, KEYS[4] delivered index, KEYS[5] dead set
-- ARGV[1] group, ARGV[2] entry id, ARGV[3] deliveries, ARGV[4] Delivery JSON,
-- ARGV[5] Attempt JSON or '', ARGV[6] pii TTL ms, ARGV[7] record TTL ms, ARGV[8] lead id,
-- ARGV[9] source, ARGV[10] received_at (kept in the record once the lead's data leaves it)
-- The lead was delivered whether or not this lease still holds the entry: record it always.
if redis.call('EXISTS', KEYS[2]) == 1 then
  local now = now_ms()
  local lead = redis.call('HGET', KEYS[2], 'lead')
  if lead then
    redis.call('SET', KEYS[3], lead, 'PX', ARGV[6])
    redis.call('HDEL', KEYS[2], 'lead')
  end
  append_history(KEYS[2], ARGV[5])
  redis.call('HSET', KEYS[2], 'state', 'delivered', 'delivery', ARGV[4], 'source', ARGV[9],
    'received_at', ARGV[10])
  redis.call('HDEL', KEYS[2], 'dead_at')
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
  redis.call('ZREM', KEYS[5], ARGV[8])
  redis.call('ZADD', KEYS[4], now, ARGV[8])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. string.format('%.0f', now - tonumber(ARGV[7])))
end
if not holds(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
remove(KEYS[1], ARGV[1], ARGV[2])
return 1
"#;

const SETTLE_RETRY_LUA: &str = r#"
-- KEYS[1] ready stream, KEYS[2] delayed set, KEYS[3] record
-- ARGV[1] group, ARGV[2] entry id, ARGV[3] deliveries, ARGV[4] delay ms, ARGV[5] reason,
-- ARGV[6] the next attempt's number, ARGV[7] Attempt JSON or '', ARGV[8] new lead JSON or '',
-- ARGV[9] lead id
if not holds(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
append_history(KEYS[3], ARGV[7])
redis.call('HSET', KEYS[3], 'attempt', ARGV[6], 'last_error', ARGV[5])
if ARGV[8] ~= '' then redis.call('HSET', KEYS[3], 'lead', ARGV[8]) end
redis.call('ZADD', KEYS[2], now_ms() + tonumber(ARGV[4]), ARGV[9])
remove(KEYS[1], ARGV[1], ARGV[2])
return 1
"#;

const SETTLE_DEAD_LUA: &str = r#"
-- KEYS[1] ready stream, KEYS[2] record, KEYS[3] dead set, KEYS[4] dead-letter log
-- ARGV[1] group, ARGV[2] entry id, ARGV[3] deliveries, ARGV[4] reason, ARGV[5] Attempt JSON
-- or '', ARGV[6] lead id, ARGV[7] source, ARGV[8] the log's cap, ARGV[9] record TTL ms
if not holds(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
local now = now_ms()
append_history(KEYS[2], ARGV[5])
redis.call('HSET', KEYS[2], 'state', 'dead', 'dead_reason', ARGV[4], 'dead_at', now)
redis.call('ZADD', KEYS[3], now, ARGV[6])
-- A reason may quote the lead's data: entries go when they are older than the records kept
-- (exact MINID: `~` would keep a whole stream node of them), and the cap bounds the size.
redis.call('XADD', KEYS[4], 'MINID', kept_since(now, ARGV[9]), '*', 'lead_id', ARGV[6],
  'source', ARGV[7], 'reason', ARGV[4], 'at', string.format('%.0f', now))
redis.call('XTRIM', KEYS[4], 'MAXLEN', '~', ARGV[8])
remove(KEYS[1], ARGV[1], ARGV[2])
return 1
"#;

/// Numbers the replay from the history it appends to, in the same script: a history read
/// before the call could be older than the one revived (another replica revived the lead and it
/// died again in between). Same numbering as [`super::replay_entry`].
const REVIVE_LUA: &str = r#"
-- KEYS[1] ready stream, KEYS[2] record, KEYS[3] dead set
-- ARGV[1] lead id, ARGV[2] lead JSON with the new work, ARGV[3] the replay's Attempt JSON
-- (its number is set here; appended to the history)
if redis.call('ZREM', KEYS[3], ARGV[1]) == 0 then return 0 end
local last = 0
local history = redis.call('HGET', KEYS[2], 'history')
if history and history ~= '' then
  for _, attempt in ipairs(cjson.decode(history)) do
    if tonumber(attempt.number) > last then last = tonumber(attempt.number) end
  end
end
local entry = cjson.decode(ARGV[3])
entry.number = last
append_history(KEYS[2], cjson.encode(entry))
redis.call('HSET', KEYS[2], 'state', 'queued', 'attempt', last + 1, 'lead', ARGV[2])
redis.call('HDEL', KEYS[2], 'last_error', 'dead_reason', 'dead_at')
redis.call('XADD', KEYS[1], '*', 'i', ARGV[1])
return 1
"#;

const DELETE_DEAD_LUA: &str = r#"
-- KEYS[1] record, KEYS[2] dead set
-- ARGV[1] lead id, ARGV[2] record TTL ms, ARGV[3] source, ARGV[4] received_at
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[1], 'lead')
redis.call('HSET', KEYS[1], 'source', ARGV[3], 'received_at', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#;

/// The fields of [`RecordRow`], in order.
const READ_LUA: &str = r#"
-- KEYS[1] dead set, then per lead: its record and its work key
-- ARGV: the lead ids
-- Returns per lead the fields source, received_at, state, attempt, last_error, history, lead,
-- delivery, dead_reason, dead_at, work, dead letter score ('' for each one missing).
local out = {}
for i = 1, #ARGV do
  local record, work = KEYS[2 * i], KEYS[2 * i + 1]
  local f = redis.call('HMGET', record, 'source', 'received_at', 'state', 'attempt',
    'last_error', 'history', 'lead', 'delivery', 'dead_reason', 'dead_at')
  local row = {}
  for j = 1, 10 do row[j] = f[j] or '' end
  row[11] = redis.call('GET', work) or ''
  row[12] = redis.call('ZSCORE', KEYS[1], ARGV[i]) or ''
  out[i] = row
end
return out
"#;

/// Counts by state; also trims the dead-letter log by age, so its entries go `record_ttl` after
/// they were written even while nothing is dead-lettered (every serving process samples the
/// stats every few seconds).
const STATS_LUA: &str = r#"
-- KEYS[1] ready stream, KEYS[2] delayed set, KEYS[3] dead set, KEYS[4] delivered index,
-- KEYS[5] dead-letter log
-- ARGV[1] group, ARGV[2] record TTL ms
-- Returns {ready, leased, delayed, dead, delivered, oldest ready age in ms (-1: none)}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('XTRIM', KEYS[5], 'MINID', string.format('%.0f', math.max(0, now - tonumber(ARGV[2]))))
local len = redis.call('XLEN', KEYS[1])
local pending, last = 0, '0-0'
local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1])
if not groups.err then
  for _, g in ipairs(groups) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == ARGV[1] then
      pending = tonumber(info['pending'])
      last = info['last-delivered-id']
    end
  end
end
local oldest = nil
local first = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)
if first[1] then oldest = tonumber(string.match(first[1][1], '^(%d+)')) end
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'WITHSCORES', 'LIMIT', 0, 1)
if due[2] and (not oldest or tonumber(due[2]) < oldest) then oldest = tonumber(due[2]) end
local due_count = redis.call('ZCOUNT', KEYS[2], '-inf', now)
local kept_since = string.format('%.0f', now - tonumber(ARGV[2]))
return {
  len - pending + due_count,
  pending,
  redis.call('ZCARD', KEYS[2]) - due_count,
  redis.call('ZCARD', KEYS[3]),
  redis.call('ZCOUNT', KEYS[4], '(' .. kept_since, '+inf'),
  oldest and math.max(0, now - oldest) or -1,
}
"#;

/// GCRA without burst: a slot every `interval` µs, on the server's clock.
const ACQUIRE_LUA: &str = r#"
-- KEYS[1] the limiter's theoretical arrival time (µs)
-- ARGV[1] interval between slots in µs
-- Returns 0 when the slot is taken, else the µs to wait before asking again.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat > now then return tat - now end
redis.call('SET', KEYS[1], string.format('%.0f', now + interval), 'PX',
  math.ceil(interval / 1000) + 1000)
return 0
"#;

/// Sets the operator's pause unless one is in force, and answers the one in force.
const PAUSE_LUA: &str = r#"
-- KEYS[1] the operator pause; ARGV[1] OperatorPause JSON
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"#;

/// The names of a queue's keys.
struct Keys {
    tag: String,
    schema: String,
    ready: String,
    delayed: String,
    dead: String,
    deadlog: String,
    delivered: String,
    upstream: String,
    paused: String,
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
            schema: format!("{tag}:schema"),
            ready: format!("{tag}:ready"),
            delayed: format!("{tag}:delayed"),
            dead: format!("{tag}:dead"),
            deadlog: format!("{tag}:deadlog"),
            delivered: format!("{tag}:delivered"),
            upstream: format!("{tag}:upstream"),
            paused: format!("{tag}:paused"),
            tag,
        })
    }

    fn record(&self, id: impl std::fmt::Display) -> String {
        format!("{}:lead:{id}", self.tag)
    }

    fn work(&self, id: impl std::fmt::Display) -> String {
        format!("{}:work:{id}", self.tag)
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
    open: Script,
    enqueue: Script,
    lease: Script,
    hydrate: Script,
    delivered: Script,
    retry: Script,
    dead: Script,
    revive: Script,
    delete_dead: Script,
    read: Script,
    stats: Script,
    acquire: Script,
    prune: Script,
    pause: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            open: Script::new(OPEN_LUA),
            enqueue: Script::new(ENQUEUE_LUA),
            lease: Script::new(LEASE_LUA),
            hydrate: Script::new(HYDRATE_LUA),
            delivered: Script::new(&format!("{SETTLE_COMMON_LUA}{SETTLE_DELIVERED_LUA}")),
            retry: Script::new(&format!("{SETTLE_COMMON_LUA}{SETTLE_RETRY_LUA}")),
            dead: Script::new(&format!("{SETTLE_COMMON_LUA}{SETTLE_DEAD_LUA}")),
            revive: Script::new(&format!("{SETTLE_COMMON_LUA}{REVIVE_LUA}")),
            delete_dead: Script::new(DELETE_DEAD_LUA),
            read: Script::new(READ_LUA),
            stats: Script::new(STATS_LUA),
            acquire: Script::new(ACQUIRE_LUA),
            prune: Script::new(PRUNE_LUA),
            pause: Script::new(PAUSE_LUA),
        }
    }
}

/// How to reach Redis.
pub struct Connect<'a> {
    /// One URL, or with `cluster` a comma-separated list of seed node URLs.
    pub url: &'a SecretString,
    pub cluster: bool,
    /// Trusted CA certificates (PEM) for `rediss://`.
    pub ca_file: Option<&'a Path>,
}

/// A connection of any kind; every command of the queue goes through one of these.
#[derive(Clone)]
enum Conn {
    Manager(ConnectionManager),
    Multiplexed(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Manager(c) => c.req_packed_command(cmd),
            Conn::Multiplexed(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Manager(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Multiplexed(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Manager(c) => c.get_db(),
            Conn::Multiplexed(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Opens the dedicated connections for blocking reads.
#[allow(clippy::large_enum_variant, reason = "one per queue")]
enum Dialer {
    Single(redis::Client),
    /// Built without a response timeout: each blocking read has its own.
    Cluster(ClusterClient),
}

impl Dialer {
    async fn dial(&self) -> Result<Conn> {
        match self {
            Dialer::Single(client) => {
                // Response timeouts are enforced per read, since each read blocks for a
                // different time.
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(None);
                timed(client.get_multiplexed_async_connection_with_config(&config))
                    .await
                    .map(Conn::Multiplexed)
            }
            Dialer::Cluster(client) => timed(client.get_async_connection())
                .await
                .map(Conn::Cluster),
        }
    }
}

/// One enqueue waiting for the writer task.
struct EnqueueRequest {
    lead_id: String,
    lead: String,
    record_key: String,
    idempotency_key: Option<String>,
    /// The key as the caller gave it, to judge a repeat ([`IdempotencyKey::repeat`]).
    idempotency: Option<IdempotencyKey>,
    answer: oneshot::Sender<Result<Enqueued>>,
}

#[derive(Clone)]
pub struct RedisQueue {
    inner: Arc<Inner>,
}

struct Inner {
    dialer: Dialer,
    conn: Conn,
    keys: Keys,
    scripts: Arc<Scripts>,
    consumer: String,
    settings: QueueSettings,
    enqueues: mpsc::Sender<EnqueueRequest>,
    /// Idle dedicated connections for blocking reads.
    blocking: Mutex<Vec<Conn>>,
    /// Where the next `XAUTOCLAIM` scan of the pending list starts.
    claim_cursor: Mutex<String>,
}

impl RedisQueue {
    pub async fn open(
        connect: &Connect<'_>,
        prefix: &str,
        settings: QueueSettings,
        consumer: &str,
    ) -> Result<Self> {
        // The Redis client's TLS builds its rustls configuration with the process default
        // provider.
        crate::tls::install_default_provider();
        let keys = Keys::new(prefix)?;
        let certs = match connect.ca_file {
            Some(path) => Some(read_ca(path)?),
            None => None,
        };
        let url = connect.url.expose_secret();
        let (conn, dialer) = if connect.cluster {
            open_cluster(url, certs).await?
        } else {
            open_single(url, certs).await?
        };

        let scripts = Arc::new(Scripts::new());
        let mut setup = conn.clone();
        let found: String = timed(
            scripts
                .open
                .key(&keys.schema)
                .key(&keys.ready)
                .key(&keys.delayed)
                .key(&keys.dead)
                .arg(SCHEMA_VERSION)
                .invoke_async(&mut setup),
        )
        .await?;
        check_schema(&found, prefix)?;
        let created: redis::RedisResult<()> =
            setup.xgroup_create_mkstream(&keys.ready, GROUP, "0").await;
        match created {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(map_err(e)),
        }

        let (enqueues, requests) = mpsc::channel(ENQUEUE_CHANNEL);
        tokio::spawn(write_enqueues(
            conn.clone(),
            scripts.clone(),
            keys.ready.clone(),
            ttl_ms(settings.idempotency_ttl),
            requests,
        ));
        let queue = Self {
            inner: Arc::new(Inner {
                dialer,
                conn,
                keys,
                scripts,
                consumer: consumer.to_owned(),
                settings,
                enqueues,
                blocking: Mutex::new(Vec::new()),
                claim_cursor: Mutex::new("0-0".to_owned()),
            }),
        };
        match queue.prune_consumers(CONSUMER_PRUNE_IDLE).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                removed = n,
                "Removed the consumers of processes that are gone"
            ),
            Err(e) => tracing::warn!(error = %e, "Could not prune idle consumers"),
        }
        Ok(queue)
    }

    /// Removes from the consumer group every other consumer that holds no pending entry and
    /// has been idle for at least `min_idle`. Returns how many were removed.
    pub async fn prune_consumers(&self, min_idle: Duration) -> Result<u64> {
        let inner = &self.inner;
        let mut conn = inner.conn.clone();
        timed(
            inner
                .scripts
                .prune
                .key(&inner.keys.ready)
                .arg(GROUP)
                .arg(u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX))
                .arg(&inner.consumer)
                .invoke_async(&mut conn),
        )
        .await
    }

    pub async fn enqueue(
        &self,
        lead: &QueuedLead,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<Enqueued> {
        let json = serde_json::to_string(lead).map_err(anyhow::Error::from)?;
        let (answer, answered) = oneshot::channel();
        let request = EnqueueRequest {
            lead_id: lead.id.to_string(),
            lead: json,
            record_key: self.inner.keys.record(lead.id),
            idempotency_key: idempotency.map(|k| self.inner.keys.idempotency(k)),
            idempotency: idempotency.cloned(),
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
        let settings = &self.inner.settings;
        let id = lease.lead.id;
        let mut conn = self.inner.conn.clone();
        let applied: i64 = match how {
            Settle::Delivered { delivery, attempt } => {
                timed(
                    scripts
                        .delivered
                        .key(&keys.ready)
                        .key(keys.record(id))
                        .key(keys.work(id))
                        .key(&keys.delivered)
                        .key(&keys.dead)
                        .arg(GROUP)
                        .arg(stream_id)
                        .arg(deliveries)
                        .arg(to_json(&delivery)?)
                        .arg(attempt_json(attempt.as_ref())?)
                        .arg(ttl_ms(settings.pii_ttl.min(settings.record_ttl)))
                        .arg(ttl_ms(settings.record_ttl))
                        .arg(id.to_string())
                        .arg(&lease.lead.source)
                        .arg(timestamp(lease.lead.received_at))
                        .invoke_async(&mut conn),
                )
                .await?
            }
            Settle::RetryLater {
                delay,
                reason,
                count_attempt,
                attempt,
                work,
            } => {
                let next = if count_attempt {
                    lease.attempt.saturating_add(1)
                } else {
                    lease.attempt
                };
                let lead = match work {
                    Some(work) => to_json(&QueuedLead {
                        work,
                        ..lease.lead.clone()
                    })?,
                    None => String::new(),
                };
                timed(
                    scripts
                        .retry
                        .key(&keys.ready)
                        .key(&keys.delayed)
                        .key(keys.record(id))
                        .arg(GROUP)
                        .arg(stream_id)
                        .arg(deliveries)
                        .arg(
                            u64::try_from(delay.as_millis())
                                .unwrap_or(MAX_TTL_MS)
                                .min(MAX_TTL_MS),
                        )
                        .arg(reason)
                        .arg(next)
                        .arg(attempt_json(attempt.as_ref())?)
                        .arg(lead)
                        .arg(id.to_string())
                        .invoke_async(&mut conn),
                )
                .await?
            }
            Settle::Dead { reason, attempt } => {
                timed(
                    scripts
                        .dead
                        .key(&keys.ready)
                        .key(keys.record(id))
                        .key(&keys.dead)
                        .key(&keys.deadlog)
                        .arg(GROUP)
                        .arg(stream_id)
                        .arg(deliveries)
                        .arg(reason)
                        .arg(attempt_json(attempt.as_ref())?)
                        .arg(id.to_string())
                        .arg(&lease.lead.source)
                        .arg(DEADLOG_MAXLEN)
                        .arg(ttl_ms(settings.record_ttl))
                        .invoke_async(&mut conn),
                )
                .await?
            }
        };
        if applied == 0 {
            tracing::info!(
                lead_id = %id,
                "A settle came from a lease that had expired and been taken again; it was ignored."
            );
        }
        Ok(())
    }

    pub async fn delivery_of(&self, id: LeadId) -> Result<Option<Delivery>> {
        let mut conn = self.inner.conn.clone();
        let (state, delivery): (Option<String>, Option<String>) = timed(
            redis::cmd("HMGET")
                .arg(self.inner.keys.record(id))
                .arg("state")
                .arg("delivery")
                .query_async(&mut conn),
        )
        .await?;
        match (state.as_deref(), delivery) {
            (Some("delivered"), Some(delivery)) => Ok(Some(from_json(&delivery, "delivery")?)),
            _ => Ok(None),
        }
    }

    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.inner.conn.clone();
        let ids: Vec<String> = timed(conn.zrevrange(
            &self.inner.keys.dead,
            0,
            isize::try_from(limit - 1).unwrap_or(isize::MAX),
        ))
        .await?;
        let rows = self.read_records(&ids).await?;
        // A dead letter revived or deleted between the two reads is simply not listed.
        Ok(ids
            .iter()
            .zip(rows)
            .filter_map(|(id, row)| match row.dead_letter(id) {
                Ok(letter) => letter,
                Err(e) => {
                    tracing::error!(lead_id = %id, error = %e, "A dead letter could not be read.");
                    None
                }
            })
            .collect())
    }

    pub async fn stats(&self) -> Result<Stats> {
        let keys = &self.inner.keys;
        let mut conn = self.inner.conn.clone();
        let (ready, leased, delayed, dead, delivered, oldest): (u64, u64, u64, u64, u64, i64) =
            timed(
                self.inner
                    .scripts
                    .stats
                    .key(&keys.ready)
                    .key(&keys.delayed)
                    .key(&keys.dead)
                    .key(&keys.delivered)
                    .key(&keys.deadlog)
                    .arg(GROUP)
                    .arg(ttl_ms(self.inner.settings.record_ttl))
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(Stats {
            ready,
            leased,
            delayed,
            dead,
            delivered,
            oldest_ready_ms: u64::try_from(oldest).unwrap_or(0),
        })
    }

    pub async fn lead(&self, id: LeadId) -> Result<Option<LeadRecord>> {
        let id = id.to_string();
        let row = self.read_records(std::slice::from_ref(&id)).await?;
        match row.into_iter().next() {
            Some(row) => row.record(&id),
            None => Ok(None),
        }
    }

    pub async fn dead_letter(&self, id: LeadId) -> Result<Option<DeadLetter>> {
        let id = id.to_string();
        let row = self.read_records(std::slice::from_ref(&id)).await?;
        match row.into_iter().next() {
            Some(row) => row.dead_letter(&id),
            None => Ok(None),
        }
    }

    pub async fn revive(&self, id: LeadId, work: Work) -> Result<bool> {
        // The lead's data but its work is fixed at enqueue, so reading it first cannot race;
        // the script re-checks that the dead letter is still there and numbers the replay
        // from the history it finds then.
        let Some(letter) = self.dead_letter(id).await? else {
            return Ok(false);
        };
        let replayed_at = Utc::now();
        let (entry, _) = super::replay_entry(&[], replayed_at);
        let lead = QueuedLead {
            work,
            replayed_at: Some(replayed_at),
            ..letter.lead
        };
        let keys = &self.inner.keys;
        let mut conn = self.inner.conn.clone();
        let revived: i64 = timed(
            self.inner
                .scripts
                .revive
                .key(&keys.ready)
                .key(keys.record(id))
                .key(&keys.dead)
                .arg(id.to_string())
                .arg(to_json(&lead)?)
                .arg(to_json(&entry)?)
                .invoke_async(&mut conn),
        )
        .await?;
        Ok(revived == 1)
    }

    pub async fn delete_dead(&self, id: LeadId) -> Result<bool> {
        // The record keeps where and when the lead came from once its data is gone; they are
        // fixed at enqueue, so reading them first cannot race.
        let Some(letter) = self.dead_letter(id).await? else {
            return Ok(false);
        };
        let keys = &self.inner.keys;
        let mut conn = self.inner.conn.clone();
        let deleted: i64 = timed(
            self.inner
                .scripts
                .delete_dead
                .key(keys.record(id))
                .key(&keys.dead)
                .arg(id.to_string())
                .arg(ttl_ms(self.inner.settings.record_ttl))
                .arg(&letter.lead.source)
                .arg(timestamp(letter.lead.received_at))
                .invoke_async(&mut conn),
        )
        .await?;
        Ok(deleted == 1)
    }

    pub async fn acquire_upstream(&self, per_second: NonZeroU32) -> Result<Duration> {
        // Rounded up: the limit is never exceeded, at the cost of a slightly lower rate when a
        // second does not divide evenly.
        let interval_us = 1_000_000u64.div_ceil(u64::from(per_second.get()));
        let mut conn = self.inner.conn.clone();
        let wait_us: u64 = timed(
            self.inner
                .scripts
                .acquire
                .key(&self.inner.keys.upstream)
                .arg(interval_us)
                .invoke_async(&mut conn),
        )
        .await?;
        Ok(Duration::from_micros(wait_us))
    }

    pub async fn pause_delivery(&self, pause: &OperatorPause) -> Result<OperatorPause> {
        let mut conn = self.inner.conn.clone();
        let stored: String = timed(
            self.inner
                .scripts
                .pause
                .key(&self.inner.keys.paused)
                .arg(to_json(pause)?)
                .invoke_async(&mut conn),
        )
        .await?;
        from_json(&stored, "operator pause")
    }

    pub async fn resume_delivery(&self) -> Result<bool> {
        let mut conn = self.inner.conn.clone();
        let removed: i64 = timed(conn.del(&self.inner.keys.paused)).await?;
        Ok(removed > 0)
    }

    pub async fn operator_pause(&self) -> Result<Option<OperatorPause>> {
        let mut conn = self.inner.conn.clone();
        let stored: Option<String> = timed(conn.get(&self.inner.keys.paused)).await?;
        stored
            .map(|json| from_json(&json, "operator pause"))
            .transpose()
    }

    /// Reads the server's persistence and eviction settings (on a cluster, those of the node
    /// holding the queue's slot).
    pub async fn durability_warning(&self) -> Result<Option<String>> {
        let mut config = Vec::new();
        for name in [
            "appendonly",
            "appendfsync",
            "save",
            "maxmemory",
            "maxmemory-policy",
        ] {
            match self.config_get(name).await {
                Ok(value) => config.push(value),
                Err(e) if is_refusal(&e) => {
                    return Ok(Some(format!(
                        "Redis refused CONFIG GET ({}), so leadgate could not check how it \
                         persists and evicts (managed Redis often disables CONFIG). Make sure it \
                         runs with appendonly yes, appendfsync everysec or always, and \
                         maxmemory-policy noeviction: otherwise accepted leads can be lost.",
                        e.code().unwrap_or("an error")
                    )));
                }
                Err(e) => return Err(map_err(e)),
            }
        }
        let [appendonly, appendfsync, save, maxmemory, policy] =
            <[String; 5]>::try_from(config).unwrap_or_default();
        Ok(durability_findings(
            &appendonly,
            &appendfsync,
            &save,
            &maxmemory,
            &policy,
        ))
    }

    pub async fn ping(&self) -> Result<()> {
        let mut conn = self.inner.conn.clone();
        if let Conn::Cluster(cluster) = &mut conn {
            // A bare PING goes to any node; ask the one that holds the queue.
            let route = self.slot_route();
            return timed(cluster.route_command(redis::cmd("PING"), route))
                .await
                .map(drop);
        }
        timed(redis::cmd("PING").query_async::<()>(&mut conn)).await
    }

    fn slot_route(&self) -> RoutingInfo {
        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::with_key(
            self.inner.keys.tag.as_bytes(),
            SlotAddr::Master,
        )))
    }

    async fn config_get(&self, name: &str) -> redis::RedisResult<String> {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg(name);
        let mut conn = self.inner.conn.clone();
        let reply = tokio::time::timeout(OPERATION_TIMEOUT, async {
            match &mut conn {
                Conn::Cluster(cluster) => {
                    let value = cluster.route_command(cmd, self.slot_route()).await?;
                    redis::from_redis_value::<std::collections::HashMap<String, String>>(value)
                        .map_err(RedisError::from)
                }
                _ => {
                    cmd.query_async::<std::collections::HashMap<String, String>>(&mut conn)
                        .await
                }
            }
        })
        .await
        .map_err(|_| RedisError::from((ErrorKind::Io, "CONFIG GET timed out")))??;
        Ok(reply.get(name).cloned().unwrap_or_default())
    }

    /// Reads the records (and data) of some leads in one script call.
    async fn read_records(&self, ids: &[String]) -> Result<Vec<RecordRow>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys = &self.inner.keys;
        let mut call = self.inner.scripts.read.prepare_invoke();
        call.key(&keys.dead);
        for id in ids {
            call.key(keys.record(id)).key(keys.work(id)).arg(id);
        }
        let mut conn = self.inner.conn.clone();
        let rows: Vec<Vec<String>> = timed(call.invoke_async(&mut conn)).await?;
        Ok(rows.into_iter().map(RecordRow).collect())
    }

    /// One lease script call: returns what it leased and how long until the next retry is due.
    async fn lease_now(&self, max: usize) -> Result<(Vec<Lease>, Option<Duration>)> {
        let inner = &self.inner;
        let cursor = inner.claim_cursor.lock().unwrap().clone();
        let mut conn = inner.conn.clone();
        let asked = std::time::Instant::now();
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
        let leases = self.hydrate(leased, asked).await?;
        let next_due = u64::try_from(next_due).ok().map(Duration::from_millis);
        Ok((leases, next_due))
    }

    /// Reads the leads of leased entries `(stream id, deliveries, lead id)`. If this fails the
    /// entries stay pending and come back after the lease timeout.
    async fn hydrate(
        &self,
        leased: Vec<(String, i64, String)>,
        asked: std::time::Instant,
    ) -> Result<Vec<Lease>> {
        if leased.is_empty() {
            return Ok(Vec::new());
        }
        let keys = &self.inner.keys;
        let mut call = self.inner.scripts.hydrate.prepare_invoke();
        call.key(&keys.ready).arg(GROUP);
        for (stream_id, _, lead_id) in &leased {
            call.key(keys.record(lead_id)).arg(stream_id);
        }
        let mut conn = self.inner.conn.clone();
        let rows: Vec<Vec<String>> = timed(call.invoke_async(&mut conn)).await?;
        Ok(leased
            .into_iter()
            .zip(rows)
            .filter_map(|((stream_id, deliveries, lead_id), row)| {
                decode_lease(stream_id, deliveries, &lead_id, row, asked)
            })
            .collect())
    }

    /// Waits up to `block` for new entries on a dedicated connection.
    async fn read_blocking(&self, max: usize, block: Duration) -> Result<Vec<Lease>> {
        let inner = &self.inner;
        let idle = inner.blocking.lock().unwrap().pop();
        let mut conn = match idle {
            Some(conn) => conn,
            None => inner.dialer.dial().await?,
        };
        let block_ms = usize::try_from(block.as_millis())
            .unwrap_or(usize::MAX)
            .max(1);
        let options = StreamReadOptions::default()
            .group(GROUP, &inner.consumer)
            .count(max)
            .block(block_ms);
        let asked = std::time::Instant::now();
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
        let leased = reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(|msg| {
                let lead_id: String = msg.get("i").unwrap_or_default();
                (msg.id, 1, lead_id)
            })
            .collect();
        self.hydrate(leased, asked).await
    }
}

async fn open_single(url: &str, certs: Option<TlsCertificates>) -> Result<(Conn, Dialer)> {
    let url = url.trim();
    let client = match certs {
        Some(certs) if url.starts_with("rediss://") => redis::Client::build_with_tls(url, certs),
        _ => redis::Client::open(url),
    }
    .map_err(invalid_url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        // Fail the waiting command quickly while Redis is down; the next command starts a
        // new reconnection attempt, so the queue recovers by itself.
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(Duration::from_millis(500));
    let conn = timed(client.get_connection_manager_with_config(config)).await?;
    Ok((Conn::Manager(conn), Dialer::Single(client)))
}

async fn open_cluster(urls: &str, certs: Option<TlsCertificates>) -> Result<(Conn, Dialer)> {
    let nodes = seed_urls(urls);
    let tls = nodes.iter().any(|u| u.starts_with("rediss://"));
    let build = |response_timeout: Option<Duration>| {
        let mut builder = ClusterClientBuilder::new(nodes.clone())
            .connection_timeout(CONNECT_TIMEOUT)
            // Like the single-node client: fail fast while the cluster is unreachable, and
            // leave the waiting to the caller (a 503, a lease loop that tries again).
            .retries(2);
        if let Some(timeout) = response_timeout {
            builder = builder.response_timeout(timeout);
        }
        if let (true, Some(certs)) = (tls, &certs) {
            builder = builder.certs(certs.clone());
        }
        builder.build().map_err(invalid_url)
    };
    let client = build(Some(RESPONSE_TIMEOUT))?;
    let blocking = build(None)?;
    let conn = timed(client.get_async_connection()).await?;
    Ok((Conn::Cluster(conn), Dialer::Cluster(blocking)))
}

/// Splits a comma-separated list of URLs; a comma not followed by a scheme belongs to the URL
/// before it (a password may hold one).
pub fn seed_urls(list: &str) -> Vec<String> {
    let mut urls: Vec<String> = Vec::new();
    for part in list.split(',') {
        let trimmed = part.trim_start();
        match urls.last_mut() {
            Some(last)
                if !(trimmed.starts_with("redis://") || trimmed.starts_with("rediss://")) =>
            {
                last.push(',');
                last.push_str(part);
            }
            _ => urls.push(trimmed.to_owned()),
        }
    }
    urls.into_iter()
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect()
}

fn read_ca(path: &Path) -> Result<TlsCertificates> {
    let pem = std::fs::read(path).map_err(|e| {
        Error::Other(anyhow::anyhow!(
            "cannot read the CA file {} for Redis TLS: {e}",
            path.display()
        ))
    })?;
    Ok(TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    })
}

/// The URL may carry a password: errors about it must not echo it.
fn invalid_url(e: RedisError) -> Error {
    Error::Other(anyhow::anyhow!(
        "the redis URL is not valid ({:?}{})",
        e.kind(),
        e.detail().map(|d| format!(": {d}")).unwrap_or_default()
    ))
}

fn check_schema(found: &str, prefix: &str) -> Result<()> {
    match found {
        "" => Ok(()),
        "old" => Err(Error::Other(anyhow::anyhow!(
            "the Redis queue {{{prefix}}} holds leads in the layout of an older leadgate (before \
             lead records); let that version deliver them (or move its keys away), then start \
             this one"
        ))),
        version => match version.parse::<i64>() {
            Ok(SCHEMA_VERSION) => Ok(()),
            _ => Err(Error::Other(anyhow::anyhow!(
                "the Redis queue {{{prefix}}} has layout version {version:?}; this build knows \
                 {SCHEMA_VERSION}"
            ))),
        },
    }
}

/// The warning for a server's persistence and eviction settings, or `None` when they keep
/// every acknowledged lead.
fn durability_findings(
    appendonly: &str,
    appendfsync: &str,
    save: &str,
    maxmemory: &str,
    policy: &str,
) -> Option<String> {
    let mut findings = Vec::new();
    if appendonly != "yes" {
        let since = if save.trim().is_empty() {
            "every queued lead is lost, since it takes no RDB snapshots either (save \"\")"
                .to_owned()
        } else {
            format!(
                "every lead accepted since its last RDB snapshot (save {save:?}) is lost, and \
                 delivered leads may be sent again"
            )
        };
        findings.push(format!(
            "Redis runs without its append-only file (appendonly {appendonly}): if Redis \
             crashes or restarts, {since}. Set appendonly yes with appendfsync everysec (at \
             most about a second at risk) or always (none)."
        ));
    } else if appendfsync == "no" {
        findings.push(
            "Redis writes its append-only file with appendfsync no: the operating system \
             flushes it when it likes (typically every 30 seconds), so a crash of the Redis \
             host can lose that much of the accepted leads. Use appendfsync everysec or always."
                .to_owned(),
        );
    }
    let evicts = maxmemory.trim() != "0";
    if evicts && policy.starts_with("allkeys-") {
        findings.push(format!(
            "Redis may evict any key when it reaches maxmemory (maxmemory-policy {policy}), \
             including queued leads, which would vanish without a trace. Use \
             maxmemory-policy noeviction: enqueues then fail with 503 instead."
        ));
    } else if evicts && policy.starts_with("volatile-") {
        findings.push(format!(
            "Redis may evict keys with a time to live when it reaches maxmemory \
             (maxmemory-policy {policy}). Queued leads have none and are safe, but idempotency \
             keys and delivery records do: evicting them lets a repeated submission or a \
             redelivery create a duplicate lead in Onpipeline. Use maxmemory-policy noeviction."
        ));
    }
    (!findings.is_empty()).then(|| findings.join(" "))
}

/// CONFIG refused by an ACL, renamed away or unknown (managed Redis).
fn is_refusal(e: &RedisError) -> bool {
    matches!(e.code(), Some("NOPERM" | "ERR"))
}

/// Drains the enqueue channel into batched script calls until every sender is gone.
async fn write_enqueues(
    conn: Conn,
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
    conn: &mut Conn,
    scripts: &Scripts,
    ready: &str,
    idempotency_ttl_ms: u64,
    batch: Vec<EnqueueRequest>,
) {
    let mut call = scripts.enqueue.prepare_invoke();
    call.key(ready).arg(idempotency_ttl_ms);
    let mut keys = 1;
    for request in &batch {
        call.key(&request.record_key);
        keys += 1;
        let record_index = keys;
        let key_index = match &request.idempotency_key {
            Some(key) => {
                call.key(key);
                keys += 1;
                keys
            }
            None => 0,
        };
        let claim = match request
            .idempotency
            .as_ref()
            .and_then(|k| k.body_digest.as_ref())
        {
            Some(digest) => format!("{} {digest}", request.lead_id),
            None => request.lead_id.clone(),
        };
        call.arg(&request.lead_id)
            .arg(&request.lead)
            .arg(record_index)
            .arg(key_index)
            .arg(claim);
    }
    let answers: Result<Vec<String>> = timed(call.invoke_async(conn)).await;
    match answers {
        Ok(answers) if answers.len() == batch.len() => {
            for (request, first) in batch.into_iter().zip(answers) {
                let answer = if first.is_empty() {
                    Ok(Enqueued::Queued)
                } else {
                    let (id, digest) = match first.split_once(' ') {
                        Some((id, digest)) => (id, Some(digest)),
                        None => (first.as_str(), None),
                    };
                    id.parse()
                        .map(|first| match &request.idempotency {
                            Some(key) => key.repeat(first, digest),
                            None => Enqueued::Replayed { first },
                        })
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

/// A lead whose record cannot be read is logged and skipped: its entry stays pending, so it is
/// never lost, and comes back (and is logged again) after each lease timeout until an operator
/// removes it.
fn decode_lease(
    stream_id: String,
    deliveries: i64,
    lead_id: &str,
    row: Vec<String>,
    asked: std::time::Instant,
) -> Option<Lease> {
    let mut fields = row.into_iter();
    match fields.next().as_deref() {
        Some("ok") => {}
        Some("delivered") => return None,
        _ => {
            tracing::error!(
                stream_id,
                lead_id,
                "A queue entry has no lead record; it is left pending."
            );
            return None;
        }
    }
    let (lead, attempt, last_error, history) = (
        fields.next().unwrap_or_default(),
        fields.next().unwrap_or_default(),
        fields.next().unwrap_or_default(),
        fields.next().unwrap_or_default(),
    );
    let decoded = serde_json::from_str::<QueuedLead>(&lead)
        .map_err(anyhow::Error::from)
        .and_then(|lead| Ok((lead, attempt.parse::<u32>()?, parse_history(&history)?)));
    match decoded {
        Ok((lead, attempt, history)) => Some(Lease {
            lead,
            attempt,
            last_error: (!last_error.is_empty()).then_some(last_error),
            history,
            leased_at: asked,
            handle: LeaseHandle::Redis {
                stream_id,
                deliveries,
            },
        }),
        Err(e) => {
            tracing::error!(stream_id, lead_id, error = %e, "A queue entry could not be read; it is left pending.");
            None
        }
    }
}

/// The fields [`READ_LUA`] returns for one lead ('' = missing).
struct RecordRow(Vec<String>);

impl RecordRow {
    fn field(&self, n: usize) -> &str {
        self.0.get(n).map(String::as_str).unwrap_or("")
    }

    fn record(&self, id: &str) -> Result<Option<LeadRecord>> {
        let data = match (self.field(6), self.field(10)) {
            ("", "") => None,
            ("", work) => Some(work),
            (lead, _) => Some(lead),
        };
        let lead = data
            .map(|json| from_json::<QueuedLead>(json, "lead"))
            .transpose()?;
        let state = match self.field(2) {
            "" if lead.is_none() => return Ok(None),
            "" | "queued" => LeadState::Queued,
            "delivered" => LeadState::Delivered,
            "dead" => LeadState::Dead,
            other => {
                return Err(corrupt(id, anyhow::anyhow!("unknown state {other:?}")));
            }
        };
        // Written into the record when the data leaves it; read from the data until then.
        let (source, received_at) = match (&lead, self.field(0)) {
            (Some(lead), "") => (lead.source.clone(), lead.received_at),
            (_, source) => (
                source.to_owned(),
                parse_timestamp(self.field(1)).map_err(|e| corrupt(id, e))?,
            ),
        };
        Ok(Some(LeadRecord {
            id: id.parse().map_err(|e| corrupt(id, anyhow::Error::new(e)))?,
            source,
            received_at,
            state,
            attempts: parse_history(self.field(5)).map_err(|e| corrupt(id, e))?,
            delivery: match self.field(7) {
                "" => None,
                json => Some(from_json(json, "delivery")?),
            },
            dead_reason: Some(self.field(8))
                .filter(|r| !r.is_empty())
                .map(str::to_owned),
            work: lead.map(|lead| lead.work),
        }))
    }

    /// `None` unless the lead is in the dead letters (with its data).
    fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>> {
        if self.field(11).is_empty() || self.field(2) != "dead" || self.field(6).is_empty() {
            return Ok(None);
        }
        let at_ms: i64 = self.field(9).parse().unwrap_or(0);
        Ok(Some(DeadLetter {
            lead: from_json(self.field(6), "dead letter")?,
            attempts: self.field(3).parse().unwrap_or(1),
            reason: self.field(8).to_owned(),
            at: DateTime::<Utc>::from_timestamp_millis(at_ms).unwrap_or_default(),
            history: parse_history(self.field(5)).map_err(|e| corrupt(id, e))?,
        }))
    }
}

fn corrupt(id: &str, e: anyhow::Error) -> Error {
    Error::Other(e.context(format!("corrupt record of lead {id}")))
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

fn parse_timestamp(text: &str) -> anyhow::Result<DateTime<Utc>> {
    Ok(DateTime::parse_from_rfc3339(text)?.with_timezone(&Utc))
}

fn attempt_json(attempt: Option<&Attempt>) -> Result<String> {
    attempt.map_or_else(|| Ok(String::new()), to_json)
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String> {
    Ok(serde_json::to_string(value).map_err(anyhow::Error::from)?)
}

fn from_json<T: serde::de::DeserializeOwned>(json: &str, what: &str) -> Result<T> {
    serde_json::from_str(json)
        .map_err(|e| Error::Other(anyhow::Error::new(e).context(format!("corrupt {what} record"))))
}

/// Milliseconds for `PX` and friends, which reject 0 and values that overflow.
fn ttl_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(MAX_TTL_MS)
        .clamp(1, MAX_TTL_MS)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_urls_split_at_commas_before_a_scheme_only() {
        assert_eq!(
            seed_urls("redis://:pa,ss@10.0.0.1:6379, rediss://10.0.0.2:6379/"),
            vec!["redis://:pa,ss@10.0.0.1:6379", "rediss://10.0.0.2:6379/"]
        );
    }

    #[test]
    fn durable_settings_have_no_finding_and_each_risk_is_named() {
        assert_eq!(
            durability_findings("yes", "everysec", "", "0", "noeviction"),
            None
        );
        assert_eq!(
            durability_findings("yes", "always", "", "1gb", "noeviction"),
            None
        );
        // Without maxmemory nothing is evicted, whatever the policy.
        assert_eq!(
            durability_findings("yes", "always", "", "0", "allkeys-lru"),
            None
        );
        let all = durability_findings("no", "everysec", "3600 1", "1gb", "allkeys-lfu").unwrap();
        assert!(
            all.contains("appendonly no") && all.contains("allkeys-lfu"),
            "{all}"
        );
    }

    #[test]
    fn an_older_or_newer_layout_is_refused() {
        assert!(check_schema("", "p").is_ok());
        assert!(check_schema("2", "p").is_ok());
        assert!(check_schema("old", "p").is_err());
        assert!(check_schema("3", "p").is_err());
    }
}
