//! The gateway: a PostgreSQL-protocol server on loopback that checks Entra tokens the way Azure
//! Database for PostgreSQL does, then relays the session to a real PostgreSQL as that role.
//!
//! Per connection:
//!
//! 1. Startup phase, bounded in size ([`MAX_STARTUP`]) and time (the login timeout):
//!    `SSLRequest` is answered `S` and TLS is negotiated with the emulator's certificate;
//!    `GSSENCRequest` is answered `N`; `CancelRequest` is forwarded to the backend with the real
//!    key. A `StartupMessage` over plain TCP is refused, as Azure's `require_secure_transport`
//!    does. Protocol 3.1+ requests get a `NegotiateProtocolVersion` for 3.0.
//! 2. `AuthenticationCleartextPassword`; the password message (up to 64 KiB) must be a token
//!    that verifies: signature by the emulator's key, issuer, audience, `nbf`/`exp` with a small
//!    skew, and a principal that may use the requested role (the role is registered for the
//!    token's `oid`, or is a group the principal belongs to). Failures get Azure's `FATAL`
//!    texts where they are known.
//! 3. A backend connection as the role (trust authentication on the cluster's Unix socket);
//!    `BackendKeyData` is replaced by a gateway-issued key, then bytes are relayed both ways.
//!
//! The token is checked at login only, so an open session outlives its token, as on Azure.

use crate::background::lock;
use crate::issuer::{Issuer, Principal, TokenRejection};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::oneshot;

/// Largest startup packet accepted (as PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP: usize = 10_000;
/// Largest password message accepted: a 64 KiB token and the framing.
pub const MAX_PASSWORD: usize = 64 * 1024 + 1;

const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;
const PROTOCOL_3_0: i32 = 196_608;

/// Who may log in as a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleGrant {
    /// The role of one principal (a user, service principal or managed identity), by object ID.
    Principal {
        /// The principal's object ID.
        oid: String,
        /// Whether it is an application (the role type `service`).
        app: bool,
    },
    /// A group role: its members log in with the group's name and their own tokens.
    Group {
        /// Object IDs of the members.
        members: Vec<String>,
    },
}

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
            Self::Tcp { host, port } => Box::new(TcpStream::connect((host.as_str(), *port)).await?),
        })
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
    /// Role name → who may use it.
    pub roles: HashMap<String, RoleGrant>,
    /// Where the PostgreSQL behind the gateway listens. It must trust the gateway's
    /// connections (the gateway has already checked the token).
    pub backend: BackendAddr,
    /// The loopback port to listen on (0: any free port).
    pub port: u16,
}

impl GatewayConfig {
    /// Registers each principal's role for its object ID.
    pub fn grant_principals<'a>(&mut self, principals: impl IntoIterator<Item = &'a Principal>) {
        for principal in principals {
            self.roles.insert(
                principal.role.clone(),
                RoleGrant::Principal {
                    oid: principal.oid.clone(),
                    app: principal.is_app(),
                },
            );
        }
    }
}

/// Counters of the gateway's work.
#[derive(Debug, Default)]
struct Counters {
    logins: AtomicU64,
    rejected: AtomicU64,
}

struct State {
    config: GatewayConfig,
    issuer: Arc<Issuer>,
    tls: tokio_rustls::TlsAcceptor,
    /// Gateway-issued (pid, key) → backend (pid, key).
    cancel_keys: Mutex<HashMap<(i32, i32), (i32, i32)>>,
    next_pid: AtomicI32,
    counters: Counters,
}

/// A running gateway; stopped when dropped.
pub struct Gateway {
    addr: SocketAddr,
    state: Arc<State>,
    _stop: oneshot::Sender<()>,
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
        let listener = std::net::TcpListener::bind(("127.0.0.1", config.port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            config,
            issuer,
            tls: tokio_rustls::TlsAcceptor::from(tls),
            cancel_keys: Mutex::new(HashMap::new()),
            next_pid: AtomicI32::new(10_000),
            counters: Counters::default(),
        });
        let serving = Arc::clone(&state);
        let stop = crate::background::run("pgentra-emulator-gateway", move || async move {
            if let Ok(listener) = tokio::net::TcpListener::from_std(listener) {
                accept_loop(listener, serving).await;
            }
        })?;
        Ok(Self {
            addr,
            state,
            _stop: stop,
        })
    }

    /// The loopback port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Successful logins so far.
    pub fn logins(&self) -> u64 {
        self.state.counters.logins.load(Ordering::Relaxed)
    }

    /// Refused logins so far (token or role rejected, or no TLS).
    pub fn rejected(&self) -> u64 {
        self.state.counters.rejected.load(Ordering::Relaxed)
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
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

/// A FATAL ErrorResponse.
fn error_response(code: &str, message: &str, hint: Option<&str>) -> Bytes {
    let mut fields = BytesMut::new();
    for (tag, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code),
        (b'M', message),
    ]
    .into_iter()
    .chain(hint.map(|h| (b'H', h)))
    {
        fields.put_u8(tag);
        fields.put_slice(value.as_bytes());
        fields.put_u8(0);
    }
    fields.put_u8(0);
    tagged(b'E', &fields)
}

fn tagged(tag: u8, body: &[u8]) -> Bytes {
    let mut message = BytesMut::with_capacity(body.len() + 5);
    message.put_u8(tag);
    message.put_i32(i32::try_from(body.len() + 4).unwrap_or(i32::MAX));
    message.put_slice(body);
    message.freeze()
}

/// Reads an untagged startup-phase packet: its code and body, within [`MAX_STARTUP`].
async fn read_startup<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(i32, Bytes), End> {
    let len = stream.read_i32().await?;
    let len = usize::try_from(len).map_err(|_| End::Protocol)?;
    if !(8..=MAX_STARTUP).contains(&len) {
        return Err(End::Protocol);
    }
    let mut body = vec![0; len - 4];
    stream.read_exact(&mut body).await?;
    let mut body = Bytes::from(body);
    let code = body.get_i32();
    Ok((code, body))
}

/// Reads a tagged message with a body of at most `max` bytes.
async fn read_tagged<S: AsyncRead + Unpin>(stream: &mut S, max: usize) -> Result<(u8, Bytes), End> {
    let tag = stream.read_u8().await?;
    let len = usize::try_from(stream.read_i32().await?).map_err(|_| End::Protocol)?;
    if len < 4 || len - 4 > max {
        return Err(End::Protocol);
    }
    let mut body = vec![0; len - 4];
    stream.read_exact(&mut body).await?;
    Ok((tag, Bytes::from(body)))
}

/// `key\0value\0...\0` startup parameters.
fn parameters(body: &[u8]) -> Result<Vec<(String, String)>, End> {
    // The list ends with an empty key, so a well-formed body ends with a NUL.
    if body.last() != Some(&0) {
        return Err(End::Protocol);
    }
    let mut strings = body
        .split(|b| *b == 0)
        .map(|s| String::from_utf8(s.to_vec()));
    let mut params = Vec::new();
    loop {
        let key = strings
            .next()
            .ok_or(End::Protocol)?
            .map_err(|_| End::Protocol)?;
        if key.is_empty() {
            return Ok(params);
        }
        let value = strings
            .next()
            .ok_or(End::Protocol)?
            .map_err(|_| End::Protocol)?;
        params.push((key, value));
    }
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
        let (code, body) = read_startup(stream).await?;
        match code {
            SSL_REQUEST => {
                stream.write_all(b"S").await?;
                return Ok(true);
            }
            GSSENC_REQUEST => stream.write_all(b"N").await?,
            CANCEL_REQUEST => {
                cancel(state, &body).await;
                return Ok(false);
            }
            _ => {
                // A login without TLS: refused like Azure's require_secure_transport.
                let params = parameters(&body).unwrap_or_default();
                let get = |k: &str| {
                    params
                        .iter()
                        .find(|(key, _)| key == k)
                        .map_or("", |(_, v)| v.as_str())
                };
                let message = format!(
                    "no pg_hba.conf entry for host \"{}\", user \"{}\", database \"{}\", no encryption",
                    peer.ip(),
                    get("user"),
                    get("database"),
                );
                state.counters.rejected.fetch_add(1, Ordering::Relaxed);
                let hint = Some("Connect with sslmode=verify-full (or require).");
                stream
                    .write_all(&error_response("28000", &message, hint))
                    .await?;
                return Ok(false);
            }
        }
    }
}

/// Startup message and password inside TLS. `None` when the client was refused (and told).
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    state: &State,
) -> Result<Option<(Vec<(String, String)>, String)>, End> {
    let (mut code, mut body) = read_startup(client).await?;
    while code == GSSENC_REQUEST || code == SSL_REQUEST {
        client.write_all(b"N").await?;
        (code, body) = read_startup(client).await?;
    }
    if code == CANCEL_REQUEST {
        // Clients that require TLS send their cancel requests inside it.
        cancel(state, &body).await;
        return Ok(None);
    }
    if code >> 16 != 3 {
        client
            .write_all(&error_response(
                "0A000",
                "unsupported frontend protocol",
                None,
            ))
            .await?;
        return Ok(None);
    }
    let params = parameters(&body)?;
    if code != PROTOCOL_3_0 {
        // NegotiateProtocolVersion: we speak 3.0 and know no protocol options.
        let unknown: Vec<&str> = params
            .iter()
            .filter(|(k, _)| k.starts_with("_pq_."))
            .map(|(k, _)| k.as_str())
            .collect();
        let mut body = BytesMut::new();
        body.put_i32(PROTOCOL_3_0);
        body.put_i32(i32::try_from(unknown.len()).unwrap_or(0));
        for option in unknown {
            body.put_slice(option.as_bytes());
            body.put_u8(0);
        }
        client.write_all(&tagged(b'v', &body)).await?;
    }
    let role = params
        .iter()
        .find(|(k, _)| k == "user")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    // AuthenticationCleartextPassword.
    client.write_all(&tagged(b'R', &3i32.to_be_bytes())).await?;
    let (tag, password) = read_tagged(client, MAX_PASSWORD).await?;
    if tag != b'p' {
        return Err(End::Protocol);
    }
    let token =
        String::from_utf8_lossy(password.strip_suffix(&[0]).unwrap_or(&password)).into_owned();
    match check(state, &token, &role) {
        Ok(()) => Ok(Some((params, role))),
        Err((code, message)) => {
            state.counters.rejected.fetch_add(1, Ordering::Relaxed);
            client
                .write_all(&error_response(code, &message, None))
                .await?;
            Ok(None)
        }
    }
}

/// Azure's checks, with its error texts where they are known.
fn check(state: &State, token: &str, role: &str) -> Result<(), (&'static str, String)> {
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
                _ => "An error occurred while validating the access token. Please acquire a new token and retry".to_owned(),
            };
            ("28P01", message)
        })?;
    let oid = claims.oid().unwrap_or_default();
    let allowed = match config.roles.get(role) {
        Some(RoleGrant::Principal { oid: owner, app }) => {
            if owner == oid {
                true
            } else if *app {
                return Err((
                    "28P01",
                    format!("Service Principal oid mismatch for role[{role}]."),
                ));
            } else {
                false
            }
        }
        Some(RoleGrant::Group { members }) => members.iter().any(|m| m == oid),
        None => false,
    };
    if allowed {
        Ok(())
    } else {
        Err((
            "28P01",
            format!("password authentication failed for user \"{role}\""),
        ))
    }
}

/// Logs in to the backend as `role`, hands the client the backend's answers (with a
/// gateway-issued cancel key), then relays bytes both ways.
async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    mut client: S,
    params: Vec<(String, String)>,
    role: &str,
    state: &State,
) -> Result<(), End> {
    let mut backend = state.config.backend.connect().await?;
    let forwarded = params
        .iter()
        .filter(|(k, _)| k != "user")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain([("user", role)]);
    let mut startup = BytesMut::new();
    postgres_protocol::message::frontend::startup_message(forwarded, &mut startup)?;
    backend.write_all(&startup).await?;
    let mut issued_key = None;
    loop {
        let (tag, body) = read_tagged(&mut backend, 1 << 20).await?;
        match tag {
            b'K' if body.len() >= 8 => {
                let mut real = body.clone();
                let real = (real.get_i32(), real.get_i32());
                let ours = (
                    state.next_pid.fetch_add(1, Ordering::Relaxed),
                    fastrand::i32(..),
                );
                lock(&state.cancel_keys).insert(ours, real);
                issued_key = Some(ours);
                let mut key = BytesMut::new();
                key.put_i32(ours.0);
                key.put_i32(ours.1);
                client.write_all(&tagged(b'K', &key)).await?;
            }
            b'R' if body.len() >= 4 && body[..4] != [0, 0, 0, 0] => {
                client
                    .write_all(&error_response(
                        "28000",
                        "the emulator's backend asked for a password; it must trust local connections",
                        None,
                    ))
                    .await?;
                return Ok(());
            }
            b'E' => {
                client.write_all(&tagged(tag, &body)).await?;
                return Ok(());
            }
            _ => {
                client.write_all(&tagged(tag, &body)).await?;
                if tag == b'Z' {
                    break;
                }
            }
        }
    }
    state.counters.logins.fetch_add(1, Ordering::Relaxed);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
    if let Some(key) = issued_key {
        lock(&state.cancel_keys).remove(&key);
    }
    Ok(())
}

/// Forwards a `CancelRequest` with the backend's real key, if the key is one we issued.
async fn cancel(state: &State, body: &[u8]) {
    let mut body = body;
    if body.len() < 8 {
        return;
    }
    let ours = (body.get_i32(), body.get_i32());
    let Some((pid, key)) = lock(&state.cancel_keys).get(&ours).copied() else {
        return;
    };
    let mut request = BytesMut::new();
    postgres_protocol::message::frontend::cancel_request(pid, key, &mut request);
    if let Ok(mut backend) = state.config.backend.connect().await {
        let _ = backend.write_all(&request).await;
        // The server closes the connection once it has read the request.
        let _ = backend.read(&mut [0; 1]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_parsed_totally() {
        assert_eq!(
            parameters(b"user\0alice\0database\0db\0\0").unwrap(),
            vec![
                ("user".into(), "alice".into()),
                ("database".into(), "db".into())
            ]
        );
        for garbage in [&b""[..], b"user", b"user\0", b"user\0alice", b"\xff\0x\0\0"] {
            assert!(parameters(garbage).is_err(), "{garbage:?}");
        }
    }

    #[test]
    fn error_responses_are_well_formed() {
        let message = error_response("28P01", "bad", Some("hint"));
        assert_eq!(message[0], b'E');
        let len = i32::from_be_bytes(message[1..5].try_into().unwrap()) as usize;
        assert_eq!(len + 1, message.len());
        assert!(message.ends_with(b"Hhint\0\0"));
    }
}
