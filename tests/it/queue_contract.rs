//! The queue contract (see `src/queue/mod.rs`), run against both backends: every test body
//! below is an `async fn(Kind)`, and `contract!` generates one test per backend from it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures_util::future::join_all;
use leadgate::queue::{
    Backend, Delivery, Enqueued, Error, IdempotencyKey, Queue, QueueSettings, Settle, Stats,
};
use secrecy::SecretString;
use tokio::time::Instant;

use crate::helpers::redis::{RedisOptions, RedisServer};
use crate::helpers::{eventually, lead};

macro_rules! contract {
    ($($name:ident),+ $(,)?) => {
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Redis).await
                }
            )+
        }
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Embedded).await
                }
            )+
        }
    };
}

contract!(
    enqueued_lead_is_leased_once_with_attempt_one,
    replayed_idempotency_key_returns_the_first_id_and_queues_nothing,
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
);

#[derive(Clone, Copy, Debug)]
enum Kind {
    Redis,
    Embedded,
}

/// One queue store for one test: its own `redis-server` or its own SQLite directory.
struct Harness {
    backend: Backend,
    settings: QueueSettings,
    redis: Option<RedisServer>,
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
        match kind {
            Kind::Redis => {
                let redis = if durable {
                    RedisServer::start_with(RedisOptions { append_only: true })
                } else {
                    RedisServer::start()
                };
                Self {
                    backend: Backend::Redis {
                        url: SecretString::from(redis.url()),
                        prefix: "leadgate-test".into(),
                    },
                    settings,
                    redis: Some(redis),
                    _dir: None,
                }
            }
            Kind::Embedded => {
                let dir = tempfile::tempdir().expect("a temp dir");
                Self {
                    backend: Backend::Embedded {
                        fsync: leadgate::queue::Fsync::Always,
                        dir: dir.path().join("queue"),
                    },
                    settings,
                    redis: None,
                    _dir: Some(dir),
                }
            }
        }
    }

    /// A queue on this store; each call is a separate consumer (a separate process, as far as
    /// the store can tell).
    async fn open(&self, consumer: &str) -> Queue {
        Queue::open(&self.backend, self.settings.clone(), consumer)
            .await
            .expect("the queue opens")
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
                let url = self.redis.as_ref().unwrap().url();
                let client = ::redis::Client::open(url).unwrap();
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
    assert_eq!(queue.stats().await.unwrap(), Stats::default());
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
    assert_eq!(survivor.stats().await.unwrap(), Stats::default());
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

async fn stats_count_entries_by_state(kind: Kind) {
    let harness = Harness::new(kind);
    let queue = harness.open("a").await;
    for _ in 0..3 {
        queue.enqueue(&lead("website"), None).await.unwrap();
    }
    assert_eq!(
        queue.stats().await.unwrap(),
        Stats {
            ready: 3,
            ..Stats::default()
        }
    );

    let first = queue.lease(1, NO_WAIT).await.unwrap().pop().unwrap();
    assert_eq!(
        queue.stats().await.unwrap(),
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
        queue.stats().await.unwrap(),
        Stats {
            ready: 1,
            leased: 0,
            delayed: 1,
            dead: 1,
            ..queue.stats().await.unwrap()
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

        let client = ::redis::Client::open(harness.redis.as_ref().unwrap().url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut conn)
            .await
            .unwrap();
        // ready, delayed, dead, one delivered record, three idempotency keys
        assert_eq!(keys.len(), 7, "{keys:?}");
        assert!(
            keys.iter().all(|k| k.starts_with("{leadgate-test}:")),
            "{keys:?}"
        );
    }
}
