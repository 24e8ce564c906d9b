//! Sample: a bb8 pool of tokio-postgres connections with Entra ID. Reads the `PG*` variables
//! from the environment or a `.env` file.
//!
//! ```sh
//! cargo run -p pgentra --example sample_bb8 --features bb8-0_9
//! ```

use pgentra::EntraAuth;
use pgentra::bb8::{EntraConnectionManager, LastErrorSink};
use pgentra::conninfo::ConnInfo;
use pgentra::tokio_postgres::EntraConnector;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let connector =
        EntraConnector::new(EntraAuth::from_env()?, &ConnInfo::from_env_with_dotenv()?)?;
    let errors = LastErrorSink::default();
    let pool = bb8::Pool::builder()
        .max_size(8)
        .error_sink(Box::new(errors.clone()))
        .build(EntraConnectionManager::new(connector))
        .await?;
    // bb8 reports a failed connect as a timeout; the sink knows the real cause.
    let explain = |timeout: bb8::RunError<pgentra::Error>| match errors.last_error() {
        Some(cause) => cause.to_string(),
        None => timeout.to_string(),
    };
    let client = pool.get().await.map_err(explain)?;
    let row = client
        .query_one("SELECT current_user::text, now()::text", &[])
        .await?;
    println!(
        "connected as {} at {}",
        row.get::<_, String>(0),
        row.get::<_, String>(1)
    );
    drop(client);
    let queries = (0..4).map(|i| {
        let pool = pool.clone();
        async move {
            let client = pool.get().await.map_err(|e| e.to_string())?;
            let row = client
                .query_one("SELECT $1::int * 10", &[&i])
                .await
                .map_err(|e| e.to_string())?;
            Ok::<i32, String>(row.get(0))
        }
    });
    for result in futures::future::join_all(queries).await {
        println!("query result: {}", result?);
    }
    Ok(())
}
