//! Server connections, opened and checked out: the one place that logs in to a server (for a
//! client, for a pool's minimum ahead of time, and for `--check`), so that every login is
//! timed and counted alike, and the one place that hands a client a connection of its pool
//! (an idle one, checked first, or a new one) set to its tracked parameters.

use crate::pool::{Checkout, CloseReason, Pool, PoolKey, Pooled};
use crate::refusal::Refusal;
use crate::server::{self, LoginError, QueryError, ServerConn};
use crate::settings::Settings;
use crate::shared::{InstanceState, Shared};
use crate::tracked::Tracked;
use pgentra::DbCredentials;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::{Instant, timeout_at};

/// Bound on the proxy's own queries on a server connection (check, `SET`, reset).
pub(crate) const OWN_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Server connections of one instance until `deadline`, with the token fetched at most once.
pub(crate) struct Connector<'a> {
    pub(crate) shared: &'a Shared,
    pub(crate) instance: &'a InstanceState,
    deadline: Instant,
    creds: Option<DbCredentials>,
}

impl<'a> Connector<'a> {
    /// A connector for one client's (or one task's) needs, within its login timeout.
    pub(crate) fn new(shared: &'a Shared, instance: &'a InstanceState) -> Self {
        Self::until(
            shared,
            instance,
            Instant::now() + shared.config.login_timeout,
        )
    }

    pub(crate) fn until(
        shared: &'a Shared,
        instance: &'a InstanceState,
        deadline: Instant,
    ) -> Self {
        Self {
            shared,
            instance,
            deadline,
            creds: None,
        }
    }

    /// The provider's credentials, waited for within the deadline.
    pub(crate) async fn creds(&mut self) -> Result<&DbCredentials, Refusal> {
        if self.creds.is_none() {
            let limit = self.shared.config.login_timeout;
            let creds = match timeout_at(self.deadline, self.shared.auth.credentials()).await {
                Ok(Ok(creds)) => creds,
                failed => {
                    // A login that cannot start without a token has failed.
                    self.shared.metrics.login_failed();
                    return Err(match failed {
                        Ok(Err(error)) => Refusal::Token(error),
                        _ => Refusal::TokenTimeout(limit),
                    });
                }
            };
            self.creds = Some(creds);
        }
        Ok(self.creds.as_ref().expect("set above"))
    }

    /// A server connection logged in as `role` with `startup` (from [`server::startup`]),
    /// within the deadline; timed and counted.
    pub(crate) async fn open(&mut self, role: &str, startup: &[u8]) -> Result<ServerConn, Refusal> {
        let shared = self.shared;
        let target = &self.instance.target;
        let creds = self.creds().await?.clone();
        let started = std::time::Instant::now();
        let login = server::login(
            target,
            shared.config.connect_timeout,
            startup,
            creds.password(),
        );
        let refusal = match timeout_at(self.deadline, login).await {
            Ok(Ok(server)) => {
                shared.metrics.login_succeeded(started.elapsed());
                return Ok(server);
            }
            Ok(Err(error)) => login_refusal(error, &target.name, role, &creds),
            Err(_) => Refusal::ServerTimeout {
                upstream: target.name.clone(),
                limit: shared.config.login_timeout,
            },
        };
        shared.metrics.login_failed();
        Err(refusal)
    }

    /// A new connection for `pool` in the `slots` it was given; the token it logged in with
    /// bounds its life.
    async fn open_pooled(
        &mut self,
        pool: &Pool,
        slots: crate::pool::Slots,
    ) -> Result<Box<Pooled>, Refusal> {
        let key = &pool.key;
        let startup = startup(key)?;
        let server = self.open(&key.role, &startup).await?;
        let expiry = self.creds().await?.expires_at();
        pool.stats.opened.fetch_add(1, Ordering::Relaxed);
        Ok(pool.pooled(server, slots, expiry))
    }

    /// Opens one connection ahead for `pool`, if there is room: the pool's minimum of idle
    /// connections.
    pub(crate) async fn warm(&mut self, pool: &Pool) -> Result<(), Refusal> {
        let Some(slots) = self.instance.pools.try_slots(pool) else {
            return Ok(());
        };
        let conn = self.open_pooled(pool, slots).await?;
        pool.put(conn);
        Ok(())
    }

    /// A connection of `pool` for a client with `tracked` values and session `settings`: an
    /// idle one that passes its checks, or a new one logged in, waiting in the queue up to the
    /// pool's queue timeout (within the deadline); set to those values, as PostgreSQL would
    /// have taken them from its startup message (a value the server refuses is the client's
    /// error).
    pub(crate) async fn checkout(
        &mut self,
        pool: &Pool,
        tracked: &Tracked,
        settings: &Settings,
    ) -> Result<Box<Pooled>, Refusal> {
        let conn = self.idle_or_new(pool).await?;
        set_values(conn, pool, tracked, settings, &self.instance.target.name).await
    }

    async fn idle_or_new(&mut self, pool: &Pool) -> Result<Box<Pooled>, Refusal> {
        let settings = &pool.settings;
        let now = Instant::now();
        let until = (now + settings.queue_timeout).min(self.deadline);
        loop {
            let Some(checkout) = self.instance.pools.checkout(pool, until).await else {
                return Err(Refusal::QueueTimeout {
                    limit: until.duration_since(now),
                });
            };
            match checkout {
                Checkout::Idle(mut conn) => {
                    let now = std::time::Instant::now();
                    if now >= conn.retire_at {
                        pool.close(conn, CloseReason::Lifetime);
                        continue;
                    }
                    if conn.server.looks_closed() {
                        pool.close(conn, CloseReason::Broken);
                        continue;
                    }
                    if now.duration_since(conn.idle_since) >= settings.check_delay
                        && !own_query(&mut conn.server, "").await
                    {
                        pool.close(conn, CloseReason::Broken);
                        continue;
                    }
                    pool.stats.reused.fetch_add(1, Ordering::Relaxed);
                    return Ok(conn);
                }
                Checkout::Open(slots) => return self.open_pooled(pool, slots).await,
            }
        }
    }
}

/// The startup message of a pool's connections.
fn startup(key: &PoolKey) -> Result<bytes::Bytes, Refusal> {
    server::startup(&key.role, Some(&key.database), &key.params)
        .map_err(|len| Refusal::ForwardedStartupTooLong { len })
}

/// Sets `conn` to a client's `tracked` values (or the server's defaults for those it did not
/// send) and its session `settings`, in one round trip when any differ.
async fn set_values(
    mut conn: Box<Pooled>,
    pool: &Pool,
    tracked: &Tracked,
    settings: &Settings,
    upstream: &str,
) -> Result<Box<Pooled>, Refusal> {
    let server = &conn.server;
    let replay = settings.statements(&server.settings);
    if !replay.is_empty() {
        pool.stats.replays.fetch_add(1, Ordering::Relaxed);
    }
    let sets = tracked.set_statements(server.params.tracked(), server.defaults.tracked()) + &replay;
    if sets.is_empty() {
        return Ok(conn);
    }
    match conn.server.query(&sets, OWN_QUERY_TIMEOUT).await {
        Ok(b'I') => {
            conn.server.settings = settings.clone();
            Ok(conn)
        }
        Ok(_) | Err(QueryError::Broken(_)) => {
            pool.close(conn, CloseReason::Broken);
            Err(Refusal::ServerBroke {
                upstream: upstream.to_owned(),
                what: "did not take the session's parameters".into(),
            })
        }
        Err(QueryError::Server(error)) => {
            // As PostgreSQL refuses a bad value in a startup message.
            pool.put(conn);
            Err(Refusal::ServerRefused(error.into_fatal()))
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

/// Runs one of the proxy's own queries (a check, a rollback); whether it succeeded and left the
/// server idle. A failure is logged: the connection will be closed.
pub(crate) async fn own_query(server: &mut ServerConn, sql: &str) -> bool {
    own_queries(server, &[sql]).await
}

/// As [`own_query`], for queries sent together in one round trip.
pub(crate) async fn own_queries(server: &mut ServerConn, sql: &[&str]) -> bool {
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
