//! The relay of a pooled session, one for both pool modes: the mode decides only when the
//! server connection goes back (PgBouncer's `release_server`) — between transactions in
//! transaction pooling, at the end in session pooling.
//!
//! Both directions are read as messages ([`crate::protocol::frames`]): what the client sends
//! is handed to the protocol tracker ([`Owed`]) and, in transaction pooling, translated
//! ([`Translator`]); what the server answers is passed on or dropped as the tracker says. Rows,
//! `COPY` data and (in session pooling) any large message stream through as they come. A
//! client holds no server connection until a message needs one ([`client`]); the server side
//! is in [`server`], the timeouts in [`timeouts`], and sessions with a server connection of
//! their own (`--pool-mode none`, replication) use the byte relay in [`bytes`].
//!
//! A client that leaves is noticed at once, whatever it was doing, and what it left on its
//! connection decides how the connection goes back ([`Release`]).

pub(crate) mod bytes;
mod client;
mod io;
mod server;
mod timeouts;

use crate::config::{PoolMode, StateCheck};
use crate::guard::{ClientGuard, Release, Reset, ServerGuard};
use crate::pool::CloseReason;
use crate::protocol::frames::Frames;
use crate::protocol::owed::Owed;
use crate::protocol::translate::{Translator, Undo};
use crate::refusal::Refusal;
use crate::settings::Settings;
use crate::shared::{InstanceState, Shared};
use crate::startup::Stream;
use crate::tracked::Tracked;
use ::bytes::{Bytes, BytesMut};
use io::{Exchanged, Io, Side};

use std::pin::pin;
use timeouts::Clock;
use tokio::sync::watch;

/// Bytes read at a time from either side.
const READ_SIZE: usize = 8 * 1024;
/// Answers a client may be owed before the proxy stops reading from it (it reads on once the
/// server has answered): pipelines are bounded in memory, as by a socket's buffer.
const MAX_OWED: usize = 16_384;
/// Bytes waiting for the server before the proxy stops reading from the client.
const MAX_UNSENT: usize = 1 << 20;
/// Bytes waiting for the client before the proxy stops reading from the server.
const MAX_UNREAD: usize = 256 * 1024;

/// Bytes relayed each way.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Relayed {
    pub(crate) to_server: u64,
    pub(crate) to_client: u64,
}

/// A client logged in on a pool, ready to relay.
pub(crate) struct Session<'a> {
    pub(crate) shared: &'a Shared,
    pub(crate) instance: &'a InstanceState,
    pub(crate) client: ClientGuard<'a>,
    /// The client's values of the tracked parameters (in transaction pooling, as it last set
    /// them).
    pub(crate) tracked: Tracked,
    /// The connection it took at its login, if it did.
    pub(crate) held: Option<ServerGuard<'a>>,
    /// The `ParameterStatus` messages it was welcomed with, when it was welcomed without a
    /// connection: the connection it takes tells it of any difference.
    pub(crate) welcome: Option<Bytes>,
}

/// How a relay ended.
pub(crate) struct End<'a> {
    pub(crate) relayed: Relayed,
    /// Why the proxy ended it, for the client's `FATAL`; `None` when the client left.
    pub(crate) refusal: Option<Refusal>,
    /// The connection the client held, and how it goes back (once the client is gone).
    pub(crate) release: Option<(ServerGuard<'a>, Release)>,
    /// The client's guard and tracked values, kept until its connection went back.
    pub(crate) client: ClientGuard<'a>,
    pub(crate) tracked: Tracked,
}

/// Why the relay stopped.
enum Stop {
    /// The client left: it closed its connection, or it said goodbye (`Terminate`) and was
    /// answered what it asked before.
    ClientLeft,
    /// The server connection broke, or answered out of turn.
    ServerGone(String),
    /// The proxy ends the session with this `FATAL`.
    Refuse(Refusal),
}

struct Relay<'a> {
    shared: &'a Shared,
    instance: &'a InstanceState,
    client: ClientGuard<'a>,
    tracked: Tracked,
    welcome: Option<Bytes>,
    /// The client's statements, translated (transaction pooling); `None` in session pooling,
    /// where they pass as they are.
    translator: Option<Translator>,
    client_in: BytesMut,
    client_frames: Frames,
    client_out: Side,
    /// The body of a streamed client message goes nowhere (`CopyData` with no connection).
    discarding: bool,
    /// The client said goodbye (`Terminate`): it sends nothing more, and the session ends once
    /// what it asked before is answered — its last statements run, as in PostgreSQL, which
    /// reads `Terminate` only after them.
    goodbye: bool,
    /// The client's connection is gone after its goodbye: answers still coming are dropped.
    client_closed: bool,
    server: Option<ServerGuard<'a>>,
    owed: Owed<Undo>,
    server_in: BytesMut,
    server_frames: Frames,
    server_out: Side,
    /// A parameter the proxy does not track was reported while the connection was held.
    reported_untracked: bool,
    /// The transaction ran code the proxy cannot read: the connection's state is checked
    /// before it goes back.
    opaque: bool,
    /// The client's session settings, as last read back (transaction pooling).
    settings: Settings,
    /// The settings the transaction's statements named: read back before the connection goes
    /// back.
    named: Vec<String>,
    clock: Clock,
}

/// Relays a client's session until it ends.
pub(crate) async fn relay<'a>(stream: &mut Box<dyn Stream>, session: Session<'a>) -> End<'a> {
    let transaction = session.client.pool.settings.mode == PoolMode::Transaction;
    let mut relay = Relay {
        shared: session.shared,
        instance: session.instance,
        clock: Clock::new(&session.client.pool.settings),
        client: session.client,
        tracked: session.tracked,
        welcome: session.welcome,
        translator: transaction.then(Translator::default),
        client_in: BytesMut::new(),
        client_frames: Frames::default(),
        client_out: Side::default(),
        discarding: false,
        goodbye: false,
        client_closed: false,
        server: session.held,
        owed: Owed::default(),
        server_in: BytesMut::new(),
        server_frames: Frames::default(),
        server_out: Side::default(),
        reported_untracked: false,
        opaque: false,
        settings: Settings::default(),
        named: Vec::new(),
    };
    let stop = relay.run(stream).await;
    relay.finish(stop)
}

impl<'a> Relay<'a> {
    async fn run(&mut self, stream: &mut Box<dyn Stream>) -> Stop {
        let mut draining = self.shared.draining();
        let mut draining = pin!(turns_true(&mut draining));
        let mut timer = pin!(tokio::time::sleep(timeouts::FAR));
        let mut client_first = false;
        loop {
            if !self.client_in.is_empty()
                && let Err(stop) = self.on_client().await
            {
                return stop;
            }
            if self.goodbye && (self.owed.is_empty() || self.owed.copy_in()) {
                return Stop::ClientLeft;
            }
            if self.client_closed {
                self.client_out.clear();
            }
            if let Err(stop) = self.release_between_transactions(stream).await {
                return stop;
            }
            let partial = !self.client_in.is_empty() || self.client_frames.mid_message();
            let armed = !self.clock.at_rest(self.server.is_some(), partial)
                && self.clock.arm(timer.as_mut(), &self.state());
            // Each side is read only while the other takes what it sent; a side held back is
            // woken when the other has taken enough.
            let client_reads = !self.paused() && !self.goodbye;
            let server_reads = self.client_out.pending() < MAX_UNREAD;
            let wake_client = (!client_reads).then_some(MAX_UNSENT);
            let wake_server = (!server_reads).then_some(MAX_UNREAD);
            let held = self.server.is_some();
            let server_stream = self.server.as_mut().map(|guard| &mut guard.server().stream);
            let client_stream = (!self.client_closed).then_some(&mut *stream);
            client_first = !client_first;
            let client = self.client_out.exchange(
                client_stream,
                &mut self.client_in,
                client_reads,
                wake_server,
            );
            let server = self.server_out.exchange(
                server_stream,
                &mut self.server_in,
                server_reads,
                wake_client,
            );
            tokio::select! {
                // The timer first: a side always ready must not hold off the timeouts.
                biased;
                () = &mut timer, if armed => {
                    if let Err(stop) = self.on_timeout() {
                        return stop;
                    }
                }
                // A client holding no connection is told to go at once; one in a transaction
                // is told when it ends.
                () = &mut draining, if !held => return Stop::Refuse(Refusal::SessionShutdown),
                exchanged = io::either(client_first, client, server) => match exchanged {
                    Exchanged::Client(Ok(Io::Read(0)) | Err(_)) if self.goodbye => self.client_closed = true,
                    Exchanged::Client(Ok(Io::Read(0)) | Err(_)) => return Stop::ClientLeft,
                    Exchanged::Client(Ok(Io::Read(_))) => self.clock.client_read(),
                    Exchanged::Server(Ok(Io::Read(0))) => return Stop::ServerGone("closed the connection".into()),
                    Exchanged::Server(Ok(Io::Read(_))) => {
                        if let Err(stop) = self.on_server() {
                            return stop;
                        }
                    }
                    Exchanged::Server(Err(error)) => return Stop::ServerGone(format!("failed: {error}")),
                    Exchanged::Client(Ok(Io::Drained)) | Exchanged::Server(Ok(Io::Drained)) => {}
                },
            }
        }
    }

    /// Whether the client must wait before the proxy reads more of it: it is owed too much,
    /// or the server is not taking what it was sent.
    fn paused(&self) -> bool {
        self.server_out.pending() >= MAX_UNSENT || self.owed.len() >= MAX_OWED
    }

    /// In transaction pooling, gives the connection back once the server is idle outside a
    /// transaction with nothing owed, sent or unread, unless the session is pinned.
    async fn release_between_transactions(
        &mut self,
        stream: &mut Box<dyn Stream>,
    ) -> Result<(), Stop> {
        if self.translator.is_none()
            || self.server.is_none()
            || self.client.pinned().is_some()
            || !self.owed.releasable()
            || !self.server_in.is_empty()
            || !self.server_out.idle()
            || self.client_frames.mid_message()
            || self.server_frames.mid_message()
        {
            return Ok(());
        }
        if self.client.pool.settings.state_check == StateCheck::Always {
            self.opaque = true;
        }
        if !self.named.is_empty() || self.opaque {
            // The client gets its answers first: what the server is asked next costs it no
            // wait.
            self.client_out.write_now(stream);
        }
        self.read_back().await?;
        self.check_reported();
        self.check_state().await?;
        if self.client.pinned().is_none()
            && let Some(guard) = self.server.take()
        {
            guard.release_idle();
        }
        Ok(())
    }

    /// Ends the session: how the connection held, if any, goes back (the caller gives it back
    /// once the client is gone).
    fn finish(mut self, stop: Stop) -> End<'a> {
        let (refusal, closed) = match stop {
            Stop::Refuse(refusal) => (Some(refusal), None),
            Stop::ServerGone(what) => (
                Some(Refusal::ServerLost {
                    upstream: self.instance.target.name.clone(),
                    what,
                }),
                Some(CloseReason::Broken),
            ),
            Stop::ClientLeft => (None, None),
        };
        let release = self.server.take().map(|guard| {
            let how = match closed {
                Some(reason) => Release::Close(reason),
                None => self.left_behind(),
            };
            (guard, how)
        });
        End {
            relayed: Relayed {
                to_server: self.server_out.written,
                to_client: self.client_out.written,
            },
            refusal,
            release,
            client: self.client,
            tracked: self.tracked,
        }
    }

    /// What the client left on its connection as the session ends.
    fn left_behind(&self) -> Release {
        let half_sent = self.client_frames.mid_message() || self.server_out.pending() > 0;
        if half_sent || self.owed.copy_in() || self.owed.skipping() {
            // The server waits for the rest of what the client was sending.
            return Release::Close(CloseReason::ClientLeft);
        }
        if self.owed.settled() {
            // Settings not yet read back, and state not yet checked, are not known: the
            // connection is reset as if pinned.
            let unknown = !self.named.is_empty() || self.opaque;
            let reset = match (&self.translator, self.client.pinned()) {
                (None, _) => Reset::Configured,
                (Some(_), Some(_)) => Reset::Required,
                (Some(_), None) if unknown => Reset::Required,
                (Some(_), None) => Reset::Skip,
            };
            return Release::Settled {
                status: self.owed.status(),
                reset,
            };
        }
        if self.owed.is_empty() {
            // An extended-query batch with no Sync: its implicit transaction would commit at
            // one; it must not.
            return Release::Close(CloseReason::ClientLeft);
        }
        Release::Running
    }
}

/// Resolves when `flag` is (or turns) true.
pub(crate) async fn turns_true(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|on| *on).await;
}
