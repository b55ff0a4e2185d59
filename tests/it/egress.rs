//! The egress IP: Onpipeline only talks to whitelisted addresses. The simulator here allows
//! only 127.0.0.2.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::app::{TestApp, default_sources, start_sim, wait_received};
use crate::helpers::eventually;

async fn app_behind_whitelist(egress: Option<&str>) -> TestApp {
    let sim = Arc::new(start_sim(vec!["127.0.0.2".parse().unwrap()]).await);
    TestApp::spawn_against(sim, &default_sources(), |env| {
        if let Some(ip) = egress {
            env.set("LEADGATE_EGRESS_IP", ip);
        }
    })
    .await
}

#[tokio::test]
async fn leads_leave_from_the_configured_egress_ip() {
    let app = app_behind_whitelist(Some("127.0.0.2")).await;
    let response = app
        .post_json("website", &json!({"name": "Egress Ok"}))
        .await;
    assert_eq!(response.status(), 202);
    let leads = app.received(1).await;
    assert_eq!(leads[0].peer_ip, "127.0.0.2".parse::<IpAddr>().unwrap());
}

#[tokio::test]
async fn a_wrong_egress_pauses_delivery_and_a_fixed_restart_delivers_each_lead_once() {
    let mut app = app_behind_whitelist(None).await;
    for i in 0..5 {
        let response = app
            .post_json("website", &json!({"name": format!("Lead N{i}")}))
            .await;
        assert_eq!(response.status(), 202);
    }
    let readyz: Value = eventually(
        Duration::from_secs(10),
        "delivery to pause on 403",
        || async {
            let body: Value = app
                .http
                .get(app.url("/readyz"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (body["delivery"]["state"] == "paused").then_some(body)
        },
    )
    .await;
    assert!(
        readyz["delivery"]["reason"]
            .as_str()
            .unwrap()
            .contains("403"),
        "{readyz}"
    );
    assert!(app.sim.received().is_empty());
    assert!(app.sim.requests().iter().all(|r| r.status == Some(403)));

    app.stop().await;
    app.env.set("LEADGATE_EGRESS_IP", "127.0.0.2");
    app.start().await;
    let leads = wait_received(&app.sim, 5, Duration::from_secs(20)).await;
    let mut names: Vec<&str> = leads
        .iter()
        .map(|l| l.payload["LastName"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["N0", "N1", "N2", "N3", "N4"]);
    assert!(leads.iter().all(|l| l.peer_ip.to_string() == "127.0.0.2"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.sim.received().len(), 5, "no lead twice");
}

#[tokio::test]
async fn leads_can_leave_through_a_static_ip_connect_proxy() {
    // The proxy leaves from 127.0.0.3, the only address the simulator allows.
    let proxy = crate::helpers::proxy::ConnectProxy::start("127.0.0.3".parse().unwrap()).await;
    let sim = Arc::new(start_sim(vec!["127.0.0.3".parse().unwrap()]).await);
    let app = TestApp::spawn_against(sim, &default_sources(), |env| {
        env.set("LEADGATE_EGRESS_PROXY", proxy.url());
    })
    .await;
    let response = app
        .post_json("website", &json!({"name": "Via Proxy"}))
        .await;
    assert_eq!(response.status(), 202);
    let leads = app.received(1).await;
    assert_eq!(leads[0].peer_ip.to_string(), "127.0.0.3");
    let targets = proxy.targets.lock().unwrap().clone();
    assert_eq!(targets, [app.sim.addr().to_string()]);
}
