//! One client connection through the proxy's stages, in order: the startup phase, the local
//! password, a session slot, the role, the pool's settings, a server connection of its own or
//! a place in a pool (welcomed from what the pool knows, or with a connection taken now), the
//! relay, and the release of the server connection once the client is gone. This is the one
//! place that tells a client it is refused.

use crate::cancel::CancelTarget;
use crate::config::PoolMode;
use crate::connector::Connector;
use crate::guard::{CancelKey, ClientGuard, ServerGuard};
use crate::pool::PoolKey;
use crate::refusal::Refusal;
use crate::relay::{self, Session};
use crate::server;
use crate::settings::Settings;
use crate::shared::{InstanceState, Shared};
use crate::startup::{self, ClientConn, Request, StartupError, Stream};
use crate::tracked::{Tracked, client_index};
use bytes::{BufMut, Bytes, BytesMut};
use pgentra_wire::{backend_key_data, message, param};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, TryAcquireError};
use tokio::time::{Instant, timeout, timeout_at};

/// How long a refused client gets to take its `FATAL` before the connection closes.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// A logged-in session, ready to relay.
enum LoggedIn<'a> {
    /// A server connection of its own (pool mode `none`, or a replication connection).
    Dedicated {
        server: Box<server::ServerConn>,
        key: CancelKey<'a>,
    },
    /// A client of a pool.
    Pooled(Box<Session<'a>>),
}

/// Serves one client connection until it ends. (The caller counts the connection.)
pub(crate) async fn serve(
    mut conn: ClientConn,
    pending: OwnedSemaphorePermit,
    instance: Arc<InstanceState>,
    shared: Arc<Shared>,
) {
    let (shared, instance) = (&*shared, &*instance);
    let deadline = Instant::now() + shared.config.login_timeout;
    let (session, slot) = match login(&mut conn, pending, instance, shared, deadline).await {
        Ok(Some(logged_in)) => logged_in,
        Ok(None) => return,
        Err(StartupError::Refuse(refusal)) => return refuse(conn.stream(), shared, refusal).await,
        Err(StartupError::Gone(reason)) => {
            tracing::debug!(reason, "client connection ended before its login");
            return;
        }
    };
    let mut client = conn.into_stream();
    match session {
        LoggedIn::Dedicated { mut server, key } => {
            let to = CancelTarget::of(&instance.target, &server);
            let connect = shared.config.connect_timeout;
            let relayed = relay::bytes::relay(&mut client, &mut server.stream, to, connect).await;
            shared.metrics.bytes(relayed.to_server, relayed.to_client);
            drop(key);
        }
        LoggedIn::Pooled(session) => {
            let end = relay::relay(&mut client, *session).await;
            shared
                .metrics
                .bytes(end.relayed.to_server, end.relayed.to_client);
            if let Some(refusal) = end.refusal {
                refuse(&mut client, shared, refusal).await;
            }
            // The client is gone: its slot under --max-connections is free while its
            // connection goes back (a round trip to the server for a reset), as in PgBouncer.
            drop((client, slot));
            if let Some((guard, how)) = end.release {
                guard.release(how, &end.tracked).await;
            }
            // Counted as the pool's client until its connection is back.
            drop(end.client);
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
async fn login<'a>(
    conn: &mut ClientConn,
    pending: OwnedSemaphorePermit,
    instance: &'a InstanceState,
    shared: &'a Shared,
    deadline: Instant,
) -> Result<Option<(LoggedIn<'a>, OwnedSemaphorePermit)>, StartupError> {
    let late = || refused(Refusal::StartupTimeout(shared.config.login_timeout));
    let negotiate = startup::negotiate(conn, shared.client_tls.as_ref());
    let params = match timeout_at(deadline, negotiate)
        .await
        .map_err(|_| late())??
    {
        Request::Cancel { pid, key } => {
            shared.metrics.cancel_request();
            let connect = shared.config.connect_timeout;
            crate::cancel::forward(&shared.cancel_keys, pid, &key, connect).await;
            return Ok(None);
        }
        Request::Login { params, .. } => params,
    };
    let user = param(&params, "user");
    if let Some(setting) = crate::login_settings::role_change(&params) {
        return Err(refused(Refusal::RoleSetting(setting)));
    }
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
    let slot = Arc::clone(&shared.sessions)
        .try_acquire_owned()
        .map_err(|_| {
            refused(Refusal::TooManyClients {
                limit: shared.config.max_connections,
            })
        })?;
    drop(pending);
    let mut connector = Connector::until(shared, instance, deadline);
    let role = role(&mut connector, user).await?;
    let database = (instance.instance.upstream.dbname.clone())
        .or_else(|| param(&params, "database").map(str::to_owned))
        .unwrap_or_else(|| role.clone());
    let replication = param(&params, "replication").is_some_and(|r| r != "false" && r != "off");
    let settings = shared
        .config
        .pool_settings(&instance.instance, &database, &role);
    let mode = if replication {
        PoolMode::None
    } else {
        settings.mode
    };
    let session = match mode {
        PoolMode::None => dedicated(&mut connector, conn, &role, &params).await?,
        _ => {
            let key = pool_key(role.clone(), database.clone(), &params);
            let pool = instance.pools.pool(&key.0, || settings);
            let session = pooled(&mut connector, conn, pool, key.1).await?;
            LoggedIn::Pooled(Box::new(session))
        }
    };
    tracing::info!(
        upstream = %instance.target.name,
        role,
        database,
        mode = mode.as_str(),
        "session logged in"
    );
    Ok(Some((session, slot)))
}

/// The session's role: the instance's pinned role, the client's user name when it may pick it,
/// else the token's.
async fn role(connector: &mut Connector<'_>, user: Option<&str>) -> Result<String, StartupError> {
    let instance = &connector.instance.instance;
    let chosen = (instance.user.as_deref()).or_else(|| instance.client_roles.pick(user));
    if let Some(role) = chosen {
        return Ok(role.to_owned());
    }
    if user.is_some_and(|u| !u.is_empty()) {
        tracing::debug!(
            user,
            "the client's user name is not a role it may pick (--client-roles): the token's role is used"
        );
    }
    // The identity's role does not change with its tokens: the last token's will do, so a
    // client its pool serves from connections logged in before needs no fresh token (and is
    // served while the token endpoint fails).
    let last = connector
        .shared
        .auth
        .subscribe()
        .borrow()
        .as_ref()
        .map(|c| c.user().to_owned());
    match last {
        Some(role) => Ok(role),
        None => Ok(connector.creds().await.map_err(refused)?.user().to_owned()),
    }
}

/// The pool of a client's session (its role, database and the startup parameters that shape
/// a whole session) and the client's values of the tracked ones.
fn pool_key(role: String, database: String, params: &[(String, Bytes)]) -> (PoolKey, Tracked) {
    let mut tracked = Tracked::default();
    let mut shaping: Vec<(String, Bytes)> = Vec::new();
    for (name, value) in params {
        if name == "user" || name == "database" || name.starts_with("_pq_.") {
            continue;
        }
        match client_index(name) {
            Some(index) => tracked.set(index, value.clone()),
            None => shaping.push((name.clone(), value.clone())),
        }
    }
    shaping.sort();
    let key = PoolKey {
        role,
        database,
        params: shaping,
    };
    (key, tracked)
}

/// A server connection of the client's own, and the server's answers as the welcome.
async fn dedicated<'a>(
    connector: &mut Connector<'a>,
    conn: &mut ClientConn,
    role: &str,
    params: &[(String, Bytes)],
) -> Result<LoggedIn<'a>, StartupError> {
    let database = connector.instance.instance.upstream.dbname.as_deref();
    let startup = server::startup(role, database, params)
        .map_err(|len| refused(Refusal::ForwardedStartupTooLong { len }))?;
    let server = connector.open(role, &startup).await.map_err(refused)?;
    let to = CancelTarget::of(&connector.instance.target, &server);
    let key = CancelKey::issue(connector.shared, Some(to)).map_err(refused)?;
    send(conn, &welcome(&server.welcome, &key)).await?;
    Ok(LoggedIn::Dedicated {
        server: Box::new(server),
        key,
    })
}

/// A client of `pool`, welcomed from what the pool knows of its tracked values (see
/// [`Pool::welcome`](crate::pool::Pool::welcome)), to take a connection with its first
/// message; or else with a connection taken now, which checks the client's values as
/// PostgreSQL would at its login. In transaction pooling that connection goes back right away.
async fn pooled<'a>(
    connector: &mut Connector<'a>,
    conn: &mut ClientConn,
    pool: Arc<crate::pool::Pool>,
    tracked: Tracked,
) -> Result<Session<'a>, StartupError> {
    let (shared, instance) = (connector.shared, connector.instance);
    let (taken, reported) = match pool.welcome(&tracked) {
        Some(reported) => (None, reported),
        None => {
            let taken = connector
                .checkout(&pool, &tracked, &Settings::default())
                .await
                .map_err(refused)?;
            let reported = taken.server.params.messages();
            pool.remember_welcome(&tracked, reported.clone());
            (Some(taken), reported)
        }
    };
    let key = CancelKey::issue(shared, None).map_err(refused)?;
    let client = ClientGuard::new(pool, key);
    let held = taken.map(|conn| ServerGuard::new(conn, &client, instance));
    let mut answers = BytesMut::new();
    answers.put_slice(&message(b'R', &0i32.to_be_bytes()));
    answers.put_slice(&reported);
    let sent = send(conn, &welcome(&answers, &client.key)).await;
    let transaction = client.pool.settings.mode == PoolMode::Transaction;
    let held = match held {
        Some(guard) if transaction || sent.is_err() => {
            guard.release_idle();
            None
        }
        held => held,
    };
    sent?;
    Ok(Session {
        shared,
        instance,
        welcome: held.is_none().then_some(reported),
        client,
        tracked,
        held,
    })
}

/// `answers`, the proxy's cancel key and `ReadyForQuery`, in one buffer.
fn welcome(answers: &[u8], key: &CancelKey<'_>) -> BytesMut {
    let (pid, secret) = key.key();
    let mut welcome = BytesMut::with_capacity(answers.len() + 32);
    welcome.put_slice(answers);
    welcome.put_slice(&backend_key_data(pid, &secret));
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
