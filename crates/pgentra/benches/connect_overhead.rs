//! `connect_overhead`: the time to open 50 connections at once through each driver or pool with
//! pgentra (a cached token from the provider per connection) against the same pool with a
//! static password (bb8-postgres, r2d2_postgres, deadpool's own connect, plain
//! tokio-postgres/postgres), against the same emulator gateway, which accepts the fixed token as
//! the static password. Rounds alternate which side goes first; the table shows medians and
//! their ratio.
//!
//! ```sh
//! cargo bench -p pgentra --all-features --bench connect_overhead
//! PGENTRA_BENCH_ROUNDS=3 cargo bench -p pgentra --all-features --bench connect_overhead
//! ```

use pgentra::EntraAuth;
use pgentra::conninfo::ConnInfo;
use pgentra::sqlx::SqlxConnector;
use pgentra::tokio_postgres::{EntraConnector, Tls};
use pgentra_emulator::issuer::Principal;
use pgentra_emulator::{Emulator, EmulatorConfig, USER};
use sqlx::postgres::PgPoolOptions;
use std::time::{Duration, Instant};

const CONNECTIONS: usize = 50;

#[derive(Debug, Clone, Copy)]
enum Kind {
    TokioPostgres,
    Postgres,
    Deadpool,
    Bb8,
    R2d2,
    Sqlx,
    SeaOrm,
    DieselAsync,
    Diesel,
}

struct Setup {
    connector: EntraConnector,
    static_config: tokio_postgres::Config,
    tls: Tls,
    sqlx: SqlxConnector,
    static_sqlx: sqlx::postgres::PgConnectOptions,
    diesel: pgentra::diesel::EntraPgConnectionManager,
    static_libpq: String,
}

/// Opens `CONNECTIONS` connections at once and holds them; returns the time it took.
async fn open(kind: Kind, setup: &Setup, entra: bool) -> Duration {
    let started = Instant::now();
    let connector = setup.connector.clone();
    let config = setup.static_config.clone();
    let tls = setup.tls.clone();
    match kind {
        Kind::TokioPostgres => {
            let tasks: Vec<_> = (0..CONNECTIONS)
                .map(|_| {
                    let (connector, config, tls) = (connector.clone(), config.clone(), tls.clone());
                    tokio::spawn(async move {
                        let (client, connection) = if entra {
                            connector.connect().await.unwrap()
                        } else {
                            config.connect(tls).await.unwrap()
                        };
                        tokio::spawn(connection);
                        client
                    })
                })
                .collect();
            let mut clients = Vec::new();
            for task in tasks {
                clients.push(task.await.unwrap());
            }
            let elapsed = started.elapsed();
            drop(clients);
            elapsed
        }
        Kind::Postgres => tokio::task::spawn_blocking(move || {
            let threads: Vec<_> = (0..CONNECTIONS)
                .map(|_| {
                    let (connector, config, tls) = (connector.clone(), config.clone(), tls.clone());
                    std::thread::spawn(move || {
                        if entra {
                            pgentra::postgres::connect(&connector).unwrap()
                        } else {
                            postgres::Config::from(config).connect(tls).unwrap()
                        }
                    })
                })
                .collect();
            let clients: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            let elapsed = started.elapsed();
            drop(clients);
            elapsed
        })
        .await
        .unwrap(),
        Kind::Deadpool => {
            let pool = if entra {
                pgentra::deadpool::pool(connector, CONNECTIONS).unwrap()
            } else {
                let manager = deadpool_postgres::Manager::from_config(
                    config,
                    tls,
                    deadpool_postgres::ManagerConfig {
                        recycling_method: deadpool_postgres::RecyclingMethod::Fast,
                    },
                );
                deadpool_postgres::Pool::builder(manager)
                    .max_size(CONNECTIONS)
                    .build()
                    .unwrap()
            };
            hold_all((0..CONNECTIONS).map(|_| pool.get()), started).await
        }
        Kind::Bb8 => {
            if entra {
                hold_bb8(
                    pgentra::bb8::EntraConnectionManager::new(connector),
                    started,
                )
                .await
            } else {
                hold_bb8(
                    bb8_postgres::PostgresConnectionManager::new(config, tls),
                    started,
                )
                .await
            }
        }
        Kind::Sqlx | Kind::SeaOrm => {
            let options = PgPoolOptions::new().max_connections(CONNECTIONS as u32);
            // Both sides build the pool the same way (one connection opened to check it).
            let (pool, _refresher) = if entra {
                let (pool, refresher) = setup.sqlx.pool(options).await.unwrap();
                (pool, Some(refresher))
            } else {
                (
                    options
                        .connect_with(setup.static_sqlx.clone())
                        .await
                        .unwrap(),
                    None,
                )
            };
            if let Kind::SeaOrm = kind {
                use sea_orm::TransactionTrait;
                let db = sea_orm::SqlxPostgresConnector::from_sqlx_postgres_pool(pool);
                hold_all((0..CONNECTIONS).map(|_| db.begin()), started).await
            } else {
                hold_all((0..CONNECTIONS).map(|_| pool.acquire()), started).await
            }
        }
        Kind::DieselAsync => {
            use diesel_async::AsyncPgConnection;
            use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
            let manager = if entra {
                pgentra::diesel_async::manager(connector)
            } else {
                // The same TLS connect, with the fixed password.
                let mut manager_config = ManagerConfig::<AsyncPgConnection>::default();
                manager_config.custom_setup = Box::new(move |_| {
                    let (config, tls) = (config.clone(), tls.clone());
                    Box::pin(async move {
                        let (client, connection) = config
                            .connect(tls)
                            .await
                            .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))?;
                        AsyncPgConnection::try_from_client_and_connection(client, connection).await
                    })
                });
                AsyncDieselConnectionManager::new_with_config("static", manager_config)
            };
            let pool = diesel_async::pooled_connection::deadpool::Pool::builder(manager)
                .max_size(CONNECTIONS)
                .build()
                .unwrap();
            hold_all((0..CONNECTIONS).map(|_| pool.get()), started).await
        }
        Kind::Diesel => {
            let (manager, conninfo) = (setup.diesel.clone(), setup.static_libpq.clone());
            tokio::task::spawn_blocking(move || {
                if entra {
                    hold_r2d2(manager, started)
                } else {
                    hold_r2d2(
                        diesel::r2d2::ConnectionManager::<diesel::PgConnection>::new(conninfo),
                        started,
                    )
                }
            })
            .await
            .unwrap()
        }
        Kind::R2d2 => tokio::task::spawn_blocking(move || {
            if entra {
                hold_r2d2(
                    pgentra::r2d2::EntraConnectionManager::new(connector),
                    started,
                )
            } else {
                hold_r2d2(
                    r2d2_postgres::PostgresConnectionManager::new(
                        postgres::Config::from(config),
                        tls,
                    ),
                    started,
                )
            }
        })
        .await
        .unwrap(),
    }
}

/// Opens `CONNECTIONS` connections, one after the other as r2d2 does, and holds them.
fn hold_r2d2<M: r2d2::ManageConnection>(manager: M, started: Instant) -> Duration {
    let pool = r2d2::Pool::builder()
        .max_size(CONNECTIONS as u32)
        .min_idle(Some(0))
        .build(manager)
        .unwrap();
    let clients: Vec<_> = (0..CONNECTIONS).map(|_| pool.get().unwrap()).collect();
    let elapsed = started.elapsed();
    drop(clients);
    elapsed
}

/// Opens `CONNECTIONS` connections at once through a bb8 pool of `manager`.
async fn hold_bb8<M>(manager: M, started: Instant) -> Duration
where
    M: bb8::ManageConnection,
    M::Error: std::fmt::Debug,
{
    let pool = bb8::Pool::builder()
        .max_size(CONNECTIONS as u32)
        .build(manager)
        .await
        .unwrap();
    hold_all((0..CONNECTIONS).map(|_| pool.get()), started).await
}

/// Awaits all `gets` at once, holds what they return, and returns the time since `started`.
async fn hold_all<T, E: std::fmt::Debug>(
    gets: impl Iterator<Item = impl Future<Output = Result<T, E>>>,
    started: Instant,
) -> Duration {
    let held: Vec<T> = futures::future::join_all(gets)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let elapsed = started.elapsed();
    drop(held);
    elapsed
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let rounds: usize = std::env::var("PGENTRA_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(7);
    // Ignore criterion-style arguments such as `--bench`.
    let emulator = Emulator::start(EmulatorConfig::default()).expect(
        "start the emulator (needs the PostgreSQL server binaries: apt-get install postgresql)",
    );
    let info = ConnInfo::parse(&format!(
        "host=localhost port={} dbname=postgres sslmode=verify-full sslrootcert={}",
        emulator.gateway().port(),
        emulator.ca_file().display()
    ))
    .unwrap();
    let auth = EntraAuth::builder()
        .credential_chain(pgentra_emulator::testing::azure_cli(emulator.bin_dir()))
        .build()
        .unwrap();
    // "Once the token is cached": fetch it before measuring.
    auth.credentials_blocking().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let connector = EntraConnector::new(auth.clone(), &info).unwrap();
    let sqlx = SqlxConnector::new(auth.clone(), &info).unwrap();
    // The static password every baseline uses: a fixed token the gateway accepts.
    let token = emulator.token_for(&Principal::user(USER)).token;
    let mut static_config = connector.base_config().clone();
    static_config.user(USER).password(&token);
    let static_sqlx = runtime
        .block_on(sqlx.connect_options())
        .unwrap()
        .username(USER)
        .password(&token);
    let static_libpq = info
        .to_libpq(USER, &pgentra::Secret::new(token.as_str()))
        .expose_secret()
        .to_owned();
    let setup = Setup {
        tls: connector.tls().clone(),
        connector,
        static_config,
        sqlx,
        static_sqlx,
        diesel: pgentra::diesel::EntraPgConnectionManager::new(auth, info),
        static_libpq,
    };
    println!(
        "connect_overhead: {CONNECTIONS} connections at once, median of {rounds} rounds, baseline measured in the same run"
    );
    println!(
        "{:<16} {:>14} {:>17} {:>7}",
        "driver", "pgentra (ms)", "static pwd (ms)", "ratio"
    );
    for kind in [
        Kind::TokioPostgres,
        Kind::Postgres,
        Kind::Deadpool,
        Kind::Bb8,
        Kind::R2d2,
        Kind::Sqlx,
        Kind::SeaOrm,
        Kind::DieselAsync,
        Kind::Diesel,
    ] {
        let (mut ours, mut base) = (Vec::new(), Vec::new());
        runtime.block_on(async {
            // One unmeasured round of each, to warm up.
            open(kind, &setup, true).await;
            open(kind, &setup, false).await;
            for round in 0..rounds {
                if round % 2 == 0 {
                    ours.push(open(kind, &setup, true).await);
                    base.push(open(kind, &setup, false).await);
                } else {
                    base.push(open(kind, &setup, false).await);
                    ours.push(open(kind, &setup, true).await);
                }
            }
        });
        let (ours, base) = (median(ours), median(base));
        println!(
            "{:<16} {:>14.1} {:>17.1} {:>7.3}",
            format!("{kind:?}"),
            ours.as_secs_f64() * 1e3,
            base.as_secs_f64() * 1e3,
            ours.as_secs_f64() / base.as_secs_f64()
        );
    }
}
