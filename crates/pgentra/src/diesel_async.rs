//! [diesel-async](https://docs.rs/diesel-async) 0.9 (`AsyncPgConnection`): a `ManagerConfig`
//! whose `custom_setup` connects with a fresh token over rustls, for diesel-async's deadpool and
//! bb8 pools.
//!
//! diesel-async's own `establish` has no TLS; pgentra connects with tokio-postgres through the
//! [`EntraConnector`] (verified TLS, fresh credentials) and hands the connection to
//! `AsyncPgConnection::try_from_client_and_connection`. The URL diesel-async passes to the
//! callback is ignored (it never holds a token).
//!
//! Errors: diesel only carries `diesel::ConnectionError`. A credential failure arrives as
//! `ConnectionError::CouldntSetupConfiguration(Error::QueryBuilderError(..))` whose boxed source
//! is the [`crate::Error`]; the server's refusal arrives as `BadConnection` with its message.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use diesel_async::RunQueryDsl;
//! let auth = pgentra::EntraAuth::from_env()?;
//! let connector = pgentra::tokio_postgres::EntraConnector::from_url(
//!     auth,
//!     "postgres://srv.postgres.database.azure.com/app",
//! )?;
//! let pool = pgentra::diesel_async::deadpool(connector, 16)?;
//! let mut conn = pool.get().await?;
//! let user: String = diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>("current_user::text"))
//!     .get_result(&mut conn)
//!     .await?;
//! # let _ = user; Ok(()) }
//! ```

use crate::error::{Error, ErrorChain, Result};
use crate::tokio_postgres::EntraConnector;
use diesel::ConnectionError;
use diesel_async::AsyncPgConnection;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig, SetupCallback};

/// The `custom_setup` callback: each new connection logs in with the connector's settings and
/// the current credentials.
pub fn setup(connector: EntraConnector) -> SetupCallback<AsyncPgConnection> {
    Box::new(move |_url| {
        let connector = connector.clone();
        Box::pin(async move {
            let (client, connection) = connector.connect().await.map_err(connection_error)?;
            AsyncPgConnection::try_from_client_and_connection(client, connection).await
        })
    })
}

/// A `ManagerConfig` with [`setup`] as its `custom_setup`.
pub fn manager_config(connector: EntraConnector) -> ManagerConfig<AsyncPgConnection> {
    let mut config = ManagerConfig::default();
    config.custom_setup = setup(connector);
    config
}

/// A connection manager for diesel-async's pools.
pub fn manager(connector: EntraConnector) -> AsyncDieselConnectionManager<AsyncPgConnection> {
    // The URL only labels the manager: the callback connects with the connector.
    let label = format!("{:?}", connector.base_config().get_hosts());
    AsyncDieselConnectionManager::new_with_config(label, manager_config(connector))
}

/// A diesel-async deadpool pool of at most `max_size` connections.
pub fn deadpool(
    connector: EntraConnector,
    max_size: usize,
) -> Result<diesel_async::pooled_connection::deadpool::Pool<AsyncPgConnection>> {
    diesel_async::pooled_connection::deadpool::Pool::builder(manager(connector))
        .max_size(max_size)
        .build()
        .map_err(|e| Error::config(format!("cannot build the pool: {e}")))
}

/// A diesel-async bb8 pool of at most `max_size` connections.
pub async fn bb8(
    connector: EntraConnector,
    max_size: u32,
) -> Result<diesel_async::pooled_connection::bb8::Pool<AsyncPgConnection>> {
    ::bb8::Pool::builder()
        .max_size(max_size)
        .build(manager(connector))
        .await
        .map_err(Error::connect)
}

/// pgentra's error as a diesel `ConnectionError`: the server's or driver's refusal as text (the
/// driver's error and its causes, which hold the server's message), anything else as a typed
/// source.
fn connection_error(error: Error) -> ConnectionError {
    match error {
        Error::Connect { source } => {
            ConnectionError::BadConnection(ErrorChain(&*source).to_string())
        }
        other => crate::diesel_errors::typed(other),
    }
}

pub use crate::diesel_errors::cause;
