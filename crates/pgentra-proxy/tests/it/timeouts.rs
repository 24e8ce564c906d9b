//! The timeouts every pooler has, in both pooled modes: the client gets PostgreSQL's SQLSTATE
//! for it, and the next client of the pool gets a clean connection at once. And pool settings
//! resolved per database and per role.

use super::support::*;
use pgentra_proxy::PoolOverrides;

const LIMIT: Duration = Duration::from_secs(1);
const MODES: [PoolMode; 2] = [PoolMode::Session, PoolMode::Transaction];

/// A proxy in `mode` with one server connection, its settings tweaked.
async fn one_connection(
    emulator: &Emulator,
    mode: PoolMode,
    tweak: impl FnOnce(&mut pgentra_proxy::PoolConfig),
) -> Running {
    let (proxy, _) = pooled(emulator, |config| {
        config.pool.mode = mode;
        config.pool.size = 1;
        config.pool.queue_timeout = Duration::from_secs(2);
        tweak(&mut config.pool);
    })
    .await;
    proxy
}

/// Reads until the proxy's `FATAL`, within `limit`; its fields.
async fn fatal_within<S: AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> ErrorFields {
    let received = read_until_closed(stream, limit).await;
    // What came before the FATAL (the answers of the last query) is skipped.
    let mut rest = &received[..];
    while rest.len() >= 5 && rest[0] != b'E' {
        let len = usize::try_from(i32::from_be_bytes(rest[1..5].try_into().unwrap())).unwrap();
        rest = &rest[1 + len..];
    }
    fatal_in(rest)
}

/// The next client of a one-connection pool: it gets the connection at once, and finds it
/// clean: out of any transaction, with nothing of the last client's work.
async fn next_client_is_served_clean(proxy: &Running, table: &str) {
    let started = Instant::now();
    let mut next = logged_in(proxy).await;
    let row = raw_query(
        &mut next,
        &format!(
            "select (select count(*) from {table})::text, (now() = statement_timestamp())::text"
        ),
    )
    .await
    .unwrap();
    assert_eq!(row[0], [Some("0".into()), Some("true".into())]);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    raw_query(&mut next, &format!("drop table {table}"))
        .await
        .unwrap();
}

async fn table_for(proxy: &Running, name: &str) -> String {
    let table = format!("{name}_{}", std::process::id());
    let mut setup = logged_in(proxy).await;
    raw_query(&mut setup, &format!("create table {table} (x int)"))
        .await
        .unwrap();
    table
}

/// A client of `proxy` in a transaction that inserted a row into a table of its own (which the
/// next client finds empty if the transaction was rolled back); the table's name.
async fn in_a_transaction(proxy: &Running, name: &str) -> (String, TcpStream) {
    let table = table_for(proxy, name).await;
    let mut client = logged_in(proxy).await;
    raw_query(
        &mut client,
        &format!("begin; insert into {table} values (1)"),
    )
    .await
    .unwrap();
    (table, client)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_idle_between_transactions_is_disconnected() {
    let emulator = Emulator::shared();
    for mode in MODES {
        let proxy = one_connection(emulator, mode, |p| p.client_idle_timeout = Some(LIMIT)).await;
        let table = table_for(&proxy, &format!("idle_{}", mode.as_str())).await;
        let mut client = logged_in(&proxy).await;
        // A query longer than the timeout is not idleness: the clock starts when it is
        // answered.
        raw_query(&mut client, "select pg_sleep(1.5)")
            .await
            .unwrap();
        assert_eq!(raw_value(&mut client, "select 1").await, "1", "{mode:?}");
        let fatal = fatal_within(&mut client, SHORT).await;
        assert_eq!(fatal.get(b'C'), Some("57P05"), "{mode:?}: {fatal:?}");
        assert_eq!(
            fatal.get(b'M'),
            Some("terminating connection due to idle-session timeout")
        );
        next_client_is_served_clean(&proxy, &table).await;
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_idle_in_a_transaction_is_disconnected_and_rolled_back() {
    let emulator = Emulator::shared();
    for mode in MODES {
        let proxy =
            one_connection(emulator, mode, |p| p.idle_transaction_timeout = Some(LIMIT)).await;
        let (table, mut client) =
            in_a_transaction(&proxy, &format!("idle_txn_{}", mode.as_str())).await;
        let fatal = fatal_within(&mut client, SHORT).await;
        assert_eq!(fatal.get(b'C'), Some("25P03"), "{mode:?}: {fatal:?}");
        next_client_is_served_clean(&proxy, &table).await;
        let pool = pool_until(&proxy, "the counts", |_| true).await;
        assert_eq!(
            pool["server_logins"], 1,
            "{mode:?}: rolled back, not closed: {pool}"
        );
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_past_its_timeout_is_cancelled_and_the_session_goes_on() {
    let emulator = Emulator::shared();
    for mode in MODES {
        let proxy = one_connection(emulator, mode, |p| p.query_timeout = Some(LIMIT)).await;
        let mut client = logged_in(&proxy).await;
        let started = Instant::now();
        let error = raw_query(&mut client, "select pg_sleep(30)")
            .await
            .unwrap_err();
        assert_eq!(error.get(b'C'), Some("57014"), "{mode:?}: {error:?}");
        assert_eq!(
            error.get(b'M'),
            Some("canceling statement due to query timeout")
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        // The session, and its connection, go on.
        assert_eq!(raw_value(&mut client, "select 42").await, "42");
        drop(client);
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_past_its_timeout_ends_the_session() {
    let emulator = Emulator::shared();
    for mode in MODES {
        let proxy = one_connection(emulator, mode, |p| p.transaction_timeout = Some(LIMIT)).await;
        let (table, mut client) =
            in_a_transaction(&proxy, &format!("txn_timeout_{}", mode.as_str())).await;
        // Busy in the transaction, and not idle for long: only its length ends it.
        let mut text = b"select pg_sleep(0.2)".to_vec();
        text.push(0);
        let fatal = within(SHORT, "the FATAL", async {
            loop {
                client.write_all(&message(b'Q', &text)).await.unwrap();
                let answers = read_until_ready(&mut client).await;
                if let Some(error) = error_of(&answers) {
                    return error;
                }
            }
        })
        .await;
        assert_eq!(fatal.get(b'C'), Some("25P04"), "{mode:?}: {fatal:?}");
        assert_eq!(fatal.get(b'S'), Some("FATAL"));
        next_client_is_served_clean(&proxy, &table).await;
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stalls_mid_message_loses_its_connection() {
    let emulator = Emulator::shared();
    for mode in MODES {
        let proxy = one_connection(emulator, mode, |p| p.client_stall_timeout = Some(LIMIT)).await;
        let (table, mut client) =
            in_a_transaction(&proxy, &format!("stall_{}", mode.as_str())).await;
        // The start of a CopyData that never ends (streamed to the server as it comes), in a
        // COPY the server waits in.
        let mut text = format!("copy {table} from stdin").into_bytes();
        text.push(0);
        client.write_all(&message(b'Q', &text)).await.unwrap();
        let mut partial = vec![b'd'];
        partial.extend_from_slice(&(1004i32).to_be_bytes());
        partial.extend_from_slice(b"2\n");
        client.write_all(&partial).await.unwrap();
        let fatal = fatal_within(&mut client, SHORT).await;
        assert_eq!(fatal.get(b'C'), Some("08006"), "{mode:?}: {fatal:?}");
        next_client_is_served_clean(&proxy, &table).await;
        proxy.stop().await;
    }
}

/// A database's settings override the proxy's, and a role's the database's: the pool of each
/// shows its own size and mode, and a database's query timeout applies to its clients.
#[tokio::test(flavor = "multi_thread")]
async fn pool_settings_are_resolved_per_database_and_per_role() {
    let emulator = Emulator::shared();
    let mut database = PoolOverrides::default();
    database.size = Some(3);
    database.mode = Some(PoolMode::Transaction);
    database.query_timeout = Some(Some(LIMIT));
    let mut role = PoolOverrides::default();
    role.size = Some(2);
    let (proxy, _) = pooled(emulator, |config| {
        config.pool.size = 7;
        config.databases.insert("postgres".into(), database);
        config.roles.insert(USER.into(), role);
    })
    .await;
    let mut client = logged_in(&proxy).await;
    let error = raw_query(&mut client, "select pg_sleep(30)")
        .await
        .unwrap_err();
    assert_eq!(
        error.get(b'C'),
        Some("57014"),
        "the database's query timeout: {error:?}"
    );
    let pool = pool_until(&proxy, "the pool", |_| true).await;
    assert_eq!(pool["size"], 2, "the role's size: {pool}");
    assert_eq!(pool["mode"], "transaction", "the database's mode: {pool}");
    drop(client);
    proxy.stop().await;
}
