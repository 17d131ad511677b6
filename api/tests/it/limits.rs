//! The api's own limits, over real sockets: slow and idle clients are disconnected,
//! connections past the cap are refused, requests past the concurrency limit are shed (the
//! probes are not), and /health/detailed cannot be made to hammer Postgres.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{eventually, metric, NewChat, TestApp};

/// Long enough for any machine; only a server that never closes reaches it.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// Reads until the server closes the connection; fails the test if it never does.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let read = tokio::time::timeout(HANG_GUARD, stream.read_to_end(&mut received)).await;
    match read {
        Ok(_) => String::from_utf8_lossy(&received).into_owned(),
        Err(_) => panic!("the server held the connection open for {HANG_GUARD:?}"),
    }
}

/// Sends one complete request on `stream` and reads its whole response (keep-alive).
async fn request(stream: &mut TcpStream, path: &str) -> String {
    let text = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
    stream.write_all(text.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut chunk = [0_u8; 4096];
    loop {
        let n = tokio::time::timeout(HANG_GUARD, stream.read(&mut chunk))
            .await
            .expect("the server answers")
            .unwrap();
        received.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&received).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())
                        .flatten()
                })
                .unwrap_or(0);
            if body.len() >= length {
                return text;
            }
        }
        if n == 0 {
            return text;
        }
    }
}

#[tokio::test]
async fn a_client_that_sends_half_a_header_or_idles_is_disconnected() {
    let app = TestApp::spawn_with(|args| {
        args.header_read_timeout = Duration::from_secs(1);
        args.idle_timeout = Duration::from_secs(2);
    })
    .await;

    let mut slow = TcpStream::connect(app.address).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nhost: test\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut slow).await;
    assert!(!answer.contains(" 200 "), "{answer}");

    let mut silent = TcpStream::connect(app.address).await.unwrap();
    read_until_closed(&mut silent).await;

    // A kept-alive connection that sends no next request is closed too.
    let mut idle = TcpStream::connect(app.address).await.unwrap();
    let first = request(&mut idle, "/health").await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    read_until_closed(&mut idle).await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_answered_503_and_closed() {
    let mut app = TestApp::spawn_with(|args| {
        args.max_connections = 2;
        args.idle_timeout = Duration::from_secs(600);
    })
    .await;
    // The test client's pooled connections count too: let them go.
    app.http = reqwest::Client::new();

    // Two kept-alive connections, each answered (so each holds its place).
    let mut held = Vec::new();
    while held.len() < 2 {
        let mut stream = TcpStream::connect(app.address).await.unwrap();
        let answer = request(&mut stream, "/health").await;
        if answer.starts_with("HTTP/1.1 200") {
            held.push(stream);
        } else {
            // The old pool's connection has not been let go yet.
            assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut third = TcpStream::connect(app.address).await.unwrap();
    let refused = read_until_closed(&mut third).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("\"overloaded\""), "{refused}");

    // The held ones still work, and a place freed is taken again.
    assert!(request(&mut held[0], "/health")
        .await
        .starts_with("HTTP/1.1 200"));
    drop(held.pop());
    eventually(Duration::from_secs(20), || async {
        let mut stream = TcpStream::connect(app.address).await.unwrap();
        request(&mut stream, "/health")
            .await
            .starts_with("HTTP/1.1 200")
    })
    .await;
}

#[tokio::test]
async fn requests_beyond_the_concurrency_limit_are_refused_but_the_probes_are_not() {
    let app = TestApp::spawn_with(|args| {
        args.max_concurrent_requests = 1;
        // No syncd answers: the refresh below waits this long, holding the one place.
        args.participants_refresh_wait = Duration::from_secs(15);
        args.request_timeout = Duration::from_secs(30);
    })
    .await;
    let id = app.insert_chat(NewChat::default()).await;
    let waiting = {
        let request = app
            .http
            .post(app.url(&format!("/chats/{id}/refresh-participants")))
            .bearer_auth(app.admin());
        tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
    };
    // The refresh is enqueued, so it is in flight and waiting for its outcome.
    eventually(Duration::from_secs(10), || async {
        app.stream_len(shared::keys::REFRESH_STREAM_MANUAL).await == 1
    })
    .await;

    let shed = app.get("/chats/all", Some(&app.admin())).await;
    assert_eq!(shed.status(), 503);
    assert!(shed.headers().contains_key("retry-after"));
    let body: serde_json::Value = shed.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded");
    assert_eq!(app.get("/health", None).await.status(), 200);
    assert_eq!(app.get("/health/ready", None).await.status(), 200);

    assert_eq!(waiting.await.unwrap(), 202);
    assert_eq!(
        app.get("/chats/all", Some(&app.admin())).await.status(),
        200
    );
}

#[tokio::test]
async fn health_detailed_cannot_be_made_to_hammer_postgres() {
    let app = TestApp::spawn_with(|args| {
        args.health_detailed_cache = Duration::from_secs(3600);
    })
    .await;
    let checks = |page: &str| metric(page, "participants_api_health_checks_total");
    let before = checks(&app.metrics().await);
    let concurrent = (0..40).map(|_| app.get("/health/detailed", None));
    for response in futures::future::join_all(concurrent).await {
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["database"]["status"], "up");
    }
    for _ in 0..10 {
        assert_eq!(app.get("/health/detailed", None).await.status(), 200);
    }
    assert_eq!(checks(&app.metrics().await) - before, 1.0);
}

#[tokio::test]
async fn with_an_admin_listener_metrics_and_detailed_health_leave_the_public_one() {
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", testkit::free_port())
        .parse()
        .unwrap();
    let app = TestApp::spawn_with(|args| {
        args.admin_listen_addr = Some(admin);
        // TestApp waits for Redis in use through /metrics on the public listener.
        args.redis.disable_redis = true;
    })
    .await;
    assert_eq!(app.get("/metrics", None).await.status(), 404);
    assert_eq!(app.get("/health/detailed", None).await.status(), 404);
    assert_eq!(app.get("/health", None).await.status(), 200);
    assert_eq!(
        app.get("/chats/all", Some(&app.admin())).await.status(),
        200
    );

    let on_admin = |path: &str| app.http.get(format!("http://{admin}{path}")).send();
    let metrics = on_admin("/metrics").await.unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics
        .text()
        .await
        .unwrap()
        .contains("participants_read_model_chats"));
    assert_eq!(on_admin("/health/detailed").await.unwrap().status(), 200);
    assert_eq!(on_admin("/health").await.unwrap().status(), 200);
    assert_eq!(on_admin("/chats/all").await.unwrap().status(), 404);
}
