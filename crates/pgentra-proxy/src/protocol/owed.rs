//! The answers a client is owed by the server connection it holds, in order — the protocol
//! state the relay keeps, as one small type with no I/O and no pool (PgBouncer's outstanding
//! requests, PgDog's `ProtocolState`).
//!
//! The relay tells it what went to the server ([`Owed::query`], [`Owed::extended`],
//! [`Owed::sync`], [`Owed::copy_end`]) and what came back ([`Owed::received`]); it answers
//! whether each server message is passed on or is the answer to one of the proxy's own
//! requests, dropped; it queues the answers the proxy gives itself ([`Owed::own`]) for their
//! turn; and it says when the connection may be released ([`Owed::releasable`]). It follows
//! the protocol's rules, quoted where they apply:
//!
//! - "Pipelining": batches may be sent before earlier ones are answered; answers come in order.
//! - "When an error is detected while processing any extended-query message, the backend issues
//!   ErrorResponse, then reads and discards messages until a Sync is reached": the messages
//!   skipped are owed nothing, and what they would have done is undone ([`Owed::undone`],
//!   latest first, the failed one last).
//! - An extended-query batch runs in an implicit transaction that only its `Sync` ends ("we do
//!   NOT close the open transaction command here; that only happens when the client sends
//!   Sync", `exec_parse_message`): a batch ended by `Flush` keeps its connection.
//! - COPY: "the backend ignores Flush and Sync messages received during copy-in mode".
//!
//! `U` is what undoes a message the server did not run (the statement translation's
//! [`Undo`](super::translate::Undo)); the tracker only keeps it in order.

use std::collections::VecDeque;

/// An answer the client is owed, in order.
#[derive(Debug)]
pub(crate) enum Expect<U> {
    /// `ParseComplete`, passed on (the client's `Parse`) or dropped (the proxy's).
    Parse { pass: bool, undo: U },
    /// `BindComplete`.
    Bind,
    /// `CloseComplete`, passed on or dropped.
    Close { pass: bool, undo: U },
    /// `ParameterDescription` (once `parameters`), then `RowDescription` or `NoData`.
    DescribeStatement { parameters: bool },
    /// `RowDescription` or `NoData`.
    DescribePortal,
    /// Rows, then `CommandComplete`, `EmptyQueryResponse` or `PortalSuspended`.
    Execute,
    /// `ReadyForQuery`.
    Sync,
    /// A simple query or a function call: everything up to `ReadyForQuery`.
    Query { undo: U },
    /// An answer the proxy gives itself, in its turn.
    Own { message: &'static [u8], undo: U },
    /// The client's `CopyDone` or `CopyFail`, sent before the server began the `COPY` it ends:
    /// the `Sync`s before it will be read in copy-in mode, where the server ignores them.
    CopyEnd,
}

/// What a server message is, for the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Received {
    /// Pass it on.
    Pass,
    /// The answer to one of the proxy's own requests: drop it.
    Drop,
    /// An error in an extended-query message: pass it on; what the server skipped is undone
    /// ([`Owed::undone`]), and the server's unnamed statement is no longer known.
    Failed,
    /// `ReadyForQuery`, with the transaction status: pass it on.
    Ready(u8),
}

/// A server message that answers nothing the client is owed: the connection cannot be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutOfTurn(pub(crate) u8);

impl std::fmt::Display for OutOfTurn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "answered with an unexpected message ({:?})",
            char::from(self.0)
        )
    }
}

/// The answers one client is owed by one server connection.
#[derive(Debug)]
pub(crate) struct Owed<U> {
    queue: VecDeque<Expect<U>>,
    /// The status of the last `ReadyForQuery`.
    status: u8,
    /// After an error in an extended-query message with no `Sync` owed yet, the server skips
    /// the client's messages up to its `Sync`: they are passed on as they are, owed nothing.
    skipping: bool,
    /// The server is in copy-in mode and has yet to read the client's `CopyDone` or `CopyFail`.
    copy_in: bool,
    /// Extended-query messages went to the server since its last `ReadyForQuery`.
    unsynced: bool,
    /// What the last error undid: each message's undo, and whether it was the one that failed.
    undone: Vec<(U, bool)>,
}

impl<U> Default for Owed<U> {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            status: b'I',
            skipping: false,
            copy_in: false,
            unsynced: false,
            undone: Vec::new(),
        }
    }
}

impl<U> Owed<U> {
    /// A client message that went to the server as it is (session pooling, or one the proxy
    /// does not translate), by its tag and, for `Describe` and `Close`, its kind byte. While the
    /// server skips to the next `Sync`, it is owed nothing.
    pub(crate) fn sent(&mut self, tag: u8, kind: Option<u8>)
    where
        U: Default,
    {
        if self.skipping && tag != b'S' {
            return;
        }
        match tag {
            b'Q' | b'F' => self.query(U::default()),
            b'P' => self.extended(Expect::Parse {
                pass: true,
                undo: U::default(),
            }),
            b'B' => self.extended(Expect::Bind),
            b'D' if kind == Some(b'S') => {
                self.extended(Expect::DescribeStatement { parameters: false });
            }
            b'D' => self.extended(Expect::DescribePortal),
            b'E' => self.extended(Expect::Execute),
            b'C' => self.extended(Expect::Close {
                pass: true,
                undo: U::default(),
            }),
            b'S' => {
                self.sync();
            }
            b'c' | b'f' => self.copy_end(),
            // Flush, and CopyData: nothing is owed for them.
            _ => {}
        }
    }

    /// A simple query or a function call went to the server (owed everything up to its
    /// `ReadyForQuery`; it ends an implicit transaction the extended protocol began).
    pub(crate) fn query(&mut self, undo: U) {
        self.unsynced = false;
        self.queue.push_back(Expect::Query { undo });
    }

    /// An extended-query message other than `Sync` went to the server.
    pub(crate) fn extended(&mut self, expect: Expect<U>) {
        self.unsynced = true;
        self.queue.push_back(expect);
    }

    /// A `Sync` went to the server. Returns whether answers to what went before it were still
    /// owed (so what follows is sent before the server has run what precedes it).
    pub(crate) fn sync(&mut self) -> bool {
        self.skipping = false;
        if self.copy_in {
            return false;
        }
        let ahead = !self.queue.is_empty();
        self.unsynced = false;
        self.queue.push_back(Expect::Sync);
        ahead
    }

    /// A `CopyDone` or `CopyFail` went to the server.
    pub(crate) fn copy_end(&mut self) {
        if self.copy_in {
            self.copy_in = false;
        } else if !self.queue.is_empty() {
            // Sent before the COPY began; with nothing owed, no COPY can be about to begin
            // ("we probably got here because a COPY failed, and the frontend is still sending
            // data": PostgreSQL ignores it).
            self.queue.push_back(Expect::CopyEnd);
        }
    }

    /// An answer of the proxy's own: the message to send now when nothing is owed before it,
    /// else `None` (it comes from [`next_own`](Self::next_own) in its turn).
    pub(crate) fn own(&mut self, message: &'static [u8], undo: U) -> Option<&'static [u8]> {
        self.drop_stale_copy_ends();
        if self.queue.is_empty() {
            return Some(message);
        }
        self.queue.push_back(Expect::Own { message, undo });
        None
    }

    /// The next answer of the proxy's own whose turn has come, after a server message.
    #[inline]
    pub(crate) fn next_own(&mut self) -> Option<&'static [u8]> {
        self.drop_stale_copy_ends();
        match self.queue.front() {
            Some(Expect::Own { message, .. }) => {
                let message = *message;
                self.queue.pop_front();
                Some(message)
            }
            _ => None,
        }
    }

    /// Copy ends at the front end no COPY: everything before them was answered.
    fn drop_stale_copy_ends(&mut self) {
        while matches!(self.queue.front(), Some(Expect::CopyEnd)) {
            self.queue.pop_front();
        }
    }

    /// A server message with tag `tag` and body `body` (empty for a streamed `DataRow` or
    /// `CopyData`, whose bodies it does not read).
    pub(crate) fn received(&mut self, tag: u8, body: &[u8]) -> Result<Received, OutOfTurn> {
        let mut received = Received::Pass;
        let mut done = false;
        match (tag, self.queue.front_mut()) {
            // Parameters, notices and notifications come at any time.
            (b'S' | b'N' | b'A', _) => {}
            (b'E', None | Some(Expect::Query { .. } | Expect::Sync)) => self.copy_in = false,
            (b'E', Some(_)) => {
                self.skip_until_sync();
                received = Received::Failed;
            }
            (b'G', Some(Expect::Execute | Expect::Query { .. })) => self.copy_in_began(),
            (b'Z', Some(Expect::Sync | Expect::Query { .. })) => {
                self.status = body.first().copied().unwrap_or(b'E');
                self.copy_in = false;
                received = Received::Ready(self.status);
                done = true;
            }
            (b'C' | b'I' | b's', Some(front @ (Expect::Execute | Expect::Query { .. }))) => {
                done = matches!(front, Expect::Execute);
            }
            (b'1', Some(Expect::Parse { pass, .. })) | (b'3', Some(Expect::Close { pass, .. })) => {
                if !*pass {
                    received = Received::Drop;
                }
                done = true;
            }
            (b'2', Some(Expect::Bind)) => done = true,
            (b't', Some(Expect::DescribeStatement { parameters })) if !*parameters => {
                *parameters = true;
            }
            (
                b'T' | b'n',
                Some(Expect::DescribeStatement { parameters: true } | Expect::DescribePortal),
            ) => done = true,
            // Rows, COPY, function results: the answers of what is running.
            (
                b'T' | b'D' | b'H' | b'W' | b'd' | b'c' | b'V',
                Some(Expect::Execute | Expect::Query { .. }),
            ) => {}
            _ => return Err(OutOfTurn(tag)),
        }
        if done {
            self.queue.pop_front();
        }
        Ok(received)
    }

    /// An error in an extended-query message: the server skips what follows up to the next
    /// `Sync`. The failed message and those skipped are undone, latest first ("each undo
    /// restores the state from before its message").
    fn skip_until_sync(&mut self) {
        self.undone.clear();
        let failed = self.queue.pop_front();
        while let Some(next) = self.queue.front() {
            if matches!(next, Expect::Sync) {
                break;
            }
            if let Some(skipped) = self.queue.pop_front().and_then(Expect::into_undo) {
                self.undone.push((skipped, false));
            }
        }
        self.undone.reverse();
        self.undone
            .extend(failed.and_then(Expect::into_undo).map(|undo| (undo, true)));
        self.skipping = self.queue.is_empty();
        self.copy_in = false;
    }

    /// Copy-in mode began (`CopyInResponse`): the `Sync`s the client sent since, up to its
    /// `CopyDone` or `CopyFail`, go unanswered; a copy end already sent is what ends it.
    fn copy_in_began(&mut self) {
        // In the extended protocol the implicit transaction goes on until a Sync after it.
        let execute = matches!(self.queue.front(), Some(Expect::Execute));
        let mut at = 1;
        while let Some(next) = self.queue.get(at) {
            match next {
                Expect::CopyEnd => {
                    self.queue.remove(at);
                    let synced = self.queue.range(at..).any(|e| matches!(e, Expect::Sync));
                    self.unsynced |= execute && !synced;
                    return;
                }
                Expect::Sync => drop(self.queue.remove(at)),
                _ => at += 1,
            }
        }
        self.unsynced |= execute;
        self.copy_in = true;
    }

    /// What the last [`Received::Failed`] undid, latest first: each undo, and whether its
    /// message is the one that failed.
    pub(crate) fn undone(&mut self) -> std::vec::Drain<'_, (U, bool)> {
        self.undone.drain(..)
    }

    /// Whether everything sent was answered and the server is idle outside a transaction: the
    /// connection may serve another client.
    pub(crate) fn releasable(&self) -> bool {
        self.settled() && self.status == b'I'
    }

    /// Whether everything sent was answered and the server waits for the client's next
    /// command (in or out of a transaction): a connection left so can be rolled back and reset.
    pub(crate) fn settled(&self) -> bool {
        self.queue.is_empty() && !self.unsynced && !self.skipping && !self.copy_in
    }

    /// Whether the server waits for the client's `COPY` data.
    pub(crate) fn copy_in(&self) -> bool {
        self.copy_in
    }

    /// Whether the client's messages are skipped by the server until its `Sync`.
    pub(crate) fn skipping(&self) -> bool {
        self.skipping
    }

    /// The status of the last `ReadyForQuery`: `I` idle, `T` in a transaction, `E` in a failed
    /// one.
    pub(crate) fn status(&self) -> u8 {
        self.status
    }

    /// How many answers are owed.
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether no answer is owed.
    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

impl<U> Expect<U> {
    fn into_undo(self) -> Option<U> {
        match self {
            Self::Parse { undo, .. }
            | Self::Close { undo, .. }
            | Self::Query { undo }
            | Self::Own { undo, .. } => Some(undo),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
