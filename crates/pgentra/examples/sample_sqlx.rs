//! Sample: a sqlx pool with Entra ID, its connect options kept fresh. Reads the `PG*`
//! variables from the environment or a `.env` file.
//!
//! ```sh
//! cargo run -p pgentra --all-features --example sample_sqlx
//! ```

use pgentra::EntraAuth;
use pgentra::conninfo::ConnInfo;
use pgentra::sqlx::SqlxConnector;
use sqlx::postgres::PgPoolOptions;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let connector = SqlxConnector::new(EntraAuth::from_env()?, &ConnInfo::from_env_with_dotenv()?)?;
    // Keep `_refresher` as long as the pool: it pushes each new token into it.
    let (pool, _refresher) = connector
        .pool(PgPoolOptions::new().max_connections(8))
        .await?;
    let (user, now): (String, String) = sqlx::query_as("SELECT current_user::text, now()::text")
        .fetch_one(&pool)
        .await?;
    println!("connected as {user} at {now}");
    let queries = (0..4).map(|i: i32| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i32>("SELECT $1 * 10")
                .bind(i)
                .fetch_one(&pool)
                .await
        }
    });
    for result in futures::future::join_all(queries).await {
        println!("query result: {}", result?);
    }
    pool.close().await;
    Ok(())
}
