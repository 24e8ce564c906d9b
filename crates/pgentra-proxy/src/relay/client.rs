//! The client's side of the relay: its messages, read as they come, each handed to the
//! tracker (and, in transaction pooling, translated) on its way to the server connection it
//! holds — taken from the pool with the first message that needs one.

use super::{Relay, Stop};
use crate::connector::Connector;
use crate::connector::OWN_QUERY_TIMEOUT;
use crate::guard::ServerGuard;
use crate::pinning::PinReason;
use crate::protocol::frames::{Frame, Head, Malformed, Wanted};
use crate::protocol::translate::Server;
use crate::refusal::Refusal;
use crate::server::{QueryError, columns};
use crate::settings::MAX_SETTINGS;
use crate::state_check::Found;
use ::bytes::Buf;

/// Longest client message the proxy holds whole (`Query`, `Parse`, `Bind`, ...; in session
/// pooling only `Describe` and `Close`); the rest stream through at any length. PostgreSQL's
/// own limit is 1 GB.
const MAX_CLIENT_MESSAGE: usize = 256 << 20;

/// Frontend messages after the startup (the protocol's "Message Formats").
const FRONTEND: &[u8] = b"BCdcfDEFHPQSX";

/// How the client's messages are read: whole where the proxy reads them (every message but
/// `CopyData` in transaction pooling, for the translation and the pinning rules; only
/// `Describe` and `Close`, whose kind byte the tracker needs, in session pooling).
fn wanted(head: Head, translated: bool) -> Wanted {
    let whole = if translated {
        head.tag != b'd'
    } else {
        matches!(head.tag, b'D' | b'C')
    };
    match (whole, head.len > MAX_CLIENT_MESSAGE) {
        (false, _) => Wanted::Stream,
        (true, false) => Wanted::Whole,
        (true, true) => Wanted::TooLong,
    }
}

impl Relay<'_> {
    /// Handles the client's bytes read so far — messages, and parts of streamed ones — until
    /// more are needed or the server must catch up first (taking them from the buffer once, at
    /// the end). Messages passed on as they are go to the server in one piece per run of them.
    pub(super) async fn on_client(&mut self) -> Result<(), Stop> {
        let mut at = 0;
        // The server is owed the bytes from `passed` to `at` as they are.
        let mut passed = 0;
        while at < self.client_in.len() && !self.paused() {
            let translated = self.translator.is_some();
            let frame = self
                .client_frames
                .next(&self.client_in[at..], |head| wanted(head, translated))
                .map_err(|error| Stop::Refuse(Refusal::ClientProtocol(invalid_length(error))))?;
            let Some(frame) = frame else {
                break;
            };
            if let Frame::Start(head) | Frame::Whole(head) = frame {
                if !FRONTEND.contains(&head.tag) {
                    return Err(Stop::Refuse(Refusal::ClientProtocol(format!(
                        "invalid frontend message type {}",
                        head.tag
                    ))));
                }
                if head.tag == b'X' {
                    // Nothing after it is read, by PostgreSQL either.
                    self.goodbye = true;
                    self.server_out.put(&self.client_in[passed..at]);
                    self.client_in.clear();
                    return Ok(());
                }
                // Flush and copy messages outside a COPY are owed nothing, and PostgreSQL
                // ignores the latter ("we probably got here because a COPY failed, and the
                // frontend is still sending data"): with no connection held they need none.
                self.discarding =
                    self.server.is_none() && matches!(head.tag, b'H' | b'd' | b'c' | b'f');
                if !self.discarding && self.server.is_none() {
                    self.checkout().await?;
                }
            }
            let verbatim = match frame {
                _ if self.discarding => false,
                Frame::Whole(head) => self.verbatim(at, head),
                Frame::Start(head) => {
                    self.owed.sent(head.tag, None);
                    true
                }
                Frame::Part(_) => true,
            };
            if !verbatim {
                self.server_out.put(&self.client_in[passed..at]);
                passed = at + frame.bytes();
                if let (false, Frame::Whole(head)) = (self.discarding, frame) {
                    self.translate(at, head)?;
                }
            }
            at += frame.bytes();
        }
        self.server_out.put(&self.client_in[passed..at]);
        self.client_in.advance(at);
        Ok(())
    }

    /// Whether a whole client message, at `at` in the buffer, goes to the server as it is
    /// (counted as sent): in session pooling, and while the server skips to a `Sync`.
    fn verbatim(&mut self, at: usize, head: Head) -> bool {
        if self.owed.skipping() && head.tag != b'S' {
            // "...reads and discards messages until a Sync is reached": owed nothing.
            return true;
        }
        if self.translator.is_some() {
            return false;
        }
        let kind = (head.len > 5).then(|| self.client_in[at + 5]);
        self.owed.sent(head.tag, kind);
        true
    }

    /// One whole client message, at `at` in the buffer, translated onto the server connection
    /// held (transaction pooling).
    fn translate(&mut self, at: usize, head: Head) -> Result<(), Stop> {
        let message = &self.client_in[at..at + head.len];
        let Some(translator) = &mut self.translator else {
            return Ok(());
        };
        let limit = self.client.pool.settings.max_prepared_statements;
        let guard = self.server.as_mut().expect("held by on_client");
        let server = Server {
            prepared: &mut guard.server().prepared,
            owed: &mut self.owed,
            output: self.server_out.buf(),
        };
        let effect = translator
            .message(head.tag, message, server, self.client_out.buf(), limit)
            .map_err(Stop::Refuse)?;
        let Some(effect) = effect else {
            return Ok(());
        };
        if let Some(reason) = effect.pins {
            self.pin(reason);
        }
        self.opaque |= effect.opaque;
        if self.client.pinned().is_some() {
            // The session keeps its connection, settings and all.
            return Ok(());
        }
        for name in effect.settings {
            if !self.named.contains(&name) {
                self.named.push(name);
            }
        }
        if self.named.len() > MAX_SETTINGS {
            self.pin(PinReason::Set);
        }
        Ok(())
    }

    /// A server connection from the pool, set to the client's tracked parameters.
    async fn checkout(&mut self) -> Result<(), Stop> {
        let pool = &self.client.pool;
        let mut connector = Connector::new(self.shared, self.instance);
        let conn = connector
            .checkout(pool, &self.tracked, &self.settings)
            .await
            .map_err(Stop::Refuse)?;
        let mut guard = ServerGuard::new(conn, &self.client, self.instance);
        if let Some(welcome) = self.welcome.take() {
            let now = guard.server().params.messages();
            if now != welcome {
                // The server reports otherwise than the welcome said (it was restarted, or
                // upgraded): "ParameterStatus messages will be generated whenever the active
                // value changes for any of the parameters the backend believes the frontend
                // should know about" (protocol, 55.2.7), so the client hears of it now.
                self.client_out.put(&now);
                pool.remember_welcome(&self.tracked, now);
            }
        }
        if let Some(translator) = &mut self.translator {
            translator.held();
        }
        self.reported_untracked = false;
        self.opaque = false;
        self.named.clear();
        self.server = Some(guard);
        Ok(())
    }

    /// A reported parameter the proxy does not track that no longer has the value it had at
    /// the login (a function called `set_config`, say) is session state: it pins.
    pub(super) fn check_reported(&mut self) {
        if !std::mem::take(&mut self.reported_untracked) {
            return;
        }
        let Some(guard) = &mut self.server else {
            return;
        };
        let server = guard.server();
        let changed = server.params.iter().any(|(name, value)| {
            crate::tracked::server_index(name).is_none()
                && server.defaults.get(name) != Some(value)
                && !self.settings.contains(name)
        });
        if changed {
            self.pin(PinReason::Set);
        }
    }

    /// After a transaction that set or reset session settings, their values as the server
    /// shows them are recorded for the client ([`crate::settings`]); what cannot be recorded
    /// pins it.
    pub(super) async fn read_back(&mut self) -> Result<(), Stop> {
        if self.named.is_empty() || self.client.pinned().is_some() {
            return Ok(());
        }
        let named = std::mem::take(&mut self.named);
        let Some(guard) = &mut self.server else {
            return Ok(());
        };
        let server = guard.server();
        let (names, sql) = self.settings.read_back(&named);
        let values = match server.answers(&[&sql], OWN_QUERY_TIMEOUT).await {
            Ok(answers) => answers.rows.first().and_then(|row| columns(row)),
            Err(QueryError::Server(_)) => None,
            Err(QueryError::Broken(why)) => return Err(Stop::ServerGone(why)),
        };
        let recorded = values
            .filter(|values| values.len() == names.len())
            .map(|values| self.settings.record(names, values));
        match recorded {
            Some(Ok(())) => server.settings = self.settings.clone(),
            _ => self.pin(PinReason::Set),
        }
        Ok(())
    }

    /// After a transaction that ran code the proxy cannot read, the connection's state as the
    /// server tells it ([`state_check`](crate::state_check)): what a client keeps pins it, and
    /// the rest is reset.
    pub(super) async fn check_state(&mut self) -> Result<(), Stop> {
        if !std::mem::take(&mut self.opaque) || self.client.pinned().is_some() {
            return Ok(());
        }
        let Some(guard) = &mut self.server else {
            return Ok(());
        };
        let checks = &self.client.pool.stats.state_checks;
        checks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match crate::state_check::check(guard.server(), &self.tracked, &self.settings).await {
            Ok(Found::Clean) => Ok(()),
            Ok(Found::Pins(reason)) => {
                self.pin(reason);
                Ok(())
            }
            Err(why) => Err(Stop::ServerGone(why)),
        }
    }

    fn pin(&mut self, reason: PinReason) {
        if self.client.pin(reason) {
            tracing::info!(
                reason = reason.label(),
                "session pinned to its server connection for the rest of the session"
            );
        }
    }
}

/// The client's `FATAL` for a message the proxy cannot take.
fn invalid_length(error: Malformed) -> String {
    match error {
        Malformed::Length => "invalid message length".into(),
        Malformed::TooLong(len) => format!(
            "invalid message length {len}: the pgentra proxy takes messages of up to {MAX_CLIENT_MESSAGE} bytes whole"
        ),
    }
}
