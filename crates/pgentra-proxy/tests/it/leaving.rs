//! Clients that leave however they leave — in the middle of a message, during `COPY FROM
//! STDIN`, in the middle of a query — are noticed at once in both pooled modes: their
//! `--max-connections` slot and their server connection are free within a second, a query
//! they left running is cancelled on the server, and two such clients on a pool of two do not
//! keep a third waiting.

use super::support::*;

/// How a client leaves.
#[derive(Debug, Clone, Copy)]
enum Leaving {
    /// Inside a transaction, in the middle of a query message.
    HalfwayThroughAMessage,
    /// During `COPY FROM STDIN`, in the middle of a `CopyData` message.
    DuringCopy,
    /// While its query runs.
    WhileItsQueryRuns,
}

/// A proxy in `mode` with two server connections, two session slots and a short queue: a
/// client that held either would keep a third out.
async fn small_proxy(emulator: &Emulator, mode: PoolMode) -> Running {
    let (proxy, _) = pooled(emulator, |config| {
        config.pool.mode = mode;
        config.pool.size = 2;
        config.pool.queue_timeout = Duration::from_secs(1);
        config.max_connections = 2;
    })
    .await;
    proxy
}

/// A client that gets as far as `how` says, holding a server connection, and its stream.
async fn client_leaving(proxy: &Running, how: Leaving, table: &str, marker: &str) -> TcpStream {
    let mut stream = logged_in(proxy).await;
    match how {
        Leaving::HalfwayThroughAMessage => {
            raw_query(
                &mut stream,
                &format!("begin; insert into {table} values (1)"),
            )
            .await
            .unwrap();
            // The header of a 1 MB query, and a little of it.
            let mut partial = vec![b'Q'];
            partial.extend_from_slice(&(1_000_000i32).to_be_bytes());
            partial.extend_from_slice(format!("select 1 /* {marker} */").as_bytes());
            stream.write_all(&partial).await.unwrap();
        }
        Leaving::DuringCopy => {
            let mut text = format!("copy {table} from stdin").into_bytes();
            text.push(0);
            stream.write_all(&message(b'Q', &text)).await.unwrap();
            within(SHORT, "CopyInResponse", async {
                loop {
                    let (tag, body) = read_message(&mut stream, 1 << 20).await.unwrap();
                    assert_ne!(tag, b'E', "{:?}", ErrorFields::parse(&body));
                    if tag == b'G' {
                        return;
                    }
                }
            })
            .await;
            stream.write_all(&message(b'd', b"1\n2\n")).await.unwrap();
            // A CopyData that says 100,000 bytes and brings ten.
            let mut partial = vec![b'd'];
            partial.extend_from_slice(&(100_004i32).to_be_bytes());
            partial.extend_from_slice(b"3\n4\n5\n6\n7\n");
            stream.write_all(&partial).await.unwrap();
        }
        Leaving::WhileItsQueryRuns => {
            let sql = format!(
                "do $$ begin raise notice 'sleeping'; perform pg_sleep(60); end $$ /* {marker} */"
            );
            let mut text = sql.into_bytes();
            text.push(0);
            stream.write_all(&message(b'Q', &text)).await.unwrap();
            within(SHORT, "the notice", async {
                loop {
                    let (tag, _) = read_message(&mut stream, 1 << 20).await.unwrap();
                    if tag == b'N' {
                        return;
                    }
                }
            })
            .await;
        }
    }
    stream
}

/// Waits, through `client`, until no other session runs a query with `marker` in it.
async fn until_none_runs(client: &mut TcpStream, marker: &str) {
    let running = format!(
        "select count(*) from pg_stat_activity where state = 'active' \
         and pid <> pg_backend_pid() and strpos(query, '{marker}') > 0"
    );
    within(SHORT, "the queries left behind to stop", async {
        while raw_value(client, &running).await != "0" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Two clients leave `how`, in `mode`: within a second nothing of them is held, a third client
/// gets a server connection (and a session slot) at once, and no query of theirs still runs.
async fn two_leave_and_a_third_is_served(mode: PoolMode, how: Leaving) {
    let emulator = Emulator::shared();
    let proxy = small_proxy(emulator, mode).await;
    let table =
        format!("leaving_{}_{:?}_{}", mode.as_str(), how, std::process::id()).to_lowercase();
    let marker = format!("{table}_marker");
    let mut setup = logged_in(&proxy).await;
    raw_query(&mut setup, &format!("create table {table} (x int)"))
        .await
        .unwrap();
    drop(setup);
    pool_until(&proxy, "the setup client gone", |p| p["clients"] == 0).await;
    let first = client_leaving(&proxy, how, &table, &marker).await;
    let second = client_leaving(&proxy, how, &table, &marker).await;
    let pool = pool_until(&proxy, "both holding", |_| true).await;
    assert_eq!(pool["server_active"], 2, "{mode:?} {how:?}: {pool}");
    let left = Instant::now();
    drop((first, second));
    pool_until(&proxy, "both gone", |p| {
        p["clients"] == 0 && p["server_active"] == 0
    })
    .await;
    let freed = left.elapsed();
    assert!(
        freed < Duration::from_secs(1),
        "{mode:?} {how:?}: freed after {freed:?}"
    );
    // A third client logs in and runs at once; the queries left behind stop.
    let mut third = logged_in(&proxy).await;
    until_none_runs(&mut third, &marker).await;
    // Nothing they sent took effect.
    let rows = raw_value(&mut third, &format!("select count(*) from {table}")).await;
    assert_eq!(rows, "0", "{mode:?} {how:?}");
    raw_query(&mut third, &format!("drop table {table}"))
        .await
        .unwrap();
    drop(third);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_that_leave_mid_message_free_everything_at_once() {
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        two_leave_and_a_third_is_served(mode, Leaving::HalfwayThroughAMessage).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_that_leave_during_copy_free_everything_at_once() {
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        two_leave_and_a_third_is_served(mode, Leaving::DuringCopy).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_that_leave_mid_query_have_it_cancelled() {
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        two_leave_and_a_third_is_served(mode, Leaving::WhileItsQueryRuns).await;
    }
}

/// Without pooling too, a client that leaves while its query runs has it cancelled: the
/// server would notice only when it next wrote to the client.
#[tokio::test(flavor = "multi_thread")]
async fn without_pooling_a_query_left_running_is_cancelled() {
    let emulator = Emulator::shared();
    let (proxy, _) = pooled(emulator, |config| config.pool.mode = PoolMode::None).await;
    let marker = format!("unpooled_{}", std::process::id());
    let stream = client_leaving(&proxy, Leaving::WhileItsQueryRuns, "unused", &marker).await;
    drop(stream);
    let mut other = logged_in(&proxy).await;
    until_none_runs(&mut other, &marker).await;
    drop(other);
    proxy.stop().await;
}

/// A client that sends its last statement and `Terminate` together and closes at once loses
/// no data: its statement runs, as PostgreSQL runs what precedes a `Terminate`, and its
/// connection goes back to the pool.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_says_goodbye_after_its_statement_loses_nothing() {
    let emulator = Emulator::shared();
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        let proxy = small_proxy(emulator, mode).await;
        let table = format!("goodbye_{}_{}", mode.as_str(), std::process::id());
        let mut setup = logged_in(&proxy).await;
        raw_query(&mut setup, &format!("create table {table} (x int)"))
            .await
            .unwrap();
        drop(setup);
        let mut client = logged_in(&proxy).await;
        let mut last = format!("insert into {table} select 1 from pg_sleep(0.2)").into_bytes();
        last.push(0);
        let mut goodbye = message(b'Q', &last).to_vec();
        goodbye.extend_from_slice(&message(b'X', b""));
        client.write_all(&goodbye).await.unwrap();
        drop(client);
        let mut check = logged_in(&proxy).await;
        let rows = format!("select count(*) from {table}");
        within(SHORT, "the last statement to commit", async {
            while raw_value(&mut check, &rows).await != "1" {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        raw_query(&mut check, &format!("drop table {table}"))
            .await
            .unwrap();
        drop(check);
        let pool = pool_until(&proxy, "the counts", |_| true).await;
        assert_eq!(pool["server_closes"]["client_left"], 0, "{mode:?}: {pool}");
        proxy.stop().await;
    }
}
