//! Who can reach the proxy: client TLS, the Unix socket, the local password, listen addresses.

use super::support::*;

/// TLS after SSLRequest (libpq, verify-full) and PostgreSQL 17's direct TLS log in; plain
/// text sent after an SSLRequest is not taken for the startup.
#[tokio::test(flavor = "multi_thread")]
async fn clients_may_use_tls() {
    let emulator = Emulator::shared();
    let dir = temp_dir("tls");
    let (server_config, ca_file, roots) = client_tls(&dir);
    let mut config = config(emulator);
    config.client_tls = Some(server_config);
    config.admin = Some("127.0.0.1:0".parse().unwrap());
    let proxy = Running::start(config, auth(emulator)).await;

    // libpq, verifying the proxy's certificate.
    let conninfo = format!(
        "host=localhost port={} dbname=postgres sslmode=verify-full sslrootcert={}",
        proxy.port(),
        ca_file.display()
    );
    let output = psql(
        &[
            &conninfo,
            "-qAt",
            "-c",
            "select current_user",
            "-c",
            "\\conninfo",
        ],
        &[],
        "",
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.starts_with(&format!("{USER}\n")), "{stdout}");
    assert!(stdout.contains("SSL connection"), "{stdout}");

    // psql's session ends as it exits; its connection goes back to the pool for the next.
    pool_until(&proxy, "the connection back in the pool", |p| {
        p["server_idle"] == 1
    })
    .await;
    // Direct TLS: a ClientHello first, with ALPN postgresql.
    let mut client_config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    client_config.alpn_protocols = vec![b"postgresql".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let tcp = TcpStream::connect(proxy.addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = within(
        SHORT,
        "the direct TLS handshake",
        connector.connect(name, tcp),
    )
    .await
    .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    raw_login(&mut tls, &[("database", "postgres")]).await;
    assert_eq!(raw_value(&mut tls, "select current_user").await, USER);
    drop(tls);

    // Inside TLS, another SSLRequest is a protocol violation: the proxy hangs up.
    let tcp = TcpStream::connect(proxy.addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = within(
        SHORT,
        "the direct TLS handshake",
        connector.connect(name, tcp),
    )
    .await
    .unwrap();
    tls.write_all(&ssl_request()).await.unwrap();
    let answer = read_until_closed(&mut tls, SHORT).await;
    assert!(answer.is_empty(), "answered {answer:?}");

    // SSLRequest and a StartupMessage in one write: the startup must not count.
    let mut sneaky = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut bytes = ssl_request().to_vec();
    bytes.extend_from_slice(&startup_message(&[("database", "postgres")]));
    sneaky.write_all(&bytes).await.unwrap();
    let answer = read_until_closed(&mut sneaky, SHORT).await;
    assert_eq!(answer.first(), Some(&b'S'));
    // Nothing after `S` but perhaps a TLS alert record.
    assert!(
        answer.len() == 1 || answer[1] == 0x15,
        "answered {answer:?}"
    );
    // The two TLS clients shared one pooled server connection: one login, and the sneaky
    // startup was no login at all.
    let metrics = proxy.metrics().await;
    assert_eq!(
        sample(&metrics, "pgentra_proxy_upstream_login_seconds_count"),
        1.0
    );
    proxy.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// The Unix socket is `.s.PGSQL.<port>`, mode 0600, declines TLS, serves psql, and goes away
/// when the proxy stops.
#[tokio::test(flavor = "multi_thread")]
async fn unix_socket() {
    use std::os::unix::fs::PermissionsExt as _;
    let emulator = Emulator::shared();
    let dir = temp_dir("unix");
    let mut config = config(emulator);
    config.instances[0].unix_socket_dir = Some(dir.clone());
    config.instances[0].client_roles = ClientRoles::parse("readers");
    // Client TLS is for TCP only.
    config.client_tls = Some(client_tls(&dir).0);
    let proxy = Running::start(config, auth(emulator)).await;
    let port = proxy.port();
    let socket = dir.join(format!(".s.PGSQL.{port}"));
    let mode = std::fs::metadata(&socket)
        .expect("the socket file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let output = psql(
        &[
            "-h",
            dir.to_str().unwrap(),
            "-p",
            &port,
            "-d",
            "postgres",
            "-qAt",
            "-c",
            "select current_user",
        ],
        &[],
        "",
    )
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), format!("{USER}\n"));

    let mut raw = tokio::net::UnixStream::connect(&socket).await.unwrap();
    raw.write_all(&ssl_request()).await.unwrap();
    assert_eq!(raw.read_u8().await.unwrap(), b'N');
    raw_login(&mut raw, &[("database", "postgres"), ("user", "readers")]).await;
    assert_eq!(raw_value(&mut raw, "select current_user").await, "readers");
    drop(raw);

    proxy.stop().await;
    assert!(!socket.exists(), "the socket file is left behind");
    let _ = std::fs::remove_dir_all(dir);
}

/// With a client password, psql must give it.
#[tokio::test(flavor = "multi_thread")]
async fn client_password_is_required() {
    let emulator = Emulator::shared();
    let mut config = config(emulator);
    config.client_password = Some(Secret::new("pw"));
    let proxy = Running::start(config, auth(emulator)).await;
    let port = proxy.port();
    let args = [
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-d",
        "postgres",
        "-w",
        "-qAt",
        "-c",
        "select current_user",
    ];
    let right = psql(&args, &[("PGPASSWORD", "pw")], "").await;
    assert!(
        right.status.success(),
        "{}",
        String::from_utf8_lossy(&right.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&right.stdout), format!("{USER}\n"));
    for wrong in [
        vec![("PGPASSWORD", "pw2")],
        vec![("PGPASSWORD", "p")],
        vec![],
    ] {
        let output = psql(&args, &wrong, "").await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{wrong:?} logged in");
        let expected = if wrong.is_empty() {
            "no password supplied"
        } else {
            "password authentication failed"
        };
        assert!(stderr.contains(expected), "{wrong:?}: {stderr}");
    }
    proxy.stop().await;
}

/// Only loopback addresses, unless remote access is allowed on purpose.
#[tokio::test(flavor = "multi_thread")]
async fn remote_addresses_need_allow_remote() {
    let emulator = Emulator::shared();
    let mut remote = config(emulator);
    remote.instances[0].listen = Some("0.0.0.0:0".parse().unwrap());
    let error = Proxy::bind(remote.clone(), auth(emulator))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ProxyError::Config(m) if m.contains("0.0.0.0")),
        "{error}"
    );
    assert!(error.to_string().contains("allow-remote"), "{error}");

    let mut remote_admin = config(emulator);
    remote_admin.admin = Some("0.0.0.0:0".parse().unwrap());
    let error = Proxy::bind(remote_admin, auth(emulator)).await.unwrap_err();
    assert!(matches!(error, ProxyError::Config(_)), "{error}");

    remote.allow_remote = true;
    let proxy = Proxy::bind(remote, auth(emulator)).await.unwrap();
    assert!(proxy.local_addrs()[0].ip().is_unspecified());
}

/// Sends a startup message and, when asked for the password, `password` (or nothing if
/// `None`); what the proxy answered until it closed, or the stream if it logged in.
async fn password_attempt(addr: SocketAddr, password: Option<&str>) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(&startup_message(&[
            ("user", USER),
            ("database", "postgres"),
        ]))
        .await
        .unwrap();
    let (tag, body) = within(SHORT, "the password request", read_message(&mut stream, 64))
        .await
        .unwrap();
    assert_eq!((tag, &body[..]), (b'R', &[0, 0, 0, 3][..]));
    if let Some(password) = password {
        let mut text = password.as_bytes().to_vec();
        text.push(0);
        stream.write_all(&message(b'p', &text)).await.unwrap();
    }
    stream
}

/// Clients that never give the password hold no session slot: with `max_connections` of
/// them waiting at the password prompt, the right password still logs in.
#[tokio::test(flavor = "multi_thread")]
async fn unauthenticated_clients_do_not_take_the_session_slots() {
    let emulator = Emulator::shared();
    let mut config = config(emulator);
    config.client_password = Some(Secret::new("pw"));
    config.max_connections = 3;
    let proxy = Running::start(config, auth(emulator)).await;
    let mut waiting = Vec::new();
    for _ in 0..3 {
        waiting.push(password_attempt(proxy.addr(), None).await);
    }
    let mut right = password_attempt(proxy.addr(), Some("pw")).await;
    assert_logged_in(&read_until_ready(&mut right).await);
    assert_eq!(raw_value(&mut right, "select current_user").await, USER);
    drop(waiting);
    proxy.stop().await;
}

/// Wrong passwords are answered at a bounded rate however many clients guess at once (it was
/// 2,300 a second), while the right one still logs in.
#[tokio::test(flavor = "multi_thread")]
async fn password_guesses_are_throttled() {
    let emulator = Emulator::shared();
    let mut config = config(emulator);
    config.client_password = Some(Secret::new("the-right-one"));
    let proxy = Running::start(config, auth(emulator)).await;
    let addr = proxy.addr();
    let started = Instant::now();
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut guesses = tokio::task::JoinSet::new();
    for guess in 0..60 {
        let answered = Arc::clone(&answered);
        guesses.spawn(async move {
            let mut stream = password_attempt(addr, Some(&format!("guess-{guess}"))).await;
            let fatal = fatal_in(&read_until_closed(&mut stream, Duration::from_secs(20)).await);
            assert_eq!(fatal.get(b'C'), Some("28P01"));
            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
    }
    tokio::time::sleep_until((started + Duration::from_secs(1)).into()).await;
    let in_a_second = answered.load(std::sync::atomic::Ordering::SeqCst);
    // A burst of 10, then 10 a second.
    assert!(
        in_a_second <= 25,
        "{in_a_second} guesses answered in the first second"
    );
    while let Some(done) = guesses.join_next().await {
        done.unwrap();
    }
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let mut right = password_attempt(addr, Some("the-right-one")).await;
    assert_logged_in(&read_until_ready(&mut right).await);
    proxy.stop().await;
}
