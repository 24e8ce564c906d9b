//! The upstream side of a login: TCP and verified TLS to the server, the startup message, the
//! token as the password, and the server's answers up to `ReadyForQuery`. It never talks to
//! the client: it returns a logged-in [`ServerConn`] or a typed [`LoginError`].

use crate::ProxyError;
use crate::cancel::CancelsInFlight;
use crate::config::Instance;
use crate::params::Params;
use crate::protocol::frames::Head;
use crate::protocol::statements::{Prepared, Unnamed};
use crate::settings::Settings;
use bytes::{Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use pgentra::Secret;
use pgentra_wire::{ErrorFields, MAX_STARTUP_PACKET, startup_message};
use postgres_protocol::message::{backend, frontend};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Largest server message read during the login and the proxy's own queries (`ParameterStatus`,
/// notices, errors).
const MAX_OWN_MESSAGE: usize = 1 << 20;

/// Where and how to reach one upstream server.
pub(crate) struct Target {
    /// `host:port`, for logs and errors.
    pub(crate) name: String,
    /// What to connect to: `hostaddr` (which skips name resolution) or the host.
    addr: (String, u16),
    tls: tokio_rustls::TlsConnector,
    server_name: rustls::pki_types::ServerName<'static>,
}

impl Target {
    pub(crate) fn new(instance: &Instance) -> Result<Self, ProxyError> {
        let upstream = &instance.upstream;
        let host = upstream
            .host
            .clone()
            .ok_or_else(|| ProxyError::Config("an upstream without a host".into()))?;
        let port = upstream.port.unwrap_or(5432);
        let config = upstream.tls_options().client_config()?;
        let server_name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|_| ProxyError::Config(format!("{host} is not a valid server name")))?;
        Ok(Self {
            name: format!("{host}:{port}"),
            addr: (upstream.hostaddr.clone().unwrap_or(host), port),
            tls: tokio_rustls::TlsConnector::from(config),
            server_name,
        })
    }
}

/// A logged-in server connection.
pub(crate) struct ServerConn {
    pub(crate) stream: TlsStream<TcpStream>,
    /// What the client is to see of the login, exactly as the server sent it:
    /// `AuthenticationOk`, the `ParameterStatus` messages and any notices. (`BackendKeyData`
    /// is the proxy's to issue, and `ReadyForQuery` comes last.)
    pub(crate) welcome: Bytes,
    /// The server's parameters as it last reported them (`ParameterStatus`), in the order it
    /// first did.
    pub(crate) params: Params,
    /// The parameters right after the login: what `RESET ALL` (and `DISCARD ALL`) returns to.
    pub(crate) defaults: Params,
    /// The server's own cancel key.
    pub(crate) key: (i32, [u8; 4]),
    /// Cancel requests on their way to this connection.
    pub(crate) cancels: Arc<CancelsInFlight>,
    /// The statements the proxy prepared here for clients (transaction pooling).
    pub(crate) prepared: Prepared,
    /// The session settings set here for the client that last held it (transaction pooling).
    pub(crate) settings: Settings,
}

/// What the server answered to the proxy's own messages.
#[derive(Debug)]
pub(crate) struct Answers {
    /// The last `ReadyForQuery` status.
    pub(crate) status: u8,
    /// The rows (`DataRow` messages), in order.
    pub(crate) rows: Vec<Bytes>,
    /// The first error.
    pub(crate) error: Option<ErrorFields>,
}

/// Why one of the proxy's own queries on a server connection failed.
#[derive(Debug)]
pub(crate) enum QueryError {
    /// The server answered with an error (the connection is still usable).
    Server(ErrorFields),
    /// The connection broke, sent what is not the protocol, or did not answer in time.
    Broken(String),
}

impl ServerConn {
    /// Ends the server's session (`Terminate`) and closes the connection.
    pub(crate) async fn terminate(&mut self) {
        let mut message = BytesMut::new();
        frontend::terminate(&mut message);
        let _ = self.stream.write_all(&message).await;
        let _ = self.stream.shutdown().await;
    }

    /// Runs `sql` as a simple query of the proxy's own, within `limit`: its answers are read and
    /// dropped, but the parameters it changes are recorded. The `ReadyForQuery` status on
    /// success.
    pub(crate) async fn query(&mut self, sql: &str, limit: Duration) -> Result<u8, QueryError> {
        self.queries(&[sql], limit).await
    }

    /// Runs several simple queries of the proxy's own in one round trip (pipelined: each its
    /// own `Query`, as some, like `DISCARD ALL`, may not share one). The first error, or the
    /// last `ReadyForQuery` status.
    pub(crate) async fn queries(
        &mut self,
        sql: &[&str],
        limit: Duration,
    ) -> Result<u8, QueryError> {
        self.answers(sql, limit).await.map(|answers| answers.status)
    }

    /// As [`queries`](Self::queries), with the rows they returned.
    pub(crate) async fn answers(
        &mut self,
        sql: &[&str],
        limit: Duration,
    ) -> Result<Answers, QueryError> {
        let mut messages = BytesMut::new();
        for sql in sql {
            frontend::query(sql, &mut messages).map_err(|e| QueryError::Broken(e.to_string()))?;
        }
        let mut answers = self.exchange(&messages, sql.len(), limit).await?;
        match answers.error.take() {
            Some(error) => Err(QueryError::Server(error)),
            None => Ok(answers),
        }
    }

    /// Sends `messages` of the proxy's own and reads the answers up to the `ready`-th
    /// `ReadyForQuery`, within `limit`. The parameters they change are recorded.
    pub(crate) async fn exchange(
        &mut self,
        messages: &[u8],
        ready: usize,
        limit: Duration,
    ) -> Result<Answers, QueryError> {
        // "A simple Query message also destroys the unnamed statement" (Extended Query).
        self.prepared.unnamed = Unnamed::Empty;
        let run = async {
            self.stream.write_all(messages).await.map_err(broken)?;
            self.stream.flush().await.map_err(broken)?;
            let mut buffer = BytesMut::new();
            let mut answers = Answers {
                status: b'E',
                rows: Vec::new(),
                error: None,
            };
            let mut left = ready;
            while left > 0 {
                let raw = read_message(&mut self.stream, &mut buffer)
                    .await
                    .map_err(|e| QueryError::Broken(e.to_string()))?;
                match raw[0] {
                    b'S' => drop(self.params.report(&raw[5..])),
                    b'E' if answers.error.is_none() => {
                        answers.error = ErrorFields::parse(&raw[5..]).ok();
                    }
                    b'D' => answers.rows.push(raw),
                    b'Z' => {
                        left -= 1;
                        answers.status = raw.get(5).copied().unwrap_or(b'E');
                    }
                    _ => {}
                }
            }
            Ok(answers)
        };
        tokio::time::timeout(limit, run)
            .await
            .map_err(|_| QueryError::Broken(format!("no answer within {limit:?}")))?
    }

    /// Whether the server has closed the connection or said something while idle (a
    /// `FATAL` on shutdown, say): such a connection is never handed to a client.
    pub(crate) fn looks_closed(&self) -> bool {
        let tcp = self.stream.get_ref().0;
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        !matches!(tcp.poll_peek(&mut cx, &mut buf), std::task::Poll::Pending)
    }
}

/// The text of each column of a `DataRow` message (`None`: `NULL`).
pub(crate) fn columns(row: &[u8]) -> Option<Vec<Option<String>>> {
    let mut buffer = BytesMut::from(row);
    let Ok(Some(backend::Message::DataRow(body))) = backend::Message::parse(&mut buffer) else {
        return None;
    };
    let text = |range: Option<std::ops::Range<usize>>| {
        range.map(|range| String::from_utf8_lossy(&body.buffer()[range]).into_owned())
    };
    body.ranges().map(|range| Ok(text(range))).collect().ok()
}

fn broken(error: std::io::Error) -> QueryError {
    QueryError::Broken(error.to_string())
}

/// Why an upstream login failed.
#[derive(Debug)]
pub(crate) enum LoginError {
    /// No TCP connection or no verified TLS: the error says which.
    Connect(std::io::Error),
    /// The server asked for an authentication method other than a cleartext password.
    AuthMethod(i32),
    /// The server refused the login.
    Refused(ErrorFields),
    /// The server closed the connection, or sent what is not the protocol.
    Broke(String),
}

impl std::fmt::Display for LoginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(error) => write!(f, "{error}"),
            Self::AuthMethod(method) => write!(
                f,
                "the server asked for authentication method {method}, not a password"
            ),
            Self::Refused(fields) => f.write_str(fields.get(b'M').unwrap_or("an unreadable error")),
            Self::Broke(what) => write!(f, "the server {what}"),
        }
    }
}

impl From<std::io::Error> for LoginError {
    fn from(error: std::io::Error) -> Self {
        match error.kind() {
            std::io::ErrorKind::UnexpectedEof => Self::Broke("closed the connection".into()),
            _ => Self::Broke(format!("failed: {error}")),
        }
    }
}

/// TCP and verified TLS to the server, within `limit`. TLS is required: a server that answers
/// `N` to the `SSLRequest` never gets the token.
pub(crate) async fn connect(
    target: &Target,
    limit: Duration,
) -> Result<TlsStream<TcpStream>, std::io::Error> {
    let attempt = async {
        let (host, port) = &target.addr;
        let mut tcp = TcpStream::connect((host.as_str(), *port)).await?;
        tcp.set_nodelay(true)?;
        // Dead peers must not leave sessions open forever.
        socket2::SockRef::from(&tcp).set_tcp_keepalive(&crate::config::keepalive())?;
        let mut request = BytesMut::new();
        frontend::ssl_request(&mut request);
        tcp.write_all(&request).await?;
        if tcp.read_u8().await? != b'S' {
            return Err(std::io::Error::other(
                "the server does not accept TLS, and the token must not travel in clear text",
            ));
        }
        target.tls.connect(target.server_name.clone(), tcp).await
    };
    tokio::time::timeout(limit, attempt).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no TLS connection within {limit:?}"),
        )
    })?
}

/// The startup message the proxy sends: `user` and `database` first, then the client's other
/// parameters as they came (values as bytes). `None` when it would be over PostgreSQL's
/// startup packet limit, with its length.
pub(crate) fn startup(
    role: &str,
    database: Option<&str>,
    client: &[(String, Bytes)],
) -> Result<Bytes, usize> {
    let params: Vec<(&str, &[u8])> = [("user", role.as_bytes())]
        .into_iter()
        .chain(database.map(|db| ("database", db.as_bytes())))
        .chain(
            client
                .iter()
                // The proxy speaks 3.0 upstream, and names the role and database itself.
                .filter(|(key, _)| {
                    key != "user"
                        && !key.starts_with("_pq_.")
                        && !(key == "database" && database.is_some())
                })
                .map(|(k, v)| (k.as_str(), &v[..])),
        )
        .collect();
    let message = startup_message(&params);
    if message.len() > MAX_STARTUP_PACKET {
        return Err(message.len());
    }
    Ok(message)
}

/// Connects and logs in with `startup` (from [`startup`]) and `password`.
pub(crate) async fn login(
    target: &Target,
    connect_timeout: Duration,
    startup: &[u8],
    password: &Secret,
) -> Result<ServerConn, LoginError> {
    let mut stream = connect(target, connect_timeout)
        .await
        .map_err(LoginError::Connect)?;
    stream.write_all(startup).await?;
    stream.flush().await?;
    let mut buffer = BytesMut::with_capacity(4096);
    let mut welcome = BytesMut::new();
    let mut params = Params::default();
    let mut key = None;
    loop {
        let raw = read_message(&mut stream, &mut buffer).await?;
        let mut one = BytesMut::from(&raw[..]);
        let message = backend::Message::parse(&mut one)
            .map_err(|e| LoginError::Broke(format!("sent a malformed message: {e}")))?
            .ok_or_else(|| LoginError::Broke("sent a truncated message".into()))?;
        match message {
            backend::Message::AuthenticationCleartextPassword => {
                let mut answer = BytesMut::new();
                frontend::password_message(password.expose_secret().as_bytes(), &mut answer)?;
                stream.write_all(&answer).await?;
                stream.flush().await?;
            }
            backend::Message::ParameterStatus(_) => {
                let _ = params.report(&raw[5..]);
                welcome.extend_from_slice(&raw);
            }
            backend::Message::AuthenticationOk | backend::Message::NoticeResponse(_) => {
                welcome.extend_from_slice(&raw);
            }
            backend::Message::BackendKeyData(body) => {
                key = Some((body.process_id(), body.secret_key().to_be_bytes()));
            }
            backend::Message::ReadyForQuery(_) => {
                let key = key.ok_or_else(|| LoginError::Broke("sent no BackendKeyData".into()))?;
                return Ok(ServerConn {
                    stream,
                    welcome: welcome.freeze(),
                    defaults: params.clone(),
                    params,
                    key,
                    cancels: Arc::default(),
                    prepared: Prepared::default(),
                    settings: Settings::default(),
                });
            }
            backend::Message::ErrorResponse(_) => {
                let fields = ErrorFields::parse(&raw[5..]).unwrap_or_else(|_| {
                    ErrorFields::fatal("08P01", "the server sent a malformed error", None)
                });
                return Err(LoginError::Refused(fields));
            }
            _ if raw[0] == b'R' => {
                let method = i32::from_be_bytes([raw[5], raw[6], raw[7], raw[8]]);
                return Err(LoginError::AuthMethod(method));
            }
            _ => {
                return Err(LoginError::Broke(format!(
                    "sent an unexpected message ({:?})",
                    char::from(raw[0])
                )));
            }
        }
    }
}

/// Reads one whole message (tag, length, body) through `buffer`, for the login and the proxy's
/// own queries (the relay streams instead).
async fn read_message(
    stream: &mut TlsStream<TcpStream>,
    buffer: &mut BytesMut,
) -> Result<Bytes, LoginError> {
    loop {
        let head = Head::parse(buffer)
            .map_err(|_| LoginError::Broke("sent a malformed message".into()))?;
        if let Some(head) = head {
            if head.len > MAX_OWN_MESSAGE {
                return Err(LoginError::Broke(format!(
                    "sent a {}-byte message to the proxy's own request",
                    head.len
                )));
            }
            if buffer.len() >= head.len {
                return Ok(buffer.split_to(head.len).freeze());
            }
        }
        if stream.read_buf(buffer).await? == 0 {
            return Err(LoginError::Broke("closed the connection".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_reads_as_its_columns() {
        let row = b"D\0\0\0\x15\0\x03\0\0\0\x01t\xff\xff\xff\xff\0\0\0\x0212";
        let columns = columns(row).unwrap();
        assert_eq!(columns, [Some("t".into()), None, Some("12".into())]);
        assert_eq!(super::columns(b"Z\0\0\0\x05I"), None);
    }
}
