//! The one place that gives a server connection back, keeps a pool's `clients`, `pinned` and
//! `active` gauges, and points a client's cancel key (PgBouncer's `release_server`, PgDog's
//! pool guard).
//!
//! - A [`CancelKey`] is a client's proxy-issued key, forgotten when it is dropped.
//! - A [`ClientGuard`] is a client logged in on a pool: counted in `clients` (and `pinned`,
//!   once pinned) while it lasts.
//! - A [`ServerGuard`] is a server connection a client holds: counted `active`, with the
//!   client's cancel key pointing at it. It is given back by [`ServerGuard::release_idle`]
//!   (between transactions) or [`ServerGuard::release`] (with what the client left behind);
//!   dropped unreleased (a session the drain timeout ended), it is closed.

use crate::cancel::{self, CancelTarget, Pointer};
use crate::connector::{own_queries, own_query};
use crate::pinning::PinReason;
use crate::pool::{CloseReason, Pool, Pooled};
use crate::refusal::Refusal;
use crate::server::ServerConn;
use crate::settings::Settings;
use crate::shared::{InstanceState, Shared};
use crate::tracked::Tracked;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How long a released connection may wait for cancel requests still on their way to it.
pub(crate) const CANCEL_SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

/// A client's proxy-issued cancel key, forgotten when dropped.
pub(crate) struct CancelKey<'a> {
    shared: &'a Shared,
    key: cancel::Key,
    pointer: Arc<Pointer>,
}

impl<'a> CancelKey<'a> {
    /// A new key from the OS's CSPRNG, whose cancel requests go to `to` (nowhere yet: `None`).
    pub(crate) fn issue(shared: &'a Shared, to: Option<CancelTarget>) -> Result<Self, Refusal> {
        let (key, pointer) = shared.cancel_keys.issue(to).map_err(|error| {
            Refusal::Internal(format!(
                "the operating system gave no random bytes for a cancel key: {error}"
            ))
        })?;
        Ok(Self {
            shared,
            key,
            pointer,
        })
    }

    /// The key, for the client's `BackendKeyData`.
    pub(crate) fn key(&self) -> cancel::Key {
        self.key
    }
}

impl Drop for CancelKey<'_> {
    fn drop(&mut self) {
        self.shared.cancel_keys.forget(&self.key);
    }
}

/// A client logged in on a pool.
pub(crate) struct ClientGuard<'a> {
    pub(crate) pool: Arc<Pool>,
    pub(crate) key: CancelKey<'a>,
    pinned: Option<PinReason>,
}

impl<'a> ClientGuard<'a> {
    /// Counts a client of `pool` (before it hears it is logged in, so a client logged in is
    /// counted).
    pub(crate) fn new(pool: Arc<Pool>, key: CancelKey<'a>) -> Self {
        pool.stats.clients.fetch_add(1, Ordering::Relaxed);
        Self {
            pool,
            key,
            pinned: None,
        }
    }

    /// Pins the client to its server connection for the rest of its session; whether it was
    /// not pinned before.
    pub(crate) fn pin(&mut self, reason: PinReason) -> bool {
        if self.pinned.is_some() {
            return false;
        }
        self.pinned = Some(reason);
        let stats = &self.pool.stats;
        stats.pins[reason.index()].fetch_add(1, Ordering::Relaxed);
        stats.pinned.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Why the client is pinned, if it is.
    pub(crate) fn pinned(&self) -> Option<PinReason> {
        self.pinned
    }
}

impl Drop for ClientGuard<'_> {
    fn drop(&mut self) {
        let stats = &self.pool.stats;
        stats.clients.fetch_sub(1, Ordering::Relaxed);
        if self.pinned.is_some() {
            stats.pinned.fetch_sub(1, Ordering::Relaxed);
        }
    }
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

/// What the client left on a server connection it gives back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Release {
    /// The server waits for the next command, with this transaction status: an open (or
    /// failed) transaction is rolled back — a new Azure login costs far more than a
    /// `ROLLBACK` — then the connection is reset as `Reset` says and put back.
    Settled { status: u8, reset: Reset },
    /// A query was running: it is cancelled on the server (so a client that left does not
    /// leave it running for minutes), and the connection closed.
    Running,
    /// Closed, for this reason: the server waits for the rest of a message or for `COPY`
    /// data, it broke, or the proxy is stopping.
    Close(CloseReason),
}

/// A server connection a client holds.
pub(crate) struct ServerGuard<'a> {
    conn: Option<Box<Pooled>>,
    pool: Arc<Pool>,
    shared: &'a Shared,
    instance: &'a InstanceState,
    /// Where the client's cancel requests go.
    pointer: Arc<Pointer>,
}

impl<'a> ServerGuard<'a> {
    /// `conn`, held by `client`: counted active, and the client's cancel requests go to it.
    pub(crate) fn new(
        conn: Box<Pooled>,
        client: &ClientGuard<'a>,
        instance: &'a InstanceState,
    ) -> Self {
        let pointer = Arc::clone(&client.key.pointer);
        pointer.point(Some(CancelTarget::of(&instance.target, &conn.server)));
        client.pool.stats.active.fetch_add(1, Ordering::Relaxed);
        Self {
            conn: Some(conn),
            pool: Arc::clone(&client.pool),
            shared: client.key.shared,
            instance,
            pointer,
        }
    }

    /// The server connection.
    pub(crate) fn server(&mut self) -> &mut ServerConn {
        &mut self.conn.as_mut().expect("held until released").server
    }

    /// Takes the connection from the client: its cancel key points nowhere, and it is no longer
    /// active.
    fn take(&mut self) -> Option<Box<Pooled>> {
        let conn = self.conn.take()?;
        self.pointer.point(None);
        self.pool.stats.active.fetch_sub(1, Ordering::Relaxed);
        Some(conn)
    }

    /// Gives the connection back between transactions, as it is (it is idle, and no session
    /// state pins it): at once, or once a cancel request still on its way to it has arrived
    /// (so it cannot cancel the next client's query).
    pub(crate) fn release_idle(mut self) {
        let Some(conn) = self.take() else {
            return;
        };
        let pool = &self.pool;
        if self.shared.is_draining() {
            pool.close(conn, CloseReason::Shutdown);
        } else if std::time::Instant::now() >= conn.retire_at {
            pool.close(conn, CloseReason::Lifetime);
        } else if conn.server.cancels.none() {
            pool.put(conn);
        } else {
            let pool = Arc::clone(pool);
            tokio::spawn(async move {
                if conn.server.cancels.settled(CANCEL_SETTLE_TIMEOUT).await {
                    pool.put(conn);
                } else {
                    pool.close(conn, CloseReason::ClientLeft);
                }
            });
        }
    }

    /// Gives the connection back with what the client left on it: rolled back, reset and put
    /// back, or closed when it cannot be trusted to start clean (a cancel on its way, the
    /// reset failed, its time is up). `tracked` are the values to set again after the reset,
    /// so that the next client of the same application needs no `SET` before its login ends.
    pub(crate) async fn release(mut self, how: Release, tracked: &Tracked) {
        let Some(mut conn) = self.take() else {
            return;
        };
        let pool = &self.pool;
        let _returning = pool.returning();
        let (status, reset) = match how {
            Release::Settled { status, reset } => (status, reset),
            Release::Running => {
                let to = CancelTarget::of(&self.instance.target, &conn.server);
                cancel::spawn_send(to, self.shared.config.connect_timeout);
                return pool.close(conn, CloseReason::ClientLeft);
            }
            Release::Close(reason) => return pool.close(conn, reason),
        };
        if self.shared.is_draining() {
            return pool.close(conn, CloseReason::Shutdown);
        }
        if !conn.server.cancels.settled(CANCEL_SETTLE_TIMEOUT).await {
            return pool.close(conn, CloseReason::ClientLeft);
        }
        if std::time::Instant::now() >= conn.retire_at {
            return pool.close(conn, CloseReason::Lifetime);
        }
        if status != b'I' && !own_query(&mut conn.server, "ROLLBACK").await {
            return pool.close(conn, CloseReason::ResetFailed);
        }
        let reset_query = pool.settings.reset_query.as_str();
        if reset == Reset::Required && reset_query.is_empty() {
            return pool.close(conn, CloseReason::ResetFailed);
        }
        if reset != Reset::Skip && !reset_query.is_empty() {
            // The reset returns every parameter to the server's default; the client's startup
            // values of the tracked ones are set again in the same round trip.
            let defaults = conn.server.defaults.tracked();
            let sets = tracked.set_statements(defaults, defaults);
            let queries: Vec<&str> = [reset_query, sets.as_str()]
                .into_iter()
                .filter(|sql| !sql.is_empty())
                .collect();
            if !own_queries(&mut conn.server, &queries).await {
                return pool.close(conn, CloseReason::ResetFailed);
            }
            // DISCARD ALL dropped the statements prepared for clients; another reset query
            // may not have, but their names are never used again.
            conn.server.prepared.clear();
            conn.server.settings = Settings::default();
            pool.stats.resets.fetch_add(1, Ordering::Relaxed);
        }
        pool.put(conn);
    }
}

impl Drop for ServerGuard<'_> {
    fn drop(&mut self) {
        // Unreleased: the session failed, or the drain timeout ended it.
        if let Some(conn) = self.take() {
            let reason = if self.shared.is_draining() {
                CloseReason::Shutdown
            } else {
                CloseReason::ClientLeft
            };
            self.pool.close(conn, reason);
        }
    }
}
