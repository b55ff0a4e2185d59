//! The promise under faults, with real processes, a real Redis and the simulator: every lead
//! answered 2xx reaches Onpipeline exactly once, or waits in the dead letters with its reason —
//! whatever fails: the gateway, Redis, Onpipeline, the token.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use leadgate::queue::{Attempt, AttemptOutcome};
use leadgate::sim::{Fault, RequestOutcome, Simulator};
use serde_json::{Value, json};

use crate::helpers::app::{
    ADMIN_TOKEN, GatewayEnv, GatewayProcess, TOKEN, assert_resends_at_most, client,
    default_sources, exactly_once, start_sim, wait_received,
};
use crate::helpers::eventually;
use crate::helpers::redis::{RedisOptions, RedisServer};
use crate::helpers::tcp::Relay;

/// Deliveries in flight at once per gateway process in the kill tests: after a kill -9, at most
/// this many leads can have reached Onpipeline without their delivery being recorded.
const CONCURRENCY: usize = 8;

/// Where a lead was finally accepted, and how many refusals and failures came first.
struct Posted {
    /// Index of the gateway that answered 2xx.
    by: usize,
    failures: u32,
}

/// Posts one lead to `bases[first]`, retrying (with the same idempotency key) until a gateway
/// answers 2xx, as a careful sender does; a refused or failed post goes to the next gateway
/// of the list (with one gateway: the same one again).
async fn post_until_accepted(
    http: &reqwest::Client,
    bases: &[String],
    first: usize,
    name: &str,
) -> Posted {
    let mut failures = 0;
    let mut by = first;
    loop {
        let sent = http
            .post(format!("{}/in/website", bases[by]))
            .header("idempotency-key", name)
            .json(&json!({"name": format!("Lead {name}")}))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == 202 => return Posted { by, failures },
            // actix's own answer when a request has not fully arrived within 5 s (the test
            // process posting thousands at once on two cores): nothing was read, so nothing
            // was queued.
            Ok(r) if r.status() == 408 => failures += 1,
            Ok(r) => {
                assert_eq!(r.status(), 503, "only 503 may refuse a valid lead");
                assert!(r.headers().contains_key("retry-after"));
                failures += 1;
            }
            Err(_) => failures += 1,
        }
        by = (by + 1) % bases.len();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn kill_9_while_posting_and_delivering(redis: Option<&RedisServer>) {
    const LEADS: usize = 1000;
    let sim = Arc::new(start_sim(Vec::new()).await);
    // A lease cut short by the kill is delivered again; the simulator answers 409 to a repeat
    // and records it.
    sim.set_detect_duplicates(true);
    let dir = tempfile::tempdir().unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &default_sources());
    // The timeout is generous so that no answer is lost to it under load: the kill is then the
    // only way a lead can reach Onpipeline without its delivery being recorded.
    env.set("LEADGATE_LEASE_TIMEOUT", "5s")
        .set("LEADGATE_ONPIPELINE_TIMEOUT", "3s")
        .set("LEADGATE_ONPIPELINE_RATE", "1000")
        .set("LEADGATE_DELIVERY_CONCURRENCY", CONCURRENCY.to_string())
        .set("LEADGATE_ADMIN_TOKEN", ADMIN_TOKEN);
    if let Some(redis) = redis {
        env.set("LEADGATE_REDIS_URL", redis.url());
    }
    let mut gateway = GatewayProcess::start(&env, &[]).await;
    // A restart keeps the port.
    let bases = Arc::new(vec![gateway.base.clone()]);
    let http = client();
    let mut posters = tokio::task::JoinSet::new();
    for i in 0..LEADS {
        let (http, bases) = (http.clone(), bases.clone());
        posters.spawn(async move {
            post_until_accepted(&http, &bases, 0, &format!("K{i:04}"))
                .await
                .failures
        });
        if i == LEADS / 3 {
            // Deliveries are under way by now.
            eventually(Duration::from_secs(20), "deliveries to start", || async {
                (sim.received().len() > 10).then_some(())
            })
            .await;
            gateway.kill9();
            gateway.restart(|_| {}).await;
        }
    }
    let mut refused = 0;
    while let Some(failures) = posters.join_next().await {
        refused += failures.unwrap();
    }
    let leads = wait_received(&sim, LEADS, Duration::from_secs(120)).await;
    assert_eq!(
        exactly_once(&leads).len(),
        LEADS,
        "{refused} posts had to be retried"
    );
    // The leases the killed process held have been taken over and settled by now.
    gateway.wait_idle(Duration::from_secs(30)).await;
    assert_eq!(sim.received().len(), LEADS);
    assert_resends_at_most(
        &sim,
        CONCURRENCY,
        "one kill -9 of a process with 8 deliveries in flight",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_posting_and_delivering_1000_leads_on_the_embedded_queue() {
    kill_9_while_posting_and_delivering(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_posting_and_delivering_1000_leads_on_redis() {
    let redis = RedisServer::start_with(RedisOptions { append_only: true });
    kill_9_while_posting_and_delivering(Some(&redis)).await;
}

/// Requests the simulator saw within any one-second window, at most.
fn busiest_second(sim: &Simulator) -> usize {
    let times: Vec<_> = sim.requests().iter().map(|r| r.at).collect();
    let mut busiest = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] >= chrono::Duration::seconds(1) {
            start += 1;
        }
        busiest = busiest.max(end - start + 1);
    }
    busiest
}

/// Three replicas on one Redis, each leaving from its own loopback address so the simulator
/// tells them apart. 3,000 leads are posted round-robin across the three at a steady pace, and
/// halfway through, while posts and deliveries are in flight, one replica is killed with -9.
/// Posts it refuses (or drops) go to a survivor with the same idempotency key, as a sender
/// retries. The two survivors finish every accepted lead, each once, taking over the killed
/// replica's leases, and all three together never exceed the shared upstream rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_the_work_and_the_upstream_rate_and_survive_losing_one() {
    const LEADS: usize = 3000;
    const RATE: usize = 150;
    const BATCH: usize = 30;
    let redis = RedisServer::start_with(RedisOptions { append_only: true });
    let sim = Arc::new(start_sim(Vec::new()).await);
    sim.set_detect_duplicates(true);
    // Each delivery is in flight for a while, so the killed replica surely holds some.
    sim.set_latency(Duration::from_millis(100));
    let dir = tempfile::tempdir().unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &default_sources());
    env.set("LEADGATE_REDIS_URL", redis.url())
        .set("LEADGATE_LEASE_TIMEOUT", "3s")
        .set("LEADGATE_ONPIPELINE_TIMEOUT", "2s")
        .set("LEADGATE_ONPIPELINE_RATE", RATE.to_string())
        .set("LEADGATE_DELIVERY_CONCURRENCY", CONCURRENCY.to_string())
        .set("LEADGATE_ADMIN_TOKEN", ADMIN_TOKEN);
    let egress: Vec<std::net::IpAddr> = (2..5)
        .map(|last| std::net::Ipv4Addr::new(127, 0, 0, last).into())
        .collect();
    let mut replicas = Vec::new();
    for ip in &egress {
        env.set("LEADGATE_EGRESS_IP", ip.to_string());
        replicas.push(GatewayProcess::start(&env, &[]).await);
    }
    let bases = Arc::new(replicas.iter().map(|r| r.base.clone()).collect::<Vec<_>>());
    let killed = egress[0];
    let http = client();
    let mut posters = tokio::task::JoinSet::new();
    let mut killed_at = None;
    for i in 0..LEADS {
        let (http, bases) = (http.clone(), bases.clone());
        posters.spawn(async move {
            post_until_accepted(&http, &bases, i % 3, &format!("R{i:04}")).await
        });
        if i % BATCH == BATCH - 1 {
            // About 375 posts a second: posting lasts longer than the kill takes to come.
            tokio::time::sleep(Duration::from_millis(80)).await;
        }
        if i == LEADS / 2 {
            eventually(
                Duration::from_secs(30),
                "a delivery of the first replica in flight",
                || async {
                    sim.requests()
                        .iter()
                        .any(|r| r.peer_ip == killed && r.outcome == RequestOutcome::InFlight)
                        .then_some(())
                },
            )
            .await;
            replicas[0].kill9();
            killed_at = Some(chrono::Utc::now());
        }
    }
    let killed_at = killed_at.unwrap();
    let mut accepted_by = [0usize; 3];
    let mut refused = 0;
    while let Some(posted) = posters.join_next().await {
        let posted = posted.unwrap();
        accepted_by[posted.by] += 1;
        refused += posted.failures;
    }
    assert!(
        accepted_by[0] > 0,
        "the killed replica had accepted leads: {accepted_by:?}"
    );
    assert!(
        refused > 0,
        "posts were still coming when the replica died, and were re-sent"
    );

    let leads = wait_received(&sim, LEADS, Duration::from_secs(120)).await;
    assert_eq!(exactly_once(&leads).len(), LEADS);
    replicas[1].wait_idle(Duration::from_secs(30)).await;
    assert_eq!(sim.received().len(), LEADS);
    assert_resends_at_most(
        &sim,
        CONCURRENCY,
        "one kill -9 of a replica with 8 deliveries in flight",
    );

    // The killed replica held deliveries when it died: Onpipeline saw their requests cut off.
    let requests = sim.requests();
    let cut_off = requests
        .iter()
        .filter(|r| r.peer_ip == killed && r.outcome == RequestOutcome::Cancelled)
        .count();
    assert!(cut_off > 0, "no delivery of the killed replica was cut off");
    // Everything after the kill came from the survivors, and both took part. (A request of the
    // killed replica whose latency ended just as it died may still be handled a moment later.)
    let mut after_kill = [0usize; 3];
    let settled = killed_at + chrono::Duration::seconds(1);
    for lead in leads.iter().filter(|l| l.received_at > settled) {
        let replica = egress.iter().position(|ip| *ip == lead.peer_ip).unwrap();
        after_kill[replica] += 1;
    }
    assert_eq!(after_kill[0], 0, "{after_kill:?}");
    assert!(
        after_kill[1] > 0 && after_kill[2] > 0,
        "both survivors delivered: {after_kill:?}"
    );

    let busiest = busiest_second(&sim);
    assert!(
        busiest <= RATE,
        "{busiest} requests in one second; the shared limit is {RATE}"
    );
    assert!(
        busiest >= RATE / 2,
        "the replicas together should use the budget, used {busiest}"
    );
}

/// `serve --no-forwarder` and `serve --no-ingest` split the roles on one Redis, as the README
/// says: the ingest-only process queues and never delivers; the forwarder-only one delivers
/// what the other queued, each lead once, and answers `503 unavailable` on `/in/...`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_only_and_forwarder_only_processes_split_the_work_on_one_redis() {
    const ADMIN: &str = "admin-token-0123456789";
    let redis = RedisServer::start();
    let sim = Arc::new(start_sim(Vec::new()).await);
    sim.set_detect_duplicates(true);
    let dir = tempfile::tempdir().unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &default_sources());
    env.set("LEADGATE_REDIS_URL", redis.url())
        .set("LEADGATE_ADMIN_TOKEN", ADMIN);
    let http = client();

    let ingest = GatewayProcess::start(&env, &["--no-forwarder"]).await;
    for i in 0..5 {
        let response = http
            .post(format!("{}/in/website", ingest.base))
            .json(&json!({"name": format!("Lead Split{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
    let readyz: Value = ingest.readyz().await.unwrap();
    assert_eq!(readyz["status"], "ready", "{readyz}");
    assert_eq!(readyz["delivery"]["state"], "off", "{readyz}");
    // Long enough for a forwarder to have leased and sent them, had one run.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        sim.requests().is_empty(),
        "the ingest-only process delivers nothing"
    );
    let stats: Value = http
        .get(format!("{}/admin/stats", ingest.base))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (stats["ready"].as_u64(), stats["leased"].as_u64()),
        (Some(5), Some(0)),
        "{stats}"
    );

    let forwarder = GatewayProcess::start(&env, &["--no-ingest"]).await;
    let refused = http
        .post(format!("{}/in/website", forwarder.base))
        .json(&json!({"name": "Lead Refused"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    let readyz: Value = forwarder.readyz().await.unwrap();
    assert_eq!(readyz["status"], "ready", "{readyz}");
    assert_eq!(readyz["ingest"], false, "{readyz}");
    assert_eq!(readyz["delivery"]["state"], "running", "{readyz}");

    let leads = wait_received(&sim, 5, Duration::from_secs(20)).await;
    let names = exactly_once(&leads);
    assert!(!names.contains("Refused"), "{names:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sim.received().len(), 5);
    assert!(
        sim.requests().iter().all(|r| r.status == Some(201)),
        "each lead was sent once: {:?}",
        sim.requests()
    );
    drop(ingest);
}

/// Redis killed for 20 s while leads are posted and delivered, then started again on its
/// append-only file: meanwhile ingest answers 503 with `Retry-After` and `/readyz` says the
/// queue is unreachable; afterwards every lead answered 202 is delivered, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_for_20_seconds_refuses_with_503_and_loses_nothing_accepted() {
    let mut redis = RedisServer::start_with(RedisOptions { append_only: true });
    let sim = Arc::new(start_sim(Vec::new()).await);
    sim.set_detect_duplicates(true);
    let dir = tempfile::tempdir().unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &default_sources());
    env.set("LEADGATE_REDIS_URL", redis.url())
        .set("LEADGATE_DELIVERY_CONCURRENCY", CONCURRENCY.to_string())
        .set("LEADGATE_ADMIN_TOKEN", ADMIN_TOKEN);
    let gateway = GatewayProcess::start(&env, &[]).await;
    let http = client();
    let readyz = |http: reqwest::Client, base: String| async move {
        let response = http.get(format!("{base}/readyz")).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json::<Value>().await.unwrap())
    };
    let mut accepted = BTreeSet::new();
    let mut refused_while_down = 0;
    let mut unready_while_down = None;
    let started = Instant::now();
    let mut stopped_at = None;
    let mut restarted = false;
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(30) {
        if stopped_at.is_none() && started.elapsed() > Duration::from_secs(3) {
            redis.stop();
            stopped_at = Some(Instant::now());
        }
        if !restarted && stopped_at.is_some_and(|t| t.elapsed() > Duration::from_secs(20)) {
            redis.restart();
            restarted = true;
        }
        let name = format!("D{i:04}");
        i += 1;
        let response = http
            .post(format!("{}/in/website", gateway.base))
            .json(&json!({"name": format!("Lead {name}")}))
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            202 => {
                accepted.insert(name);
            }
            503 => {
                assert!(response.headers().contains_key("retry-after"));
                refused_while_down += 1;
            }
            other => panic!("unexpected {other}"),
        }
        if unready_while_down.is_none()
            && !restarted
            && stopped_at.is_some_and(|t| t.elapsed() > Duration::from_secs(5))
        {
            unready_while_down = Some(readyz(http.clone(), gateway.base.clone()).await);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        refused_while_down > 10,
        "ingest answered 503 while Redis was down"
    );
    let (status, body) = unready_while_down.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "unavailable", "{body}");
    assert_eq!(body["queue"]["reachable"], false, "{body}");
    let (status, body) = readyz(http.clone(), gateway.base.clone()).await;
    assert_eq!(status, 200, "ready again once Redis is back: {body}");
    assert_eq!(body["queue"]["reachable"], true, "{body}");

    let received = eventually(Duration::from_secs(60), "every accepted lead", || async {
        let received = exactly_once(&sim.received());
        accepted.is_subset(&received).then_some(received)
    })
    .await;
    // A request cut off just as Redis stopped may have been written though it was answered
    // 503 (the README says so: retry with an idempotency key); nothing else may arrive.
    let extra: Vec<_> = received.difference(&accepted).collect();
    assert!(
        extra.len() <= 2,
        "leads that were refused arrived: {extra:?}"
    );
    gateway.wait_idle(Duration::from_secs(30)).await;
    // A delivery in flight when Redis died can be sent again: its record could not be written
    // before the lease ran out.
    assert_resends_at_most(
        &sim,
        CONCURRENCY,
        "Redis dying under at most 8 deliveries in flight",
    );
}

/// Onpipeline takes a lead while the gateway cannot reach Redis: the gateway keeps trying to
/// record the delivery (the lease has not run out), records it once Redis is reachable again
/// ten seconds later, and never sends the lead again, even after the lease would have expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_made_while_redis_is_unreachable_is_recorded_when_it_returns_and_not_sent_again()
{
    const LEASE: Duration = Duration::from_secs(15);
    let redis = RedisServer::start_with(RedisOptions { append_only: true });
    let relay = Relay::start(redis.addr()).await;
    let sim = Arc::new(start_sim(Vec::new()).await);
    sim.set_detect_duplicates(true);
    // Onpipeline takes a second to answer: time to cut Redis off while the request is out.
    sim.set_latency(Duration::from_secs(1));
    let dir = tempfile::tempdir().unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &default_sources());
    env.set("LEADGATE_REDIS_URL", format!("redis://{}/", relay.addr))
        .set("LEADGATE_LEASE_TIMEOUT", format!("{}s", LEASE.as_secs()))
        .set("LEADGATE_ADMIN_TOKEN", ADMIN_TOKEN);
    let gateway = GatewayProcess::start(&env, &[]).await;
    let response = client()
        .post(format!("{}/in/website", gateway.base))
        .json(&json!({"name": "Lead Unrecorded"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    eventually(
        Duration::from_secs(10),
        "the delivery to be sent",
        || async { (!sim.requests().is_empty()).then_some(()) },
    )
    .await;
    let sent = Instant::now();
    relay.down();
    wait_received(&sim, 1, Duration::from_secs(5)).await;
    eventually(Duration::from_secs(5), "Onpipeline's answer", || async {
        (sim.requests()[0].status == Some(201)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    relay.up().await;

    let record = eventually(Duration::from_secs(5), "the delivery record", || async {
        let record = gateway.admin_get(&format!("/admin/leads/{id}")).await?;
        (record["state"] == "delivered").then_some(record)
    })
    .await;
    assert!(
        sent.elapsed() < LEASE,
        "recorded within the lease: {:?}",
        sent.elapsed()
    );
    let attempts = record["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{record}");
    assert_eq!(attempts[0]["outcome"], "delivered", "{record}");
    assert_eq!(
        record["delivery"]["onpipeline_lead_id"],
        sim.received()[0].lead_id
    );

    // Past the moment the lease would have run out, the lead was not sent again.
    tokio::time::sleep((LEASE + Duration::from_secs(3)).saturating_sub(sent.elapsed())).await;
    assert_eq!(sim.requests().len(), 1, "{:?}", sim.requests());
    assert_eq!(sim.received().len(), 1);
    assert_resends_at_most(&sim, 0, "a Redis outage shorter than the lease");
    assert!(
        gateway
            .log()
            .contains("Could not settle a lease; retrying."),
        "the settle was retried while Redis was away:\n{}",
        gateway.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onpipeline_down_slow_throttled_and_failing_still_gets_each_lead_once_on_schedule() {
    let sim = Arc::new(start_sim(Vec::new()).await);
    let relay = Relay::start(sim.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &default_sources());
    env.set("LEADGATE_ONPIPELINE_URL", format!("https://{}", relay.addr))
        .set("LEADGATE_RETRY_BASE", "250ms")
        .set("LEADGATE_RETRY_MAX_DELAY", "2s")
        .set("LEADGATE_DELIVERY_CONCURRENCY", "2")
        .set("LEADGATE_ADMIN_TOKEN", ADMIN_TOKEN);
    let gateway = GatewayProcess::start(&env, &[]).await;
    let http = client();

    // Down: connections refused for a minute.
    relay.down();
    let mut ids = Vec::new();
    for i in 0..10 {
        let response = http
            .post(format!("{}/in/website", gateway.base))
            .json(&json!({"name": format!("Lead O{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        ids.push(
            response.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(sim.received().is_empty());

    // Back, but slow for a while: each lead is created at once and answered after the 2 s
    // timeout, so the gateway never hears and sends it again; the repeat is answered 409.
    sim.set_detect_duplicates(true);
    sim.set_answer_delay(Duration::from_secs(3));
    let slow_from = chrono::Utc::now();
    relay.up().await;
    let abandoned = || {
        sim.requests()
            .iter()
            .filter(|r| r.outcome == RequestOutcome::Abandoned)
            .count()
    };
    tokio::time::sleep(Duration::from_secs(6)).await;
    eventually(Duration::from_secs(30), "several late answers", || async {
        (abandoned() >= 4).then_some(())
    })
    .await;
    sim.set_answer_delay(Duration::ZERO);
    // Requests already waiting for their late answer time out up to 2 s later.
    let slow_until = chrono::Utc::now() + chrono::Duration::seconds(2);
    // Then throttled, then a burst of failures, then a proxy's page.
    sim.push_faults([Fault::Status {
        status: 429,
        retry_after: Some("3".into()),
        message: Some("Too many requests".into()),
    }]);
    sim.push_faults((0..20).map(|_| Fault::status(500)));
    sim.push_faults([Fault::NonJson502]);

    let leads = wait_received(&sim, ids.len(), Duration::from_secs(60)).await;
    assert_eq!(exactly_once(&leads).len(), ids.len());
    gateway.wait_idle(Duration::from_secs(60)).await;
    assert!(sim.pending_faults().is_empty(), "every fault was met");
    let requests = sim.requests();
    let answered = |status: u16| requests.iter().filter(|r| r.status == Some(status)).count();
    assert_eq!(
        (answered(429), answered(500), answered(502)),
        (1, 20, 1),
        "{requests:?}"
    );
    // Each late answer made the gateway send that lead once more, no more: the repeats the
    // simulator refused are exactly the answers the gateway never heard.
    let repeats = sim.repeats();
    assert_eq!(
        repeats.len(),
        abandoned(),
        "one repeat per late answer: {repeats:?}"
    );

    // The attempts followed the schedule: never longer apart than the cap (plus the time an
    // attempt itself took, and slots held by slow answers), and a 429's Retry-After was
    // honoured. A lead answered late ends with the 409 of its repeat.
    let mut saw_429 = false;
    let mut ended_duplicate = BTreeSet::new();
    for id in &ids {
        let record = gateway
            .admin_get(&format!("/admin/leads/{id}"))
            .await
            .unwrap();
        assert_eq!(record["state"], "delivered", "{record}");
        let attempts: Vec<Attempt> = serde_json::from_value(record["attempts"].clone()).unwrap();
        let last = attempts.last().unwrap();
        match last.outcome {
            AttemptOutcome::Delivered => {}
            AttemptOutcome::Duplicate => {
                ended_duplicate.insert(id.clone());
            }
            other => panic!("ended {other:?}: {attempts:?}"),
        }
        assert!(
            attempts.len() > 3,
            "retried through the outage: {attempts:?}"
        );
        for pair in attempts.windows(2) {
            let gap = (pair[1].at - pair[0].at).to_std().unwrap();
            let spent = Duration::from_millis(pair[0].duration_ms);
            // Cap (2 s), plus waiting for a delivery slot held by attempts timing out (2 × 2 s),
            // plus slack; while answers were slow, slots stayed busy for the whole phase.
            let mut allowed = spent + Duration::from_secs(7);
            if pair[0].at < slow_until && pair[1].at > slow_from {
                allowed += (slow_until - slow_from).to_std().unwrap();
            }
            assert!(
                gap <= allowed,
                "waited {gap:?} after an attempt that took {spent:?}: {attempts:?}"
            );
            if pair[0].status == Some(429) {
                saw_429 = true;
                assert!(
                    gap >= Duration::from_secs(3),
                    "Retry-After: 3 honoured, waited {gap:?}"
                );
            }
        }
    }
    assert!(saw_429, "the 429 was met by one of the leads");
    let repeated: BTreeSet<&str> = repeats.iter().map(|r| r.lead_id.as_str()).collect();
    assert_eq!(
        ended_duplicate.len(),
        repeated.len(),
        "each lead created by a late answer was settled by its 409"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_pauses_delivery_uncounted_until_the_token_file_is_fixed() {
    let sim = Arc::new(start_sim(Vec::new()).await);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "revoked-token-0000").unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &default_sources());
    env.unset("LEADGATE_ONPIPELINE_TOKEN")
        .set(
            "LEADGATE_ONPIPELINE_TOKEN_FILE",
            token_file.display().to_string(),
        )
        .set("LEADGATE_ADMIN_TOKEN", ADMIN_TOKEN);
    let gateway = GatewayProcess::start(&env, &[]).await;
    let http = client();
    let mut ids = Vec::new();
    for i in 0..5 {
        let response = http
            .post(format!("{}/in/website", gateway.base))
            .json(&json!({"name": format!("Lead T{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        ids.push(
            response.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let readyz: Value = eventually(Duration::from_secs(10), "delivery to pause", || async {
        let body = gateway.readyz().await?;
        (body["delivery"]["state"] == "paused").then_some(body)
    })
    .await;
    assert_eq!(readyz["status"], "degraded");
    assert!(
        readyz["delivery"]["reason"]
            .as_str()
            .unwrap()
            .contains("401"),
        "{readyz}"
    );
    let metrics = gateway.metrics().await;
    assert_eq!(
        metrics.value("leadgate_delivery_paused", &[]),
        Some(1.0),
        "{}",
        metrics.text
    );
    // Probes keep asking, with back-off; let a few happen.
    eventually(Duration::from_secs(15), "probes", || async {
        (sim.requests().len() >= 3).then_some(())
    })
    .await;
    assert!(sim.requests().iter().all(|r| r.status == Some(401)));
    assert!(
        gateway.log().contains("ALERT"),
        "an alert is logged:\n{}",
        gateway.log()
    );
    assert!(
        !gateway.log().contains("revoked-token-0000"),
        "the token is never logged"
    );

    std::fs::write(&token_file, TOKEN).unwrap();
    let leads = wait_received(&sim, ids.len(), Duration::from_secs(30)).await;
    assert_eq!(exactly_once(&leads).len(), ids.len());
    // No attempt was counted against the leads while paused: each went through as attempt 1.
    // The simulator holds a lead a moment before the gateway records its delivery.
    for id in &ids {
        let record = eventually(Duration::from_secs(10), "the delivered record", || async {
            let record = gateway.admin_get(&format!("/admin/leads/{id}")).await?;
            (record["state"] == "delivered").then_some(record)
        })
        .await;
        let attempts = record["attempts"].as_array().unwrap();
        assert!(attempts.iter().all(|a| a["number"] == 1), "{record}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_406_lead_is_dead_lettered_and_replayed_after_its_mapping_is_fixed() {
    let sim = Arc::new(start_sim(Vec::new()).await);
    // The account has these custom fields; the source first maps `budget` to a wrong one.
    sim.set_custom_fields(&["1111111", "2222222", "3333333", "4444444"]);
    let wrong = default_sources().replacen("budget = \"1111111\"", "budget = \"9999999\"", 1);
    let dir = tempfile::tempdir().unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &wrong);
    env.set("LEADGATE_ADMIN_TOKEN", ADMIN_TOKEN);
    let mut gateway = GatewayProcess::start(&env, &[]).await;
    let response = client()
        .post(format!("{}/in/website", gateway.base))
        .json(&json!({"name": "Nadia Budget", "budget": "10k"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let dead: Value = eventually(Duration::from_secs(10), "the dead letter", || async {
        let body = gateway.admin_get("/admin/dead").await?;
        (body["dead"].as_array()?.len() == 1).then_some(body)
    })
    .await;
    assert_eq!(dead["dead"][0]["id"], id);
    assert!(
        dead["dead"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("9999999"),
        "{dead}"
    );
    assert_eq!(dead["dead"][0]["history"][0]["status"], 406, "{dead}");
    assert!(sim.received().is_empty());

    // Fix the mapping, restart (gracefully), replay.
    std::fs::write(dir.path().join("leadgate.toml"), default_sources()).unwrap();
    gateway.sigterm();
    assert!(gateway.wait_exit(Duration::from_secs(30)).await.success());
    gateway.restart(|_| {}).await;
    let replayed: Value = gateway
        .admin(reqwest::Method::POST, "/admin/dead/replay")
        .json(&json!({"ids": [id]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(replayed["replayed"], json!([id]), "{replayed}");
    let leads = wait_received(&sim, 1, Duration::from_secs(20)).await;
    let extra: BTreeMap<String, String> = leads[0].payload["Extra"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["ID"].as_str().unwrap().to_owned(),
                e["Value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        extra.get("1111111").map(String::as_str),
        Some("10k"),
        "{extra:?}"
    );
    // The simulator has the lead a moment before the gateway records the delivery.
    let record: Value = eventually(Duration::from_secs(5), "the delivered record", || async {
        let record = gateway.admin_get(&format!("/admin/leads/{id}")).await?;
        (record["state"] == "delivered").then_some(record)
    })
    .await;
    let story: Vec<(u64, &str)> = record["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["number"].as_u64().unwrap(),
                a["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        story,
        [(1, "rejected"), (1, "replayed"), (2, "delivered")],
        "the 406, the replay, then the delivery: {record}"
    );
    let stats = gateway.wait_idle(Duration::from_secs(10)).await;
    assert_eq!(stats["dead"], 0, "{stats}");
    assert_eq!(sim.received().len(), 1, "the replayed lead arrived once");
}

/// What one post during the SIGTERM test got, and when.
struct Post {
    name: String,
    started: Instant,
    finished: Instant,
    /// The HTTP status and whether `Retry-After` came with it; `None`: no answer (the process
    /// had exited).
    answer: Option<(u16, bool)>,
}

/// SIGTERM while leads are posted concurrently and deliveries are in flight: every lead answered
/// 202 is delivered once (those the drain did not reach after a restart); from the first 503
/// on, every post gets 503 with `Retry-After` until the process is gone, `/readyz` answers 503
/// meanwhile, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing_and_refuses_new_leads_while_draining() {
    const POSTERS: usize = 8;
    let sim = Arc::new(start_sim(Vec::new()).await);
    sim.set_detect_duplicates(true);
    // Slow answers keep deliveries in flight while the gateway drains.
    sim.set_latency(Duration::from_millis(1500));
    let dir = tempfile::tempdir().unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &default_sources());
    env.set("LEADGATE_SHUTDOWN_TIMEOUT", "10s")
        .set("LEADGATE_ONPIPELINE_TIMEOUT", "5s")
        .set("LEADGATE_LEASE_TIMEOUT", "10s")
        .set("LEADGATE_ADMIN_TOKEN", ADMIN_TOKEN);
    let mut gateway = GatewayProcess::start(&env, &[]).await;
    let http = client();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let accepted_so_far = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut posters = tokio::task::JoinSet::new();
    for poster in 0..POSTERS {
        let (http, base) = (http.clone(), gateway.base.clone());
        let (stop, accepted_so_far) = (stop.clone(), accepted_so_far.clone());
        posters.spawn(async move {
            let mut posts = Vec::new();
            for n in 0.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let name = format!("S{poster}x{n:03}");
                let started = Instant::now();
                let sent = http
                    .post(format!("{base}/in/website"))
                    .json(&json!({"name": format!("Lead {name}")}))
                    .send()
                    .await;
                let answer = sent
                    .ok()
                    .map(|r| (r.status().as_u16(), r.headers().contains_key("retry-after")));
                if answer.is_some_and(|(status, _)| status == 202) {
                    accepted_so_far.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let gone = answer.is_none();
                posts.push(Post {
                    name,
                    started,
                    finished: Instant::now(),
                    answer,
                });
                if gone {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            posts
        });
    }
    eventually(
        Duration::from_secs(20),
        "leads accepted and deliveries in flight",
        || async {
            (accepted_so_far.load(std::sync::atomic::Ordering::Relaxed) >= 40
                && sim
                    .requests()
                    .iter()
                    .any(|r| r.outcome == RequestOutcome::InFlight))
            .then_some(())
        },
    )
    .await;
    let signalled = Instant::now();
    gateway.sigterm();
    // /readyz while the process drains, until it no longer answers.
    let mut readyz = Vec::new();
    loop {
        let asked = Instant::now();
        let Ok(response) = http
            .get(format!("{}/readyz", gateway.base))
            .timeout(Duration::from_secs(2))
            .send()
            .await
        else {
            break;
        };
        readyz.push((asked, response.status().as_u16()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = gateway.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "exit 0 after a graceful shutdown: {status}\n{}",
        gateway.log()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut posts = Vec::new();
    while let Some(some) = posters.join_next().await {
        posts.extend(some.unwrap());
    }

    let mut accepted = BTreeSet::new();
    let mut refused = BTreeSet::new();
    for post in &posts {
        match post.answer {
            Some((202, _)) => {
                accepted.insert(post.name.clone());
            }
            Some((503, retry_after)) => {
                assert!(retry_after, "503 with Retry-After");
                refused.insert(post.name.clone());
            }
            Some((other, _)) => panic!("{} was answered {other}", post.name),
            None => assert!(
                post.started > signalled,
                "{} got no answer before the shutdown",
                post.name
            ),
        }
    }
    let drain_seen = posts
        .iter()
        .filter(|p| matches!(p.answer, Some((503, _))))
        .map(|p| p.finished)
        .min()
        .expect("posts during the drain get 503");
    for post in posts.iter().filter(|p| p.started > drain_seen) {
        assert!(
            !matches!(post.answer, Some((202, _))),
            "{} was accepted after the drain had begun",
            post.name
        );
    }
    let readyz_after: Vec<u16> = readyz
        .iter()
        .filter(|(at, _)| *at > drain_seen)
        .map(|(_, status)| *status)
        .collect();
    assert!(
        !readyz_after.is_empty() && readyz_after.iter().all(|s| *s == 503),
        "/readyz answers 503 while draining: {readyz:?}"
    );

    sim.set_latency(Duration::ZERO);
    gateway.restart(|_| {}).await;
    let leads = wait_received(&sim, accepted.len(), Duration::from_secs(60)).await;
    assert_eq!(
        exactly_once(&leads),
        accepted,
        "every accepted lead, once, and none of the {} refused",
        refused.len()
    );
    gateway.wait_idle(Duration::from_secs(20)).await;
    assert_resends_at_most(&sim, 0, "a graceful shutdown that finished its deliveries");
}

/// Deliveries still running at the shutdown deadline give their leads back at once, so the
/// next process delivers them without waiting for the lease timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_leases_still_running_at_the_deadline() {
    let sim = Arc::new(start_sim(Vec::new()).await);
    sim.set_detect_duplicates(true);
    // Onpipeline answers after 4 s, but the gateway may drain for 1 s only.
    sim.set_latency(Duration::from_secs(4));
    let dir = tempfile::tempdir().unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &default_sources());
    env.set("LEADGATE_SHUTDOWN_TIMEOUT", "1s")
        .set("LEADGATE_ONPIPELINE_TIMEOUT", "10s")
        .set("LEADGATE_LEASE_TIMEOUT", "60s");
    let mut gateway = GatewayProcess::start(&env, &[]).await;
    let http = client();
    for i in 0..5 {
        let response = http
            .post(format!("{}/in/website", gateway.base))
            .json(&json!({"name": format!("Lead Z{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
    eventually(
        Duration::from_secs(10),
        "five requests in flight",
        || async { (sim.requests().len() >= 5).then_some(()) },
    )
    .await;
    gateway.sigterm();
    let status = gateway.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status}\n{}", gateway.log());
    assert!(
        gateway.log().contains("releasing their leases"),
        "{}",
        gateway.log()
    );

    sim.set_latency(Duration::ZERO);
    let restarted = Instant::now();
    gateway.restart(|_| {}).await;
    let leads = wait_received(&sim, 5, Duration::from_secs(20)).await;
    assert_eq!(exactly_once(&leads).len(), 5);
    assert_resends_at_most(
        &sim,
        0,
        "a graceful shutdown, whose cut-off sends created nothing",
    );
    let requests = sim.requests();
    assert_eq!(
        requests.len(),
        10,
        "five abandoned sends, five after the restart"
    );
    assert!(
        requests[..5]
            .iter()
            .all(|r| r.outcome == RequestOutcome::Cancelled),
        "the sends cut off at the deadline created nothing: {requests:?}"
    );
    assert!(
        restarted.elapsed() < Duration::from_secs(30),
        "delivered long before the 60 s lease timeout: the leases were released"
    );
}

/// A token file that cannot be read at start-up holds delivery from the start — `/readyz` says
/// so, naming the file, before any lead arrives, and nothing is sent — until the file is
/// written; then the waiting lead is delivered once.
#[tokio::test]
async fn an_unreadable_token_file_holds_delivery_from_start_up_until_it_can_be_read() {
    use crate::helpers::app::TestApp;
    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("onpipeline-token");
    let app = TestApp::spawn_with(&default_sources(), |env| {
        env.unset("LEADGATE_ONPIPELINE_TOKEN").set(
            "LEADGATE_ONPIPELINE_TOKEN_FILE",
            token_file.display().to_string(),
        );
    })
    .await;
    let readyz = || async {
        app.http
            .get(app.url("/readyz"))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let ready = readyz().await;
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert_eq!(ready["delivery"]["state"], "held", "{ready}");
    let reason = ready["delivery"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("token cannot be read") && reason.contains("onpipeline-token"),
        "{ready}"
    );

    let response = app
        .post_json("website", &json!({"name": "Held Token"}))
        .await;
    assert_eq!(response.status(), 202);
    // Several re-reads (LEADGATE_PAUSE_PROBE_MAX is 300ms here): still held, nothing sent.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(readyz().await["delivery"]["state"], "held");
    assert!(app.sim.requests().is_empty(), "nothing is sent while held");

    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let leads = app.received(1).await;
    assert_eq!(leads[0].payload["LastName"], "Token");
    let ready = readyz().await;
    assert_eq!(ready["delivery"]["state"], "running", "{ready}");
    assert_eq!(app.sim.requests().len(), 1, "one request, accepted");
}

/// An operator's pause made while delivery was held for its token file is still in force
/// once the file can be read: nothing is sent until the operator resumes.
#[tokio::test]
async fn an_operator_pause_made_while_held_for_the_token_file_outlasts_the_hold() {
    use crate::helpers::app::TestApp;
    use leadgate::forwarder::DeliveryStatus;
    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("onpipeline-token");
    let app = TestApp::spawn_with(&default_sources(), |env| {
        env.unset("LEADGATE_ONPIPELINE_TOKEN")
            .set(
                "LEADGATE_ONPIPELINE_TOKEN_FILE",
                token_file.display().to_string(),
            )
            .set("LEADGATE_ADMIN_TOKEN", ADMIN_TOKEN);
    })
    .await;
    let admin = |path: &str| app.http.post(app.url(path)).bearer_auth(ADMIN_TOKEN).send();
    assert_eq!(admin("/admin/pause").await.unwrap().status(), 200);
    let response = app
        .post_json("website", &json!({"name": "Paused Held"}))
        .await;
    assert_eq!(response.status(), 202);
    std::fs::write(&token_file, TOKEN).unwrap();
    eventually(Duration::from_secs(10), "the hold to end", || async {
        matches!(
            app.gateway().delivery(),
            DeliveryStatus::Paused {
                by_operator: true,
                ..
            }
        )
        .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(app.sim.requests().is_empty(), "the operator's pause holds");
    assert_eq!(admin("/admin/resume").await.unwrap().status(), 200);
    let leads = app.received(1).await;
    assert_eq!(leads[0].payload["LastName"], "Held");
}
