//! The timeouts of a pooled session, each an arm of the relay's one timer: which applies
//! depends on what the client and its server connection are doing, and each has the SQLSTATE
//! and text PostgreSQL uses for its own.
//!
//! | timeout | applies while | then |
//! |---|---|---|
//! | `client_idle_timeout` | nothing is owed and no transaction is open | FATAL 57P05 |
//! | `idle_transaction_timeout` | nothing is owed inside a transaction | FATAL 25P03 |
//! | `query_timeout` | an answer is owed | the query is cancelled (the client gets 57014); if it does not stop, FATAL 57014 |
//! | `transaction_timeout` | a transaction (or a statement outside one) runs | FATAL 25P04 |
//! | `client_stall_timeout` | the client sent part of a message and then nothing, holding a server connection | FATAL 08006 |

use super::{Relay, Stop};
use crate::cancel::{self, CancelTarget};
use crate::config::PoolConfig;
use crate::refusal::Refusal;
use ::bytes::Bytes;
use std::pin::Pin;
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// A deadline far enough away to mean none.
pub(super) const FAR: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a query cancelled for its timeout may take to stop before the session ends.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// Which timeout passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timeout {
    ClientIdle,
    IdleInTransaction,
    Query,
    /// The query cancelled for its timeout did not stop.
    QueryCancelled,
    Transaction,
    ClientStall,
}

/// What the relay is doing, as the timeouts see it.
#[derive(Debug, Clone, Copy)]
pub(super) struct State {
    pub(super) held: bool,
    pub(super) owed: bool,
    pub(super) settled: bool,
    pub(super) releasable: bool,
    pub(super) in_transaction: bool,
    /// Part of a client message has arrived, and not the rest.
    pub(super) partial: bool,
    /// The relay is not reading from the client (the server must catch up first).
    pub(super) paused: bool,
}

/// The session's timeouts and when each began to run.
#[derive(Debug)]
pub(super) struct Clock {
    client_idle: Option<Duration>,
    idle_transaction: Option<Duration>,
    query: Option<Duration>,
    transaction: Option<Duration>,
    stall: Option<Duration>,
    /// Since when the client is idle (or stalled): when it last sent anything, or when its
    /// last answer came, whichever is later — taken only when a timeout runs from it.
    client_at: Instant,
    /// The client sent something since the last [`arm`](Self::arm).
    client_read: bool,
    /// Nothing was owed at the last [`arm`](Self::arm).
    was_settled: bool,
    /// Since when an answer is owed (or since the last `ReadyForQuery`, while more are owed).
    busy_at: Option<Instant>,
    /// Since when a transaction runs.
    transaction_at: Option<Instant>,
    /// When a query was cancelled for its timeout.
    cancelled_at: Option<Instant>,
    armed: Option<(Instant, Timeout)>,
}

impl Clock {
    pub(super) fn new(settings: &PoolConfig) -> Self {
        Self {
            client_idle: settings.client_idle_timeout,
            idle_transaction: settings.idle_transaction_timeout,
            query: settings.query_timeout,
            transaction: settings.transaction_timeout,
            stall: settings.client_stall_timeout,
            client_at: Instant::now(),
            client_read: false,
            was_settled: true,
            busy_at: None,
            transaction_at: None,
            cancelled_at: None,
            armed: None,
        }
    }

    /// The client sent something (its time is taken when a timeout needs it).
    pub(super) fn client_read(&mut self) {
        self.client_read = true;
    }

    /// A `ReadyForQuery` came; `more` answers are still owed (a pipeline): the next query's
    /// time begins.
    pub(super) fn ready(&mut self, more: bool) {
        self.cancelled_at = None;
        if more && self.query.is_some() {
            self.busy_at = Some(Instant::now());
        }
    }

    /// The common case, before the relay's state is taken: no timeout is set but the stall's,
    /// and no message is half-sent (`partial`) on a connection held (`held`). Then no clock
    /// runs, and none is armed.
    #[inline]
    pub(super) fn at_rest(&mut self, held: bool, partial: bool) -> bool {
        let others = self.client_idle.is_some()
            || self.idle_transaction.is_some()
            || self.query.is_some()
            || self.transaction.is_some();
        if others || (held && partial && self.stall.is_some()) {
            return false;
        }
        self.client_read = false;
        self.armed = None;
        true
    }

    /// Starts and stops the clocks that follow the relay's state, and sets `timer` to the
    /// nearest deadline; whether one is set. (Past [`at_rest`](Self::at_rest).)
    pub(super) fn arm(&mut self, timer: Pin<&mut Sleep>, state: &State) -> bool {
        let stalling = state.held && state.partial && self.stall.is_some();
        let mut now = None;
        let mut now = || *now.get_or_insert_with(Instant::now);
        // The client's clock restarts when it sends something or its answers are done; its
        // time is taken only for a timeout that runs from it.
        let idles =
            state.settled && (self.client_idle.is_some() || self.idle_transaction.is_some());
        let was_settled = std::mem::replace(&mut self.was_settled, state.settled);
        let answered = state.settled && !was_settled;
        if (std::mem::take(&mut self.client_read) || answered) && (stalling || idles) {
            self.client_at = now();
        }
        if self.query.is_some() {
            match (state.owed, self.busy_at) {
                (true, None) => self.busy_at = Some(now()),
                (false, Some(_)) => (self.busy_at, self.cancelled_at) = (None, None),
                _ => {}
            }
        }
        if self.transaction.is_some() {
            match (state.releasable, self.transaction_at) {
                (false, None) => self.transaction_at = Some(now()),
                (true, Some(_)) => self.transaction_at = None,
                _ => {}
            }
        }
        let next = self.next(state);
        if next != self.armed
            && let Some((at, _)) = next
        {
            timer.reset(at);
        }
        self.armed = next;
        next.is_some()
    }

    /// The nearest deadline, and its timeout.
    fn next(&self, state: &State) -> Option<(Instant, Timeout)> {
        let mut nearest: Option<(Instant, Timeout)> = None;
        let mut consider = |since: Option<Instant>, limit: Option<Duration>, which| {
            if let (Some(since), Some(limit)) = (since, limit) {
                let at = since + limit;
                if nearest.is_none_or(|(best, _)| at < best) {
                    nearest = Some((at, which));
                }
            }
        };
        let client = Some(self.client_at);
        if state.held && state.partial && !state.paused {
            consider(client, self.stall, Timeout::ClientStall);
        }
        if state.settled && (!state.partial || !state.held) {
            match state.in_transaction {
                false => consider(client, self.client_idle, Timeout::ClientIdle),
                true => consider(client, self.idle_transaction, Timeout::IdleInTransaction),
            }
        }
        if state.owed {
            match self.cancelled_at {
                Some(_) => consider(
                    self.cancelled_at,
                    Some(CANCEL_GRACE),
                    Timeout::QueryCancelled,
                ),
                None => consider(self.busy_at, self.query, Timeout::Query),
            }
        }
        consider(self.transaction_at, self.transaction, Timeout::Transaction);
        nearest
    }

    /// The timeout whose deadline passed.
    fn fired(&mut self) -> Option<Timeout> {
        self.armed.take().map(|(_, which)| which)
    }

    /// The `ErrorResponse` the client gets for a query the proxy cancelled for its timeout
    /// (the server's says "canceling statement due to user request"); `None` for any other.
    pub(super) fn explain_cancel(&self, body: &[u8]) -> Option<Bytes> {
        let limit = self.query.filter(|_| self.cancelled_at.is_some())?;
        let mut fields = pgentra_wire::ErrorFields::parse(body).ok()?;
        if fields.get(b'C') != Some("57014") {
            return None;
        }
        fields.set(b'M', "canceling statement due to query timeout");
        fields.set(
            b'H',
            format!(
                "The pgentra proxy cancels a query that runs longer than {limit:?} (query_timeout)."
            ),
        );
        Some(fields.to_error_response())
    }

    /// The refusal a timeout ends the session with.
    fn refusal(&self, which: Timeout) -> Refusal {
        let limit = |limit: Option<Duration>| limit.unwrap_or_default();
        match which {
            Timeout::ClientIdle => Refusal::ClientIdleTimeout(limit(self.client_idle)),
            Timeout::IdleInTransaction => {
                Refusal::IdleInTransactionTimeout(limit(self.idle_transaction))
            }
            Timeout::Query | Timeout::QueryCancelled => Refusal::QueryTimeout(limit(self.query)),
            Timeout::Transaction => Refusal::TransactionTimeout(limit(self.transaction)),
            Timeout::ClientStall => Refusal::ClientStalled(limit(self.stall)),
        }
    }
}

impl Relay<'_> {
    /// What the relay is doing, for the timeouts.
    pub(super) fn state(&self) -> State {
        State {
            held: self.server.is_some(),
            owed: !self.owed.is_empty(),
            settled: self.owed.settled(),
            releasable: self.owed.releasable(),
            in_transaction: self.owed.status() != b'I',
            partial: !self.client_in.is_empty() || self.client_frames.mid_message(),
            paused: self.paused(),
        }
    }

    /// The armed timeout passed: a query is cancelled, anything else ends the session.
    pub(super) fn on_timeout(&mut self) -> Result<(), Stop> {
        match self.clock.fired() {
            None => Ok(()),
            Some(Timeout::Query) => {
                if let Some(guard) = &mut self.server {
                    let to = CancelTarget::of(&self.instance.target, guard.server());
                    cancel::spawn_send(to, self.shared.config.connect_timeout);
                    tracing::info!("a query ran past the query timeout: cancelled");
                }
                self.clock.cancelled_at = Some(Instant::now());
                Ok(())
            }
            Some(which) => Err(Stop::Refuse(self.clock.refusal(which))),
        }
    }
}
