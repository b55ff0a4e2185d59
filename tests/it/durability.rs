//! A lead answered 2xx survives kill -9 of the gateway: accept 200 leads with delivery held,
//! SIGKILL the process, restart it able to deliver, and find each lead delivered exactly once.
//! Both backends; the Redis one runs with `appendonly yes`, `appendfsync always`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::app::{
    ADMIN_TOKEN, GatewayEnv, GatewayProcess, TOKEN, assert_resends_at_most, client,
    default_sources, exactly_once, start_sim, wait_received,
};
use crate::helpers::redis::{RedisOptions, RedisServer};

const LEADS: usize = 200;

async fn post_many(base: &str, n: usize) -> BTreeSet<String> {
    let http = client();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let http = http.clone();
        let url = format!("{base}/in/website");
        tasks.spawn(async move {
            let response = http
                .post(url)
                .json(&json!({"name": format!("Durable L{i:04}"), "email": format!("l{i}@example.com")}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202);
            let body: Value = response.json().await.unwrap();
            body["id"].as_str().unwrap().to_owned()
        });
    }
    let mut ids = BTreeSet::new();
    while let Some(id) = tasks.join_next().await {
        ids.insert(id.unwrap());
    }
    ids
}

async fn accepted_leads_survive_kill_9(redis: Option<&RedisServer>, fsync: &str) {
    let sim = Arc::new(start_sim(Vec::new()).await);
    sim.set_detect_duplicates(true);
    let dir = tempfile::tempdir().unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &default_sources());
    // No token: the gateway accepts and queues, but holds delivery.
    env.unset("LEADGATE_ONPIPELINE_TOKEN")
        .set("LEADGATE_ADMIN_TOKEN", ADMIN_TOKEN);
    if let Some(redis) = redis {
        env.set("LEADGATE_REDIS_URL", redis.url());
    }
    env.set("LEADGATE_EMBEDDED_FSYNC", fsync);
    let mut gateway = GatewayProcess::start(&env, &[]).await;
    let readyz: Value = gateway.readyz().await.unwrap();
    assert_eq!(readyz["delivery"]["state"], "held", "{readyz}");

    let ids = post_many(&gateway.base, LEADS).await;
    assert_eq!(ids.len(), LEADS);
    assert!(sim.requests().is_empty(), "nothing is delivered while held");

    gateway
        .restart(|vars| vars.push(("LEADGATE_ONPIPELINE_TOKEN".into(), TOKEN.into())))
        .await;
    let leads = wait_received(&sim, LEADS, Duration::from_secs(60)).await;
    assert_eq!(exactly_once(&leads).len(), LEADS, "each lead exactly once");
    gateway.wait_idle(Duration::from_secs(20)).await;
    assert_eq!(
        sim.received().len(),
        LEADS,
        "no lead twice:\n{}",
        gateway.log()
    );
    // The kill came before any delivery: nothing may be sent twice.
    assert_resends_at_most(&sim, 0, "a kill -9 while no delivery was in flight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_leads_survive_kill_9_on_the_embedded_queue() {
    accepted_leads_survive_kill_9(None, "always").await;
}

/// `everysec` leaves commits to the operating system for up to a second: a killed process
/// loses nothing (only a power loss of the host could).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_leads_survive_kill_9_on_the_embedded_queue_with_fsync_everysec() {
    accepted_leads_survive_kill_9(None, "everysec").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_leads_survive_kill_9_on_redis_with_aof() {
    let redis = RedisServer::start_with(RedisOptions { append_only: true });
    accepted_leads_survive_kill_9(Some(&redis), "always").await;
}

/// kill -9 in the middle of delivering: leads in flight are redelivered after their lease
/// times out; a lead Onpipeline already took is not created twice (the delivery record, or
/// the simulator's 409 for a repeat), and only the deliveries the killed process had in
/// flight can have been sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_delivery_loses_nothing_and_creates_nothing_twice() {
    const CONCURRENCY: usize = 8;
    let sim = Arc::new(start_sim(Vec::new()).await);
    sim.set_detect_duplicates(true);
    let dir = tempfile::tempdir().unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &default_sources());
    // A generous timeout: no answer is lost to it, so the kill is the only crash window.
    env.set("LEADGATE_LEASE_TIMEOUT", "5s")
        .set("LEADGATE_ONPIPELINE_TIMEOUT", "3s")
        .set("LEADGATE_DELIVERY_CONCURRENCY", CONCURRENCY.to_string())
        .set("LEADGATE_ADMIN_TOKEN", ADMIN_TOKEN);
    let mut gateway = GatewayProcess::start(&env, &[]).await;
    let ids = post_many(&gateway.base, LEADS).await;
    assert_eq!(ids.len(), LEADS);
    // Stop it while deliveries are under way.
    crate::helpers::eventually(Duration::from_secs(20), "deliveries to start", || async {
        (!sim.requests().is_empty()).then_some(())
    })
    .await;
    gateway.kill9();
    let delivered_before = sim.received().len();
    gateway.restart(|_| {}).await;
    let leads = wait_received(&sim, LEADS, Duration::from_secs(60)).await;
    assert_eq!(
        exactly_once(&leads).len(),
        LEADS,
        "delivered {delivered_before} before the kill"
    );
    gateway.wait_idle(Duration::from_secs(20)).await;
    assert_eq!(sim.received().len(), LEADS);
    assert_resends_at_most(
        &sim,
        CONCURRENCY,
        "one kill -9 of a process with 8 deliveries in flight",
    );
}

/// `serve` reads Redis's persistence settings at start-up and warns in its log when the
/// append-only file is off (with the loss that leaves); against a Redis run as the README
/// recommends it says nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_warns_at_start_up_when_redis_runs_without_its_append_only_file() {
    let sim = start_sim(Vec::new()).await;
    let without_aof = RedisServer::start();
    let with_aof = RedisServer::start_with(RedisOptions { append_only: true });
    for (redis, warns) in [(&without_aof, true), (&with_aof, false)] {
        let dir = tempfile::tempdir().unwrap();
        let mut env = GatewayEnv::new(dir.path(), &sim, &default_sources());
        env.set("LEADGATE_REDIS_URL", redis.url());
        let gateway = GatewayProcess::start(&env, &[]).await;
        // The check runs before the listener is bound, which is logged next.
        let log = crate::helpers::eventually(Duration::from_secs(10), "start-up", || async {
            let log = gateway.log();
            log.contains("leadgate is listening.").then_some(log)
        })
        .await;
        let line = log
            .lines()
            .find(|l| l.contains("The queue's store puts accepted leads at risk."));
        assert_eq!(line.is_some(), warns, "{log}");
        if let Some(line) = line {
            assert!(line.contains("WARN"), "{line}");
            assert!(
                line.contains("Redis runs without its append-only file (appendonly no)"),
                "{line}"
            );
            assert!(line.contains("Set appendonly yes"), "{line}");
        }
    }
}
