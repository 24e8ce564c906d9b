//! Sample: an r2d2 pool of sync `postgres` connections with Entra ID. Reads the `PG*`
//! variables from the environment or a `.env` file.
//!
//! ```sh
//! cargo run -p pgentra --example sample_r2d2 --features r2d2-0_8
//! ```

use pgentra::EntraAuth;
use pgentra::conninfo::ConnInfo;
use pgentra::tokio_postgres::EntraConnector;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let connector =
        EntraConnector::new(EntraAuth::from_env()?, &ConnInfo::from_env_with_dotenv()?)?;
    let pool = r2d2::Pool::builder()
        .max_size(8)
        .min_idle(Some(1))
        .build(pgentra::r2d2::EntraConnectionManager::new(connector))?;
    let mut client = pool.get()?;
    let row = client.query_one("SELECT current_user::text, now()::text", &[])?;
    println!(
        "connected as {} at {}",
        row.get::<_, String>(0),
        row.get::<_, String>(1)
    );
    drop(client);
    let workers: Vec<_> = (0..4)
        .map(|i: i32| {
            let pool = pool.clone();
            std::thread::spawn(move || -> Result<i32, String> {
                let mut client = pool.get().map_err(|e| e.to_string())?;
                let row = client
                    .query_one("SELECT $1::int * 10", &[&i])
                    .map_err(|e| e.to_string())?;
                Ok(row.get(0))
            })
        })
        .collect();
    for worker in workers {
        println!("query result: {}", worker.join().expect("worker thread")?);
    }
    Ok(())
}
