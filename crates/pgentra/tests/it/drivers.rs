//! The drivers against the emulator: one scenario table, run over tokio-postgres, postgres,
//! deadpool-postgres, bb8, r2d2, sqlx, SeaORM, diesel-async and diesel; directly against the
//! gateway, and through `pgentra-proxy` in transaction pooling.

use pgentra::conninfo::ConnInfo;
use pgentra::credential::CredentialChain;
use pgentra::tokio_postgres::EntraConnector;
use pgentra::{EntraAuth, Error};
use pgentra_emulator::issuer::Principal;
use pgentra_emulator::testing::{self, TestCredential};
use pgentra_emulator::{Emulator, EmulatorConfig, MANAGED_IDENTITY, USER};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

// ---------------------------------------------------------------------------------------------
// The drivers, behind one interface: check out `n` connections at once, ask each for its role.
// ---------------------------------------------------------------------------------------------

type Users = Pin<Box<dyn Future<Output = Result<Vec<String>, String>> + Send>>;

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

/// The connectors of one provider and one set of connection settings, for every driver.
#[derive(Clone)]
struct Connectors {
    postgres: EntraConnector,
    sqlx: pgentra::sqlx::SqlxConnector,
    diesel: pgentra::diesel::EntraPgConnectionManager,
}

/// A driver (and, for pools, its pool) set up with a connector.
#[derive(Clone)]
enum Driver {
    TokioPostgres(EntraConnector),
    Postgres(EntraConnector),
    Deadpool(deadpool_postgres::Pool),
    Bb8(
        bb8::Pool<pgentra::bb8::EntraConnectionManager>,
        pgentra::bb8::LastErrorSink,
    ),
    R2d2(Arc<R2d2Pool>),
    Sqlx(sqlx::PgPool, Arc<pgentra::sqlx::RefreshGuard>),
    SeaOrm(
        sea_orm::DatabaseConnection,
        Arc<pgentra::sqlx::RefreshGuard>,
    ),
    DieselAsync(diesel_async::pooled_connection::deadpool::Pool<diesel_async::AsyncPgConnection>),
    Diesel(r2d2::Pool<pgentra::diesel::EntraPgConnectionManager>),
    /// The pool could not even be built (sqlx opens a connection to build it).
    Failed(String),
}

/// An r2d2 pool that is dropped on a plain thread: `postgres::Client`'s destructor blocks on
/// its own runtime, which tokio forbids on an async worker.
struct R2d2Pool(Option<r2d2::Pool<pgentra::r2d2::EntraConnectionManager>>);

impl Drop for R2d2Pool {
    fn drop(&mut self) {
        let pool = self.0.take();
        std::thread::spawn(move || drop(pool)).join().unwrap();
    }
}

const POOL_SIZE: u32 = 250;

async fn driver(kind: Kind, connectors: Connectors) -> Driver {
    let connector = connectors.postgres;
    match kind {
        Kind::TokioPostgres => Driver::TokioPostgres(connector),
        Kind::Postgres => Driver::Postgres(connector),
        Kind::Deadpool => {
            Driver::Deadpool(pgentra::deadpool::pool(connector, POOL_SIZE as usize).unwrap())
        }
        Kind::Bb8 => {
            let errors = pgentra::bb8::LastErrorSink::default();
            let pool = bb8::Pool::builder()
                .max_size(POOL_SIZE)
                .connection_timeout(Duration::from_secs(5))
                .error_sink(Box::new(errors.clone()))
                .build(pgentra::bb8::EntraConnectionManager::new(connector))
                .await
                .unwrap();
            Driver::Bb8(pool, errors)
        }
        Kind::R2d2 => Driver::R2d2(Arc::new(R2d2Pool(Some(
            r2d2::Pool::builder()
                .max_size(POOL_SIZE)
                .min_idle(Some(0))
                .connection_timeout(Duration::from_secs(10))
                .build(pgentra::r2d2::EntraConnectionManager::new(connector))
                .unwrap(),
        )))),
        Kind::Sqlx => {
            let options = sqlx::postgres::PgPoolOptions::new()
                .max_connections(POOL_SIZE)
                .acquire_timeout(Duration::from_secs(10));
            match connectors.sqlx.pool(options).await {
                Ok((pool, guard)) => Driver::Sqlx(pool, Arc::new(guard)),
                Err(error) => Driver::Failed(describe(&error)),
            }
        }
        Kind::DieselAsync => Driver::DieselAsync(
            pgentra::diesel_async::deadpool(connector, POOL_SIZE as usize).unwrap(),
        ),
        Kind::Diesel => Driver::Diesel(
            r2d2::Pool::builder()
                .max_size(POOL_SIZE)
                .min_idle(Some(0))
                .connection_timeout(Duration::from_secs(10))
                .build(connectors.diesel)
                .unwrap(),
        ),
        Kind::SeaOrm => {
            let options = sqlx::postgres::PgPoolOptions::new()
                .max_connections(POOL_SIZE)
                .acquire_timeout(Duration::from_secs(10));
            match pgentra::sea_orm::connect(&connectors.sqlx, options).await {
                Ok((db, guard)) => Driver::SeaOrm(db, Arc::new(guard)),
                Err(error) => Driver::Failed(describe(&error)),
            }
        }
    }
}

/// `n` SeaORM statements at once, outside transactions (each on a pool connection while it
/// runs), and each one's role.
async fn sea_orm_statements(
    db: &sea_orm::DatabaseConnection,
    n: usize,
) -> Result<Vec<String>, String> {
    use sea_orm::ConnectionTrait;
    let statements = (0..n).map(|_| {
        db.query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            QUERY,
        ))
    });
    let mut users = Vec::new();
    for result in futures::future::join_all(statements).await {
        let row = result.map_err(|e| describe(&e))?.ok_or("no row")?;
        users.push(row.try_get_by_index(0).map_err(|e| describe(&e))?);
    }
    Ok(users)
}

/// Every message of an error's source chain, joined, plus its `Debug`.
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let chain: Vec<String> = std::iter::successors(Some(error), |e| e.source())
        .map(ToString::to_string)
        .collect();
    format!("{} | {error:?}", chain.join(": "))
}

const QUERY: &str = "SELECT current_user::text";

impl Driver {
    fn users(&self, n: usize) -> Users {
        let driver = self.clone();
        Box::pin(async move {
            match driver {
                Self::TokioPostgres(connector) => {
                    let connects = (0..n).map(|_| {
                        let connector = connector.clone();
                        tokio::spawn(async move {
                            let (client, connection) =
                                connector.connect().await.map_err(|e| describe(&e))?;
                            tokio::spawn(connection);
                            let row = client
                                .query_one(QUERY, &[])
                                .await
                                .map_err(|e| describe(&e))?;
                            Ok::<String, String>(row.get(0))
                        })
                    });
                    let results = futures_join(connects).await;
                    results.into_iter().collect()
                }
                Self::Postgres(connector) => {
                    blocking(n, move || {
                        let mut client =
                            pgentra::postgres::connect(&connector).map_err(|e| describe(&e))?;
                        let row = client.query_one(QUERY, &[]).map_err(|e| describe(&e))?;
                        Ok(row.get(0))
                    })
                    .await
                }
                Self::Deadpool(pool) => {
                    let mut clients = Vec::new();
                    let gets = (0..n).map(|_| {
                        let pool = pool.clone();
                        tokio::spawn(async move { pool.get().await.map_err(|e| describe(&e)) })
                    });
                    for client in futures_join(gets).await {
                        clients.push(client?);
                    }
                    query_each(clients.iter().map(|c| &***c)).await
                }
                Self::Bb8(pool, errors) => {
                    let gets = (0..n).map(|_| pool.get());
                    let results = futures::future::join_all(gets).await;
                    let mut clients = Vec::new();
                    for result in results {
                        match result {
                            Ok(client) => clients.push(client),
                            // bb8 only says "timed out": the sink knows why.
                            Err(timeout) => {
                                return Err(errors
                                    .last_error()
                                    .map_or_else(|| describe(&timeout), |e| describe(&e)));
                            }
                        }
                    }
                    query_each(clients.iter().map(|c| &**c)).await
                }
                Self::Sqlx(pool, _refresher) => {
                    let acquires = (0..n).map(|_| pool.acquire());
                    let mut connections = Vec::new();
                    for result in futures::future::join_all(acquires).await {
                        connections.push(result.map_err(|e| describe(&e))?);
                    }
                    let mut users = Vec::new();
                    for connection in &mut connections {
                        let user: String = sqlx::query_scalar(QUERY)
                            .fetch_one(&mut **connection)
                            .await
                            .map_err(|e| describe(&e))?;
                        users.push(user);
                    }
                    Ok(users)
                }
                Self::SeaOrm(db, _refresher) => sea_orm_users(&db, n).await,
                Self::DieselAsync(pool) => {
                    use diesel_async::RunQueryDsl;
                    let gets = (0..n).map(|_| pool.get());
                    let mut connections = Vec::new();
                    for result in futures::future::join_all(gets).await {
                        connections.push(result.map_err(|e| describe(&e))?);
                    }
                    let mut users = Vec::new();
                    for connection in &mut connections {
                        let user: String = diesel::select(current_user())
                            .get_result(&mut **connection)
                            .await
                            .map_err(|e| describe(&e))?;
                        users.push(user);
                    }
                    Ok(users)
                }
                Self::Diesel(pool) => tokio::task::spawn_blocking(move || {
                    use diesel::RunQueryDsl;
                    let mut connections = Vec::new();
                    for _ in 0..n {
                        connections.push(pool.get().map_err(|e| describe(&e))?);
                    }
                    connections
                        .iter_mut()
                        .map(|connection| {
                            diesel::select(current_user())
                                .get_result::<String>(&mut **connection)
                                .map_err(|e| describe(&e))
                        })
                        .collect()
                })
                .await
                .unwrap(),
                Self::Failed(error) => Err(error),
                Self::R2d2(holder) => {
                    tokio::task::spawn_blocking(move || {
                        let pool = holder.0.as_ref().expect("the pool lives until dropped");
                        // Hold them all at once, so the pool must open n connections.
                        let mut clients = Vec::new();
                        for _ in 0..n {
                            clients.push(pool.get().map_err(|e| describe(&e))?);
                        }
                        clients
                            .iter_mut()
                            .map(|client| {
                                let row = client.query_one(QUERY, &[]).map_err(|e| describe(&e))?;
                                Ok(row.get(0))
                            })
                            .collect()
                    })
                    .await
                    .unwrap()
                }
            }
        })
    }
}

/// `n` SeaORM transactions at once (each holds a pool connection, so the pool opens `n`), and
/// each one's role.
async fn sea_orm_users(db: &sea_orm::DatabaseConnection, n: usize) -> Result<Vec<String>, String> {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let begins = (0..n).map(|_| db.begin());
    let mut transactions = Vec::new();
    for result in futures::future::join_all(begins).await {
        transactions.push(result.map_err(|e| describe(&e))?);
    }
    let mut users = Vec::new();
    for transaction in &transactions {
        let statement = sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT current_user::text AS u",
        );
        let row = transaction
            .query_one_raw(statement)
            .await
            .map_err(|e| describe(&e))?
            .ok_or("no row")?;
        users.push(row.try_get::<String>("", "u").map_err(|e| describe(&e))?);
    }
    Ok(users)
}

/// `current_user` as a diesel expression.
fn current_user() -> diesel::expression::SqlLiteral<diesel::sql_types::Text> {
    diesel::dsl::sql::<diesel::sql_types::Text>("current_user::text")
}

/// Each client's role, queried one after the other while all are held.
async fn query_each<'a>(
    clients: impl Iterator<Item = &'a tokio_postgres::Client>,
) -> Result<Vec<String>, String> {
    let mut users = Vec::new();
    for client in clients {
        let row = client
            .query_one(QUERY, &[])
            .await
            .map_err(|e| describe(&e))?;
        users.push(row.get(0));
    }
    Ok(users)
}

async fn futures_join<T: Send + 'static>(
    tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut results = Vec::new();
    for task in tasks.collect::<Vec<_>>() {
        results.push(task.await.unwrap());
    }
    results
}

/// Runs `work` on `n` blocking threads at once.
async fn blocking(
    n: usize,
    work: impl Fn() -> Result<String, String> + Send + Sync + Clone + 'static,
) -> Result<Vec<String>, String> {
    let tasks = (0..n).map(|_| tokio::task::spawn_blocking(work.clone()));
    futures_join(tasks).await.into_iter().collect()
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// The real managed-identity credential over IMDS, redirected to `emulator`, answering as
/// `identity` (by client ID) or as the emulator's default identity.
fn managed_identity(emulator: &Emulator, identity: Option<&Principal>) -> Arc<TestCredential> {
    let mut vars = vec![
        (
            "AZURE_TOKEN_CREDENTIALS".to_owned(),
            "ManagedIdentityCredential".to_owned(),
        ),
        (
            "AZURE_POD_IDENTITY_AUTHORITY_HOST".to_owned(),
            emulator.identity().imds_authority(),
        ),
    ];
    if let Some(identity) = identity {
        vars.push(("AZURE_CLIENT_ID".to_owned(), identity.client_id.clone()));
    }
    TestCredential::counting(Arc::new(CredentialChain::from_vars(vars).unwrap()))
}

/// The real Azure CLI credential, running the emulator's `az`.
fn azure_cli(emulator: &Emulator) -> Arc<TestCredential> {
    TestCredential::counting(Arc::new(testing::azure_cli(emulator.bin_dir())))
}

/// A provider whose credential fails: no `az` on its PATH.
fn without_az() -> EntraAuth {
    EntraAuth::builder()
        .credential_chain(testing::azure_cli(Path::new("/nonexistent")))
        .build()
        .unwrap()
}

fn auth(credential: &Arc<TestCredential>) -> EntraAuth {
    EntraAuth::builder()
        .credential_named("counted", credential.clone())
        .build()
        .unwrap()
}

/// Connection settings for `emulator`'s gateway, verify-full with its CA.
fn conninfo(emulator: &Emulator, user: Option<&str>) -> ConnInfo {
    let mut info = ConnInfo::parse(&format!(
        "host=localhost port={} dbname=postgres sslmode=verify-full sslrootcert={}",
        emulator.gateway().port(),
        emulator.ca_file().display()
    ))
    .unwrap();
    info.user = user.map(str::to_owned);
    info
}

fn connector(emulator: &Emulator, auth: EntraAuth, user: Option<&str>) -> Connectors {
    let info = conninfo(emulator, user);
    Connectors {
        postgres: EntraConnector::new(auth.clone(), &info).unwrap(),
        sqlx: pgentra::sqlx::SqlxConnector::new(auth.clone(), &info).unwrap(),
        diesel: pgentra::diesel::EntraPgConnectionManager::new(auth, info),
    }
}

/// Another emulator on the shared emulator's cluster, with other settings.
fn beside_the_shared(config: EmulatorConfig) -> Emulator {
    Emulator::shared()
        .beside(config)
        .expect("start an emulator beside the shared one")
}

/// An emulator whose tokens live 4 seconds, for refresh scenarios.
fn short_lived() -> &'static Emulator {
    static SHORT: OnceLock<Emulator> = OnceLock::new();
    SHORT.get_or_init(|| {
        beside_the_shared(EmulatorConfig {
            token_lifetime: Duration::from_secs(4),
            ..EmulatorConfig::default()
        })
    })
}

/// An emulator whose tokens carry 150 group claims: 8 KB, as a real user's in many groups.
fn large_tokens() -> &'static Emulator {
    static LARGE: OnceLock<Emulator> = OnceLock::new();
    LARGE.get_or_init(|| {
        beside_the_shared(EmulatorConfig {
            token_groups: 150,
            ..EmulatorConfig::default()
        })
    })
}

/// `pgentra-proxy` in transaction pooling in front of `emulator`'s gateway, with four server
/// connections, logging in with the Azure CLI credential; clients reach it over TLS with the
/// gateway's certificate, so the drivers' settings differ from the gateway's by the port only.
struct TransactionProxy {
    addr: std::net::SocketAddr,
    metrics: Arc<pgentra_proxy::Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// Server connections behind the transaction-pooling proxy.
const PROXY_SERVER_CONNECTIONS: usize = 4;

impl TransactionProxy {
    async fn start(emulator: &Emulator) -> Self {
        let mut config = pgentra_proxy::ProxyConfig::default();
        let mut upstream = conninfo(emulator, None);
        upstream.dbname = None;
        config.instances.push(pgentra_proxy::Instance::new(
            upstream,
            "127.0.0.1:0".parse().unwrap(),
        ));
        config.client_tls = Some(emulator.server_tls());
        config.pool.mode = pgentra_proxy::PoolMode::Transaction;
        config.pool.size = PROXY_SERVER_CONNECTIONS;
        // Pools that linger after a scenario are closed soon after it.
        config.drain_timeout = Duration::from_secs(1);
        let proxy = pgentra_proxy::Proxy::bind(config, auth(&azure_cli(emulator)))
            .await
            .unwrap();
        let addr = proxy.local_addrs()[0];
        let metrics = proxy.metrics();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(proxy.run(async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            metrics,
            stop: Some(stop),
            task,
        }
    }

    /// The connectors of `auth`, for the proxy.
    fn connectors(&self, emulator: &Emulator, auth: EntraAuth) -> Connectors {
        let mut info = conninfo(emulator, None);
        info.port = Some(self.addr.port());
        Connectors {
            postgres: EntraConnector::new(auth.clone(), &info).unwrap(),
            sqlx: pgentra::sqlx::SqlxConnector::new(auth.clone(), &info).unwrap(),
            diesel: pgentra::diesel::EntraPgConnectionManager::new(auth, info),
        }
    }

    async fn stop(mut self) {
        drop(self.stop.take());
        tokio::time::timeout(Duration::from_secs(40), &mut self.task)
            .await
            .expect("the proxy stopping")
            .unwrap();
    }
}

/// Storms open hundreds of connections: one at a time, within the backend's limit.
static STORMS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

async fn connects_as_the_derived_role(kind: Kind) {
    let emulator = Emulator::shared();
    // A user principal, through the real Azure CLI credential.
    let user = driver(kind, connector(emulator, auth(&azure_cli(emulator)), None)).await;
    assert_eq!(user.users(3).await.unwrap(), [USER; 3]);
    // A user-assigned managed identity, through the real managed-identity credential.
    let identity = Principal::user_assigned_identity(MANAGED_IDENTITY);
    let credential = managed_identity(emulator, Some(&identity));
    let mi = driver(kind, connector(emulator, auth(&credential), None)).await;
    assert_eq!(mi.users(3).await.unwrap(), [MANAGED_IDENTITY; 3]);
}

async fn logs_in_with_an_8_kb_token(kind: Kind) {
    let emulator = large_tokens();
    let auth = auth(&azure_cli(emulator));
    let token = auth.credentials().await.unwrap();
    assert!(
        token.password().expose_secret().len() >= 8_000,
        "a {}-byte token",
        token.password().expose_secret().len()
    );
    let driver = driver(kind, connector(emulator, auth, None)).await;
    assert_eq!(driver.users(3).await.unwrap(), [USER; 3]);
}

async fn refreshes_under_a_pool(kind: Kind) {
    let emulator = short_lived();
    let credential = managed_identity(emulator, None);
    let auth = auth(&credential);
    let pool = driver(kind, connector(emulator, auth.clone(), None)).await;
    let started = std::time::Instant::now();
    let mut opened = 0;
    for round in 1..=3 {
        // Hold more connections each round, so the pool must open new ones.
        let n = 4 * round;
        let users = pool
            .users(n)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(users, vec![MANAGED_IDENTITY; n]);
        opened += n;
        // Let the token in use expire: the next round's new connections need a newer one.
        let expires = auth.stats().expires_at.unwrap();
        let wait = expires
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(wait + Duration::from_millis(200)).await;
    }
    let calls = credential.calls();
    let lifetimes = started.elapsed().as_secs_f64() / 4.0;
    // Short tokens are refreshed at their midpoint: about two calls per lifetime, however many
    // connections the pool opens.
    assert!(
        calls >= 3 && calls as f64 <= 2.0 * lifetimes + 2.0 && calls < opened / 2,
        "{calls} credential calls for {opened} connections over {lifetimes:.1} token lifetimes"
    );
    assert_eq!(auth.stats().fetch_failures, 0);
}

async fn a_storm_on_a_cold_provider_makes_one_credential_call(kind: Kind) {
    let _one_storm_at_a_time = STORMS.lock().await;
    let emulator = Emulator::shared();
    let credential = managed_identity(emulator, None);
    let pool = driver(kind, connector(emulator, auth(&credential), None)).await;
    let users = pool.users(200).await.unwrap();
    assert_eq!(users.len(), 200);
    assert!(users.iter().all(|u| u == MANAGED_IDENTITY));
    assert_eq!(credential.calls(), 1);
}

async fn an_explicit_user_wins(kind: Kind) {
    let emulator = Emulator::shared();
    // alice logs in as the group role she belongs to.
    let pool = driver(
        kind,
        connector(emulator, auth(&azure_cli(emulator)), Some("readers")),
    )
    .await;
    assert_eq!(pool.users(2).await.unwrap(), ["readers"; 2]);
}

async fn failures_surface_with_their_causes(kind: Kind) {
    let emulator = Emulator::shared();
    // The credential fails (no `az` on its PATH): the error names it, not just a timeout.
    let failing = without_az();
    let err = driver(kind, connector(emulator, failing, None))
        .await
        .users(1)
        .await
        .unwrap_err();
    assert!(
        err.contains("AzureCliCredential") && err.contains("az not found"),
        "{kind:?}: {err}"
    );

    // The gateway refuses the token (a managed identity's token for alice's role, a user's): the
    // driver's error carries the server's message, and never the token.
    let identity = Principal::user_assigned_identity(MANAGED_IDENTITY);
    let credential = managed_identity(emulator, Some(&identity));
    let auth = auth(&credential);
    let token = auth
        .credentials()
        .await
        .unwrap()
        .password()
        .expose_secret()
        .to_owned();
    let err = driver(kind, connector(emulator, auth, Some(USER)))
        .await
        .users(1)
        .await
        .unwrap_err();
    assert!(
        err.contains(&format!(
            "Service Principals cannot generate AAD_AUTH_TOKENTYPE_APP_USER tokens for role[{USER}]"
        )),
        "{kind:?}: {err}"
    );
    assert!(
        !err.contains(&token),
        "{kind:?}: the token leaked into the error"
    );
    let (_, signature) = token.rsplit_once('.').unwrap();
    assert!(
        !err.contains(signature),
        "{kind:?}: the token leaked into the error"
    );
}

/// One test per driver per scenario: the driver list is written once, here.
macro_rules! scenarios {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                use super::*;
                scenarios!(@drivers $scenario:
                    tokio_postgres => TokioPostgres,
                    postgres => Postgres,
                    deadpool => Deadpool,
                    bb8 => Bb8,
                    r2d2 => R2d2,
                    sqlx => Sqlx,
                    sea_orm => SeaOrm,
                    diesel_async => DieselAsync,
                    diesel => Diesel,
                );
            }
        )*
    };
    (@drivers $scenario:ident: $($test:ident => $kind:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $test() {
                super::$scenario(Kind::$kind).await
            }
        )*
    };
}

/// Forty client connections of the driver's pool through the proxy, on four server
/// connections, three rounds: each driver prepares its statements under names, which must work
/// on whichever server connection each statement lands.
async fn forty_connections_share_four_through_a_transaction_pooling_proxy(kind: Kind) {
    let emulator = Emulator::shared();
    let proxy = TransactionProxy::start(emulator).await;
    let driver = driver(kind, proxy.connectors(emulator, auth(&azure_cli(emulator)))).await;
    for round in 1..=3 {
        // SeaORM's `users` holds forty transactions open at once, which needs forty server
        // connections in any transaction pooler: its statements run outside transactions here.
        let users = match &driver {
            Driver::SeaOrm(db, _) => sea_orm_statements(db, 40).await,
            _ => driver.users(40).await,
        };
        let users = users.unwrap_or_else(|e| panic!("{kind:?}, round {round}: {e}"));
        assert_eq!(users, vec![USER; 40], "{kind:?}, round {round}");
    }
    drop(driver);
    let logins = proxy.metrics.logins();
    assert!(
        (1..=PROXY_SERVER_CONNECTIONS as u64).contains(&logins),
        "{kind:?}: {logins} upstream logins for four server connections"
    );
    assert_eq!(proxy.metrics.connections_refused(), 0, "{kind:?}");
    if !matches!(kind, Kind::SeaOrm) {
        let clients = proxy.metrics.connections_total();
        assert!(clients >= 40, "{kind:?}: {clients} client connections");
    }
    proxy.stop().await;
}

scenarios!(
    connects_as_the_derived_role,
    forty_connections_share_four_through_a_transaction_pooling_proxy,
    logs_in_with_an_8_kb_token,
    refreshes_under_a_pool,
    a_storm_on_a_cold_provider_makes_one_credential_call,
    an_explicit_user_wins,
    failures_surface_with_their_causes,
);

#[tokio::test]
async fn the_deadpool_error_leads_to_pgentras_cause() {
    let emulator = Emulator::shared();
    let auth = without_az();
    let pool = pgentra::deadpool::pool(connector(emulator, auth, None).postgres, 2).unwrap();
    let err = pool.get().await.unwrap_err();
    let cause = pgentra::deadpool::cause(&err).expect("pgentra's error in the chain");
    assert!(matches!(cause, Error::NoCredential { .. }), "{cause:?}");
}

#[tokio::test]
async fn a_deadpool_pool_from_its_own_config() {
    let emulator = Emulator::shared();
    let mut config = deadpool_postgres::Config::new();
    config.host = Some("localhost".into());
    config.port = Some(emulator.gateway().port());
    config.dbname = Some("postgres".into());
    config.pool = Some(deadpool_postgres::PoolConfig::new(4));
    let tls = pgentra::tls::TlsOptions::verify_full().with_root_cert(emulator.ca_file());
    let pool =
        pgentra::deadpool::pool_from_config(auth(&azure_cli(emulator)), &config, &tls).unwrap();
    assert_eq!(pool.status().max_size, 4);
    let row = pool
        .get()
        .await
        .unwrap()
        .query_one(QUERY, &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), USER);
}

/// sqlx: a pool left idle past two token lifetimes still opens 20 new connections, because the
/// refresher kept its options fresh; without the refresher the same pool cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlx_pool_idle_past_two_lifetimes_opens_new_connections() {
    let emulator = short_lived();
    let connectors = connector(emulator, auth(&managed_identity(emulator, None)), None);
    let options = || {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(30)
            .min_connections(0)
            // Idle connections close quickly, so later acquires must open new ones.
            .idle_timeout(Duration::from_secs(1))
            .acquire_timeout(Duration::from_secs(10))
    };
    let (fresh, _refresher) = connectors.sqlx.pool(options()).await.unwrap();
    let (stale, refresher) = connectors.sqlx.pool(options()).await.unwrap();
    drop(refresher); // the control: nobody updates this pool's options
    let first = connectors.sqlx.auth().stats().expires_at.unwrap();
    // Past two token lifetimes (4 s each), and past the first token's expiry plus the
    // gateway's 5 s clock skew allowance.
    let idle_until = first + Duration::from_secs(6);
    tokio::time::sleep(
        idle_until
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    )
    .await;

    let acquires = (0..20).map(|_| fresh.acquire());
    let mut held = Vec::new();
    for result in futures::future::join_all(acquires).await {
        held.push(result.expect("a new connection with the refreshed token"));
    }
    assert_eq!(held.len(), 20);
    // The control: asked for 20, it must open new connections with its expired token.
    let acquires = (0..20).map(|_| stale.acquire());
    let errors: Vec<String> = futures::future::join_all(acquires)
        .await
        .into_iter()
        .filter_map(|r| r.err().map(|e| describe(&e)))
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("The access token has expired")),
        "{errors:?}"
    );
}

/// sqlx: closing the pool ends its refresher task.
#[tokio::test]
async fn closing_a_sqlx_pool_stops_its_refresher() {
    let emulator = Emulator::shared();
    let connectors = connector(emulator, auth(&azure_cli(emulator)), None);
    let (pool, refresher) = connectors
        .sqlx
        .pool(sqlx::postgres::PgPoolOptions::new().max_connections(2))
        .await
        .unwrap();
    assert!(!refresher.is_finished());
    pool.close().await;
    tokio::time::timeout(Duration::from_secs(10), refresher.finished())
        .await
        .expect("the refresher ends when its pool is closed");
}

/// SeaORM: a connection left idle past two token lifetimes opens 20 new connections (through
/// its sqlx pool, kept fresh), and closing it ends the refresher.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sea_orm_idle_past_two_lifetimes_then_closed() {
    let emulator = short_lived();
    let connectors = connector(emulator, auth(&managed_identity(emulator, None)), None);
    let options = sqlx::postgres::PgPoolOptions::new()
        .max_connections(30)
        .idle_timeout(Duration::from_secs(1))
        .acquire_timeout(Duration::from_secs(10));
    let (db, refresher) = pgentra::sea_orm::connect(&connectors.sqlx, options)
        .await
        .unwrap();
    let first = connectors.sqlx.auth().stats().expires_at.unwrap();
    let idle_until = first + Duration::from_secs(6);
    tokio::time::sleep(
        idle_until
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    )
    .await;
    let users = sea_orm_users(&db, 20).await.unwrap();
    assert_eq!(users, vec![MANAGED_IDENTITY; 20]);
    db.close().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), refresher.finished())
        .await
        .expect("the refresher ends when the connection is closed");
}

/// diesel-async's bb8 pool works too, and both diesel integrations keep pgentra's error as a
/// typed cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diesel_async_bb8_pool_and_typed_causes() {
    use diesel_async::RunQueryDsl;
    let emulator = Emulator::shared();
    let connectors = connector(emulator, auth(&azure_cli(emulator)), None);
    let pool = pgentra::diesel_async::bb8(connectors.postgres, 4)
        .await
        .unwrap();
    let mut connection = pool.get().await.unwrap();
    let user: String = diesel::select(current_user())
        .get_result(&mut *connection)
        .await
        .unwrap();
    assert_eq!(user, USER);

    let failing = without_az();
    let connectors = connector(emulator, failing, None);
    let setup = pgentra::diesel_async::setup(connectors.postgres);
    let err = setup("ignored").await.err().expect("no credentials");
    assert!(
        matches!(
            pgentra::diesel_async::cause(&err),
            Some(Error::NoCredential { .. })
        ),
        "{err}"
    );
    let err = tokio::task::spawn_blocking(move || connectors.diesel.establish().err())
        .await
        .unwrap()
        .expect("no credentials");
    assert!(
        matches!(
            pgentra::diesel::cause(&err),
            Some(Error::NoCredential { .. })
        ),
        "{err}"
    );
}
