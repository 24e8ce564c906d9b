//! Messages cut out of a byte buffer as they arrive, in either direction (the protocol's
//! "Message Formats": a tag byte, a 4-byte length that counts itself, the body), with
//! `postgres_protocol`'s [`Header`] reading each header.
//!
//! A message the caller wants whole is handed over once all of it is in the buffer; one it
//! streams (a `DataRow` or `CopyData` of any size, say) is handed over as its header and then
//! its body in parts as they come, so the proxy holds no more of it than one read. Nothing here
//! does I/O or copies: each [`Frame`] says how many bytes at the buffer's start it covers, and
//! the caller takes them.

use postgres_protocol::message::backend::Header;

/// A message's tag and whole length (tag byte included), from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) tag: u8,
    pub(crate) len: usize,
}

impl Head {
    /// The header at the start of `buf`, once its five bytes are there.
    pub(crate) fn parse(buf: &[u8]) -> Result<Option<Self>, Malformed> {
        let Some(header) = Header::parse(buf).map_err(|_| Malformed::Length)? else {
            return Ok(None);
        };
        let len = usize::try_from(header.len()).map_err(|_| Malformed::Length)?;
        Ok(Some(Self {
            tag: header.tag(),
            len: len + 1,
        }))
    }

    /// The body's length.
    pub(crate) fn body(self) -> usize {
        self.len - HEADER
    }
}

/// The length of a message header.
pub(crate) const HEADER: usize = 5;

/// A message the reader cannot take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Malformed {
    /// A length the protocol does not allow (under 4).
    Length,
    /// A message longer than the caller holds whole: its length.
    TooLong(usize),
}

/// What to do with a message that is not yet whole in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wanted {
    /// Wait until all of it is there.
    Whole,
    /// Hand over its header now and its body as it comes.
    Stream,
    /// Nothing: it is longer than the caller holds ([`Malformed::TooLong`]).
    TooLong,
}

/// The next piece of the buffer: a message, or part of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A whole message: the buffer's first `head.len` bytes.
    Whole(Head),
    /// The header of a message streamed in parts: the buffer's first [`HEADER`] bytes.
    Start(Head),
    /// This many bytes of the streamed message's body (at least one).
    Part(usize),
}

impl Frame {
    /// How many bytes at the buffer's start this frame covers.
    pub(crate) fn bytes(self) -> usize {
        match self {
            Self::Whole(head) => head.len,
            Self::Start(_) => HEADER,
            Self::Part(n) => n,
        }
    }
}

/// One direction's position in its message stream.
#[derive(Debug, Default)]
pub(crate) struct Frames {
    /// Body bytes of a streamed message still to come.
    left: usize,
}

impl Frames {
    /// The next frame at the start of `buf`, which the caller then takes (its
    /// [`bytes`](Frame::bytes)); `None` when more bytes are needed. A message that is whole in
    /// the buffer is always handed over whole; `wanted` decides for the others.
    pub(crate) fn next(
        &mut self,
        buf: &[u8],
        wanted: impl FnOnce(Head) -> Wanted,
    ) -> Result<Option<Frame>, Malformed> {
        if self.left > 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            let take = self.left.min(buf.len());
            self.left -= take;
            return Ok(Some(Frame::Part(take)));
        }
        let Some(head) = Head::parse(buf)? else {
            return Ok(None);
        };
        if buf.len() >= head.len {
            return Ok(Some(Frame::Whole(head)));
        }
        match wanted(head) {
            Wanted::Whole => Ok(None),
            Wanted::Stream => {
                self.left = head.body();
                Ok(Some(Frame::Start(head)))
            }
            Wanted::TooLong => Err(Malformed::TooLong(head.len)),
        }
    }

    /// Whether a streamed message's body is still coming.
    pub(crate) fn mid_message(&self) -> bool {
        self.left > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&i32::try_from(body.len() + 4).unwrap().to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn whole_messages_and_streamed_ones() {
        let mut frames = Frames::default();
        let mut buf = message(b'Q', b"select 1\0");
        buf.extend_from_slice(&message(b'd', &[7; 10])[..8]);
        let first = frames.next(&buf, |_| Wanted::Whole).unwrap().unwrap();
        assert_eq!(first, Frame::Whole(Head { tag: b'Q', len: 14 }));
        let rest = &buf[first.bytes()..];
        // A CopyData not yet whole: held back, or streamed.
        assert_eq!(frames.next(rest, |_| Wanted::Whole), Ok(None));
        let start = frames.next(rest, |_| Wanted::Stream).unwrap().unwrap();
        assert_eq!(start, Frame::Start(Head { tag: b'd', len: 15 }));
        assert!(frames.mid_message());
        assert_eq!(
            frames.next(&rest[5..], |_| unreachable!()),
            Ok(Some(Frame::Part(3)))
        );
        assert_eq!(frames.next(&[], |_| unreachable!()), Ok(None));
        assert_eq!(
            frames.next(&[7; 20], |_| unreachable!()),
            Ok(Some(Frame::Part(7)))
        );
        assert!(!frames.mid_message());
    }

    #[test]
    fn short_headers_wait_and_bad_lengths_are_refused() {
        let mut frames = Frames::default();
        assert_eq!(frames.next(b"Q\0\0", |_| Wanted::Whole), Ok(None));
        assert_eq!(
            frames.next(b"Q\0\0\0\x03", |_| Wanted::Whole),
            Err(Malformed::Length)
        );
        assert_eq!(
            frames.next(b"Q\xff\xff\xff\xff", |_| Wanted::Whole),
            Err(Malformed::Length)
        );
        let long = frames.next(b"Q\0\x10\0\0", |_| Wanted::TooLong);
        assert_eq!(long, Err(Malformed::TooLong(0x0010_0001)));
        let sync = frames.next(b"S\0\0\0\x04", |_| Wanted::Whole).unwrap();
        assert_eq!(sync, Some(Frame::Whole(Head { tag: b'S', len: 5 })));
    }
}
