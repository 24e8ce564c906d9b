//! Clients through the proxy: psql and tokio-postgres, roles, token refreshes, what travels in
//! the startup phase.

use super::support::*;

/// psql runs queries and `\copy` in both directions through the relay.
#[tokio::test(flavor = "multi_thread")]
async fn psql_queries_and_copies() {
    let emulator = Emulator::shared();
    let proxy = Running::start(config(emulator), auth(emulator)).await;
    let addr = proxy.addr();

    // \copy from stdin: 100,000 rows through the relay.
    let rows: String = (0..100_000).map(|i| format!("row {i}\n")).collect();
    let counted = psql_ok(
        addr,
        &[
            "-c",
            "create temp table t(x text)",
            "-c",
            "\\copy t from stdin",
            "-c",
            "select count(*), count(distinct x) from t",
        ],
        &rows,
    )
    .await;
    assert_eq!(counted, "100000|100000\n");
    // \copy to stdout.
    let copied = psql_ok(
        addr,
        &[
            "-c",
            "\\copy (select g from generate_series(1, 100000) g) to stdout",
        ],
        "",
    )
    .await;
    let expected: String = (1..=100_000).map(|g| format!("{g}\n")).collect();
    assert!(copied == expected, "{} bytes of copy output", copied.len());

    proxy.stop().await;
}

/// The role rule: the pinned role; else the client's user name if it is a role clients may
/// pick; else the token's. By default no name is picked, so a client running as any operating
/// system user (whose name libpq sends when none is given) logs in as the identity.
#[tokio::test(flavor = "multi_thread")]
async fn roles_follow_the_rule() {
    let emulator = Emulator::shared();
    let current = |addr: SocketAddr, user: &'static str| async move {
        current_user(&connect(addr, user, |_| {}).await.unwrap()).await
    };
    let proxy = Running::start(config(emulator), auth(emulator)).await;
    let addr = proxy.addr();
    // psql without -U sends this process's user; an app container's user is just a name.
    assert_eq!(
        psql_ok(addr, &["-c", "select current_user"], "").await,
        format!("{USER}\n")
    );
    for user in ["appuser", "readers", "root", "postgres"] {
        assert_eq!(current(addr, user).await, USER, "{user}");
    }
    // The real psql as another operating-system user, over TCP: the sidecar's case.
    assert_eq!(psql_as_another_os_user(addr).await, USER);
    proxy.stop().await;

    // Listed roles may be picked; other names still get the token's role.
    let mut listed = config(emulator);
    listed.instances[0].client_roles = ClientRoles::parse("readers");
    let listed = Running::start(listed, auth(emulator)).await;
    let addr = listed.addr();
    assert_eq!(
        psql_ok(addr, &["-U", "readers", "-c", "select current_user"], "").await,
        "readers\n"
    );
    assert_eq!(current(addr, "appuser").await, USER);
    assert_eq!(psql_as_another_os_user(addr).await, USER);
    listed.stop().await;

    // Any name, as PgBouncer: the server decides.
    let mut any = config(emulator);
    any.instances[0].client_roles = ClientRoles::Any;
    let any = Running::start(any, auth(emulator)).await;
    assert_eq!(current(any.addr(), "readers").await, "readers");
    let refused = connect(any.addr(), "appuser", |_| {}).await.unwrap_err();
    assert_eq!(db_error(&refused).code(), &SqlState::INVALID_PASSWORD);
    any.stop().await;

    // A pinned role wins over whatever the client sends.
    let mut pinned = config(emulator);
    pinned.instances[0].user = Some("readers".into());
    pinned.instances[0].client_roles = ClientRoles::Any;
    let pinned = Running::start(pinned, auth(emulator)).await;
    for user in ["someone-else", USER] {
        assert_eq!(
            psql_ok(
                pinned.addr(),
                &["-U", user, "-c", "select current_user"],
                ""
            )
            .await,
            "readers\n"
        );
    }
    pinned.stop().await;
}

/// `psql -h 127.0.0.1 -c 'select current_user'` run as an operating-system user other than
/// this process's, with no user configured: as root, the real psql as `postgres` (`runuser`);
/// otherwise psql sending another OS user's name, which is the same on the wire.
async fn psql_as_another_os_user(addr: SocketAddr) -> String {
    let port = addr.port().to_string();
    let args = [
        "-X",
        "-qAt",
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-d",
        "postgres",
        "-c",
        "select current_user",
    ];
    let mut command = if is_root() {
        let mut runuser = tokio::process::Command::new("runuser");
        runuser
            .args(["-u", "postgres", "--", "psql"])
            .env_remove("PGUSER");
        runuser
    } else {
        let mut psql = tokio::process::Command::new("psql");
        psql.env("PGUSER", "appuser");
        psql
    };
    let output = command
        .args(args)
        .env("PGCONNECT_TIMEOUT", "10")
        .kill_on_drop(true)
        .output();
    let output = within(SHORT, "psql as another user", output).await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// Sessions outlive their token; new sessions after the first token expired get a fresh one.
#[tokio::test(flavor = "multi_thread")]
async fn sessions_survive_token_refreshes() {
    // 3-second tokens, checked to the second.
    let emulator = short_lived_emulator().await;
    let auth = auth(&emulator);
    // Each session its own server connection: every new session is a login with the token of
    // that moment.
    let mut config = config(&emulator);
    config.pool.mode = PoolMode::None;
    let proxy = Running::start(config, auth.clone()).await;
    let client = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    let first_expiry = auth.stats().expires_at.expect("a cached token");

    // One session, busy for more than two token lifetimes.
    let started = Instant::now();
    let mut queries = 0;
    while started.elapsed() < Duration::from_secs(7) {
        client.simple_query("select pg_sleep(0.2)").await.unwrap();
        queries += 1;
    }
    assert!(queries > 20);
    assert_eq!(current_user(&client).await, USER);

    // Wait for a token fetched after the first one expired, then open new sessions.
    let mut tokens = auth.subscribe();
    within(SHORT, "a token newer than the first's expiry", async {
        while SystemTime::now() <= first_expiry
            || tokens
                .borrow_and_update()
                .as_ref()
                .is_none_or(|creds| creds.fetched_at() <= first_expiry)
        {
            tokens.changed().await.unwrap();
        }
    })
    .await;
    for _ in 0..3 {
        let late = connect(proxy.addr(), USER, |_| {}).await.unwrap();
        assert_eq!(current_user(&late).await, USER);
    }
    assert_eq!(current_user(&client).await, USER);
    let stats = auth.stats();
    assert!(stats.tokens_fetched >= 2, "{stats:?}");
    assert_eq!(stats.fetch_failures, 0);
    assert_eq!(emulator.gateway().rejected(), 0);
    assert_eq!(emulator.gateway().logins(), 4);
    drop(client);
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Wire-protocol pitfalls, on raw sockets.
// ---------------------------------------------------------------------------------------------

/// SSLRequest and GSSENCRequest are answered `N`, and the startup follows on the same socket.
#[tokio::test(flavor = "multi_thread")]
async fn encryption_requests_are_declined_on_the_same_socket() {
    let emulator = Emulator::shared();
    let mut config = config(emulator);
    config.instances[0].client_roles = ClientRoles::parse("readers");
    let proxy = Running::start(config, auth(emulator)).await;

    let mut ssl = TcpStream::connect(proxy.addr()).await.unwrap();
    ssl.write_all(&ssl_request()).await.unwrap();
    assert_eq!(ssl.read_u8().await.unwrap(), b'N');
    raw_login(&mut ssl, &[("database", "postgres")]).await;
    assert_eq!(raw_value(&mut ssl, "select current_user").await, USER);

    let mut gss = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut gss_request = 8i32.to_be_bytes().to_vec();
    gss_request.extend_from_slice(&GSSENC_REQUEST_CODE.to_be_bytes());
    gss.write_all(&gss_request).await.unwrap();
    assert_eq!(gss.read_u8().await.unwrap(), b'N');
    gss.write_all(&ssl_request()).await.unwrap();
    assert_eq!(gss.read_u8().await.unwrap(), b'N');
    raw_login(&mut gss, &[("database", "postgres"), ("user", "readers")]).await;
    assert_eq!(raw_value(&mut gss, "select current_user").await, "readers");
    drop((ssl, gss));
    proxy.stop().await;
}

/// A 3.2 client with `_pq_.` options gets NegotiateProtocolVersion for 3.0 first, then logs in
/// with a 4-byte key.
#[tokio::test(flavor = "multi_thread")]
async fn protocol_3_2_is_negotiated_down_to_3_0() {
    let emulator = Emulator::shared();
    let proxy = Running::start(config(emulator), auth(emulator)).await;
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let packet = startup_packet(
        PROTOCOL_3_2,
        &[
            ("database", "postgres"),
            ("_pq_.test_option", "on"),
            ("application_name", "three-two"),
        ],
    );
    stream.write_all(&packet).await.unwrap();
    let messages = read_until_ready(&mut stream).await;
    let (tag, body) = &messages[0];
    assert_eq!(*tag, b'v', "{}", tags(&messages));
    let mut expected = 196_608i32.to_be_bytes().to_vec();
    expected.extend_from_slice(&1i32.to_be_bytes());
    expected.extend_from_slice(b"_pq_.test_option\0");
    assert_eq!(&body[..], &expected[..]);
    assert_logged_in(&messages);
    assert_eq!(backend_key(&messages).1.len(), 4);
    assert_eq!(
        raw_value(&mut stream, "select current_setting('application_name')").await,
        "three-two"
    );

    // A plain 3.0 startup gets no NegotiateProtocolVersion.
    let mut plain = TcpStream::connect(proxy.addr()).await.unwrap();
    let messages = raw_login(&mut plain, &[("database", "postgres")]).await;
    assert!(!tags(&messages).contains('v'), "{}", tags(&messages));
    drop((stream, plain));
    proxy.stop().await;
}

/// The server's ParameterStatus messages reach the client; startup parameters reach the
/// server, as values only.
#[tokio::test(flavor = "multi_thread")]
async fn startup_parameters_travel_both_ways_as_values() {
    let emulator = Emulator::shared();
    let proxy = Running::start(config(emulator), auth(emulator)).await;

    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let messages = raw_login(
        &mut stream,
        &[
            ("database", "postgres"),
            ("application_name", "relay-check"),
            ("client_encoding", "LATIN1"),
            ("options", "-c search_path=foo"),
        ],
    )
    .await;
    let reported = parameters(&messages);
    let value = |name: &str| {
        reported
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
            .unwrap_or_else(|| panic!("no {name} in {reported:?}"))
    };
    let server_version = raw_value(&mut stream, "show server_version").await;
    assert_eq!(value("server_version"), server_version);
    assert!(server_version.starts_with("15"), "{server_version}");
    assert_eq!(value("client_encoding"), "LATIN1");
    assert_eq!(value("application_name"), "relay-check");
    for name in [
        "standard_conforming_strings",
        "integer_datetimes",
        "DateStyle",
        "TimeZone",
    ] {
        value(name);
    }
    assert_eq!(raw_value(&mut stream, "show search_path").await, "foo");
    let activity = raw_value(
        &mut stream,
        "select application_name from pg_stat_activity where pid = pg_backend_pid()",
    )
    .await;
    assert_eq!(activity, "relay-check");

    // A value with SQL in it is a value.
    let cluster = emulator.cluster().expect("the emulator's own cluster");
    let table = format!("proxy_canary_{:08x}", fastrand::u32(..));
    cluster
        .psql(&format!(
            "create table {table} (); alter table {table} owner to \"{USER}\";"
        ))
        .unwrap();
    let hostile = format!("x'); drop table {table}; --");
    let client = connect(proxy.addr(), USER, |config| {
        config.application_name(&hostile);
    })
    .await
    .unwrap();
    let seen: String = client
        .query_one("select current_setting('application_name')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, hostile);
    let exists: bool = client
        .query_one("select to_regclass($1) is not null", &[&table])
        .await
        .unwrap()
        .get(0);
    assert!(exists, "the startup parameter was executed");
    drop(client);
    cluster.psql(&format!("drop table {table};")).unwrap();
    drop(stream);
    proxy.stop().await;
}

/// With pool mode `none`, a session is a byte pipe over a server connection of its own: a
/// Terminate ends the backend too.
#[tokio::test(flavor = "multi_thread")]
async fn without_pooling_a_session_ends_its_backend() {
    let emulator = Emulator::shared();
    let mut config = config(emulator);
    config.pool.mode = PoolMode::None;
    let proxy = Running::start(config, auth(emulator)).await;
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    raw_login(&mut stream, &[("database", "postgres")]).await;
    let pid = raw_value(&mut stream, "select pg_backend_pid()").await;
    stream.write_all(&message(b'X', &[])).await.unwrap();
    assert!(read_until_closed(&mut stream, SHORT).await.is_empty());
    let observer = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    within(SHORT, "the backend to exit", async {
        loop {
            let alive: i64 = observer
                .query_one(
                    "select count(*) from pg_stat_activity where pid = $1::text::int",
                    &[&pid],
                )
                .await
                .unwrap()
                .get(0);
            if alive == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    drop(observer);
    proxy.stop().await;
}

/// Startup values in another encoding reach the server as they are, as PostgreSQL accepts them
/// (psql with a Latin-1 `PGAPPNAME` could not connect at all).
#[tokio::test(flavor = "multi_thread")]
async fn startup_values_need_not_be_utf8() {
    use std::os::unix::ffi::OsStrExt as _;
    let emulator = Emulator::shared();
    let proxy = Running::start(config(emulator), auth(emulator)).await;
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut body = 196_608i32.to_be_bytes().to_vec();
    body.extend_from_slice(b"database\0postgres\0application_name\0caf\xe9\0\0");
    let mut packet = i32::try_from(body.len() + 4)
        .unwrap()
        .to_be_bytes()
        .to_vec();
    packet.extend_from_slice(&body);
    stream.write_all(&packet).await.unwrap();
    assert_logged_in(&read_until_ready(&mut stream).await);
    // PostgreSQL replaces non-ASCII bytes of application_name with '?', as for a direct client.
    assert_eq!(
        raw_value(&mut stream, "show application_name").await,
        "caf?"
    );

    let latin1 = std::ffi::OsStr::from_bytes(b"caf\xe9");
    let port = proxy.port();
    let mut command = tokio::process::Command::new("psql");
    command
        .args([
            "-X",
            "-qAt",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-d",
            "postgres",
            "-c",
            "show application_name",
        ])
        .env("PGAPPNAME", latin1)
        .env("PGCONNECT_TIMEOUT", "10")
        .kill_on_drop(true);
    let output = within(SHORT, "psql", command.output()).await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "caf?");
    drop(stream);
    proxy.stop().await;
}
