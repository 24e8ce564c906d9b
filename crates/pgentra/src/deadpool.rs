//! [deadpool-postgres](https://docs.rs/deadpool-postgres): a pool whose every new connection
//! logs in with fresh Entra credentials.
//!
//! [`EntraConnect`] implements `deadpool_postgres::Connect`, the hook deadpool calls for each new
//! connection. [`pool`] and [`pool_from_config`] build a whole `deadpool_postgres::Pool`.
//!
//! That hook can only fail with a `tokio_postgres::Error`, which other crates cannot construct.
//! When the credentials cannot be obtained, pgentra fails the connection through a stream that
//! errors at once, so `pool.get()` returns a `tokio_postgres::Error` ("error communicating with
//! the server: …") whose `source()` chain holds the [`crate::Error`] with the real cause.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let auth = pgentra::EntraAuth::from_env()?;
//! let connector = pgentra::tokio_postgres::EntraConnector::from_url(
//!     auth,
//!     "postgres://srv.postgres.database.azure.com/app",
//! )?;
//! let pool = pgentra::deadpool::pool(connector, 16)?;
//! let client = pool.get().await?;
//! let row = client.query_one("SELECT current_user", &[]).await?;
//! # let _ = row; Ok(()) }
//! ```

use crate::error::{Error, Result};
use crate::tokio_postgres::EntraConnector;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The `deadpool_postgres::Connect` that logs in with fresh credentials.
#[derive(Debug, Clone)]
pub struct EntraConnect {
    connector: EntraConnector,
}

impl EntraConnect {
    /// Wraps a connector.
    pub fn new(connector: EntraConnector) -> Self {
        Self { connector }
    }
}

type ConnectResult = std::result::Result<
    (::tokio_postgres::Client, tokio::task::JoinHandle<()>),
    ::tokio_postgres::Error,
>;

impl deadpool_postgres::Connect for EntraConnect {
    /// Ignores `_pg_config`: it is the connector's own base configuration, which
    /// [`EntraConnector::with_credentials`] completes.
    fn connect(
        &self,
        _pg_config: &::tokio_postgres::Config,
    ) -> Pin<Box<dyn Future<Output = ConnectResult> + Send + '_>> {
        Box::pin(async move {
            let creds = match self.connector.auth().credentials().await {
                Ok(creds) => creds,
                Err(error) => return Err(carry(error).await),
            };
            let config = self.connector.with_credentials(&creds);
            let (client, connection) = config.connect(self.connector.tls().clone()).await?;
            let task = tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "connection ended with an error");
                }
            });
            Ok((client, task))
        })
    }
}

/// A pool of at most `max_size` connections, recycled with a quick check.
pub fn pool(connector: EntraConnector, max_size: usize) -> Result<Pool> {
    let config = connector.base_config().clone();
    let manager = Manager::from_connect(
        config,
        EntraConnect::new(connector),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size)
        .build()
        .map_err(|e| Error::config(format!("cannot build the pool: {e}")))
}

/// A pool from a `deadpool_postgres::Config` (as loaded from a configuration file or the
/// environment), keeping its connection, manager and pool settings; its password is ignored
/// and TLS follows `tls`.
pub fn pool_from_config(
    auth: crate::EntraAuth,
    config: &deadpool_postgres::Config,
    tls: &crate::tls::TlsOptions,
) -> Result<Pool> {
    let pg_config = config
        .get_pg_config()
        .map_err(|e| Error::config(format!("invalid deadpool_postgres::Config: {e}")))?;
    let connector = EntraConnector::from_config(auth, pg_config.clone(), tls)?;
    let manager = Manager::from_connect(
        pg_config,
        EntraConnect::new(connector),
        config.get_manager_config(),
    );
    Pool::builder(manager)
        .config(config.get_pool_config())
        .build()
        .map_err(|e| Error::config(format!("cannot build the pool: {e}")))
}

/// The pgentra error behind a failed `pool.get()`, if the failure was pgentra's (credentials)
/// rather than the server's.
///
/// ```no_run
/// # async fn demo(pool: deadpool_postgres::Pool) {
/// if let Err(error) = pool.get().await {
///     match pgentra::deadpool::cause(&error) {
///         Some(cause) => eprintln!("no credentials: {cause}"),
///         None => eprintln!("database error: {error}"),
///     }
/// }
/// # }
/// ```
pub fn cause<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Error> {
    // An io::Error hides its payload from `source()`; `get_ref()` reaches it (the driver may
    // wrap it in another io::Error on the way).
    fn unwrap_io<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Error> {
        let inner: &'a (dyn std::error::Error + 'static) =
            error.downcast_ref::<io::Error>()?.get_ref()?;
        inner.downcast_ref::<Error>().or_else(|| unwrap_io(inner))
    }
    std::iter::successors(Some(error), |e| e.source())
        .find_map(|e| e.downcast_ref::<Error>().or_else(|| unwrap_io(e)))
}

/// A `tokio_postgres::Error` whose source chain holds `error`: a connection attempt over a
/// stream that fails at once with it.
async fn carry(error: Error) -> ::tokio_postgres::Error {
    let mut config = ::tokio_postgres::Config::new();
    config.ssl_mode(::tokio_postgres::config::SslMode::Disable);
    match config
        .connect_raw(Failing(Some(error)), ::tokio_postgres::NoTls)
        .await
    {
        Err(carried) => carried,
        // The stream fails its first write, so the handshake cannot succeed.
        Ok(_) => unreachable!("a connection over a failing stream succeeded"),
    }
}

/// A stream whose every operation fails with the carried error.
struct Failing(Option<Error>);

impl Failing {
    fn fail(&mut self) -> io::Error {
        match self.0.take() {
            Some(error) => io::Error::other(error),
            None => io::Error::from(io::ErrorKind::BrokenPipe),
        }
    }
}

impl AsyncRead for Failing {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Err(self.fail()))
    }
}

impl AsyncWrite for Failing {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(self.fail()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Err(self.fail()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Err(self.fail()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_cause_is_in_the_source_chain() {
        let credential_failure =
            Error::config("no credential could get a token: AzureCliCredential: az not found");
        let carried = carry(credential_failure).await;
        let mut chain: Vec<String> = Vec::new();
        let mut source: Option<&dyn std::error::Error> = Some(&carried);
        while let Some(error) = source {
            chain.push(error.to_string());
            source = error.source();
        }
        assert!(
            chain.iter().any(|e| e.contains("az not found")),
            "{chain:?}"
        );
        assert!(
            matches!(cause(&carried), Some(Error::Config { .. })),
            "{chain:?}"
        );
    }
}
