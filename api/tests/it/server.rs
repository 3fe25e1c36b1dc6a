//! The HTTP/1.1 server under the routes (`api::server`): the request-head cap, the header-read
//! timeout, and the graceful shutdown (in-flight requests finish, until the drain time is up).

use std::time::Duration;

use testkit::{TestDb, TestRedis, test_settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::helpers::spawn_app_with;

/// Read until the server closes the connection; what it sent, or `None` if it was still open
/// after `wait`.
async fn read_until_closed(tcp: &mut TcpStream, wait: Duration) -> Option<String> {
    let mut got = Vec::new();
    match tokio::time::timeout(wait, tcp.read_to_end(&mut got)).await {
        Ok(_) => Some(String::from_utf8_lossy(&got).into_owned()),
        Err(_) => None,
    }
}

#[tokio::test]
async fn a_request_head_over_the_limit_is_431() {
    let app = spawn_app_with(&[("MAX_HEADER_BYTES", "4096")]).await;
    let get = |pad: usize| {
        app.http
            .get(app.url("/healthz"))
            .header("x-pad", "p".repeat(pad))
            .send()
    };
    assert_eq!(get(2000).await.unwrap().status(), 200);
    assert_eq!(get(8000).await.unwrap().status(), 431);
}

#[tokio::test]
async fn a_client_slow_to_send_its_request_head_is_disconnected() {
    let app = spawn_app_with(&[("HEADER_READ_TIMEOUT_SECS", "1")]).await;
    let mut tcp = TcpStream::connect(&app.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut tcp, Duration::from_secs(10))
            .await
            .is_some(),
        "the connection was closed after the header-read timeout"
    );

    // A whole request on a fresh connection is answered, and the connection is kept alive.
    let mut tcp = TcpStream::connect(&app.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_until_the_drain_time() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = test_settings(&db, &redis, &[("API_SHUTDOWN_TIMEOUT_SECS", "2")]);
    let app = api::Application::build(settings).await.unwrap();
    let addr = app.addr();
    let stop = CancellationToken::new();
    let served = tokio::spawn(app.run_until_stopped(stop.clone()));

    // A request in flight: its body is announced but never finished.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        b"POST /v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"email\":",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();

    // Not cut at once: the in-flight request may still finish ...
    assert!(
        read_until_closed(&mut tcp, Duration::from_millis(800))
            .await
            .is_none(),
        "the in-flight connection stays open during the drain"
    );
    // ... while no new connection is taken.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
    // After the drain time the connection is dropped and the server returns.
    assert!(
        read_until_closed(&mut tcp, Duration::from_secs(10))
            .await
            .is_some(),
        "the connection was dropped after the drain time"
    );
    let result = tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("the server stopped after the drain time")
        .unwrap();
    assert!(result.is_ok());
}
