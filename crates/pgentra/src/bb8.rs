//! [bb8](https://docs.rs/bb8): a `ManageConnection` for tokio-postgres whose every new
//! connection logs in with fresh Entra credentials.
//!
//! bb8's `Pool::get` retries failed connects until its timeout and then returns only
//! `RunError::TimedOut`; the errors go to the pool's error sink, which drops them by default.
//! Give the pool a [`LastErrorSink`]: it logs each connect failure (never the token) and keeps
//! the last one, so the real cause (a credential failure, the server's refusal) can be shown.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use pgentra::bb8::{EntraConnectionManager, LastErrorSink};
//! let auth = pgentra::EntraAuth::from_env()?;
//! let connector = pgentra::tokio_postgres::EntraConnector::from_url(
//!     auth,
//!     "postgres://srv.postgres.database.azure.com/app",
//! )?;
//! let errors = LastErrorSink::default();
//! let pool = bb8::Pool::builder()
//!     .max_size(16)
//!     .error_sink(Box::new(errors.clone()))
//!     .build(EntraConnectionManager::new(connector))
//!     .await?;
//! let client = match pool.get().await {
//!     Ok(client) => client,
//!     // The sink's error says why (the credential's failure, or the server's refusal).
//!     Err(timeout) => return Err(errors.last_error().map_or_else(|| timeout.into(), Into::into)),
//! };
//! # let _ = client; Ok(()) }
//! ```

use crate::error::{Error, ErrorChain, Result};
use crate::sync::lock;
use crate::tokio_postgres::EntraConnector;
use std::sync::{Arc, Mutex};

/// A `bb8::ManageConnection` that opens tokio-postgres connections with fresh credentials.
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

impl bb8::ManageConnection for EntraConnectionManager {
    type Connection = ::tokio_postgres::Client;
    type Error = Error;

    async fn connect(&self) -> Result<Self::Connection> {
        let (client, connection) = self.connector.connect().await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
        Ok(client)
    }

    async fn is_valid(&self, client: &mut Self::Connection) -> Result<()> {
        client
            .simple_query("")
            .await
            .map(drop)
            .map_err(Error::connect)
    }

    fn has_broken(&self, client: &mut Self::Connection) -> bool {
        client.is_closed()
    }
}

/// An error sink that logs connect failures and keeps the last one; clones share it.
#[derive(Debug, Clone, Default)]
pub struct LastErrorSink {
    last: Arc<Mutex<Option<Error>>>,
}

impl LastErrorSink {
    /// The most recent connect failure, if any.
    pub fn last_error(&self) -> Option<Error> {
        lock(&self.last).clone()
    }
}

impl bb8::ErrorSink<Error> for LastErrorSink {
    fn sink(&self, error: Error) {
        tracing::warn!(error = %ErrorChain(&error), "bb8 could not open a connection");
        *lock(&self.last) = Some(error);
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<Error>> {
        Box::new(self.clone())
    }
}
