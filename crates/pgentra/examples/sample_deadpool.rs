//! Sample: a deadpool-postgres pool with Entra ID. Reads the `PG*` variables from the
//! environment or a `.env` file.
//!
//! ```sh
//! cargo run -p pgentra --example sample_deadpool --features deadpool-postgres-0_14
//! ```

use pgentra::EntraAuth;
use pgentra::conninfo::ConnInfo;
use pgentra::tokio_postgres::EntraConnector;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let connector =
        EntraConnector::new(EntraAuth::from_env()?, &ConnInfo::from_env_with_dotenv()?)?;
    let pool = pgentra::deadpool::pool(connector, 8)?;
    let client = pool.get().await?;
    let row = client
        .query_one("SELECT current_user::text, now()::text", &[])
        .await?;
    println!(
        "connected as {} at {}",
        row.get::<_, String>(0),
        row.get::<_, String>(1)
    );
    drop(client);
    // A few concurrent queries through the pool.
    let mut tasks = Vec::new();
    for i in 0..4 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let client = pool.get().await?;
            let row = client.query_one("SELECT $1::int * 10", &[&i]).await?;
            Ok::<i32, Box<dyn std::error::Error + Send + Sync>>(row.get(0))
        }));
    }
    for task in tasks {
        println!("query result: {}", task.await?.map_err(|e| e.to_string())?);
    }
    Ok(())
}
