//! What every test module shares: the provider, the proxy in a task, clients (tokio-postgres,
//! psql, raw sockets) and the raw protocol.
#![allow(dead_code, unreachable_pub)]

pub(crate) use bytes::Bytes;
pub(crate) use pgentra::conninfo::ConnInfo;
pub(crate) use pgentra::credential::CredentialChain;
pub(crate) use pgentra::{EntraAuth, Secret};
pub(crate) use pgentra_emulator::identity::{Identities, IdentityServer};
pub(crate) use pgentra_emulator::issuer::Principal;
pub(crate) use pgentra_emulator::testing::{azure_cli, temp_dir, within};
pub(crate) use pgentra_emulator::{Emulator, EmulatorConfig, MANAGED_IDENTITY, USER};
pub(crate) use pgentra_proxy::{
    ClientRoles, Instance, PoolMode, Proxy, ProxyConfig, ProxyError, StateCheck,
};
pub(crate) use pgentra_wire::{
    ErrorFields, GSSENC_REQUEST_CODE, cancel_request, message, read_message, ssl_request,
    startup_message,
};
pub(crate) use std::net::SocketAddr;
pub(crate) use std::path::{Path, PathBuf};
pub(crate) use std::sync::Arc;
pub(crate) use std::time::{Duration, Instant, SystemTime};
pub(crate) use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
pub(crate) use tokio::net::TcpStream;
pub(crate) use tokio_postgres::NoTls;
pub(crate) use tokio_postgres::error::SqlState;

// ---------------------------------------------------------------------------------------------
// Setup: the provider, the proxy, clients.
// ---------------------------------------------------------------------------------------------

pub(crate) const SHORT: Duration = Duration::from_secs(10);

/// A provider using the real Azure CLI credential on the emulator's `az` (and nothing else).
pub(crate) fn auth(emulator: &Emulator) -> EntraAuth {
    EntraAuth::builder()
        .credential_chain(azure_cli(emulator.bin_dir()))
        .build()
        .unwrap()
}

/// The emulator's gateway, verify-full against its CA.
pub(crate) fn upstream(emulator: &Emulator) -> ConnInfo {
    ConnInfo::parse(&format!(
        "host=localhost port={} sslmode=verify-full sslrootcert={}",
        emulator.gateway().port(),
        emulator.ca_file().display()
    ))
    .unwrap()
}

/// One instance for the emulator on a free loopback port, short drain.
pub(crate) fn config(emulator: &Emulator) -> ProxyConfig {
    let mut config = ProxyConfig::default();
    config.instances.push(Instance::new(
        upstream(emulator),
        "127.0.0.1:0".parse().unwrap(),
    ));
    config.drain_timeout = Duration::from_secs(5);
    config
}

/// A proxy serving in a task until [`stop`](Self::stop) (or until it is dropped).
pub(crate) struct Running {
    pub(crate) addrs: Vec<SocketAddr>,
    pub(crate) admin: Option<SocketAddr>,
    pub(crate) stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub(crate) async fn start(config: ProxyConfig, auth: EntraAuth) -> Self {
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

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub(crate) fn port(&self) -> String {
        self.addr().port().to_string()
    }

    /// Shuts down and waits for `run` to return (sessions must be closed by now).
    pub(crate) async fn stop(mut self) {
        drop(self.stop.take());
        within(SHORT, "the proxy stopping", &mut self.task)
            .await
            .unwrap();
    }

    /// The admin endpoint's `/metrics`.
    pub(crate) async fn metrics(&self) -> String {
        let (status, body) = http(self.admin.expect("an admin address"), "GET", "/metrics").await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

/// The backend process ID of a client's session.
pub(crate) async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// A pooled proxy for the emulator, with `tweak` applied to its settings.
pub(crate) async fn pooled(
    emulator: &Emulator,
    tweak: impl FnOnce(&mut ProxyConfig),
) -> (Running, EntraAuth) {
    let mut config = config(emulator);
    config.admin = Some("127.0.0.1:0".parse().unwrap());
    tweak(&mut config);
    let auth = auth(emulator);
    (Running::start(config, auth.clone()).await, auth)
}

/// A proxy in transaction mode with `size` server connections per pool.
pub(crate) async fn transactional(emulator: &Emulator, size: usize) -> (Running, EntraAuth) {
    pooled(emulator, |config| {
        config.pool.mode = PoolMode::Transaction;
        config.pool.size = size;
    })
    .await
}

/// The sessions a pool (as `/pools` shows it) pinned, whatever the reason.
pub(crate) fn pins_total(pool: &serde_json::Value) -> u64 {
    (pool["pins"].as_object().unwrap().values())
        .map(|n| n.as_u64().unwrap())
        .sum()
}

/// Waits until `/pools` shows a pool that `done` looks for, and returns it.
pub(crate) async fn pool_until(
    proxy: &Running,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    within(SHORT, what, async {
        loop {
            let (status, body) = http(proxy.admin.unwrap(), "GET", "/pools").await;
            assert_eq!(status, 200, "{body}");
            let pools: serde_json::Value = serde_json::from_str(&body).unwrap();
            let all = pools["pools"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            if let Some(pool) = all.iter().find(|pool| done(pool)) {
                return pool.clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

pub(crate) async fn connect_all<F>(connects: impl Iterator<Item = F>) -> Vec<tokio_postgres::Client>
where
    F: Future<Output = Result<tokio_postgres::Client, tokio_postgres::Error>>,
{
    let mut clients = Vec::new();
    for connect in connects {
        clients.push(connect.await.unwrap());
    }
    clients
}

/// A client of `addr` that holds a server connection: logged in, and past its first query
/// (in session pooling, a client welcomed from its pool takes a connection only then).
pub(crate) async fn holding(
    addr: SocketAddr,
    user: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let client = connect(addr, user, |_| {}).await?;
    client.batch_execute("select 1").await?;
    Ok(client)
}

/// The value of one sample in a Prometheus exposition.
pub(crate) fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
        .parse()
        .unwrap()
}

/// A tokio-postgres client through the proxy, without TLS (the proxy answers `N`).
pub(crate) async fn connect(
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

pub(crate) async fn current_user(client: &tokio_postgres::Client) -> String {
    client
        .query_one("select current_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// The server error inside a client error (panics on any other error).
pub(crate) fn db_error(error: &tokio_postgres::Error) -> &tokio_postgres::error::DbError {
    error
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {error:?}"))
}

/// Waits until another session runs a query containing `marker`.
pub(crate) async fn wait_until_running(client: &tokio_postgres::Client, marker: &str) {
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
pub(crate) async fn psql(args: &[&str], env: &[(&str, &str)], stdin: &str) -> std::process::Output {
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
pub(crate) async fn psql_ok(addr: SocketAddr, args: &[&str], stdin: &str) -> String {
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

/// Whether this process runs as root (as CI does), so it can run a client as another user.
pub(crate) fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The `FATAL` error a refused client read before the connection closed.
pub(crate) fn fatal_in(received: &[u8]) -> ErrorFields {
    assert_eq!(
        received.first(),
        Some(&b'E'),
        "not an ErrorResponse: {received:?}"
    );
    let len = i32::from_be_bytes(received[1..5].try_into().unwrap());
    let body = &received[5..1 + usize::try_from(len).unwrap()];
    let fields = ErrorFields::parse(body).unwrap();
    assert_eq!(fields.get(b'S'), Some("FATAL"), "{fields:?}");
    fields
}

/// A raw HTTP/1.1 request: the status code and the body.
pub(crate) async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    within(SHORT, "the admin endpoint", async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
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
pub(crate) fn startup_packet(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
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

pub(crate) const PROTOCOL_3_2: i32 = 196_610;

/// Messages until `ReadyForQuery` (included) or an error (included).
pub(crate) async fn read_until_ready<S: AsyncRead + Unpin>(stream: &mut S) -> Vec<(u8, Bytes)> {
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

pub(crate) fn tags(messages: &[(u8, Bytes)]) -> String {
    messages.iter().map(|(tag, _)| char::from(*tag)).collect()
}

/// A login on a raw stream (after any SSL/GSS negotiation): every message until `Z`.
pub(crate) async fn raw_login<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    params: &[(&str, &str)],
) -> Vec<(u8, Bytes)> {
    stream.write_all(&startup_message(params)).await.unwrap();
    let messages = read_until_ready(stream).await;
    assert_logged_in(&messages);
    messages
}

/// The startup parameters of a plain client of the shared emulator's `postgres` database.
pub(crate) const LOGIN: [(&str, &str); 2] = [("database", "postgres"), ("user", USER)];

/// A raw client of `proxy`, logged in with [`LOGIN`].
pub(crate) async fn logged_in(proxy: &Running) -> TcpStream {
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    raw_login(&mut stream, &LOGIN).await;
    stream
}

/// An emulator of its own on the shared cluster: for tests that count the gateway's logins,
/// which other tests' logins on the shared one would disturb.
pub(crate) async fn own_emulator() -> Emulator {
    beside(EmulatorConfig::default()).await
}

/// An emulator of its own on the shared cluster, whose tokens live 3 seconds (and are not
/// accepted a moment past that): for tokens that expire under a pool.
pub(crate) async fn short_lived_emulator() -> Emulator {
    beside(EmulatorConfig {
        token_lifetime: Duration::from_secs(3),
        skew: Duration::ZERO,
        ..EmulatorConfig::default()
    })
    .await
}

async fn beside(config: EmulatorConfig) -> Emulator {
    tokio::task::spawn_blocking(|| {
        Emulator::shared()
            .beside(config)
            .expect("an emulator of its own")
    })
    .await
    .unwrap()
}

/// `AuthenticationOk` first (after any NegotiateProtocolVersion), `ReadyForQuery` last.
pub(crate) fn assert_logged_in(messages: &[(u8, Bytes)]) {
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
pub(crate) fn error_of(messages: &[(u8, Bytes)]) -> Option<ErrorFields> {
    messages
        .iter()
        .find(|(tag, _)| *tag == b'E')
        .map(|(_, body)| ErrorFields::parse(body).unwrap())
}

/// The proxy-issued `BackendKeyData`: process ID and key.
pub(crate) fn backend_key(messages: &[(u8, Bytes)]) -> (i32, Vec<u8>) {
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
pub(crate) fn parameters(messages: &[(u8, Bytes)]) -> Vec<(String, String)> {
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
pub(crate) async fn raw_query<S: AsyncRead + AsyncWrite + Unpin>(
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

pub(crate) fn data_row(body: &[u8]) -> Vec<Option<String>> {
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
pub(crate) async fn raw_value<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    sql: &str,
) -> String {
    let rows = raw_query(stream, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    rows[0][0].clone().unwrap()
}

/// Reads until the peer closes (or resets) the connection; what it sent before.
pub(crate) async fn read_until_closed<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> Vec<u8> {
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
pub(crate) async fn send_cancel(addr: SocketAddr, pid: i32, key: &[u8], ssl_first: bool) {
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
pub(crate) const NOTICE_THEN_SLEEP: &str =
    "do $$ begin raise notice 'sleeping'; perform pg_sleep(30); end $$";

/// Sends [`NOTICE_THEN_SLEEP`] on a raw session and waits for its notice.
pub(crate) async fn start_sleeping<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
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
pub(crate) async fn assert_cancelled<S: AsyncRead + Unpin>(stream: &mut S, started: Instant) {
    let messages = read_until_ready(stream).await;
    let error = error_of(&messages).expect("an error");
    assert_eq!(error.get(b'C'), Some("57014"), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let messages = read_until_ready(stream).await;
    assert_eq!(tags(&messages), "Z");
}

/// A client TLS configuration from a fresh CA, and that CA's PEM file.
pub(crate) fn client_tls(
    dir: &Path,
) -> (Arc<rustls::ServerConfig>, PathBuf, rustls::RootCertStore) {
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

/// A token endpoint of its own (IMDS, answering as the emulator's managed identity with the
/// emulator's signing key, so its tokens log in), for faults no other test sees.
pub(crate) fn own_token_endpoint(emulator: &Emulator) -> IdentityServer {
    let ca = pgentra_emulator::ca::Ca::new().unwrap();
    IdentityServer::start(
        Arc::clone(emulator.issuer()),
        Identities {
            default_identity: Principal::user_assigned_identity(MANAGED_IDENTITY),
            user_assigned: Vec::new(),
            cli_user: Principal::user(USER),
            service_principals: Vec::new(),
        },
        ca.server_config(&[]).unwrap(),
        0,
    )
    .unwrap()
}

/// A provider whose only credential is the real managed-identity credential on `imds` (an
/// IMDS authority URL), giving up after `timeout`.
pub(crate) fn imds_auth(imds: &str, timeout: Duration) -> EntraAuth {
    let chain = CredentialChain::from_vars([
        ("AZURE_TOKEN_CREDENTIALS", "ManagedIdentityCredential"),
        ("AZURE_POD_IDENTITY_AUTHORITY_HOST", imds),
    ])
    .unwrap();
    EntraAuth::builder()
        .credential_chain(chain)
        .timeout(timeout)
        .build()
        .unwrap()
}
