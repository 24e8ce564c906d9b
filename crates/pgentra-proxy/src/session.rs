//! One client connection through the proxy's stages, in order: the startup phase, the local
//! password, a session slot, the role, a server connection (a pooled one, or a login with a
//! token, all within the login timeout; for a client its pool can welcome, with its first
//! message instead), the welcome, the relay (of bytes, of a session, or of transactions), and
//! the release of the server connection. This is the one place that tells a client it is
//! refused.

use crate::cancel;
use crate::config::PoolMode;
use crate::lease::{self, Lease, Reset};
use crate::pool::{Pool, PoolKey, Pooled};
use crate::refusal::Refusal;
use crate::relay::{self, Ending};
use crate::server::{self, ServerConn};
use crate::shared::{InstanceState, Shared};
use crate::startup::{self, ClientConn, Request, StartupError, Stream};
use crate::transaction::{self, Transactions};
use bytes::{BufMut, Bytes, BytesMut};
use pgentra_wire::{backend_key_data, message, param};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, TryAcquireError, watch};
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
    /// afterwards: taken at the login, or (`None`) with the client's first message.
    Pooled {
        conn: Option<Box<Pooled>>,
        /// The `ParameterStatus` messages of the welcome.
        reported: Bytes,
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
    let (session, slot) = match login(&mut conn, pending, &instance, &shared, deadline).await {
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
            conn,
            reported,
            pool,
            key,
            tracked,
        } => {
            let mut kill = kill;
            let held = match conn {
                Some(conn) => Some((conn, Vec::new())),
                None => {
                    let welcomed = Welcomed {
                        pool: &pool,
                        key: &key,
                        tracked: &tracked,
                        reported: &reported,
                    };
                    first_message(&mut client, welcomed, &instance, &shared, &mut kill).await
                }
            };
            if let Some((mut conn, first)) = held {
                let server = &mut conn.server;
                let end = relay::relay_session(
                    &mut client,
                    &first,
                    &mut server.stream,
                    &mut server.params,
                    kill,
                )
                .await;
                shared
                    .metrics
                    .bytes(end.relayed.to_server, end.relayed.to_client);
                shared.cancel_keys.forget(&key);
                // The client is gone: its slot under --max-connections is free while its
                // connection is reset (a round trip to the server), as in PgBouncer.
                drop((client, slot));
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
            } else {
                shared.cancel_keys.forget(&key);
            }
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

/// A session of a pool, welcomed from what the pool knows of the client's tracked values
/// (see [`Pool::welcome`]), to take a connection with its first message; or else with a
/// connection taken now (an idle one, a new one, or one freed while waiting) and set to them,
/// which checks the client's values as PostgreSQL would at its login. In transaction pooling
/// that connection goes back to the pool right after the welcome.
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
    let per_transaction = mode == PoolMode::Transaction;
    let (server_conn, reported) = match pool.welcome(&tracked) {
        Some(reported) => (None, reported),
        None => {
            let server_conn = lease.checkout(&pool, &key).await?;
            let server_conn = lease.set_tracked(server_conn, &pool, &tracked).await?;
            let reported = server_conn.server.params.messages().freeze();
            pool.remember_welcome(&tracked, reported.clone());
            if per_transaction {
                pool.put(*server_conn);
                (None, reported)
            } else {
                (Some(server_conn), reported)
            }
        }
    };
    let key = lease.issue_key(server_conn.as_ref().map(|conn| &conn.server))?;
    let mut answers = BytesMut::new();
    answers.put_slice(&message(b'R', &0i32.to_be_bytes()));
    answers.put_slice(&reported);
    // Counted before the client hears of it, so that a client logged in is counted.
    pool.stats.clients.fetch_add(1, Ordering::Relaxed);
    if let Err(error) = send(conn, &welcome(&answers, key)).await {
        pool.stats.clients.fetch_sub(1, Ordering::Relaxed);
        lease.shared.cancel_keys.forget(&key);
        if let Some(server_conn) = server_conn {
            pool.put(*server_conn);
        }
        return Err(error);
    }
    if per_transaction {
        return Ok(Session::Transactions { pool, key, tracked });
    }
    if server_conn.is_some() {
        pool.stats.active.fetch_add(1, Ordering::Relaxed);
    }
    Ok(Session::Pooled {
        conn: server_conn,
        reported,
        pool,
        key,
        tracked,
    })
}

/// The frontend's `Terminate` message: `X`, and its length, 4.
const TERMINATE: &[u8] = b"X\0\0\0\x04";

/// A session welcomed without a server connection.
struct Welcomed<'a> {
    pool: &'a Pool,
    key: &'a cancel::Key,
    tracked: &'a [(&'static str, Bytes)],
    /// The `ParameterStatus` messages of its welcome.
    reported: &'a Bytes,
}

/// For a session welcomed without a connection: its first bytes, and a connection of its pool
/// set to its tracked values, with its cancel key pointed at it. `None` when the client left
/// first, or was refused (told here): the pool's queue timed out, no token came, or the server
/// refused.
async fn first_message(
    client: &mut Box<dyn Stream>,
    welcomed: Welcomed<'_>,
    instance: &InstanceState,
    shared: &Shared,
    kill: &mut watch::Receiver<bool>,
) -> Option<(Box<Pooled>, Vec<u8>)> {
    let mut first = vec![0; relay::RELAY_BUFFER];
    let mut draining = shared.draining();
    let read = tokio::select! {
        read = client.read(&mut first) => read,
        () = relay::turns_true(kill) => return None,
        // Nothing to finish: told to go at once, as a client between transactions.
        () = relay::turns_true(&mut draining) => {
            refuse(client, shared, Refusal::SessionShutdown).await;
            return None;
        }
    };
    first.truncate(read.ok().filter(|n| *n > 0)?);
    let Welcomed {
        pool,
        key,
        tracked,
        reported,
    } = welcomed;
    // A client that only says goodbye needs no connection (nor its reset).
    if first.starts_with(TERMINATE) {
        return None;
    }
    let mut lease = Lease::new(
        shared,
        instance,
        Instant::now() + shared.config.login_timeout,
    );
    let conn = async {
        let conn = lease.checkout(pool, &pool.key).await?;
        lease.set_tracked(conn, pool, tracked).await
    };
    match conn.await {
        Ok(conn) => {
            shared
                .cancel_keys
                .point(key, Some(lease.cancel_target(&conn.server)));
            pool.stats.active.fetch_add(1, Ordering::Relaxed);
            let now = conn.server.params.messages().freeze();
            if now != *reported {
                // The server reports otherwise than the welcome said (it was restarted, or
                // upgraded): "ParameterStatus messages will be generated whenever the active
                // value changes for any of the parameters the backend believes the frontend
                // should know about" (protocol, 55.2.7), so the client hears of it now.
                let told = client.write_all(&now).await.and(client.flush().await);
                pool.remember_welcome(tracked, now);
                if told.is_err() {
                    let (ending, reset) = (Ending::ClientDone, Reset::Configured);
                    lease::give_back(*conn, pool, ending, b'I', tracked, reset, instance, shared)
                        .await;
                    return None;
                }
            }
            Some((conn, first))
        }
        Err(StartupError::Refuse(refusal)) => {
            refuse(client, shared, refusal).await;
            None
        }
        Err(StartupError::Gone(_)) => None,
    }
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
