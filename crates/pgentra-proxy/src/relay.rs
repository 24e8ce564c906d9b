//! The byte relay of a session with its own server connection: bytes both ways until the
//! session ends.
//!
//! When the client half-closes (it shut down its sending side), the server still gets what
//! the client sent and the client still gets the answers, as a direct connection to PostgreSQL
//! would give it: the proxy shuts down its sending side to the server too, and the session ends
//! when the server closes. When the server closes, the session ends at once.

use crate::startup::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// Relay buffer per direction: small, since idle sessions are the common case and the kernel
/// buffers the rest.
pub(crate) const RELAY_BUFFER: usize = 4096;

/// Bytes relayed each way.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Relayed {
    pub(crate) to_server: u64,
    pub(crate) to_client: u64,
}

/// Relays until the server closes, the client goes away (resets, or closes and the server
/// follows), or `kill` turns true.
pub(crate) async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Box<dyn Stream>,
    server: &mut S,
    mut kill: watch::Receiver<bool>,
) -> Relayed {
    let mut relayed = Relayed::default();
    {
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (mut server_read, mut server_write) = tokio::io::split(server);
        let to_server = pipe(&mut client_read, &mut server_write, &mut relayed.to_server);
        let to_client = pipe(&mut server_read, &mut client_write, &mut relayed.to_client);
        tokio::pin!(to_server, to_client);
        let mut client_done = false;
        loop {
            tokio::select! {
                ended = &mut to_server, if !client_done => match ended {
                    // A clean end of the client's side: the server was told, and answers on.
                    Ok(()) => client_done = true,
                    Err(_) => break,
                },
                _ = &mut to_client => break,
                () = turns_true(&mut kill) => break,
            }
        }
    }
    relayed
}

/// Copies `from` to `to` until `from` ends, then shuts `to` down (passing on the end).
async fn pipe<R, W>(from: &mut R, to: &mut W, count: &mut u64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0; RELAY_BUFFER];
    loop {
        let n = from.read(&mut buffer).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buffer[..n]).await?;
        // TLS buffers records until flushed.
        to.flush().await?;
        *count += n as u64;
    }
}

/// Walks the messages of one direction of a session as its bytes arrive, without waiting for
/// whole messages (a `COPY` row or a result set passes through as it comes): each message's
/// tag is known when its 5-byte header is complete, and the bodies of the few it is asked to
/// keep when they are.
#[derive(Debug, Default)]
struct Framer {
    head: [u8; 5],
    head_len: usize,
    /// Body bytes of the current message still to come.
    left: usize,
    tag: u8,
    body: Vec<u8>,
    keeping: bool,
}

/// Longest body the framer keeps (`ReadyForQuery` is 1 byte, `ParameterStatus` small).
const MAX_KEPT: usize = 64 * 1024;

/// What the framer tells its caller about a message.
enum Seen<'a> {
    /// A header is complete. The caller returns whether to pass the message on.
    Header { tag: u8 },
    /// A message kept by [`Framer::feed`]'s `keep` is complete.
    Body { tag: u8, body: &'a [u8] },
}

impl Framer {
    /// Feeds `chunk`: the bytes to pass on go to `out` (headers once complete, so a message
    /// refused at its header is never partly sent), and `seen` hears of each header and kept
    /// body. Returns `Err` for a length the protocol does not allow.
    fn feed(
        &mut self,
        chunk: &[u8],
        out: &mut Vec<u8>,
        keep: impl Fn(u8) -> bool,
        mut seen: impl FnMut(Seen<'_>) -> bool,
    ) -> Result<(), ()> {
        let mut at = 0;
        while at < chunk.len() {
            if self.left == 0 {
                let take = (5 - self.head_len).min(chunk.len() - at);
                self.head[self.head_len..self.head_len + take]
                    .copy_from_slice(&chunk[at..at + take]);
                self.head_len += take;
                at += take;
                if self.head_len < 5 {
                    break;
                }
                self.head_len = 0;
                self.tag = self.head[0];
                let len =
                    i32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]]);
                let body = usize::try_from(len)
                    .ok()
                    .and_then(|l| l.checked_sub(4))
                    .ok_or(())?;
                let pass = seen(Seen::Header { tag: self.tag });
                if pass {
                    out.extend_from_slice(&self.head);
                }
                self.keeping = pass && keep(self.tag) && body <= MAX_KEPT;
                self.body.clear();
                self.left = body;
                if body == 0 && self.keeping {
                    seen(Seen::Body {
                        tag: self.tag,
                        body: &[],
                    });
                }
                if !pass && body > 0 {
                    // Only bodiless messages are refused (Terminate).
                    return Err(());
                }
            } else {
                let take = self.left.min(chunk.len() - at);
                let part = &chunk[at..at + take];
                out.extend_from_slice(part);
                if self.keeping {
                    self.body.extend_from_slice(part);
                }
                self.left -= take;
                at += take;
                if self.left == 0 && self.keeping {
                    seen(Seen::Body {
                        tag: self.tag,
                        body: &self.body,
                    });
                }
            }
        }
        Ok(())
    }
}

/// How a pooled session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The client sent `Terminate` (not passed to the server), or closed its connection, and
    /// every query it sent was answered: the server connection may go back to the pool.
    ClientDone,
    /// The client went away with a query, a `COPY` or a transaction step unanswered, or broke
    /// the protocol.
    ClientGone,
    /// The server closed the connection or broke the protocol.
    ServerGone,
    /// The drain timeout ended the session.
    Killed,
}

/// What the relay of a pooled session learnt.
#[derive(Debug)]
pub(crate) struct SessionEnd {
    pub(crate) ending: Ending,
    pub(crate) relayed: Relayed,
    /// The status of the server's last `ReadyForQuery` (`I`, `T` or `E`).
    pub(crate) status: u8,
}

/// Relays a client's session over a pooled server connection, message-aware: the client's
/// `Terminate` ends the session without ending the server's; `ReadyForQuery` says whether the
/// server is idle, in a transaction or in a failed one; `ParameterStatus` keeps `params` what
/// the server's are, for the next client. A client that closes its side still gets the answers
/// to what it sent (as from PostgreSQL) before the session ends. `first` is what the client
/// sent before the session had its server connection (at most [`RELAY_BUFFER`] bytes).
pub(crate) async fn relay_session<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Box<dyn Stream>,
    first: &[u8],
    server: &mut S,
    params: &mut crate::server::Params,
    mut kill: watch::Receiver<bool>,
) -> SessionEnd {
    let mut end = SessionEnd {
        ending: Ending::ClientDone,
        relayed: Relayed::default(),
        status: b'I',
    };
    let (mut from_client, mut from_server) = (Framer::default(), Framer::default());
    let (mut client_buf, mut server_buf) = (vec![0u8; RELAY_BUFFER], vec![0u8; RELAY_BUFFER]);
    let mut out = Vec::with_capacity(RELAY_BUFFER);
    // Client bytes read but not yet passed on: at first, those read before the session had
    // its server connection.
    let mut unread = first.len();
    client_buf[..unread].copy_from_slice(first);
    // Queries, function calls and Syncs the server has yet to answer with ReadyForQuery.
    let mut pending: usize = 0;
    let mut client_open = true;
    let killed = turns_true(&mut kill);
    tokio::pin!(killed);
    loop {
        if !client_open && pending == 0 {
            end.ending = Ending::ClientDone;
            return end;
        }
        if unread > 0 {
            let n = std::mem::take(&mut unread);
            out.clear();
            let mut terminated = false;
            let fed = from_client.feed(
                &client_buf[..n],
                &mut out,
                |_| false,
                |seen| {
                    if let Seen::Header { tag, .. } = seen {
                        match tag {
                            b'X' => {
                                terminated = true;
                                return false;
                            }
                            b'Q' | b'S' | b'F' => pending += 1,
                            _ => {}
                        }
                    }
                    !terminated
                },
            );
            if fed.is_err() {
                end.ending = Ending::ClientGone;
                return end;
            }
            // What follows a Terminate is not passed on (the framer stopped taking it).
            if !out.is_empty() {
                if server
                    .write_all(&out)
                    .await
                    .and(server.flush().await)
                    .is_err()
                {
                    end.ending = Ending::ServerGone;
                    return end;
                }
                end.relayed.to_server += out.len() as u64;
            }
            if terminated {
                client_open = false;
            }
            continue;
        }
        tokio::select! {
            read = client.read(&mut client_buf), if client_open => match read {
                Ok(0) => client_open = false,
                Ok(n) => unread = n,
                Err(_) => {
                    end.ending = Ending::ClientGone;
                    return end;
                }
            },
            read = server.read(&mut server_buf) => {
                let n = match read {
                    Ok(n) if n > 0 => n,
                    _ => {
                        end.ending = Ending::ServerGone;
                        return end;
                    }
                };
                out.clear();
                let fed = from_server.feed(&server_buf[..n], &mut out, |tag| matches!(tag, b'Z' | b'S'), |seen| {
                    match seen {
                        Seen::Body { tag: b'Z', body } => {
                            pending = pending.saturating_sub(1);
                            end.status = body.first().copied().unwrap_or(b'E');
                        }
                        Seen::Body { tag: b'S', body } => params.report(body),
                        _ => {}
                    }
                    true
                });
                if fed.is_err() {
                    end.ending = Ending::ServerGone;
                    return end;
                }
                // A client that closed its side may no longer read; the answers are then
                // dropped, but still counted so the session ends cleanly.
                if client_open || !out.is_empty() {
                    let written = client.write_all(&out).await.and(client.flush().await);
                    if written.is_err() && client_open {
                        end.ending = Ending::ClientGone;
                        return end;
                    }
                }
                end.relayed.to_client += out.len() as u64;
            }
            () = &mut killed => {
                end.ending = Ending::Killed;
                return end;
            }
        }
    }
}

/// Resolves when `flag` is (or turns) true.
pub(crate) async fn turns_true(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|on| *on).await;
}
