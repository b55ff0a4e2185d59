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
         Accept: application/json\r\nContent-Length: 60000\r\n\r\nname=Ana+Ruiz&message="
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
