//! Senders that try to hold the gateway's memory or dodge its limits: bodies that trickle in,
//! and addresses written so they would land in a fresh rate-limit bucket.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::app::TestApp;

/// Reads whatever the gateway answers until it closes the connection, or `limit` passes.
async fn read_answer(stream: &mut (impl AsyncReadExt + Unpin), limit: Duration) -> String {
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_body_trickling_in_is_answered_408_at_the_deadline_and_nothing_is_queued() {
    let app = TestApp::spawn_with(&crate::helpers::app::default_sources(), |env| {
        env.set("LEADGATE_BODY_TIMEOUT", "1s");
    })
    .await;
    let addr = app.gateway().addr();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let head = format!(
        "POST /in/website HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Accept: application/json\r\nContent-Length: 2000\r\n\r\nname=Ana+Ruiz&message="
    );
    writer.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();

    // One byte every 100 ms: each arrives well within any per-read timeout, but the whole
    // body never would.
    let trickle = tokio::spawn(async move {
        while started.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if writer.write_all(b"x").await.is_err() {
                break;
            }
        }
    });
    let answer = read_answer(&mut reader, Duration::from_secs(8)).await;
    let elapsed = started.elapsed();
    trickle.abort();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"body_timeout\""), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
        "answered after {elapsed:?}"
    );
    let stats = app.stats().await;
    assert_eq!(stats.ready + stats.leased + stats.delayed, 0, "{stats:?}");
    assert!(app.sim.received().is_empty());

    // The gateway still serves everyone else.
    let ok = app
        .post_json("website", &serde_json::json!({"name": "Ana Ruiz"}))
        .await;
    assert_eq!(ok.status(), 202);
}

#[tokio::test]
async fn a_large_body_over_a_slow_uplink_gets_time_for_its_size_and_is_queued() {
    let app = TestApp::spawn_with(&crate::helpers::app::default_sources(), |env| {
        env.set("LEADGATE_BODY_TIMEOUT", "1s");
    })
    .await;
    let addr = app.gateway().addr();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let mut body = b"name=Ana+Ruiz&message=".to_vec();
    body.resize(60_000, b'x');
    let head = format!(
        "POST /in/website HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Accept: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    writer.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    // About 30 KB/s: the whole body takes 2 s, twice the base deadline, and well within the
    // time its size earns (1 s + 60 KB at 16 KiB/s).
    for piece in body.chunks(7_500) {
        writer.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let answer = read_answer(&mut reader, Duration::from_secs(3)).await;
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    let leads = app.received(1).await;
    assert_eq!(leads[0].payload["FirstName"], "Ana");
}

/// The default sources with the website form limited to 2 requests a minute per client, behind
/// a trusted proxy on loopback.
async fn behind_a_proxy_two_per_minute() -> TestApp {
    let sources = crate::helpers::app::default_sources().replacen(
        "per_ip = \"off\"\ntotal = \"off\"",
        "per_ip = \"2/minute\"\ntotal = \"off\"",
        1,
    );
    TestApp::spawn_with(&sources, |env| {
        env.set("LEADGATE_TRUSTED_PROXIES", "127.0.0.1/32");
    })
    .await
}

async fn status_forwarded_for(app: &TestApp, client: &str) -> u16 {
    app.http
        .post(app.url("/in/website"))
        .header("x-forwarded-for", client)
        .json(&serde_json::json!({"name": "Ana Ruiz"}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn ipv6_clients_share_a_budget_per_64_whatever_address_they_pick() {
    let app = behind_a_proxy_two_per_minute().await;
    assert_eq!(status_forwarded_for(&app, "2001:db8:1:2::1").await, 202);
    assert_eq!(
        status_forwarded_for(&app, "[2001:db8:1:2::ffff]:443").await,
        202
    );
    assert_eq!(
        status_forwarded_for(&app, "2001:db8:1:2:abcd:ef01:2345:6789").await,
        429,
        "a third address in the same /64 is the same client"
    );
    assert_eq!(
        status_forwarded_for(&app, "2001:db8:1:3::1").await,
        202,
        "another /64 is another client"
    );
    app.received(3).await;
}

#[tokio::test]
async fn an_ipv4_client_written_with_a_port_or_as_mapped_ipv6_is_one_client() {
    let app = behind_a_proxy_two_per_minute().await;
    assert_eq!(status_forwarded_for(&app, "198.51.100.9:5555").await, 202);
    assert_eq!(status_forwarded_for(&app, "::ffff:198.51.100.9").await, 202);
    assert_eq!(
        status_forwarded_for(&app, "[::ffff:198.51.100.9]:80").await,
        429
    );
    // The forwarded client was read, not the proxy: another client still has its budget.
    assert_eq!(status_forwarded_for(&app, "198.51.100.10:1").await, 202);
    app.received(3).await;
}

/// JSON nested thousands deep — a few kilobytes, no credentials — is a `400 malformed_body`,
/// and the gateway process is still there afterwards (reading it recursively once overflowed
/// a worker's stack and aborted the process). A Google source reads its body before its key,
/// so it is tried too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_nested_thousands_deep_is_refused_and_the_process_survives() {
    use crate::helpers::app::{GatewayEnv, GatewayProcess, client, default_sources, start_sim};
    let sim = start_sim(Vec::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let sources = format!(
        "{}\n[[source]]\nid = \"ads\"\nkind = \"google\"\ngoogle_key = \"google-key-0123456789\"\n",
        default_sources()
    );
    let env = GatewayEnv::new(dir.path(), &sim, &sources);
    let gateway = GatewayProcess::start(&env, &[]).await;
    let http = client();
    let arrays = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let objects = format!("{}1{}", "{\"a\":".repeat(6_000), "}".repeat(6_000));
    let wrapped = format!("{{\"name\":\"Deep Lead\",\"budget\":{arrays}}}");
    for (path, body) in [
        ("website", &arrays),
        ("website", &objects),
        ("website", &wrapped),
        ("ads", &wrapped),
    ] {
        let response = http
            .post(format!("{}/in/{path}", gateway.base))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("no answer for /in/{path}: {e}\n{}", gateway.log()));
        let status = response.status();
        let answer: serde_json::Value = response.json().await.unwrap();
        assert!(
            status == 400 || (path == "ads" && (status == 401 || status == 403)),
            "/in/{path}: {status} {answer}"
        );
        if status == 400 {
            assert_eq!(answer["error"]["code"], "malformed_body", "{answer}");
        }
    }
    let health = http
        .get(format!("{}/healthz", gateway.base))
        .send()
        .await
        .expect("the process is still serving");
    assert_eq!(health.status(), 200);
    assert!(sim.received().is_empty());
}
