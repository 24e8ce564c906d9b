//! A server connection for a client, and back: an idle one of its pool (checked first) or one
//! logged in with a token, set to the client's tracked parameters; afterwards reset and put
//! back, or closed when it cannot be trusted to start clean.

use crate::cancel::{self, CancelTarget};
use crate::pool::{Checkout, CloseReason, Pool, PoolKey, Pooled};
use crate::refusal::Refusal;
use crate::relay::Ending;
use crate::server::{self, LoginError, Params, QueryError, ServerConn};
use crate::shared::{InstanceState, Shared};
use crate::startup::StartupError;
use bytes::Bytes;
use pgentra::DbCredentials;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::{Instant, timeout_at};

/// Bound on the proxy's own queries on a server connection (check, `SET`, reset).
pub(crate) const OWN_QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a released connection may wait for cancel requests still on their way to it.
pub(crate) const CANCEL_SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

fn refused(refusal: Refusal) -> StartupError {
    StartupError::Refuse(refusal)
}

/// Server connections for one client of one instance, until `deadline`, with the token
/// fetched at most once.
pub(crate) struct Lease<'a> {
    pub(crate) shared: &'a Shared,
    pub(crate) instance: &'a InstanceState,
    pub(crate) deadline: Instant,
    creds: Option<DbCredentials>,
}

impl<'a> Lease<'a> {
    pub(crate) fn new(shared: &'a Shared, instance: &'a InstanceState, deadline: Instant) -> Self {
        Self {
            shared,
            instance,
            deadline,
            creds: None,
        }
    }

    /// The provider's credentials, waited for within the login deadline.
    pub(crate) async fn creds(&mut self) -> Result<&DbCredentials, StartupError> {
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
    pub(crate) async fn open(
        &mut self,
        role: &str,
        startup: &[u8],
    ) -> Result<ServerConn, StartupError> {
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

    /// A connection of `pool` for this client: an idle one that passes its checks, or a new
    /// one logged in, waiting in the queue up to the queue timeout (within the login deadline).
    pub(crate) async fn checkout(
        &mut self,
        pool: &Pool,
        key: &PoolKey,
    ) -> Result<Box<Pooled>, StartupError> {
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

    /// A proxy-issued cancel key for the client, sending its cancels to `server` (to none yet,
    /// in transaction pooling).
    pub(crate) fn issue_key(
        &self,
        server: Option<&ServerConn>,
    ) -> Result<cancel::Key, StartupError> {
        self.shared
            .cancel_keys
            .issue(server.map(|server| self.cancel_target(server)))
            .map_err(|error| {
                refused(Refusal::Internal(format!(
                    "the operating system gave no random bytes for a cancel key: {error}"
                )))
            })
    }

    /// Where cancel requests for a query on `server` go.
    pub(crate) fn cancel_target(&self, server: &ServerConn) -> CancelTarget {
        CancelTarget {
            target: Arc::clone(&self.instance.target),
            key: server.key,
            in_flight: Arc::clone(&server.cancels),
        }
    }

    /// Sets `conn` to the client's values of the tracked parameters (or the server's defaults
    /// for those it did not send), as PostgreSQL would have taken them from its startup
    /// message: a value the server refuses is the client's error.
    pub(crate) async fn set_tracked(
        &self,
        conn: Box<Pooled>,
        pool: &Pool,
        tracked: &[(&'static str, Bytes)],
    ) -> Result<Box<Pooled>, StartupError> {
        let mut conn = conn;
        let sets = set_statements(&conn.server.params, &conn.server.defaults, tracked);
        if sets.is_empty() {
            return Ok(conn);
        }
        match conn.server.query(&sets, OWN_QUERY_TIMEOUT).await {
            Ok(b'I') => Ok(conn),
            Ok(_) | Err(QueryError::Broken(_)) => {
                pool.close(*conn, CloseReason::Broken);
                Err(refused(Refusal::ServerBroke {
                    upstream: self.instance.target.name.clone(),
                    what: "did not take the session's parameters".into(),
                }))
            }
            Err(QueryError::Server(error)) => {
                // As PostgreSQL refuses a bad value in a startup message.
                pool.put(*conn);
                Err(refused(Refusal::ServerRefused(error.into_fatal())))
            }
        }
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
    for (_, name) in crate::tracked::TRACKED {
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

/// Whether a connection given back is reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reset {
    /// With the reset query, if one is configured (session pooling).
    Configured,
    /// With the reset query, or closed when none is configured: the session left state.
    Required,
    /// Not at all: the session left no state (transaction pooling, unpinned).
    Skip,
}

/// After a pooled session: the connection is reset and goes back to its pool, or is closed
/// when it cannot be trusted to start clean (the client left mid-query, a cancel was on its
/// way, the reset failed, its time is up). A transaction left open (or failed) is rolled back.
#[allow(clippy::too_many_arguments)] // one call per pooling mode, each naming every part
pub(crate) async fn give_back(
    mut conn: Pooled,
    pool: &Pool,
    ending: Ending,
    status: u8,
    tracked: &[(&'static str, Bytes)],
    reset: Reset,
    instance: &InstanceState,
    shared: &Shared,
) {
    let _returning = pool.returning();
    pool.stats.active.fetch_sub(1, Ordering::Relaxed);
    let config = instance.pools.config();
    match ending {
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
    if status != b'I' && !own_query(&mut conn.server, "ROLLBACK").await {
        return pool.close(conn, CloseReason::ResetFailed);
    }
    if reset == Reset::Required && config.reset_query.is_empty() {
        return pool.close(conn, CloseReason::ResetFailed);
    }
    if reset != Reset::Skip && !config.reset_query.is_empty() {
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
        // DISCARD ALL dropped the statements prepared for clients; another reset query may
        // not have, but their names are never used again.
        conn.server.prepared.clear();
        pool.stats.resets.fetch_add(1, Ordering::Relaxed);
    }
    pool.put(conn);
}

/// Runs one of the proxy's own queries (a check, a rollback); whether it succeeded and left the
/// server idle. A failure is logged: the connection will be closed.
pub(crate) async fn own_query(server: &mut ServerConn, sql: &str) -> bool {
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
