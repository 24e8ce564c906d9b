//! Session pooling: server connections reused across clients, reset between them, capped,
//! retired, checked, and never carrying one client's session into another's.

use super::support::*;

/// The second client gets the first one's backend: no new upstream login, no token fetch.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_client_reuses_the_server_connection() {
    let emulator = &own_emulator().await;
    let (proxy, auth) = pooled(emulator, |_| {}).await;
    let first = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    let pid = backend_pid(&first).await;
    drop(first);
    pool_until(&proxy, "the connection back in the pool", |p| {
        p["server_idle"] == 1
    })
    .await;
    let (logins, tokens) = (emulator.gateway().logins(), auth.stats().tokens_fetched);
    for _ in 0..3 {
        let next = connect(proxy.addr(), USER, |_| {}).await.unwrap();
        assert_eq!(backend_pid(&next).await, pid);
        assert_eq!(current_user(&next).await, USER);
        drop(next);
        pool_until(&proxy, "the connection back in the pool", |p| {
            p["server_idle"] == 1
        })
        .await;
    }
    assert_eq!(emulator.gateway().logins(), logins, "a new upstream login");
    assert_eq!(auth.stats().tokens_fetched, tokens, "a token fetch");
    let pool = pool_until(&proxy, "the counts", |_| true).await;
    assert_eq!(
        (pool["server_logins"].as_u64(), pool["reuses"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(pool["resets"], 4);
    assert_eq!(
        (pool["role"].as_str(), pool["database"].as_str()),
        (Some(USER), Some("postgres"))
    );
    let metrics = proxy.metrics().await;
    let labels = format!(
        "upstream=\"localhost:{}\",role=\"{USER}\",database=\"postgres\"",
        emulator.gateway().port()
    );
    assert_eq!(
        sample(
            &metrics,
            &format!("pgentra_proxy_pool_reuses_total{{{labels}}}")
        ),
        3.0
    );
    assert_eq!(
        sample(
            &metrics,
            &format!("pgentra_proxy_pool_server_connections{{{labels},state=\"idle\"}}")
        ),
        1.0
    );
    proxy.stop().await;
}

/// As in PgBouncer, a client welcomed from its pool takes a server connection with its first
/// query, not at its login: with a pool of one, a silent client holds nothing, so another runs
/// its queries on the one connection, and the silent one gets it next. A client that leaves
/// without a query costs the pool nothing (no reset, no login).
#[tokio::test(flavor = "multi_thread")]
async fn a_client_takes_its_server_connection_with_its_first_query() {
    let emulator = &own_emulator().await;
    let (proxy, _) = pooled(emulator, |config| {
        config.pool.size = 1;
        config.pool.queue_timeout = Duration::from_secs(2);
    })
    .await;
    // The pool's first client takes a connection at its login: the server checks its values.
    let first = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    let pool = pool_until(&proxy, "the first client", |p| p["clients"] == 1).await;
    assert_eq!(pool["server_active"], 1, "{pool}");
    let pid = backend_pid(&first).await;
    drop(first);
    pool_until(&proxy, "the connection back", |p| p["server_idle"] == 1).await;
    let logins = emulator.gateway().logins();

    let silent = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    let pool = pool_until(&proxy, "the silent client", |p| p["clients"] == 1).await;
    assert_eq!(
        (pool["server_active"].as_u64(), pool["server_idle"].as_u64()),
        (Some(0), Some(1)),
        "{pool}"
    );
    let busy = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    assert_eq!(backend_pid(&busy).await, pid);
    assert_eq!(current_user(&busy).await, USER);
    drop(busy);
    assert_eq!(backend_pid(&silent).await, pid);
    drop(silent);
    let pool = pool_until(&proxy, "the connection back", |p| {
        p["server_idle"] == 1 && p["clients"] == 0
    })
    .await;
    let resets = pool["resets"].clone();
    drop(connect(proxy.addr(), USER, |_| {}).await.unwrap());
    let pool = pool_until(&proxy, "the client gone", |p| p["clients"] == 0).await;
    assert_eq!(pool["resets"], resets, "{pool}");
    assert_eq!(pool["server_logins"], 1, "{pool}");
    assert_eq!(emulator.gateway().logins(), logins);

    // Values no connection of the pool has taken yet are checked at the login, as PostgreSQL
    // checks a startup message's.
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let login = [
        ("user", USER),
        ("database", "postgres"),
        ("TimeZone", "Nowhere/Bogus"),
    ];
    stream.write_all(&startup_message(&login)).await.unwrap();
    let error = error_of(&read_until_ready(&mut stream).await).expect("a refusal");
    assert_eq!(error.get(b'C'), Some("22023"), "{error:?}");
    proxy.stop().await;
}

/// A client welcomed from its pool whose server connection then reports otherwise (one logged
/// in after the role's defaults changed; a server upgraded) hears of it before the answer to
/// its first query, as from a server whose parameters change.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_hears_what_its_connection_reports_unlike_its_welcome() {
    let emulator = Emulator::shared();
    let (proxy, _) = pooled(emulator, |config| {
        config.pool.server_lifetime = Duration::from_secs(1);
    })
    .await;
    let database = format!("welcome_{}", std::process::id());
    let setup = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    setup
        .batch_execute(&format!("create database {database}"))
        .await
        .unwrap();
    let login = [("database", database.as_str()), ("user", USER)];
    let interval_style = |messages: &[(u8, Bytes)]| {
        parameters(messages)
            .into_iter()
            .find_map(|(name, value)| (name == "IntervalStyle").then_some(value))
    };
    let mut first = TcpStream::connect(proxy.addr()).await.unwrap();
    let welcome = raw_login(&mut first, &login).await;
    assert_eq!(interval_style(&welcome).as_deref(), Some("postgres"));
    drop(first);
    // New backends of the role in that database start with another default; the pool's one
    // connection, from before, retires.
    setup
        .batch_execute(&format!(
            "alter role current_user in database {database} set intervalstyle = 'iso_8601'"
        ))
        .await
        .unwrap();
    pool_until(&proxy, "the first connection retired", |p| {
        p["database"] == database.as_str() && p["server_closes"]["lifetime"] == 1
    })
    .await;

    let mut next = TcpStream::connect(proxy.addr()).await.unwrap();
    let welcome = raw_login(&mut next, &login).await;
    assert_eq!(
        interval_style(&welcome).as_deref(),
        Some("postgres"),
        "not welcomed from the pool"
    );
    next.write_all(&message(b'Q', b"show intervalstyle\0"))
        .await
        .unwrap();
    let answers = read_until_ready(&mut next).await;
    let reported = answers.iter().position(|(tag, _)| *tag == b'S');
    let rows = answers.iter().position(|(tag, _)| *tag == b'T');
    assert!(reported < rows && reported.is_some(), "{answers:?}");
    assert_eq!(interval_style(&answers).as_deref(), Some("iso_8601"));
    proxy.stop().await;
}

/// Nothing of one client's session reaches the next on the same backend: temporary tables,
/// `SET`, SQL and protocol-level prepared statements, advisory locks, `LISTEN`, `WITH HOLD`
/// cursors.
#[tokio::test(flavor = "multi_thread")]
async fn one_clients_session_state_is_gone_for_the_next() {
    let emulator = Emulator::shared();
    let (proxy, _) = pooled(emulator, |_| {}).await;
    let mut a = logged_in(&proxy).await;
    let pid = raw_value(&mut a, "select pg_backend_pid()").await;
    raw_query(
        &mut a,
        "create temp table a_only (x int); \
         set work_mem = '7MB'; \
         prepare a_statement as select 1; \
         select pg_advisory_lock(4242); \
         listen a_channel; \
         begin; declare a_cursor cursor with hold for select 1; commit;",
    )
    .await
    .unwrap();
    // A named statement of the extended protocol, left open.
    let mut parse = b"a_parsed\0select 3\0".to_vec();
    parse.extend_from_slice(&0i16.to_be_bytes());
    a.write_all(&[message(b'P', &parse), message(b'S', &[])].concat())
        .await
        .unwrap();
    let answers = read_until_ready(&mut a).await;
    assert_eq!(tags(&answers), "1Z");
    a.write_all(&message(b'X', &[])).await.unwrap();
    read_until_closed(&mut a, SHORT).await;
    pool_until(&proxy, "the connection back in the pool", |p| {
        p["server_idle"] == 1
    })
    .await;

    let mut b = logged_in(&proxy).await;
    assert_eq!(
        raw_value(&mut b, "select pg_backend_pid()").await,
        pid,
        "not the same backend: the test shows nothing"
    );
    let rows = raw_query(
        &mut b,
        "select to_regclass('pg_temp.a_only') is null, \
                current_setting('work_mem') <> '7MB', \
                (select count(*) from pg_prepared_statements), \
                (select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()), \
                (select count(*) from pg_listening_channels()), \
                (select count(*) from pg_cursors)",
    )
    .await
    .unwrap();
    let row: Vec<&str> = rows[0].iter().map(|v| v.as_deref().unwrap()).collect();
    assert_eq!(
        row,
        ["t", "t", "0", "0", "0", "0"],
        "temp table, SET, prepared statements, advisory lock, LISTEN, cursor"
    );
    drop(b);
    proxy.stop().await;
}

/// A client that leaves in the middle of a transaction hands it to no one: its writes are
/// rolled back, its locks released, and the next client starts outside any transaction.
#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_left_open_is_not_handed_on() {
    let emulator = Emulator::shared();
    let (proxy, _) = pooled(emulator, |_| {}).await;
    let table = format!("left_open_{}", std::process::id());
    let setup = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    setup
        .batch_execute(&format!("create table {table} (x int)"))
        .await
        .unwrap();
    let pid = backend_pid(&setup).await;
    drop(setup);
    pool_until(&proxy, "the connection back in the pool", |p| {
        p["server_idle"] == 1
    })
    .await;

    let mut raw = logged_in(&proxy).await;
    assert_eq!(
        raw_value(&mut raw, "select pg_backend_pid()").await,
        pid.to_string()
    );
    raw_query(
        &mut raw,
        &format!("begin; insert into {table} values (1); lock table {table}"),
    )
    .await
    .unwrap();
    // Gone without a word: no Terminate, no COMMIT.
    drop(raw);
    pool_until(&proxy, "the connection back in the pool", |p| {
        p["server_idle"] == 1
    })
    .await;

    let next = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    assert_eq!(backend_pid(&next).await, pid);
    // In a transaction of its own (the simple protocol's implicit one), now() is the statement's
    // time; inside the abandoned one it would be that transaction's start.
    let messages = next
        .simple_query("select now() = statement_timestamp()")
        .await
        .unwrap();
    let own = messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(
        own.as_deref(),
        Some("t"),
        "the next client is inside the old transaction"
    );
    let rows: i64 = next
        .query_one(&format!("select count(*) from {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "the abandoned insert was committed");
    next.batch_execute(&format!("drop table {table}"))
        .await
        .unwrap();
    drop(next);
    proxy.stop().await;
}

/// Startup parameters that differ between clients of one pool are each client's own:
/// `application_name`, `TimeZone`, `DateStyle`, `client_encoding` — in the session and in the
/// `ParameterStatus` messages of the welcome, backslashes included (they were doubled).
#[tokio::test(flavor = "multi_thread")]
async fn each_client_gets_its_own_startup_parameters_on_a_shared_backend() {
    let emulator = Emulator::shared();
    let (proxy, _) = pooled(emulator, |_| {}).await;
    let mut pids = Vec::new();
    for (app, zone, style, encoding) in [
        (r"C:\first\x", "Europe/Paris", "ISO, DMY", "LATIN1"),
        ("second", "America/Chicago", "SQL, MDY", "UTF8"),
        ("third", "UTC", "ISO, MDY", "UTF8"),
    ] {
        let mut raw = TcpStream::connect(proxy.addr()).await.unwrap();
        let messages = raw_login(
            &mut raw,
            &[
                ("database", "postgres"),
                ("application_name", app),
                ("TimeZone", zone),
                ("DateStyle", style),
                ("client_encoding", encoding),
            ],
        )
        .await;
        let reported = parameters(&messages);
        let welcome = |name: &str| {
            reported
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(welcome("application_name").as_deref(), Some(app));
        assert_eq!(welcome("TimeZone").as_deref(), Some(zone));
        assert_eq!(welcome("DateStyle").as_deref(), Some(style));
        assert_eq!(welcome("client_encoding").as_deref(), Some(encoding));
        assert_eq!(raw_value(&mut raw, "show application_name").await, app);
        assert_eq!(raw_value(&mut raw, "show TimeZone").await, zone);
        assert_eq!(raw_value(&mut raw, "show DateStyle").await, style);
        assert_eq!(raw_value(&mut raw, "show client_encoding").await, encoding);
        pids.push(raw_value(&mut raw, "select pg_backend_pid()").await);
        raw.write_all(&message(b'X', &[])).await.unwrap();
        read_until_closed(&mut raw, SHORT).await;
        pool_until(&proxy, "the connection back in the pool", |p| {
            p["server_idle"] == 1
        })
        .await;
    }
    pids.dedup();
    assert_eq!(
        pids.len(),
        1,
        "the clients did not share the backend: {pids:?}"
    );
    // A client that sends none of them gets the server's defaults back.
    let plain = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    let app: String = plain
        .query_one("show application_name", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(app, "");
    drop(plain);
    proxy.stop().await;
}

/// At the pool size, a client waits for a connection to come back, and gets it; past the queue
/// timeout it gets SQLSTATE 53300.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_pool_queues_clients_up_to_the_queue_timeout() {
    let emulator = Emulator::shared();
    let (proxy, _) = pooled(emulator, |config| {
        config.pool.size = 1;
        config.pool.queue_timeout = Duration::from_secs(1);
    })
    .await;
    let holder = holding(proxy.addr(), USER).await.unwrap();
    let pid = backend_pid(&holder).await;

    // Past the queue timeout: refused, with the reason.
    let started = Instant::now();
    let error = holding(proxy.addr(), USER).await.unwrap_err();
    let db = db_error(&error);
    assert_eq!(db.code(), &SqlState::TOO_MANY_CONNECTIONS, "{db:?}");
    assert!(db.message().contains("queue timeout"), "{db:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));

    // Within it: the waiting client gets the holder's connection when the holder leaves.
    let addr = proxy.addr();
    let waiter = tokio::spawn(async move { holding(addr, USER).await });
    pool_until(&proxy, "a client waiting", |p| p["clients_waiting"] == 1).await;
    drop(holder);
    let waiter = within(SHORT, "the waiter", waiter).await.unwrap().unwrap();
    assert_eq!(backend_pid(&waiter).await, pid);
    let pool = pool_until(&proxy, "the counts", |_| true).await;
    assert_eq!(pool["server_logins"], 1);
    assert_eq!(pool["waits"], 2);
    drop(waiter);
    proxy.stop().await;
}

/// The pool size caps each (role, database) pool and the upstream's cap all of them: at the
/// cap, a pool makes room by closing another pool's idle connection.
#[tokio::test(flavor = "multi_thread")]
async fn pool_size_and_the_upstream_cap_hold() {
    let emulator = Emulator::shared();
    let (proxy, _) = pooled(emulator, |config| {
        config.pool.size = 2;
        config.max_server_connections = 3;
        config.pool.queue_timeout = Duration::from_millis(500);
        config.instances[0].client_roles = ClientRoles::parse("readers");
    })
    .await;
    let alice: Vec<_> = connect_all((0..2).map(|_| holding(proxy.addr(), USER))).await;
    // A third for alice's pool: over its size.
    let error = holding(proxy.addr(), USER).await.unwrap_err();
    assert_eq!(db_error(&error).code(), &SqlState::TOO_MANY_CONNECTIONS);
    // The readers' pool has room for one under the upstream's cap of 3, not two.
    let readers = holding(proxy.addr(), "readers").await.unwrap();
    assert_eq!(current_user(&readers).await, "readers");
    let error = holding(proxy.addr(), "readers").await.unwrap_err();
    assert_eq!(db_error(&error).code(), &SqlState::TOO_MANY_CONNECTIONS);
    // Alice's two go back to her pool idle; a second readers' session closes one to fit.
    drop(alice);
    within(SHORT, "alice's connections idle", async {
        loop {
            let (_, body) = http(proxy.admin.unwrap(), "GET", "/pools").await;
            let pools: serde_json::Value = serde_json::from_str(&body).unwrap();
            let idle: u64 = pools["pools"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["server_idle"].as_u64().unwrap())
                .sum();
            if idle == 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let second = holding(proxy.addr(), "readers").await.unwrap();
    assert_eq!(current_user(&second).await, "readers");
    let metrics = proxy.metrics().await;
    assert!(metrics.contains("reason=\"evicted\"} 1"), "{metrics}");
    drop((readers, second));
    proxy.stop().await;
}

/// With an upstream cap of one connection, a client of a second pool (another startup
/// `options`) that waits while the first pool's client holds the connection takes its place as
/// soon as it is idle, in both pooled modes, rather than wait for the queue timeout.
#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_cap_makes_room_across_pools() {
    let emulator = Emulator::shared();
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        let (proxy, _) = pooled(emulator, |config| {
            config.pool.mode = mode;
            config.max_server_connections = 1;
            config.pool.queue_timeout = Duration::from_secs(5);
        })
        .await;
        let mut first = logged_in(&proxy).await;
        raw_query(&mut first, "begin").await.unwrap();
        let addr = proxy.addr();
        let second = tokio::spawn(async move {
            let mut second = TcpStream::connect(addr).await.unwrap();
            let params = [
                ("database", "postgres"),
                ("user", USER),
                ("options", "-c geqo=off"),
            ];
            // The first client of its pool takes a connection at its login: it waits.
            second.write_all(&startup_message(&params)).await.unwrap();
            let messages = read_until_ready(&mut second).await;
            assert_logged_in(&messages);
            let geqo = raw_value(&mut second, "show geqo").await;
            (second, geqo)
        });
        pool_until(&proxy, "the second client waiting", |p| {
            p["clients_waiting"] == 1
        })
        .await;
        // The first client's connection goes idle: its transaction ends (and, in session
        // pooling, the client leaves).
        let released = Instant::now();
        raw_query(&mut first, "commit").await.unwrap();
        if mode == PoolMode::Session {
            drop(first);
        }
        let (second, geqo) = within(SHORT, "the second client", second).await.unwrap();
        assert_eq!(geqo, "off", "{mode:?}");
        let waited = released.elapsed();
        assert!(waited < Duration::from_secs(2), "{mode:?}: {waited:?}");
        let metrics = proxy.metrics().await;
        assert!(
            metrics.contains("reason=\"evicted\"} 1"),
            "{mode:?}: {metrics}"
        );
        drop(second);
        proxy.stop().await;
    }
}

/// A connection past its lifetime is not handed out again, and one idle past the idle timeout
/// is closed; both are counted by reason.
#[tokio::test(flavor = "multi_thread")]
async fn server_lifetime_and_idle_timeout_retire_connections() {
    let emulator = Emulator::shared();
    let (proxy, _) = pooled(emulator, |config| {
        config.pool.server_lifetime = Duration::from_secs(1);
    })
    .await;
    let first = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    let pid = backend_pid(&first).await;
    drop(first);
    let pool = pool_until(&proxy, "the old connection retired", |p| {
        p["server_closes"]["lifetime"] == 1
    })
    .await;
    assert_eq!(pool["server_idle"], 0);
    let next = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    assert_ne!(
        backend_pid(&next).await,
        pid,
        "a connection past its lifetime was reused"
    );
    drop(next);
    proxy.stop().await;

    let (proxy, _) = pooled(emulator, |config| {
        config.pool.idle_timeout = Duration::from_secs(1);
    })
    .await;
    drop(connect(proxy.addr(), USER, |_| {}).await.unwrap());
    let pool = pool_until(&proxy, "the idle connection closed", |p| {
        p["server_closes"]["idle_timeout"] == 1
    })
    .await;
    assert_eq!(pool["server_idle"], 0);
    proxy.stop().await;
}

/// Idle connections whose backend went away (the server restarted) are never handed out: the
/// next clients get fresh ones, not errors.
#[tokio::test(flavor = "multi_thread")]
async fn clients_never_get_a_connection_the_server_closed() {
    let emulator = own_emulator().await;
    let (proxy, _) = pooled(&emulator, |_| {}).await;
    let clients: Vec<_> = connect_all((0..3).map(|_| holding(proxy.addr(), USER))).await;
    drop(clients);
    pool_until(&proxy, "three idle connections", |p| p["server_idle"] == 3).await;
    let gateway = &emulator;
    tokio::task::block_in_place(|| gateway.restart_gateway()).unwrap();
    for _ in 0..3 {
        let client = connect(proxy.addr(), USER, |_| {}).await.unwrap();
        assert_eq!(current_user(&client).await, USER);
    }
    let pool = pool_until(&proxy, "the counts", |_| true).await;
    assert!(
        pool["server_closes"]["broken"].as_u64().unwrap() >= 1,
        "{pool}"
    );
    proxy.stop().await;
}

/// A cancel request through a pooled connection reaches the query of the client that holds it.
#[tokio::test(flavor = "multi_thread")]
async fn cancel_requests_reach_the_pooled_connection() {
    let emulator = Emulator::shared();
    let (proxy, _) = pooled(emulator, |_| {}).await;
    // Warm the pool with a session like the one below, which is then welcomed from the pool
    // and takes the connection with its query: its key is pointed at it then.
    drop(logged_in(&proxy).await);
    pool_until(&proxy, "an idle connection", |p| p["server_idle"] == 1).await;
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let key = backend_key(&raw_login(&mut stream, &LOGIN).await);
    let pool = pool_until(&proxy, "the counts", |_| true).await;
    assert_eq!(pool["server_active"], 0, "{pool}");
    start_sleeping(&mut stream).await;
    let started = Instant::now();
    send_cancel(proxy.addr(), key.0, &key.1, false).await;
    assert_cancelled(&mut stream, started).await;
    assert_eq!(raw_value(&mut stream, "select 1").await, "1");
    drop(stream);
    proxy.stop().await;
}

/// Server connections outlive their token; once it has expired, a new server connection logs
/// in with a new one, and the old ones retire at the first token's expiry.
#[tokio::test(flavor = "multi_thread")]
async fn new_server_connections_after_the_first_token_expired() {
    let emulator = short_lived_emulator().await;
    let (proxy, auth) = pooled(&emulator, |_| {}).await;
    let long = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    let first_expiry = auth.stats().expires_at.expect("a cached token");
    // A session that began with the first token, busy past its expiry.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        long.simple_query("select pg_sleep(0.2)").await.unwrap();
    }
    assert!(SystemTime::now() > first_expiry);
    // A second client needs a second server connection: logged in with a later token.
    let second = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    assert_eq!(current_user(&second).await, USER);
    assert_ne!(backend_pid(&second).await, backend_pid(&long).await);
    assert!(auth.stats().tokens_fetched >= 2);
    assert_eq!(emulator.gateway().rejected(), 0);
    // The first session goes on; its connection is retired when it comes back (its token has
    // expired), not handed to anyone.
    assert_eq!(current_user(&long).await, USER);
    drop(long);
    pool_until(&proxy, "the first connection retired", |p| {
        p["server_closes"]["lifetime"].as_u64() >= Some(1)
    })
    .await;
    drop(second);
    proxy.stop().await;
}

/// With a minimum of idle connections, the pool of the instance's own role and database is
/// filled at start, before any client, and topped up after clients take them.
#[tokio::test(flavor = "multi_thread")]
async fn the_minimum_of_idle_connections_is_opened_ahead() {
    let emulator = Emulator::shared();
    let (proxy, _) = pooled(emulator, |config| {
        config.pool.min_idle = 2;
        config.instances[0].upstream.dbname = Some("postgres".into());
    })
    .await;
    let logins = emulator.gateway().logins();
    let pool = pool_until(&proxy, "two connections opened ahead", |p| {
        p["server_idle"] == 2
    })
    .await;
    assert_eq!(
        (pool["role"].as_str(), pool["database"].as_str()),
        (Some(USER), Some("postgres"))
    );
    let clients = connect_all((0..3).map(|_| holding(proxy.addr(), USER))).await;
    pool_until(&proxy, "topped up to two idle beside three in use", |p| {
        p["server_idle"] == 2 && p["server_active"] == 3
    })
    .await;
    assert!(emulator.gateway().logins() > logins);
    drop(clients);
    proxy.stop().await;
}

/// A client that has left no longer counts under `--max-connections` while its connection is
/// reset (PgBouncer's `max_client_conn` counts clients): the next client logs in at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_left_frees_its_slot_while_its_connection_is_reset() {
    let emulator = Emulator::shared();
    let (proxy, _) = pooled(emulator, |config| {
        config.max_connections = 1;
        config.pool.reset_query = "select pg_sleep(0.5)".into();
    })
    .await;
    let a = holding(proxy.addr(), USER).await.unwrap();
    let pid = backend_pid(&a).await;
    drop(a);
    pool_until(&proxy, "the reset running", |p| {
        p["server_active"] == 0 && p["server_idle"] == 0
    })
    .await;
    let b = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    assert_eq!(backend_pid(&b).await, pid);
    drop(b);
    proxy.stop().await;
}

/// A client that comes while a connection is being reset waits for it rather than logging in
/// another: a reset is one round trip, a login a TLS handshake, a token check and a backend.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_waits_for_a_connection_being_reset() {
    let emulator = &own_emulator().await;
    let (proxy, _) = pooled(emulator, |config| {
        config.pool.reset_query = "select pg_sleep(0.5)".into();
    })
    .await;
    let watcher = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    let a = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    let pid = backend_pid(&a).await;
    drop(a);
    wait_until_running(&watcher, "pg_sleep(0.5)").await;
    let logins = emulator.gateway().logins();
    let b = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    assert_eq!(
        backend_pid(&b).await,
        pid,
        "b logged in a connection of its own"
    );
    assert_eq!(emulator.gateway().logins(), logins);
    drop((watcher, b));
    proxy.stop().await;
}

/// Draining, a session holding a server connection goes on, and one holding none (welcomed
/// from its pool and silent since; in transaction pooling, between transactions) is told to go
/// at once with 57P01, as PostgreSQL's "terminating connection due to administrator command".
#[tokio::test(flavor = "multi_thread")]
async fn draining_tells_clients_without_a_connection_to_go() {
    let emulator = Emulator::shared();
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        let (proxy, _) = pooled(emulator, |config| config.pool.mode = mode).await;
        drop(logged_in(&proxy).await);
        let busy = holding(proxy.addr(), USER).await.unwrap();
        busy.batch_execute("begin").await.unwrap();
        let mut silent = logged_in(&proxy).await;
        assert_eq!(
            http(proxy.admin.unwrap(), "POST", "/quitquitquit").await,
            (200, "draining\n".into())
        );
        let fatal = fatal_in(&read_until_closed(&mut silent, SHORT).await);
        assert_eq!(fatal.get(b'C'), Some("57P01"), "{mode:?}: {fatal:?}");
        assert_eq!(current_user(&busy).await, USER, "{mode:?}");
        drop(busy);
        proxy.stop().await;
    }
}
