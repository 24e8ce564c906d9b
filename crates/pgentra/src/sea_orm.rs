//! [SeaORM](https://docs.rs/sea-orm) 2 (PostgreSQL): a normal `DatabaseConnection` over a sqlx
//! pool whose connect options are kept fresh.
//!
//! SeaORM connects through sqlx and has no hook of its own for a changing password: pgentra
//! builds the sqlx pool with [`SqlxConnector::pool`](crate::sqlx::SqlxConnector::pool), whose
//! refresher pushes each new token into it (see [`crate::sqlx`]), and hands the pool to SeaORM.
//! Keep the returned [`RefreshGuard`] as long as the connection. Settings SeaORM would take from
//! its `ConnectOptions` (pool sizes, timeouts) go on the `PgPoolOptions` instead.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use sea_orm::{ConnectionTrait, Statement};
//! let auth = pgentra::EntraAuth::from_env()?;
//! let connector = pgentra::sqlx::SqlxConnector::from_url(auth, "postgres://srv.postgres.database.azure.com/app")?;
//! let (db, _refresher) = pgentra::sea_orm::connect(&connector, sqlx::postgres::PgPoolOptions::new()).await?;
//! let row = db
//!     .query_one_raw(Statement::from_string(db.get_database_backend(), "SELECT current_user::text AS u"))
//!     .await?;
//! # let _ = row; Ok(()) }
//! ```

use crate::error::Result;
use crate::sqlx::{RefreshGuard, SqlxConnector};
use sea_orm::{DatabaseConnection, SqlxPostgresConnector};
use sqlx::postgres::PgPoolOptions;

/// Connects SeaORM through a sqlx pool that the returned guard keeps fresh.
pub async fn connect(
    connector: &SqlxConnector,
    options: PgPoolOptions,
) -> Result<(DatabaseConnection, RefreshGuard)> {
    let (pool, refresher) = connector.pool(options).await?;
    Ok((
        SqlxPostgresConnector::from_sqlx_postgres_pool(pool),
        refresher,
    ))
}
