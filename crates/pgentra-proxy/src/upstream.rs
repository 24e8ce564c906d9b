//! The upstream side: verified TLS to the server, the token login, cancel forwarding and the
//! relay.

use crate::session::{SessionError, Stream, refuse};
use crate::{CancelKey, Instance, InstanceState, ProxyError, Shared};
use bytes::Bytes;
use pgentra::Secret;
use pgentra_wire::{
    ErrorFields, WireError, backend_key_data, cancel_request, message, read_message, ssl_request,
    startup_message,
};
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::client::TlsStream;

/// Largest server message read during login (`ParameterStatus`, notices, errors).
const MAX_LOGIN_MESSAGE: usize = 1 << 20;

/// The upstream's cancel key for a session, and which server it belongs to.
#[derive(Clone)]
pub(crate) struct UpstreamKey {
    state: Arc<InstanceState>,
    pid: i32,
    key: Vec<u8>,
}

/// A logged-in session, ready to relay.
pub(crate) struct Login {
    client: Box<dyn Stream>,
    upstream: TlsStream<TcpStream>,
    cancel_key: Option<CancelKey>,
    _permit: OwnedSemaphorePermit,
}

pub(crate) fn instance_state(instance: Instance) -> Result<InstanceState, ProxyError> {
    let host = instance
        .upstream
        .host
        .clone()
        .ok_or_else(|| ProxyError::Config("an upstream without a host".into()))?;
    let config = instance.upstream.tls_options().client_config()?;
    let server_name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|_| ProxyError::Config(format!("{host} is not a valid server name")))?;
    Ok(InstanceState {
        instance,
        tls: tokio_rustls::TlsConnector::from(config),
        server_name,
    })
}

/// TCP and verified TLS to the upstream server, within the connect timeout.
async fn connect(
    state: &InstanceState,
    shared: &Shared,
) -> Result<TlsStream<TcpStream>, std::io::Error> {
    let (host, port) = state.instance.upstream_addr();
    let limit = shared.config.connect_timeout;
    let attempt = async {
        let mut tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        // Dead peers must not leave sessions open forever.
        socket2::SockRef::from(&tcp).set_tcp_keepalive(&crate::keepalive())?;
        tcp.write_all(&ssl_request()).await?;
        if tcp.read_u8().await? != b'S' {
            return Err(std::io::Error::other(
                "the server does not accept TLS, and the token must not travel in clear text",
            ));
        }
        state.tls.connect(state.server_name.clone(), tcp).await
    };
    tokio::time::timeout(limit, attempt).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no TLS connection within {limit:?}"),
        )
    })?
}

/// The server's next login message, after answering its password request with the token.
async fn next_login_message(
    upstream: &mut TlsStream<TcpStream>,
    token: &Secret,
) -> Result<(u8, Bytes), WireError> {
    loop {
        let (tag, body) = read_message(upstream, MAX_LOGIN_MESSAGE).await?;
        if tag == b'R' && body.get(..4) == Some(&[0, 0, 0, 3]) {
            let mut password = Vec::with_capacity(token.expose_secret().len() + 1);
            password.extend_from_slice(token.expose_secret().as_bytes());
            password.push(0);
            upstream.write_all(&message(b'p', &password)).await?;
            continue;
        }
        return Ok((tag, body));
    }
}

/// The authentication method of an `AuthenticationRequest` other than OK and cleartext.
fn other_auth_method(tag: u8, body: &[u8]) -> Option<i32> {
    let method = i32::from_be_bytes(body.get(..4)?.try_into().ok()?);
    (tag == b'R' && method != 0).then_some(method)
}

/// Logs in upstream as the chosen role (or the token's) with a fresh token, and hands the
/// client the server's answers with a proxy-issued cancel key.
pub(crate) async fn login(
    mut client: Box<dyn Stream>,
    params: Vec<(String, String)>,
    role: Option<String>,
    permit: OwnedSemaphorePermit,
    state: &Arc<InstanceState>,
    shared: &Shared,
) -> Result<Option<Login>, SessionError> {
    let started = Instant::now();
    let creds = match shared.auth.credentials().await {
        Ok(creds) => creds,
        Err(error) => {
            shared.metrics.login_failed();
            return refuse(
                &mut client,
                shared,
                "token",
                ErrorFields::fatal(
                    "08001",
                    &format!("the pgentra proxy could not get an Entra ID token: {error}"),
                    Some(
                        "Run `pgentra whoami` where the proxy runs to see which credential fails.",
                    ),
                ),
            )
            .await;
        }
    };
    let role = role.unwrap_or_else(|| creds.user().to_owned());
    let mut upstream = match connect(state, shared).await {
        Ok(upstream) => upstream,
        Err(error) => {
            shared.metrics.login_failed();
            return refuse(
                &mut client,
                shared,
                "upstream_connect",
                ErrorFields::fatal(
                    "08001",
                    &format!(
                        "the pgentra proxy could not reach {}: {error}",
                        state.instance.upstream_name()
                    ),
                    Some("Run `pgentra check` against the server to find the failing step."),
                ),
            )
            .await;
        }
    };
    let database = state.instance.upstream.dbname.as_deref();
    let forwarded: Vec<(&str, &str)> = [("user", role.as_str())]
        .into_iter()
        .chain(database.map(|db| ("database", db)))
        .chain(
            params
                .iter()
                .filter(|(key, _)| {
                    key != "user"
                        && !key.starts_with("_pq_.")
                        && !(key == "database" && database.is_some())
                })
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .collect();
    upstream.write_all(&startup_message(&forwarded)).await?;
    let mut cancel_key = None;
    loop {
        let (tag, body) = next_login_message(&mut upstream, creds.password()).await?;
        if let Some(method) = other_auth_method(tag, &body) {
            shared.metrics.login_failed();
            return refuse(
                &mut client,
                shared,
                "upstream_auth",
                ErrorFields::fatal(
                    "28000",
                    &format!(
                        "the server asked for authentication method {method}, not a password: role \"{role}\" does not log in with Entra ID"
                    ),
                    Some("Use a role created with pgaadauth_create_principal, or check the server's authentication settings."),
                ),
            )
            .await;
        }
        match tag {
            b'E' => {
                shared.metrics.login_failed();
                let mut error = ErrorFields::parse(&body).unwrap_or_else(|_| {
                    ErrorFields::fatal("08P01", "the server sent a malformed error", None)
                });
                if error.get(b'H').is_none() {
                    error.set(
                        b'H',
                        format!(
                            "The pgentra proxy logged in as role \"{role}\" with a token from {}. Run `pgentra check` to diagnose.",
                            creds.credential()
                        ),
                    );
                }
                tracing::warn!(
                    upstream = %state.instance.upstream_name(),
                    role,
                    message = error.get(b'M').unwrap_or_default(),
                    "upstream login failed"
                );
                shared.metrics.connection_refused("upstream_login");
                client.write_all(&error.to_error_response()).await?;
                let _ = client.shutdown().await;
                return Ok(None);
            }
            b'K' if body.len() >= 8 => {
                let ours = shared.issue_cancel_key(UpstreamKey {
                    state: Arc::clone(state),
                    pid: i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                    key: body[4..].to_vec(),
                })?;
                client.write_all(&backend_key_data(ours.0, &ours.1)).await?;
                cancel_key = Some(ours);
            }
            b'Z' => {
                client.write_all(&message(tag, &body)).await?;
                break;
            }
            // AuthenticationOk, ParameterStatus, NoticeResponse: exactly what the server said.
            _ => client.write_all(&message(tag, &body)).await?,
        }
    }
    shared.metrics.login_succeeded(started.elapsed());
    tracing::info!(
        upstream = %state.instance.upstream_name(),
        role,
        database = params.iter().find(|(k, _)| k == "database").map(|(_, v)| v.as_str()).unwrap_or_default(),
        "session logged in"
    );
    Ok(Some(Login {
        client,
        upstream,
        cancel_key,
        _permit: permit,
    }))
}

/// Copies bytes both ways until either side closes (then both are closed, so a client that
/// sent Terminate, or a server that ended the session, frees the slot at once), or the drain
/// timeout ends the proxy.
pub(crate) async fn relay(mut login: Login, shared: &Shared) {
    let mut kill = shared.kill.subscribe();
    let (mut to_upstream, mut to_client) = (0, 0);
    {
        let (mut client_read, mut client_write) = tokio::io::split(&mut login.client);
        let (mut upstream_read, mut upstream_write) = tokio::io::split(&mut login.upstream);
        tokio::select! {
            _ = pipe(&mut client_read, &mut upstream_write, &mut to_upstream) => {}
            _ = pipe(&mut upstream_read, &mut client_write, &mut to_client) => {}
            _ = kill.wait_for(|kill| *kill) => {}
        }
    }
    shared.metrics.bytes(to_upstream, to_client);
    if let Some(key) = login.cancel_key {
        shared.forget_cancel_key(&key);
    }
}

/// Copies `from` to `to` until `from` ends (then shuts `to` down), counting bytes.
async fn pipe<R, W>(from: &mut R, to: &mut W, count: &mut u64) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buffer = vec![0; RELAY_BUFFER];
    loop {
        let n = from.read(&mut buffer).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buffer[..n]).await?;
        // TLS buffers records until flushed.
        to.flush().await?;
        *count += n as u64;
    }
}

/// Relay buffer per direction: small, since idle sessions are the common case and the kernel
/// buffers the rest.
const RELAY_BUFFER: usize = 4096;

/// Forwards a cancel request for a proxy-issued key to the server, over a new TLS connection
/// with the real key. Unknown keys are ignored, as PostgreSQL does.
pub(crate) async fn cancel(shared: &Shared, pid: i32, key: &[u8]) {
    shared.metrics.cancel_request();
    let Ok(key): Result<[u8; 4], _> = key.try_into() else {
        return;
    };
    let Some(target) = shared.cancel_target(&(pid, key)) else {
        tracing::debug!("cancel request with an unknown key ignored");
        return;
    };
    match connect(&target.state, shared).await {
        Ok(mut upstream) => {
            let _ = upstream
                .write_all(&cancel_request(target.pid, &target.key))
                .await;
            let _ = upstream.flush().await;
            // The server closes the connection once it has read the request.
            let _ = upstream.read(&mut [0; 1]).await;
        }
        Err(error) => tracing::warn!(%error, "could not forward a cancel request"),
    }
}

/// Gets a token and logs in to the instance's server once (`--check`).
pub(crate) async fn check(shared: &Shared, state: &InstanceState) -> Result<(), ProxyError> {
    let fail = |message: String| ProxyError::Check {
        upstream: state.instance.upstream_name(),
        message,
    };
    let creds = shared.auth.credentials().await?;
    let role = state
        .instance
        .user
        .clone()
        .unwrap_or_else(|| creds.user().to_owned());
    let mut upstream = connect(state, shared)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let database = state
        .instance
        .upstream
        .dbname
        .as_deref()
        .unwrap_or("postgres");
    upstream
        .write_all(&startup_message(&[("user", &role), ("database", database)]))
        .await
        .map_err(|e| fail(e.to_string()))?;
    loop {
        let (tag, body) = next_login_message(&mut upstream, creds.password())
            .await
            .map_err(|e| fail(e.to_string()))?;
        if let Some(method) = other_auth_method(tag, &body) {
            return Err(fail(format!(
                "the server asked for authentication method {method}, not a password"
            )));
        }
        match tag {
            b'E' => {
                let error = ErrorFields::parse(&body).unwrap_or_default();
                return Err(fail(format!(
                    "logging in as \"{role}\": {}",
                    error.get(b'M').unwrap_or("an unreadable error")
                )));
            }
            b'Z' => break,
            _ => {}
        }
    }
    let _ = upstream.write_all(&message(b'X', &[])).await;
    tracing::info!(upstream = %state.instance.upstream_name(), role, "connection test passed");
    Ok(())
}
