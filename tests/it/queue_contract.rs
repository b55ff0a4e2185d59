//! The queue contract (see `src/queue/mod.rs`), run against both backends: every test body
//! below is an `async fn(Kind)`, and `contract!` generates one test per backend from it.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures_util::future::join_all;
use leadgate::lead::{MetaLeadRef, QueuedLead, Work};
use leadgate::queue::{
    Attempt, AttemptOutcome, Backend, Delivery, Enqueued, Error, IdempotencyKey, LeadState, Queue,
    QueueSettings, Settle, Stats,
};
use secrecy::SecretString;
use tokio::time::Instant;

use crate::helpers::redis::{RedisCluster, RedisOptions, RedisServer};
use crate::helpers::{eventually, lead};

/// `contract!(module = Kind, … => [test, …])` runs each listed `async fn(Kind)` once per kind,
/// as `module::test`.
macro_rules! contract {
    ($($module:ident = $kind:ident),+ => $tests:tt) => {
        $( contract!(@one $module $kind $tests); )+
    };
    (@one $module:ident $kind:ident [$($name:ident),+ $(,)?]) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::$kind).await
                }
            )+
        }
    };
}

contract!(redis = Redis, embedded = Embedded => [
    enqueued_lead_is_leased_once_with_attempt_one,
    replayed_idempotency_key_returns_the_first_id_and_queues_nothing,
    an_idempotency_key_repeated_with_another_body_digest_is_a_conflict_and_queues_nothing,
    delivered_lease_leaves_the_queue_and_records_the_delivery,
    retry_later_hides_the_entry_until_its_delay_and_counts_the_attempt,
    retry_later_that_does_not_count_keeps_the_attempt,
    dead_lease_moves_to_the_dead_letters_with_its_reason,
    unsettled_lease_is_redelivered_after_the_lease_timeout_and_its_late_settle_is_ignored,
    concurrent_consumers_never_lease_the_same_entry,
    acknowledged_enqueue_survives_reopening_the_queue,
    stats_count_entries_by_state,
    waiting_lease_returns_as_soon_as_a_lead_is_enqueued,
    a_failing_enqueue_fails_alone_and_not_the_enqueues_batched_with_it,
    idempotency_keys_and_delivered_records_expire_after_their_ttl,
    attempts_travel_with_retry_copies_into_the_dead_letter_and_the_record,
    retry_later_with_new_work_hands_the_new_work_to_the_next_lease,
    lead_record_follows_the_lead_from_enqueue_to_delivery,
    delivered_lead_data_is_purged_after_pii_ttl_and_its_record_kept,
    late_delivered_settle_is_recorded_and_the_copy_still_queued_is_not_leased_again,
    revived_dead_letter_is_leased_again_numbered_after_its_history_with_the_replay_in_it,
    deleted_dead_letter_loses_its_data_and_keeps_its_record,
    dead_letters_are_listed_newest_first,
    stats_count_delivered_records_and_how_long_the_oldest_ready_lead_waits,
    upstream_rate_limit_is_never_exceeded_by_concurrent_callers,
    operator_pause_is_shared_by_every_process_kept_across_reopening_and_cleared_by_resume,
]);

// A Redis Cluster of three masters: the keys share one slot, blocking reads go to its node.
// Every contract test but one: `a_failing_enqueue_…` corrupts a key through a single-node
// client, which a cluster harness does not have. (Its cluster is not restarted: reopening the
// queue is what `acknowledged_enqueue_…` and `operator_pause_…` prove here.)
contract!(cluster = Cluster => [
    enqueued_lead_is_leased_once_with_attempt_one,
    replayed_idempotency_key_returns_the_first_id_and_queues_nothing,
    an_idempotency_key_repeated_with_another_body_digest_is_a_conflict_and_queues_nothing,
    delivered_lease_leaves_the_queue_and_records_the_delivery,
    retry_later_hides_the_entry_until_its_delay_and_counts_the_attempt,
    retry_later_that_does_not_count_keeps_the_attempt,
    dead_lease_moves_to_the_dead_letters_with_its_reason,
    unsettled_lease_is_redelivered_after_the_lease_timeout_and_its_late_settle_is_ignored,
    concurrent_consumers_never_lease_the_same_entry,
    acknowledged_enqueue_survives_reopening_the_queue,
    stats_count_entries_by_state,
    waiting_lease_returns_as_soon_as_a_lead_is_enqueued,
    idempotency_keys_and_delivered_records_expire_after_their_ttl,
    attempts_travel_with_retry_copies_into_the_dead_letter_and_the_record,
    retry_later_with_new_work_hands_the_new_work_to_the_next_lease,
    lead_record_follows_the_lead_from_enqueue_to_delivery,
    delivered_lead_data_is_purged_after_pii_ttl_and_its_record_kept,
    late_delivered_settle_is_recorded_and_the_copy_still_queued_is_not_leased_again,
    revived_dead_letter_is_leased_again_numbered_after_its_history_with_the_replay_in_it,
    deleted_dead_letter_loses_its_data_and_keeps_its_record,
    dead_letters_are_listed_newest_first,
    stats_count_delivered_records_and_how_long_the_oldest_ready_lead_waits,
    upstream_rate_limit_is_never_exceeded_by_concurrent_callers,
    operator_pause_is_shared_by_every_process_kept_across_reopening_and_cleared_by_resume,
]);

// `rediss://` to a server whose certificate chains to the CA given as `ca_file`: the whole
// contract, as on a plain Redis.
contract!(tls = RedisTls => [
    enqueued_lead_is_leased_once_with_attempt_one,
    replayed_idempotency_key_returns_the_first_id_and_queues_nothing,
    an_idempotency_key_repeated_with_another_body_digest_is_a_conflict_and_queues_nothing,
    delivered_lease_leaves_the_queue_and_records_the_delivery,
    retry_later_hides_the_entry_until_its_delay_and_counts_the_attempt,
    retry_later_that_does_not_count_keeps_the_attempt,
    dead_lease_moves_to_the_dead_letters_with_its_reason,
    unsettled_lease_is_redelivered_after_the_lease_timeout_and_its_late_settle_is_ignored,
    concurrent_consumers_never_lease_the_same_entry,
    acknowledged_enqueue_survives_reopening_the_queue,
    stats_count_entries_by_state,
    waiting_lease_returns_as_soon_as_a_lead_is_enqueued,
    a_failing_enqueue_fails_alone_and_not_the_enqueues_batched_with_it,
    idempotency_keys_and_delivered_records_expire_after_their_ttl,
    attempts_travel_with_retry_copies_into_the_dead_letter_and_the_record,
    retry_later_with_new_work_hands_the_new_work_to_the_next_lease,
    lead_record_follows_the_lead_from_enqueue_to_delivery,
    delivered_lead_data_is_purged_after_pii_ttl_and_its_record_kept,
    late_delivered_settle_is_recorded_and_the_copy_still_queued_is_not_leased_again,
    revived_dead_letter_is_leased_again_numbered_after_its_history_with_the_replay_in_it,
    deleted_dead_letter_loses_its_data_and_keeps_its_record,
    dead_letters_are_listed_newest_first,
    stats_count_delivered_records_and_how_long_the_oldest_ready_lead_waits,
    upstream_rate_limit_is_never_exceeded_by_concurrent_callers,
    operator_pause_is_shared_by_every_process_kept_across_reopening_and_cleared_by_resume,
]);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Redis,
    Embedded,
    Cluster,
    RedisTls,
}

/// One queue store for one test: its own `redis-server` (or cluster), or its own SQLite
/// directory.
struct Harness {
    kind: Kind,
    backend: Backend,
    settings: QueueSettings,
    redis: Option<RedisServer>,
    _cluster: Option<RedisCluster>,
    _dir: Option<tempfile::TempDir>,
}

impl Harness {
    fn new(kind: Kind) -> Self {
        Self::with(kind, fast(), false)
    }

    /// Redis persists every write before answering (append-only file, fsync always); the
    /// embedded queue always does.
    fn durable(kind: Kind) -> Self {
        Self::with(kind, fast(), true)
    }

    fn with(kind: Kind, settings: QueueSettings, durable: bool) -> Self {
        let redis_backend = |url: String, cluster: bool, ca_file| Backend::Redis {
            url: SecretString::from(url),
            prefix: "leadgate-test".into(),
            cluster,
            ca_file,
        };
        let mut harness = Self {
            kind,
            backend: Backend::Embedded {
                fsync: leadgate::queue::Fsync::Always,
                dir: std::path::PathBuf::new(),
            },
            settings,
            redis: None,
            _cluster: None,
            _dir: None,
        };
        match kind {
            Kind::Redis | Kind::RedisTls => {
                let redis = match (kind, durable) {
                    (Kind::RedisTls, _) => RedisServer::start_tls_with(RedisOptions {
                        append_only: durable,
                    }),
                    (_, true) => RedisServer::start_with(RedisOptions { append_only: true }),
                    (_, false) => RedisServer::start(),
                };
                harness.backend = redis_backend(redis.url(), false, redis.ca_file());
                harness.redis = Some(redis);
            }
            Kind::Cluster => {
                let cluster = RedisCluster::start();
                harness.backend = redis_backend(cluster.urls(), true, None);
                harness._cluster = Some(cluster);
            }
            Kind::Embedded => {
                let dir = tempfile::tempdir().expect("a temp dir");
                harness.backend = Backend::Embedded {
                    fsync: leadgate::queue::Fsync::Always,
                    dir: dir.path().join("queue"),
                };
                harness._dir = Some(dir);
            }
        }
        harness
    }

    /// A queue on this store; each call is a separate consumer (a separate process, as far as
    /// the store can tell).
    async fn open(&self, consumer: &str) -> Queue {
        Queue::open(&self.backend, self.settings.clone(), consumer)
            .await
            .expect("the queue opens")
    }

    /// Queues standing for separate processes sharing the store: with Redis, separately
    /// opened; with the embedded queue (one process per data directory), clones of one.
    async fn processes(&self) -> [Queue; 2] {
        let first = self.open("a").await;
        let second = match self.kind {
            Kind::Embedded => first.clone(),
            _ => self.open("b").await,
        };
        [first, second]
    }

    /// Redis: kill -9 and start the server again. Embedded: nothing (the queue is reopened).
    fn restart_store(&mut self) {
        if let Some(redis) = &mut self.redis {
            redis.restart();
        }
    }

    fn redis(&mut self) -> &mut RedisServer {
        self.redis.as_mut().expect("a redis harness")
    }

    /// Stores a first-lead id that is not a ULID under an idempotency key, behind the queue's
    /// back (using the documented key layout / schema), so enqueues with that key fail.
    async fn corrupt_idempotency_key(&self, key: &IdempotencyKey) {
        match &self.backend {
            Backend::Redis { prefix, .. } => {
                let client = self.redis.as_ref().unwrap().client();
                let mut conn = client.get_multiplexed_async_connection().await.unwrap();
                let name = format!(
                    "{{{prefix}}}:idem:{}:{}:{}",
                    key.source.len(),
                    key.source,
                    key.key
                );
                ::redis::cmd("SET")
                    .arg(name)
                    .arg("not-a-lead-id")
                    .query_async::<()>(&mut conn)
                    .await
                    .unwrap();
            }
            Backend::Embedded { dir, .. } => {
                let conn = rusqlite::Connection::open(dir.join("queue.sqlite3")).unwrap();
                conn.busy_timeout(Duration::from_secs(5)).unwrap();
                conn.execute(
                    "INSERT INTO idempotency (source, key, first_lead, expires_at)
                     VALUES (?1, ?2, 'not-a-lead-id', 9000000000000)",
                    [&key.source, &key.key],
                )
                .unwrap();
            }
        }
    }
}

/// Short timeouts so redelivery tests take a fraction of a second.
fn fast() -> QueueSettings {
    QueueSettings {
        lease_timeout: Duration::from_millis(300),
        idempotency_ttl: Duration::from_secs(3600),
        record_ttl: Duration::from_secs(3600),
        pii_ttl: Duration::from_secs(3600),
    }
}

fn delivery(onpipeline_id: &str) -> Delivery {
    Delivery {
        onpipeline_lead_id: Some(onpipeline_id.to_owned()),
        duplicate: false,
        at: Utc::now(),
    }
}

fn key(source: &str, key: &str) -> IdempotencyKey {
    IdempotencyKey {
        source: source.to_owned(),
        key: key.to_owned(),
        body_digest: None,
    }
}

fn attempt(number: u32, outcome: AttemptOutcome, status: Option<u16>) -> Attempt {
    Attempt {
        number,
        at: Utc::now(),
        duration_ms: 87,
        status,
        outcome,
        reason: (outcome != AttemptOutcome::Delivered).then(|| format!("answered {status:?}")),
    }
}

/// A lead from another payload than [`lead`]'s, to tell works apart.
fn other_work() -> Work {
    let mut work = lead("website").work;
    if let Work::Deliver { payload, .. } = &mut work {
        payload.first_name = "Berta".into();
    }
    work
}

fn retry(delay: Duration, attempt: Option<Attempt>) -> Settle {
    Settle::RetryLater {
        delay,
        reason: "Onpipeline answered 503".into(),
        count_attempt: true,
        attempt,
        work: None,
    }
}

const NO_WAIT: Duration = Duration::ZERO;

async fn enqueued_lead_is_leased_once_with_attempt_one(kind: Kind) {
    let harness = Harness::new(kind);
    let queue = harness.open("a").await;
    let lead = lead("website");

    assert_eq!(queue.enqueue(&lead, None).await.unwrap(), Enqueued::Queued);
    let leases = queue.lease(10, Duration::from_secs(2)).await.unwrap();

    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].lead, lead);
    assert_eq!(leases[0].attempt, 1);
    assert_eq!(leases[0].last_error, None);
    assert!(queue.lease(10, NO_WAIT).await.unwrap().is_empty());
}

async fn replayed_idempotency_key_returns_the_first_id_and_queues_nothing(kind: Kind) {
    let harness = Harness::new(kind);
    let queue = harness.open("a").await;
    let (first, replay) = (lead("acme"), lead("acme"));
    let order = key("acme", "order-17");

    assert_eq!(
        queue.enqueue(&first, Some(&order)).await.unwrap(),
        Enqueued::Queued
    );
    assert_eq!(
        queue.enqueue(&replay, Some(&order)).await.unwrap(),
        Enqueued::Replayed { first: first.id }
    );
    // The same key from another source is another key.
    let other_source = lead("website");
    assert_eq!(
        queue
            .enqueue(&other_source, Some(&key("website", "order-17")))
            .await
            .unwrap(),
        Enqueued::Queued
    );

    let leased: HashSet<_> = queue
        .lease(10, NO_WAIT)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.lead.id)
        .collect();
    assert_eq!(leased, HashSet::from([first.id, other_source.id]));
}

async fn an_idempotency_key_repeated_with_another_body_digest_is_a_conflict_and_queues_nothing(
    kind: Kind,
) {
    let harness = Harness::new(kind);
    let queue = harness.open("a").await;
    let with_digest = |name: &str, digest: Option<&str>| IdempotencyKey {
        body_digest: digest.map(str::to_owned),
        ..key("acme", name)
    };
    let first = lead("acme");
    let order = with_digest("order-18", Some("aaaa"));
    assert_eq!(
        queue.enqueue(&first, Some(&order)).await.unwrap(),
        Enqueued::Queued
    );
    // The same body again is a retry; another body is a reuse of the key.
    assert_eq!(
        queue.enqueue(&lead("acme"), Some(&order)).await.unwrap(),
        Enqueued::Replayed { first: first.id }
    );
    assert_eq!(
        queue
            .enqueue(&lead("acme"), Some(&with_digest("order-18", Some("bbbb"))))
            .await
            .unwrap(),
        Enqueued::Conflict { first: first.id }
    );
    // A key claimed without a digest (a platform's, or one kept from before digests) cannot
    // tell bodies apart: a repeat is a replay, whatever it carries.
    let plain = lead("acme");
    assert_eq!(
        queue
            .enqueue(&plain, Some(&with_digest("order-19", None)))
            .await
            .unwrap(),
        Enqueued::Queued
    );
    assert_eq!(
        queue
            .enqueue(&lead("acme"), Some(&with_digest("order-19", Some("cccc"))))
            .await
            .unwrap(),
        Enqueued::Replayed { first: plain.id }
    );

    let leased: HashSet<_> = queue
        .lease(10, NO_WAIT)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.lead.id)
        .collect();
    assert_eq!(leased, HashSet::from([first.id, plain.id]));
}

async fn delivered_lease_leaves_the_queue_and_records_the_delivery(kind: Kind) {
    let harness = Harness::new(kind);
    let queue = harness.open("a").await;
    let lead = lead("website");
    queue.enqueue(&lead, None).await.unwrap();
    let lease = queue.lease(1, NO_WAIT).await.unwrap().pop().unwrap();
    assert_eq!(queue.delivery_of(lead.id).await.unwrap(), None);

    let delivered = delivery("OP-981");
    queue
        .settle(
            lease,
            Settle::Delivered {
                delivery: delivered.clone(),
                attempt: None,
            },
        )
        .await
        .unwrap();

    assert_eq!(queue.delivery_of(lead.id).await.unwrap(), Some(delivered));
    assert_eq!(
        queue.stats().await.unwrap(),
        Stats {
            delivered: 1,
            ..Stats::default()
        }
    );
    // Not even after the lease timeout: the entry is gone, not merely leased.
    let wait = harness.settings.lease_timeout * 2;
    assert!(queue.lease(10, wait).await.unwrap().is_empty());
}

async fn retry_later_hides_the_entry_until_its_delay_and_counts_the_attempt(kind: Kind) {
    let harness = Harness::new(kind);
    let queue = harness.open("a").await;
    let lead = lead("website");
    queue.enqueue(&lead, None).await.unwrap();
    let lease = queue.lease(1, NO_WAIT).await.unwrap().pop().unwrap();

    let delay = Duration::from_millis(700);
    let settled_at = Instant::now();
    queue
        .settle(
            lease,
            Settle::RetryLater {
                attempt: None,
                work: None,
                delay,
                reason: "Onpipeline answered 503".into(),
                count_attempt: true,
            },
        )
        .await
        .unwrap();
    assert!(queue.lease(10, NO_WAIT).await.unwrap().is_empty());
    assert_eq!(queue.stats().await.unwrap().delayed, 1);

    let again = eventually(Duration::from_secs(5), "the retry copy", || async {
        queue
            .lease(10, Duration::from_millis(200))
            .await
            .unwrap()
            .pop()
    })
    .await;

    // A few ms of slack: Redis's and SQLite's clocks are wall clocks, ours is monotonic.
    assert!(
        settled_at.elapsed() + Duration::from_millis(20) >= delay,
        "came back after {:?}",
        settled_at.elapsed()
    );
    assert_eq!(again.lead, lead);
    assert_eq!(again.attempt, 2);
    assert_eq!(again.last_error.as_deref(), Some("Onpipeline answered 503"));
}

async fn retry_later_that_does_not_count_keeps_the_attempt(kind: Kind) {
    let harness = Harness::new(kind);
    let queue = harness.open("a").await;
    let lead = lead("website");
    queue.enqueue(&lead, None).await.unwrap();
    let lease = queue.lease(1, NO_WAIT).await.unwrap().pop().unwrap();

    queue
        .settle(
            lease,
            Settle::RetryLater {
                attempt: None,
                work: None,
                delay: Duration::from_millis(100),
                reason: "delivery paused".into(),
                count_attempt: false,
            },
        )
        .await
        .unwrap();
    let again = queue
        .lease(1, Duration::from_secs(3))
        .await
        .unwrap()
        .pop()
        .expect("the retry copy within 3s");

    assert_eq!(again.lead, lead);
    assert_eq!(again.attempt, 1);
    assert_eq!(again.last_error.as_deref(), Some("delivery paused"));
}

async fn dead_lease_moves_to_the_dead_letters_with_its_reason(kind: Kind) {
    let harness = Harness::new(kind);
    let queue = harness.open("a").await;
    let lead = lead("website");
    queue.enqueue(&lead, None).await.unwrap();
    let lease = queue.lease(1, NO_WAIT).await.unwrap().pop().unwrap();

    queue
        .settle(
            lease,
            Settle::Dead {
                attempt: None,
                reason: "Onpipeline answered 400: FirstName is required".into(),
            },
        )
        .await
        .unwrap();

    let dead = queue.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].lead, lead);
    assert_eq!(dead[0].attempts, 1);
    assert_eq!(
        dead[0].reason,
        "Onpipeline answered 400: FirstName is required"
    );
    assert_eq!(
        queue.stats().await.unwrap(),
        Stats {
            dead: 1,
            ..Stats::default()
        }
    );
    let wait = harness.settings.lease_timeout * 2;
    assert!(queue.lease(10, wait).await.unwrap().is_empty());
}

async fn unsettled_lease_is_redelivered_after_the_lease_timeout_and_its_late_settle_is_ignored(
    kind: Kind,
) {
    let harness = Harness::new(kind);
    let (crashed, survivor) = (harness.open("a").await, harness.open("b").await);
    let lead = lead("website");
    crashed.enqueue(&lead, None).await.unwrap();

    let leased_at = Instant::now();
    let stale = crashed.lease(1, NO_WAIT).await.unwrap().pop().unwrap();
    let redelivered = survivor
        .lease(1, Duration::from_secs(5))
        .await
        .unwrap()
        .pop()
        .expect("a redelivery within 5s");

    assert!(leased_at.elapsed() >= harness.settings.lease_timeout);
    assert_eq!(redelivered.lead, lead);
    assert_eq!(redelivered.attempt, 1);

    // The first consumer wakes up and settles its expired lease: ignored.
    crashed
        .settle(
            stale,
            Settle::Dead {
                attempt: None,
                reason: "late".into(),
            },
        )
        .await
        .unwrap();
    assert!(survivor.dead_letters(10).await.unwrap().is_empty());
    assert_eq!(survivor.stats().await.unwrap().leased, 1);

    survivor
        .settle(
            redelivered,
            Settle::Delivered {
                delivery: delivery("OP-5"),
                attempt: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        survivor.stats().await.unwrap(),
        Stats {
            delivered: 1,
            ..Stats::default()
        }
    );
}

async fn concurrent_consumers_never_lease_the_same_entry(kind: Kind) {
    // A long lease timeout: a slow settle on a busy machine must not cause a legitimate
    // redelivery, which would look like a double lease.
    let settings = QueueSettings {
        lease_timeout: Duration::from_secs(60),
        ..fast()
    };
    let harness = Harness::with(kind, settings, false);
    let queues = [harness.open("a").await, harness.open("b").await];
    const LEADS: usize = 300;
    let leads: Vec<_> = (0..LEADS).map(|_| lead("website")).collect();
    let answers = join_all(leads.iter().map(|l| queues[0].enqueue(l, None))).await;
    assert!(answers.iter().all(|a| matches!(a, Ok(Enqueued::Queued))));

    let leased = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(30);
    let consumers = (0..4).map(|n| {
        let queue = queues[n % 2].clone();
        let leased = leased.clone();
        tokio::spawn(async move {
            while leased.lock().unwrap().len() < LEADS && Instant::now() < deadline {
                for lease in queue.lease(7, Duration::from_millis(100)).await.unwrap() {
                    leased.lock().unwrap().push(lease.lead.id);
                    queue
                        .settle(
                            lease,
                            Settle::Delivered {
                                delivery: delivery("OP"),
                                attempt: None,
                            },
                        )
                        .await
                        .unwrap();
                }
            }
        })
    });
    for consumer in join_all(consumers).await {
        consumer.unwrap();
    }

    let leased = leased.lock().unwrap();
    let distinct: HashSet<_> = leased.iter().collect();
    assert_eq!(distinct.len(), LEADS, "every lead leased");
    assert_eq!(leased.len(), LEADS, "no lead leased twice");
}

async fn acknowledged_enqueue_survives_reopening_the_queue(kind: Kind) {
    let mut harness = Harness::durable(kind);
    let queue = harness.open("a").await;
    let lead = lead("acme");
    let order = key("acme", "order-1");
    assert_eq!(
        queue.enqueue(&lead, Some(&order)).await.unwrap(),
        Enqueued::Queued
    );
    drop(queue);

    harness.restart_store();
    let queue = harness.open("a").await;

    let leases = queue.lease(10, Duration::from_secs(2)).await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].lead, lead);
    assert_eq!(
        queue
            .enqueue(&self::lead("acme"), Some(&order))
            .await
            .unwrap(),
        Enqueued::Replayed { first: lead.id }
    );
}

async fn operator_pause_is_shared_by_every_process_kept_across_reopening_and_cleared_by_resume(
    kind: Kind,
) {
    let mut harness = Harness::durable(kind);
    let [a, b] = harness.processes().await;
    assert_eq!(b.operator_pause().await.unwrap(), None);
    assert!(!b.resume_delivery().await.unwrap(), "nothing to resume");

    let first = chrono::DateTime::parse_from_rfc3339("2026-03-01T09:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let pause = a.pause_delivery(first).await.unwrap();
    assert_eq!(pause.since, first);
    assert_eq!(b.operator_pause().await.unwrap(), Some(pause.clone()));
    // A second pause keeps the first one's time.
    let again = b
        .pause_delivery(first + chrono::Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(again, pause);
    // Leads still go in and wait: the queue only stores the pause.
    a.enqueue(&lead("acme"), None).await.unwrap();
    assert_eq!(b.stats().await.unwrap().ready, 1);

    drop((a, b));
    harness.restart_store();
    let [a, b] = harness.processes().await;
    assert_eq!(
        a.operator_pause().await.unwrap(),
        Some(pause),
        "a pause lasts until an operator resumes"
    );
    assert!(b.resume_delivery().await.unwrap());
    assert_eq!(a.operator_pause().await.unwrap(), None);
    assert!(!a.resume_delivery().await.unwrap());
}

async fn stats_count_entries_by_state(kind: Kind) {
    let harness = Harness::new(kind);
    let queue = harness.open("a").await;
    for _ in 0..3 {
        queue.enqueue(&lead("website"), None).await.unwrap();
    }
    // How long the oldest waits is tested on its own, below.
    let counts = |stats: Stats| Stats {
        oldest_ready_ms: 0,
        ..stats
    };
    assert_eq!(
        counts(queue.stats().await.unwrap()),
        Stats {
            ready: 3,
            ..Stats::default()
        }
    );

    let first = queue.lease(1, NO_WAIT).await.unwrap().pop().unwrap();
    assert_eq!(
        counts(queue.stats().await.unwrap()),
        Stats {
            ready: 2,
            leased: 1,
            ..Stats::default()
        }
    );

    let retry = Settle::RetryLater {
        attempt: None,
        work: None,
        delay: Duration::from_secs(600),
        reason: "timeout".into(),
        count_attempt: true,
    };
    queue.settle(first, retry).await.unwrap();
    let second = queue.lease(1, NO_WAIT).await.unwrap().pop().unwrap();
    queue
        .settle(
            second,
            Settle::Dead {
                attempt: None,
                reason: "rejected".into(),
            },
        )
        .await
        .unwrap();

    assert_eq!(
        counts(queue.stats().await.unwrap()),
        Stats {
            ready: 1,
            leased: 0,
            delayed: 1,
            dead: 1,
            ..Stats::default()
        }
    );
}

async fn waiting_lease_returns_as_soon_as_a_lead_is_enqueued(kind: Kind) {
    let harness = Harness::new(kind);
    let queue = harness.open("a").await;
    let waiting = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let leases = queue.lease(1, Duration::from_secs(20)).await.unwrap();
            (leases, started.elapsed())
        })
    };
    let lead = lead("website");
    queue.enqueue(&lead, None).await.unwrap();

    let (leases, waited) = waiting.await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].lead, lead);
    assert!(waited < Duration::from_secs(5), "waited {waited:?}");
}

async fn a_failing_enqueue_fails_alone_and_not_the_enqueues_batched_with_it(kind: Kind) {
    let harness = Harness::new(kind);
    let queue = harness.open("a").await;
    let poisoned = key("acme", "corrupt");
    harness.corrupt_idempotency_key(&poisoned).await;

    // Sent together, so the backends batch them with the failing one.
    let leads: Vec<_> = (0..50).map(|_| lead("acme")).collect();
    let bad = lead("acme");
    let (answers, failed) = tokio::join!(
        join_all(leads.iter().map(|l| queue.enqueue(l, None))),
        queue.enqueue(&bad, Some(&poisoned)),
    );

    assert!(matches!(failed, Err(Error::Other(_))), "got {failed:?}");
    assert!(answers.iter().all(|a| matches!(a, Ok(Enqueued::Queued))));
    let leased: HashSet<_> = queue
        .lease(100, NO_WAIT)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.lead.id)
        .collect();
    assert_eq!(leased, leads.iter().map(|l| l.id).collect());
}

async fn idempotency_keys_and_delivered_records_expire_after_their_ttl(kind: Kind) {
    let ttl = Duration::from_secs(1);
    let settings = QueueSettings {
        idempotency_ttl: ttl,
        record_ttl: ttl,
        pii_ttl: ttl,
        ..fast()
    };
    let harness = Harness::with(kind, settings, false);
    let queue = harness.open("a").await;
    let order = key("acme", "order-9");
    let first = lead("acme");
    // Both records are written after this instant, so neither may expire before `ttl` from it.
    let before_writes = Instant::now();
    queue.enqueue(&first, Some(&order)).await.unwrap();
    let lease = queue.lease(1, NO_WAIT).await.unwrap().pop().unwrap();
    queue
        .settle(
            lease,
            Settle::Delivered {
                delivery: delivery("OP-9"),
                attempt: None,
            },
        )
        .await
        .unwrap();
    let replay = queue.enqueue(&lead("acme"), Some(&order)).await.unwrap();
    let recorded = queue.delivery_of(first.id).await.unwrap();
    // On a machine too slow to get here within the TTL, these say nothing.
    if before_writes.elapsed() < ttl {
        assert_eq!(replay, Enqueued::Replayed { first: first.id });
        assert!(recorded.is_some());
    }

    let later = lead("acme");
    eventually(Duration::from_secs(5), "the key to expire", || async {
        let answer = queue.enqueue(&later, Some(&order)).await.unwrap();
        (answer == Enqueued::Queued).then_some(())
    })
    .await;
    assert!(before_writes.elapsed() + Duration::from_millis(20) >= ttl);
    eventually(
        Duration::from_secs(5),
        "the delivered record to expire",
        || async {
            queue
                .delivery_of(first.id)
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
}

async fn attempts_travel_with_retry_copies_into_the_dead_letter_and_the_record(kind: Kind) {
    let harness = Harness::new(kind);
    let queue = harness.open("a").await;
    let lead = lead("website");
    queue.enqueue(&lead, None).await.unwrap();
    let first = queue.lease(1, NO_WAIT).await.unwrap().pop().unwrap();
    assert!(first.history.is_empty());

    let failed = attempt(1, AttemptOutcome::Retry, Some(503));
    let settle = retry(Duration::from_millis(50), Some(failed.clone()));
    queue.settle(first, settle).await.unwrap();
    let second = queue
        .lease(1, Duration::from_secs(3))
        .await
        .unwrap()
        .pop()
        .expect("the retry copy within 3s");
    assert_eq!(second.attempt, 2);
    assert_eq!(second.history, vec![failed.clone()]);

    let rejected = attempt(2, AttemptOutcome::Rejected, Some(406));
    queue
        .settle(
            second,
            Settle::Dead {
                reason: "Onpipeline answered 406".into(),
                attempt: Some(rejected.clone()),
            },
        )
        .await
        .unwrap();

    let letter = queue
        .dead_letter(lead.id)
        .await
        .unwrap()
        .expect("a dead letter");
    assert_eq!(letter.lead, lead);
    assert_eq!(letter.attempts, 2);
    assert_eq!(letter.reason, "Onpipeline answered 406");
    assert_eq!(letter.history, vec![failed.clone(), rejected.clone()]);
    let listed = queue.dead_letters(10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].history, letter.history);

    let record = queue.lead(lead.id).await.unwrap().expect("a record");
    assert_eq!(record.state, LeadState::Dead);
    assert_eq!(record.attempts, vec![failed, rejected]);
    assert_eq!(
        record.dead_reason.as_deref(),
        Some("Onpipeline answered 406")
    );
    assert_eq!(record.work, Some(lead.work));
    assert_eq!(record.delivery, None);
}

async fn retry_later_with_new_work_hands_the_new_work_to_the_next_lease(kind: Kind) {
    let harness = Harness::new(kind);
    let queue = harness.open("a").await;
    let meta = QueuedLead {
        work: Work::FetchMeta {
            lead: MetaLeadRef {
                leadgen_id: "1200344556677".into(),
                page_id: "881234".into(),
                form_id: None,
                ad_id: None,
                adgroup_id: None,
                created_time: None,
            },
        },
        ..lead("meta")
    };
    queue.enqueue(&meta, None).await.unwrap();
    let fetched = queue.lease(1, NO_WAIT).await.unwrap().pop().unwrap();

    // The Graph API answered; Onpipeline did not: the copy carries the payload from now on.
    let mapped = other_work();
    queue
        .settle(
            fetched,
            Settle::RetryLater {
                delay: Duration::from_millis(50),
                reason: "Onpipeline answered 503".into(),
                count_attempt: true,
                attempt: Some(attempt(1, AttemptOutcome::Retry, Some(503))),
                work: Some(mapped.clone()),
            },
        )
        .await
        .unwrap();
    let again = queue
        .lease(1, Duration::from_secs(3))
        .await
        .unwrap()
        .pop()
        .expect("the retry copy within 3s");

    assert_eq!(again.lead.work, mapped);
    assert_eq!(again.lead.id, meta.id);
    assert_eq!(again.lead.received_at, meta.received_at);
    let record = queue.lead(meta.id).await.unwrap().unwrap();
    assert_eq!(record.work, Some(mapped));
}

async fn lead_record_follows_the_lead_from_enqueue_to_delivery(kind: Kind) {
    let harness = Harness::new(kind);
    let queue = harness.open("a").await;
    let lead = lead("website");
    assert!(queue.lead(lead.id).await.unwrap().is_none());

    queue.enqueue(&lead, None).await.unwrap();
    let queued = queue
        .lead(lead.id)
        .await
        .unwrap()
        .expect("a record at once");
    assert_eq!(queued.id, lead.id);
    assert_eq!(queued.source, "website");
    assert_eq!(queued.received_at, lead.received_at);
    assert_eq!(queued.state, LeadState::Queued);
    assert!(queued.attempts.is_empty());
    assert_eq!(queued.work.as_ref(), Some(&lead.work));

    let lease = queue.lease(1, NO_WAIT).await.unwrap().pop().unwrap();
    let sent = attempt(1, AttemptOutcome::Delivered, Some(201));
    let delivered = delivery("OP-77");
    queue
        .settle(
            lease,
            Settle::Delivered {
                delivery: delivered.clone(),
                attempt: Some(sent.clone()),
            },
        )
        .await
        .unwrap();

    let record = queue.lead(lead.id).await.unwrap().expect("a record");
    assert_eq!(record.state, LeadState::Delivered);
    assert_eq!(record.delivery, Some(delivered));
    assert_eq!(record.attempts, vec![sent]);
    assert_eq!(record.received_at, lead.received_at);
    // Within pii_ttl the data is still there.
    assert_eq!(record.work, Some(lead.work));
    assert!(queue.dead_letter(lead.id).await.unwrap().is_none());
}

async fn delivered_lead_data_is_purged_after_pii_ttl_and_its_record_kept(kind: Kind) {
    let pii_ttl = Duration::from_secs(1);
    let settings = QueueSettings {
        pii_ttl,
        record_ttl: Duration::from_secs(3600),
        ..fast()
    };
    let harness = Harness::with(kind, settings, false);
    let queue = harness.open("a").await;
    let lead = lead("website");
    queue.enqueue(&lead, None).await.unwrap();
    let lease = queue.lease(1, NO_WAIT).await.unwrap().pop().unwrap();
    let before_delivery = Instant::now();
    queue
        .settle(
            lease,
            Settle::Delivered {
                delivery: delivery("OP-3"),
                attempt: Some(attempt(1, AttemptOutcome::Delivered, Some(201))),
            },
        )
        .await
        .unwrap();

    let purged = eventually(Duration::from_secs(5), "the data to be purged", || async {
        let record = queue.lead(lead.id).await.unwrap().expect("the record");
        record.work.is_none().then_some(record)
    })
    .await;

    assert!(before_delivery.elapsed() + Duration::from_millis(20) >= pii_ttl);
    assert_eq!(purged.state, LeadState::Delivered);
    assert_eq!(purged.source, "website");
    assert_eq!(purged.attempts.len(), 1);
    assert_eq!(
        purged.delivery.unwrap().onpipeline_lead_id.as_deref(),
        Some("OP-3")
    );
    // What prevents a second delivery stays.
    assert!(queue.delivery_of(lead.id).await.unwrap().is_some());
    assert_eq!(queue.stats().await.unwrap().delivered, 1);
}

async fn late_delivered_settle_is_recorded_and_the_copy_still_queued_is_not_leased_again(
    kind: Kind,
) {
    let harness = Harness::new(kind);
    let (slow, other) = (harness.open("a").await, harness.open("b").await);
    let lead = lead("website");
    slow.enqueue(&lead, None).await.unwrap();
    let stale = slow.lease(1, NO_WAIT).await.unwrap().pop().unwrap();
    // The slow consumer's lease expires and the entry is leased again, then released.
    let redelivered = other
        .lease(1, Duration::from_secs(5))
        .await
        .unwrap()
        .pop()
        .expect("a redelivery within 5s");
    let release = Settle::RetryLater {
        delay: Duration::ZERO,
        reason: "shutting down".into(),
        count_attempt: false,
        attempt: None,
        work: None,
    };
    other.settle(redelivered, release).await.unwrap();

    // Onpipeline took the lead from the slow consumer after all.
    slow.settle(
        stale,
        Settle::Delivered {
            delivery: delivery("OP-8"),
            attempt: Some(attempt(1, AttemptOutcome::Delivered, Some(201))),
        },
    )
    .await
    .unwrap();

    assert!(other.delivery_of(lead.id).await.unwrap().is_some());
    assert_eq!(
        other.lead(lead.id).await.unwrap().unwrap().state,
        LeadState::Delivered
    );
    let wait = harness.settings.lease_timeout * 2;
    assert!(other.lease(10, wait).await.unwrap().is_empty());
    let stats = other.stats().await.unwrap();
    assert_eq!((stats.ready, stats.leased, stats.delayed), (0, 0, 0));
}

async fn revived_dead_letter_is_leased_again_numbered_after_its_history_with_the_replay_in_it(
    kind: Kind,
) {
    let harness = Harness::new(kind);
    let queue = harness.open("a").await;
    let lead = lead("website");
    queue.enqueue(&lead, None).await.unwrap();
    let lease = queue.lease(1, NO_WAIT).await.unwrap().pop().unwrap();
    let rejected = attempt(1, AttemptOutcome::Rejected, Some(406));
    queue
        .settle(
            lease,
            Settle::Dead {
                reason: "Onpipeline answered 406: Email Type".into(),
                attempt: Some(rejected.clone()),
            },
        )
        .await
        .unwrap();

    // Mapped again by the operator's fixed rules.
    let fixed = other_work();
    assert!(queue.revive(lead.id, fixed.clone()).await.unwrap());

    assert!(queue.dead_letter(lead.id).await.unwrap().is_none());
    assert!(queue.dead_letters(10).await.unwrap().is_empty());
    let record = queue.lead(lead.id).await.unwrap().unwrap();
    assert_eq!(record.state, LeadState::Queued);
    assert_eq!(record.work.as_ref(), Some(&fixed));
    assert_eq!(record.dead_reason, None);
    let again = queue
        .lease(1, Duration::from_secs(3))
        .await
        .unwrap()
        .pop()
        .expect("the revived lead within 3s");
    // Numbering goes on after the attempt that killed it; the back-off starts over.
    assert_eq!(again.attempt, 2);
    assert_eq!(again.schedule_attempt(), 1);
    assert_eq!(again.lead.work, fixed);
    assert_eq!(again.lead.id, lead.id);
    assert_eq!(again.lead.received_at, lead.received_at);
    let replayed_at = again
        .lead
        .replayed_at
        .expect("a replay time starts a new schedule");
    assert!(replayed_at > lead.received_at);
    assert_eq!(again.history.len(), 2, "{:?}", again.history);
    assert_eq!(again.history[0], rejected);
    let replay = &again.history[1];
    assert_eq!(
        (replay.number, replay.outcome, replay.status),
        (1, AttemptOutcome::Replayed, None),
        "{replay:?}"
    );
    assert!(
        (replay.at - replayed_at).num_milliseconds().abs() < 1000,
        "{replay:?}"
    );
    assert!(!queue.revive(lead.id, other_work()).await.unwrap());
    assert_eq!(queue.stats().await.unwrap().dead, 0);

    queue
        .settle(
            again,
            Settle::Delivered {
                delivery: delivery("OP-2"),
                attempt: Some(attempt(2, AttemptOutcome::Delivered, Some(201))),
            },
        )
        .await
        .unwrap();
    let record = queue.lead(lead.id).await.unwrap().unwrap();
    assert_eq!(record.state, LeadState::Delivered);
    let story: Vec<_> = record
        .attempts
        .iter()
        .map(|a| (a.number, a.outcome))
        .collect();
    assert_eq!(
        story,
        [
            (1, AttemptOutcome::Rejected),
            (1, AttemptOutcome::Replayed),
            (2, AttemptOutcome::Delivered)
        ]
    );
}

async fn deleted_dead_letter_loses_its_data_and_keeps_its_record(kind: Kind) {
    let harness = Harness::new(kind);
    let queue = harness.open("a").await;
    let lead = lead("website");
    queue.enqueue(&lead, None).await.unwrap();
    let lease = queue.lease(1, NO_WAIT).await.unwrap().pop().unwrap();
    queue
        .settle(
            lease,
            Settle::Dead {
                reason: "spam".into(),
                attempt: None,
            },
        )
        .await
        .unwrap();
    let unknown = leadgate::lead::LeadId::new();

    assert!(!queue.delete_dead(unknown).await.unwrap());
    assert!(queue.delete_dead(lead.id).await.unwrap());
    assert!(!queue.delete_dead(lead.id).await.unwrap());

    assert!(queue.dead_letter(lead.id).await.unwrap().is_none());
    assert!(queue.dead_letters(10).await.unwrap().is_empty());
    assert_eq!(queue.stats().await.unwrap().dead, 0);
    assert!(!queue.revive(lead.id, other_work()).await.unwrap());
    let record = queue
        .lead(lead.id)
        .await
        .unwrap()
        .expect("the record stays");
    assert_eq!(record.state, LeadState::Dead);
    assert_eq!(record.dead_reason.as_deref(), Some("spam"));
    assert_eq!(record.work, None);
}

async fn dead_letters_are_listed_newest_first(kind: Kind) {
    let harness = Harness::new(kind);
    let queue = harness.open("a").await;
    let leads: Vec<_> = (0..3).map(|_| lead("website")).collect();
    for lead in &leads {
        queue.enqueue(lead, None).await.unwrap();
        let lease = queue.lease(1, NO_WAIT).await.unwrap().pop().unwrap();
        queue
            .settle(
                lease,
                Settle::Dead {
                    reason: format!("rejected {}", lead.id),
                    attempt: None,
                },
            )
            .await
            .unwrap();
        // Dead letters are ordered by the millisecond they died in: make each one later.
        let died = Utc::now();
        eventually(Duration::from_secs(1), "the clock to move on", || async {
            (Utc::now().timestamp_millis() > died.timestamp_millis() + 1).then_some(())
        })
        .await;
    }

    let listed: Vec<_> = queue
        .dead_letters(10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.lead.id)
        .collect();
    assert_eq!(listed, vec![leads[2].id, leads[1].id, leads[0].id]);
    let newest: Vec<_> = queue
        .dead_letters(2)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.lead.id)
        .collect();
    assert_eq!(newest, vec![leads[2].id, leads[1].id]);
    assert!(queue.dead_letters(0).await.unwrap().is_empty());
}

async fn stats_count_delivered_records_and_how_long_the_oldest_ready_lead_waits(kind: Kind) {
    let harness = Harness::new(kind);
    let queue = harness.open("a").await;
    assert_eq!(queue.stats().await.unwrap().oldest_ready_ms, 0);
    let enqueued_at = Instant::now();
    queue.enqueue(&lead("website"), None).await.unwrap();

    let waiting = eventually(Duration::from_secs(5), "the lead to wait 300ms", || async {
        let stats = queue.stats().await.unwrap();
        (stats.oldest_ready_ms >= 300).then_some(stats.oldest_ready_ms)
    })
    .await;
    // The store's clock and ours are both this host's: a few ms of slack.
    let waited = u64::try_from(enqueued_at.elapsed().as_millis()).unwrap();
    assert!(waiting <= waited + 20, "{waiting} ms > {waited} ms");

    let lease = queue.lease(1, NO_WAIT).await.unwrap().pop().unwrap();
    assert_eq!(queue.stats().await.unwrap().oldest_ready_ms, 0);
    queue
        .settle(
            lease,
            Settle::Delivered {
                delivery: delivery("OP-1"),
                attempt: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        queue.stats().await.unwrap(),
        Stats {
            delivered: 1,
            ..Stats::default()
        }
    );
}

async fn upstream_rate_limit_is_never_exceeded_by_concurrent_callers(kind: Kind) {
    const PER_SECOND: usize = 20;
    let rate = NonZeroU32::new(20).unwrap();
    let harness = Harness::new(kind);
    let processes = harness.processes().await;
    let granted = Arc::new(Mutex::new(Vec::new()));
    let until = Instant::now() + Duration::from_millis(2200);
    let callers = (0..8).map(|n| {
        let queue = processes[n % 2].clone();
        let granted = granted.clone();
        tokio::spawn(async move {
            while Instant::now() < until {
                let wait = queue.acquire_upstream(rate).await.unwrap();
                if wait.is_zero() {
                    granted.lock().unwrap().push(Instant::now());
                } else {
                    // Told when to ask again: that is the limiter's protocol, not a guess.
                    tokio::time::sleep(wait).await;
                }
            }
        })
    });
    for caller in join_all(callers).await {
        caller.unwrap();
    }

    let mut granted = granted.lock().unwrap().clone();
    granted.sort();
    // Any PER_SECOND + 1 grants span a second; what we see of them may be squeezed by the
    // time answers take to reach us, hence the slack. Two limiters not sharing would grant
    // twice the rate, 21 grants in about half a second.
    for window in granted.windows(PER_SECOND + 1) {
        let span = window[PER_SECOND] - window[0];
        assert!(
            span >= Duration::from_millis(900),
            "{} grants within {span:?}",
            PER_SECOND + 1
        );
    }
    assert!(
        granted.len() >= PER_SECOND * 3 / 2,
        "only {} grants in 2.2 s",
        granted.len()
    );
}

mod redis_only {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn enqueue_while_redis_is_down_fails_fast_and_works_again_after_a_restart() {
        let mut harness = Harness::durable(Kind::Redis);
        let queue = harness.open("a").await;
        let before = lead("website");
        queue.enqueue(&before, None).await.unwrap();

        harness.redis().stop();
        let started = Instant::now();
        let refused = queue.enqueue(&lead("website"), None).await;
        assert!(
            matches!(refused, Err(Error::Unavailable(_))),
            "got {refused:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "took {:?}",
            started.elapsed()
        );
        assert!(matches!(queue.ping().await, Err(Error::Unavailable(_))));
        assert!(matches!(
            queue.lease(1, NO_WAIT).await,
            Err(Error::Unavailable(_))
        ));

        harness.redis().restart();
        let after = lead("website");
        eventually(Duration::from_secs(15), "an enqueue to succeed", || async {
            queue.enqueue(&after, None).await.ok()
        })
        .await;

        let leased: HashSet<_> = queue
            .lease(10, Duration::from_secs(2))
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.lead.id)
            .collect();
        assert_eq!(leased, HashSet::from([before.id, after.id]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn enqueue_to_a_redis_that_does_not_answer_fails_within_the_timeout() {
        let harness = Harness::new(Kind::Redis);
        let queue = harness.open("a").await;
        let redis = harness.redis.as_ref().unwrap();

        redis.freeze();
        let started = Instant::now();
        let refused = queue.enqueue(&lead("website"), None).await;
        let took = started.elapsed();
        redis.thaw();

        assert!(
            matches!(refused, Err(Error::Unavailable(_))),
            "got {refused:?}"
        );
        assert!(took < Duration::from_secs(6), "took {took:?}");
        let after = lead("website");
        eventually(Duration::from_secs(10), "an enqueue to succeed", || async {
            queue.enqueue(&after, None).await.ok()
        })
        .await;
        let leased: Vec<_> = queue.lease(10, NO_WAIT).await.unwrap();
        assert!(leased.iter().any(|l| l.lead.id == after.id));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_key_lives_under_the_hash_tagged_prefix() {
        let harness = Harness::new(Kind::Redis);
        let queue = harness.open("a").await;
        for n in 0..3 {
            queue
                .enqueue(&lead("acme"), Some(&key("acme", &format!("k{n}"))))
                .await
                .unwrap();
        }
        let mut leases = queue.lease(3, NO_WAIT).await.unwrap().into_iter();
        let (a, b, c) = (
            leases.next().unwrap(),
            leases.next().unwrap(),
            leases.next().unwrap(),
        );
        queue
            .settle(
                a,
                Settle::Delivered {
                    delivery: delivery("OP"),
                    attempt: None,
                },
            )
            .await
            .unwrap();
        queue
            .settle(
                b,
                Settle::Dead {
                    attempt: None,
                    reason: "no".into(),
                },
            )
            .await
            .unwrap();
        let retry = Settle::RetryLater {
            attempt: None,
            work: None,
            delay: Duration::from_secs(60),
            reason: "later".into(),
            count_attempt: true,
        };
        queue.settle(c, retry).await.unwrap();

        queue
            .acquire_upstream(NonZeroU32::new(10).unwrap())
            .await
            .unwrap();

        let client = harness.redis.as_ref().unwrap().client();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut conn)
            .await
            .unwrap();
        // schema, ready, delayed, dead, dead-letter log, delivered index, upstream rate, three
        // lead records, the delivered lead's data, three idempotency keys
        assert_eq!(keys.len(), 14, "{keys:?}");
        assert!(
            keys.iter().all(|k| k.starts_with("{leadgate-test}:")),
            "{keys:?}"
        );
    }

    /// The dead-letter log's entries, oldest first, each as its fields.
    async fn deadlog(harness: &Harness) -> Vec<std::collections::HashMap<String, String>> {
        let client = harness.redis.as_ref().unwrap().client();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let reply: ::redis::streams::StreamRangeReply = ::redis::cmd("XRANGE")
            .arg("{leadgate-test}:deadlog")
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        reply
            .ids
            .into_iter()
            .map(|entry| {
                entry
                    .map
                    .into_iter()
                    .map(|(k, v)| (k, ::redis::from_redis_value(v).unwrap()))
                    .collect()
            })
            .collect()
    }

    async fn dead_letter(queue: &Queue, reason: &str) -> leadgate::lead::LeadId {
        let lease = queue.lease(1, NO_WAIT).await.unwrap().pop().unwrap();
        let id = lease.lead.id;
        queue
            .settle(
                lease,
                Settle::Dead {
                    attempt: None,
                    reason: reason.into(),
                },
            )
            .await
            .unwrap();
        id
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_dead_lettering_is_logged_in_the_dead_letter_stream_and_a_stale_one_is_not() {
        let harness = Harness::new(Kind::Redis);
        let queue = harness.open("a").await;
        assert!(deadlog(&harness).await.is_empty());
        let before = Utc::now().timestamp_millis();

        let refused = lead("website");
        queue.enqueue(&refused, None).await.unwrap();
        let first = dead_letter(&queue, "Onpipeline answered 406: custom field 9999999").await;
        queue.enqueue(&lead("acme"), None).await.unwrap();
        let second = dead_letter(&queue, "Onpipeline answered 400: FirstName is required").await;
        // Replayed, then dead again: each dead-lettering is a line of the log, which keeps the
        // first one (the sorted set holds the lead once).
        assert!(queue.revive(first, refused.work.clone()).await.unwrap());
        let again = dead_letter(&queue, "still refused").await;
        assert_eq!(again, first);

        // A lease that expired and was taken again settles stale: not dead, not logged.
        queue.enqueue(&lead("website"), None).await.unwrap();
        let stale = queue.lease(1, NO_WAIT).await.unwrap().pop().unwrap();
        tokio::time::sleep(harness.settings.lease_timeout + Duration::from_millis(100)).await;
        let taken = queue.lease(1, NO_WAIT).await.unwrap().pop().unwrap();
        assert_eq!(taken.lead.id, stale.lead.id);
        queue
            .settle(
                stale,
                Settle::Dead {
                    attempt: None,
                    reason: "stale".into(),
                },
            )
            .await
            .unwrap();

        let log = deadlog(&harness).await;
        let lines: Vec<(&str, &str, &str)> = log
            .iter()
            .map(|e| {
                (
                    e["lead_id"].as_str(),
                    e["source"].as_str(),
                    e["reason"].as_str(),
                )
            })
            .collect();
        let (first, second) = (first.to_string(), second.to_string());
        assert_eq!(
            lines,
            [
                (
                    first.as_str(),
                    "website",
                    "Onpipeline answered 406: custom field 9999999"
                ),
                (
                    second.as_str(),
                    "acme",
                    "Onpipeline answered 400: FirstName is required"
                ),
                (first.as_str(), "website", "still refused"),
            ]
        );
        let now = Utc::now().timestamp_millis();
        for entry in &log {
            let at: i64 = entry["at"].parse().unwrap();
            assert!((before - 1000..=now + 1000).contains(&at), "{entry:?}");
        }
        // The sorted set stays the index replay and delete use.
        assert_eq!(queue.dead_letters(10).await.unwrap().len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_dead_letter_stream_is_capped() {
        use leadgate::queue::redis::DEADLOG_MAXLEN;
        let harness = Harness::new(Kind::Redis);
        let queue = harness.open("a").await;
        // Fill the log past its cap behind the queue's back, then dead-letter one lead.
        let client = harness.redis.as_ref().unwrap().client();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let mut fill = ::redis::pipe();
        for n in 0..DEADLOG_MAXLEN + 500 {
            fill.cmd("XADD")
                .arg("{leadgate-test}:deadlog")
                .arg("*")
                .arg("lead_id")
                .arg(format!("filler-{n}"))
                .ignore();
        }
        fill.query_async::<()>(&mut conn).await.unwrap();

        queue.enqueue(&lead("website"), None).await.unwrap();
        let id = dead_letter(&queue, "refused").await;
        let len: u64 = ::redis::cmd("XLEN")
            .arg("{leadgate-test}:deadlog")
            .query_async(&mut conn)
            .await
            .unwrap();
        // `MAXLEN ~` trims whole stream nodes (100 entries by default): about the cap is kept.
        assert!(
            (DEADLOG_MAXLEN..=DEADLOG_MAXLEN + 100).contains(&len),
            "{len} entries"
        );
        let last: ::redis::streams::StreamRangeReply = ::redis::cmd("XREVRANGE")
            .arg("{leadgate-test}:deadlog")
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .unwrap();
        let newest: String = last.ids[0].get("lead_id").unwrap();
        assert_eq!(newest, id.to_string());
    }

    /// Writes a dead-letter log entry dated `age` ago, behind the queue's back (its id carries
    /// the time, which is what the trim goes by).
    async fn old_deadlog_entry(harness: &Harness, age: Duration, lead_id: &str) {
        let client = harness.redis.as_ref().unwrap().client();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let at = Utc::now().timestamp_millis() - i64::try_from(age.as_millis()).unwrap();
        ::redis::cmd("XADD")
            .arg("{leadgate-test}:deadlog")
            .arg(format!("{at}-0"))
            .arg("lead_id")
            .arg(lead_id)
            .arg("reason")
            .arg("Onpipeline error 406: ana.lopez@example.com is not a valid email")
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }

    /// A reason can quote the lead's data, so the log keeps nothing older than the records:
    /// trimmed at the next dead-lettering, and by the stats every process samples while
    /// nothing dies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dead_letter_stream_entries_older_than_the_record_ttl_are_trimmed() {
        let settings = QueueSettings {
            record_ttl: Duration::from_secs(60),
            ..fast()
        };
        let harness = Harness::with(Kind::Redis, settings, false);
        let queue = harness.open("a").await;
        old_deadlog_entry(&harness, Duration::from_secs(120), "old-one").await;
        queue.enqueue(&lead("website"), None).await.unwrap();
        let id = dead_letter(&queue, "refused").await;
        let ids: Vec<String> = deadlog(&harness)
            .await
            .iter()
            .map(|e| e["lead_id"].clone())
            .collect();
        assert_eq!(ids, [id.to_string()]);

        // Older than the TTL while nothing is dead-lettered: gone at the next stats; one
        // within the TTL stays.
        let client = harness.redis.as_ref().unwrap().client();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        ::redis::cmd("DEL")
            .arg("{leadgate-test}:deadlog")
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        old_deadlog_entry(&harness, Duration::from_secs(120), "old-two").await;
        old_deadlog_entry(&harness, Duration::from_secs(30), "recent").await;
        queue.stats().await.unwrap();
        let ids: Vec<String> = deadlog(&harness)
            .await
            .iter()
            .map(|e| e["lead_id"].clone())
            .collect();
        assert_eq!(ids, ["recent"]);
    }

    /// The consumer names in the group, sorted.
    async fn consumers(harness: &Harness) -> Vec<String> {
        let client = harness.redis.as_ref().unwrap().client();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let reply: ::redis::streams::StreamInfoConsumersReply = ::redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg("{leadgate-test}:ready")
            .arg("forwarders")
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut names: Vec<_> = reply.consumers.into_iter().map(|c| c.name).collect();
        names.sort();
        names
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_consumers_of_gone_processes_are_pruned_but_never_one_holding_a_lease() {
        let harness = Harness::new(Kind::Redis);
        let gone = harness.open("gone").await;
        let holding = harness.open("holding").await;
        for _ in 0..2 {
            gone.enqueue(&lead("website"), None).await.unwrap();
        }
        let lease = gone.lease(1, NO_WAIT).await.unwrap().pop().unwrap();
        gone.settle(
            lease,
            Settle::Delivered {
                delivery: delivery("OP1"),
                attempt: None,
            },
        )
        .await
        .unwrap();
        let held = holding.lease(1, NO_WAIT).await.unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(consumers(&harness).await, ["gone", "holding"]);

        // Opening with the real threshold (minutes) removes nobody that just read.
        let me = harness.open("me").await;
        assert_eq!(consumers(&harness).await, ["gone", "holding"]);

        let Queue::Redis(redis_queue) = &me else {
            unreachable!()
        };
        let removed = redis_queue.prune_consumers(Duration::ZERO).await.unwrap();
        assert_eq!(removed, 1);
        assert_eq!(
            consumers(&harness).await,
            ["holding"],
            "the consumer holding a lease stays, with its lease"
        );
        holding
            .settle(
                held.into_iter().next().unwrap(),
                Settle::Delivered {
                    delivery: delivery("OP2"),
                    attempt: None,
                },
            )
            .await
            .unwrap();
        assert_eq!(me.stats().await.unwrap().delivered, 2);
    }
}

mod cluster_only {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster_queue_answers_pings_and_reads_the_settings_of_its_node() {
        let harness = Harness::new(Kind::Cluster);
        let queue = harness.open("a").await;

        queue.ping().await.unwrap();
        // The test nodes run without an append-only file.
        let warning = queue
            .durability_warning()
            .await
            .unwrap()
            .expect("a warning");
        assert!(warning.contains("appendonly no"), "{warning}");

        // Consumer pruning runs its script on the node serving the queue's slot.
        queue.enqueue(&lead("website"), None).await.unwrap();
        assert_eq!(queue.lease(1, NO_WAIT).await.unwrap().len(), 1);
        let other = harness.open("b").await;
        let Queue::Redis(other) = &other else {
            unreachable!()
        };
        assert_eq!(
            other.prune_consumers(Duration::ZERO).await.unwrap(),
            0,
            "a holds a lease"
        );
    }
}

mod tls_only {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_over_tls_is_refused_without_the_ca_that_signed_its_certificate() {
        let redis = RedisServer::start_tls();
        let backend = Backend::Redis {
            url: SecretString::from(redis.url()),
            prefix: "leadgate-test".into(),
            cluster: false,
            ca_file: None,
        };

        let refused = Queue::open(&backend, fast(), "a").await;

        let Err(e) = refused else {
            panic!("a certificate from an unknown CA must be refused");
        };
        assert!(e.to_string().contains("certificate"), "{e}");
    }
}

mod durability_warnings {
    use super::*;

    async fn warning_of(redis: &RedisServer) -> Option<String> {
        let backend = Backend::Redis {
            url: SecretString::from(redis.url()),
            prefix: "leadgate-test".into(),
            cluster: false,
            ca_file: None,
        };
        let queue = Queue::open(&backend, fast(), "a").await.unwrap();
        queue.durability_warning().await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_without_an_append_only_file_or_snapshots_is_reported_with_its_loss_window() {
        let redis = RedisServer::start();

        let warning = warning_of(&redis).await.expect("a warning");

        assert!(warning.contains("appendonly no"), "{warning}");
        assert!(warning.contains("every queued lead is lost"), "{warning}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_without_an_append_only_file_but_with_snapshots_loses_what_came_after_the_last_one()
     {
        let redis = RedisServer::start_configured(RedisOptions::default(), &[("save", "60 1")]);

        let warning = warning_of(&redis).await.expect("a warning");

        assert!(warning.contains("since its last RDB snapshot"), "{warning}");
        assert!(warning.contains("60 1"), "{warning}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_with_an_append_only_file_synced_always_and_no_eviction_has_no_warning() {
        let redis = RedisServer::start_configured(
            RedisOptions { append_only: true },
            &[("maxmemory", "64mb"), ("maxmemory-policy", "noeviction")],
        );

        assert_eq!(warning_of(&redis).await, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_whose_file_is_flushed_when_the_os_likes_is_reported() {
        let redis = RedisServer::start_configured(
            RedisOptions { append_only: true },
            &[("appendfsync", "no")],
        );

        let warning = warning_of(&redis).await.expect("a warning");

        assert!(warning.contains("appendfsync no"), "{warning}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_that_may_evict_any_key_is_reported_as_losing_queued_leads() {
        let redis = RedisServer::start_configured(
            RedisOptions { append_only: true },
            &[("maxmemory", "64mb"), ("maxmemory-policy", "allkeys-lru")],
        );

        let warning = warning_of(&redis).await.expect("a warning");

        assert!(warning.contains("allkeys-lru"), "{warning}");
        assert!(warning.contains("including queued leads"), "{warning}");
        assert!(!warning.contains("appendonly"), "{warning}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_that_may_evict_keys_with_a_ttl_is_reported_as_risking_duplicates() {
        let redis = RedisServer::start_configured(
            RedisOptions { append_only: true },
            &[("maxmemory", "64mb"), ("maxmemory-policy", "volatile-lru")],
        );

        let warning = warning_of(&redis).await.expect("a warning");

        assert!(warning.contains("Queued leads have none"), "{warning}");
        assert!(warning.contains("duplicate"), "{warning}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_that_refuses_config_is_reported_as_unchecked() {
        let redis = RedisServer::start();
        // Like a managed Redis: the application's user may not read the configuration.
        let mut admin = redis
            .client()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        ::redis::cmd("ACL")
            .arg(
                &[
                    "SETUSER",
                    "app",
                    "on",
                    ">app-password",
                    "~*",
                    "&*",
                    "+@all",
                    "-config",
                ][..],
            )
            .query_async::<()>(&mut admin)
            .await
            .unwrap();
        let backend = Backend::Redis {
            url: SecretString::from(redis.url().replace("redis://", "redis://app:app-password@")),
            prefix: "leadgate-test".into(),
            cluster: false,
            ca_file: None,
        };
        let queue = Queue::open(&backend, fast(), "a").await.unwrap();

        let warning = queue
            .durability_warning()
            .await
            .unwrap()
            .expect("a warning");

        assert!(warning.contains("could not check"), "{warning}");
        assert!(warning.contains("NOPERM"), "{warning}");
        assert!(!warning.contains("app-password"), "{warning}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_queue_has_no_durability_warning() {
        let harness = Harness::new(Kind::Embedded);
        let queue = harness.open("a").await;

        assert_eq!(queue.durability_warning().await.unwrap(), None);
    }
}

mod older_layouts {
    use super::*;

    /// An entry as the previous Redis layout wrote it: the whole lead in field `e`.
    async fn write_legacy_entry(redis: &RedisServer) {
        let mut conn = redis
            .client()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let entry = serde_json::json!({"lead": lead("website"), "attempt": 1, "last_error": null});
        ::redis::cmd("XADD")
            .arg("{leadgate-test}:ready")
            .arg("*")
            .arg("e")
            .arg(entry.to_string())
            .query_async::<String>(&mut conn)
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_queue_holding_leads_of_the_older_layout_is_refused() {
        let harness = Harness::new(Kind::Redis);
        write_legacy_entry(harness.redis.as_ref().unwrap()).await;

        let refused = Queue::open(&harness.backend, fast(), "a").await;

        let Err(Error::Other(e)) = refused else {
            panic!("an older layout must be refused");
        };
        assert!(e.to_string().contains("older leadgate"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_queue_that_lost_its_layout_stamp_still_opens() {
        // A Redis restarted without persistence while replicas kept writing.
        let harness = Harness::new(Kind::Redis);
        let queue = harness.open("a").await;
        let lead = lead("website");
        queue.enqueue(&lead, None).await.unwrap();
        let mut conn = harness
            .redis
            .as_ref()
            .unwrap()
            .client()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        ::redis::cmd("DEL")
            .arg("{leadgate-test}:schema")
            .query_async::<()>(&mut conn)
            .await
            .unwrap();

        let reopened = harness.open("b").await;

        let leased = reopened.lease(1, NO_WAIT).await.unwrap();
        assert_eq!(leased[0].lead, lead);
    }

    fn version_1_database(dir: &std::path::Path, queued: bool) {
        std::fs::create_dir_all(dir).unwrap();
        let conn = rusqlite::Connection::open(dir.join("queue.sqlite3")).unwrap();
        conn.execute_batch(
            "CREATE TABLE entries (id INTEGER PRIMARY KEY AUTOINCREMENT, lead_id TEXT NOT NULL,
                 lead TEXT NOT NULL, attempt INTEGER NOT NULL, last_error TEXT,
                 available_at INTEGER NOT NULL, lease_token INTEGER);
             CREATE TABLE delivered (lead_id TEXT PRIMARY KEY, delivery TEXT NOT NULL,
                 expires_at INTEGER NOT NULL);
             CREATE TABLE idempotency (source TEXT NOT NULL, key TEXT NOT NULL,
                 first_lead TEXT NOT NULL, expires_at INTEGER NOT NULL, UNIQUE (source, key));
             CREATE TABLE dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, lead_id TEXT NOT NULL,
                 lead TEXT NOT NULL, attempts INTEGER NOT NULL, reason TEXT NOT NULL,
                 at INTEGER NOT NULL);
             PRAGMA user_version = 1;",
        )
        .unwrap();
        if queued {
            let lead = lead("website");
            conn.execute(
                "INSERT INTO entries (lead_id, lead, attempt, available_at) VALUES (?1, ?2, 1, 0)",
                [lead.id.to_string(), serde_json::to_string(&lead).unwrap()],
            )
            .unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_queue_holding_leads_of_version_1_is_refused_and_an_empty_one_upgraded() {
        let harness = Harness::new(Kind::Embedded);
        let Backend::Embedded { dir, .. } = &harness.backend else {
            unreachable!()
        };
        version_1_database(dir, true);
        let refused = Queue::open(&harness.backend, fast(), "a").await;
        assert!(
            matches!(&refused, Err(Error::Other(e)) if e.to_string().contains("older leadgate")),
            "got {:?}",
            refused.err()
        );

        std::fs::remove_dir_all(dir).unwrap();
        version_1_database(dir, false);
        let queue = harness.open("a").await;
        let lead = lead("website");
        queue.enqueue(&lead, None).await.unwrap();
        assert_eq!(queue.lease(1, NO_WAIT).await.unwrap()[0].lead, lead);
        // Its idempotency table, made before body digests, has gained the column.
        let order = IdempotencyKey {
            body_digest: Some("aaaa".to_owned()),
            ..key("website", "order-1")
        };
        let first = super::lead("website");
        assert_eq!(
            queue.enqueue(&first, Some(&order)).await.unwrap(),
            Enqueued::Queued
        );
        let other = IdempotencyKey {
            body_digest: Some("bbbb".to_owned()),
            ..order.clone()
        };
        assert_eq!(
            queue
                .enqueue(&super::lead("website"), Some(&other))
                .await
                .unwrap(),
            Enqueued::Conflict { first: first.id }
        );
    }
}
