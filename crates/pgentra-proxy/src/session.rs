//! One client connection through the proxy's stages, in order: the startup phase, the local
//! password, a session slot, the role, the token and the upstream login (all within the login
//! timeout), the welcome, the relay. This is the one place that tells a client it is refused.

use crate::cancel::{self, CancelTarget};
use crate::refusal::Refusal;
use crate::relay;
use crate::server::{self, LoginError, ServerConn};
use crate::shared::{InstanceState, Shared};
use crate::startup::{self, ClientConn, Request, StartupError};
use bytes::{BufMut, BytesMut};
use pgentra_wire::{backend_key_data, message, param};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, TryAcquireError};
use tokio::time::{Instant, timeout, timeout_at};

/// How long a refused client gets to take its `FATAL` before the connection closes.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// A logged-in session, ready to relay.
struct Session {
    server: ServerConn,
    key: cancel::Key,
    _slot: OwnedSemaphorePermit,
}

/// Serves one client connection until it ends. (The caller counts the connection.)
pub(crate) async fn serve(
    mut conn: ClientConn,
    pending: OwnedSemaphorePermit,
    instance: Arc<InstanceState>,
    shared: Arc<Shared>,
) {
    let deadline = Instant::now() + shared.config.login_timeout;
    match login(&mut conn, pending, &instance, &shared, deadline).await {
        Ok(Some(mut session)) => {
            let mut client = conn.into_stream();
            let relayed = relay::relay(
                &mut client,
                &mut session.server.stream,
                shared.kill.subscribe(),
            )
            .await;
            shared.metrics.bytes(relayed.to_server, relayed.to_client);
            shared.cancel_keys.forget(&session.key);
        }
        Ok(None) => {}
        Err(StartupError::Refuse(refusal)) => refuse(&mut conn, &shared, refusal).await,
        Err(StartupError::Gone(reason)) => {
            tracing::debug!(reason, "client connection ended before its login");
        }
    }
}

/// Refuses a client that found no free startup slot, without reading from it (a client is
/// told right away; it reads the `FATAL` in answer to its first packet).
pub(crate) async fn refuse_pending(conn: ClientConn, shared: &Shared, error: TryAcquireError) {
    let mut conn = conn;
    let refusal = match error {
        TryAcquireError::NoPermits => Refusal::TooManyLogins {
            limit: shared.config.pending_logins(),
        },
        TryAcquireError::Closed => Refusal::ShuttingDown,
    };
    refuse(&mut conn, shared, refusal).await;
}

/// Tells the client why, counts it, and closes.
async fn refuse(conn: &mut ClientConn, shared: &Shared, refusal: Refusal) {
    shared.metrics.refused(refusal.reason());
    if refusal.is_login_failure() {
        shared.metrics.login_failed();
    }
    let fields = refusal.fields();
    tracing::info!(
        reason = refusal.reason().label(),
        message = fields.get(b'M').unwrap_or_default(),
        "client refused"
    );
    let response = fields.to_error_response();
    let stream = conn.stream();
    let _ = timeout(REFUSAL_WRITE_TIMEOUT, async {
        stream.write_all(&response).await?;
        stream.flush().await?;
        stream.shutdown().await
    })
    .await;
}

/// The stages up to the welcome. `None` when the connection was a cancel request.
async fn login(
    conn: &mut ClientConn,
    pending: OwnedSemaphorePermit,
    instance: &Arc<InstanceState>,
    shared: &Shared,
    deadline: Instant,
) -> Result<Option<Session>, StartupError> {
    let limit = shared.config.login_timeout;
    let late = || StartupError::Refuse(Refusal::StartupTimeout(limit));
    let request = timeout_at(
        deadline,
        startup::negotiate(conn, shared.client_tls.as_ref()),
    )
    .await
    .map_err(|_| late())??;
    let params = match request {
        Request::Cancel { pid, key } => {
            shared.metrics.cancel_request();
            cancel::forward(
                &shared.cancel_keys,
                pid,
                &key,
                shared.config.connect_timeout,
            )
            .await;
            return Ok(None);
        }
        Request::Login { params, .. } => params,
    };
    let user = param(&params, "user");
    if let Some(gate) = &shared.password {
        let user = user.unwrap_or_default();
        timeout_at(deadline, gate.check(conn.stream(), user))
            .await
            .map_err(|_| late())??;
    }
    // Authenticated: from here on the client holds a session slot, not a startup one.
    if shared.is_draining() {
        return Err(StartupError::Refuse(Refusal::ShuttingDown));
    }
    let slot = shared.sessions.clone().try_acquire_owned().map_err(|_| {
        StartupError::Refuse(Refusal::TooManyClients {
            limit: shared.config.max_connections,
        })
    })?;
    drop(pending);

    let chosen = (instance.instance.user.as_deref())
        .or_else(|| instance.instance.client_roles.pick(user))
        .map(str::to_owned);
    if chosen.is_none() && user.is_some_and(|u| !u.is_empty()) {
        tracing::debug!(
            user,
            "the client's user name is not a role it may pick (--client-roles): the token's role is used"
        );
    }
    let creds = match timeout_at(deadline, shared.auth.credentials()).await {
        Err(_) => return Err(StartupError::Refuse(Refusal::TokenTimeout(limit))),
        Ok(Err(error)) => return Err(StartupError::Refuse(Refusal::Token(error))),
        Ok(Ok(creds)) => creds,
    };
    let role = chosen.unwrap_or_else(|| creds.user().to_owned());
    let database = instance.instance.upstream.dbname.as_deref();
    let startup = server::startup(&role, database, &params)
        .map_err(|len| StartupError::Refuse(Refusal::ForwardedStartupTooLong { len }))?;
    let target = &instance.target;
    let started = std::time::Instant::now();
    let login = server::login(
        target,
        shared.config.connect_timeout,
        &startup,
        creds.password(),
    );
    let server = match timeout_at(deadline, login).await {
        Ok(Ok(server)) => server,
        Ok(Err(error)) => {
            let refusal = match error {
                LoginError::Connect(error) => Refusal::ServerUnreachable {
                    upstream: target.name.clone(),
                    error: error.to_string(),
                },
                LoginError::AuthMethod(method) => Refusal::ServerAuthMethod { method, role },
                LoginError::Refused(mut fields) => {
                    tracing::warn!(
                        upstream = %target.name,
                        role,
                        message = fields.get(b'M').unwrap_or_default(),
                        "upstream login failed"
                    );
                    if fields.get(b'H').is_none() {
                        fields.set(
                            b'H',
                            format!(
                                "The pgentra proxy logged in as role \"{role}\" with a token from {}. Run `pgentra check` to diagnose.",
                                creds.credential()
                            ),
                        );
                    }
                    Refusal::ServerRefused(fields)
                }
                LoginError::Broke(what) => Refusal::ServerBroke {
                    upstream: target.name.clone(),
                    what,
                },
            };
            return Err(StartupError::Refuse(refusal));
        }
        Err(_) => {
            return Err(StartupError::Refuse(Refusal::ServerTimeout {
                upstream: target.name.clone(),
                limit,
            }));
        }
    };
    let key = shared
        .cancel_keys
        .issue(CancelTarget {
            target: Arc::clone(target),
            key: server.key,
        })
        .map_err(|error| {
            StartupError::Refuse(Refusal::Internal(format!(
                "the operating system gave no random bytes for a cancel key: {error}"
            )))
        })?;
    // The server's answers, the proxy's key and ReadyForQuery in one write.
    let mut welcome = BytesMut::with_capacity(server.welcome.len() + 32);
    welcome.put_slice(&server.welcome);
    welcome.put_slice(&backend_key_data(key.0, &key.1));
    welcome.put_slice(&message(b'Z', b"I"));
    let sent = async {
        conn.stream().write_all(&welcome).await?;
        conn.stream().flush().await
    };
    if let Err(error) = sent.await {
        shared.cancel_keys.forget(&key);
        return Err(StartupError::Gone(format!(
            "writing to the client: {error}"
        )));
    }
    shared.metrics.login_succeeded(started.elapsed());
    tracing::info!(
        upstream = %target.name,
        role,
        database = param(&params, "database").unwrap_or_default(),
        "session logged in"
    );
    Ok(Some(Session {
        server,
        key,
        _slot: slot,
    }))
}
