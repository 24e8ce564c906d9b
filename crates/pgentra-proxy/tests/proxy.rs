//! The proxy in process, against the emulator: psql and tokio-postgres through it, cancel
//! requests, token refreshes, refusals, the startup-phase pitfalls on raw sockets, client TLS,
//! the Unix socket, the local password, and the admin endpoint.

use bytes::Bytes;
use pgentra::conninfo::ConnInfo;
use pgentra::credential::CredentialChain;
use pgentra::{EntraAuth, Secret};
use pgentra_emulator::{Emulator, EmulatorConfig, USER};
use pgentra_proxy::{Instance, Proxy, ProxyConfig, ProxyError};
use pgentra_wire::{
    ErrorFields, GSSENC_REQUEST_CODE, cancel_request, message, read_message, ssl_request,
    startup_message,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

// ---------------------------------------------------------------------------------------------
// Setup: the provider, the proxy, clients.
// ---------------------------------------------------------------------------------------------

/// Fails the test if `future` takes longer than `limit`.
async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: no result within {limit:?}"),
    }
}

const SHORT: Duration = Duration::from_secs(10);

/// A provider using the real Azure CLI credential on the emulator's `az` (and nothing else).
fn auth(emulator: &Emulator) -> EntraAuth {
    let chain = CredentialChain::from_vars([
        ("PATH", emulator.bin_dir().to_str().unwrap()),
        ("AZURE_TOKEN_CREDENTIALS", "AzureCliCredential"),
    ])
    .unwrap();
    EntraAuth::builder()
        .credential_chain(chain)
        .build()
        .unwrap()
}

/// The emulator's gateway, verify-full against its CA.
fn upstream(emulator: &Emulator) -> ConnInfo {
    ConnInfo::parse(&format!(
        "host=localhost port={} sslmode=verify-full sslrootcert={}",
        emulator.gateway().port(),
        emulator.ca_file().display()
    ))
    .unwrap()
}

/// One instance for the emulator on a free loopback port, short drain.
fn config(emulator: &Emulator) -> ProxyConfig {
    let mut config = ProxyConfig::default();
    config.instances.push(Instance::new(
        upstream(emulator),
        "127.0.0.1:0".parse().unwrap(),
    ));
    config.drain_timeout = Duration::from_secs(5);
    config
}

/// A proxy serving in a task until [`stop`](Self::stop) (or until it is dropped).
struct Running {
    addrs: Vec<SocketAddr>,
    admin: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(config: ProxyConfig, auth: EntraAuth) -> Self {
        let proxy = Proxy::bind(config, auth).await.expect("bind the proxy");
        let addrs = proxy.local_addrs();
        let admin = proxy.admin_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(proxy.run(async move {
            let _ = stopped.await;
        }));
        Self {
            addrs,
            admin,
            stop: Some(stop),
            task,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    fn port(&self) -> String {
        self.addr().port().to_string()
    }

    /// Shuts down and waits for `run` to return (sessions must be closed by now).
    async fn stop(mut self) {
        drop(self.stop.take());
        within(SHORT, "the proxy stopping", &mut self.task)
            .await
            .unwrap();
    }

    /// The admin endpoint's `/metrics`.
    async fn metrics(&self) -> String {
        let (status, body) = http(self.admin.expect("an admin address"), "GET", "/metrics").await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

/// The value of one sample in a Prometheus exposition.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
        .parse()
        .unwrap()
}

/// A tokio-postgres client through the proxy, without TLS (the proxy answers `N`).
async fn connect(
    addr: SocketAddr,
    user: &str,
    tweak: impl FnOnce(&mut tokio_postgres::Config),
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(addr.ip().to_string())
        .port(addr.port())
        .user(user)
        .dbname("postgres")
        .connect_timeout(SHORT);
    tweak(&mut config);
    let (client, connection) = within(SHORT, "connecting", config.connect(NoTls)).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn current_user(client: &tokio_postgres::Client) -> String {
    client
        .query_one("select current_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// The server error inside a client error (panics on any other error).
fn db_error(error: &tokio_postgres::Error) -> &tokio_postgres::error::DbError {
    error
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {error:?}"))
}

/// Waits until another session runs a query containing `marker`.
async fn wait_until_running(client: &tokio_postgres::Client, marker: &str) {
    within(SHORT, "the query to start", async {
        loop {
            let running: i64 = client
                .query_one(
                    "select count(*) from pg_stat_activity where state = 'active' \
                     and pid <> pg_backend_pid() and strpos(query, $1) > 0",
                    &[&marker],
                )
                .await
                .unwrap()
                .get(0);
            if running > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Runs the real `psql` (no `.psqlrc`, only `PATH` and `env` in its environment).
async fn psql(args: &[&str], env: &[(&str, &str)], stdin: &str) -> std::process::Output {
    let mut child = tokio::process::Command::new("psql")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PGCONNECT_TIMEOUT", "10")
        .envs(env.iter().copied())
        .arg("-X")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run psql (apt-get install postgresql-client)");
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_owned();
    // Written alongside, so a large input cannot block on a full pipe.
    let writer = tokio::spawn(async move {
        let _ = input.write_all(stdin.as_bytes()).await;
    });
    let output = within(Duration::from_secs(30), "psql", child.wait_with_output())
        .await
        .unwrap();
    let _ = writer.await;
    output
}

/// `psql -h 127.0.0.1 -p PORT -d postgres -At` plus `args`; its standard output on success.
async fn psql_ok(addr: SocketAddr, args: &[&str], stdin: &str) -> String {
    let port = addr.port().to_string();
    let mut all = vec!["-h", "127.0.0.1", "-p", &port, "-d", "postgres", "-qAt"];
    all.extend_from_slice(args);
    let output = psql(&all, &[], stdin).await;
    assert!(
        output.status.success(),
        "psql {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A fresh temporary directory.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pgentra-proxy-{name}-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A raw HTTP/1.1 request: the status code and the body.
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    within(SHORT, "the admin endpoint", async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        (status, body)
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Raw protocol: startup packets and messages on a socket.
// ---------------------------------------------------------------------------------------------

/// A `StartupMessage` for any protocol version.
fn startup_packet(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (name, value) in params {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let len = i32::try_from(body.len() + 4).unwrap();
    [len.to_be_bytes().to_vec(), body].concat()
}

const PROTOCOL_3_2: i32 = 196_610;

/// Messages until `ReadyForQuery` (included) or an error (included).
async fn read_until_ready<S: AsyncRead + Unpin>(stream: &mut S) -> Vec<(u8, Bytes)> {
    within(SHORT, "the server's answers", async {
        let mut messages = Vec::new();
        loop {
            let (tag, body) = read_message(stream, 1 << 20)
                .await
                .unwrap_or_else(|e| panic!("after {:?}: {e}", tags(&messages)));
            messages.push((tag, body));
            if matches!(tag, b'Z' | b'E') {
                return messages;
            }
        }
    })
    .await
}

fn tags(messages: &[(u8, Bytes)]) -> String {
    messages.iter().map(|(tag, _)| char::from(*tag)).collect()
}

/// A login on a raw stream (after any SSL/GSS negotiation): every message until `Z`.
async fn raw_login<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    params: &[(&str, &str)],
) -> Vec<(u8, Bytes)> {
    stream.write_all(&startup_message(params)).await.unwrap();
    let messages = read_until_ready(stream).await;
    assert_logged_in(&messages);
    messages
}

/// `AuthenticationOk` first (after any NegotiateProtocolVersion), `ReadyForQuery` last.
fn assert_logged_in(messages: &[(u8, Bytes)]) {
    let tags = tags(messages);
    let auth = messages
        .iter()
        .find(|(tag, _)| *tag != b'v')
        .expect("some message");
    assert_eq!(
        (auth.0, &auth.1[..]),
        (b'R', &[0u8, 0, 0, 0][..]),
        "not AuthenticationOk first: {tags} {:?}",
        error_of(messages)
    );
    assert!(tags.ends_with('Z'), "{tags} {:?}", error_of(messages));
}

/// The fields of the `ErrorResponse` among `messages`, if any.
fn error_of(messages: &[(u8, Bytes)]) -> Option<ErrorFields> {
    messages
        .iter()
        .find(|(tag, _)| *tag == b'E')
        .map(|(_, body)| ErrorFields::parse(body).unwrap())
}

/// The proxy-issued `BackendKeyData`: process ID and key.
fn backend_key(messages: &[(u8, Bytes)]) -> (i32, Vec<u8>) {
    let (_, body) = messages
        .iter()
        .find(|(tag, _)| *tag == b'K')
        .expect("a BackendKeyData");
    (
        i32::from_be_bytes(body[..4].try_into().unwrap()),
        body[4..].to_vec(),
    )
}

/// The `ParameterStatus` messages, in order.
fn parameters(messages: &[(u8, Bytes)]) -> Vec<(String, String)> {
    messages
        .iter()
        .filter(|(tag, _)| *tag == b'S')
        .map(|(_, body)| {
            let text = std::str::from_utf8(body).unwrap();
            let mut parts = text.split('\0');
            (
                parts.next().unwrap().to_owned(),
                parts.next().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A simple query on a raw session: the rows (as text), or the error.
async fn raw_query<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, ErrorFields> {
    let mut text = sql.as_bytes().to_vec();
    text.push(0);
    stream.write_all(&message(b'Q', &text)).await.unwrap();
    let mut rows = Vec::new();
    let mut error = None;
    within(SHORT, "a query's answer", async {
        loop {
            let (tag, body) = read_message(stream, 1 << 20).await.unwrap();
            match tag {
                b'D' => rows.push(data_row(&body)),
                b'E' => error = Some(ErrorFields::parse(&body).unwrap()),
                b'Z' => return,
                _ => {}
            }
        }
    })
    .await;
    error.map_or(Ok(rows), Err)
}

fn data_row(body: &[u8]) -> Vec<Option<String>> {
    let count = i16::from_be_bytes([body[0], body[1]]);
    let mut rest = &body[2..];
    (0..count)
        .map(|_| {
            let len = i32::from_be_bytes(rest[..4].try_into().unwrap());
            rest = &rest[4..];
            let len = usize::try_from(len).ok()?;
            let value = String::from_utf8(rest[..len].to_vec()).unwrap();
            rest = &rest[len..];
            Some(value)
        })
        .collect()
}

/// The single value a raw query returns.
async fn raw_value<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, sql: &str) -> String {
    let rows = raw_query(stream, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    rows[0][0].clone().unwrap()
}

/// Reads until the peer closes (or resets) the connection; what it sent before.
async fn read_until_closed<S: AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> Vec<u8> {
    within(limit, "the proxy closing the connection", async {
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return received,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
}

/// Sends a `CancelRequest` on a new connection (after an `SSLRequest` answered `N` if
/// `ssl_first`), and waits for the proxy to close it.
async fn send_cancel(addr: SocketAddr, pid: i32, key: &[u8], ssl_first: bool) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    if ssl_first {
        stream.write_all(&ssl_request()).await.unwrap();
        assert_eq!(stream.read_u8().await.unwrap(), b'N');
    }
    stream.write_all(&cancel_request(pid, key)).await.unwrap();
    // No answer: the proxy closes once the request is forwarded (or ignored).
    let answer = read_until_closed(&mut stream, SHORT).await;
    assert!(
        answer.is_empty(),
        "a cancel request got an answer: {answer:?}"
    );
}

/// A query that tells the client it has started (a notice is flushed at once), then sleeps.
const NOTICE_THEN_SLEEP: &str = "do $$ begin raise notice 'sleeping'; perform pg_sleep(30); end $$";

/// Sends [`NOTICE_THEN_SLEEP`] on a raw session and waits for its notice.
async fn start_sleeping<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    let mut text = NOTICE_THEN_SLEEP.as_bytes().to_vec();
    text.push(0);
    stream.write_all(&message(b'Q', &text)).await.unwrap();
    within(SHORT, "the notice", async {
        loop {
            let (tag, body) = read_message(stream, 1 << 20).await.unwrap();
            assert_ne!(tag, b'E', "{:?}", ErrorFields::parse(&body));
            if tag == b'N' {
                return;
            }
        }
    })
    .await;
}

/// Waits for the answer to a cancelled [`NOTICE_THEN_SLEEP`]: SQLSTATE 57014, then `Z`.
async fn assert_cancelled<S: AsyncRead + Unpin>(stream: &mut S, started: Instant) {
    let messages = read_until_ready(stream).await;
    let error = error_of(&messages).expect("an error");
    assert_eq!(error.get(b'C'), Some("57014"), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let messages = read_until_ready(stream).await;
    assert_eq!(tags(&messages), "Z");
}

// ---------------------------------------------------------------------------------------------
// Clients through the proxy.
// ---------------------------------------------------------------------------------------------

/// psql runs queries and `\copy` in both directions; the role follows the documented rule.
#[tokio::test(flavor = "multi_thread")]
async fn psql_queries_copies_and_roles() {
    let emulator = Emulator::shared();
    let proxy = Running::start(config(emulator), auth(emulator)).await;
    let addr = proxy.addr();

    // No -U: psql sends the operating-system user (root), which means "the token's role".
    assert_eq!(
        psql_ok(addr, &["-c", "select current_user"], "").await,
        format!("{USER}\n")
    );
    // A deliberately chosen role: alice's group.
    assert_eq!(
        psql_ok(addr, &["-U", "readers", "-c", "select current_user"], "").await,
        "readers\n"
    );

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

    // A pinned role wins over whatever the client sends.
    let mut pinned = config(emulator);
    pinned.instances[0].user = Some("readers".into());
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
    proxy.stop().await;
}

/// A running query is cancelled through the proxy; unknown keys change nothing.
#[tokio::test(flavor = "multi_thread")]
async fn cancel_requests_reach_the_running_query() {
    let emulator = Emulator::shared();
    let proxy = Running::start(config(emulator), auth(emulator)).await;
    let client = Arc::new(connect(proxy.addr(), USER, |_| {}).await.unwrap());
    let observer = connect(proxy.addr(), USER, |_| {}).await.unwrap();

    let marker = format!("cancel-me-{}", fastrand::u32(..));
    let sleeping = {
        let client = Arc::clone(&client);
        let sql = format!("select pg_sleep(30) /* {marker} */");
        tokio::spawn(async move { client.simple_query(&sql).await })
    };
    wait_until_running(&observer, &marker).await;

    // A key the proxy never issued: the connection is closed and the query runs on.
    send_cancel(
        proxy.addr(),
        fastrand::i32(1..),
        &fastrand::u32(..).to_be_bytes(),
        false,
    )
    .await;
    send_cancel(proxy.addr(), 42, &[1, 2, 3, 4], true).await;
    wait_until_running(&observer, &marker).await;
    assert!(!sleeping.is_finished());

    // tokio-postgres's own cancel (sslmode=prefer: an SSLRequest answered N, then the cancel).
    let started = Instant::now();
    client.cancel_token().cancel_query(NoTls).await.unwrap();
    let error = within(SHORT, "the cancelled query", sleeping)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED), "{error:?}");
    assert!(started.elapsed() < SHORT);
    // The session goes on.
    assert_eq!(current_user(&client).await, USER);
    drop((client, observer));
    proxy.stop().await;
}

/// The proxy issues its own positive cancel keys, one per session, and routes them, with or
/// without an SSLRequest before the CancelRequest.
#[tokio::test(flavor = "multi_thread")]
async fn backend_keys_are_the_proxys_own() {
    let emulator = Emulator::shared();
    let proxy = Running::start(config(emulator), auth(emulator)).await;
    let mut first = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut second = TcpStream::connect(proxy.addr()).await.unwrap();
    let first_key = backend_key(&raw_login(&mut first, &[("database", "postgres")]).await);
    let second_key = backend_key(&raw_login(&mut second, &[("database", "postgres")]).await);
    for (pid, key) in [&first_key, &second_key] {
        assert!(*pid > 0, "negative process ID {pid}");
        // Protocol 3.0: exactly 4 bytes.
        assert_eq!(key.len(), 4);
    }
    assert_ne!(first_key, second_key);
    let backend_pid: i32 = raw_value(&mut first, "select pg_backend_pid()")
        .await
        .parse()
        .unwrap();
    assert_ne!(first_key.0, backend_pid, "the backend's process ID leaked");

    // Each key cancels its own session's query only; plain and after an SSLRequest.
    for (ssl_first, stream, key) in [
        (false, &mut first, &first_key),
        (true, &mut second, &second_key),
    ] {
        start_sleeping(stream).await;
        let started = Instant::now();
        send_cancel(proxy.addr(), key.0, &key.1, ssl_first).await;
        assert_cancelled(stream, started).await;
    }
    // The other session was not disturbed by either cancel.
    assert_eq!(raw_value(&mut first, "select 1").await, "1");
    assert_eq!(raw_value(&mut second, "select 2").await, "2");
    // A cancel for an idle session is a no-op: its next query runs.
    send_cancel(proxy.addr(), first_key.0, &first_key.1, false).await;
    assert_eq!(raw_value(&mut first, "select 3").await, "3");
    drop((first, second));
    proxy.stop().await;
}

/// Sessions outlive their token; new sessions after the first token expired get a fresh one.
#[tokio::test(flavor = "multi_thread")]
async fn sessions_survive_token_refreshes() {
    // 3-second tokens, checked to the second.
    let emulator = tokio::task::spawn_blocking(|| {
        Emulator::start(EmulatorConfig {
            token_lifetime: Duration::from_secs(3),
            skew: Duration::ZERO,
            ..EmulatorConfig::default()
        })
        .expect("start an emulator")
    })
    .await
    .unwrap();
    let auth = auth(&emulator);
    let proxy = Running::start(config(&emulator), auth.clone()).await;
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
    let chain = CredentialChain::from_vars([
        ("PATH", empty.to_str().unwrap()),
        ("AZURE_TOKEN_CREDENTIALS", "AzureCliCredential"),
    ])
    .unwrap();
    let failing = EntraAuth::builder()
        .credential_chain(chain)
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

/// Clients that stall, oversize or garble their startup are dropped; others log in meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn bad_startups_are_dropped_without_harm() {
    let emulator = Emulator::shared();
    let mut config = config(emulator);
    config.login_timeout = Duration::from_secs(1);
    config.admin = Some("127.0.0.1:0".parse().unwrap());
    let proxy = Running::start(config, auth(emulator)).await;

    // Connects and says nothing: closed at the login timeout.
    let mut silent = TcpStream::connect(proxy.addr()).await.unwrap();
    let opened = Instant::now();
    let client = connect(proxy.addr(), USER, |_| {}).await.unwrap();
    assert_eq!(current_user(&client).await, USER);
    let said = read_until_closed(&mut silent, SHORT).await;
    assert!(said.is_empty(), "{said:?}");
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
    assert!(read_until_closed(&mut oversized, SHORT).await.is_empty());
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
    assert!(read_until_closed(&mut garbled, SHORT).await.is_empty());
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

// ---------------------------------------------------------------------------------------------
// Wire-protocol pitfalls, on raw sockets.
// ---------------------------------------------------------------------------------------------

/// SSLRequest and GSSENCRequest are answered `N`, and the startup follows on the same socket.
#[tokio::test(flavor = "multi_thread")]
async fn encryption_requests_are_declined_on_the_same_socket() {
    let emulator = Emulator::shared();
    let proxy = Running::start(config(emulator), auth(emulator)).await;

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

    // After ReadyForQuery it is a byte pipe: a Terminate ends the backend too.
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

// ---------------------------------------------------------------------------------------------
// Client TLS, Unix socket, local password, listen addresses.
// ---------------------------------------------------------------------------------------------

/// A client TLS configuration from a fresh CA, and that CA's PEM file.
fn client_tls(dir: &Path) -> (Arc<rustls::ServerConfig>, PathBuf, rustls::RootCertStore) {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let ca = pgentra_emulator::ca::Ca::new().unwrap();
    let ca_file = dir.join("client-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    (ca.server_config(&[b"postgresql"]).unwrap(), ca_file, roots)
}

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
    let metrics = proxy.metrics().await;
    assert_eq!(
        sample(&metrics, "pgentra_proxy_upstream_login_seconds_count"),
        2.0
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

/// Keys from a seeded non-cryptographic RNG can be predicted by whoever learns its state
/// (a client recovered fastrand's clock-and-thread seed from its own key). The sessions of this
/// current-thread test run on this thread, so the RNG the proxy used to draw keys from is this
/// thread's fastrand: seeded here, none of the keys it could have produced may appear.
#[tokio::test(flavor = "current_thread")]
async fn cancel_keys_cannot_be_predicted_from_a_known_rng_state() {
    let emulator = Emulator::shared();
    let proxy = Running::start(config(emulator), auth(emulator)).await;
    const SEED: u64 = 0x5eed_cafe;
    // Every key the seeded RNG could give, whatever else drew from it in between.
    let mut predicted = std::collections::HashSet::new();
    for skipped in 0..500 {
        let mut rng = fastrand::Rng::with_seed(SEED);
        for _ in 0..skipped {
            rng.u32(..);
        }
        predicted.insert((rng.i32(1..), rng.u32(..).to_be_bytes().to_vec()));
    }
    let mut seen = Vec::new();
    for _ in 0..20 {
        fastrand::seed(SEED);
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        let messages = raw_login(&mut stream, &[("user", USER), ("database", "postgres")]).await;
        let key = backend_key(&messages);
        assert!(key.0 > 0, "process IDs stay positive");
        assert!(
            !predicted.contains(&key),
            "session key {key:?} was predicted"
        );
        seen.push(key);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 20, "keys repeat");
    proxy.stop().await;
}
