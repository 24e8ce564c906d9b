//! One client connection through the proxy's stages, in order: the startup phase, the local
//! password, a session slot, the role, a server connection (a pooled one, or a login with a
//! token, all within the login timeout), the welcome, the relay, and the release of the server
//! connection. This is the one place that tells a client it is refused.

use crate::cancel::{self, CancelTarget};
use crate::config::PoolMode;
use crate::pool::{Checkout, CloseReason, Pool, PoolKey, Pooled};
use crate::refusal::Refusal;
use crate::relay::{self, Ending};
use crate::server::{self, LoginError, Params, QueryError, ServerConn};
use crate::shared::{InstanceState, Shared};
use crate::startup::{self, ClientConn, Request, StartupError};
use bytes::{BufMut, Bytes, BytesMut};
use pgentra::DbCredentials;
use pgentra_wire::{backend_key_data, message, param};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, TryAcquireError};
use tokio::time::{Instant, timeout, timeout_at};

/// How long a refused client gets to take its `FATAL` before the connection closes.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on the proxy's own queries on a server connection (check, `SET`, reset).
const OWN_QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a released connection may wait for cancel requests still on their way to it.
const CANCEL_SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

/// A logged-in session, ready to relay.
enum Session {
    /// A server connection of its own (pool mode `none`, or a replication connection).
    Dedicated {
        server: Box<ServerConn>,
        key: cancel::Key,
    },
    /// A pooled server connection, which goes back to `pool` afterwards.
    Pooled {
        conn: Box<Pooled>,
        pool: Arc<Pool>,
        key: cancel::Key,
        /// The client's values of the tracked parameters.
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
        Err(StartupError::Refuse(refusal)) => return refuse(&mut conn, &shared, refusal).await,
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
            release(*conn, &pool, end, &tracked, &instance, &shared).await;
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
    let mut login = Login {
        shared,
        instance,
        deadline,
        creds: None,
    };
    let role = match chosen {
        Some(role) => role,
        None => login.creds().await?.user().to_owned(),
    };
    let replication = param(&params, "replication").is_some_and(|r| r != "false" && r != "off");
    let session = if shared.config.pool.mode == PoolMode::None || replication {
        login.dedicated(conn, &role, &params).await?
    } else {
        login.pooled(conn, &role, &params).await?
    };
    tracing::info!(
        upstream = %instance.target.name,
        role,
        database = param(&params, "database").unwrap_or_default(),
        pooled = matches!(session, Session::Pooled { .. }),
        "session logged in"
    );
    Ok(Some((session, slot)))
}

/// The login of one client once its role is known, with the token fetched at most once.
struct Login<'a> {
    shared: &'a Shared,
    instance: &'a InstanceState,
    deadline: Instant,
    creds: Option<DbCredentials>,
}

impl Login<'_> {
    /// The provider's credentials, waited for within the login deadline.
    async fn creds(&mut self) -> Result<&DbCredentials, StartupError> {
        if self.creds.is_none() {
            let limit = self.shared.config.login_timeout;
            let creds = match timeout_at(self.deadline, self.shared.auth.credentials()).await {
                Err(_) => return Err(refused(Refusal::TokenTimeout(limit))),
                Ok(Err(error)) => return Err(refused(Refusal::Token(error))),
                Ok(Ok(creds)) => creds,
            };
            self.creds = Some(creds);
        }
        Ok(self.creds.as_ref().expect("set above"))
    }

    /// A server connection logged in for this client with `startup`, within the deadline.
    async fn open(&mut self, role: &str, startup: &[u8]) -> Result<ServerConn, StartupError> {
        let shared = self.shared;
        let target = &self.instance.target;
        let deadline = self.deadline;
        let creds = self.creds().await?.clone();
        let started = std::time::Instant::now();
        let login = server::login(
            target,
            shared.config.connect_timeout,
            startup,
            creds.password(),
        );
        match timeout_at(deadline, login).await {
            Ok(Ok(server)) => {
                shared.metrics.login_succeeded(started.elapsed());
                Ok(server)
            }
            Ok(Err(error)) => Err(refused(login_refusal(error, &target.name, role, &creds))),
            Err(_) => Err(refused(Refusal::ServerTimeout {
                upstream: target.name.clone(),
                limit: shared.config.login_timeout,
            })),
        }
    }

    /// A server connection of the client's own, and the server's answers as the welcome.
    async fn dedicated(
        &mut self,
        conn: &mut ClientConn,
        role: &str,
        params: &[(String, Bytes)],
    ) -> Result<Session, StartupError> {
        let database = self.instance.instance.upstream.dbname.as_deref();
        let startup = server::startup(role, database, params)
            .map_err(|len| refused(Refusal::ForwardedStartupTooLong { len }))?;
        let server = self.open(role, &startup).await?;
        let key = self.issue_key(&server)?;
        let welcome = welcome(&server.welcome, key);
        if let Err(error) = send(conn, &welcome).await {
            self.shared.cancel_keys.forget(&key);
            return Err(error);
        }
        Ok(Session::Dedicated {
            server: Box::new(server),
            key,
        })
    }

    /// A pooled server connection: an idle one, or a new one, or one freed while waiting;
    /// set to the client's tracked parameters; and a welcome made from its state.
    async fn pooled(
        &mut self,
        conn: &mut ClientConn,
        role: &str,
        params: &[(String, Bytes)],
    ) -> Result<Session, StartupError> {
        let upstream = &self.instance.instance.upstream;
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
            match crate::pool::tracked(name) {
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
        let pools = &self.instance.pools;
        let pool = pools.pool(&key);
        let mut conn_for_client = self.checkout(&pool, &key).await?;
        // The client's values of the tracked parameters (or the server's defaults), by SET.
        let sets = set_statements(
            &conn_for_client.server.params,
            &conn_for_client.server.defaults,
            &tracked,
        );
        if !sets.is_empty() {
            match conn_for_client.server.query(&sets, OWN_QUERY_TIMEOUT).await {
                Ok(b'I') => {}
                Ok(_) | Err(QueryError::Broken(_)) => {
                    pool.close(*conn_for_client, CloseReason::Broken);
                    return Err(refused(Refusal::ServerBroke {
                        upstream: self.instance.target.name.clone(),
                        what: "did not take the session's parameters".into(),
                    }));
                }
                Err(QueryError::Server(error)) => {
                    // As PostgreSQL refuses a bad value in a startup message.
                    pool.put(*conn_for_client);
                    return Err(refused(Refusal::ServerRefused(error.into_fatal())));
                }
            }
        }
        let key = self.issue_key(&conn_for_client.server)?;
        let mut answers = BytesMut::new();
        answers.put_slice(&message(b'R', &0i32.to_be_bytes()));
        answers.put_slice(&conn_for_client.server.params.messages());
        let welcome = welcome(&answers, key);
        pool.stats.active.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = send(conn, &welcome).await {
            self.shared.cancel_keys.forget(&key);
            pool.stats.active.fetch_sub(1, Ordering::Relaxed);
            pool.put(*conn_for_client);
            return Err(error);
        }
        Ok(Session::Pooled {
            conn: conn_for_client,
            pool,
            key,
            tracked,
        })
    }

    /// A connection of `pool` for this client: an idle one that passes its checks, or a new
    /// one logged in, waiting in the queue up to the queue timeout (within the login deadline).
    async fn checkout(&mut self, pool: &Pool, key: &PoolKey) -> Result<Box<Pooled>, StartupError> {
        let pools = &self.instance.pools;
        let config = pools.config();
        let now = Instant::now();
        let until = (now + config.queue_timeout).min(self.deadline);
        loop {
            let Some(checkout) = pools.checkout(pool, until).await else {
                return Err(refused(Refusal::QueueTimeout {
                    limit: until.duration_since(now),
                }));
            };
            match checkout {
                Checkout::Idle(mut conn) => {
                    let now = std::time::Instant::now();
                    if now >= conn.retire_at {
                        pool.close(*conn, CloseReason::Lifetime);
                        continue;
                    }
                    if conn.server.looks_closed() {
                        pool.close(*conn, CloseReason::Broken);
                        continue;
                    }
                    if now.duration_since(conn.idle_since) >= config.check_delay
                        && !own_query(&mut conn.server, "").await
                    {
                        pool.close(*conn, CloseReason::Broken);
                        continue;
                    }
                    pool.stats.reused.fetch_add(1, Ordering::Relaxed);
                    return Ok(conn);
                }
                Checkout::Open(slots) => {
                    let startup = server::startup(&key.role, Some(&key.database), &key.params)
                        .map_err(|len| refused(Refusal::ForwardedStartupTooLong { len }))?;
                    let server = self.open(&key.role, &startup).await?;
                    let expiry = self.creds().await?.expires_at();
                    pool.stats.opened.fetch_add(1, Ordering::Relaxed);
                    return Ok(Box::new(pools.pooled(server, slots, expiry)));
                }
            }
        }
    }

    /// A proxy-issued cancel key for the client, sending its cancels to `server`.
    fn issue_key(&self, server: &ServerConn) -> Result<cancel::Key, StartupError> {
        self.shared
            .cancel_keys
            .issue(CancelTarget {
                target: Arc::clone(&self.instance.target),
                key: server.key,
                in_flight: Arc::clone(&server.cancels),
            })
            .map_err(|error| {
                refused(Refusal::Internal(format!(
                    "the operating system gave no random bytes for a cancel key: {error}"
                )))
            })
    }
}

/// The refusal for a failed upstream login.
fn login_refusal(error: LoginError, upstream: &str, role: &str, creds: &DbCredentials) -> Refusal {
    match error {
        LoginError::Connect(error) => Refusal::ServerUnreachable {
            upstream: upstream.to_owned(),
            error: error.to_string(),
        },
        LoginError::AuthMethod(method) => Refusal::ServerAuthMethod {
            method,
            role: role.to_owned(),
        },
        LoginError::Refused(mut fields) => {
            tracing::warn!(
                upstream,
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
            upstream: upstream.to_owned(),
            what,
        },
    }
}

/// `SET` statements that take a server from `current` to the client's values of the tracked
/// parameters, and to the server's `defaults` for those the client did not send; empty when
/// they already match.
fn set_statements(current: &Params, defaults: &Params, client: &[(&'static str, Bytes)]) -> String {
    let mut sql = String::new();
    for (_, name) in crate::pool::TRACKED {
        let wanted = client
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .or_else(|| defaults.get(name));
        let (Some(wanted), current) = (wanted, current.get(name)) else {
            continue;
        };
        if current == Some(wanted) {
            continue;
        }
        // PostgreSQL keeps only the ASCII of a startup message's application_name (non-ASCII
        // bytes become '?'), and a query's text must be valid in its encoding.
        let value: String = if name == "application_name" {
            wanted
                .iter()
                .map(|b| if b.is_ascii() { char::from(*b) } else { '?' })
                .collect()
        } else {
            String::from_utf8_lossy(wanted).into_owned()
        };
        sql.push_str(&format!(
            "SET {name} TO '{}';",
            value.replace('\\', "\\\\").replace('\'', "''")
        ));
    }
    sql
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

/// After a pooled session: the connection is reset and goes back to its pool, or is closed
/// when it cannot be trusted to start clean (the client left mid-query, a cancel was on its
/// way, the reset failed, its time is up).
async fn release(
    mut conn: Pooled,
    pool: &Pool,
    end: relay::SessionEnd,
    tracked: &[(&'static str, Bytes)],
    instance: &InstanceState,
    shared: &Shared,
) {
    pool.stats.active.fetch_sub(1, Ordering::Relaxed);
    let config = instance.pools.config();
    match end.ending {
        Ending::ClientDone => {}
        Ending::ClientGone => return pool.close(conn, CloseReason::ClientLeft),
        Ending::ServerGone => return pool.close(conn, CloseReason::Broken),
        Ending::Killed => return pool.close(conn, CloseReason::Shutdown),
    }
    if shared.is_draining() {
        return pool.close(conn, CloseReason::Shutdown);
    }
    if !conn.server.cancels.settled(CANCEL_SETTLE_TIMEOUT).await {
        return pool.close(conn, CloseReason::ClientLeft);
    }
    if std::time::Instant::now() >= conn.retire_at {
        return pool.close(conn, CloseReason::Lifetime);
    }
    // A transaction left open (or failed) is rolled back rather than closed: a new Azure login
    // costs far more than a ROLLBACK.
    if end.status != b'I' && !own_query(&mut conn.server, "ROLLBACK").await {
        return pool.close(conn, CloseReason::ResetFailed);
    }
    if !config.reset_query.is_empty() {
        // The reset returns every parameter to the server's default; the client's startup
        // values of the tracked ones are set again in the same round trip, so that the next
        // client of the same application (the common case) needs no SET before its login ends.
        let server = &conn.server;
        let sets = set_statements(&server.defaults, &server.defaults, tracked);
        let reset: Vec<&str> = [config.reset_query.as_str(), sets.as_str()]
            .into_iter()
            .filter(|sql| !sql.is_empty())
            .collect();
        if !own_queries(&mut conn.server, &reset).await {
            return pool.close(conn, CloseReason::ResetFailed);
        }
        pool.stats.resets.fetch_add(1, Ordering::Relaxed);
    }
    pool.put(conn);
}

/// Runs one of the proxy's own queries (a check, a rollback); whether it succeeded and left the
/// server idle. A failure is logged: the connection will be closed.
async fn own_query(server: &mut ServerConn, sql: &str) -> bool {
    own_queries(server, &[sql]).await
}

/// As [`own_query`], for queries sent together in one round trip.
async fn own_queries(server: &mut ServerConn, sql: &[&str]) -> bool {
    match server.queries(sql, OWN_QUERY_TIMEOUT).await {
        Ok(b'I') => true,
        Ok(status) => {
            tracing::debug!(?sql, status = %char::from(status), "a server connection is not idle after the proxy's query");
            false
        }
        Err(QueryError::Server(error)) => {
            tracing::debug!(
                ?sql,
                message = error.get(b'M').unwrap_or_default(),
                "the proxy's query failed"
            );
            false
        }
        Err(QueryError::Broken(why)) => {
            tracing::debug!(?sql, why, "a server connection broke");
            false
        }
    }
}
