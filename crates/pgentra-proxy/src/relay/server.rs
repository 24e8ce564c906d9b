//! The server's side of the relay: its messages, passed on or dropped as the tracker says,
//! with rows and `COPY` data streamed as they come.

use super::{Relay, Stop};
use crate::protocol::frames::{Frame, Head, Wanted};
use crate::protocol::owed::Received;
use crate::protocol::statements::Unnamed;
use ::bytes::Buf;

/// Longest server message held whole; the rest stream through.
const MAX_SERVER_MESSAGE: usize = 64 << 20;
/// Server messages up to this length are held whole when the proxy need not read them: their
/// bytes pass in one piece.
const SMALL: usize = 64 * 1024;

/// How the server's messages are read: whole where the proxy reads them (`ReadyForQuery`,
/// `ParameterStatus`, errors to rename, `CommandComplete`), streamed when large otherwise
/// (rows and `COPY` data always, when not yet whole).
fn wanted(head: Head) -> Wanted {
    let read = matches!(head.tag, b'Z' | b'S' | b'E' | b'C');
    if !read && (matches!(head.tag, b'D' | b'd') || head.len > SMALL) {
        Wanted::Stream
    } else if head.len > MAX_SERVER_MESSAGE {
        Wanted::TooLong
    } else {
        Wanted::Whole
    }
}

impl Relay<'_> {
    /// Handles the server's bytes read so far (taking them from the buffer once, at the end).
    pub(super) fn on_server(&mut self) -> Result<(), Stop> {
        let mut at = 0;
        let handled = loop {
            let frame = match self.server_frames.next(&self.server_in[at..], wanted) {
                Ok(Some(frame)) => frame,
                Ok(None) => break Ok(()),
                Err(_) => break Err(Stop::ServerGone("sent a malformed message".into())),
            };
            let bytes = &self.server_in[at..at + frame.bytes()];
            match frame {
                Frame::Part(_) => self.client_out.put(bytes),
                Frame::Start(head) => {
                    if self.owed.received(head.tag, &[]).map_err(out_of_turn)? != Received::Pass {
                        break Err(Stop::ServerGone("streamed an answer to the proxy".into()));
                    }
                    self.client_out.put(bytes);
                }
                Frame::Whole(head) => {
                    if let Err(stop) = self.server_message(at, head) {
                        break Err(stop);
                    }
                }
            }
            at += frame.bytes();
        };
        self.server_in.advance(at);
        handled
    }

    /// One whole server message, at `at` in the buffer: passed on or dropped, as the answer
    /// it is.
    fn server_message(&mut self, at: usize, head: Head) -> Result<(), Stop> {
        let message = &self.server_in[at..at + head.len];
        let body = &message[5..];
        let guard = self.server.as_mut().expect("read from a held connection");
        let server = guard.server();
        if head.tag == b'S' {
            let index = server.params.report(body);
            if self.translator.is_some() {
                match index.and_then(|i| Some((i, server.params.tracked().get(i)?.clone()))) {
                    Some((index, value)) => self.tracked.set(index, value),
                    None => self.reported_untracked = true,
                }
            }
        }
        let received = self.owed.received(head.tag, body).map_err(out_of_turn)?;
        match received {
            Received::Failed => {
                for (undo, failed) in self.owed.undone() {
                    if let Some(translator) = &mut self.translator {
                        translator.undo(undo, failed, &mut server.prepared);
                    }
                }
                server.prepared.unnamed = Unnamed::Unknown;
            }
            Received::Ready(_) => self.clock.ready(!self.owed.is_empty()),
            Received::Pass | Received::Drop => {}
        }
        // DISCARD ALL and DEALLOCATE ALL drop every prepared statement, the client's included.
        if head.tag == b'C'
            && (body.starts_with(b"DISCARD ALL\0") || body.starts_with(b"DEALLOCATE ALL\0"))
            && let Some(translator) = &mut self.translator
        {
            translator.discarded(&mut server.prepared);
        }
        if received != Received::Drop {
            let renamed = match head.tag {
                b'E' => self
                    .clock
                    .explain_cancel(body)
                    .or_else(|| (self.translator.as_ref()).and_then(|t| t.rename_error(message))),
                _ => None,
            };
            self.client_out.put(renamed.as_deref().unwrap_or(message));
        }
        while let Some(own) = self.owed.next_own() {
            self.client_out.put(own);
        }
        Ok(())
    }
}

fn out_of_turn(error: crate::protocol::owed::OutOfTurn) -> Stop {
    Stop::ServerGone(error.to_string())
}
