//! The clients applications use, with their default settings, through transaction pooling:
//! pgjdbc (plain and under HikariCP), node-postgres (a client each, and its pool), Sequelize,
//! psycopg2 and SQLAlchemy (on psycopg2 and psycopg 3). Their connection setup (`SET
//! extra_float_digits`, `SET client_min_messages`, …) used to pin every session; each must
//! now run with no session pinned, on no more server connections than the pool has, with
//! correct results. The programs are in `clients/`; `.ci/run` installs what they need.

use super::support::*;

const CLIENTS: &str = "12";
const ROUNDS: &str = "5";
/// Server connections per pool.
const POOL: usize = 3;

/// The directory of the client programs.
fn programs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/clients")
}

/// Runs `program` with `args` then the proxy's port, the user, the clients, the rounds and
/// `mode`, through a proxy in transaction pooling; asserts it succeeded on at most [`POOL`]
/// server connections, with no session pinned.
async fn pools_without_pins(program: &str, args: &[&str], mode: &str, missing: &str) {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, POOL).await;
    let run = tokio::process::Command::new(program)
        .args(args)
        .args([&proxy.port(), USER, CLIENTS, ROUNDS, mode])
        .current_dir(programs())
        .env("PGSSLMODE", "disable")
        .kill_on_drop(true)
        .output();
    let output = within(Duration::from_secs(180), "the clients", run)
        .await
        .unwrap_or_else(|error| panic!("{program}: {error} ({missing})"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        output.status.success(),
        "{mode}: {stdout}{stderr}\n({missing})"
    );
    let rows: usize = CLIENTS.parse::<usize>().unwrap() * ROUNDS.parse::<usize>().unwrap();
    assert!(
        stdout.contains(&format!("rows {rows}\n")),
        "{mode}: {stdout}"
    );
    let backends: usize = (stdout.lines())
        .find_map(|line| line.strip_prefix("backends "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{mode}: {stdout}"));
    assert!((1..=POOL).contains(&backends), "{mode}: {stdout}");
    let pool = pool_until(&proxy, "the counts", |_| true).await;
    assert_eq!(pins_total(&pool), 0, "{mode} pinned sessions: {pool}");
    assert!(
        pool["server_logins"].as_u64() <= Some(POOL as u64),
        "{pool}"
    );
    proxy.stop().await;
}

/// The Java classes, compiled once into a directory of their own.
async fn java_classes() -> &'static (PathBuf, String) {
    static CLASSES: tokio::sync::OnceCell<(PathBuf, String)> = tokio::sync::OnceCell::const_new();
    CLASSES
        .get_or_init(|| async {
            let jars = ["postgresql", "HikariCP", "slf4j-api", "slf4j-nop"]
                .map(|jar| format!("/usr/share/java/{jar}.jar"));
            let dir = temp_dir("pgentra-jdbc-clients");
            let classpath = format!("{}:{}", dir.display(), jars.join(":"));
            let output = tokio::process::Command::new("javac")
                .args(["-cp", &classpath, "-d"])
                .arg(&dir)
                .arg(programs().join("Clients.java"))
                .output()
                .await
                .expect("javac (apt-get install default-jdk-headless)");
            assert!(
                output.status.success(),
                "javac: {} (apt-get install libpostgresql-jdbc-java libhikaricp-java libslf4j-java)",
                String::from_utf8_lossy(&output.stderr)
            );
            (dir, classpath)
        })
        .await
}

async fn java(mode: &str) {
    let (_, classpath) = java_classes().await;
    let missing = "apt-get install default-jdk-headless libpostgresql-jdbc-java libhikaricp-java";
    pools_without_pins("java", &["-cp", classpath, "Clients"], mode, missing).await;
}

const NODE: &str = "npm ci --prefix crates/pgentra-proxy/tests/it/clients";
const PYTHON: &str = "pip install psycopg2-binary 'psycopg[binary]' sqlalchemy";

/// pgjdbc sends `SET extra_float_digits = 3` (and its application name) on every connection.
#[tokio::test(flavor = "multi_thread")]
async fn pgjdbc_pools_without_pins() {
    java("plain").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pgjdbc_under_hikaricp_pools_without_pins() {
    java("hikari").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn node_postgres_clients_pool_without_pins() {
    pools_without_pins("node", &["clients.js"], "pg-client", NODE).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn node_postgres_pool_pools_without_pins() {
    pools_without_pins("node", &["clients.js"], "pg-pool", NODE).await;
}

/// Sequelize sends `SET client_min_messages TO warning; SET TIME ZONE INTERVAL '+00:00' HOUR
/// TO MINUTE` on every connection.
#[tokio::test(flavor = "multi_thread")]
async fn sequelize_pools_without_pins() {
    pools_without_pins("node", &["clients.js"], "sequelize", NODE).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn psycopg2_pools_without_pins() {
    pools_without_pins("python3", &["clients.py"], "psycopg2", PYTHON).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlalchemy_on_psycopg2_pools_without_pins() {
    pools_without_pins("python3", &["clients.py"], "sqlalchemy-psycopg2", PYTHON).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlalchemy_on_psycopg_3_pools_without_pins() {
    pools_without_pins("python3", &["clients.py"], "sqlalchemy-psycopg", PYTHON).await;
}
