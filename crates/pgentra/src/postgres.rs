//! [postgres](https://docs.rs/postgres), the sync client: a blocking connection with fresh Entra
//! credentials each time.
//!
//! The credentials come from [`EntraAuth::credentials_blocking`](crate::EntraAuth::credentials_blocking),
//! which works on any thread. The driver's own `postgres::Config::connect` starts a runtime and
//! blocks on it, which tokio forbids on an async worker thread: from async code, call
//! [`connect`] inside `tokio::task::spawn_blocking`.
//!
//! ```no_run
//! let auth = pgentra::EntraAuth::from_env()?;
//! let connector = pgentra::tokio_postgres::EntraConnector::from_url(
//!     auth,
//!     "postgres://srv.postgres.database.azure.com/app",
//! )?;
//! let mut client = pgentra::postgres::connect(&connector)?;
//! let row = client.query_one("SELECT current_user", &[]).map_err(pgentra::Error::connect)?;
//! # let _ = row; Ok::<(), pgentra::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::tokio_postgres::EntraConnector;

/// Opens a blocking `postgres::Client` with the connector's settings and the current
/// credentials. Not on an async worker thread (see the [module docs](self)).
pub fn connect(connector: &EntraConnector) -> Result<::postgres::Client> {
    let creds = connector.auth().credentials_blocking()?;
    let config = ::postgres::Config::from(connector.with_credentials(&creds));
    config
        .connect(connector.tls().clone())
        .map_err(Error::connect)
}
