//! The gateway: a PostgreSQL-protocol server on loopback that checks Entra tokens the way Azure
//! Database for PostgreSQL does, then relays the session to a real PostgreSQL as that role.
//!
//! Per connection:
//!
//! 1. Startup phase, bounded in size ([`pgentra_wire::MAX_STARTUP_PACKET`]) and time (the login timeout):
//!    `SSLRequest` is answered `S` and TLS is negotiated with the emulator's certificate;
//!    `GSSENCRequest` is answered `N`; `CancelRequest` is forwarded to the backend with the real
//!    key. A `StartupMessage` over plain TCP is refused, as Azure's `require_secure_transport`
//!    does. Protocol 3.1+ requests get a `NegotiateProtocolVersion` for 3.0.
//! 2. `AuthenticationCleartextPassword`; the password message (up to 64 KiB) must be a token
//!    that verifies: signature by the emulator's key, the server's tenant, audience,
//!    `nbf`/`exp` with a small skew, and a principal that may use the requested role. Which
//!    principal a role is comes from the database itself, at each login: roles an Entra
//!    administrator created with `pgaadauth_create_principal` are accepted at once, and a
//!    dropped role at once refused. A user or service role is its
//!    principal's (by object ID); a group role, its members'. Failures get Azure's `FATAL`
//!    texts where they are known.
//! 3. A backend connection as the role (trust authentication on the cluster's Unix socket);
//!    `BackendKeyData` is replaced by a gateway-issued key, the backend's answers reach the
//!    client in one write, then bytes are relayed both ways.
//!
//! Every socket has `TCP_NODELAY`: a login is a few small messages each way, which Nagle's
//! algorithm and delayed acknowledgements would hold for tens of milliseconds.
//!
//! The token is checked at login only, so an open session outlives its token, as on Azure.

use crate::directory::Directory;
use crate::issuer::{Issuer, TokenRejection};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use pgentra_wire::{
    ErrorFields, MAX_STARTUP_PACKET, StartupPacket, WireError, backend_key_data, cancel_request,
    cleartext_password_request, message, negotiation, parse_password, parse_startup_packet,
    read_message, read_startup_packet, startup_message,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::oneshot;

/// Largest password message accepted: a 64 KiB token and the framing.
pub const MAX_PASSWORD: usize = 64 * 1024 + 1;

/// Where the backend PostgreSQL listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAddr {
    /// A Unix socket: the socket directory and the port that names the socket file.
    Unix {
        /// The socket directory.
        dir: PathBuf,
        /// The port.
        port: u16,
    },
    /// TCP without TLS (for an external server on this machine).
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
}

/// A connection to the backend, whichever transport it uses.
trait BackendIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> BackendIo for T {}

impl BackendAddr {
    async fn connect(&self) -> std::io::Result<Box<dyn BackendIo>> {
        Ok(match self {
            Self::Unix { dir, port } => {
                Box::new(UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).await?)
            }
            Self::Tcp { host, port } => {
                let stream = TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
        })
    }

    /// Settings for a tokio-postgres connection to the `postgres` database as `user`.
    fn catalog_config(&self, user: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config.user(user).dbname("postgres");
        match self {
            Self::Unix { dir, port } => config.host_path(dir).port(*port),
            Self::Tcp { host, port } => config.host(host).port(*port),
        };
        config
    }
}

/// Which principal a role is, as the gateway reads it from the database.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    object_id: String,
    object_type: String,
}

/// A connection to the backend's `postgres` database as its superuser, for the role mapping,
/// made again when the backend restarts.
struct Catalog {
    config: tokio_postgres::Config,
    client: tokio::sync::Mutex<Option<Arc<tokio_postgres::Client>>>,
}

impl Catalog {
    async fn client(&self) -> Result<Arc<tokio_postgres::Client>, tokio_postgres::Error> {
        let mut held = self.client.lock().await;
        if let Some(client) = held.as_ref().filter(|c| !c.is_closed()) {
            return Ok(Arc::clone(client));
        }
        let (client, connection) = self.config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let client = Arc::new(client);
        *held = Some(Arc::clone(&client));
        Ok(client)
    }

    /// The principal `role` is mapped to, if it is an Entra role.
    async fn mapping(&self, role: &str) -> Result<Option<Mapping>, tokio_postgres::Error> {
        let client = self.client().await?;
        let row = client
            .query_opt(crate::provision::ROLE_MAPPING, &[&role])
            .await?;
        Ok(row.map(|row| Mapping {
            object_id: row.get(0),
            object_type: row.get(1),
        }))
    }
}

/// The gateway's settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Accepted token audience, like `https://ossrdbms-aad.database.windows.net`.
    pub audience: String,
    /// Allowed clock skew for `nbf`/`exp`.
    pub skew: Duration,
    /// How long a client may take from connecting to sending its password.
    pub login_timeout: Duration,
    /// The tenant's directory, for the members of group roles.
    pub directory: Arc<Directory>,
    /// Where the PostgreSQL behind the gateway listens. It must trust the gateway's
    /// connections (the gateway has already checked the token), and hold the role mapping an
    /// [`Emulator`](crate::Emulator) installs.
    pub backend: BackendAddr,
    /// The backend's superuser, whom the gateway reads the role mapping as.
    pub backend_user: String,
    /// The loopback port to listen on (0: any free port).
    pub port: u16,
}

/// Counters of the gateway's work.
#[derive(Debug, Default)]
struct Counters {
    logins: AtomicU64,
    rejected: AtomicU64,
}

/// A protocol 3.0 `BackendKeyData`: process ID and secret.
type CancelKey = (i32, [u8; 4]);

struct State {
    config: GatewayConfig,
    catalog: Catalog,
    issuer: Arc<Issuer>,
    tls: tokio_rustls::TlsAcceptor,
    /// Gateway-issued key → the backend's.
    cancel_keys: Mutex<HashMap<CancelKey, CancelKey>>,
    counters: Counters,
}

/// A running gateway; stopped when dropped.
pub struct Gateway {
    addr: SocketAddr,
    state: Arc<State>,
    /// The serving thread; `None` only if a [`restart`](Gateway::restart) could not listen again.
    running: Mutex<Option<Running>>,
}

/// The thread that serves the listener and its sessions, and what stops it.
struct Running {
    stop: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Starts the gateway on a free loopback port, on a runtime of its own.
    pub fn start(
        config: GatewayConfig,
        issuer: Arc<Issuer>,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<Self> {
        let listener = listen(config.port)?;
        let addr = listener.local_addr()?;
        let catalog = Catalog {
            config: config.backend.catalog_config(&config.backend_user),
            client: tokio::sync::Mutex::new(None),
        };
        let state = Arc::new(State {
            config,
            catalog,
            issuer,
            tls: tokio_rustls::TlsAcceptor::from(tls),
            cancel_keys: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        });
        let running = serve(listener, Arc::clone(&state))?;
        Ok(Self {
            addr,
            state,
            running: Mutex::new(Some(running)),
        })
    }

    /// Restarts the gateway the way a server restart looks to clients: closes the listener and
    /// every session (open connections drop, their backend sessions end), then listens again on
    /// the same port with the same settings. The counters carry on.
    ///
    /// Blocks until the old sessions are closed and the new listener is bound (milliseconds);
    /// from async code, call it through `spawn_blocking` or `block_in_place`. If the port cannot
    /// be bound again the error is returned, the gateway stays down, and a later call retries.
    pub fn restart(&self) -> std::io::Result<()> {
        let mut running = self.running.lock();
        if let Some(Running { stop, thread }) = running.take() {
            drop(stop);
            // The thread only ends after dropping its runtime, which closes every socket.
            thread
                .join()
                .map_err(|_| std::io::Error::other("the gateway's thread panicked"))?;
        }
        // Keys of sessions that no longer exist.
        self.state.cancel_keys.lock().clear();
        let listener = listen(self.addr.port())?;
        *running = Some(serve(listener, Arc::clone(&self.state))?);
        Ok(())
    }

    /// The loopback port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Successful logins so far.
    pub fn logins(&self) -> u64 {
        self.state.counters.logins.load(Ordering::SeqCst)
    }

    /// Refused logins so far (token or role rejected, or no TLS).
    pub fn rejected(&self) -> u64 {
        self.state.counters.rejected.load(Ordering::Relaxed)
    }
}

/// A non-blocking listener on the loopback `port` (0: any free port).
fn listen(port: u16) -> std::io::Result<std::net::TcpListener> {
    // std sets SO_REUSEADDR on Unix, so a restart can bind the port again at once although the
    // sessions it closed leave connections in TIME_WAIT.
    let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves `listener` on a runtime of its own, on a thread of its own.
fn serve(listener: std::net::TcpListener, state: Arc<State>) -> std::io::Result<Running> {
    let (stop, thread) =
        crate::background::spawn("pgentra-emulator-gateway", move || async move {
            if let Ok(listener) = tokio::net::TcpListener::from_std(listener) {
                accept_loop(listener, state).await;
            }
        })?;
    Ok(Running { stop, thread })
}

async fn accept_loop(listener: tokio::net::TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            // Each session fails alone: errors only end this connection.
            let _ = session(stream, peer, state).await;
        });
    }
}

/// Why a session ended early. Never shown to the client (it gets an ErrorResponse).
#[derive(Debug)]
enum End {
    Io,
    Protocol,
    TimedOut,
}

impl From<std::io::Error> for End {
    fn from(_: std::io::Error) -> Self {
        Self::Io
    }
}

impl From<WireError> for End {
    fn from(error: WireError) -> Self {
        match error {
            WireError::Io(_) => Self::Io,
            _ => Self::Protocol,
        }
    }
}

fn fatal(code: &str, message: &str, hint: Option<&str>) -> Bytes {
    ErrorFields::fatal(code, message, hint).to_error_response()
}

async fn session(mut stream: TcpStream, peer: SocketAddr, state: Arc<State>) -> Result<(), End> {
    let timeout = state.config.login_timeout;
    let wants_tls = tokio::time::timeout(timeout, plain_startup(&mut stream, peer, &state))
        .await
        .map_err(|_| End::TimedOut)??;
    if !wants_tls {
        return Ok(());
    }
    let mut client = tokio::time::timeout(timeout, state.tls.accept(stream))
        .await
        .map_err(|_| End::TimedOut)??;
    let login = tokio::time::timeout(timeout, authenticate(&mut client, &state))
        .await
        .map_err(|_| End::TimedOut)??;
    let Some((params, role)) = login else {
        return Ok(());
    };
    relay(client, params, &role, &state).await
}

/// The startup phase on the plain socket, until TLS is agreed (`true`), or a cancel request or
/// a refused plain-text login ends the connection (`false`).
async fn plain_startup(
    stream: &mut TcpStream,
    peer: SocketAddr,
    state: &State,
) -> Result<bool, End> {
    loop {
        let packet = read_startup_packet(stream, MAX_STARTUP_PACKET).await?;
        match parse_startup_packet(&packet)? {
            StartupPacket::SslRequest => {
                stream.write_all(b"S").await?;
                return Ok(true);
            }
            StartupPacket::GssEncRequest => stream.write_all(b"N").await?,
            StartupPacket::CancelRequest { pid, key } => {
                cancel(state, pid, &key).await;
                return Ok(false);
            }
            startup @ StartupPacket::Startup { .. } => {
                // A login without TLS: refused like Azure's require_secure_transport.
                let message = format!(
                    "no pg_hba.conf entry for host \"{}\", user \"{}\", database \"{}\", no encryption",
                    peer.ip(),
                    startup.param("user").unwrap_or_default(),
                    startup.param("database").unwrap_or_default(),
                );
                state.counters.rejected.fetch_add(1, Ordering::Relaxed);
                let hint = Some("Connect with sslmode=verify-full (or require).");
                stream.write_all(&fatal("28000", &message, hint)).await?;
                return Ok(false);
            }
        }
    }
}

/// Startup message and password inside TLS. `None` when the client was refused (and told).
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    state: &State,
) -> Result<Option<(Vec<(String, Bytes)>, String)>, End> {
    let params = loop {
        let packet = read_startup_packet(client, MAX_STARTUP_PACKET).await;
        let packet = match packet.and_then(|packet| parse_startup_packet(&packet)) {
            Ok(packet) => packet,
            Err(WireError::UnsupportedProtocol { .. }) => {
                client
                    .write_all(&fatal("0A000", "unsupported frontend protocol", None))
                    .await?;
                return Ok(None);
            }
            Err(error) => return Err(error.into()),
        };
        match packet {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                client.write_all(b"N").await?;
            }
            StartupPacket::CancelRequest { pid, key } => {
                // Clients that require TLS send their cancel requests inside it.
                cancel(state, pid, &key).await;
                return Ok(None);
            }
            StartupPacket::Startup {
                minor_version,
                params,
            } => {
                if let Some(answer) = negotiation(minor_version, &params) {
                    // We speak 3.0 and know no protocol options.
                    client.write_all(&answer).await?;
                }
                break params;
            }
        }
    };
    // A role name that is not UTF-8 names no role there is.
    let role = pgentra_wire::param(&params, "user")
        .unwrap_or_default()
        .to_owned();
    client.write_all(&cleartext_password_request()).await?;
    let (tag, password) = read_message(client, MAX_PASSWORD).await?;
    if tag != b'p' {
        return Err(End::Protocol);
    }
    // A password that is not one UTF-8 string is a malformed token, as far as Azure is concerned.
    let token = parse_password(&password).unwrap_or_default();
    match check(state, token, &role).await {
        Ok(()) => Ok(Some((params, role))),
        Err((code, message)) => {
            state.counters.rejected.fetch_add(1, Ordering::Relaxed);
            client.write_all(&fatal(code, &message, None)).await?;
            Ok(None)
        }
    }
}

/// Azure's checks, with its error texts where they are known.
async fn check(state: &State, token: &str, role: &str) -> Result<(), (&'static str, String)> {
    let config = &state.config;
    let claims = state
        .issuer
        .verify(token, &config.audience, config.skew)
        .map_err(|rejection| {
            let message = match rejection {
                TokenRejection::Expired => {
                    "The access token has expired. Acquire a new token and try again.".to_owned()
                }
                TokenRejection::WrongAudience { expected } => format!(
                    "The access token does not have a valid audience claim. Please acquire a new token for the resource \"{expected}\"."
                ),
                TokenRejection::Malformed(_) => "The access token has invalid format. Please ensure the token is passed exactly as returned by the authentication endpoint and retry.".to_owned(),
                TokenRejection::NotYetValid => {
                    "The access token is not valid yet. Check the clock of the machine that requested it and retry.".to_owned()
                }
                // Azure's text for another tenant's token is not known; it is refused as one it
                // cannot validate.
                _ => "An error occurred while validating the access token. Please acquire a new token and retry".to_owned(),
            };
            ("28P01", message)
        })?;
    let oid = claims.oid().unwrap_or_default();
    let refused = || {
        (
            "28P01",
            format!("password authentication failed for user \"{role}\""),
        )
    };
    let mapping = state.catalog.mapping(role).await.map_err(|error| {
        (
            "08006",
            format!(
                "the emulator could not read the role mapping: {}",
                pgentra::ErrorChain(&error)
            ),
        )
    })?;
    let Some(mapping) = mapping else {
        return Err(refused());
    };
    match mapping.object_type.as_str() {
        "group" if state.config.directory.is_member(&mapping.object_id, oid) => Ok(()),
        "group" => Err(refused()),
        "user" if claims.is_app() => Err((
            "28P01",
            format!(
                "Service Principals cannot generate AAD_AUTH_TOKENTYPE_APP_USER tokens for role[{role}]"
            ),
        )),
        "service" if !claims.is_app() => Err((
            "28P01",
            format!(
                "Azure AD user token for role[{role}] is neither an AAD_AUTH_TOKENTYPE_APP_USER or an AAD_AUTH_TOKENTYPE_APP_OBO token."
            ),
        )),
        _ if mapping.object_id == oid => Ok(()),
        "service" => Err((
            "28P01",
            format!("Service Principal oid mismatch for role[{role}]."),
        )),
        _ => Err(refused()),
    }
}

/// Logs in to the backend as `role`, hands the client the backend's answers (with a
/// gateway-issued cancel key), then relays bytes both ways.
async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    mut client: S,
    params: Vec<(String, Bytes)>,
    role: &str,
    state: &State,
) -> Result<(), End> {
    let mut backend = state.config.backend.connect().await?;
    let forwarded = params
        .iter()
        .filter(|(k, _)| k != "user")
        .map(|(k, v)| (k.as_str(), &v[..]))
        .chain([("user", role.as_bytes())]);
    let forwarded: Vec<(&str, &[u8])> = forwarded.collect();
    backend.write_all(&startup_message(&forwarded)).await?;
    let mut issued_key = None;
    // The backend's login answers go to the client in one write (one TLS record).
    let mut answers = BytesMut::new();
    loop {
        let (tag, body) = read_message(&mut backend, 1 << 20).await?;
        match tag {
            b'K' if body.len() == 8 => {
                let mut real = body.clone();
                let real = (real.get_i32(), real.get_u32().to_be_bytes());
                // From the OS's CSPRNG, as PostgreSQL's own keys: no client may guess another's.
                let ours = loop {
                    let key = pgentra_wire::random_cancel_key()?;
                    let mut keys = state.cancel_keys.lock();
                    if let std::collections::hash_map::Entry::Vacant(entry) = keys.entry(key) {
                        entry.insert(real);
                        break key;
                    }
                };
                issued_key = Some(ours);
                answers.put_slice(&backend_key_data(ours.0, &ours.1));
            }
            b'R' if body.len() >= 4 && body[..4] != [0, 0, 0, 0] => {
                client
                    .write_all(&fatal(
                        "28000",
                        "the emulator's backend asked for a password; it must trust local connections",
                        None,
                    ))
                    .await?;
                return Ok(());
            }
            b'E' => {
                answers.put_slice(&message(tag, &body));
                client.write_all(&answers).await?;
                return Ok(());
            }
            _ => {
                answers.put_slice(&message(tag, &body));
                if tag == b'Z' {
                    break;
                }
            }
        }
    }
    // Counted before the client hears of it: whoever saw the login succeed sees it counted.
    state.counters.logins.fetch_add(1, Ordering::SeqCst);
    client.write_all(&answers).await?;
    client.flush().await?;
    let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
    if let Some(key) = issued_key {
        state.cancel_keys.lock().remove(&key);
    }
    Ok(())
}

/// Forwards a `CancelRequest` with the backend's real key, if the key is one we issued.
async fn cancel(state: &State, pid: i32, key: &[u8]) {
    let Ok(key) = <[u8; 4]>::try_from(key) else {
        return;
    };
    let Some((pid, key)) = state.cancel_keys.lock().get(&(pid, key)).copied() else {
        return;
    };
    if let Ok(mut backend) = state.config.backend.connect().await {
        let _ = backend.write_all(&cancel_request(pid, &key)).await;
        // The server closes the connection once it has read the request.
        let _ = backend.read(&mut [0; 1]).await;
    }
}
