//! Server connections kept between clients: one pool per upstream and (role, database, the
//! startup parameters that shape a session), as PgBouncer's session pooling.
//!
//! A client takes an idle connection (checked first: one the server closed is never handed
//! out), or a slot to log in a new one (up to the pool size, and the upstream's total cap), or
//! waits in the queue for either, up to the queue timeout. When it leaves, its connection is
//! reset and put back, or closed. Connections retire after their lifetime (never later than the
//! token they logged in with expires, so a revoked identity loses access) and after being idle
//! too long; a background task does that and keeps each pool's minimum of idle connections.
//!
//! Like PgBouncer, a client is welcomed from what the pool already knows (the parameters its
//! connections report for the client's tracked values) and takes a connection only with its
//! first message: a client that leaves without a query never takes one, and a client that
//! reconnects at once finds its old connection back in the pool.

mod stats;

pub(crate) use stats::{CloseReason, PoolSnapshot, PoolStats};

use crate::config::PoolConfig;
use crate::server::ServerConn;
use crate::tracked::Tracked;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};

/// What tells one pool from another on the same upstream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub(crate) role: String,
    pub(crate) database: String,
    /// The startup parameters that are not tracked (`options`, `search_path`, ...), sorted:
    /// they go into the server's startup message, so they shape the whole session.
    pub(crate) params: Vec<(String, Bytes)>,
}

/// A server connection and the slots it takes, in a pool or with a client.
pub(crate) struct Pooled {
    pub(crate) server: ServerConn,
    /// When it retires: its lifetime, or its token's expiry if sooner.
    pub(crate) retire_at: Instant,
    /// When it was last returned (or opened).
    pub(crate) idle_since: Instant,
    slots: Slots,
}

/// A place in the pool's size and in the upstream's total cap. Giving it back wakes the
/// clients waiting for one.
pub(crate) struct Slots {
    _pool: OwnedSemaphorePermit,
    upstream: Option<OwnedSemaphorePermit>,
    freed: Arc<Notify>,
}

impl Slots {
    /// The upstream's notice of room, when the upstream has a cap.
    fn capped(&self) -> Option<Arc<Notify>> {
        self.upstream.as_ref().map(|_| Arc::clone(&self.freed))
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        // The permits are released right after this, before any waiter runs again.
        self.freed.notify_waiters();
    }
}

/// What a client gets from [`Pool::checkout`].
pub(crate) enum Checkout {
    /// An idle connection, to check before use.
    Idle(Box<Pooled>),
    /// Room for a new connection, to log in.
    Open(Slots),
}

/// A client's place in a pool's queue: given up when dropped, unless a connection was handed
/// to it ([`Pool::put`] counts that).
struct Place<'a> {
    pool: &'a Pool,
    receiver: oneshot::Receiver<Box<Pooled>>,
    handed: bool,
}

impl Place<'_> {
    /// Leaves the queue: a connection handed over just now is taken, not dropped.
    fn leave(mut self) -> Option<Box<Pooled>> {
        self.receiver.close();
        let conn = self.receiver.try_recv().ok()?;
        self.handed = true;
        Some(conn)
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if !self.handed {
            self.pool.shelf.lock().queued -= 1;
        }
    }
}

/// A client counted as waiting for a connection, and the time it waited, until dropped.
struct Waiting<'a> {
    stats: &'a PoolStats,
    since: Instant,
}

impl<'a> Waiting<'a> {
    fn new(stats: &'a PoolStats) -> Self {
        stats.waits.fetch_add(1, Ordering::Relaxed);
        stats.waiting.fetch_add(1, Ordering::Relaxed);
        Self {
            stats,
            since: Instant::now(),
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        let micros = u64::try_from(self.since.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.stats.wait_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

/// The server connections of one upstream, pool by pool, and its total cap.
pub(crate) struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    /// The upstream's total cap (`None`: no cap).
    upstream: Option<Arc<Semaphore>>,
    /// Woken when a connection of this upstream closes, or goes idle under the cap, so that
    /// waiters of a pool held back by the total cap look again.
    freed: Arc<Notify>,
}

impl Pools {
    /// Pools for an upstream that takes at most `max_server_connections` over all of them (0:
    /// no cap).
    pub(crate) fn new(max_server_connections: usize) -> Self {
        Self {
            upstream: (max_server_connections > 0)
                .then(|| Arc::new(Semaphore::new(max_server_connections))),
            pools: Mutex::new(HashMap::new()),
            freed: Arc::new(Notify::new()),
        }
    }

    /// The pool for `key`, made on first use with `settings` (resolved for its role and
    /// database).
    pub(crate) fn pool(&self, key: &PoolKey, settings: impl FnOnce() -> PoolConfig) -> Arc<Pool> {
        let mut pools = self.pools.lock();
        Arc::clone(pools.entry(key.clone()).or_insert_with(|| {
            let settings = settings();
            Arc::new(Pool {
                key: key.clone(),
                slots: Arc::new(Semaphore::new(settings.size)),
                settings,
                shelf: Mutex::new(Shelf::default()),
                changed: Notify::new(),
                stats: PoolStats::default(),
                welcomes: Mutex::new(VecDeque::new()),
            })
        }))
    }

    /// Every pool.
    pub(crate) fn all(&self) -> Vec<Arc<Pool>> {
        self.pools.lock().values().cloned().collect()
    }

    /// Every pool's state, ordered by role and database.
    pub(crate) fn snapshots(&self) -> Vec<PoolSnapshot> {
        let mut all: Vec<PoolSnapshot> = self.all().iter().map(|pool| pool.snapshot()).collect();
        all.sort_by(|a, b| (&a.role, &a.database).cmp(&(&b.role, &b.database)));
        all
    }

    /// An idle connection, or room for a new one, waiting in `pool`'s queue until `until`.
    /// `None` when none came in time.
    ///
    /// Waiting clients are served in order: a connection put back goes to the first of them
    /// (PgBouncer's queue). A client waits rather than log in a new connection while more
    /// connections are on their way back (being reset) than clients wait: a reset takes a
    /// round trip, a login far longer (a TLS handshake, Entra's token check, a new backend).
    pub(crate) async fn checkout(
        &self,
        pool: &Pool,
        until: tokio::time::Instant,
    ) -> Option<Checkout> {
        // The common case first: an idle connection, with nothing to wait for.
        if let Some(idle) = pool.shelf.lock().idle.pop() {
            return Some(Checkout::Idle(idle));
        }
        // Counted as waiting from the first wait on, until this ends however it ends.
        let mut waiting = None;
        loop {
            // Registered before looking, so that nothing that happens meanwhile is missed.
            let changed = pool.changed.notified();
            let freed = self.freed.notified();
            tokio::pin!(changed, freed);
            changed.as_mut().enable();
            freed.as_mut().enable();
            let may_open = {
                let shelf = pool.shelf.lock();
                // A client waits rather than log in a new connection while more are on their
                // way back than clients wait for them.
                let returning = pool.stats.returning.load(Ordering::SeqCst);
                shelf.idle.is_empty() && returning <= shelf.queued as u64
            };
            if may_open && let Some(slots) = self.try_slots(pool) {
                return Some(Checkout::Open(slots));
            }
            let mut place = {
                let mut shelf = pool.shelf.lock();
                if let Some(idle) = shelf.idle.pop() {
                    return Some(Checkout::Idle(idle));
                }
                let (sender, receiver) = oneshot::channel();
                shelf.waiters.push_back(sender);
                shelf.queued += 1;
                Place {
                    pool,
                    receiver,
                    handed: false,
                }
            };
            waiting.get_or_insert_with(|| Waiting::new(&pool.stats));
            let timed_out = tokio::select! {
                biased;
                conn = &mut place.receiver => match conn {
                    Ok(conn) => {
                        place.handed = true;
                        return Some(Checkout::Idle(conn));
                    }
                    Err(_) => false,
                },
                () = &mut changed => false,
                () = &mut freed => false,
                () = tokio::time::sleep_until(until) => true,
            };
            if let Some(conn) = place.leave() {
                return Some(Checkout::Idle(conn));
            }
            if timed_out {
                return None;
            }
        }
    }

    /// A slot in `pool` and under the upstream's cap; at the cap, an idle connection of another
    /// pool makes room.
    pub(crate) fn try_slots(&self, pool: &Pool) -> Option<Slots> {
        let own = Arc::clone(&pool.slots).try_acquire_owned().ok()?;
        let taken = |upstream| Slots {
            _pool: own,
            upstream,
            freed: Arc::clone(&self.freed),
        };
        let Some(upstream) = &self.upstream else {
            return Some(taken(None));
        };
        if let Ok(permit) = Arc::clone(upstream).try_acquire_owned() {
            return Some(taken(Some(permit)));
        }
        let victim = self
            .all()
            .into_iter()
            .filter(|other| other.key != pool.key)
            .find_map(|other| other.take_oldest_idle().map(|idle| (other, idle)));
        let (other, idle) = victim?;
        // Closed here, not in the background: its permit must be free now.
        other.count_close(CloseReason::Evicted);
        let Pooled { server, slots, .. } = *idle;
        drop(slots);
        terminate_soon(server);
        let permit = Arc::clone(upstream).try_acquire_owned().ok()?;
        Some(taken(Some(permit)))
    }

    /// Closes idle connections past their lifetime or idle timeout (keeping each pool's
    /// minimum), for the background task.
    pub(crate) fn retire(&self) {
        let now = Instant::now();
        for pool in self.all() {
            let expired: Vec<(Box<Pooled>, CloseReason)> = {
                let mut shelf = pool.shelf.lock();
                // Clients that stopped waiting left their places in the queue; a connection
                // put back skips them, and here they go.
                shelf.waiters.retain(|waiter| !waiter.is_closed());
                let idle = &mut shelf.idle;
                let mut kept = Vec::with_capacity(idle.len());
                let mut out = Vec::new();
                let total = idle.len();
                for conn in idle.drain(..) {
                    if now >= conn.retire_at {
                        out.push((conn, CloseReason::Lifetime));
                    } else if now.duration_since(conn.idle_since) >= pool.settings.idle_timeout
                        && total - out.len() > pool.settings.min_idle
                    {
                        out.push((conn, CloseReason::Idle));
                    } else {
                        kept.push(conn);
                    }
                }
                *idle = kept;
                out
            };
            for (conn, reason) in expired {
                pool.close(conn, reason);
            }
        }
    }

    /// How many more idle connections `pool` should have to reach its minimum.
    pub(crate) fn missing_idle(&self, pool: &Pool) -> usize {
        pool.settings.min_idle.saturating_sub(pool.idle_count())
    }

    /// Closes every idle connection (the proxy is stopping).
    pub(crate) fn close_all(&self) {
        for pool in self.all() {
            let idle: Vec<Box<Pooled>> = pool.shelf.lock().idle.drain(..).collect();
            for conn in idle {
                pool.close(conn, CloseReason::Shutdown);
            }
        }
    }
}

/// One pool: its settings, its idle connections, its size, its queue and its counters.
pub(crate) struct Pool {
    pub(crate) key: PoolKey,
    /// Its settings, resolved for its role and database.
    pub(crate) settings: PoolConfig,
    slots: Arc<Semaphore>,
    shelf: Mutex<Shelf>,
    /// Woken when waiting clients should look again (a connection on its way back arrived,
    /// or was closed).
    changed: Notify,
    pub(crate) stats: PoolStats,
    /// The `ParameterStatus` messages its connections sent for clients' values of the tracked
    /// parameters: values a server accepted, most recent last.
    welcomes: Mutex<VecDeque<Welcome>>,
}

/// Clients' values of the tracked parameters, and what the server reported once set to them.
struct Welcome {
    tracked: Tracked,
    params: Bytes,
}

/// How many sets of tracked values a pool remembers the welcome of: the applications of one
/// role and database (each its `application_name`) are few.
const WELCOMES: usize = 16;

/// A pool's idle connections and the clients waiting for one, under one lock, so that a
/// connection put back never misses a client that has just started to wait.
#[derive(Default)]
struct Shelf {
    /// Most recently returned last (handed out first: its caches are warm).
    // Boxed: a connection moves between the shelf and its clients without being moved out of
    // (or into) an allocation each time.
    #[allow(clippy::vec_box)]
    idle: Vec<Box<Pooled>>,
    /// In the order they came (with the places of clients that stopped waiting, skipped).
    waiters: VecDeque<oneshot::Sender<Box<Pooled>>>,
    /// Clients waiting and not yet handed a connection.
    queued: usize,
}

impl Pool {
    /// Wraps a connection just logged in with `slots`, retiring at `token_expiry` or its
    /// lifetime, whichever comes first.
    pub(crate) fn pooled(
        &self,
        server: ServerConn,
        slots: Slots,
        token_expiry: std::time::SystemTime,
    ) -> Box<Pooled> {
        let until_expiry = token_expiry
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        let now = Instant::now();
        Box::new(Pooled {
            retire_at: now + until_expiry.min(self.settings.server_lifetime),
            idle_since: now,
            server,
            slots,
        })
    }

    fn take_oldest_idle(&self) -> Option<Box<Pooled>> {
        let mut shelf = self.shelf.lock();
        (!shelf.idle.is_empty()).then(|| shelf.idle.remove(0))
    }

    /// The `ParameterStatus` messages for a client with `tracked` values, if a connection of
    /// this pool has taken them (so the server accepts them, as at a login).
    pub(crate) fn welcome(&self, tracked: &Tracked) -> Option<Bytes> {
        let welcomes = self.welcomes.lock();
        let found = welcomes.iter().rev().find(|w| w.tracked == *tracked)?;
        Some(found.params.clone())
    }

    /// Remembers what a connection of this pool reports once set to `tracked` values (newer
    /// than what was remembered: a server restarted, upgraded or failed over reports anew).
    pub(crate) fn remember_welcome(&self, tracked: &Tracked, params: Bytes) {
        let mut welcomes = self.welcomes.lock();
        if let Some(at) = welcomes.iter().position(|w| w.tracked == *tracked) {
            if welcomes[at].params == params {
                return;
            }
            welcomes.remove(at);
        }
        if welcomes.len() == WELCOMES {
            welcomes.pop_front();
        }
        welcomes.push_back(Welcome {
            tracked: tracked.clone(),
            params,
        });
    }

    /// Idle connections now.
    pub(crate) fn idle_count(&self) -> usize {
        self.shelf.lock().idle.len()
    }

    /// Marks a connection as on its way back until the guard is dropped (after it was put back
    /// or closed): clients wait for it rather than log in another.
    pub(crate) fn returning(&self) -> Returning<'_> {
        self.stats.returning.fetch_add(1, Ordering::SeqCst);
        Returning(self)
    }

    /// Puts a reset connection back: to the first client waiting, or on the shelf.
    pub(crate) fn put(&self, mut conn: Box<Pooled>) {
        conn.idle_since = Instant::now();
        let mut shelf = self.shelf.lock();
        while let Some(waiter) = shelf.waiters.pop_front() {
            // A client that stopped waiting gives it back.
            match waiter.send(conn) {
                Ok(()) => {
                    shelf.queued -= 1;
                    return;
                }
                Err(back) => conn = back,
            }
        }
        // Under the upstream's cap, clients of other pools may wait for room that this idle
        // connection can make: they look again.
        let capped = conn.slots.capped();
        shelf.idle.push(conn);
        drop(shelf);
        if let Some(freed) = capped {
            freed.notify_waiters();
        }
    }

    /// Closes a connection for `reason`: its slots free at once, the server is told in the
    /// background.
    pub(crate) fn close(&self, conn: Box<Pooled>, reason: CloseReason) {
        self.count_close(reason);
        terminate_soon(conn.server);
    }

    fn count_close(&self, reason: CloseReason) {
        self.stats.closed[reason.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// A connection on its way back to its pool; see [`Pool::returning`].
pub(crate) struct Returning<'a>(&'a Pool);

impl Drop for Returning<'_> {
    fn drop(&mut self) {
        self.0.stats.returning.fetch_sub(1, Ordering::SeqCst);
        // Whoever waited for it looks again: it was handed over, or closed and room is left
        // for a login.
        self.0.changed.notify_waiters();
    }
}

/// Ends a server connection politely, within a second, in the background (or just closes it
/// when no runtime runs any more).
fn terminate_soon(mut server: ServerConn) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(1), server.terminate()).await;
        });
    }
}
