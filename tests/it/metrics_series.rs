//! The Prometheus series an operator alerts on, read from `GET /metrics` of a gateway running as
//! its own process (so every counter and gauge is this test's alone): a duplicate, a 429, a dead
//! letter, a retry waiting, and leads waiting while delivery is paused each show in their
//! series with the exact value.

use std::sync::Arc;
use std::time::Duration;

use leadgate::sim::Fault;
use serde_json::{Value, json};

use crate::helpers::app::{
    ADMIN_TOKEN, GatewayEnv, GatewayProcess, PARTNER_KEY, client, default_sources, start_sim,
    wait_received,
};
use crate::helpers::eventually;

/// The default sources plus `tight`, a form source that lets one post a minute from an IP.
fn sources() -> String {
    format!(
        r#"{}
[[source]]
id = "tight"
kind = "form"
[source.fields]
name = "FullName"
email = "Email.work"
[source.limits]
per_ip = "1/minute"
total = "off"
"#,
        default_sources()
    )
}

async fn post_website(gateway: &GatewayProcess, name: &str) -> String {
    let response = client()
        .post(format!("{}/in/website", gateway.base))
        .json(&json!({"name": name}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().to_owned()
}

async fn post_partner(gateway: &GatewayProcess, key: &str) -> reqwest::Response {
    client()
        .post(format!("{}/in/acme", gateway.base))
        .bearer_auth(PARTNER_KEY)
        .header("idempotency-key", key)
        .json(&json!({"name": "Tomás Herrera", "email": "tomas.herrera@example.es"}))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_alerting_series_shows_its_event_on_the_metrics_page() {
    let sim = Arc::new(start_sim(Vec::new()).await);
    let dir = tempfile::tempdir().unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &sources());
    env.set("LEADGATE_ADMIN_TOKEN", ADMIN_TOKEN);
    let gateway = GatewayProcess::start(&env, &[]).await;
    let admin_stats = || async {
        let stats = gateway.admin_stats().await.unwrap();
        (
            stats["ready"].as_u64().unwrap(),
            stats["leased"].as_u64().unwrap(),
            stats["delayed"].as_u64().unwrap(),
            stats["dead"].as_u64().unwrap(),
        )
    };

    // A dead letter: Onpipeline refuses the lead with 406.
    sim.push_faults([Fault::status(406)]);
    post_website(&gateway, "Dana Rechazo").await;
    eventually(Duration::from_secs(10), "the dead letter", || async {
        (admin_stats().await.3 == 1).then_some(())
    })
    .await;

    // A retry waiting: 503 with Retry-After ten minutes, far past this test.
    sim.push_faults([Fault::retry_after(503, "600")]);
    post_website(&gateway, "Rita Espera").await;
    eventually(Duration::from_secs(10), "the delayed retry", || async {
        (admin_stats().await.2 == 1).then_some(())
    })
    .await;

    // A duplicate: the same Idempotency-Key twice is one lead, delivered (201).
    for _ in 0..2 {
        assert_eq!(post_partner(&gateway, "order-7731").await.status(), 202);
    }
    wait_received(&sim, 1, Duration::from_secs(10)).await;

    // Delivery paused by an operator: what is posted now waits, ready.
    let paused = gateway
        .admin(reqwest::Method::POST, "/admin/pause")
        .send()
        .await
        .unwrap();
    assert!(paused.status().is_success(), "{}", paused.status());
    post_website(&gateway, "Olga Cola").await;
    // A 429: the tight source takes one post a minute from this address.
    let tight = |name: &'static str| {
        client()
            .post(format!("{}/in/tight", gateway.base))
            .json(&json!({"name": name}))
            .send()
    };
    assert_eq!(tight("Pia Primera").await.unwrap().status(), 202);
    let refused = tight("Sven Segundo").await.unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(admin_stats().await, (2, 0, 1, 1));

    // The gauges are sampled every few seconds: wait for a sample that shows the two waiting
    // leads as at least a second old.
    let metrics = eventually(Duration::from_secs(20), "the queue gauges", || async {
        let metrics = gateway.metrics().await;
        let oldest = metrics.value("leadgate_queue_oldest_ready_seconds", &[])?;
        let ready = metrics.value("leadgate_queue_depth", &[("state", "ready")])?;
        (ready == 2.0 && oldest >= 1.0).then_some(metrics)
    })
    .await;
    let depth = |state: &str| metrics.value("leadgate_queue_depth", &[("state", state)]);
    assert_eq!(depth("leased"), Some(0.0));
    assert_eq!(depth("delayed"), Some(1.0));
    assert_eq!(depth("dead"), Some(1.0));
    let oldest = metrics
        .value("leadgate_queue_oldest_ready_seconds", &[])
        .unwrap();
    assert!(oldest < 60.0, "the oldest ready lead waited {oldest} s");

    let received = |source: &str, outcome: &str| {
        metrics.value(
            "leadgate_leads_received_total",
            &[("source", source), ("outcome", outcome)],
        )
    };
    assert_eq!(received("acme", "queued"), Some(1.0));
    assert_eq!(received("acme", "duplicate"), Some(1.0));
    assert_eq!(received("tight", "queued"), Some(1.0));
    assert_eq!(received("tight", "rate_limited"), Some(1.0));
    assert_eq!(received("website", "queued"), Some(3.0));

    assert_eq!(
        metrics.value("leadgate_dead_lettered_total", &[]),
        Some(1.0)
    );
    let attempts = |outcome: &str, status: &str| {
        metrics.value(
            "leadgate_delivery_attempts_total",
            &[("outcome", outcome), ("status", status)],
        )
    };
    assert_eq!(attempts("rejected", "406"), Some(1.0));
    assert_eq!(attempts("retry", "503"), Some(1.0));
    assert_eq!(attempts("delivered", "201"), Some(1.0));
    let all_attempts: f64 = metrics
        .samples
        .iter()
        .filter(|s| s.name == "leadgate_delivery_attempts_total")
        .map(|s| s.value)
        .sum();
    assert_eq!(all_attempts, 3.0, "{:#?}", metrics.samples);
    assert_eq!(metrics.value("leadgate_delivery_paused", &[]), Some(1.0));
}
