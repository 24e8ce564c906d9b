//! One side of a relay on the wire: the bytes waiting for it, written (and flushed: TLS keeps
//! written bytes in its records until then) while what it sends is read. PostgreSQL stops
//! reading while its own output is blocked, so a relay that only wrote, behind a large result,
//! would wait for ever; and a client that stops reading must not stop the timeouts.

use super::READ_SIZE;
use ::bytes::{Buf, BytesMut};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite};

/// Which side's exchange resolved first, with what.
pub(super) enum Exchanged {
    Client(std::io::Result<Io>),
    Server(std::io::Result<Io>),
}

/// The client's exchange and the server's, polled together, the client's first when
/// `client_first`: resolves with the first that is ready. The caller alternates the order, so
/// that a side that is always ready cannot starve the other (tokio's `select!` draws a random
/// number at every poll for that: about 200 instructions per session transaction, 1.6 % of
/// them, by callgrind).
pub(super) fn either<C, S>(
    client_first: bool,
    mut client: C,
    mut server: S,
) -> impl Future<Output = Exchanged>
where
    C: Future<Output = std::io::Result<Io>> + Unpin,
    S: Future<Output = std::io::Result<Io>> + Unpin,
{
    std::future::poll_fn(move |cx| {
        if client_first && let Poll::Ready(io) = Pin::new(&mut client).poll(cx) {
            return Poll::Ready(Exchanged::Client(io));
        }
        if let Poll::Ready(io) = Pin::new(&mut server).poll(cx) {
            return Poll::Ready(Exchanged::Server(io));
        }
        if client_first {
            return Poll::Pending;
        }
        Pin::new(&mut client).poll(cx).map(Exchanged::Client)
    })
}

/// What an exchange resolved with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Io {
    /// Bytes read (0: the peer ended its side).
    Read(usize),
    /// What waits to be written fell below the mark given: the relay may take more for it.
    Drained,
}

/// The bytes waiting for one side, and how many went.
#[derive(Debug, Default)]
pub(super) struct Side {
    out: BytesMut,
    /// Bytes written to the stream and not yet flushed.
    unflushed: bool,
    /// Bytes written so far.
    pub(super) written: u64,
}

impl Side {
    /// The buffer of what waits to be written, to add to.
    pub(super) fn buf(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    pub(super) fn put(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// Drops what waits to be written (the side is gone).
    pub(super) fn clear(&mut self) {
        self.out.clear();
    }

    /// Bytes waiting to be written.
    pub(super) fn pending(&self) -> usize {
        self.out.len()
    }

    /// Whether everything was written and flushed.
    pub(super) fn idle(&self) -> bool {
        self.out.is_empty() && !self.unflushed
    }

    /// Writes what waits to `stream`, as far as it takes it without waiting.
    pub(super) fn write_now<S: AsyncWrite + Unpin + ?Sized>(&mut self, stream: &mut S) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // An error shows again at the next exchange, which ends the session.
        let _ = self.poll_write(&mut cx, stream);
    }

    /// Writes what waits to `stream` while reading from it into `input` (when `read`);
    /// resolves when something was read, or when what waits fell below `wake_below`. Pending
    /// for ever without a stream.
    pub(super) fn exchange<'s, S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
        &'s mut self,
        stream: Option<&'s mut S>,
        input: &'s mut BytesMut,
        read: bool,
        wake_below: Option<usize>,
    ) -> impl Future<Output = std::io::Result<Io>> + Unpin + 's {
        let mut stream = stream;
        std::future::poll_fn(move |cx| match stream.as_deref_mut() {
            Some(stream) => self.poll_exchange(cx, stream, input, read, wake_below),
            None => Poll::Pending,
        })
    }

    fn poll_exchange<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut S,
        input: &mut BytesMut,
        read: bool,
        wake_below: Option<usize>,
    ) -> Poll<std::io::Result<Io>> {
        let was = self.out.len();
        if let Err(error) = self.poll_write(cx, stream) {
            return Poll::Ready(Err(error));
        }
        if let Some(mark) = wake_below
            && was >= mark
            && self.out.len() < mark
        {
            return Poll::Ready(Ok(Io::Drained));
        }
        if !read {
            return Poll::Pending;
        }
        // Room grows with what arrives, not with what a message's header claims.
        input.reserve(READ_SIZE);
        tokio_util::io::poll_read_buf(Pin::new(stream), cx, input).map_ok(Io::Read)
    }

    /// Writes (and flushes) what waits, as far as the stream takes it now.
    fn poll_write<S: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut S,
    ) -> std::io::Result<()> {
        while !self.out.is_empty() {
            match Pin::new(&mut *stream).poll_write(cx, &self.out) {
                Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    self.out.advance(n);
                    self.unflushed = true;
                    self.written += n as u64;
                }
                Poll::Ready(Err(error)) => return Err(error),
                Poll::Pending => return Ok(()),
            }
        }
        if self.unflushed {
            match Pin::new(&mut *stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(error)) => return Err(error),
                Poll::Pending => {}
            }
        }
        Ok(())
    }
}
