//! `leadgate serve`, the real binary, on the Redis set-ups the queue contract proves at queue
//! level: a Redis Cluster of three masters (`LEADGATE_REDIS_CLUSTER=true`, seed nodes in
//! `LEADGATE_REDIS_URL`) and a TLS-only Redis (`rediss://`, its CA in `LEADGATE_CA_FILE`). A
//! lead posted to each is answered `202`, reaches the simulator once, and its record on that
//! Redis says delivered.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::app::{
    ADMIN_TOKEN, GatewayEnv, GatewayProcess, client, default_sources, start_sim, wait_received,
};
use crate::helpers::redis::{RedisCluster, RedisServer};

/// Posts one lead, checks that it is delivered exactly once, and returns its id.
async fn one_lead_is_delivered_once(
    gateway: &GatewayProcess,
    sim: &leadgate::sim::Simulator,
) -> String {
    let ready: Value = gateway.readyz().await.unwrap();
    assert_eq!(ready["queue"]["backend"], "redis", "{ready}");
    assert_eq!(ready["queue"]["reachable"], true, "{ready}");

    let response = client()
        .post(format!("{}/in/website", gateway.base))
        .json(&json!({"name": "Ingrid Solberg", "email": "ingrid.solberg@example.no"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    let id = body["id"].as_str().unwrap().to_owned();

    let leads = wait_received(sim, 1, Duration::from_secs(20)).await;
    assert_eq!(leads[0].payload["FirstName"], "Ingrid");
    assert_eq!(leads[0].payload["LastName"], "Solberg");
    let stats = gateway.wait_idle(Duration::from_secs(20)).await;
    assert_eq!(stats["delivered"], 1, "{stats}");
    // Give a second delivery the time to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sim.received().len(), 1, "the lead reached Onpipeline twice");
    id
}

/// `HGET {leadgate}:lead:<id> state` on each client; the one node holding the key answers.
fn record_states(clients: &[redis::Client], id: &str) -> Vec<String> {
    clients
        .iter()
        .filter_map(|client| {
            let mut conn = client.get_connection().ok()?;
            redis::cmd("HGET")
                .arg(format!("{{leadgate}}:lead:{id}"))
                .arg("state")
                .query::<Option<String>>(&mut conn)
                .ok()
                .flatten()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_a_redis_cluster_delivers_a_posted_lead_once() {
    let cluster = RedisCluster::start();
    let sim = Arc::new(start_sim(Vec::new()).await);
    let dir = tempfile::tempdir().unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &default_sources());
    env.set("LEADGATE_REDIS_URL", cluster.urls())
        .set("LEADGATE_REDIS_CLUSTER", "true")
        .set("LEADGATE_ADMIN_TOKEN", ADMIN_TOKEN);
    let gateway = GatewayProcess::start(&env, &[]).await;

    let id = one_lead_is_delivered_once(&gateway, &sim).await;

    // The record lives on exactly one master (the slot of the `{leadgate}` hash tag); the
    // others answer MOVED.
    let nodes: Vec<redis::Client> = cluster
        .urls()
        .split(',')
        .map(|url| redis::Client::open(url).unwrap())
        .collect();
    assert_eq!(record_states(&nodes, &id), ["delivered"]);
    let log = gateway.log();
    assert!(!log.contains("ERROR"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_a_tls_redis_delivers_a_posted_lead_once() {
    let redis = RedisServer::start_tls();
    let sim = Arc::new(start_sim(Vec::new()).await);
    let dir = tempfile::tempdir().unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &default_sources());
    // One CA file serves every outbound TLS connection: here a bundle of the simulator's CA
    // (Onpipeline over HTTPS) and the Redis server's.
    let bundle = dir.path().join("ca-bundle.pem");
    let redis_ca = std::fs::read_to_string(redis.ca_file().unwrap()).unwrap();
    std::fs::write(&bundle, format!("{}\n{redis_ca}", sim.ca_pem())).unwrap();
    env.set("LEADGATE_REDIS_URL", redis.url())
        .set("LEADGATE_CA_FILE", bundle.display().to_string())
        .set("LEADGATE_ADMIN_TOKEN", ADMIN_TOKEN);
    assert!(redis.url().starts_with("rediss://"));
    let gateway = GatewayProcess::start(&env, &[]).await;

    let id = one_lead_is_delivered_once(&gateway, &sim).await;

    assert_eq!(record_states(&[redis.client()], &id), ["delivered"]);
    let log = gateway.log();
    assert!(!log.contains("ERROR"), "{log}");
}
