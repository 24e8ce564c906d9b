//! The messages the proxy builds itself for a server connection, and the name fields it
//! reads: with `postgres_protocol`'s frontend builders where the content is the proxy's own
//! (its statement names are ASCII), and byte for byte where a client's bytes must pass
//! unchanged (a `Bind`'s parameters, in whatever encoding and format the client sent them).

use bytes::{BufMut, Bytes, BytesMut};
use std::borrow::Cow;

/// A message of the proxy's own, built by a `postgres_protocol` frontend function.
pub(crate) fn own_message(build: impl FnOnce(&mut BytesMut) -> std::io::Result<()>) -> BytesMut {
    let mut buf = BytesMut::new();
    // The builders fail only for names with a NUL or over 2 GB; the proxy's names are short
    // ASCII.
    let _ = build(&mut buf);
    buf
}

/// A name of the proxy's own (ASCII), as the builders take it.
pub(super) fn server_name_str(name: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(name)
}

/// The client's `Bind` of `portal` with the server's statement name instead of its own: the
/// parameters (`rest`) pass byte for byte, undecoded, so no builder that takes typed values
/// can make it.
pub(crate) fn bind(portal: &[u8], statement: &[u8], rest: &[u8]) -> Bytes {
    let mut body = BytesMut::with_capacity(portal.len() + statement.len() + rest.len() + 2);
    body.put_slice(portal);
    body.put_u8(0);
    body.put_slice(statement);
    body.put_u8(0);
    body.put_slice(rest);
    pgentra_wire::message(b'B', &body)
}

/// A NUL-terminated name at the start of `body`, and what follows it.
pub(super) fn split_name(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = body.iter().position(|b| *b == 0)?;
    Some((&body[..end], &body[end + 1..]))
}
