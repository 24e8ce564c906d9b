//! One client connection through the proxy's stages, in order: the startup phase, the local
//! password, a session slot, the role, a server connection (a pooled one, or a login with a
//! token, all within the login timeout), the welcome, the relay (of bytes, of a session, or of
//! transactions), and the release of the server connection. This is the one place that tells a
//! client it is refused.

use crate::cancel;
use crate::config::PoolMode;
use crate::lease::{self, Lease, Reset};
use crate::pool::{Pool, PoolKey, Pooled};
use crate::refusal::Refusal;
use crate::relay;
use crate::server::{self, ServerConn};
use crate::shared::{InstanceState, Shared};
use crate::startup::{self, ClientConn, Request, StartupError, Stream};
use crate::transaction::{self, Transactions};
use bytes::{BufMut, Bytes, BytesMut};
use pgentra_wire::{backend_key_data, message, param};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, TryAcquireError};
use tokio::time::{Instant, timeout, timeout_at};

/// How long a refused client gets to take its `FATAL` before the connection closes.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// A logged-in session, ready to relay.
enum Session {
    /// A server connection of its own (pool mode `none`, or a replication connection).
    Dedicated {
        server: Box<ServerConn>,
        key: cancel::Key,
    },
    /// A pooled server connection for the whole session, which goes back to `pool`
    /// afterwards.
    Pooled {
        conn: Box<Pooled>,
        pool: Arc<Pool>,
        key: cancel::Key,
        /// The client's values of the tracked parameters.
        tracked: Vec<(&'static str, Bytes)>,
    },
    /// Server connections of `pool`, one per transaction.
    Transactions {
        pool: Arc<Pool>,
        key: cancel::Key,
        tracked: Vec<(&'static str, Bytes)>,
    },
}

/// Serves one client connection until it ends. (The caller counts the connection.)
pub(crate) async fn serve(
    mut conn: ClientConn,
    pending: OwnedSemaphorePermit,
    instance: Arc<InstanceState>,
    shared: Arc<Shared>,
) {
    let deadline = Instant::now() + shared.config.login_timeout;
    let (session, _slot) = match login(&mut conn, pending, &instance, &shared, deadline).await {
        Ok(Some(logged_in)) => logged_in,
        Ok(None) => return,
        Err(StartupError::Refuse(refusal)) => {
            return refuse(conn.stream(), &shared, refusal).await;
        }
        Err(StartupError::Gone(reason)) => {
            tracing::debug!(reason, "client connection ended before its login");
            return;
        }
    };
    let mut client = conn.into_stream();
    let kill = shared.kill.subscribe();
    match session {
        Session::Dedicated { mut server, key } => {
            let relayed = relay::relay(&mut client, &mut server.stream, kill).await;
            shared.metrics.bytes(relayed.to_server, relayed.to_client);
            shared.cancel_keys.forget(&key);
        }
        Session::Pooled {
            mut conn,
            pool,
            key,
            tracked,
        } => {
            let server = &mut conn.server;
            let end =
                relay::relay_session(&mut client, &mut server.stream, &mut server.params, kill)
                    .await;
            shared
                .metrics
                .bytes(end.relayed.to_server, end.relayed.to_client);
            shared.cancel_keys.forget(&key);
            drop(client);
            lease::give_back(
                *conn,
                &pool,
                end.ending,
                end.status,
                &tracked,
                Reset::Configured,
                &instance,
                &shared,
            )
            .await;
            pool.stats.clients.fetch_sub(1, Ordering::Relaxed);
        }
        Session::Transactions { pool, key, tracked } => {
            let session = Transactions {
                shared: &shared,
                instance: &instance,
                pool: Arc::clone(&pool),
                key,
                tracked,
            };
            let end = transaction::relay(&mut client, session, kill).await;
            shared
                .metrics
                .bytes(end.relayed.to_server, end.relayed.to_client);
            shared.cancel_keys.forget(&key);
            pool.stats.clients.fetch_sub(1, Ordering::Relaxed);
            if let Some(refusal) = end.refusal {
                refuse(&mut client, &shared, refusal).await;
            }
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
    refuse(conn.stream(), shared, refusal).await;
}

/// Tells the client why, counts it, and closes.
async fn refuse(stream: &mut Box<dyn Stream>, shared: &Shared, refusal: Refusal) {
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
    let _ = timeout(REFUSAL_WRITE_TIMEOUT, async {
        stream.write_all(&response).await?;
        stream.flush().await?;
        stream.shutdown().await
    })
    .await;
}

fn refused(refusal: Refusal) -> StartupError {
    StartupError::Refuse(refusal)
}

/// The stages up to the welcome: the session and its slot, or `None` when the connection was
/// a cancel request.
async fn login(
    conn: &mut ClientConn,
    pending: OwnedSemaphorePermit,
    instance: &Arc<InstanceState>,
    shared: &Shared,
    deadline: Instant,
) -> Result<Option<(Session, OwnedSemaphorePermit)>, StartupError> {
    let limit = shared.config.login_timeout;
    let late = || refused(Refusal::StartupTimeout(limit));
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
        return Err(refused(Refusal::ShuttingDown));
    }
    let slot = shared.sessions.clone().try_acquire_owned().map_err(|_| {
        refused(Refusal::TooManyClients {
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
    let mut lease = Lease::new(shared, instance, deadline);
    let role = match chosen {
        Some(role) => role,
        None => lease.creds().await?.user().to_owned(),
    };
    let replication = param(&params, "replication").is_some_and(|r| r != "false" && r != "off");
    let mode = match shared.config.pool.mode {
        _ if replication => PoolMode::None,
        mode => mode,
    };
    let session = match mode {
        PoolMode::None => dedicated(&mut lease, conn, &role, &params).await?,
        mode => pooled(&mut lease, conn, &role, &params, mode).await?,
    };
    tracing::info!(
        upstream = %instance.target.name,
        role,
        database = param(&params, "database").unwrap_or_default(),
        mode = mode.as_str(),
        "session logged in"
    );
    Ok(Some((session, slot)))
}

/// A server connection of the client's own, and the server's answers as the welcome.
async fn dedicated(
    lease: &mut Lease<'_>,
    conn: &mut ClientConn,
    role: &str,
    params: &[(String, Bytes)],
) -> Result<Session, StartupError> {
    let database = lease.instance.instance.upstream.dbname.as_deref();
    let startup = server::startup(role, database, params)
        .map_err(|len| refused(Refusal::ForwardedStartupTooLong { len }))?;
    let server = lease.open(role, &startup).await?;
    let key = lease.issue_key(Some(&server))?;
    let welcome = welcome(&server.welcome, key);
    if let Err(error) = send(conn, &welcome).await {
        lease.shared.cancel_keys.forget(&key);
        return Err(error);
    }
    Ok(Session::Dedicated {
        server: Box::new(server),
        key,
    })
}

/// A pooled server connection: an idle one, or a new one, or one freed while waiting; set to
/// the client's tracked parameters; and a welcome made from its state. In transaction pooling
/// the connection goes back to the pool right after the welcome (taking one proves the pool
/// can log in, and checks the client's parameters as PostgreSQL would at its login).
async fn pooled(
    lease: &mut Lease<'_>,
    conn: &mut ClientConn,
    role: &str,
    params: &[(String, Bytes)],
    mode: PoolMode,
) -> Result<Session, StartupError> {
    let upstream = &lease.instance.instance.upstream;
    let database = upstream
        .dbname
        .clone()
        .or_else(|| param(params, "database").map(str::to_owned))
        .unwrap_or_else(|| role.to_owned());
    let mut tracked = Vec::new();
    let mut shaping: Vec<(String, Bytes)> = Vec::new();
    for (name, value) in params {
        if name == "user" || name == "database" || name.starts_with("_pq_.") {
            continue;
        }
        match crate::tracked::tracked(name) {
            Some(server_name) => tracked.push((server_name, value.clone())),
            None => shaping.push((name.clone(), value.clone())),
        }
    }
    shaping.sort();
    let key = PoolKey {
        role: role.to_owned(),
        database,
        params: shaping,
    };
    let pool = lease.instance.pools.pool(&key);
    let server_conn = lease.checkout(&pool, &key).await?;
    let server_conn = lease.set_tracked(server_conn, &pool, &tracked).await?;
    let per_transaction = mode == PoolMode::Transaction;
    let key = lease.issue_key((!per_transaction).then_some(&server_conn.server))?;
    let mut answers = BytesMut::new();
    answers.put_slice(&message(b'R', &0i32.to_be_bytes()));
    answers.put_slice(&server_conn.server.params.messages());
    let welcome = welcome(&answers, key);
    if per_transaction {
        pool.put(*server_conn);
        if let Err(error) = send(conn, &welcome).await {
            lease.shared.cancel_keys.forget(&key);
            return Err(error);
        }
        pool.stats.clients.fetch_add(1, Ordering::Relaxed);
        return Ok(Session::Transactions { pool, key, tracked });
    }
    if let Err(error) = send(conn, &welcome).await {
        lease.shared.cancel_keys.forget(&key);
        pool.put(*server_conn);
        return Err(error);
    }
    pool.stats.active.fetch_add(1, Ordering::Relaxed);
    pool.stats.clients.fetch_add(1, Ordering::Relaxed);
    Ok(Session::Pooled {
        conn: server_conn,
        pool,
        key,
        tracked,
    })
}

/// `answers`, the proxy's cancel key and `ReadyForQuery`, in one buffer.
fn welcome(answers: &[u8], key: cancel::Key) -> BytesMut {
    let mut welcome = BytesMut::with_capacity(answers.len() + 32);
    welcome.put_slice(answers);
    welcome.put_slice(&backend_key_data(key.0, &key.1));
    welcome.put_slice(&message(b'Z', b"I"));
    welcome
}

async fn send(conn: &mut ClientConn, bytes: &[u8]) -> Result<(), StartupError> {
    let sent = async {
        conn.stream().write_all(bytes).await?;
        conn.stream().flush().await
    };
    sent.await
        .map_err(|error| StartupError::Gone(format!("writing to the client: {error}")))
}
