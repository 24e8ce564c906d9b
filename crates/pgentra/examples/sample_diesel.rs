//! Sample: diesel with Entra ID, sync (`PgConnection` over libpq, r2d2 pool) and async
//! (diesel-async over rustls, deadpool pool). Reads the `PG*` variables from the environment or
//! a `.env` file.
//!
//! ```sh
//! cargo run -p pgentra --example sample_diesel --features diesel-2,diesel-async-0_9 -- --mode both
//! ```

use diesel::dsl::sql;
use diesel::sql_types::{Integer, Text};
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
    let auth = EntraAuth::from_env()?;
    let info = ConnInfo::from_env_with_dotenv()?;
    if mode != "async" {
        use diesel::RunQueryDsl;
        let pool = r2d2::Pool::builder().max_size(4).build(
            pgentra::diesel::EntraPgConnectionManager::new(auth.clone(), info.clone()),
        )?;
        let mut conn = pool.get()?;
        let (user, now): (String, String) = diesel::select((
            sql::<Text>("current_user::text"),
            sql::<Text>("now()::text"),
        ))
        .get_result(&mut conn)?;
        println!("sync:  connected as {user} at {now}");
        drop(conn);
        let workers: Vec<_> = (0..4)
            .map(|i: i32| {
                let pool = pool.clone();
                std::thread::spawn(move || -> Result<i32, String> {
                    let mut conn = pool.get().map_err(|e| e.to_string())?;
                    diesel::select(sql::<Integer>(&format!("{i} * 10")))
                        .get_result(&mut conn)
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        for worker in workers {
            println!(
                "sync:  query result: {}",
                worker.join().expect("worker thread")?
            );
        }
    }
    if mode != "sync" {
        use diesel_async::RunQueryDsl;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let pool = pgentra::diesel_async::deadpool(EntraConnector::new(auth, &info)?, 4)?;
            let mut conn = pool.get().await?;
            let (user, now): (String, String) = diesel::select((
                sql::<Text>("current_user::text"),
                sql::<Text>("now()::text"),
            ))
            .get_result(&mut conn)
            .await?;
            println!("async: connected as {user} at {now}");
            drop(conn);
            let queries = (0..4).map(|i: i32| {
                let pool = pool.clone();
                async move {
                    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
                    diesel::select(sql::<Integer>(&format!("{i} * 10")))
                        .get_result::<i32>(&mut conn)
                        .await
                        .map_err(|e| e.to_string())
                }
            });
            for result in futures::future::join_all(queries).await {
                println!("async: query result: {}", result?);
            }
            Ok::<_, Box<dyn std::error::Error>>(())
        })?;
    }
    Ok(())
}
