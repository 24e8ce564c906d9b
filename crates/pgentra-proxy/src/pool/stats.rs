//! A pool's counters and gauges, why its connections close, and what it looks like at a
//! moment (for `/pools` and `/metrics`).

use super::Pool;
use crate::config::PoolMode;
use crate::pinning::PinReason;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a server connection was closed, as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// Past its lifetime, or its token's expiry.
    Lifetime,
    /// Idle past the idle timeout.
    Idle,
    /// The server closed it, or it failed a check.
    Broken,
    /// The client left in the middle of a query, a `COPY`, or a cancel request.
    ClientLeft,
    /// The reset or rollback failed.
    ResetFailed,
    /// Made room under the upstream's cap for another pool.
    Evicted,
    /// The proxy is stopping.
    Shutdown,
}

impl CloseReason {
    pub(crate) const ALL: [Self; 7] = [
        Self::Lifetime,
        Self::Idle,
        Self::Broken,
        Self::ClientLeft,
        Self::ResetFailed,
        Self::Evicted,
        Self::Shutdown,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Lifetime => "lifetime",
            Self::Idle => "idle_timeout",
            Self::Broken => "broken",
            Self::ClientLeft => "client_left",
            Self::ResetFailed => "reset_failed",
            Self::Evicted => "evicted",
            Self::Shutdown => "shutdown",
        }
    }

    pub(super) fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// A pool's counters.
#[derive(Debug, Default)]
pub(crate) struct PoolStats {
    pub(crate) opened: AtomicU64,
    pub(crate) reused: AtomicU64,
    pub(crate) resets: AtomicU64,
    /// Clients' recorded settings set on a connection they got (transaction pooling).
    pub(crate) replays: AtomicU64,
    /// Connections checked on the server after a transaction that ran code the proxy cannot
    /// read (transaction pooling).
    pub(crate) state_checks: AtomicU64,
    pub(crate) waits: AtomicU64,
    pub(crate) wait_micros: AtomicU64,
    pub(crate) waiting: AtomicU64,
    pub(crate) active: AtomicU64,
    /// Client sessions logged in on this pool now.
    pub(crate) clients: AtomicU64,
    /// Sessions pinned to their server connection now (transaction pooling).
    pub(crate) pinned: AtomicU64,
    /// Connections on their way back (their reset running).
    pub(super) returning: AtomicU64,
    /// Sessions pinned, by reason.
    pub(crate) pins: [AtomicU64; PinReason::ALL.len()],
    pub(super) closed: [AtomicU64; CloseReason::ALL.len()],
}

/// What a pool looks like now, for `/metrics` and `/pools`.
#[derive(Debug, Clone)]
pub(crate) struct PoolSnapshot {
    pub(crate) mode: PoolMode,
    pub(crate) role: String,
    pub(crate) database: String,
    /// Names of the startup parameters that shape this pool's sessions.
    pub(crate) params: Vec<String>,
    pub(crate) size: usize,
    pub(crate) clients: u64,
    pub(crate) pinned: u64,
    pub(crate) active: u64,
    pub(crate) idle: u64,
    pub(crate) waiting: u64,
    pub(crate) opened: u64,
    pub(crate) reused: u64,
    pub(crate) resets: u64,
    pub(crate) replays: u64,
    pub(crate) state_checks: u64,
    pub(crate) waits: u64,
    pub(crate) wait_seconds: f64,
    pub(crate) closed: Vec<(&'static str, u64)>,
    pub(crate) pins: Vec<(&'static str, u64)>,
}

impl Pool {
    /// What the pool looks like now.
    pub(crate) fn snapshot(&self) -> PoolSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let stats = &self.stats;
        PoolSnapshot {
            role: self.key.role.clone(),
            database: self.key.database.clone(),
            params: self.key.params.iter().map(|(n, _)| n.clone()).collect(),
            mode: self.settings.mode,
            size: self.settings.size,
            clients: load(&stats.clients),
            pinned: load(&stats.pinned),
            active: load(&stats.active),
            idle: self.idle_count() as u64,
            waiting: load(&stats.waiting),
            opened: load(&stats.opened),
            reused: load(&stats.reused),
            resets: load(&stats.resets),
            replays: load(&stats.replays),
            state_checks: load(&stats.state_checks),
            waits: load(&stats.waits),
            #[allow(clippy::cast_precision_loss)] // far below 2^53 µs
            wait_seconds: load(&stats.wait_micros) as f64 / 1e6,
            closed: CloseReason::ALL
                .iter()
                .map(|r| (r.label(), load(&stats.closed[r.index()])))
                .collect(),
            pins: PinReason::ALL
                .iter()
                .map(|r| (r.label(), load(&stats.pins[r.index()])))
                .collect(),
        }
    }
}
