//! [r2d2](https://docs.rs/r2d2): a `ManageConnection` for the sync `postgres` client whose every
//! new connection logs in with fresh Entra credentials.
//!
//! r2d2 opens connections on its own worker threads, outside any tokio runtime, where the
//! blocking credential call and the driver's own runtime are both fine. `Pool::get` blocks the
//! caller: from async code, call it inside `spawn_blocking`. Dropping a `postgres::Client` also
//! blocks, so drop the pool (and its connections) outside async code too. r2d2 keeps only the
//! text of the last connect error and logs it, so the manager fails with a [`ConnectError`],
//! whose text is the whole chain (the server's refusal included); pgentra's errors never
//! contain a token.
//!
//! ```no_run
//! let auth = pgentra::EntraAuth::from_env()?;
//! let connector = pgentra::tokio_postgres::EntraConnector::from_url(
//!     auth,
//!     "postgres://srv.postgres.database.azure.com/app",
//! )?;
//! let pool = r2d2::Pool::builder()
//!     .max_size(8)
//!     .build(pgentra::r2d2::EntraConnectionManager::new(connector))
//!     .map_err(pgentra::Error::connect)?;
//! let mut client = pool.get().map_err(pgentra::Error::connect)?;
//! let row = client.query_one("SELECT current_user", &[]).map_err(pgentra::Error::connect)?;
//! # let _ = row; Ok::<(), pgentra::Error>(())
//! ```

use crate::error::{Error, ErrorChain};
use crate::tokio_postgres::EntraConnector;
use std::fmt;

/// An `r2d2::ManageConnection` that opens `postgres::Client`s with fresh credentials.
#[derive(Debug, Clone)]
pub struct EntraConnectionManager {
    connector: EntraConnector,
}

impl EntraConnectionManager {
    /// Wraps a connector.
    pub fn new(connector: EntraConnector) -> Self {
        Self { connector }
    }
}

impl r2d2::ManageConnection for EntraConnectionManager {
    type Connection = ::postgres::Client;
    type Error = ConnectError;

    fn connect(&self) -> Result<Self::Connection, ConnectError> {
        crate::postgres::connect(&self.connector).map_err(ConnectError)
    }

    fn is_valid(&self, client: &mut Self::Connection) -> Result<(), ConnectError> {
        client
            .simple_query("")
            .map(drop)
            .map_err(|e| ConnectError(Error::connect(e)))
    }

    fn has_broken(&self, client: &mut Self::Connection) -> bool {
        client.is_closed()
    }
}

/// Why the manager could not open (or check) a connection, as r2d2 hands it to its error
/// handler.
///
/// r2d2 keeps nothing of a connect error but its text (`r2d2::Error` holds a string), so this
/// error's `Display` is the whole [`ErrorChain`] of the pgentra error inside, and it has no
/// `source()`; [`error`](Self::error) gives the typed error to a custom `r2d2::HandleError`.
///
/// ```
/// let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
/// let error = pgentra::r2d2::ConnectError::from(pgentra::Error::connect(refused));
/// assert!(error.to_string().ends_with(": connection refused"));
/// assert!(matches!(error.error(), pgentra::Error::Connect { .. }));
/// ```
#[derive(Debug, Clone)]
pub struct ConnectError(Error);

impl ConnectError {
    /// The pgentra error.
    pub fn error(&self) -> &Error {
        &self.0
    }
}

impl From<Error> for ConnectError {
    fn from(error: Error) -> Self {
        Self(error)
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", ErrorChain(&self.0))
    }
}

impl std::error::Error for ConnectError {}
