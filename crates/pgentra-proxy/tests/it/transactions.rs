//! Transaction pooling: many clients on few server connections, prepared statements kept as
//! each client's own, session state pinning its client, cancel requests reaching only the
//! query they were meant for, clients leaving mid-transaction, and tokens expiring under
//! connections that live on.

use super::support::*;
use postgres_protocol::message::frontend;
use std::collections::HashSet;

/// Forty tokio-postgres clients (which prepare every statement under a name) share four server
/// connections: statements, transactions and their rows are each client's own, and no more
/// than four upstream logins happen.
#[tokio::test(flavor = "multi_thread")]
async fn forty_clients_share_four_server_connections_with_prepared_statements() {
    let emulator = Emulator::shared();
    let (proxy, auth) = transactional(emulator, 4).await;
    let table = format!("shared_by_forty_{}", std::process::id());
    let setup = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    setup
        .batch_execute(&format!("create table {table} (client int, n int)"))
        .await
        .unwrap();
    let clients = connect_all((0..40).map(|_| connect(proxy.addr(), USER, |_| {}))).await;
    let pool = pool_until(&proxy, "forty-one clients", |p| p["clients"] == 41).await;
    assert_eq!(pool["mode"], "transaction");
    let tasks: Vec<_> = clients
        .into_iter()
        .zip(0i32..)
        .map(|(client, i)| {
            let table = table.clone();
            tokio::spawn(async move {
                let mut client = client;
                let add = client.prepare("select $1::int + $2::int").await.unwrap();
                let insert = client
                    .prepare(&format!("insert into {table} values ($1, $2)"))
                    .await
                    .unwrap();
                let mut pids = HashSet::new();
                for n in 0..10i32 {
                    let sum: i32 = client.query_one(&add, &[&n, &i]).await.unwrap().get(0);
                    assert_eq!(sum, n + i);
                    let transaction = client.transaction().await.unwrap();
                    transaction.execute(&insert, &[&i, &n]).await.unwrap();
                    let pid: i32 = transaction
                        .query_one("select pg_backend_pid()", &[])
                        .await
                        .unwrap()
                        .get(0);
                    transaction.commit().await.unwrap();
                    pids.insert(pid);
                    // A statement prepared and closed each time (tokio-postgres closes a
                    // statement when it is dropped).
                    let one: i32 = client
                        .query_one(&format!("select {n} + 1"), &[])
                        .await
                        .unwrap()
                        .get(0);
                    assert_eq!(one, n + 1);
                }
                pids
            })
        })
        .collect();
    let mut pids = HashSet::new();
    for task in tasks {
        pids.extend(
            within(Duration::from_secs(60), "a client's work", task)
                .await
                .unwrap(),
        );
    }
    assert!(
        pids.len() <= 4,
        "{} server connections: {pids:?}",
        pids.len()
    );
    let rows: i64 = setup
        .query_one(&format!("select count(*) from {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 400);
    setup
        .batch_execute(&format!("drop table {table}"))
        .await
        .unwrap();
    let pool = pool_until(&proxy, "the counts", |_| true).await;
    assert!(pool["server_logins"].as_u64() <= Some(4), "{pool}");
    assert_eq!(pool["clients_pinned"], 0, "{pool}");
    assert_eq!(auth.stats().tokens_fetched, 1);
    drop(setup);
    proxy.stop().await;
}

// Extended-protocol messages, as a client sends them.

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    frontend::parse(name, sql, std::iter::empty(), &mut buf).unwrap();
    buf.to_vec()
}

/// A `Bind` with no parameters, results in text.
fn bind(portal: &str, statement: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for name in [portal, statement] {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
    }
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    message(b'B', &body).to_vec()
}

fn execute() -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    frontend::execute("", 0, &mut buf).unwrap();
    buf.to_vec()
}

fn close_statement(name: &str) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    frontend::close(b'S', name, &mut buf).unwrap();
    buf.to_vec()
}

fn describe_statement(name: &str) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    frontend::describe(b'S', name, &mut buf).unwrap();
    buf.to_vec()
}

fn sync() -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    frontend::sync(&mut buf);
    buf.to_vec()
}

fn query(sql: &str) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    frontend::query(sql, &mut buf).unwrap();
    buf.to_vec()
}

/// `Bind` of `statement` to the unnamed portal, `Execute` and `Sync`.
fn run(statement: &str) -> Vec<u8> {
    [bind("", statement), execute(), sync()].concat()
}

/// The answers to `batches` batches, each up to its `ReadyForQuery`.
async fn answers<S: AsyncRead + Unpin>(stream: &mut S, batches: usize) -> Vec<Vec<(u8, Bytes)>> {
    within(SHORT, "the answers", async {
        let mut all = Vec::new();
        let mut batch = Vec::new();
        while all.len() < batches {
            let (tag, body) = read_message(stream, 1 << 20).await.unwrap();
            batch.push((tag, body));
            if tag == b'Z' {
                all.push(std::mem::take(&mut batch));
            }
        }
        all
    })
    .await
}

/// The SQLSTATE and message of the error among `messages`.
fn error(messages: &[(u8, Bytes)]) -> (String, String) {
    let fields = error_of(messages).unwrap_or_else(|| panic!("no error in {}", tags(messages)));
    (
        fields.get(b'C').unwrap().to_owned(),
        fields.get(b'M').unwrap().to_owned(),
    )
}

/// The first column of the first row among `messages`.
fn value(messages: &[(u8, Bytes)]) -> String {
    let (_, row) = messages
        .iter()
        .find(|(tag, _)| *tag == b'D')
        .unwrap_or_else(|| panic!("no row in {} {:?}", tags(messages), error_of(messages)));
    data_row(row)[0].clone().unwrap()
}

/// The status of the `ReadyForQuery` that ends `messages`.
fn status(messages: &[(u8, Bytes)]) -> u8 {
    let (tag, body) = messages.last().unwrap();
    assert_eq!(*tag, b'Z');
    body[0]
}

/// Batches pipelined in one write are answered in order, with the client's own statement names
/// in its errors, as from a connection of its own: a duplicate name (42P05), an unknown one
/// (26000), a closed one, and an error inside a transaction block (which fails the block but
/// keeps the statements, as PostgreSQL does).
#[tokio::test(flavor = "multi_thread")]
async fn pipelined_batches_keep_the_clients_statement_names_and_errors() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 2).await;
    let mut client = logged_in(&proxy).await;
    let pipeline = [
        [parse("s1", "select 21 * 2"), run("s1")].concat(),
        [parse("s1", "select 1"), run("s1")].concat(),
        run("nope"),
        [close_statement("s1"), sync()].concat(),
        run("s1"),
        [close_statement("never_was"), sync()].concat(),
    ]
    .concat();
    client.write_all(&pipeline).await.unwrap();
    let all = answers(&mut client, 6).await;
    assert_eq!(tags(&all[0]), "12DCZ");
    assert_eq!(value(&all[0]), "42");
    assert_eq!(
        error(&all[1]),
        (
            "42P05".into(),
            "prepared statement \"s1\" already exists".into()
        )
    );
    assert_eq!(tags(&all[1]), "EZ", "the rest of the batch is skipped");
    assert_eq!(
        error(&all[2]),
        (
            "26000".into(),
            "prepared statement \"nope\" does not exist".into()
        )
    );
    assert_eq!(tags(&all[3]), "3Z");
    assert_eq!(
        error(&all[4]),
        (
            "26000".into(),
            "prepared statement \"s1\" does not exist".into()
        )
    );
    assert_eq!(tags(&all[5]), "3Z");

    // Inside a transaction block: the error fails the block, the statement survives it.
    let block = [
        query("begin"),
        parse("s3", "select 3"),
        sync(),
        parse("s3", "select 4"),
        sync(),
        query("rollback"),
        run("s3"),
    ]
    .concat();
    client.write_all(&block).await.unwrap();
    let all = answers(&mut client, 5).await;
    assert_eq!(status(&all[0]), b'T');
    assert_eq!((tags(&all[1]), status(&all[1])), ("1Z".into(), b'T'));
    assert_eq!(error(&all[2]).0, "42P05");
    assert_eq!(status(&all[2]), b'E', "the block has failed");
    assert_eq!(status(&all[3]), b'I');
    assert_eq!(value(&all[4]), "3");
    drop(client);
    proxy.stop().await;
}

/// A client's statements, named and unnamed, follow it to whichever server connection it gets
/// next, and a `Describe` of one works there too.
#[tokio::test(flavor = "multi_thread")]
async fn statements_follow_the_client_to_another_server_connection() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 2).await;
    let mut a = logged_in(&proxy).await;
    let mut b = logged_in(&proxy).await;
    let pipeline = [
        parse("named", "select pg_backend_pid()"),
        parse("", "select pg_backend_pid() + 0"),
        describe_statement("named"),
        sync(),
    ]
    .concat();
    a.write_all(&pipeline).await.unwrap();
    assert_eq!(tags(&answers(&mut a, 1).await[0]), "11tTZ");
    a.write_all(&run("named")).await.unwrap();
    let first = value(&answers(&mut a, 1).await[0]);
    // `b` holds that connection in a transaction: `a` must get the other one.
    let (_, b_pid) = (
        raw_query(&mut b, "begin").await.unwrap(),
        raw_value(&mut b, "select pg_backend_pid()").await,
    );
    assert_eq!(b_pid, first, "b took the connection a just released");
    a.write_all(&[run("named"), run(""), describe_statement("named"), sync()].concat())
        .await
        .unwrap();
    let all = answers(&mut a, 3).await;
    let (named, unnamed) = (value(&all[0]), value(&all[1]));
    assert_ne!(named, first, "a ran on b's connection");
    assert_eq!(
        unnamed, named,
        "the unnamed statement was prepared there too"
    );
    assert_eq!(tags(&all[2]), "tTZ");
    // The unnamed statement never crosses to another client: b has none.
    raw_query(&mut b, "commit").await.unwrap();
    b.write_all(&run("")).await.unwrap();
    let b_answers = answers(&mut b, 1).await;
    assert_eq!(error(&b_answers[0]).0, "26000", "{}", tags(&b_answers[0]));
    drop((a, b));
    proxy.stop().await;
}

/// Past `max_prepared_statements` on a server connection the least recently used statement is
/// closed there, and prepared again when its client uses it.
#[tokio::test(flavor = "multi_thread")]
async fn the_prepared_statements_of_a_server_connection_are_bounded() {
    let emulator = Emulator::shared();
    let (proxy, _) = pooled(emulator, |config| {
        config.pool.mode = PoolMode::Transaction;
        config.pool.size = 1;
        config.pool.max_prepared_statements = 2;
    })
    .await;
    let mut client = logged_in(&proxy).await;
    for round in 0..2 {
        for n in 0..5 {
            let name = format!("s{n}");
            let sql = format!("select {n}");
            let batch = if round == 0 {
                [parse(&name, &sql), run(&name)].concat()
            } else {
                run(&name)
            };
            client.write_all(&batch).await.unwrap();
            assert_eq!(value(&answers(&mut client, 1).await[0]), n.to_string());
        }
    }
    let prepared = raw_value(&mut client, "select count(*) from pg_prepared_statements").await;
    assert_eq!(prepared, "2");
    drop(client);
    proxy.stop().await;
}

/// Each kind of session state: the statement that leaves it, a query that is true where it is
/// absent, and the pin reason counted. The last four spell their names with escapes (they
/// reached the next client before).
const SESSION_STATE: [(&str, &str, &str); 11] = [
    (
        "set session characteristics as transaction read only",
        "select current_setting('default_transaction_read_only') <> 'on'",
        "set",
    ),
    (
        "listen a_channel",
        "select count(*) = 0 from pg_listening_channels()",
        "listen",
    ),
    (
        "select pg_advisory_lock(4243)",
        "select count(*) = 0 from pg_locks where locktype = 'advisory' and objid = 4243",
        "advisory_lock",
    ),
    (
        "create temp table pinned_table (x int)",
        "select to_regclass('pg_temp.pinned_table') is null",
        "temporary",
    ),
    (
        "begin; declare held cursor with hold for select 1; commit",
        "select count(*) = 0 from pg_cursors",
        "hold_cursor",
    ),
    (
        "prepare sql_level as select 1",
        "select count(*) = 0 from pg_prepared_statements",
        "prepare",
    ),
    (
        "do $$ begin perform set_config('work_mem', '9MB', false); end $$",
        "select current_setting('work_mem') <> '9MB'",
        "set",
    ),
    (
        r#"select U&"\0073et_config"('work_mem', '5MB', false)"#,
        "select current_setting('work_mem') <> '5MB'",
        "other",
    ),
    (
        r#"select U&"\0070g_advisory_lock"(4244)"#,
        "select count(*) = 0 from pg_locks where locktype = 'advisory' and objid = 4244",
        "other",
    ),
    (
        r#"create table U&"pg\005ftemp".unicode_table (x int)"#,
        "select to_regclass('pg_temp.unicode_table') is null",
        "other",
    ),
    (
        r"do $$ begin execute E'\163et work_mem = ''6MB'''; end $$",
        "select current_setting('work_mem') <> '6MB'",
        "other",
    ),
];

/// A client that leaves session state behind keeps its server connection for the rest of its
/// session (it is pinned, and counted); no other client runs a statement on that connection
/// until it is reset; after the reset, the next client finds none of the state.
#[tokio::test(flavor = "multi_thread")]
async fn session_state_pins_its_client_and_never_reaches_another() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 1).await;
    for (n, (leave, absent, reason)) in SESSION_STATE.iter().enumerate() {
        let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
        raw_login(&mut a, &LOGIN).await;
        let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
        raw_login(&mut b, &LOGIN).await;
        let pid = raw_value(&mut a, "select pg_backend_pid()").await;
        raw_query(&mut a, leave).await.unwrap();
        let pool = pool_until(&proxy, "a pinned", |p| p["clients_pinned"] == 1).await;
        let pins = pins_total(&pool);
        assert_eq!(pins, n as u64 + 1, "{leave}: {pool}");
        assert!(pool["pins"][reason].as_u64() >= Some(1), "{leave}: {pool}");
        // b waits: the only connection is a's now, between a's transactions too.
        b.write_all(&query(absent)).await.unwrap();
        pool_until(&proxy, "b waiting", |p| p["clients_waiting"] == 1).await;
        assert_eq!(
            raw_value(
                &mut a,
                &absent
                    .replace("<>", "=")
                    .replace("= 0", "> 0")
                    .replace("is null", "is not null")
            )
            .await,
            "t",
            "{leave}: a lost its own state"
        );
        assert_eq!(raw_value(&mut a, "select pg_backend_pid()").await, pid);
        drop(a);
        let answer = answers(&mut b, 1).await;
        assert_eq!(value(&answer[0]), "t", "{leave}: b found a's state");
        assert_eq!(
            raw_value(&mut b, "select pg_backend_pid()").await,
            pid,
            "a's connection was not reused"
        );
        drop(b);
        pool_until(&proxy, "nobody pinned", |p| {
            p["clients_pinned"] == 0 && p["clients"] == 0
        })
        .await;
    }
    let pool = pool_until(&proxy, "the counts", |_| true).await;
    assert_eq!(
        pool["server_logins"], 1,
        "a pinned connection was closed instead of reset: {pool}"
    );
    proxy.stop().await;
}

/// Tracked parameters do not pin: a client's `SET application_name` (or `TimeZone`) follows it
/// to the next server connection, and stays its own, backslashes included (they were doubled).
#[tokio::test(flavor = "multi_thread")]
async fn a_tracked_set_follows_its_client_without_pinning() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 2).await;
    let mut a = logged_in(&proxy).await;
    let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
    raw_login(
        &mut b,
        &[
            ("database", "postgres"),
            ("user", USER),
            ("application_name", r"C:\b_app\x"),
        ],
    )
    .await;
    let first = raw_value(
        &mut a,
        r"set application_name = 'a\app'; set time zone 'Asia/Tokyo'; select pg_backend_pid()",
    )
    .await;
    // b takes that connection; a gets the other one, set to a's values first.
    raw_query(&mut b, "begin").await.unwrap();
    assert_eq!(raw_value(&mut b, "select pg_backend_pid()").await, first);
    assert_eq!(
        raw_value(&mut b, "show application_name").await,
        r"C:\b_app\x"
    );
    assert_ne!(raw_value(&mut b, "show timezone").await, "Asia/Tokyo");
    let row = raw_query(&mut a, "select pg_backend_pid()::text, current_setting('application_name'), current_setting('TimeZone')").await.unwrap();
    assert_ne!(row[0][0].as_deref(), Some(first.as_str()), "a did not move");
    assert_eq!(
        row[0][1..],
        [Some(r"a\app".to_owned()), Some("Asia/Tokyo".to_owned())]
    );
    raw_query(&mut b, "commit").await.unwrap();
    let pool = pool_until(&proxy, "the counts", |_| true).await;
    assert_eq!(pool["clients_pinned"], 0, "{pool}");
    drop((a, b));
    proxy.stop().await;
}

/// A query that says it has started, then sleeps for two seconds.
const SLEEP_TWO_SECONDS: &str = "do $$ begin raise notice 'started'; perform pg_sleep(2); end $$";

/// A cancel request reaches the server connection running its client's query, never another
/// client's — also when the client's connection has since gone to someone else.
#[tokio::test(flavor = "multi_thread")]
async fn cancel_requests_reach_only_the_query_they_were_meant_for() {
    let emulator = Emulator::shared();
    {
        let (proxy, _) = transactional(emulator, 3).await;
        let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
        let a_key = backend_key(&raw_login(&mut a, &LOGIN).await);
        let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
        let b_key = backend_key(&raw_login(&mut b, &LOGIN).await);
        start_sleeping(&mut a).await;
        // b's query ends by itself, unless a cancel reaches it.
        b.write_all(&query(SLEEP_TWO_SECONDS)).await.unwrap();
        let (tag, _) = within(SHORT, "b's notice", read_message(&mut b, 1 << 20))
            .await
            .unwrap();
        assert_eq!(tag, b'N');
        let started = Instant::now();
        send_cancel(proxy.addr(), a_key.0, &a_key.1, false).await;
        assert_cancelled(&mut a, started).await;
        let rest = read_until_ready(&mut b).await;
        assert_eq!(error_of(&rest), None, "a's cancel reached b's query");
        start_sleeping(&mut b).await;
        send_cancel(proxy.addr(), b_key.0, &b_key.1, false).await;
        assert_cancelled(&mut b, started).await;
        drop((a, b));
        proxy.stop().await;
    }
    // One connection: a's query ends, b's query runs on the same backend, a's cancel must not
    // reach it.
    let (proxy, _) = transactional(emulator, 1).await;
    let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
    let a_key = backend_key(&raw_login(&mut a, &LOGIN).await);
    let mut b = logged_in(&proxy).await;
    let a_pid = raw_value(&mut a, "select pg_backend_pid()").await;
    b.write_all(&query(SLEEP_TWO_SECONDS)).await.unwrap();
    let (tag, _) = within(SHORT, "b's notice", read_message(&mut b, 1 << 20))
        .await
        .unwrap();
    assert_eq!(tag, b'N');
    send_cancel(proxy.addr(), a_key.0, &a_key.1, false).await;
    let rest = read_until_ready(&mut b).await;
    assert_eq!(error_of(&rest), None, "a's cancel reached b's query");
    assert_eq!(raw_value(&mut b, "select pg_backend_pid()").await, a_pid);
    drop((a, b));
    proxy.stop().await;
}

/// A client that leaves in the middle of a transaction leaves nothing behind (its transaction
/// is rolled back, the connection serves the next client); one that leaves in the middle of a
/// query loses its connection, and the next client gets another at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_leaving_mid_transaction_or_mid_query_hands_on_nothing() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 1).await;
    let table = format!("left_mid_{}", std::process::id());
    let mut a = logged_in(&proxy).await;
    raw_query(&mut a, &format!("create table {table} (x int)"))
        .await
        .unwrap();
    let pid = raw_value(&mut a, "select pg_backend_pid()").await;
    raw_query(
        &mut a,
        &format!("begin; insert into {table} values (1); lock table {table}"),
    )
    .await
    .unwrap();
    drop(a);
    let mut b = logged_in(&proxy).await;
    let row = raw_query(&mut b, &format!("select pg_backend_pid()::text, (select count(*) from {table})::text, (now() = statement_timestamp())::text")).await.unwrap();
    assert_eq!(
        row[0],
        [Some(pid.clone()), Some("0".into()), Some("true".into())]
    );
    // Mid-query: b's connection is closed, c gets a new one without waiting for the query.
    start_sleeping(&mut b).await;
    drop(b);
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    let started = Instant::now();
    raw_login(&mut c, &LOGIN).await;
    assert_ne!(raw_value(&mut c, "select pg_backend_pid()").await, pid);
    assert!(started.elapsed() < Duration::from_secs(20));
    raw_query(&mut c, &format!("drop table {table}"))
        .await
        .unwrap();
    let pool = pool_until(&proxy, "the counts", |_| true).await;
    assert_eq!(pool["server_closes"]["client_left"], 1, "{pool}");
    drop(c);
    proxy.stop().await;
}

/// Server connections live on past the token they logged in with: clients keep running
/// transactions, the connections retire at the token's expiry, new ones log in with new
/// tokens, and no transaction fails.
#[tokio::test(flavor = "multi_thread")]
async fn transactions_go_on_while_tokens_expire_under_the_pool() {
    let emulator = short_lived_emulator().await;
    let (proxy, auth) = transactional(&emulator, 2).await;
    let clients = connect_all((0..6).map(|_| connect(proxy.addr(), USER, |_| {}))).await;
    let first_expiry = auth.stats().expires_at.expect("a cached token");
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| {
            tokio::spawn(async move {
                let statement = client.prepare("select current_user::text").await.unwrap();
                let mut done = 0;
                while SystemTime::now() < first_expiry + Duration::from_secs(2) {
                    let user: String = client.query_one(&statement, &[]).await.unwrap().get(0);
                    assert_eq!(user, USER);
                    done += 1;
                }
                done
            })
        })
        .collect();
    for task in tasks {
        assert!(
            within(Duration::from_secs(30), "a client", task)
                .await
                .unwrap()
                > 0
        );
    }
    assert!(auth.stats().tokens_fetched >= 2);
    assert_eq!(emulator.gateway().rejected(), 0);
    let pool = pool_until(&proxy, "a connection retired at its token's expiry", |p| {
        p["server_closes"]["lifetime"].as_u64() >= Some(1)
    })
    .await;
    assert!(pool["server_logins"].as_u64() >= Some(2), "{pool}");
    proxy.stop().await;
}

/// COPY in both directions, by psql (the simple protocol, in a script it pipes) and by
/// tokio-postgres (the extended protocol).
#[tokio::test(flavor = "multi_thread")]
async fn copy_works_both_ways_in_both_protocols() {
    use futures::{SinkExt as _, StreamExt as _};
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 2).await;
    let table = format!("copied_{}", std::process::id());
    let script = format!(
        "create table {table} (x int, t text);\n\\copy {table} from stdin\n1\ta\n2\tb\n\\.\nselect count(*) from {table};\n\\copy {table} to stdout\n"
    );
    let out = psql_ok(proxy.addr(), &[], &script).await;
    assert_eq!(out, "2\n1\ta\n2\tb\n");
    let client = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    let sink = client
        .copy_in::<_, Bytes>(&format!("copy {table} from stdin"))
        .await
        .unwrap();
    futures::pin_mut!(sink);
    for n in 3..1003 {
        sink.send(Bytes::from(format!("{n}\t{}\n", "x".repeat(100))))
            .await
            .unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 1000);
    let stream = client
        .copy_out(&format!(
            "copy (select * from {table} order by x) to stdout"
        ))
        .await
        .unwrap();
    let chunks: Vec<Bytes> = stream.map(Result::unwrap).collect().await;
    let text = String::from_utf8(chunks.concat()).unwrap();
    assert_eq!(text.lines().count(), 1002);
    assert!(text.starts_with("1\ta\n2\tb\n3\tx"));
    client
        .batch_execute(&format!("drop table {table}"))
        .await
        .unwrap();
    drop(client);
    proxy.stop().await;
}

/// pgbench's TPC-B-like transactions with more clients than server connections, in each query
/// mode: `-M prepared` (named statements on every connection), `-M extended` and `-M simple`;
/// every transaction succeeds. (In `-M prepared`, pgbench prepares a client's statements with
/// blocking calls before its first transaction, which stalls every other client of its thread:
/// with more clients per thread than server connections, clients in the middle of a
/// transaction would wait for that thread while it waits for their connections, through any
/// transaction pooler. So each client has a thread of its own here.)
#[tokio::test(flavor = "multi_thread")]
async fn pgbench_runs_in_every_query_mode_on_few_server_connections() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 3).await;
    let port = proxy.port();
    let database = format!("bench_{}", std::process::id());
    // pgbench's tables in a database of their own, so no other test sees them.
    let setup = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    setup
        .batch_execute(&format!("create database {database}"))
        .await
        .unwrap();
    let pgbench = |args: &[&str]| {
        let mut command = tokio::process::Command::new("pgbench");
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .args(["-h", "127.0.0.1", "-p", &port, "-U", USER])
            .args(args)
            .arg(&database)
            .kill_on_drop(true);
        command
    };
    let init = within(
        Duration::from_secs(60),
        "pgbench -i",
        pgbench(&["-i", "-s", "1", "-q"]).output(),
    )
    .await
    .expect("run pgbench (apt-get install postgresql-contrib)");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    for mode in ["prepared", "extended", "simple"] {
        let run = within(
            Duration::from_secs(120),
            "pgbench",
            pgbench(&["-n", "-M", mode, "-c", "12", "-j", "12", "-t", "30"]).output(),
        )
        .await
        .unwrap();
        let out = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success(),
            "-M {mode}: {out}{}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(
            out.contains("number of transactions actually processed: 360/360"),
            "-M {mode}: {out}"
        );
        assert!(
            out.contains("number of failed transactions: 0 "),
            "-M {mode}: {out}"
        );
    }
    let pools = http(proxy.admin.unwrap(), "GET", "/pools").await.1;
    let pools: serde_json::Value = serde_json::from_str(&pools).unwrap();
    let pool = pools["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["database"] == database.as_str())
        .unwrap()
        .clone();
    setup
        .batch_execute(&format!("drop database {database} with (force)"))
        .await
        .unwrap();
    assert!(pool["server_logins"].as_u64() <= Some(3), "{pool}");
    assert_eq!(pool["clients_pinned"], 0, "{pool}");
    drop(setup);
    proxy.stop().await;
}

/// psycopg 3 (pip-installed) with server-side prepared statements from the first execution,
/// transactions, pipelined `executemany` and COPY: twenty clients on three server connections.
#[tokio::test(flavor = "multi_thread")]
async fn psycopg_3_with_prepared_statements_on_few_server_connections() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 3).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/psycopg_client.py");
    let run = tokio::process::Command::new("python3")
        .arg(&script)
        .args([&proxy.port(), USER, "20", "5"])
        .kill_on_drop(true)
        .output();
    let output = within(Duration::from_secs(120), "the psycopg clients", run)
        .await
        .expect("run python3");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        !stderr.contains("No module named 'psycopg'"),
        "psycopg 3 is missing: pip install 'psycopg[binary]'"
    );
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("rows 100\n"), "{stdout}");
    let backends: usize = stdout
        .lines()
        .find_map(|line| line.strip_prefix("backends "))
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3).contains(&backends), "{stdout}");
    let pool = pool_until(&proxy, "the counts", |_| true).await;
    assert!(pool["server_logins"].as_u64() <= Some(3), "{pool}");
    assert_eq!(pool["clients_pinned"], 0, "{pool}");
    proxy.stop().await;
}

fn flush() -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    frontend::flush(&mut buf);
    buf.to_vec()
}

/// Messages up to and including `count` messages (no `ReadyForQuery` is coming: the client
/// flushed, it did not sync).
async fn some_answers<S: AsyncRead + Unpin>(stream: &mut S, count: usize) -> Vec<(u8, Bytes)> {
    within(SHORT, "the answers", async {
        let mut messages = Vec::new();
        while messages.len() < count {
            messages.push(read_message(stream, 1 << 20).await.unwrap());
        }
        messages
    })
    .await
}

/// Extended-query messages ended by `Flush` run in an implicit transaction that only `Sync`
/// ends (node-postgres cursors, asyncpg's prepare): the client keeps its connection until then,
/// and no other client runs inside that transaction.
#[tokio::test(flavor = "multi_thread")]
async fn a_flushed_batch_keeps_its_connection_until_its_sync() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 1).await;
    let mut a = logged_in(&proxy).await;
    let mut b = logged_in(&proxy).await;
    let started = [
        parse("", "select txid_current()::text"),
        bind("", ""),
        execute(),
        flush(),
    ]
    .concat();
    a.write_all(&started).await.unwrap();
    let answers_a = some_answers(&mut a, 4).await;
    assert_eq!(tags(&answers_a), "12DC");
    let xid = data_row(&answers_a[2].1)[0].clone().unwrap();
    // b must wait: the only connection is inside a's transaction.
    b.write_all(&query("select txid_current()::text"))
        .await
        .unwrap();
    pool_until(&proxy, "b waiting", |p| p["clients_waiting"] == 1).await;
    a.write_all(&sync()).await.unwrap();
    assert_eq!(tags(&answers(&mut a, 1).await[0]), "Z");
    let answer = answers(&mut b, 1).await;
    assert_ne!(value(&answer[0]), xid, "b ran inside a's transaction");
    drop((a, b));
    proxy.stop().await;
}

/// After an error skips the rest of a batch, the proxy no longer trusts what it thought the
/// server's unnamed statement was: a client's unnamed statement runs its own text, never the
/// one another client left there.
#[tokio::test(flavor = "multi_thread")]
async fn the_unnamed_statement_stays_its_clients_across_errors() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 1).await;
    let mut a = logged_in(&proxy).await;
    let mut b = logged_in(&proxy).await;
    b.write_all(&[parse("", "select 'b'"), sync()].concat())
        .await
        .unwrap();
    answers(&mut b, 1).await;
    // a's unnamed statement is the server's now.
    a.write_all(&[parse("", "select 'a'"), run("")].concat())
        .await
        .unwrap();
    assert_eq!(value(&answers(&mut a, 1).await[0]), "a");
    // b's batch fails first; the proxy's Parse of b's statement is skipped with the rest.
    b.write_all(&[bind("", "nope"), execute(), run("")].concat())
        .await
        .unwrap();
    assert_eq!(error(&answers(&mut b, 1).await[0]).0, "26000");
    b.write_all(&run("")).await.unwrap();
    assert_eq!(
        value(&answers(&mut b, 1).await[0]),
        "b",
        "b ran a's statement"
    );
    drop((a, b));
    proxy.stop().await;
}

/// A simple-protocol COPY that fails inside a transaction leaves copy-in mode behind: the
/// client's next extended-query batch is answered as usual.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_copy_in_a_transaction_leaves_the_session_usable() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 2).await;
    let mut client = logged_in(&proxy).await;
    let table = format!("copy_fails_{}", std::process::id());
    raw_query(&mut client, &format!("create table {table} (x int)"))
        .await
        .unwrap();
    raw_query(&mut client, "begin").await.unwrap();
    client
        .write_all(&query(&format!("copy {table} from stdin")))
        .await
        .unwrap();
    let (tag, _) = within(SHORT, "CopyInResponse", read_message(&mut client, 1 << 20))
        .await
        .unwrap();
    assert_eq!(tag, b'G');
    client
        .write_all(&message(b'd', b"not a number\n"))
        .await
        .unwrap();
    let failed = read_until_ready(&mut client).await;
    assert_eq!(error(&failed).0, "22P02");
    let rest = read_until_ready(&mut client).await;
    assert_eq!(status(&rest), b'E');
    // No CopyDone (the server drops copy messages now): an extended-query ROLLBACK.
    client
        .write_all(&[parse("", "rollback"), run("")].concat())
        .await
        .unwrap();
    let all = answers(&mut client, 1).await;
    assert_eq!((tags(&all[0]), status(&all[0])), ("12CZ".into(), b'I'));
    raw_query(&mut client, &format!("drop table {table}"))
        .await
        .unwrap();
    drop(client);
    proxy.stop().await;
}

/// A fast-path function call (here `pg_advisory_lock(bigint)`, OID 2880) pins: what a called
/// function does is not known.
#[tokio::test(flavor = "multi_thread")]
async fn a_function_call_pins() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 1).await;
    let mut client = logged_in(&proxy).await;
    let mut call = 2880i32.to_be_bytes().to_vec();
    call.extend_from_slice(&[0, 1, 0, 1]); // one argument format: binary
    call.extend_from_slice(&[0, 1, 0, 0, 0, 8]); // one argument of 8 bytes
    call.extend_from_slice(&4245i64.to_be_bytes());
    call.extend_from_slice(&[0, 0]); // the result in text
    client.write_all(&message(b'F', &call)).await.unwrap();
    let answer = read_until_ready(&mut client).await;
    assert_eq!(tags(&answer), "VZ");
    let pool = pool_until(&proxy, "pinned", |p| p["clients_pinned"] == 1).await;
    assert_eq!(pool["pins"]["other"], 1, "{pool}");
    drop(client);
    proxy.stop().await;
}

/// A server connection's statements stay bounded also when an error makes the server skip
/// the `Close` of an evicted one; the proxy's names for statements are not the client's to use.
#[tokio::test(flavor = "multi_thread")]
async fn evictions_the_server_skipped_are_not_forgotten() {
    let emulator = Emulator::shared();
    let (proxy, _) = pooled(emulator, |config| {
        config.pool.mode = PoolMode::Transaction;
        config.pool.size = 1;
        config.pool.max_prepared_statements = 1;
    })
    .await;
    let mut client = logged_in(&proxy).await;
    client
        .write_all(&[parse("s1", "select 1"), sync()].concat())
        .await
        .unwrap();
    answers(&mut client, 1).await;
    // The error comes first: the eviction of s1 and the Parse of s2 are skipped.
    client
        .write_all(&[bind("", "nope"), execute(), parse("s2", "select 2"), sync()].concat())
        .await
        .unwrap();
    assert_eq!(error(&answers(&mut client, 1).await[0]).0, "26000");
    client
        .write_all(&[parse("s3", "select 3"), run("s3")].concat())
        .await
        .unwrap();
    assert_eq!(value(&answers(&mut client, 1).await[0]), "3");
    let row = raw_query(
        &mut client,
        "select count(*)::text, min(name) from pg_prepared_statements",
    )
    .await
    .unwrap();
    assert_eq!(row[0][0].as_deref(), Some("1"), "{row:?}");
    // The proxy's own name, read from the server: not the client's to run.
    let theirs = row[0][1].clone().unwrap();
    client.write_all(&run(&theirs)).await.unwrap();
    assert_eq!(
        error(&answers(&mut client, 1).await[0]),
        (
            "26000".into(),
            format!("prepared statement \"{theirs}\" does not exist")
        )
    );
    drop(client);
    proxy.stop().await;
}

/// A client that pipelines a large query behind a large result: the proxy reads the result
/// while it writes the query, so neither side waits for the other for ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_message_behind_a_large_result_does_not_deadlock() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 1).await;
    let stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let (mut reader, mut writer) = tokio::io::split(stream);
    writer.write_all(&startup_message(&LOGIN)).await.unwrap();
    read_until_ready(&mut reader).await;
    let literal = "x".repeat(32 << 20);
    let pipeline = [
        query("select repeat('y', 1000) from generate_series(1, 40000)"),
        query(&format!("select length('{literal}')")),
    ]
    .concat();
    let sending = tokio::spawn(async move {
        writer.write_all(&pipeline).await.unwrap();
        writer
    });
    let lengths = within(Duration::from_secs(60), "both answers", async {
        let mut rows = 0;
        let mut last = None;
        let mut ready = 0;
        while ready < 2 {
            let (tag, body) = read_message(&mut reader, 1 << 26).await.unwrap();
            match tag {
                b'D' => {
                    rows += 1;
                    last = data_row(&body)[0].clone();
                }
                b'E' => panic!("{:?}", ErrorFields::parse(&body)),
                b'Z' => ready += 1,
                _ => {}
            }
        }
        (rows, last)
    })
    .await;
    assert_eq!(lengths, (40_001, Some((32 << 20).to_string())));
    drop(sending.await.unwrap());
    proxy.stop().await;
}

/// A client cannot make the proxy keep statements without bound: past the limit it gets a
/// `FATAL` with SQLSTATE 54000.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_with_too_many_statements_is_told_so() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 1).await;
    let mut client = logged_in(&proxy).await;
    let mut pipeline = Vec::new();
    for n in 0..=10_000 {
        pipeline.extend(parse(&format!("s{n}"), "select 1"));
    }
    pipeline.extend(sync());
    client.write_all(&pipeline).await.unwrap();
    let received = read_until_closed(&mut client, SHORT).await;
    let at = received
        .windows(6)
        .position(|w| w == b"SFATAL")
        .expect("a FATAL");
    let fatal = fatal_in(&received[at - 5..]);
    assert_eq!(fatal.get(b'C'), Some("54000"), "{fatal:?}");
    proxy.stop().await;
}

/// A batch ended by `Flush` keeps its connection also when a query answered before it frees
/// the connection's last transaction (the `ReadyForQuery` of the query is not the batch's).
#[tokio::test(flavor = "multi_thread")]
async fn a_flushed_batch_after_a_query_keeps_its_connection() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 1).await;
    let mut a = logged_in(&proxy).await;
    let mut b = logged_in(&proxy).await;
    let pipeline = [
        query("select 1"),
        parse("", "select txid_current()::text"),
        bind("", ""),
        execute(),
        flush(),
    ]
    .concat();
    a.write_all(&pipeline).await.unwrap();
    let answered = some_answers(&mut a, 8).await;
    assert_eq!(tags(&answered), "TDCZ12DC");
    let xid = data_row(&answered[6].1)[0].clone().unwrap();
    b.write_all(&query("select txid_current()::text"))
        .await
        .unwrap();
    pool_until(&proxy, "b waiting", |p| p["clients_waiting"] == 1).await;
    a.write_all(&sync()).await.unwrap();
    answers(&mut a, 1).await;
    assert_ne!(
        value(&answers(&mut b, 1).await[0]),
        xid,
        "b ran inside a's transaction"
    );
    drop((a, b));
    proxy.stop().await;
}

/// A batch translated while the one before it is unanswered does not count on that one's
/// unnamed statement: if the earlier batch fails (and the server skips its Parse), the later
/// one still runs the client's own statement, never the one another client left.
#[tokio::test(flavor = "multi_thread")]
async fn a_later_batch_never_runs_another_clients_unnamed_statement() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 1).await;
    let mut a = logged_in(&proxy).await;
    let mut b = logged_in(&proxy).await;
    b.write_all(&[parse("", "select 'b'"), sync()].concat())
        .await
        .unwrap();
    answers(&mut b, 1).await;
    let pipeline = [
        bind("", "nope"),
        execute(),
        parse("", "select 'a'"),
        sync(),
        run(""),
    ]
    .concat();
    a.write_all(&pipeline).await.unwrap();
    let all = answers(&mut a, 2).await;
    assert_eq!(error(&all[0]).0, "26000");
    // PostgreSQL would say the unnamed statement does not exist (its Parse was skipped); the
    // proxy prepared the client's own text again. Never b's.
    assert_eq!(value(&all[1]), "a", "{}", tags(&all[1]));
    drop((a, b));
    proxy.stop().await;
}

/// Syncs a client sends before the server's CopyInResponse are read in copy-in mode and
/// ignored: the proxy owes nothing for them (and does not trip over them).
#[tokio::test(flavor = "multi_thread")]
async fn syncs_sent_ahead_of_a_copy_are_owed_nothing() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 1).await;
    let mut client = logged_in(&proxy).await;
    let table = format!("copy_ahead_{}", std::process::id());
    raw_query(&mut client, &format!("create table {table} (x int)"))
        .await
        .unwrap();
    let pipeline = [
        query(&format!("copy {table} from stdin")),
        sync(),
        sync(),
        message(b'd', b"7\n").to_vec(),
        message(b'c', b"").to_vec(),
    ]
    .concat();
    client.write_all(&pipeline).await.unwrap();
    let all = answers(&mut client, 1).await;
    assert_eq!(tags(&all[0]), "GCZ");
    assert_eq!(
        raw_value(&mut client, &format!("select sum(x) from {table}")).await,
        "7"
    );
    raw_query(&mut client, &format!("drop table {table}"))
        .await
        .unwrap();
    drop(client);
    proxy.stop().await;
}

/// A message owed nothing (a lone Flush, copy data left over from a failed COPY) takes no
/// server connection from the pool.
#[tokio::test(flavor = "multi_thread")]
async fn a_lone_flush_takes_no_connection() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 1).await;
    let mut a = logged_in(&proxy).await;
    let mut b = logged_in(&proxy).await;
    a.write_all(
        &[
            flush(),
            message(b'd', b"leftover\n").to_vec(),
            message(b'c', b"").to_vec(),
        ]
        .concat(),
    )
    .await
    .unwrap();
    // b runs at once: a holds nothing.
    assert_eq!(raw_value(&mut b, "select 1").await, "1");
    let pool = pool_until(&proxy, "the counts", |_| true).await;
    assert_eq!(pool["server_active"], 0, "{pool}");
    assert_eq!(raw_value(&mut a, "select 2").await, "2");
    drop((a, b));
    proxy.stop().await;
}
