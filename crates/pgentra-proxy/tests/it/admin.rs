//! The admin endpoint and shutdown.

use super::support::*;

// ---------------------------------------------------------------------------------------------
// Admin endpoint and shutdown.
// ---------------------------------------------------------------------------------------------

/// `/healthz`, `/readyz`, `/metrics`, and `POST /quitquitquit`, which drains: open sessions go
/// on, late startups get 57P03, and `run` returns when the last session ends.
#[tokio::test(flavor = "multi_thread")]
async fn admin_endpoint_and_drain() {
    let emulator = Emulator::shared();
    let auth = auth(emulator);
    let mut config = config(emulator);
    config.admin = Some("127.0.0.1:0".parse().unwrap());
    config.instances[0].client_roles = ClientRoles::parse("readers");
    let proxy = Running::start(config, auth.clone()).await;
    let admin = proxy.admin.unwrap();

    assert_eq!(http(admin, "GET", "/healthz").await, (200, "ok\n".into()));
    assert_eq!(auth.stats().tokens_fetched, 0);
    assert_eq!(http(admin, "GET", "/readyz").await, (200, "ready\n".into()));
    assert_eq!(auth.stats().tokens_fetched, 1, "readiness fetches a token");
    assert_eq!(http(admin, "GET", "/nope").await.0, 404);

    let first = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    let second = connect(proxy.addr(), "readers", |_| {}).await.unwrap();
    assert_eq!(current_user(&second).await, "readers");
    drop(second);
    let metrics = proxy.metrics().await;
    assert_eq!(sample(&metrics, "pgentra_proxy_connections_total"), 2.0);
    assert_eq!(
        sample(&metrics, "pgentra_proxy_upstream_login_seconds_count"),
        2.0
    );
    assert_eq!(sample(&metrics, "pgentra_proxy_token_refreshes_total"), 1.0);
    assert!(sample(&metrics, "pgentra_proxy_token_expires_in_seconds") > 60.0);

    // A client accepted before the drain, still in its startup phase.
    let mut late = TcpStream::connect(proxy.addr()).await.unwrap();
    late.write_all(&ssl_request()).await.unwrap();
    assert_eq!(late.read_u8().await.unwrap(), b'N');

    assert_eq!(
        http(admin, "POST", "/quitquitquit").await,
        (200, "draining\n".into())
    );
    // The listener closes...
    within(SHORT, "the listener to close", async {
        while TcpStream::connect(proxy.addr()).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // ...open sessions go on...
    assert_eq!(current_user(&first).await, USER);
    // ...and a startup that comes now is refused.
    late.write_all(&startup_message(&[("database", "postgres")]))
        .await
        .unwrap();
    let messages = read_until_ready(&mut late).await;
    let error = error_of(&messages).expect("a refusal");
    assert_eq!(error.get(b'C'), Some("57P03"), "{error:?}");
    drop(late);

    // `run` returns once the last session ends.
    let Running { mut task, stop, .. } = proxy;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!task.is_finished(), "run returned with a session open");
    drop(first);
    within(SHORT, "run to return", &mut task).await.unwrap();
    drop(stop);
}

/// `/readyz` is 503 when the upstream server does not answer.
#[tokio::test(flavor = "multi_thread")]
async fn readyz_needs_the_upstream() {
    let emulator = Emulator::shared();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut config = config(emulator);
    config.instances[0].upstream.port = Some(port);
    config.admin = Some("127.0.0.1:0".parse().unwrap());
    let proxy = Running::start(config, auth(emulator)).await;
    let (status, body) = http(proxy.admin.unwrap(), "GET", "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(&format!("localhost:{port}")), "{body}");
    assert_eq!(http(proxy.admin.unwrap(), "GET", "/healthz").await.0, 200);
    proxy.stop().await;
}

/// A raw HTTP/1.1 request with extra header lines: the status code.
async fn http_with(addr: SocketAddr, request_line: &str, headers: &str) -> u16 {
    within(SHORT, "the admin endpoint", async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request =
            format!("{request_line}\r\n{headers}Connection: close\r\nContent-Length: 0\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response.split_whitespace().nth(1).unwrap().parse().unwrap()
    })
    .await
}

/// `POST /quitquitquit` stops the proxy for a local process, never for a web page: a browser's
/// cross-site POST carries an `Origin` (and a `text/plain` one needs no preflight), and a
/// rebound DNS name arrives as a foreign `Host`.
#[tokio::test(flavor = "multi_thread")]
async fn a_web_page_cannot_stop_the_proxy() {
    let emulator = Emulator::shared();
    let mut config = config(emulator);
    config.admin = Some("127.0.0.1:0".parse().unwrap());
    let proxy = Running::start(config, auth(emulator)).await;
    let admin = proxy.admin.unwrap();
    let host = format!("Host: {admin}\r\n");
    let cross_site = format!("{host}Origin: https://evil.example\r\nContent-Type: text/plain\r\n");
    assert_eq!(
        http_with(admin, "POST /quitquitquit HTTP/1.1", &cross_site).await,
        403
    );
    let rebound = "Host: evil.example:9187\r\n";
    assert_eq!(
        http_with(admin, "POST /quitquitquit HTTP/1.1", rebound).await,
        403
    );
    // Still serving.
    let client = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    assert_eq!(current_user(&client).await, USER);
    drop(client);
    // A local process (curl sends no Origin) may.
    assert_eq!(
        http_with(admin, "POST /quitquitquit HTTP/1.1", &host).await,
        200
    );
    within(SHORT, "the proxy to stop", proxy.task)
        .await
        .unwrap();
}

/// Idle admin connections are bounded in number and time, so they cannot starve the proxy of
/// file descriptors: beyond the cap they get 503 at once, and each is closed after its header
/// timeout, while PostgreSQL clients keep logging in.
#[tokio::test(flavor = "multi_thread")]
async fn idle_admin_connections_are_bounded() {
    let emulator = Emulator::shared();
    let mut config = config(emulator);
    config.admin = Some("127.0.0.1:0".parse().unwrap());
    let proxy = Running::start(config, auth(emulator)).await;
    let admin = proxy.admin.unwrap();
    let mut idle = Vec::new();
    for _ in 0..16 {
        idle.push(TcpStream::connect(admin).await.unwrap());
    }
    // The 17th is told at once.
    let mut over = TcpStream::connect(admin).await.unwrap();
    let answer = String::from_utf8(read_until_closed(&mut over, SHORT).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    let client = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    assert_eq!(current_user(&client).await, USER);
    // Each idle one is closed at its header timeout (5 s), not kept.
    let opened = Instant::now();
    for stream in &mut idle {
        read_until_closed(stream, Duration::from_secs(10)).await;
    }
    assert!(opened.elapsed() < Duration::from_secs(10));
    assert_eq!(http(admin, "GET", "/healthz").await.0, 200);
    drop(client);
    proxy.stop().await;
}

/// `/readyz` needs a TLS handshake with the server, within its own short limit: a server that
/// accepts TCP connections but never answers (blackholed, stopped) is not ready.
#[tokio::test(flavor = "multi_thread")]
async fn readyz_needs_a_server_that_answers() {
    let emulator = Emulator::shared();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut accepted = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            accepted.push(stream);
        }
    });
    let mut config = config(emulator);
    config.instances[0].upstream.port = Some(port);
    config.admin = Some("127.0.0.1:0".parse().unwrap());
    let proxy = Running::start(config, auth(emulator)).await;
    let started = Instant::now();
    let (status, body) = http(proxy.admin.unwrap(), "GET", "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&format!("localhost:{port}")) && body.contains("within"),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    proxy.stop().await;
    held.abort();
}
