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
    let started = std::time::Instant::now();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut tcp, Duration::from_secs(10))
            .await
            .is_some(),
        "the connection was closed after the header-read timeout"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "not before the timeout"
    );

    // Whole requests are answered, one after the other on the same connection.
    let mut tcp = TcpStream::connect(&app.addr).await.unwrap();
    for _ in 0..2 {
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let len: usize = header(&head, "content-length").parse().unwrap();
        let mut body = vec![0u8; len];
        tcp.read_exact(&mut body).await.unwrap();
    }
}

/// Read one response head (up to the blank line).
async fn read_head(tcp: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut byte))
            .await
            .expect("a response head within 10 s")
            .unwrap();
        assert_eq!(n, 1, "the connection closed mid-head: {head:?}");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

fn header(head: &str, name: &str) -> String {
    head.lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
        .unwrap_or_default()
}

/// Send a request head announcing `body_len` bytes with `Expect: 100-continue`, and wait for
/// the `100 Continue` that says the handler is reading the body: the request is in flight.
async fn in_flight(addr: std::net::SocketAddr, body_len: usize) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {body_len}\r\nExpect: 100-continue\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let cont = read_head(&mut tcp).await;
    assert!(cont.starts_with("HTTP/1.1 100"), "{cont}");
    tcp
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

    // Two requests in flight when the shutdown starts: one finishes during the drain, the
    // other never sends its body.
    let body = br#"{"email":"nobody@example.com","password":"not-the-password"}"#;
    let mut finishing = in_flight(addr, body.len()).await;
    let mut stalled = in_flight(addr, body.len()).await;
    stop.cancel();

    // No new connection is taken ...
    let refused = async {
        for _ in 0..50 {
            if TcpStream::connect(addr).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    };
    assert!(refused.await, "no longer accepting");
    // ... the in-flight request still gets its answer, and its connection is then closed ...
    finishing.write_all(body).await.unwrap();
    let answer = read_until_closed(&mut finishing, Duration::from_secs(10))
        .await
        .expect("closed after its answer");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    // ... and the stalled one is dropped, without an answer, once the drain time is up.
    let cut = read_until_closed(&mut stalled, Duration::from_secs(10))
        .await
        .expect("dropped after the drain time");
    assert!(cut.is_empty(), "{cut}");
    let result = tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("the server stopped after the drain time")
        .unwrap();
    assert!(result.is_ok());
}
