//! Sample: SeaORM with Entra ID, over a sqlx pool kept fresh. Reads the `PG*` variables from
//! the environment or a `.env` file.
//!
//! ```sh
//! cargo run -p pgentra --all-features --example sample_sea_orm
//! ```

use pgentra::EntraAuth;
use pgentra::conninfo::ConnInfo;
use pgentra::sqlx::SqlxConnector;
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use sqlx::postgres::PgPoolOptions;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let connector = SqlxConnector::new(EntraAuth::from_env()?, &ConnInfo::from_env_with_dotenv()?)?;
    let (db, _refresher) =
        pgentra::sea_orm::connect(&connector, PgPoolOptions::new().max_connections(8)).await?;
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT current_user::text AS u, now()::text AS t",
        ))
        .await?
        .ok_or("no row")?;
    println!(
        "connected as {} at {}",
        row.try_get::<String>("", "u")?,
        row.try_get::<String>("", "t")?
    );
    let queries = (0..4).map(|i: i32| {
        let db = db.clone();
        async move {
            let statement = Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT $1 * 10 AS v",
                [i.into()],
            );
            let row = db
                .query_one_raw(statement)
                .await?
                .ok_or(sea_orm::DbErr::RecordNotFound("no row".into()))?;
            row.try_get::<i32>("", "v")
        }
    });
    for result in futures::future::join_all(queries).await {
        println!("query result: {}", result?);
    }
    db.close().await?;
    Ok(())
}
