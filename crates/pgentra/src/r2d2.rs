//! [r2d2](https://docs.rs/r2d2): a `ManageConnection` for the sync `postgres` client whose every
//! new connection logs in with fresh Entra credentials.
//!
//! r2d2 opens connections on its own worker threads, outside any tokio runtime, where the
//! blocking credential call and the driver's own runtime are both fine. `Pool::get` blocks the
//! caller: from async code, call it inside `spawn_blocking`. Dropping a `postgres::Client` also
//! blocks, so drop the pool (and its connections) outside async code too. r2d2 keeps only the
//! text of the last connect error and logs it; pgentra's errors never contain a token.
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

use crate::error::{Error, Result};
use crate::tokio_postgres::EntraConnector;

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
    type Error = Error;

    fn connect(&self) -> Result<Self::Connection> {
        crate::postgres::connect(&self.connector)
    }

    fn is_valid(&self, client: &mut Self::Connection) -> Result<()> {
        client.simple_query("").map(drop).map_err(Error::connect)
    }

    fn has_broken(&self, client: &mut Self::Connection) -> bool {
        client.is_closed()
    }
}
