//! One client session: the startup phase on the client's side, the upstream login, then the
//! byte relay.

use crate::upstream::{self, Login};
use crate::{InstanceState, Shared};
use pgentra_wire::{
    ErrorFields, MAX_STARTUP_PACKET, StartupPacket, TLS_HANDSHAKE_BYTE, WireError,
    cleartext_password_request, negotiation, parse_password, parse_startup_packet, read_message,
    read_startup_packet,
};
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// A client connection as accepted.
pub(crate) enum Client {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// A client connection after the encryption choice.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Largest password message a client may send for the local password.
const MAX_CLIENT_PASSWORD: usize = 1024;

/// What a client asked for in the startup phase.
enum Request {
    Login {
        client: Box<dyn Stream>,
        params: Vec<(String, String)>,
    },
    /// A cancel request (already handled) or a client that gave up.
    Done,
}

/// Why a session ended before the relay, for the log (the client has been told when it can).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("protocol error: {0}")]
    Wire(#[from] WireError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS handshake with the client failed: {0}")]
    ClientTls(std::io::Error),
    #[error("the client's login took longer than {0:?}")]
    LoginTimeout(std::time::Duration),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
}

/// Serves one client until its session ends. (The caller counts the connection.)
pub(crate) async fn serve(client: Client, state: &Arc<InstanceState>, shared: &Shared) {
    let limit = shared.config.login_timeout;
    let started = Instant::now();
    let login = tokio::time::timeout(limit, login(client, state, shared)).await;
    let session = match login {
        Ok(Ok(Some(session))) => session,
        Ok(Ok(None)) => return,
        Ok(Err(error)) => {
            tracing::debug!(%error, "client session ended before login");
            return;
        }
        Err(_) => {
            tracing::debug!(error = %SessionError::LoginTimeout(limit), "client dropped");
            shared.metrics.connection_refused("login_timeout");
            return;
        }
    };
    tracing::debug!(elapsed = ?started.elapsed(), "client logged in");
    upstream::relay(session, shared).await;
}

/// The startup phase and the upstream login. `None` when the session ended on purpose (a
/// cancel request, a refusal the client was told about).
async fn login(
    client: Client,
    state: &Arc<InstanceState>,
    shared: &Shared,
) -> Result<Option<Login>, SessionError> {
    let peer_user = match &client {
        Client::Unix(stream) => stream
            .peer_cred()
            .ok()
            .and_then(|cred| user_name(cred.uid())),
        Client::Tcp(_) => None,
    };
    let Request::Login { mut client, params } = startup(client, shared).await? else {
        return Ok(None);
    };
    let Some(permit) = shared.sessions.clone().try_acquire_owned().ok() else {
        return refuse(
            &mut client,
            shared,
            "max_connections",
            ErrorFields::fatal(
                "53300",
                "sorry, too many clients already",
                Some(&format!(
                    "The pgentra proxy allows {} sessions at once (--max-connections).",
                    shared.config.max_connections
                )),
            ),
        )
        .await;
    };
    if shared.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return refuse(
            &mut client,
            shared,
            "shutting_down",
            ErrorFields::fatal("57P03", "the pgentra proxy is shutting down", None),
        )
        .await;
    }
    if let Some(expected) = &shared.config.client_password {
        client.write_all(&cleartext_password_request()).await?;
        let (tag, body) = read_message(&mut client, MAX_CLIENT_PASSWORD).await?;
        let given = if tag == b'p' {
            parse_password(&body).unwrap_or_default()
        } else {
            ""
        };
        if !constant_time_eq(given.as_bytes(), expected.expose_secret().as_bytes()) {
            let user = param(&params, "user").unwrap_or_default();
            return refuse(
                &mut client,
                shared,
                "client_password",
                ErrorFields::fatal(
                    "28P01",
                    &format!("password authentication failed for user \"{user}\""),
                    Some("The pgentra proxy asks for its local client password."),
                ),
            )
            .await;
        }
    }
    let requested = param(&params, "user").filter(|user| {
        !user.is_empty()
            && !shared.local_users.iter().any(|local| local == user)
            && peer_user.as_deref() != Some(*user)
    });
    let role = state
        .instance
        .user
        .clone()
        .or_else(|| requested.map(str::to_owned));
    upstream::login(client, params, role, permit, state, shared).await
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// Sends a FATAL error, counts the refusal and ends the session.
pub(crate) async fn refuse(
    client: &mut Box<dyn Stream>,
    shared: &Shared,
    reason: &'static str,
    error: ErrorFields,
) -> Result<Option<Login>, SessionError> {
    shared.metrics.connection_refused(reason);
    tracing::info!(
        reason,
        message = error.get(b'M').unwrap_or_default(),
        "client refused"
    );
    client.write_all(&error.to_error_response()).await?;
    let _ = client.shutdown().await;
    Ok(None)
}

/// SSL and GSS negotiation, cancel requests and the startup message.
async fn startup(client: Client, shared: &Shared) -> Result<Request, SessionError> {
    let tls = shared
        .config
        .client_tls
        .clone()
        .map(tokio_rustls::TlsAcceptor::from);
    let (mut stream, is_tls): (Box<dyn Stream>, bool) = match client {
        Client::Tcp(tcp) => {
            // PostgreSQL 17's direct TLS starts with a ClientHello instead of an SSLRequest.
            let mut first = [0u8; 1];
            let direct =
                tls.is_some() && tcp.peek(&mut first).await? == 1 && first[0] == TLS_HANDSHAKE_BYTE;
            match (&tls, direct) {
                (Some(acceptor), true) => (
                    Box::new(
                        acceptor
                            .accept(tcp)
                            .await
                            .map_err(SessionError::ClientTls)?,
                    ),
                    true,
                ),
                _ => return plain_startup(tcp, tls, shared).await,
            }
        }
        // No TLS on Unix sockets, as PostgreSQL and PgBouncer.
        Client::Unix(unix) => (Box::new(unix), false),
    };
    encrypted_startup(&mut stream, is_tls, shared)
        .await
        .map(|params| match params {
            Some(params) => Request::Login {
                client: stream,
                params,
            },
            None => Request::Done,
        })
}

/// The startup phase on a TCP connection that has not started TLS.
async fn plain_startup(
    mut tcp: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: &Shared,
) -> Result<Request, SessionError> {
    loop {
        let packet = read_startup_packet(&mut tcp, MAX_STARTUP_PACKET).await?;
        match parse_startup_packet(&packet)? {
            StartupPacket::SslRequest => match &tls {
                Some(acceptor) => {
                    tcp.write_all(b"S").await?;
                    // Bytes the client sent after its SSLRequest, before our answer, are not
                    // a ClientHello, so the handshake fails on them (no plaintext injection).
                    let mut stream: Box<dyn Stream> = Box::new(
                        acceptor
                            .accept(tcp)
                            .await
                            .map_err(SessionError::ClientTls)?,
                    );
                    return Ok(match encrypted_startup(&mut stream, true, shared).await? {
                        Some(params) => Request::Login {
                            client: stream,
                            params,
                        },
                        None => Request::Done,
                    });
                }
                None => tcp.write_all(b"N").await?,
            },
            StartupPacket::GssEncRequest => tcp.write_all(b"N").await?,
            StartupPacket::CancelRequest { pid, key } => {
                upstream::cancel(shared, pid, &key).await;
                return Ok(Request::Done);
            }
            StartupPacket::Startup {
                minor_version,
                params,
            } => {
                let mut client: Box<dyn Stream> = Box::new(tcp);
                negotiate(&mut client, minor_version, &params).await?;
                return Ok(Request::Login { client, params });
            }
        }
    }
}

/// The startup phase once the encryption is settled (`tls`, or a Unix socket): GSS requests
/// are answered `N`; so are SSL requests on a Unix socket, while an SSL request inside TLS is
/// a confused or hostile client and ends the connection, as in PgBouncer.
async fn encrypted_startup(
    stream: &mut Box<dyn Stream>,
    tls: bool,
    shared: &Shared,
) -> Result<Option<Vec<(String, String)>>, SessionError> {
    loop {
        let packet = read_startup_packet(stream, MAX_STARTUP_PACKET).await?;
        match parse_startup_packet(&packet)? {
            StartupPacket::SslRequest if tls => {
                return Err(SessionError::Protocol("an SSLRequest inside TLS"));
            }
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                stream.write_all(b"N").await?;
            }
            StartupPacket::CancelRequest { pid, key } => {
                upstream::cancel(shared, pid, &key).await;
                return Ok(None);
            }
            StartupPacket::Startup {
                minor_version,
                params,
            } => {
                negotiate(stream, minor_version, &params).await?;
                return Ok(Some(params));
            }
        }
    }
}

/// Answers a request for protocol 3.1+ or for `_pq_.` options with NegotiateProtocolVersion:
/// the proxy speaks 3.0, whose 4-byte cancel keys it issues.
async fn negotiate(
    stream: &mut Box<dyn Stream>,
    minor_version: u16,
    params: &[(String, String)],
) -> Result<(), SessionError> {
    if let Some(answer) = negotiation(minor_version, params) {
        stream.write_all(&answer).await?;
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The names libpq sends as `user` when none is given: this process's user, from the
/// environment and from `/etc/passwd`.
pub(crate) fn local_user_names() -> Vec<String> {
    use std::os::unix::fs::MetadataExt as _;
    let own_uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    let mut names: Vec<String> = ["USER", "LOGNAME"]
        .into_iter()
        .filter_map(|var| std::env::var(var).ok())
        .chain(own_uid.and_then(user_name))
        .filter(|name| !name.is_empty())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The name of a user ID, from `/etc/passwd`.
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id: u32 = fields.nth(1)?.parse().ok()?;
        (id == uid).then(|| name.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_compare_in_full() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn this_process_user_is_a_local_name() {
        let names = local_user_names();
        assert!(!names.is_empty());
        assert_eq!(user_name(0).as_deref(), Some("root"));
    }
}
