//! Every refusal reaches the client as a FATAL with a SQLSTATE: failed logins, bad startups,
//! limits.

use super::support::*;

/// Refusals reach the client as ErrorResponses: the upstream's own message with a hint, and
/// the proxy's for a failing credential or an unreachable server.
#[tokio::test(flavor = "multi_thread")]
async fn login_failures_are_error_responses() {
    let emulator = Emulator::shared();
    let mut config = config(emulator);
    config.admin = Some("127.0.0.1:0".parse().unwrap());
    config.instances[0].user = Some("nobody@contoso.com".into());
    let proxy = Running::start(config, auth(emulator)).await;
    let error = connect(proxy.addr(), USER, |_| {}).await.unwrap_err();
    let db = db_error(&error);
    assert_eq!(db.code(), &SqlState::INVALID_PASSWORD);
    assert!(
        db.message()
            .contains("password authentication failed for user \"nobody@contoso.com\""),
        "{db:?}"
    );
    let hint = db.hint().expect("a hint");
    assert!(
        hint.contains("pgentra") && hint.contains("nobody@contoso.com"),
        "{hint}"
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "pgentra_proxy_connections_refused_total{reason=\"upstream_login\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&metrics, "pgentra_proxy_upstream_login_failures_total"),
        1.0
    );

    // No credential: `az` is not on the provider's PATH.
    let empty = temp_dir("no-az");
    let failing = EntraAuth::builder()
        .credential_chain(azure_cli(&empty))
        .build()
        .unwrap();
    let no_token = Running::start(self::config(emulator), failing).await;
    let error = connect(no_token.addr(), USER, |_| {}).await.unwrap_err();
    let db = db_error(&error);
    assert_eq!(
        db.code(),
        &SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION
    );
    assert!(
        db.message().contains("could not get an Entra ID token")
            && db.message().contains("AzureCliCredential"),
        "{db:?}"
    );
    assert!(db.hint().is_some_and(|h| h.contains("pgentra")));
    no_token.stop().await;
    let _ = std::fs::remove_dir_all(empty);

    // Nothing listening upstream.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut unreachable = self::config(emulator);
    unreachable.instances[0].upstream.port = Some(port);
    let unreachable = Running::start(unreachable, auth(emulator)).await;
    let error = connect(unreachable.addr(), USER, |_| {}).await.unwrap_err();
    let db = db_error(&error);
    assert_eq!(
        db.code(),
        &SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION
    );
    assert!(
        db.message().contains(&format!("localhost:{port}")),
        "{db:?}"
    );
    unreachable.stop().await;

    // A server whose certificate the proxy does not trust gets no token.
    let dir = temp_dir("other-ca");
    let (_, other_ca, _) = client_tls(&dir);
    let mut untrusted = self::config(emulator);
    untrusted.instances[0].upstream.sslrootcert = Some(other_ca);
    let untrusted = Running::start(untrusted, auth(emulator)).await;
    let error = connect(untrusted.addr(), USER, |_| {}).await.unwrap_err();
    let db = db_error(&error);
    assert_eq!(
        db.code(),
        &SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION
    );
    assert!(db.message().contains("certificate"), "{db:?}");
    untrusted.stop().await;
    let _ = std::fs::remove_dir_all(dir);
    proxy.stop().await;
}

/// Clients that stall, oversize or garble their startup get a FATAL and are closed; others
/// log in meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn bad_startups_are_dropped_without_harm() {
    let emulator = Emulator::shared();
    let mut config = config(emulator);
    config.login_timeout = Duration::from_secs(1);
    config.admin = Some("127.0.0.1:0".parse().unwrap());
    let proxy = Running::start(config, auth(emulator)).await;

    // Connects and says nothing: refused at the login timeout, as PostgreSQL's
    // authentication_timeout.
    let mut silent = TcpStream::connect(proxy.addr()).await.unwrap();
    let opened = Instant::now();
    let client = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    assert_eq!(current_user(&client).await, USER);
    let said = read_until_closed(&mut silent, SHORT).await;
    assert_eq!(fatal_in(&said).get(b'C'), Some("57014"));
    assert!(
        opened.elapsed() >= Duration::from_millis(900),
        "closed after {:?}",
        opened.elapsed()
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "pgentra_proxy_connections_refused_total{reason=\"login_timeout\"}"
        ),
        1.0
    );

    // Announces 20,000 bytes, more than PostgreSQL's 10,000.
    let mut oversized = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut packet = 20_000i32.to_be_bytes().to_vec();
    packet.extend_from_slice(&196_608i32.to_be_bytes());
    packet.extend_from_slice(b"user\0alice\0");
    let sent = Instant::now();
    oversized.write_all(&packet).await.unwrap();
    let said = read_until_closed(&mut oversized, SHORT).await;
    let fatal = fatal_in(&said);
    assert_eq!(fatal.get(b'C'), Some("08P01"));
    assert!(
        fatal
            .get(b'M')
            .unwrap()
            .contains("invalid length of startup packet"),
        "{fatal:?}"
    );
    // At once, not at the login timeout.
    assert!(sent.elapsed() < Duration::from_millis(900));

    // Parameters without their terminators.
    let mut garbled = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut body = 196_608i32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0alice");
    let mut packet = i32::try_from(body.len() + 4)
        .unwrap()
        .to_be_bytes()
        .to_vec();
    packet.extend_from_slice(&body);
    let sent = Instant::now();
    garbled.write_all(&packet).await.unwrap();
    let said = read_until_closed(&mut garbled, SHORT).await;
    assert_eq!(fatal_in(&said).get(b'C'), Some("08P01"));
    assert!(sent.elapsed() < Duration::from_millis(900));

    // Still serving, the first session included.
    assert_eq!(current_user(&client).await, USER);
    let late = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    assert_eq!(current_user(&late).await, USER);
    drop((client, late));
    proxy.stop().await;
}

/// At `max_connections`, the next client gets SQLSTATE 53300; cancel requests still pass, and
/// a slot is free again once a session ends.
#[tokio::test(flavor = "multi_thread")]
async fn max_connections_refuses_with_53300() {
    let emulator = Emulator::shared();
    let mut config = config(emulator);
    config.max_connections = 1;
    let proxy = Running::start(config, auth(emulator)).await;
    let mut only = TcpStream::connect(proxy.addr()).await.unwrap();
    let key = backend_key(&raw_login(&mut only, &[("database", "postgres")]).await);

    let error = connect(proxy.addr(), USER, |_| {}).await.unwrap_err();
    let db = db_error(&error);
    assert_eq!(db.code(), &SqlState::TOO_MANY_CONNECTIONS);
    assert!(db.message().contains("too many clients"), "{db:?}");

    // A cancel request is not a session.
    start_sleeping(&mut only).await;
    let started = Instant::now();
    send_cancel(proxy.addr(), key.0, &key.1, false).await;
    assert_cancelled(&mut only, started).await;

    // Terminate: the proxy closes the session, and its slot frees up.
    only.write_all(&message(b'X', &[])).await.unwrap();
    assert!(read_until_closed(&mut only, SHORT).await.is_empty());
    let client = within(SHORT, "a free slot", async {
        loop {
            match connect(proxy.addr(), USER, |_| {}).await {
                Ok(client) => return client,
                // The slot is released just after the client's socket closes.
                Err(error) => {
                    assert_eq!(db_error(&error).code(), &SqlState::TOO_MANY_CONNECTIONS);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    })
    .await;
    assert_eq!(current_user(&client).await, USER);
    drop(client);
    proxy.stop().await;
}

/// How a client fares through a proxy whose token endpoint misbehaves.
async fn login_with_token_endpoint(
    emulator: &Emulator,
    auth: EntraAuth,
    login_timeout: Duration,
) -> (Result<String, tokio_postgres::Error>, Duration) {
    let mut config = config(emulator);
    config.login_timeout = login_timeout;
    let proxy = Running::start(config, auth).await;
    let started = Instant::now();
    let result = match connect(proxy.addr(), MANAGED_IDENTITY, |c| {
        c.connect_timeout(Duration::from_secs(30));
    })
    .await
    {
        Ok(client) => Ok(current_user(&client).await),
        Err(error) => Err(error),
    };
    let elapsed = started.elapsed();
    proxy.stop().await;
    (result, elapsed)
}

/// The SQLSTATE and message of a refused login (panics on anything but a server error).
fn refused(result: &Result<String, tokio_postgres::Error>) -> (String, String) {
    let error = result.as_ref().expect_err("the login should fail");
    let db = db_error(error);
    (db.code().code().to_owned(), db.message().to_owned())
}

/// Whatever the token endpoint does, a waiting client gets an answer: FATAL 08001 with the
/// reason, never a bare close — also when the token wait and the login timeout are equal (they
/// raced), or the login timeout is the shorter one.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_token_endpoint_gets_the_client_a_fatal() {
    let emulator = Emulator::shared();
    const LOGIN: Duration = Duration::from_secs(3);

    // Port closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nothing = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let (result, _) = login_with_token_endpoint(emulator, imds_auth(&nothing, LOGIN), LOGIN).await;
    // Whichever comes first, the credential's own failure or the login deadline, it is said.
    let (code, message) = refused(&result);
    assert_eq!(code, "08001", "{message}");
    assert!(message.contains("Entra ID token"), "{message}");

    for status in [500, 429, 503] {
        let endpoint = own_token_endpoint(emulator);
        endpoint.fail_next(u32::MAX, status);
        let auth = imds_auth(&endpoint.imds_authority(), LOGIN);
        let (result, elapsed) = login_with_token_endpoint(emulator, auth, LOGIN).await;
        let (code, message) = refused(&result);
        assert_eq!(code, "08001", "HTTP {status}: {message}");
        assert!(
            message.contains("Entra ID token"),
            "HTTP {status}: {message}"
        );
        assert!(
            elapsed < LOGIN + Duration::from_secs(2),
            "HTTP {status}: {elapsed:?}"
        );
    }

    // Hanging: the token wait equals the login timeout, or is longer than it.
    for token_timeout in [LOGIN, Duration::from_secs(30)] {
        let endpoint = own_token_endpoint(emulator);
        endpoint.set_hang(true);
        let auth = imds_auth(&endpoint.imds_authority(), token_timeout);
        let (result, elapsed) = login_with_token_endpoint(emulator, auth, LOGIN).await;
        let (code, message) = refused(&result);
        assert_eq!(code, "08001", "{message}");
        assert!(message.contains("token"), "{message}");
        assert!(elapsed >= LOGIN - Duration::from_millis(100), "{elapsed:?}");
        assert!(elapsed < LOGIN + Duration::from_secs(2), "{elapsed:?}");
    }

    // Slow but in time.
    let endpoint = own_token_endpoint(emulator);
    endpoint.set_latency(Duration::from_secs(1));
    let auth = imds_auth(&endpoint.imds_authority(), LOGIN);
    let (result, _) = login_with_token_endpoint(emulator, auth, LOGIN).await;
    assert_eq!(
        result.expect("a slow token still logs in"),
        MANAGED_IDENTITY
    );
}

/// After the cached token expired, a token endpoint that answers HTTP 500 costs a client that
/// needs a new server connection a FATAL within a second or two that names the answer (not
/// the provider's timeout, after 20–30 s); a session on a connection logged in before goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_endpoint_failing_after_expiry_fails_new_logins_fast() {
    let emulator = short_lived_emulator().await;
    let endpoint = own_token_endpoint(&emulator);
    let auth = imds_auth(&endpoint.imds_authority(), Duration::from_secs(20));
    let mut config = config(&emulator);
    config.login_timeout = Duration::from_secs(20);
    let proxy = Running::start(config, auth.clone()).await;
    let mut first = logged_in(&proxy).await;
    assert_eq!(raw_value(&mut first, "select 1").await, "1");
    endpoint.fail_next(u32::MAX, 500);
    let expiry = auth.stats().expires_at.expect("a token");
    // The token's time runs out (the server would refuse it a moment later).
    let left = expiry.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(200)).await;
    let mut second = logged_in(&proxy).await;
    let started = Instant::now();
    second
        .write_all(&message(b'Q', b"select 1\0"))
        .await
        .unwrap();
    let answers = read_until_ready(&mut second).await;
    let elapsed = started.elapsed();
    let refused = error_of(&answers).expect("a FATAL");
    assert_eq!(refused.get(b'S'), Some("FATAL"), "{refused:?}");
    assert_eq!(refused.get(b'C'), Some("08001"), "{refused:?}");
    let message = refused.get(b'M').unwrap_or_default();
    assert!(message.contains("500"), "{message}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}: {message}");
    assert_eq!(raw_value(&mut first, "select 2").await, "2");
    drop(first);
    proxy.stop().await;
}

/// psql, the client of the report, shows the proxy's message instead of "server closed the
/// connection unexpectedly", with the default timeouts made short and equal.
#[tokio::test(flavor = "multi_thread")]
async fn psql_sees_why_when_the_token_endpoint_hangs() {
    let emulator = Emulator::shared();
    let endpoint = own_token_endpoint(emulator);
    endpoint.set_hang(true);
    let mut config = config(emulator);
    config.login_timeout = Duration::from_secs(2);
    let auth = imds_auth(&endpoint.imds_authority(), Duration::from_secs(2));
    let proxy = Running::start(config, auth).await;
    let port = proxy.port();
    let output = psql(
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-d",
            "postgres",
            "-c",
            "select 1",
        ],
        &[],
        "",
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    // The provider's timeout and the login deadline are equal: either may speak first.
    assert!(
        stderr.contains("FATAL:  the pgentra proxy") && stderr.contains("Entra ID token"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("closed the connection unexpectedly"),
        "{stderr}"
    );
    proxy.stop().await;
}

/// What PostgreSQL refuses with FATAL, the proxy refuses the same way: protocol versions other
/// than 3.x (0A000), a repeated encryption request, and a startup message that grows past the
/// server's limit when the proxy adds the role and database (54000) — with the server never
/// asked.
#[tokio::test(flavor = "multi_thread")]
async fn protocol_violations_get_a_fatal_with_postgresql_s_sqlstate() {
    let emulator = &own_emulator().await;
    let proxy = Running::start(config(emulator), auth(emulator)).await;
    let logins = emulator.gateway().logins();
    for (major, minor) in [(2, 0), (4, 0), (1, 0)] {
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        let version = (major << 16) | minor;
        stream
            .write_all(&startup_packet(version, &[("user", USER)]))
            .await
            .unwrap();
        let fatal = fatal_in(&read_until_closed(&mut stream, SHORT).await);
        assert_eq!(fatal.get(b'C'), Some("0A000"));
        assert_eq!(
            fatal.get(b'M'),
            Some(&*format!(
                "unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"
            ))
        );
    }
    let mut twice = TcpStream::connect(proxy.addr()).await.unwrap();
    twice.write_all(&ssl_request()).await.unwrap();
    assert_eq!(twice.read_u8().await.unwrap(), b'N');
    twice.write_all(&ssl_request()).await.unwrap();
    assert_eq!(
        fatal_in(&read_until_closed(&mut twice, SHORT).await).get(b'C'),
        Some("08P01")
    );

    // 9,990 bytes as sent: within the limit, until the proxy adds user=alice@contoso.com.
    let filler = "x".repeat(9_990 - 8 - "options".len() - 2 - 1);
    let packet = startup_packet(196_608, &[("options", &filler)]);
    assert!(
        packet.len() <= 10_000 && packet.len() > 9_950,
        "{}",
        packet.len()
    );
    let mut long = TcpStream::connect(proxy.addr()).await.unwrap();
    long.write_all(&packet).await.unwrap();
    let fatal = fatal_in(&read_until_closed(&mut long, SHORT).await);
    assert_eq!(fatal.get(b'C'), Some("54000"), "{fatal:?}");
    assert!(
        fatal
            .get(b'M')
            .unwrap()
            .contains("over PostgreSQL's limit of 10000 bytes"),
        "{fatal:?}"
    );
    assert_eq!(emulator.gateway().logins(), logins, "the server was asked");
    proxy.stop().await;
}

/// The proxy chooses the role: a client's startup parameters cannot change it, whether as a
/// `role` or `session_authorization` parameter or in `options` (`-c`, `--`, any case). Each
/// gets FATAL 42501 before the server is asked; before, a client took a role its token's role
/// was a member of, in every session. Other settings in `options` still pass.
#[tokio::test(flavor = "multi_thread")]
async fn startup_parameters_cannot_change_the_role() {
    let emulator = Emulator::shared();
    let cluster = emulator.cluster().expect("the emulator's own cluster");
    let other = format!("proxy_other_role_{:08x}", fastrand::u32(..));
    cluster
        .psql(&format!(
            "create role {other}; grant {other} to \"{USER}\";"
        ))
        .unwrap();
    let (proxy, _) = pooled(emulator, |_| {}).await;
    let options = [
        format!("-c role={other}"),
        format!("-c search_path=public --ROLE={other}"),
        format!("-ec session_authorization={other}"),
        format!("--session-authorization={other}"),
    ];
    let attempts = options
        .iter()
        .map(|value| ("options", value.as_str()))
        .chain([("role", other.as_str()), ("Session_Authorization", USER)]);
    for (name, value) in attempts {
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        let login = [("database", "postgres"), ("user", USER), (name, value)];
        stream.write_all(&startup_message(&login)).await.unwrap();
        let fatal = fatal_in(&read_until_closed(&mut stream, SHORT).await);
        assert_eq!(fatal.get(b'C'), Some("42501"), "{name}={value}: {fatal:?}");
        assert!(
            fatal.get(b'M').unwrap().contains("would change the role"),
            "{fatal:?}"
        );
    }
    let client = connect(proxy.addr(), USER, |config| {
        config.options("-c search_path=public,pg_temp");
    })
    .await
    .unwrap();
    let row = client
        .query_one(
            "select current_user::text, current_setting('search_path')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        (USER.to_owned(), "public,pg_temp".to_owned())
    );
    drop(client);
    proxy.stop().await;
    cluster.psql(&format!("drop role {other};")).unwrap();
}
