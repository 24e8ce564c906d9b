//! The client's side of the startup phase: the proxy's first stage, on any stream.
//!
//! A client may ask for TLS (`SSLRequest`, or PostgreSQL 17's direct TLS) and for GSS
//! encryption, each once; it then sends a cancel request or a startup message
//! ([protocol-flow](https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP)).
//! [`negotiate`] answers all of that and returns what the client asked for, or a typed
//! [`Refusal`] for the client to be told. It reads at most
//! [`pgentra_wire::MAX_STARTUP_PACKET`] bytes a packet and writes nothing
//! but the one-byte answers to encryption requests and a `NegotiateProtocolVersion`.
//!
//! It is public so that it can be tested and fuzzed on an in-memory stream:
//!
//! ```
//! use pgentra_proxy::startup::{ClientConn, Request, negotiate};
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let (mut client, server) = tokio::io::duplex(1024);
//! let mut conn = ClientConn::new(Box::new(server), false);
//! let packet = pgentra_wire::startup_message(&[("user", "alice"), ("database", "app")]);
//! tokio::io::AsyncWriteExt::write_all(&mut client, &packet).await.unwrap();
//! match negotiate(&mut conn, None).await {
//!     Ok(Request::Login { params, .. }) => {
//!         assert_eq!(pgentra_wire::param(&params, "database"), Some("app"));
//!     }
//!     other => panic!("{other:?}"),
//! }
//! # }
//! ```

use crate::refusal::Refusal;
use bytes::Bytes;
use pgentra_wire::{
    MAX_STARTUP_PACKET, StartupPacket, TLS_HANDSHAKE_BYTE, WireError, negotiation,
    parse_startup_packet, read_startup_packet,
};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// A byte stream a client connection runs over (TCP, a Unix socket, TLS over either, or an
/// in-memory stream in tests).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A client connection; TLS replaces its stream in place once negotiated.
pub struct ClientConn {
    stream: Box<dyn Stream>,
    unix: bool,
    tls: bool,
}

impl std::fmt::Debug for ClientConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConn")
            .field("unix", &self.unix)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl ClientConn {
    /// A connection as accepted; `unix` for a Unix socket, where TLS is never offered (as in
    /// PostgreSQL and PgBouncer).
    pub fn new(stream: Box<dyn Stream>, unix: bool) -> Self {
        Self {
            stream,
            unix,
            tls: false,
        }
    }

    /// The stream, for the stages after this one.
    pub fn stream(&mut self) -> &mut Box<dyn Stream> {
        &mut self.stream
    }

    /// Whether the client negotiated TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The stream, for the relay.
    pub(crate) fn into_stream(self) -> Box<dyn Stream> {
        self.stream
    }

    async fn start_tls(
        &mut self,
        acceptor: &tokio_rustls::TlsAcceptor,
        first: Option<u8>,
    ) -> Result<(), StartupError> {
        let plain = std::mem::replace(&mut self.stream, Box::new(Closed));
        let plain = Rewind {
            first,
            inner: plain,
        };
        let tls = acceptor
            .accept(plain)
            .await
            .map_err(|error| StartupError::Gone(format!("client TLS handshake failed: {error}")))?;
        self.stream = Box::new(tls);
        self.tls = true;
        Ok(())
    }
}

/// What a client asked for.
#[derive(Debug)]
pub enum Request {
    /// A login: protocol 3.`minor_version` and the startup parameters, in order.
    Login {
        /// The requested minor version (already answered with `NegotiateProtocolVersion` if
        /// above 0).
        minor_version: u16,
        /// `user`, `database`, `application_name`, ... as sent (values are bytes).
        params: Vec<(String, Bytes)>,
    },
    /// A cancel request for the query running under this key.
    Cancel {
        /// The process ID of the `BackendKeyData`.
        pid: i32,
        /// Its secret key.
        key: Bytes,
    },
}

/// Why the startup phase ended without a request.
#[derive(Debug)]
pub enum StartupError {
    /// Tell the client, then close.
    Refuse(Refusal),
    /// Nothing can be said: the client closed, the TLS handshake failed, or it broke the
    /// protocol inside TLS.
    Gone(String),
}

impl From<WireError> for StartupError {
    fn from(error: WireError) -> Self {
        match error {
            WireError::Io(error) => Self::Gone(format!("reading from the client: {error}")),
            WireError::UnsupportedProtocol { major, minor } => {
                Self::Refuse(Refusal::ProtocolVersion { major, minor })
            }
            WireError::Length { len, max, .. } => Self::Refuse(Refusal::InvalidStartup(format!(
                "invalid length of startup packet: {len} bytes (at most {max})"
            ))),
            WireError::Layout(what) => Self::Refuse(Refusal::InvalidStartup(format!(
                "invalid startup packet layout: {what}"
            ))),
            _ => Self::Refuse(Refusal::InvalidStartup("invalid startup packet".into())),
        }
    }
}

impl From<std::io::Error> for StartupError {
    fn from(error: std::io::Error) -> Self {
        Self::Gone(format!("writing to the client: {error}"))
    }
}

/// Runs the startup phase on `conn`: TLS when `tls` is given and the client asks for it (or
/// starts with a ClientHello), GSS declined, until a cancel request or a startup message.
pub async fn negotiate(
    conn: &mut ClientConn,
    tls: Option<&tokio_rustls::TlsAcceptor>,
) -> Result<Request, StartupError> {
    let tls = tls.filter(|_| !conn.unix);
    let (mut ssl_asked, mut gss_asked) = (false, false);
    let mut first = None;
    if let Some(acceptor) = tls {
        // PostgreSQL 17's direct TLS starts with a ClientHello instead of an SSLRequest.
        let byte = conn.stream.read_u8().await.map_err(WireError::Io)?;
        if byte == TLS_HANDSHAKE_BYTE {
            conn.start_tls(acceptor, Some(byte)).await?;
            ssl_asked = true;
        } else {
            first = Some(byte);
        }
    }
    loop {
        let packet = match first.take() {
            Some(byte) => {
                let mut rewound = Rewind {
                    first: Some(byte),
                    inner: &mut conn.stream,
                };
                read_startup_packet(&mut rewound, MAX_STARTUP_PACKET).await?
            }
            None => read_startup_packet(&mut conn.stream, MAX_STARTUP_PACKET).await?,
        };
        let packet = parse_startup_packet(&packet)?;
        if conn.tls && packet == StartupPacket::SslRequest {
            // A confused or hostile client; PgBouncer closes too.
            return Err(StartupError::Gone("an SSLRequest inside TLS".into()));
        }
        // Each request once, as in PostgreSQL: looping on them is no way to spend the timeout.
        let repeated = match packet {
            StartupPacket::SslRequest => std::mem::replace(&mut ssl_asked, true),
            StartupPacket::GssEncRequest => std::mem::replace(&mut gss_asked, true),
            _ => false,
        };
        if repeated {
            return Err(StartupError::Refuse(Refusal::InvalidStartup(
                "the client asked for the same encryption twice".into(),
            )));
        }
        match packet {
            StartupPacket::SslRequest => match tls {
                Some(acceptor) => {
                    conn.stream.write_all(b"S").await?;
                    conn.stream.flush().await?;
                    // Bytes sent after the SSLRequest, before our answer, are not a
                    // ClientHello, so the handshake fails on them: no plaintext injection.
                    conn.start_tls(acceptor, None).await?;
                }
                None => conn.stream.write_all(b"N").await?,
            },
            StartupPacket::GssEncRequest => conn.stream.write_all(b"N").await?,
            StartupPacket::CancelRequest { pid, key } => return Ok(Request::Cancel { pid, key }),
            StartupPacket::Startup {
                minor_version,
                params,
            } => {
                if let Some(answer) = negotiation(minor_version, &params) {
                    // The proxy speaks 3.0, whose 4-byte cancel keys it issues.
                    conn.stream.write_all(&answer).await?;
                }
                return Ok(Request::Login {
                    minor_version,
                    params,
                });
            }
        }
    }
}

/// A stream with one byte already read put back in front.
struct Rewind<S> {
    first: Option<u8>,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(byte) = self.first.take() {
            if buf.remaining() > 0 {
                buf.put_slice(&[byte]);
                return Poll::Ready(Ok(()));
            }
            self.first = Some(byte);
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The stream left behind while TLS takes the real one: reads end, writes fail.
struct Closed;

impl AsyncRead for Closed {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Closed {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Err(std::io::ErrorKind::NotConnected.into()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
