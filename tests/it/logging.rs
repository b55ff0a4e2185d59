//! What the log says, and does not say, about events that are not the server's fault.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::app::{GatewayEnv, GatewayProcess, default_sources, start_sim};
use crate::helpers::eventually;

/// Sends two requests actix refuses as malformed HTTP, each on its own connection, and checks
/// both were answered 400.
async fn send_malformed_requests(gateway: &GatewayProcess) {
    let addr = gateway.base.trim_start_matches("http://").to_owned();
    for request in [
        "POST /in/website HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    ] {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    }
}

/// The client-fault counter, once it reaches `n`.
async fn client_faults(gateway: &GatewayProcess, n: f64) -> f64 {
    eventually(
        Duration::from_secs(10),
        "the client-fault count",
        || async {
            let count = gateway
                .metrics()
                .await
                .value("leadgate_http_client_faults_total", &[])?;
            (count >= n).then_some(count)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_is_counted_as_the_client_s_fault_and_not_logged_as_an_error() {
    let sim = start_sim(Vec::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &default_sources());
    env.set("RUST_LOG", "debug");
    let gateway = GatewayProcess::start(&env, &[]).await;
    assert_eq!(
        gateway
            .metrics()
            .await
            .value("leadgate_http_client_faults_total", &[]),
        Some(0.0),
        "exported from start-up"
    );
    send_malformed_requests(&gateway).await;
    assert_eq!(client_faults(&gateway, 2.0).await, 2.0);
    let log = gateway.log();
    assert!(
        !log.lines()
            .any(|line| line.contains("ERROR") || line.contains("stream error")),
        "a client's malformed request is not a server error, nor logged at all:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_who_names_actix_http_in_rust_log_sees_its_stream_errors_and_they_are_counted()
{
    let sim = start_sim(Vec::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = GatewayEnv::new(dir.path(), &sim, &default_sources());
    env.set("RUST_LOG", "info,actix_http=error");
    let gateway = GatewayProcess::start(&env, &[]).await;
    send_malformed_requests(&gateway).await;
    assert_eq!(client_faults(&gateway, 2.0).await, 2.0);
    let log = eventually(Duration::from_secs(10), "actix's lines", || async {
        let log = gateway.log();
        (log.matches("stream error").count() >= 2).then_some(log)
    })
    .await;
    assert!(
        log.lines()
            .filter(|line| line.contains("stream error"))
            .all(|line| line.contains("actix_http")),
        "{log}"
    );
}
