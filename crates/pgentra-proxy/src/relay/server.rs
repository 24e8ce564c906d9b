//! The server's side of the relay: its messages, passed on or dropped as the tracker says,
//! with rows and `COPY` data streamed as they come.

use super::{Relay, Stop};
use crate::protocol::frames::{Frame, Head, Wanted};
use crate::protocol::owed::Received;
use crate::protocol::statements::Unnamed;
use crate::settings::Settings;
use ::bytes::{Buf, Bytes};

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

/// What becomes of a whole server message.
enum Answer {
    /// It goes to the client as it is.
    Pass,
    /// It goes to the client as these bytes instead (an error renamed or explained).
    Replace(Bytes),
    /// It was the proxy's, and goes nowhere.
    Drop,
}

impl Relay<'_> {
    /// Handles the server's bytes read so far (taking them from the buffer once, at the end).
    /// Messages passed on as they are go to the client in one piece per run of them.
    pub(super) fn on_server(&mut self) -> Result<(), Stop> {
        let mut at = 0;
        // The client is owed the bytes from `passed` to `at` as they are.
        let mut passed = 0;
        let handled = loop {
            let frame = match self.server_frames.next(&self.server_in[at..], wanted) {
                Ok(Some(frame)) => frame,
                Ok(None) => break Ok(()),
                Err(_) => break Err(Stop::ServerGone("sent a malformed message".into())),
            };
            let answer = match frame {
                Frame::Part(_) => Answer::Pass,
                Frame::Start(head) => match self.owed.received(head.tag, &[]) {
                    Ok(Received::Pass) => Answer::Pass,
                    Ok(_) => break Err(Stop::ServerGone("streamed an answer to the proxy".into())),
                    Err(error) => break Err(out_of_turn(error)),
                },
                Frame::Whole(head) => match self.server_message(at, head) {
                    Ok(answer) => answer,
                    Err(stop) => break Err(stop),
                },
            };
            if !matches!(answer, Answer::Pass) {
                self.client_out.put(&self.server_in[passed..at]);
                passed = at + frame.bytes();
            }
            if let Answer::Replace(bytes) = answer {
                self.client_out.put(&bytes);
            }
            at += frame.bytes();
            // Answers of the proxy's own that were due after this one (a part of a message
            // answers nothing).
            if let Frame::Part(_) = frame {
                continue;
            }
            if let Some(own) = self.owed.next_own() {
                self.client_out.put(&self.server_in[passed..at]);
                passed = at;
                self.client_out.put(own);
                while let Some(own) = self.owed.next_own() {
                    self.client_out.put(own);
                }
            }
        };
        self.client_out.put(&self.server_in[passed..at]);
        self.server_in.advance(at);
        handled
    }

    /// One whole server message, at `at` in the buffer: what becomes of it, as the answer it
    /// is.
    fn server_message(&mut self, at: usize, head: Head) -> Result<Answer, Stop> {
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
        // DISCARD ALL and DEALLOCATE ALL drop every prepared statement, the client's included
        // (the proxy prepares the others' again where they need them); DISCARD ALL resets the
        // session's settings too.
        let discard = head.tag == b'C' && body.starts_with(b"DISCARD ALL\0");
        if (discard || (head.tag == b'C' && body.starts_with(b"DEALLOCATE ALL\0")))
            && let Some(translator) = &mut self.translator
        {
            translator.discarded(&mut server.prepared);
            if discard {
                self.settings = Settings::default();
                server.settings = Settings::default();
            }
        }
        if received == Received::Drop {
            return Ok(Answer::Drop);
        }
        let renamed = match head.tag {
            b'E' => self
                .clock
                .explain_cancel(body)
                .or_else(|| (self.translator.as_ref()).and_then(|t| t.rename_error(message))),
            _ => None,
        };
        Ok(renamed.map_or(Answer::Pass, Answer::Replace))
    }
}

fn out_of_turn(error: crate::protocol::owed::OutOfTurn) -> Stop {
    Stop::ServerGone(error.to_string())
}
