//! Sample: tokio-postgres (async) and postgres (sync) with Entra ID, like Microsoft's reference
//! samples for other languages. Reads `PGHOST`, `PGPORT`, `PGDATABASE`, `PGUSER`,
//! `PGSSLMODE`, `PGSSLROOTCERT` from the environment or a `.env` file.
//!
//! ```sh
//! cargo run -p pgentra --example sample_postgres --features postgres-0_19 -- --mode both
//! ```

use pgentra::EntraAuth;
use pgentra::conninfo::ConnInfo;
use pgentra::tokio_postgres::EntraConnector;

fn mode() -> String {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--mode") {
        Some(i) => args.get(i + 1).cloned().unwrap_or_default(),
        None => "both".into(),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mode = mode();
    if !matches!(mode.as_str(), "sync" | "async" | "both") {
        return Err(format!("--mode must be sync, async or both, not {mode:?}").into());
    }
    let connector =
        EntraConnector::new(EntraAuth::from_env()?, &ConnInfo::from_env_with_dotenv()?)?;
    if mode != "async" {
        // The sync client, from plain threads (it runs its own runtime).
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let connector = connector.clone();
                std::thread::spawn(move || -> Result<String, pgentra::Error> {
                    let mut client = pgentra::postgres::connect(&connector)?;
                    let row = client
                        .query_one("SELECT current_user::text, now()::text", &[])
                        .map_err(pgentra::Error::connect)?;
                    Ok(format!(
                        "sync  #{i}: {} at {}",
                        row.get::<_, String>(0),
                        row.get::<_, String>(1)
                    ))
                })
            })
            .collect();
        for thread in threads {
            println!("{}", thread.join().expect("worker thread")?);
        }
    }
    if mode != "sync" {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let mut tasks = Vec::new();
            for i in 0..4 {
                let connector = connector.clone();
                tasks.push(tokio::spawn(async move {
                    let (client, connection) = connector.connect().await?;
                    tokio::spawn(connection);
                    let row = client
                        .query_one("SELECT current_user::text, now()::text", &[])
                        .await
                        .map_err(pgentra::Error::connect)?;
                    Ok::<_, pgentra::Error>(format!(
                        "async #{i}: {} at {}",
                        row.get::<_, String>(0),
                        row.get::<_, String>(1)
                    ))
                }));
            }
            for task in tasks {
                println!("{}", task.await??);
            }
            Ok::<_, Box<dyn std::error::Error>>(())
        })?;
    }
    Ok(())
}
