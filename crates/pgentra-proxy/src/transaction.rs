//! Transaction pooling: a client holds a server connection only while it needs one — from its
//! first message while it holds none, until the server says it is idle (`ReadyForQuery` `I`)
//! with nothing the client sent left unanswered — and the pool's connections serve other
//! clients in between (PgBouncer's `pool_mode = transaction`).
//!
//! Both directions are read as whole messages (a `DataRow` or `CopyData` passes through as it
//! comes), and the answers the client is owed are queued in the order it asked for them, as
//! the protocol's "Pipelining" section describes. That queue tells when a connection is free;
//! it lets the proxy answer some messages itself (the `Parse` of a statement the connection
//! already has, the `Close` of a client's statement) in their turn; and it lets the proxy
//! prepare a client's statements on whichever connection it gets, dropping the answers to what
//! it sent of its own ([`crate::statements`]).
//!
//! Session state that would outlive a transaction pins the client to its connection for the
//! rest of its session ([`crate::pinning`]); that connection is reset before another client
//! gets it. Tracked parameters (`application_name`, `TimeZone`, ...) do not pin: the server
//! reports each change, and the proxy sets the client's values on every connection it gets.

use crate::cancel;
use crate::lease::{self, Lease, Reset};
use crate::pinning::{self, PinReason};
use crate::pool::{CloseReason, Pool, Pooled};
use crate::refusal::Refusal;
use crate::relay::{Ending, Relayed, turns_true};
use crate::shared::{InstanceState, Shared};
use crate::startup::{StartupError, Stream};
use crate::statements::{ClientStatements, Statement, Unnamed};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

/// Longest client message the proxy holds whole (`Query`, `Parse`, `Bind`, ...); `CopyData`
/// passes through at any length. PostgreSQL's own limit is 1 GB.
const MAX_CLIENT_MESSAGE: usize = 256 << 20;
/// Longest server message held whole; `DataRow` and `CopyData` pass through at any length.
const MAX_SERVER_MESSAGE: usize = 64 << 20;
/// Bytes read at a time from either side.
const READ_SIZE: usize = 8192;
/// Answers a client may be owed before the proxy stops reading from it (it reads on once the
/// server has answered): pipelines are bounded in memory, as by a socket's buffer.
const MAX_OWED: usize = 16_384;
/// Bytes waiting for the server before the proxy stops reading from the client.
const MAX_UNSENT: usize = 1 << 20;
/// Names an error may need translating, per connection held (the latest kept).
const MAX_RENAMES: usize = 64;
/// Prepared statements one client may hold (PostgreSQL has no limit, but the proxy holds
/// them for every client of a pool).
const MAX_CLIENT_STATEMENTS: usize = 10_000;

const PARSE_COMPLETE: &[u8] = b"1\0\0\0\x04";
const CLOSE_COMPLETE: &[u8] = b"3\0\0\0\x04";

/// One client's session in transaction pooling.
pub(crate) struct Transactions<'a> {
    pub(crate) shared: &'a Shared,
    pub(crate) instance: &'a InstanceState,
    pub(crate) pool: Arc<Pool>,
    /// The client's proxy-issued cancel key, pointed at each connection it holds.
    pub(crate) key: cancel::Key,
    /// The client's values of the tracked parameters, as it last set them.
    pub(crate) tracked: Vec<(&'static str, Bytes)>,
}

/// How a transaction-pooled session ended.
pub(crate) struct TransactionsEnd {
    pub(crate) relayed: Relayed,
    /// Why the proxy ended it, for the client's `FATAL`; `None` when the client left.
    pub(crate) refusal: Option<Refusal>,
}

/// An answer the client is owed, in order.
enum Expect {
    /// `ParseComplete`: passed on for the client's `Parse`, dropped for the proxy's. If the
    /// server does not run it, `undo` takes back what it would have defined.
    Parse {
        pass: bool,
        undo: Undo,
    },
    Bind,
    /// `CloseComplete`, passed on or not.
    Close {
        pass: bool,
        undo: Undo,
    },
    /// `ParameterDescription` (once `parameters`), then `RowDescription` or `NoData`.
    DescribeStatement {
        parameters: bool,
    },
    DescribePortal,
    /// Rows, then `CommandComplete`, `EmptyQueryResponse` or `PortalSuspended`.
    Execute,
    Sync,
    /// A simple query or a function call: everything up to `ReadyForQuery`.
    Query {
        undo: Undo,
    },
    /// An answer the proxy gives itself, in its turn.
    Own {
        message: &'static [u8],
        undo: Undo,
    },
    /// The client's `CopyDone` or `CopyFail`, sent before the server began the `COPY` it ends:
    /// the `Sync`s before it will be read in copy-in mode, where the server ignores them.
    CopyEnd,
}

/// What to take back for a message the server did not run (it failed, or an error before it
/// made the server skip it): the client must see the statements PostgreSQL would have. (What
/// the server's unnamed statement holds is unknown after any error.)
enum Undo {
    None,
    /// The client's `Parse` defined this name (and the server was to prepare the statement).
    Defined(Bytes, Option<Arc<Statement>>),
    /// The client's `Close` removed this statement.
    Closed(Bytes, Arc<Statement>),
    /// The proxy's `Parse` of a statement on the server.
    Prepared(Arc<Statement>),
    /// The proxy's `Close` of a statement it evicted: still prepared if skipped.
    Evicted(Arc<Statement>, Bytes),
    /// The client's unnamed statement was this before a `Parse` of it, or a simple query: if
    /// skipped, it still is; if the `Parse` failed, there is none ("PostgreSQL drops the old
    /// one first").
    Unnamed(Option<Arc<Statement>>),
}

/// Why the relay stopped.
enum Stop {
    /// The client sent `Terminate` or closed its connection.
    ClientDone,
    /// The client's connection failed.
    ClientGone,
    /// The server connection broke, or answered out of turn.
    ServerGone(String),
    /// The proxy ends the session with this `FATAL`.
    Refuse(Refusal),
    /// The drain timeout passed.
    Killed,
}

fn stop_for(error: StartupError) -> Stop {
    match error {
        StartupError::Refuse(refusal) => Stop::Refuse(refusal),
        StartupError::Gone(_) => Stop::ClientGone,
    }
}

/// The server connection a client holds, and what it is owed from it.
struct Held {
    conn: Box<Pooled>,
    expect: VecDeque<Expect>,
    /// Server bytes not yet handled.
    input: BytesMut,
    /// Bytes for the server, sent when the client's input is handled.
    output: BytesMut,
    /// Body bytes of a `DataRow` or `CopyData` still to pass to the client.
    streaming: usize,
    /// The status of the last `ReadyForQuery`.
    status: u8,
    /// After an error in an extended-query message, the server "reads and discards messages
    /// until a Sync is reached": until the client's `Sync`, its messages are passed on as they
    /// are and owed nothing.
    skipping: bool,
    /// A parameter the proxy does not track was reported while held.
    reported_untracked: bool,
    /// The server is in copy-in mode and has yet to read the client's `CopyDone` or
    /// `CopyFail`: "the backend ignores Flush and Sync messages received during copy-in mode".
    copy_in: bool,
    /// Extended-query messages went to the server since its last `ReadyForQuery`: they run in
    /// an implicit transaction that only the `Sync` ends ("we do NOT close the open transaction
    /// command here; that only happens when the client sends Sync", `exec_parse_message`), so
    /// a client that sent them and then `Flush` keeps the connection.
    unsynced: bool,
    /// Bytes written to the TLS stream and not yet flushed.
    unflushed: bool,
    /// Statement names the server may put in an error, and the client's names for them: the
    /// client is told about its own statements, never the proxy's.
    renames: Vec<(Bytes, Bytes)>,
}

impl Held {
    fn new(conn: Box<Pooled>) -> Self {
        Self {
            conn,
            expect: VecDeque::new(),
            input: BytesMut::with_capacity(READ_SIZE),
            output: BytesMut::with_capacity(READ_SIZE),
            streaming: 0,
            status: b'I',
            skipping: false,
            reported_untracked: false,
            copy_in: false,
            unsynced: false,
            unflushed: false,
            renames: Vec::new(),
        }
    }

    /// Whether everything sent was answered and the server is idle outside a transaction, with
    /// nothing of it left unread and nothing for it left unsent.
    fn idle(&self) -> bool {
        self.expect.is_empty()
            && self.status == b'I'
            && !self.unsynced
            && self.streaming == 0
            && !self.skipping
            && self.input.is_empty()
            && self.output.is_empty()
            && !self.unflushed
    }

    /// Tells the client `client` where the server's errors say `server`.
    fn rename(&mut self, server: Bytes, client: Bytes) {
        if self.renames.len() >= MAX_RENAMES {
            self.renames.remove(0);
        }
        self.renames.push((server, client));
    }

    /// Queues an extended-query message of the proxy's own for the server.
    fn send_extended(&mut self, message: &[u8], expect: Expect) {
        self.output.put_slice(message);
        self.unsynced = true;
        self.expect.push_back(expect);
    }

    /// The server's name of `statement`, prepared there first if it is not yet (the answer is
    /// the proxy's, and dropped); past the limit, the least recently used goes.
    fn prepare(&mut self, statement: &Arc<Statement>, limit: usize) -> Bytes {
        let prepared = &mut self.conn.server.prepared;
        if let Some(name) = prepared.get(statement) {
            return name;
        }
        let (name, evicted) = prepared.insert(Arc::clone(statement), limit);
        if let Some((old, old_name)) = evicted {
            let close = close_message(b'S', &old_name);
            let undo = Undo::Evicted(old, old_name);
            self.send_extended(&close, Expect::Close { pass: false, undo });
        }
        let parse = statement.parse_message(&name);
        let undo = Undo::Prepared(Arc::clone(statement));
        self.send_extended(&parse, Expect::Parse { pass: false, undo });
        name
    }

    /// Makes the server's unnamed statement `wanted`, or none: a `Bind` of the unnamed
    /// statement must never find another client's.
    fn unnamed(&mut self, wanted: Option<&Arc<Statement>>) {
        let prepared = &mut self.conn.server.prepared;
        match wanted {
            Some(statement) if prepared.unnamed != Unnamed::Holds(Arc::clone(statement)) => {
                prepared.unnamed = Unnamed::Holds(Arc::clone(statement));
                let parse = statement.parse_message(b"");
                let expect = Expect::Parse {
                    pass: false,
                    undo: Undo::None,
                };
                self.send_extended(&parse, expect);
            }
            None if prepared.unnamed != Unnamed::Empty => {
                prepared.unnamed = Unnamed::Empty;
                let expect = Expect::Close {
                    pass: false,
                    undo: Undo::None,
                };
                self.send_extended(&close_message(b'S', b""), expect);
            }
            _ => {}
        }
    }
}

struct Relay<'a> {
    session: Transactions<'a>,
    /// Client bytes not yet handled.
    input: BytesMut,
    /// Body bytes of a client's `CopyData` still to pass to the server.
    copying: usize,
    /// Body bytes of a client's message still to drop (owed nothing, no server held).
    discarding: usize,
    statements: ClientStatements,
    held: Option<Held>,
    pinned: Option<PinReason>,
    /// Bytes for the client, sent when the server's input is handled.
    output: BytesMut,
    relayed: Relayed,
}

/// Relays a client's session in transaction pooling until it ends, and gives back the server
/// connection it holds then.
pub(crate) async fn relay(
    client: &mut Box<dyn Stream>,
    session: Transactions<'_>,
    kill: watch::Receiver<bool>,
) -> TransactionsEnd {
    let mut relay = Relay {
        session,
        input: BytesMut::with_capacity(READ_SIZE),
        copying: 0,
        discarding: 0,
        statements: ClientStatements::default(),
        held: None,
        pinned: None,
        output: BytesMut::with_capacity(READ_SIZE),
        relayed: Relayed::default(),
    };
    let stop = relay.run(client, kill).await;
    relay.finish(stop).await
}

impl Relay<'_> {
    async fn run(&mut self, client: &mut Box<dyn Stream>, mut kill: watch::Receiver<bool>) -> Stop {
        let mut draining = self.session.shared.draining();
        loop {
            // Owed too much, or the server is not taking what it was sent: the client waits.
            let reading = self
                .held
                .as_ref()
                .is_none_or(|held| held.expect.len() < MAX_OWED && held.output.len() < MAX_UNSENT);
            tokio::select! {
                read = client.read_buf(&mut self.input), if reading => match read {
                    Ok(0) => return Stop::ClientDone,
                    Ok(_) => {
                        if let Err(stop) = self.on_client().await {
                            return stop;
                        }
                    }
                    Err(_) => return Stop::ClientGone,
                },
                read = exchange(&mut self.held, &mut self.relayed.to_server) => match read {
                    Ok(n) if n > 0 => {
                        if let Err(stop) = self.on_server() {
                            return stop;
                        }
                    }
                    Ok(_) => return Stop::ServerGone("closed the connection".into()),
                    Err(error) => return Stop::ServerGone(format!("failed: {error}")),
                },
                () = turns_true(&mut kill) => return Stop::Killed,
                // A client between transactions is told to go at once; one in a transaction
                // is told when it ends.
                () = turns_true(&mut draining), if self.held.is_none() => {
                    return Stop::Refuse(Refusal::SessionShutdown);
                }
            }
            if !self.output.is_empty() {
                let sent = async {
                    client.write_all(&self.output).await?;
                    client.flush().await
                };
                if sent.await.is_err() {
                    return Stop::ClientGone;
                }
                self.relayed.to_client += self.output.len() as u64;
                self.output.clear();
            }
            if self.held.as_ref().is_some_and(Held::idle) && self.copying == 0 {
                self.check_reported();
                if self.pinned.is_none() {
                    self.release();
                }
            }
        }
    }

    /// Handles the client's complete messages (and passes on `CopyData` as it comes), taking a
    /// server connection for the first one that needs it.
    async fn on_client(&mut self) -> Result<(), Stop> {
        loop {
            if self.discarding > 0 {
                let take = self.discarding.min(self.input.len());
                if take == 0 {
                    return Ok(());
                }
                self.input.advance(take);
                self.discarding -= take;
                continue;
            }
            if self.copying > 0 {
                let take = self.copying.min(self.input.len());
                if take == 0 {
                    return Ok(());
                }
                let held = self.held.as_mut().expect("a COPY holds its connection");
                held.output.put_slice(&self.input.split_to(take));
                self.copying -= take;
                continue;
            }
            let Some((tag, len)) = header(&self.input) else {
                return Ok(());
            };
            // Frontend messages after the startup (the protocol's "Message Formats").
            if !b"BCdcfDEFHPQSX".contains(&tag) {
                return Err(Stop::Refuse(Refusal::ClientProtocol(format!(
                    "invalid frontend message type {tag}"
                ))));
            }
            let total = match len {
                Some(len) if len < MAX_CLIENT_MESSAGE => len,
                _ => {
                    return Err(Stop::Refuse(Refusal::ClientProtocol(format!(
                        "invalid message length: the pgentra proxy takes messages of up to {MAX_CLIENT_MESSAGE} bytes in transaction pooling"
                    ))));
                }
            };
            if tag == b'X' {
                return Err(Stop::ClientDone);
            }
            // Flush and copy messages outside a COPY are owed nothing, and PostgreSQL ignores
            // the latter ("we probably got here because a COPY failed, and the frontend is
            // still sending data"): with no connection held they need none.
            if self.held.is_none() && matches!(tag, b'H' | b'd' | b'c' | b'f') {
                let take = total.min(self.input.len());
                self.input.advance(take);
                self.discarding = total - take;
                continue;
            }
            if self.held.is_none() {
                self.checkout().await?;
            }
            let held = self.held.as_mut().expect("checked out above");
            if tag == b'd' {
                held.output.put_slice(&self.input.split_to(5));
                self.copying = total - 5;
                continue;
            }
            if self.input.len() < total {
                // Room grows with what arrives, not with what a header claims.
                self.input
                    .reserve((total - self.input.len()).min(READ_SIZE * 8));
                return Ok(());
            }
            let message = self.input.split_to(total).freeze();
            if held.skipping && tag != b'S' {
                held.output.put_slice(&message);
                continue;
            }
            self.on_message(tag, message)?;
        }
    }

    /// A server connection from the pool, set to the client's tracked parameters, with the
    /// client's cancel key pointed at it.
    async fn checkout(&mut self) -> Result<(), Stop> {
        let session = &self.session;
        let shared = session.shared;
        let deadline = Instant::now() + shared.config.login_timeout;
        let mut lease = Lease::new(shared, session.instance, deadline);
        let conn = lease
            .checkout(&session.pool, &session.pool.key)
            .await
            .map_err(stop_for)?;
        let conn = lease
            .set_tracked(conn, &session.pool, &self.session.tracked)
            .await
            .map_err(stop_for)?;
        let to = lease.cancel_target(&conn.server);
        shared.cancel_keys.point(&session.key, Some(to));
        session.pool.stats.active.fetch_add(1, Ordering::Relaxed);
        self.held = Some(Held::new(conn));
        Ok(())
    }

    /// Gives the connection back to the pool between transactions: at once, or once a cancel
    /// request still on its way to it has arrived (so it cannot cancel the next client's
    /// query).
    fn release(&mut self) {
        let Some(held) = self.held.take() else {
            return;
        };
        let session = &self.session;
        session.shared.cancel_keys.point(&session.key, None);
        let pool = &session.pool;
        pool.stats.active.fetch_sub(1, Ordering::Relaxed);
        let conn = *held.conn;
        if session.shared.is_draining() {
            pool.close(conn, CloseReason::Shutdown);
        } else if std::time::Instant::now() >= conn.retire_at {
            pool.close(conn, CloseReason::Lifetime);
        } else if conn.server.cancels.none() {
            pool.put(conn);
        } else {
            let pool = Arc::clone(pool);
            tokio::spawn(async move {
                if conn
                    .server
                    .cancels
                    .settled(lease::CANCEL_SETTLE_TIMEOUT)
                    .await
                {
                    pool.put(conn);
                } else {
                    pool.close(conn, CloseReason::ClientLeft);
                }
            });
        }
    }

    /// A reported parameter the proxy does not track that no longer has the value it had at
    /// the login (a function called `set_config`, say) is session state: it pins.
    fn check_reported(&mut self) {
        let Some(held) = &mut self.held else {
            return;
        };
        if !std::mem::take(&mut held.reported_untracked) {
            return;
        }
        let server = &held.conn.server;
        let changed = server.params.0.iter().any(|(name, value)| {
            crate::tracked::tracked(name).is_none() && server.defaults.get(name) != Some(value)
        });
        if changed {
            self.pin(PinReason::Set);
        }
    }

    fn pin(&mut self, reason: PinReason) {
        if self.pinned.is_none() {
            self.pinned = Some(reason);
            self.session.pool.stats.pin(reason);
            tracing::info!(
                reason = reason.label(),
                "session pinned to its server connection for the rest of the session"
            );
        }
    }

    /// One complete client message, with a server connection held.
    fn on_message(&mut self, tag: u8, message: Bytes) -> Result<(), Stop> {
        let limit = self.session.instance.pools.config().max_prepared_statements;
        let Relay {
            held,
            statements,
            output,
            ..
        } = self;
        let held = held.as_mut().expect("held by on_client");
        let body = message.slice(5..);
        let malformed = |what: &str| {
            Stop::Refuse(Refusal::ClientProtocol(format!(
                "invalid {what} message: a name is not terminated"
            )))
        };
        let mut pin = None;
        match tag {
            b'Q' => {
                let sql = body.strip_suffix(b"\0").unwrap_or(&body);
                pin = pinning::pins(&String::from_utf8_lossy(sql));
                // "A simple Query message also destroys the unnamed statement."
                let undo = Undo::Unnamed(statements.unnamed.take());
                held.conn.server.prepared.unnamed = Unnamed::Empty;
                held.output.put_slice(&message);
                held.unsynced = false;
                held.expect.push_back(Expect::Query { undo });
            }
            // A fast-path function call: what the function does is not known, so it pins. Its
            // answer ends with ReadyForQuery, as a query's.
            b'F' => {
                pin = Some(PinReason::Other);
                held.output.put_slice(&message);
                held.unsynced = false;
                held.expect.push_back(Expect::Query { undo: Undo::None });
            }
            b'P' => {
                let (name, definition) = split_name(&body).ok_or_else(|| malformed("Parse"))?;
                if name.is_empty() {
                    let statement = Statement::new(&definition);
                    let before = statements.unnamed.replace(Arc::clone(&statement));
                    held.conn.server.prepared.unnamed = Unnamed::Holds(statement);
                    let expect = Expect::Parse {
                        pass: true,
                        undo: Undo::Unnamed(before),
                    };
                    held.send_extended(&message, expect);
                } else if let Some(existing) = statements.get(&name).cloned() {
                    // PostgreSQL refuses a name in use (42P05): the server says so about
                    // the statement's name there, which the client is told as its own.
                    let server_name = held.prepare(&existing, limit);
                    let parse = existing.parse_message(&server_name);
                    held.rename(server_name, name);
                    let expect = Expect::Parse {
                        pass: true,
                        undo: Undo::None,
                    };
                    held.send_extended(&parse, expect);
                } else if statements.len() >= MAX_CLIENT_STATEMENTS {
                    return Err(Stop::Refuse(Refusal::TooManyStatements {
                        limit: MAX_CLIENT_STATEMENTS,
                    }));
                } else {
                    let statement = Statement::new(&definition);
                    statements.insert(name.clone(), Arc::clone(&statement));
                    if held.conn.server.prepared.get(&statement).is_some() {
                        let undo = Undo::Defined(name, None);
                        own(held, output, PARSE_COMPLETE, undo);
                    } else {
                        let prepared = &mut held.conn.server.prepared;
                        let (server_name, evicted) = prepared.insert(Arc::clone(&statement), limit);
                        if let Some((old, old_name)) = evicted {
                            let close = close_message(b'S', &old_name);
                            let undo = Undo::Evicted(old, old_name);
                            held.send_extended(&close, Expect::Close { pass: false, undo });
                        }
                        let parse = statement.parse_message(&server_name);
                        let expect = Expect::Parse {
                            pass: true,
                            undo: Undo::Defined(name, Some(statement)),
                        };
                        held.send_extended(&parse, expect);
                    }
                }
            }
            b'B' => {
                let (portal, rest) = split_name(&body).ok_or_else(|| malformed("Bind"))?;
                let (name, rest) = split_name(&rest).ok_or_else(|| malformed("Bind"))?;
                let statement = statements.get(&name).cloned();
                pin = statement.as_ref().and_then(|s| s.pins);
                let server_name = server_statement(held, &name, statement.as_ref(), limit);
                if server_name == name {
                    held.send_extended(&message, Expect::Bind);
                } else {
                    let mut bind = BytesMut::with_capacity(message.len() + server_name.len());
                    bind.put_slice(&portal);
                    bind.put_u8(0);
                    bind.put_slice(&server_name);
                    bind.put_u8(0);
                    bind.put_slice(&rest);
                    held.send_extended(&pgentra_wire::message(b'B', &bind), Expect::Bind);
                }
            }
            b'D' if body.first() == Some(&b'S') => {
                let (name, _) =
                    split_name(&body.slice(1..)).ok_or_else(|| malformed("Describe"))?;
                let statement = statements.get(&name).cloned();
                let server_name = server_statement(held, &name, statement.as_ref(), limit);
                let expect = Expect::DescribeStatement { parameters: false };
                held.send_extended(&describe_message(&server_name), expect);
            }
            b'D' => held.send_extended(&message, Expect::DescribePortal),
            // The client's statements are its own: closing one touches no server (the
            // statement stays prepared there for others). Closing a name that does not exist
            // "is not an error", as in PostgreSQL.
            b'C' if body.first() == Some(&b'S') => {
                let (name, _) = split_name(&body.slice(1..)).ok_or_else(|| malformed("Close"))?;
                let undo = match statements.remove(&name) {
                    Some(old) => Undo::Closed(name, old),
                    None => Undo::None,
                };
                own(held, output, CLOSE_COMPLETE, undo);
            }
            b'C' => {
                let expect = Expect::Close {
                    pass: true,
                    undo: Undo::None,
                };
                held.send_extended(&message, expect);
            }
            b'E' => held.send_extended(&message, Expect::Execute),
            b'S' => {
                held.skipping = false;
                held.output.put_slice(&message);
                if !held.copy_in {
                    // What follows is translated before the server has answered what precedes:
                    // if that fails, the server skips the rest of it, the unnamed statement
                    // included, so the next batch must not count on it.
                    if !held.expect.is_empty() {
                        held.conn.server.prepared.unnamed = Unnamed::Unknown;
                    }
                    held.unsynced = false;
                    held.expect.push_back(Expect::Sync);
                }
            }
            b'c' | b'f' => {
                held.output.put_slice(&message);
                // With nothing owed, no COPY can be about to begin.
                if !std::mem::take(&mut held.copy_in) && !held.expect.is_empty() {
                    held.expect.push_back(Expect::CopyEnd);
                }
            }
            // Flush: nothing is owed for it.
            _ => held.output.put_slice(&message),
        }
        if let Some(reason) = pin {
            self.pin(reason);
        }
        Ok(())
    }

    /// Handles the server's complete messages (and passes rows and `CopyData` as they come).
    fn on_server(&mut self) -> Result<(), Stop> {
        loop {
            let held = self.held.as_mut().expect("read from a held connection");
            if held.streaming > 0 {
                let take = held.streaming.min(held.input.len());
                if take == 0 {
                    return Ok(());
                }
                self.output.put_slice(&held.input.split_to(take));
                held.streaming -= take;
                continue;
            }
            let Some((tag, len)) = header(&held.input) else {
                return Ok(());
            };
            let Some(total) = len else {
                return Err(Stop::ServerGone("sent a malformed message".into()));
            };
            if matches!(tag, b'D' | b'd') {
                self.output.put_slice(&held.input.split_to(5));
                held.streaming = total - 5;
                continue;
            }
            if total > MAX_SERVER_MESSAGE {
                return Err(Stop::ServerGone(format!("sent a {total}-byte message")));
            }
            if held.input.len() < total {
                held.input
                    .reserve((total - held.input.len()).min(READ_SIZE * 8));
                return Ok(());
            }
            let message = held.input.split_to(total).freeze();
            self.on_server_message(tag, message)?;
        }
    }

    /// One complete server message: passed on or dropped, as the answer it is.
    fn on_server_message(&mut self, tag: u8, message: Bytes) -> Result<(), Stop> {
        let Relay {
            held,
            statements,
            output,
            session,
            ..
        } = self;
        let held = held.as_mut().expect("read from a held connection");
        let body = &message[5..];
        let out_of_turn = || {
            Stop::ServerGone(format!(
                "answered with an unexpected message ({:?})",
                char::from(tag)
            ))
        };
        let mut pass = true;
        let mut done = false;
        match (tag, held.expect.front_mut()) {
            (b'S', _) => {
                held.conn.server.params.report(body);
                let name = body.split(|b| *b == 0).next().unwrap_or_default();
                let name = std::str::from_utf8(name).unwrap_or_default();
                match crate::tracked::tracked(name) {
                    Some(tracked) => {
                        let value = held.conn.server.params.get(tracked).cloned();
                        session.tracked.retain(|(n, _)| *n != tracked);
                        session.tracked.extend(value.map(|v| (tracked, v)));
                    }
                    None => held.reported_untracked = true,
                }
            }
            // Notices and notifications come at any time.
            (b'N' | b'A', _) => {}
            (b'E', None | Some(Expect::Query { .. } | Expect::Sync)) => held.copy_in = false,
            (b'E', Some(_)) => {
                // "When an error is detected while processing any extended-query message,
                // the backend issues ErrorResponse, then reads and discards messages until a
                // Sync is reached."
                let failed = held.expect.pop_front().expect("matched above");
                let mut skipped = Vec::new();
                while held
                    .expect
                    .front()
                    .is_some_and(|e| !matches!(e, Expect::Sync))
                {
                    skipped.extend(held.expect.pop_front());
                }
                // Latest first: each undo restores the state from before its message.
                for expect in skipped.into_iter().rev() {
                    undo(expect, false, statements, held);
                }
                undo(failed, true, statements, held);
                held.conn.server.prepared.unnamed = Unnamed::Unknown;
                held.skipping = held.expect.is_empty();
                held.copy_in = false;
            }
            // Copy-in mode began: the Syncs the client sent since, up to its CopyDone or
            // CopyFail, go unanswered.
            (b'G', Some(front @ (Expect::Execute | Expect::Query { .. }))) => {
                // In the extended protocol the implicit transaction goes on until a Sync after
                // the copy.
                held.unsynced |= matches!(front, Expect::Execute);
                let mut at = 1;
                while let Some(next) = held.expect.get(at) {
                    match next {
                        Expect::CopyEnd => break,
                        Expect::Sync => drop(held.expect.remove(at)),
                        _ => at += 1,
                    }
                }
                match held.expect.get(at) {
                    Some(Expect::CopyEnd) => drop(held.expect.remove(at)),
                    _ => held.copy_in = true,
                }
            }
            (b'Z', Some(Expect::Sync | Expect::Query { .. })) => {
                held.status = body.first().copied().unwrap_or(b'E');
                held.copy_in = false;
                done = true;
            }
            (b'C', Some(front @ (Expect::Execute | Expect::Query { .. }))) => {
                // DISCARD ALL and DEALLOCATE ALL drop every prepared statement, the client's
                // included, as PostgreSQL would.
                if body.starts_with(b"DISCARD ALL\0") || body.starts_with(b"DEALLOCATE ALL\0") {
                    held.conn.server.prepared.clear();
                    *statements = ClientStatements::default();
                }
                done = matches!(front, Expect::Execute);
            }
            (b'I' | b's', Some(front @ (Expect::Execute | Expect::Query { .. }))) => {
                done = matches!(front, Expect::Execute);
            }
            (b'1', Some(Expect::Parse { pass: p, .. }))
            | (b'3', Some(Expect::Close { pass: p, .. })) => {
                pass = *p;
                done = true;
            }
            (b'2', Some(Expect::Bind)) => done = true,
            (b't', Some(Expect::DescribeStatement { parameters })) if !*parameters => {
                *parameters = true;
            }
            (
                b'T' | b'n',
                Some(Expect::DescribeStatement { parameters: true } | Expect::DescribePortal),
            ) => {
                done = true;
            }
            (b'T', Some(Expect::Query { .. })) => {}
            // Rows, COPY, function results: the answers of what is running.
            (b'H' | b'W' | b'c' | b'V', Some(Expect::Execute | Expect::Query { .. })) => {}
            _ => return Err(out_of_turn()),
        }
        if pass && tag == b'E' && !held.renames.is_empty() {
            output.put_slice(&rename(&message, &held.renames));
        } else if pass {
            output.put_slice(&message);
        }
        if done {
            held.expect.pop_front();
        }
        // The proxy's own answers whose turn has come, and copy ends that began no COPY.
        loop {
            match held.expect.front() {
                Some(Expect::Own { message, .. }) => output.put_slice(message),
                Some(Expect::CopyEnd) => {}
                _ => break,
            }
            held.expect.pop_front();
        }
        Ok(())
    }

    /// Ends the session: the connection held, if any, goes back (reset if the session was
    /// pinned), or is closed when it is not known to be clean.
    async fn finish(mut self, stop: Stop) -> TransactionsEnd {
        let session = &self.session;
        let killed = matches!(stop, Stop::Killed);
        let refusal = match stop {
            Stop::Refuse(refusal) => Some(refusal),
            Stop::ServerGone(what) => Some(Refusal::ServerLost {
                upstream: session.instance.target.name.clone(),
                what,
            }),
            _ => None,
        };
        if let Some(held) = self.held.take() {
            let clean = held.expect.is_empty()
                && !held.unsynced
                && held.streaming == 0
                && !held.skipping
                && self.copying == 0;
            let ending = match (&refusal, clean) {
                _ if killed => Ending::Killed,
                (Some(Refusal::ServerLost { .. }), _) => Ending::ServerGone,
                (_, true) => Ending::ClientDone,
                (_, false) => Ending::ClientGone,
            };
            let reset = if self.pinned.is_some() {
                Reset::Required
            } else {
                Reset::Skip
            };
            session.shared.cancel_keys.point(&session.key, None);
            lease::give_back(
                *held.conn,
                &session.pool,
                ending,
                held.status,
                &session.tracked,
                reset,
                session.instance,
                session.shared,
            )
            .await;
        }
        if self.pinned.is_some() {
            session.pool.stats.pinned.fetch_sub(1, Ordering::Relaxed);
        }
        TransactionsEnd {
            relayed: self.relayed,
            refusal,
        }
    }
}

/// Writes what is waiting for the held server connection while reading what it sends, and
/// resolves when it has sent something (the count read; 0 when it closed). PostgreSQL stops
/// reading while its own output is blocked, so a proxy that only wrote, behind a large result,
/// would wait for ever. Pending while no connection is held.
async fn exchange(held: &mut Option<Held>, sent: &mut u64) -> std::io::Result<usize> {
    let Some(held) = held else {
        return std::future::pending().await;
    };
    std::future::poll_fn(|cx| {
        let stream = &mut held.conn.server.stream;
        while !held.output.is_empty() {
            match Pin::new(&mut *stream).poll_write(cx, &held.output) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    held.output.advance(n);
                    held.unflushed = true;
                    *sent += n as u64;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => break,
            }
        }
        // TLS keeps written bytes in its records until flushed.
        if held.output.is_empty() && held.unflushed {
            match Pin::new(&mut *stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => held.unflushed = false,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {}
            }
        }
        let mut buffer = [0u8; READ_SIZE];
        let mut read = ReadBuf::new(&mut buffer);
        match Pin::new(&mut *stream).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                held.input.put_slice(read.filled());
                Poll::Ready(Ok(read.filled().len()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Queues an answer of the proxy's own, sent at once when nothing is owed before it.
fn own(held: &mut Held, output: &mut BytesMut, message: &'static [u8], undo: Undo) {
    while matches!(held.expect.front(), Some(Expect::CopyEnd)) {
        held.expect.pop_front();
    }
    if held.expect.is_empty() {
        output.put_slice(message);
    } else {
        held.expect.push_back(Expect::Own { message, undo });
    }
}

/// The server's name for the client's statement `name` (its definition `statement`, if the
/// client has one), prepared there first when needed. A name the client does not have goes
/// as it is, so the server's error names it.
fn server_statement(
    held: &mut Held,
    name: &Bytes,
    statement: Option<&Arc<Statement>>,
    limit: usize,
) -> Bytes {
    match (statement, name.is_empty()) {
        (Some(statement), false) => held.prepare(statement, limit),
        (statement, true) => {
            held.unnamed(statement);
            Bytes::new()
        }
        // The proxy's own names are not the client's to use: a name that is not the
        // client's goes to the server as one it cannot have, so the client is told its name
        // does not exist.
        (None, false) if name.starts_with(b"__pgentra_") => {
            let absent = Bytes::from_static(b"__pgentra_not_prepared");
            held.rename(absent.clone(), name.clone());
            absent
        }
        (None, false) => name.clone(),
    }
}

/// Takes back what a message the server did not run would have done: it `failed` itself, or
/// an error before it made the server skip it.
fn undo(expect: Expect, failed: bool, statements: &mut ClientStatements, held: &mut Held) {
    let (Expect::Parse { undo, .. }
    | Expect::Own { undo, .. }
    | Expect::Close { undo, .. }
    | Expect::Query { undo }) = expect
    else {
        return;
    };
    let prepared = &mut held.conn.server.prepared;
    match undo {
        Undo::None => {}
        Undo::Defined(name, statement) => {
            statements.remove(&name);
            if let Some(statement) = statement {
                // Later batches may already name it: their errors must say the client's name.
                if let Some(server_name) = prepared.get(&statement) {
                    held.rename(server_name, name);
                }
                held.conn.server.prepared.remove(&statement);
            }
        }
        Undo::Closed(name, statement) => {
            statements.insert(name, statement);
        }
        Undo::Prepared(statement) => prepared.remove(&statement),
        Undo::Evicted(statement, name) => prepared.restore(statement, name),
        Undo::Unnamed(before) => statements.unnamed = if failed { None } else { before },
    }
}

/// A message's tag and whole length (tag included), once its header is in `input`; the length
/// is `None` when it is not one the protocol allows.
fn header(input: &[u8]) -> Option<(u8, Option<usize>)> {
    let head: [u8; 5] = input.get(..5)?.try_into().ok()?;
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    let total = usize::try_from(len)
        .ok()
        .filter(|len| *len >= 4)
        .map(|len| len + 1);
    Some((head[0], total))
}

/// A NUL-terminated name at the start of `body`, and what follows it.
fn split_name(body: &Bytes) -> Option<(Bytes, Bytes)> {
    let end = body.iter().position(|b| *b == 0)?;
    Some((body.slice(..end), body.slice(end + 1..)))
}

fn close_message(kind: u8, name: &[u8]) -> Bytes {
    let mut body = Vec::with_capacity(name.len() + 2);
    body.push(kind);
    body.extend_from_slice(name);
    body.push(0);
    pgentra_wire::message(b'C', &body)
}

fn describe_message(name: &[u8]) -> Bytes {
    let mut body = Vec::with_capacity(name.len() + 2);
    body.push(b'S');
    body.extend_from_slice(name);
    body.push(0);
    pgentra_wire::message(b'D', &body)
}

/// An `ErrorResponse` that names the server's statements, told about the client's.
fn rename(error: &Bytes, renames: &[(Bytes, Bytes)]) -> Bytes {
    let Ok(mut fields) = pgentra_wire::ErrorFields::parse(&error[5..]) else {
        return error.clone();
    };
    let Some(mut text) = fields.get(b'M').map(str::to_owned) else {
        return error.clone();
    };
    for (server, client) in renames {
        if let (Ok(server), Ok(client)) = (std::str::from_utf8(server), std::str::from_utf8(client))
        {
            text = text.replace(&format!("\"{server}\""), &format!("\"{client}\""));
        }
    }
    fields.set(b'M', text);
    fields.to_error_response()
}
