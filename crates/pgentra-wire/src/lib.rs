//! The startup phase of the PostgreSQL wire protocol, from the server's side: the untagged
//! packets a client sends before it is logged in, and the few messages a proxy or a gateway
//! sends back on its own.
//!
//! [postgres-protocol](https://docs.rs/postgres-protocol) parses the server's messages and
//! builds the client's after the login; this crate covers what a server that terminates logins
//! (the pgentra proxy, the emulator's gateway) must parse and build, and the few startup
//! packets the proxy sends upstream itself, where postgres-protocol's builders fall short
//! ([`startup_message`] takes values as bytes, since a client's may be in any encoding).
//! Every parser is total: any input gives a value or a [`WireError`], never a panic, and reads
//! are bounded in size.
//!
//! ```
//! use pgentra_wire::{StartupPacket, parse_startup_packet, startup_message};
//!
//! let packet = startup_message(&[("user", "alice"), ("database", "app")]);
//! match parse_startup_packet(&packet[4..])? {
//!     StartupPacket::Startup { minor_version, params } => {
//!         assert_eq!(minor_version, 0);
//!         assert_eq!(pgentra_wire::param(&params, "user"), Some("alice"));
//!     }
//!     other => panic!("{other:?}"),
//! }
//! # Ok::<(), pgentra_wire::WireError>(())
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest startup packet accepted, as PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`.
pub const MAX_STARTUP_PACKET: usize = 10_000;
/// `SSLRequest`'s code.
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
/// `GSSENCRequest`'s code.
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
/// `CancelRequest`'s code.
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;
/// Protocol version 3.0, the version this crate speaks.
pub const PROTOCOL_3_0: i32 = 196_608;
/// The first byte of a TLS ClientHello, which starts a PostgreSQL 17 direct-TLS connection
/// (`sslnegotiation=direct`) instead of an `SSLRequest`.
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;

/// Why a packet or message was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The length word is out of the accepted range.
    #[error("invalid length {len} (allowed {min} to {max} bytes)")]
    Length {
        /// The length the peer announced.
        len: i64,
        /// The smallest acceptable length.
        min: usize,
        /// The largest acceptable length.
        max: usize,
    },
    /// The packet's contents do not follow the protocol.
    #[error("invalid startup packet layout: {0}")]
    Layout(&'static str),
    /// A protocol version this side does not know (not 3.x).
    #[error("unsupported frontend protocol {major}.{minor}")]
    UnsupportedProtocol {
        /// Major version.
        major: u16,
        /// Minor version.
        minor: u16,
    },
    /// Reading from the peer failed (or it closed the connection).
    #[error("reading from the peer failed")]
    Io(#[from] std::io::Error),
}

/// A packet of the startup phase, before the client is logged in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    /// `SSLRequest`: the client asks for TLS.
    SslRequest,
    /// `GSSENCRequest`: the client asks for GSSAPI encryption.
    GssEncRequest,
    /// `CancelRequest`: cancel the query running under this key (4 bytes in protocol 3.0,
    /// up to 256 in 3.2).
    CancelRequest {
        /// The process ID from `BackendKeyData`.
        pid: i32,
        /// The secret key from `BackendKeyData`.
        key: Bytes,
    },
    /// `StartupMessage`: protocol 3.x and the session's parameters, in order.
    Startup {
        /// The requested minor version (3.0 is 0, 3.2 is 2).
        minor_version: u16,
        /// `user`, `database`, `options`, `application_name`, ... and `_pq_.*` options. Values
        /// are bytes: PostgreSQL takes any encoding here (psql sends a Latin-1
        /// `application_name` as it is), so they are forwarded unchanged.
        params: Vec<(String, Bytes)>,
    },
}

impl StartupPacket {
    /// The value of a startup parameter, if the packet is a `StartupMessage` that has it and
    /// the value is UTF-8.
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            Self::Startup { params, .. } => param(params, name),
            _ => None,
        }
    }
}

/// The value of the parameter `name` among startup `params`, if it is there and UTF-8.
pub fn param<'a>(params: &'a [(String, Bytes)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(key, _)| key == name)
        .and_then(|(_, value)| std::str::from_utf8(value).ok())
}

/// Parses a startup-phase packet without its length word: the 4-byte code, then the body.
pub fn parse_startup_packet(packet: &[u8]) -> Result<StartupPacket, WireError> {
    let mut body = packet;
    if body.len() < 4 {
        return Err(WireError::Layout("no request code"));
    }
    let code = body.get_i32();
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if !body.is_empty() => {
            Err(WireError::Layout("encryption request with a body"))
        }
        SSL_REQUEST_CODE => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE => {
            if !(8..=260).contains(&body.len()) {
                return Err(WireError::Layout("cancel request of the wrong size"));
            }
            let pid = body.get_i32();
            Ok(StartupPacket::CancelRequest {
                pid,
                key: Bytes::copy_from_slice(body),
            })
        }
        _ => {
            let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
            // 1234.x are the request codes above; anything else but 3.x is a version no one
            // speaks.
            if major != 3 {
                return Err(WireError::UnsupportedProtocol { major, minor });
            }
            Ok(StartupPacket::Startup {
                minor_version: minor,
                params: parse_params(body)?,
            })
        }
    }
}

/// `name\0value\0...\0`: a list of names and values ending with an empty name. Names must be
/// UTF-8 (they are configuration parameter names); values are kept as bytes.
fn parse_params(body: &[u8]) -> Result<Vec<(String, Bytes)>, WireError> {
    let Some((&0, list)) = body.split_last() else {
        return Err(WireError::Layout("parameters not terminated"));
    };
    if list.is_empty() {
        return Ok(Vec::new());
    }
    let Some((&0, list)) = list.split_last() else {
        return Err(WireError::Layout("parameters not terminated"));
    };
    let mut strings = list.split(|b| *b == 0);
    let mut params = Vec::new();
    while let Some(name) = strings.next() {
        let name = std::str::from_utf8(name)
            .map_err(|_| WireError::Layout("a parameter name is not UTF-8"))?;
        if name.is_empty() {
            return Err(WireError::Layout("an empty parameter name"));
        }
        let value = strings
            .next()
            .ok_or(WireError::Layout("a parameter without a value"))?;
        params.push((name.to_owned(), Bytes::copy_from_slice(value)));
    }
    Ok(params)
}

/// The password in a `PasswordMessage` body: text ending with one NUL.
pub fn parse_password(body: &[u8]) -> Result<&str, WireError> {
    let Some((&0, password)) = body.split_last() else {
        return Err(WireError::Layout("password not terminated"));
    };
    if password.contains(&0) {
        return Err(WireError::Layout("a NUL inside the password"));
    }
    std::str::from_utf8(password).map_err(|_| WireError::Layout("the password is not UTF-8"))
}

/// Reads one startup-phase packet and returns it without its length word. Lengths outside
/// 8..=`max` bytes are refused before anything more is read.
pub async fn read_startup_packet<S: AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
) -> Result<Bytes, WireError> {
    let len = stream.read_i32().await?;
    let size = usize::try_from(len)
        .ok()
        .filter(|len| (8..=max).contains(len))
        .ok_or_else(|| WireError::Length {
            len: len.into(),
            min: 8,
            max,
        })?;
    let mut packet = vec![0; size - 4];
    stream.read_exact(&mut packet).await?;
    Ok(packet.into())
}

/// Reads one tagged message (tag, length, body) whose body is at most `max` bytes.
pub async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
) -> Result<(u8, Bytes), WireError> {
    let tag = stream.read_u8().await?;
    let len = stream.read_i32().await?;
    let body_len = usize::try_from(len)
        .ok()
        .and_then(|len| len.checked_sub(4))
        .filter(|body| *body <= max)
        .ok_or_else(|| WireError::Length {
            len: len.into(),
            min: 4,
            max: max.saturating_add(4),
        })?;
    let mut body = vec![0; body_len];
    stream.read_exact(&mut body).await?;
    Ok((tag, body.into()))
}

/// A tagged message: tag, length, body.
pub fn message(tag: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(tag);
    out.put_i32(i32::try_from(body.len() + 4).unwrap_or(i32::MAX));
    out.put_slice(body);
    out.freeze()
}

/// A `StartupMessage` for protocol 3.0, with its length word. Values are bytes, so a value a
/// client sent in another encoding is forwarded unchanged (postgres-protocol's builder takes
/// only `&str`).
pub fn startup_message<V: AsRef<[u8]>>(params: &[(&str, V)]) -> Bytes {
    let mut body = BytesMut::new();
    body.put_i32(PROTOCOL_3_0);
    for (name, value) in params {
        body.put_slice(name.as_bytes());
        body.put_u8(0);
        body.put_slice(value.as_ref());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut out = BytesMut::with_capacity(body.len() + 4);
    out.put_i32(i32::try_from(body.len() + 4).unwrap_or(i32::MAX));
    out.put_slice(&body);
    out.freeze()
}

/// An `SSLRequest`, with its length word.
pub fn ssl_request() -> Bytes {
    let mut out = BytesMut::with_capacity(8);
    out.put_i32(8);
    out.put_i32(SSL_REQUEST_CODE);
    out.freeze()
}

/// A `CancelRequest` for a 3.0 key, with its length word.
pub fn cancel_request(pid: i32, key: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(12 + key.len());
    out.put_i32(i32::try_from(12 + key.len()).unwrap_or(i32::MAX));
    out.put_i32(CANCEL_REQUEST_CODE);
    out.put_i32(pid);
    out.put_slice(key);
    out.freeze()
}

/// `BackendKeyData` with a process ID and secret key.
pub fn backend_key_data(pid: i32, key: &[u8]) -> Bytes {
    let mut body = BytesMut::with_capacity(4 + key.len());
    body.put_i32(pid);
    body.put_slice(key);
    message(b'K', &body)
}

/// A new cancel key for a protocol 3.0 `BackendKeyData`: a positive process ID (negative ones
/// broke pg_basebackup behind PgBouncer) and a 4-byte secret, both drawn from the operating
/// system's CSPRNG, as PostgreSQL draws its keys from `pg_strong_random`: a client that knows
/// its own key, or any number of them, learns nothing about another session's.
///
/// ```
/// let (pid, secret) = pgentra_wire::random_cancel_key()?;
/// assert!(pid > 0);
/// let message = pgentra_wire::backend_key_data(pid, &secret);
/// assert_eq!(message.len(), 13);
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn random_cancel_key() -> std::io::Result<(i32, [u8; 4])> {
    let mut bytes = [0u8; 8];
    loop {
        getrandom::fill(&mut bytes)?;
        let pid = i32::from_be_bytes([bytes[0] & 0x7f, bytes[1], bytes[2], bytes[3]]);
        if pid != 0 {
            return Ok((pid, [bytes[4], bytes[5], bytes[6], bytes[7]]));
        }
    }
}

/// `AuthenticationCleartextPassword`.
pub fn cleartext_password_request() -> Bytes {
    message(b'R', &3i32.to_be_bytes())
}

/// `NegotiateProtocolVersion`: this side speaks 3.0 and none of `unknown_options`.
pub fn negotiate_protocol_version<'a>(unknown_options: impl IntoIterator<Item = &'a str>) -> Bytes {
    let options: Vec<&str> = unknown_options.into_iter().collect();
    let mut body = BytesMut::new();
    body.put_i32(PROTOCOL_3_0);
    body.put_i32(i32::try_from(options.len()).unwrap_or(i32::MAX));
    for option in options {
        body.put_slice(option.as_bytes());
        body.put_u8(0);
    }
    message(b'v', &body)
}

/// What a 3.0 server answers a `StartupMessage` for `minor_version` with `params`: a
/// `NegotiateProtocolVersion` when the client asked for a newer minor version or for `_pq_.`
/// protocol options (which this crate knows none of), nothing otherwise.
pub fn negotiation(minor_version: u16, params: &[(String, Bytes)]) -> Option<Bytes> {
    let options = params
        .iter()
        .map(|(name, _)| name.as_str())
        .filter(|name| name.starts_with("_pq_."));
    (minor_version > 0 || options.clone().next().is_some())
        .then(|| negotiate_protocol_version(options))
}

/// The fields of an `ErrorResponse` or `NoticeResponse`: (field type, value) pairs such as
/// `S` severity, `C` SQLSTATE, `M` message, `H` hint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields(pub Vec<(u8, String)>);

impl ErrorFields {
    /// A `FATAL` error with a SQLSTATE, a message and an optional hint.
    pub fn fatal(code: &str, message: &str, hint: Option<&str>) -> Self {
        let mut fields = vec![
            (b'S', "FATAL".to_owned()),
            (b'V', "FATAL".to_owned()),
            (b'C', code.to_owned()),
            (b'M', message.to_owned()),
        ];
        fields.extend(hint.map(|hint| (b'H', hint.to_owned())));
        Self(fields)
    }

    /// Parses the body of an `ErrorResponse` or `NoticeResponse`. Non-UTF-8 values are kept
    /// lossily, as clients show them.
    pub fn parse(body: &[u8]) -> Result<Self, WireError> {
        let Some((&0, mut rest)) = body.split_last() else {
            return Err(WireError::Layout("error fields not terminated"));
        };
        let mut fields = Vec::new();
        while let Some((&kind, after)) = rest.split_first() {
            let end = after
                .iter()
                .position(|b| *b == 0)
                .ok_or(WireError::Layout("an error field not terminated"))?;
            fields.push((kind, String::from_utf8_lossy(&after[..end]).into_owned()));
            rest = &after[end + 1..];
        }
        Ok(Self(fields))
    }

    /// The same error as a `FATAL` one (an `ERROR` of a query the proxy ran for a login, which
    /// the client is to see as PostgreSQL shows a login refused).
    pub fn into_fatal(mut self) -> Self {
        self.set(b'S', "FATAL");
        self.set(b'V', "FATAL");
        self
    }

    /// The value of a field.
    pub fn get(&self, kind: u8) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_str())
    }

    /// Sets a field, replacing an existing one of the same kind.
    pub fn set(&mut self, kind: u8, value: impl Into<String>) {
        let value = value.into();
        match self.0.iter_mut().find(|(k, _)| *k == kind) {
            Some(field) => field.1 = value,
            None => self.0.push((kind, value)),
        }
    }

    /// The `ErrorResponse` message.
    pub fn to_error_response(&self) -> Bytes {
        let mut body = BytesMut::new();
        for (kind, value) in &self.0 {
            body.put_u8(*kind);
            body.put_slice(value.as_bytes());
            body.put_u8(0);
        }
        body.put_u8(0);
        message(b'E', &body)
    }
}

#[cfg(test)]
mod tests;
