//! `proxy_vs_pgbouncer`: `pgbench` select-only (`-S`) and TPC-B-like with 1, 8 and 32 clients
//! against a throwaway PostgreSQL directly, through the pgentra proxy and through PgBouncer in
//! session mode, all measured in the same run, and the memory each holds per idle session; then
//! connection churn (`pgbench -C -S`, a new connection per transaction, 1, 4 and 16 clients)
//! against the emulator's gateway (the Azure-like login path: TLS, a token checked, a new
//! backend) directly, through `pgentra proxy` pooled and in its relay mode (`--pool-mode none`),
//! and through PgBouncer in session mode, with the server connections each opened and the
//! tokens each fetched; then transaction pooling: many clients (100) on few server connections
//! (10), `pgbench -S` through the proxy and through PgBouncer, both in transaction mode, with
//! `-M simple` (TPS, latency and CPU per transaction of each), and through the proxy with `-M
//! prepared`, which Debian's PgBouncer (1.18) cannot run in transaction mode: the bench runs it
//! once and prints PgBouncer's error.
//!
//! Every path uses TLS to PostgreSQL, as an application does with Azure:
//!
//! - direct: pgbench → PostgreSQL, `sslmode=verify-full` against the test CA;
//! - proxy: pgbench → (plain, loopback) → pgentra proxy → PostgreSQL over verified TLS, the
//!   login done with an Entra-shaped token (PostgreSQL trusts loopback, so it asks for none);
//! - PgBouncer: pgbench → (plain, loopback) → PgBouncer, `pool_mode = session` →
//!   PostgreSQL with `server_tls_sslmode = verify-full`.
//!
//! The proxy runs in a process of its own (this binary with `--serve-proxy`), on a tokio
//! runtime with 2 worker threads like `pgentra proxy`, so that its resident memory is the
//! proxy's alone. For each workload and client count, every round runs the three targets
//! (four against a previous build, below) back to back, in an order that rotates between
//! rounds, so that drift on this noisy machine affects them alike. The table shows medians
//! over the rounds; a ratio is the median of each round's target/direct. It also shows the CPU
//! time the proxy and PgBouncer spend per transaction (from the scheduler's counts, all
//! threads), which depends much less on what else runs on the machine than throughput does.
//! Nothing is asserted: the verdict lines compare with the targets (select-only, 8 clients:
//! ≥ 90 % of direct and ahead of PgBouncer; < 64 KiB per idle proxied session, from the
//! proxy's VmRSS with that many sessions open).
//!
//! Needs the PostgreSQL server binaries with `pgbench` and PgBouncer:
//! `apt-get install postgresql pgbouncer`. When run as root, PostgreSQL and PgBouncer run as
//! the `postgres` user. Everything it starts stops when it ends, also when it is killed, and
//! every step is bounded in time.
//!
//! ```sh
//! cargo bench -p pgentra-proxy --bench proxy_vs_pgbouncer            # about 10 minutes
//! PGENTRA_BENCH_SECONDS=3 PGENTRA_BENCH_ROUNDS=1 \
//!   cargo bench -p pgentra-proxy --bench proxy_vs_pgbouncer          # CI: about 2 minutes
//! ```
//!
//! Settings (environment): `PGENTRA_BENCH_SECONDS` per pgbench run (default 5),
//! `PGENTRA_BENCH_ROUNDS` (5), `PGENTRA_BENCH_CLIENTS` (`1,8,32`),
//! `PGENTRA_BENCH_CHURN_CLIENTS` (`1,4,16`; empty skips the churn rows),
//! `PGENTRA_BENCH_TXN_CLIENTS` and `PGENTRA_BENCH_TXN_POOL` (100 clients on 10 server
//! connections; 0 clients skips the transaction-pooling rows), `PGENTRA_BENCH_WORKLOADS`
//! (`select-only,tpc-b`), `PGENTRA_BENCH_SCALE` (pgbench scale, 10), `PGENTRA_BENCH_IDLE` idle
//! sessions for the memory test (1000; 0 skips it), `PGENTRA_BENCH_PROXY_WORKERS` (the proxy's
//! worker threads; by default what `pgentra proxy` uses, 1 on this 2-core machine), `PGENTRA_BENCH_CLIENT_SOCKET` (`tcp`,
//! or `unix`: pgbench reaches the proxy and PgBouncer over their Unix sockets),
//! `PGENTRA_BENCH_BASELINE` (a git revision to compare this build with; unset: none).
//!
//! Against a previous build: with `PGENTRA_BENCH_BASELINE=<git rev>` (`HEAD~1`, a commit), the
//! bench first checks that revision out in a temporary git worktree (removed again, also on
//! error), builds its copy of this bench there (`cargo bench --no-run`, pgentra selected too
//! with all features, as CI builds it; at most 30 minutes, with progress lines) into
//! `<target dir>/baseline-build`, which later runs reuse, and runs it as one more target,
//! "previous": a proxy with the same `--serve-proxy` arguments as this build's, in the same
//! rotating rounds of the session-pooling and the transaction-pooling rows (`-M simple` and
//! `-M prepared`). After each of those tables, one of this build against the previous: each
//! build's TPS and CPU µs per transaction (medians), the median of each round's this/previous
//! ratio of both, and every round's ratios; at the end a verdict: TPS ratio ≥ 0.97 and CPU
//! ratio ≤ 1.03 in every row. Run this build the same way (`-p pgentra -p pgentra-proxy
//! --all-features`), so that both have the same features:
//!
//! ```sh
//! PGENTRA_BENCH_BASELINE=HEAD~1 \
//!   cargo bench -p pgentra -p pgentra-proxy --all-features --bench proxy_vs_pgbouncer
//! ```

mod baseline;
mod settings;

use azure_core::credentials::AccessToken;
use azure_core::time::OffsetDateTime;
use baseline::{Baseline, Paired, Versus};
use pgentra::EntraAuth;
use pgentra::conninfo::ConnInfo;
use pgentra_emulator::backend::Cluster;
use pgentra_emulator::ca::Ca;
use pgentra_emulator::identity::Endpoint;
use pgentra_emulator::issuer::{Issuer, Principal};
use pgentra_emulator::testing::TestCredential;
use pgentra_emulator::{Emulator, EmulatorConfig, USER};
use pgentra_proxy::{Instance, Proxy, ProxyConfig};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

type Result<T, E = Box<dyn std::error::Error>> = std::result::Result<T, E>;

/// The role every path logs in as (the cluster's superuser, trusted on loopback).
const ROLE: &str = "postgres";
const DATABASE: &str = "postgres";
/// How long a helper process (proxy, PgBouncer) may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Targets of the issue.
const TPS_TARGET: f64 = 0.90;
const IDLE_TARGET_KIB: f64 = 64.0;
/// pgentra's CPU per transaction in transaction pooling, `-M simple`, at most this share of
/// PgBouncer's.
const TXN_CPU_TARGET: f64 = 0.85;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; the proxy helper gets `--serve-proxy CONNINFO MAX DIR`.
    let result = match args.iter().position(|a| a == "--serve-proxy") {
        Some(at) => serve_proxy(&args[at + 1..]),
        None => run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("proxy_vs_pgbouncer: {}", pgentra::ErrorChain(&*error));
            ExitCode::FAILURE
        }
    }
}

/// Settings from the environment.
struct Knobs {
    seconds: u64,
    rounds: usize,
    clients: Vec<u32>,
    /// Client counts of the connection-churn rows.
    churn_clients: Vec<u32>,
    /// Clients and server connections of the transaction-pooling rows.
    txn_clients: u32,
    txn_pool: usize,
    scale: u32,
    idle: usize,
    workloads: Vec<Workload>,
    /// pgbench reaches the proxy and PgBouncer over their Unix sockets instead of TCP.
    unix: bool,
    /// A git revision whose build of this bench runs as a second proxy, against this one.
    baseline: Option<String>,
}

impl Knobs {
    fn from_env() -> Result<Self> {
        fn var<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
            match std::env::var(name) {
                Ok(value) => value
                    .trim()
                    .parse()
                    .map_err(|_| format!("{name}={value:?} is not a valid number").into()),
                Err(_) => Ok(default),
            }
        }
        let list = |name: &str, default: &[u32]| -> Result<Vec<u32>> {
            match std::env::var(name) {
                Ok(list) => list
                    .split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(str::parse)
                    .collect::<Result<Vec<u32>, _>>()
                    .map_err(|_| format!("{name}={list:?}: expected like 1,8,32").into()),
                Err(_) => Ok(default.to_vec()),
            }
        };
        let clients = list("PGENTRA_BENCH_CLIENTS", &[1, 8, 32])?;
        let churn_clients = list("PGENTRA_BENCH_CHURN_CLIENTS", &[1, 4, 16])?;
        let workloads = match std::env::var("PGENTRA_BENCH_WORKLOADS") {
            Ok(list) => list
                .split(',')
                .map(|w| match w.trim() {
                    "select-only" => Ok(Workload::SelectOnly),
                    "tpc-b" => Ok(Workload::TpcB),
                    other => Err(format!(
                        "PGENTRA_BENCH_WORKLOADS: {other:?} is neither select-only nor tpc-b"
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Err(_) => vec![Workload::SelectOnly, Workload::TpcB],
        };
        let knobs = Self {
            seconds: var("PGENTRA_BENCH_SECONDS", 5)?,
            rounds: var("PGENTRA_BENCH_ROUNDS", 5)?,
            clients,
            churn_clients,
            txn_clients: var("PGENTRA_BENCH_TXN_CLIENTS", 100)?,
            txn_pool: var("PGENTRA_BENCH_TXN_POOL", 10)?,
            scale: var("PGENTRA_BENCH_SCALE", 10)?,
            idle: var("PGENTRA_BENCH_IDLE", 1000)?,
            workloads,
            baseline: std::env::var("PGENTRA_BENCH_BASELINE")
                .ok()
                .map(|rev| rev.trim().to_owned())
                .filter(|rev| !rev.is_empty()),
            unix: match std::env::var("PGENTRA_BENCH_CLIENT_SOCKET").as_deref() {
                Ok("unix") => true,
                Ok("tcp") | Err(_) => false,
                Ok(other) => {
                    return Err(format!(
                        "PGENTRA_BENCH_CLIENT_SOCKET={other:?}: expected tcp or unix"
                    )
                    .into());
                }
            },
        };
        if knobs.seconds == 0
            || knobs.rounds == 0
            || knobs.clients.contains(&0)
            || knobs.churn_clients.contains(&0)
            || knobs.txn_pool == 0
        {
            return Err("seconds, rounds and client counts must be at least 1".into());
        }
        Ok(knobs)
    }
}

fn run() -> Result<()> {
    let knobs = Knobs::from_env()?;
    let started = Instant::now();
    // First, so that a build that fails costs no cluster.
    let previous = knobs.baseline.as_deref().map(Baseline::build).transpose()?;
    let mut versus = previous.as_ref().map(Versus::new);
    let setup = Setup::start(&knobs)?;
    let biggest = knobs.clients.iter().copied().max().unwrap_or(1) as usize;
    let sessions = knobs.idle + biggest + 100;
    // Both listen on loopback TCP and on a Unix socket here.
    let proxy = Helper::proxy(
        &setup.upstream,
        sessions,
        &setup.sockets,
        Pooling::session(sessions),
        &[],
    )?;
    let bouncer = Helper::pgbouncer(
        &setup.cluster,
        &setup.files,
        &setup.server_side(),
        sessions,
        &setup.sockets,
        Pooling::session(sessions),
    )?;
    let against = previous.as_ref().zip(versus.as_mut());
    session_pooling(&knobs, &setup, &proxy, &bouncer, against)?;

    if !knobs.churn_clients.is_empty() {
        churn(&knobs, &setup.cluster, &setup.files, &setup.pgbench)?;
    }
    if knobs.txn_clients > 0 {
        let against = previous.as_ref().zip(versus.as_mut());
        transaction_pooling(&knobs, &setup, against)?;
    }
    if let Some(versus) = &versus {
        println!();
        versus.verdict();
    }
    idle_sessions(&knobs, &setup.cluster, proxy, &bouncer)?;
    drop(bouncer);
    drop(setup);
    println!(
        "proxy_vs_pgbouncer: done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The throwaway cluster with pgbench's tables, and what every section reaches it with.
struct Setup {
    cluster: Cluster,
    /// Scratch files: the CA's certificate, PgBouncer's configurations.
    files: PathBuf,
    ca_file: PathBuf,
    pgbench: PathBuf,
    /// The cluster over verified TLS, as the proxies reach it.
    upstream: String,
    /// The directory of the proxies' and PgBouncer's Unix sockets.
    sockets: PathBuf,
}

impl Setup {
    fn start(knobs: &Knobs) -> Result<Self> {
        let biggest = knobs.clients.iter().copied().max().unwrap_or(1) as usize;
        // Room for the idle sessions of one target at a time, pgbench's and PgBouncer's spares,
        // and a server connection for each transaction-pooling client (the previous build pins
        // each client of the settings workload to one).
        let max_connections =
            (knobs.idle.max(biggest) + biggest + 100 + knobs.txn_clients as usize).to_string();
        let cluster = Cluster::start_with(&[
            ("max_connections", &max_connections),
            // The pgbench tables (about 16 MB per scale unit) stay in memory.
            ("shared_buffers", "256MB"),
        ])
        .map_err(|e| {
            format!("{e} (needs the PostgreSQL server binaries: apt-get install postgresql)")
        })?;
        let ca = Ca::new()?;
        cluster.enable_tls(ca.server_cert_pem(), ca.server_key_pem())?;
        let files = cluster.scratch_dir("bench")?;
        let ca_file = files.join("ca.pem");
        std::fs::write(&ca_file, ca.pem())?;
        let pgbench = cluster.bin_dir().join("pgbench");
        if !pgbench.is_file() {
            return Err(format!(
                "{} not found (apt-get install postgresql)",
                pgbench.display()
            )
            .into());
        }
        pgbench_init(&cluster, &pgbench, knobs.scale)?;
        let upstream = format!(
            "host=localhost hostaddr=127.0.0.1 port={} sslmode=verify-full sslrootcert={}",
            cluster.port(),
            ca_file.display()
        );
        let sockets = cluster.scratch_dir("sockets")?;
        Ok(Self {
            cluster,
            files,
            ca_file,
            pgbench,
            upstream,
            sockets,
        })
    }

    /// The proxy and PgBouncer in transaction pooling, `knobs.txn_pool` server connections per
    /// pool, with room for `knobs.txn_clients` clients.
    fn transaction_helpers(&self, knobs: &Knobs) -> Result<(Helper, Helper)> {
        let pooling = Pooling {
            mode: "transaction",
            size: knobs.txn_pool,
        };
        let sessions = knobs.txn_clients as usize + 10;
        let proxy = Helper::proxy(&self.upstream, sessions, &self.sockets, pooling, &[])?;
        let bouncer = Helper::pgbouncer(
            &self.cluster,
            &self.files,
            &self.server_side(),
            sessions,
            &self.sockets,
            pooling,
        )?;
        Ok((proxy, bouncer))
    }

    /// The cluster as PgBouncer logs in to it: its superuser, trusted.
    fn server_side(&self) -> ServerSide {
        ServerSide {
            port: self.cluster.port(),
            user: ROLE.to_owned(),
            password: None,
            ca: self.ca_file.clone(),
        }
    }
}

/// pgbench's tables, over the Unix socket.
fn pgbench_init(cluster: &Cluster, pgbench: &Path, scale: u32) -> Result<()> {
    let init = Command::new("timeout")
        .args(["-k", "5", "600"])
        .arg(pgbench)
        .args(["-i", "-q", "-s", &scale.to_string()])
        .args(["-h"])
        .arg(cluster.socket_dir())
        .args(["-p", &cluster.port().to_string(), "-U", ROLE, DATABASE])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()?;
    if !init.status.success() {
        return Err(format!("pgbench -i: {}", String::from_utf8_lossy(&init.stderr)).into());
    }
    Ok(())
}

/// The session-pooling rows: each workload and client count directly, through the proxy and
/// through PgBouncer (and through the previous build's proxy, against this one's), in rounds.
fn session_pooling(
    knobs: &Knobs,
    setup: &Setup,
    proxy: &Helper,
    bouncer: &Helper,
    against: Option<(&Baseline, &mut Versus)>,
) -> Result<()> {
    let client_socket = knobs.unix.then(|| setup.sockets.clone());
    let previous = against
        .as_ref()
        .map(|(b, _)| proxy.twin(&b.exe))
        .transpose()?;
    let mut targets = vec![
        Target {
            name: "direct",
            port: setup.cluster.port(),
            tls: Some(setup.ca_file.clone()),
            socket_dir: None,
            pid: None,
            login: None,
            churn: false,
            query_mode: "simple",
        },
        Target::through("proxy", proxy, client_socket.clone(), "simple"),
        Target::through("pgbouncer", bouncer, client_socket.clone(), "simple"),
    ];
    if let Some(previous) = &previous {
        targets.push(Target::through(
            "previous",
            previous,
            client_socket,
            "simple",
        ));
    }
    print_session_header(knobs, targets.len());
    // Warm the tables, the connection paths and the token.
    for target in &targets {
        let seconds = knobs.seconds.min(2);
        pgbench_run(&setup.pgbench, target, Workload::SelectOnly, 8, seconds)?;
    }
    let (mut verdict, mut paired) = (None, Vec::new());
    for &workload in &knobs.workloads {
        for &clients in &knobs.clients {
            let rounds = rotating_rounds(&setup.pgbench, &targets, workload, clients, knobs)?;
            let row = session_row(workload, clients, &rounds);
            if workload == Workload::SelectOnly && clients == 8 {
                verdict = Some(row);
            }
            if previous.is_some() {
                let label = format!("{} {clients} clients", workload.name());
                paired.push(Paired::new(label, &rounds, 1, 3));
            }
        }
    }
    if let Some(verdict) = verdict {
        verdict.print();
    }
    if let Some((_, versus)) = against {
        versus.section("session pooling", &paired);
    }
    Ok(())
}

fn print_session_header(knobs: &Knobs, targets: usize) {
    println!(
        "proxy_vs_pgbouncer: pgbench -n -T {} -j min(clients,2), scale {}, {} round(s); {} cores",
        knobs.seconds,
        knobs.scale,
        knobs.rounds,
        std::thread::available_parallelism().map_or(0, usize::from),
    );
    println!(
        "each round runs the {targets} targets back to back, the order rotating; values are medians over the rounds, ratios the median of each round's target/direct"
    );
    println!(
        "cpu: CPU time of the proxy / PgBouncer process per transaction (all threads, user + system)"
    );
    println!(
        "{:<11} {:>7} {:>8} {:>16} {:>16} {:>9} {:>15} {:>15} {:>9} {:>9}",
        "workload",
        "clients",
        "direct",
        "proxy",
        "pgbouncer",
        "direct",
        "proxy",
        "pgbouncer",
        "proxy",
        "pgbouncer",
    );
    println!(
        "{:<11} {:>7} {:>8} {:>16} {:>16} {:>9} {:>15} {:>15} {:>9} {:>9}",
        "",
        "",
        "tps",
        "tps (ratio)",
        "tps (ratio)",
        "ms",
        "ms (ratio)",
        "ms (ratio)",
        "cpu µs",
        "cpu µs",
    );
}

/// Prints a session-pooling row from its rounds (direct, proxy, PgBouncer first), and returns
/// the numbers a verdict is about.
fn session_row(workload: Workload, clients: u32, rounds: &[Vec<Sample>]) -> Verdict {
    let m = |measure: &dyn Fn(&[Sample]) -> f64| median(rounds.iter().map(|r| measure(r)));
    let tps = [m(&|r| r[0].tps), m(&|r| r[1].tps), m(&|r| r[2].tps)];
    let tps_ratio = [m(&|r| r[1].tps / r[0].tps), m(&|r| r[2].tps / r[0].tps)];
    let ms = [
        m(&|r| r[0].latency_ms),
        m(&|r| r[1].latency_ms),
        m(&|r| r[2].latency_ms),
    ];
    let ms_ratio = [
        m(&|r| r[1].latency_ms / r[0].latency_ms),
        m(&|r| r[2].latency_ms / r[0].latency_ms),
    ];
    let cpu = [m(&|r| r[1].cpu_us), m(&|r| r[2].cpu_us)];
    println!(
        "{:<11} {:>7} {:>8.0} {:>8.0} ({:>5.3}) {:>8.0} ({:>5.3}) {:>9.3} {:>7.3} ({:>5.2}) {:>7.3} ({:>5.2}) {:>9.1} {:>9.1}",
        workload.name(),
        clients,
        tps[0],
        tps[1],
        tps_ratio[0],
        tps[2],
        tps_ratio[1],
        ms[0],
        ms[1],
        ms_ratio[0],
        ms[2],
        ms_ratio[1],
        cpu[0],
        cpu[1],
    );
    Verdict {
        proxy: tps_ratio[0],
        bouncer: tps_ratio[1],
        direct_tps: tps[0],
        direct_busy: m(&|r| r[0].busy),
        proxy_cpu_us: cpu[0],
    }
}

/// `knobs.rounds` rounds of a pgbench run through each target, back to back, in an order that
/// rotates between rounds (so that drift affects them alike); each round's samples in the
/// targets' order.
fn rotating_rounds(
    pgbench: &Path,
    targets: &[Target],
    workload: Workload,
    clients: u32,
    knobs: &Knobs,
) -> Result<Vec<Vec<Sample>>> {
    let mut rounds = Vec::with_capacity(knobs.rounds);
    for round in 0..knobs.rounds {
        let mut samples = vec![Sample::default(); targets.len()];
        for i in 0..targets.len() {
            let which = (i + round) % targets.len();
            samples[which] =
                pgbench_run(pgbench, &targets[which], workload, clients, knobs.seconds)?;
        }
        rounds.push(samples);
    }
    Ok(rounds)
}

/// The idle-memory test: `knobs.idle` sessions through the proxy, then (the proxy stopped) as
/// many through PgBouncer.
fn idle_sessions(knobs: &Knobs, cluster: &Cluster, proxy: Helper, bouncer: &Helper) -> Result<()> {
    if knobs.idle == 0 {
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let baseline = client_backends(cluster)?;
    let proxy_kib = idle_memory(&runtime, cluster, "proxy", &proxy, knobs.idle)?;
    // The proxy keeps the server connections its clients leave (it pools them): stop it
    // and wait (bounded) for them to end, so that PgBouncer's find room.
    drop(proxy);
    let deadline = Instant::now() + Duration::from_secs(30);
    while client_backends(cluster)? > baseline + 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let bouncer_kib = idle_memory(&runtime, cluster, "pgbouncer", bouncer, knobs.idle)?;
    println!(
        "verdict: idle memory per proxied session {proxy_kib:.1} KiB (target: < {IDLE_TARGET_KIB:.0} KiB): {}; PgBouncer {bouncer_kib:.1} KiB",
        if proxy_kib < IDLE_TARGET_KIB {
            "met"
        } else {
            "MISSED"
        }
    );
    Ok(())
}

/// The connection-churn rows: `pgbench -C -S` against the emulator's gateway (in front of the
/// same cluster) directly, through the proxy pooled and as a relay, and through PgBouncer.
fn churn(knobs: &Knobs, cluster: &Cluster, files: &Path, pgbench: &Path) -> Result<()> {
    let emulator = Emulator::start(EmulatorConfig {
        backend_url: Some(cluster.url()),
        ..EmulatorConfig::default()
    })?;
    // The signed-in user (the Entra administrator) reads pgbench's tables.
    cluster.psql(&format!(
        "GRANT SELECT ON ALL TABLES IN SCHEMA public TO \"{USER}\";"
    ))?;
    let token = emulator.token_for(&Principal::user(USER)).token;
    let gateway = emulator.gateway().port();
    let upstream = format!(
        "host=localhost port={gateway} dbname={DATABASE} sslmode=verify-full sslrootcert={}",
        emulator.ca_file().display()
    );
    let biggest = knobs.churn_clients.iter().copied().max().unwrap_or(1) as usize;
    let sockets = cluster.scratch_dir("churn-sockets")?;
    let path = format!(
        "{}:{}",
        emulator.bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let az = [("PATH", path)];
    // Room for clients that have closed but are not yet seen to (on a busy machine, the
    // proxy's and PgBouncer's), with pools a little larger than the clients.
    let (sessions, pool) = (biggest + 100, biggest + 10);
    let pooled = Helper::proxy(&upstream, sessions, &sockets, Pooling::session(pool), &az)?;
    let relay = Helper::proxy(&upstream, sessions, &sockets, Pooling::none(), &az)?;
    // PgBouncer cannot get tokens: it logs in with one fetched here (valid for an hour).
    let bouncer = Helper::pgbouncer(
        cluster,
        files,
        &ServerSide {
            port: gateway,
            user: USER.to_owned(),
            password: Some(token.clone()),
            ca: emulator.ca_file().to_owned(),
        },
        sessions,
        &sockets,
        Pooling::session(pool),
    )?;
    let through = |name, port| Target {
        name,
        port,
        tls: None,
        socket_dir: None,
        pid: None,
        login: Some((USER.to_owned(), String::new())),
        churn: true,
        query_mode: "simple",
    };
    let targets = [
        Target {
            name: "gateway",
            port: gateway,
            tls: Some(emulator.ca_file().to_owned()),
            socket_dir: None,
            pid: None,
            login: Some((USER.to_owned(), token)),
            churn: true,
            query_mode: "simple",
        },
        through("pooled", pooled.port),
        through("relay", relay.port),
        through("pgbouncer", bouncer.port),
    ];
    println!();
    println!(
        "churn: pgbench -n -C -S -T {} (a new connection per transaction) against the emulator's gateway (TLS, a token checked, a new backend), {} round(s)",
        knobs.seconds, knobs.rounds
    );
    println!(
        "logins: server connections each target opened (gateway logins), its warm-up run included; tokens: credential calls (the emulator's az); PgBouncer logs in with a token fetched once, before; each proxy made one login and one credential call at its start (--check)"
    );
    // Warm each path (the pools fill up, PgBouncer's too), counted in the first row.
    let mut warm = ([0u64; 4], [0u64; 4]);
    for (i, target) in targets.iter().enumerate() {
        let before = (
            emulator.gateway().logins(),
            emulator.identity().requests(Endpoint::AzureCli),
        );
        pgbench_run(pgbench, target, Workload::SelectOnly, biggest as u32, 1)?;
        warm.0[i] = emulator.gateway().logins() - before.0;
        warm.1[i] = emulator.identity().requests(Endpoint::AzureCli) - before.1;
    }
    println!(
        "{:>7} {:>9} {:>16} {:>16} {:>16} {:>8} {:>8} {:>8} {:>9} {:>7} {:>7}",
        "clients",
        "gateway",
        "pooled",
        "relay",
        "pgbouncer",
        "logins",
        "logins",
        "logins",
        "logins",
        "tokens",
        "tokens",
    );
    println!(
        "{:>7} {:>9} {:>16} {:>16} {:>16} {:>8} {:>8} {:>8} {:>9} {:>7} {:>7}",
        "",
        "tps",
        "tps (ratio)",
        "tps (ratio)",
        "tps (ratio)",
        "gateway",
        "pooled",
        "relay",
        "pgbouncer",
        "pooled",
        "relay",
    );
    let mut met = true;
    for &clients in &knobs.churn_clients {
        let mut tps: Vec<[f64; 4]> = Vec::with_capacity(knobs.rounds);
        let (mut logins, mut tokens) = std::mem::take(&mut warm);
        for round in 0..knobs.rounds {
            let mut sample = [0.0; 4];
            for i in 0..targets.len() {
                let which = (i + round) % targets.len();
                let (logins_before, tokens_before) = (
                    emulator.gateway().logins(),
                    emulator.identity().requests(Endpoint::AzureCli),
                );
                sample[which] = pgbench_run(
                    pgbench,
                    &targets[which],
                    Workload::SelectOnly,
                    clients,
                    knobs.seconds,
                )?
                .tps;
                logins[which] += emulator.gateway().logins() - logins_before;
                tokens[which] += emulator.identity().requests(Endpoint::AzureCli) - tokens_before;
            }
            tps.push(sample);
        }
        let m = |measure: &dyn Fn(&[f64; 4]) -> f64| median(tps.iter().map(measure));
        let ratio = |i: usize| m(&|r| r[i] / r[0]);
        println!(
            "{:>7} {:>9.0} {:>8.0} ({:>5.2}) {:>8.0} ({:>5.2}) {:>8.0} ({:>5.2}) {:>8} {:>8} {:>8} {:>9} {:>7} {:>7}",
            clients,
            m(&|r| r[0]),
            m(&|r| r[1]),
            ratio(1),
            m(&|r| r[2]),
            ratio(2),
            m(&|r| r[3]),
            ratio(3),
            logins[0],
            logins[1],
            logins[2],
            logins[3],
            tokens[1],
            tokens[2],
        );
        met &= m(&|r| r[1]) >= m(&|r| r[3]) && logins[1] <= logins[3];
    }
    println!(
        "verdict: churn: pgentra pooled at least PgBouncer's TPS in every row, with no more server logins (target): {}",
        if met { "met" } else { "MISSED" }
    );
    drop((pooled, relay, bouncer));
    Ok(())
}

/// The transaction-pooling rows: `pgbench -S` with many clients on few server connections,
/// through the proxy and through PgBouncer, both in transaction mode, in the same rounds; and
/// through the proxy with `-M prepared`, which PgBouncer 1.18 is shown to fail. Against a
/// previous build, its proxy runs both modes in the same rounds too.
fn transaction_pooling(
    knobs: &Knobs,
    setup: &Setup,
    mut against: Option<(&Baseline, &mut Versus)>,
) -> Result<()> {
    let clients = knobs.txn_clients;
    let (proxy, bouncer) = setup.transaction_helpers(knobs)?;
    let previous = against
        .as_ref()
        .map(|(b, _)| proxy.twin(&b.exe))
        .transpose()?;
    let mut missed = Vec::new();
    for &workload in &knobs.workloads {
        // pgbench -M prepared prepares with blocking calls before a client's first transaction:
        // with multi-statement transactions and more clients per thread than server
        // connections it deadlocks through any transaction pooler (see the README), so TPC-B
        // runs -M simple only.
        let modes: &[&'static str] = match workload {
            Workload::SelectOnly => &["simple", "prepared"],
            Workload::TpcB | Workload::Settings => &["simple"],
        };
        let mut targets = vec![Target::through("pgbouncer", &bouncer, None, "simple")];
        targets.extend(
            modes
                .iter()
                .map(|m| Target::through("pgentra", &proxy, None, m)),
        );
        if let Some(previous) = &previous {
            targets.extend(
                modes
                    .iter()
                    .map(|m| Target::through("previous", previous, None, m)),
            );
        }
        println!();
        println!(
            "transaction pooling, {}: pgbench -n -T {} -c {clients} -j 2, {} server connections per pool, pool_mode = transaction in both, {} round(s); ratios are the median of each round's value / PgBouncer's (-M simple)",
            workload.name(),
            knobs.seconds,
            knobs.txn_pool,
            knobs.rounds
        );
        for target in &targets {
            pgbench_run(&setup.pgbench, target, workload, clients, 1)?;
        }
        let rounds = rotating_rounds(&setup.pgbench, &targets, workload, clients, knobs)?;
        if !transaction_table(&targets, &rounds) {
            missed.push(workload.name());
        }
        if let Some((_, versus)) = &mut against {
            let paired: Vec<Paired> = (0..modes.len())
                .map(|i| {
                    let label = format!("{} -M {}, {clients} clients", workload.name(), modes[i]);
                    Paired::new(label, &rounds, 1 + i, 1 + modes.len() + i)
                })
                .collect();
            versus.section("transaction pooling", &paired);
        }
    }
    println!(
        "verdict: transaction pooling, -M simple: pgentra's TPS at least PgBouncer's and its CPU per transaction at most {TXN_CPU_TARGET} x PgBouncer's, every workload (target): {}",
        if missed.is_empty() {
            "met".to_owned()
        } else {
            format!("MISSED ({})", missed.join(", "))
        }
    );
    pgbouncer_prepared(&setup.pgbench, &bouncer, clients);
    drop((proxy, bouncer, previous));
    let previous = against.as_ref().map(|(b, _)| b.exe.as_path());
    settings::replay_vs_pinned(knobs, setup, previous)
}

/// The transaction-pooling table of one workload, PgBouncer (`-M simple`) the first target;
/// whether pgentra's `-M simple` (the second) met the target: PgBouncer's TPS at least, and at
/// most [`TXN_CPU_TARGET`] of its CPU per transaction. Each round's CPU ratio is shown too.
fn transaction_table(targets: &[Target], rounds: &[Vec<Sample>]) -> bool {
    let m = |measure: &dyn Fn(&[Sample]) -> f64| median(rounds.iter().map(|r| measure(r)));
    println!(
        "{:<9} {:<10} {:>8} {:>7} {:>9} {:>7} {:>9} {:>7}  per round: cpu ratios",
        "-M", "through", "tps", "ratio", "ms", "ratio", "cpu µs", "ratio"
    );
    for (i, target) in targets.iter().enumerate() {
        let per_round: Vec<String> = rounds
            .iter()
            .map(|r| format!("{:.3}", r[i].cpu_us / r[0].cpu_us))
            .collect();
        println!(
            "{:<9} {:<10} {:>8.0} {:>7.3} {:>9.3} {:>7.3} {:>9.1} {:>7.3}  {}",
            target.query_mode,
            target.name,
            m(&|r| r[i].tps),
            m(&|r| r[i].tps / r[0].tps),
            m(&|r| r[i].latency_ms),
            m(&|r| r[i].latency_ms / r[0].latency_ms),
            m(&|r| r[i].cpu_us),
            m(&|r| r[i].cpu_us / r[0].cpu_us),
            per_round.join(" "),
        );
    }
    m(&|r| r[1].tps / r[0].tps) >= 1.0 && m(&|r| r[1].cpu_us / r[0].cpu_us) <= TXN_CPU_TARGET
}

/// One short `-M prepared` run through PgBouncer in transaction mode: it ran, or its error.
fn pgbouncer_prepared(pgbench: &Path, bouncer: &Helper, clients: u32) {
    let prepared = Target::through("pgbouncer", bouncer, None, "prepared");
    match pgbench_run(pgbench, &prepared, Workload::SelectOnly, clients, 2) {
        Ok(sample) => println!(
            "PgBouncer with -M prepared in transaction mode ran: {:.0} tps",
            sample.tps
        ),
        Err(error) => {
            let error = error.to_string();
            let first = error
                .lines()
                .find(|line| line.contains("ERROR") || line.contains("error:"))
                .unwrap_or("(no error line)");
            println!(
                "PgBouncer with -M prepared in transaction mode fails: {}",
                first.trim()
            );
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    SelectOnly,
    TpcB,
    /// Two settings once per client, then select-only ([`settings`]).
    Settings,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Self::SelectOnly => "select-only",
            Self::TpcB => "tpc-b",
            Self::Settings => "settings",
        }
    }
}

/// Where pgbench connects: TCP on loopback, with verified TLS or in plain text.
struct Target {
    name: &'static str,
    port: u16,
    tls: Option<PathBuf>,
    /// The directory of its Unix socket, to use that instead of TCP.
    socket_dir: Option<PathBuf>,
    /// The process in the middle, whose CPU time per transaction is measured.
    pid: Option<u32>,
    /// The role and password pgbench logs in with (the cluster's superuser, without one).
    login: Option<(String, String)>,
    /// A new connection for every transaction (`pgbench -C`).
    churn: bool,
    /// pgbench's `-M`: `simple`, `extended` or `prepared`.
    query_mode: &'static str,
}

impl Target {
    /// Through `helper` in plain text, as the cluster's superuser, over TCP on loopback or
    /// over its Unix socket in `socket_dir`.
    fn through(
        name: &'static str,
        helper: &Helper,
        socket_dir: Option<PathBuf>,
        query_mode: &'static str,
    ) -> Self {
        Self {
            name,
            port: helper.port,
            tls: None,
            socket_dir,
            pid: Some(helper.pid),
            login: None,
            churn: false,
            query_mode,
        }
    }
}

/// How a helper pools server connections: its pool mode and server connections per pool.
#[derive(Debug, Clone, Copy)]
struct Pooling {
    mode: &'static str,
    size: usize,
}

impl Pooling {
    /// Session pooling with a server connection for each of `size` clients.
    fn session(size: usize) -> Self {
        Self {
            mode: "session",
            size,
        }
    }

    /// The proxy's relay: a server connection of its own per client (PgBouncer has none).
    fn none() -> Self {
        Self {
            mode: "none",
            size: 1,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    tps: f64,
    latency_ms: f64,
    /// CPU time of the process in the middle per transaction, in µs (NaN for direct).
    cpu_us: f64,
    /// The share of the machine's CPU time that was busy during the run (anything running).
    busy: f64,
}

/// The select-only, 8-client numbers that the targets are about.
struct Verdict {
    proxy: f64,
    bouncer: f64,
    direct_tps: f64,
    direct_busy: f64,
    proxy_cpu_us: f64,
}

impl Verdict {
    fn print(&self) {
        let met = self.proxy >= TPS_TARGET && self.proxy > self.bouncer;
        println!(
            "verdict: select-only, 8 clients: proxy {:.1} % of direct, PgBouncer {:.1} % (target: >= {:.0} % and ahead of PgBouncer): {}",
            self.proxy * 100.0,
            self.bouncer * 100.0,
            TPS_TARGET * 100.0,
            if met { "met" } else { "MISSED" }
        );
        // When the direct run keeps every core busy, each transaction costs the machine
        // cores / tps; the proxy's hop adds its own CPU time (and the kernel's for a second
        // loopback connection) on the same cores.
        let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        let per_txn_us = cores * 1e6 / self.direct_tps;
        println!(
            "context: the machine was {:.0} % busy during the direct runs, about {per_txn_us:.1} µs of CPU per direct transaction on {cores} cores; {:.0} % of direct leaves {:.1} µs per transaction for the hop; the proxy process used {:.1} µs",
            self.direct_busy * 100.0,
            TPS_TARGET * 100.0,
            per_txn_us * (1.0 / TPS_TARGET - 1.0),
            self.proxy_cpu_us,
        );
    }
}

/// The median (NaN for none).
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One pgbench run (bounded: `timeout` kills it a minute past its duration).
fn pgbench_run(
    pgbench: &Path,
    target: &Target,
    workload: Workload,
    clients: u32,
    seconds: u64,
) -> Result<Sample> {
    let mut command = Command::new("timeout");
    command
        .args(["-k", "5", &(seconds + 60).to_string()])
        .arg(pgbench)
        .args(["-n", "-T", &seconds.to_string()])
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(2).to_string(),
        ]);
    match workload {
        Workload::SelectOnly => drop(command.arg("-S")),
        Workload::Settings => {
            command.arg("-f").arg(settings::script()?);
            command.args(["-D", "configured=0"]);
        }
        Workload::TpcB => {}
    }
    if target.churn {
        command.arg("-C");
    }
    command.args(["-M", target.query_mode]);
    // Only these settings: none from the environment (PGSERVICE, PGOPTIONS, ...).
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PGPORT", target.port.to_string())
        .env("PGDATABASE", DATABASE);
    match &target.login {
        Some((user, password)) => command.env("PGUSER", user).env("PGPASSWORD", password),
        None => command.env("PGUSER", ROLE),
    };
    match &target.socket_dir {
        Some(dir) => command.env("PGHOST", dir),
        None => command
            .env("PGHOST", "localhost")
            .env("PGHOSTADDR", "127.0.0.1"),
    };
    match &target.tls {
        Some(ca) => command
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", ca),
        None => command.env("PGSSLMODE", "disable"),
    };
    let cpu_before = target.pid.map(cpu_time).transpose()?;
    let machine_before = machine_cpu()?;
    let output = command.output()?;
    let machine_after = machine_cpu()?;
    let busy = {
        let total = machine_after.0.saturating_sub(machine_before.0) as f64;
        let idle = machine_after.1.saturating_sub(machine_before.1) as f64;
        if total > 0.0 {
            1.0 - idle / total
        } else {
            f64::NAN
        }
    };
    let cpu = match (target.pid, cpu_before) {
        (Some(pid), Some(before)) => Some(cpu_time(pid)?.saturating_sub(before)),
        _ => None,
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let failed = || {
        format!(
            "pgbench {} -c {clients} against {} failed ({}): {}{}",
            workload.name(),
            target.name,
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        )
    };
    if !output.status.success() {
        return Err(failed().into());
    }
    let value = |prefix: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|number| number.parse::<f64>().ok())
    };
    match (
        value("tps = "),
        value("latency average = "),
        value("number of transactions actually processed: "),
    ) {
        (Some(tps), Some(latency_ms), Some(transactions)) => Ok(Sample {
            tps,
            latency_ms,
            cpu_us: cpu.map_or(f64::NAN, |cpu| {
                cpu.as_secs_f64() * 1e6 / transactions.max(1.0)
            }),
            busy,
        }),
        _ => Err(failed().into()),
    }
}

/// The machine's CPU time so far, in ticks: (all, idle including I/O wait), from
/// `/proc/stat`.
fn machine_cpu() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .ok_or("no cpu line in /proc/stat")?
        .split_whitespace()
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    Ok((ticks.iter().sum(), idle))
}

/// The CPU time a process has used, all its threads together (from the scheduler's
/// nanosecond counts in `/proc/PID/task/*/schedstat`).
fn cpu_time(pid: u32) -> Result<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread that ended meanwhile has no file any more: it counts no longer.
        let Ok(stat) = std::fs::read_to_string(task?.path().join("schedstat")) else {
            continue;
        };
        total += stat
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .ok_or_else(|| format!("unreadable schedstat of process {pid}"))?;
    }
    Ok(Duration::from_nanos(total))
}

/// The server PgBouncer logs in to: its port on loopback, verified against `ca`, as `user`
/// with `password` (a token, for the gateway) or trusted.
struct ServerSide {
    port: u16,
    user: String,
    password: Option<String>,
    ca: PathBuf,
}

/// A process this benchmark started: the proxy or PgBouncer. Its standard input is a lifeline:
/// when this process ends, however it ends, the helper stops.
struct Helper {
    child: Child,
    lifeline: Option<ChildStdin>,
    /// The process whose memory is measured.
    pid: u32,
    port: u16,
    /// A proxy's `--serve-proxy` arguments and environment (none for PgBouncer).
    serving: Option<Serving>,
}

/// What a proxy helper runs with: the arguments after `--serve-proxy`, and environment.
#[derive(Clone)]
struct Serving {
    args: Vec<OsString>,
    env: Vec<(String, String)>,
}

impl Helper {
    /// This binary in `--serve-proxy` mode, in front of `upstream`, with a Unix socket in
    /// `socket_dir` too, pool mode `mode`; with `env`, its token comes from the Azure CLI
    /// credential on that environment's `PATH` (the emulator's `az`), else from a static one.
    fn proxy(
        upstream: &str,
        max_connections: usize,
        socket_dir: &Path,
        pooling: Pooling,
        env: &[(&str, String)],
    ) -> Result<Self> {
        let serving = Self::serving(upstream, max_connections, socket_dir, pooling, env);
        Self::serve(&std::env::current_exe()?, serving)
    }

    /// The `--serve-proxy` arguments and environment of [`Helper::proxy`].
    fn serving(
        upstream: &str,
        max_connections: usize,
        socket_dir: &Path,
        pooling: Pooling,
        env: &[(&str, String)],
    ) -> Serving {
        let credential = if env.is_empty() { "static" } else { "az" };
        let mut args: Vec<OsString> = vec![
            upstream.into(),
            max_connections.to_string().into(),
            socket_dir.into(),
        ];
        args.extend([pooling.mode, &pooling.size.to_string(), credential].map(OsString::from));
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), v.clone()));
        Serving {
            args,
            env: env.collect(),
        }
    }

    /// `program` (this bench's binary or another build's) as the same proxy as this one:
    /// the same `--serve-proxy` arguments and environment.
    fn twin(&self, program: &Path) -> Result<Self> {
        let serving = self.serving.clone().ok_or("not a proxy helper")?;
        Self::serve(program, serving)
    }

    /// `program --serve-proxy ARGS`, started once it says where it listens.
    fn serve(program: &Path, serving: Serving) -> Result<Self> {
        let mut child = Command::new(program)
            .arg("--serve-proxy")
            .args(&serving.args)
            .envs(serving.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let pid = child.id();
        let lifeline = child.stdin.take();
        let stdout = child.stdout.take();
        let mut helper = Self {
            child,
            lifeline,
            pid,
            port: 0,
            serving: Some(serving),
        };
        let lines = log_lines(stdout.ok_or("no pipe from the proxy")?);
        let port = wait_for(&lines, "pgentra proxy", |line| {
            line.strip_prefix("listening on ")?
                .trim()
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })?;
        helper.port = port;
        Ok(helper)
    }

    /// PgBouncer pooling as `pooling` says on a free loopback port, with verified TLS to the
    /// cluster, run by the cluster's user under a shell that stops it when the lifeline closes.
    fn pgbouncer(
        cluster: &Cluster,
        files: &Path,
        server: &ServerSide,
        max_connections: usize,
        socket_dir: &Path,
        pooling: Pooling,
    ) -> Result<Self> {
        let program = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .map(PathBuf::from)
            .find(|path| path.is_file())
            .ok_or("pgbouncer not found (apt-get install pgbouncer)")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let name = format!("pgbouncer-{}-{}", server.port, pooling.mode);
        let userlist = files.join(format!("{name}-users.txt"));
        std::fs::write(&userlist, format!("\"{}\" \"\"\n", server.user))?;
        let config = files.join(format!("{name}.ini"));
        let password = server
            .password
            .as_ref()
            .map(|p| format!(" password={p}"))
            .unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                "[databases]
{DATABASE} = host=127.0.0.1 port={upstream} dbname={DATABASE} user={user}{password}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir = {socket_dir}
auth_type = trust
auth_file = {userlist}
pool_mode = {mode}
max_client_conn = {max_connections}
default_pool_size = {size}
server_tls_sslmode = verify-full
server_tls_ca_file = {ca}
logfile =
pidfile =
log_connections = 0
log_disconnections = 0
stats_period = 3600
",
                upstream = server.port,
                user = server.user,
                userlist = userlist.display(),
                ca = server.ca.display(),
                socket_dir = socket_dir.display(),
                mode = pooling.mode,
                size = pooling.size,
            ),
        )?;
        // TERM is PgBouncer's immediate shutdown (INT waits for clients).
        let script = r#"
"$1" "$2" 2>&1 &
bouncer=$!
echo "pgbouncer pid $bouncer"
cat > /dev/null
kill -TERM "$bouncer" 2>/dev/null
wait "$bouncer"
"#;
        let mut command = Command::new("/bin/sh");
        command
            .args(["-c", script, "pgentra-bench-pgbouncer"])
            .arg(&program)
            .arg(&config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = server_user(cluster) {
            use std::os::unix::process::CommandExt as _;
            // PgBouncer refuses to run as root.
            command.uid(uid).gid(gid).current_dir("/");
        }
        let mut child = command.spawn()?;
        let lifeline = child.stdin.take();
        let stdout = child.stdout.take();
        let mut helper = Self {
            child,
            lifeline,
            pid: 0,
            port,
            serving: None,
        };
        let lines = log_lines(stdout.ok_or("no pipe from pgbouncer")?);
        helper.pid = wait_for(&lines, "pgbouncer", |line| {
            line.strip_prefix("pgbouncer pid ")?.trim().parse().ok()
        })?;
        wait_for(&lines, "pgbouncer", |line| {
            line.contains("process up").then_some(())
        })?;
        Ok(helper)
    }

    /// The helper's resident memory, in KiB.
    fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| format!("no VmRSS for process {}", self.pid).into())
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        drop(self.lifeline.take());
        // It stops on its own; wait a bounded time, then make sure.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The owner of the cluster's files: the user its server runs as (`None` if that is us).
fn server_user(cluster: &Cluster) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    let own = std::fs::metadata("/proc/self").ok()?.uid();
    let dir = std::fs::metadata(cluster.socket_dir()).ok()?;
    (dir.uid() != own).then(|| (dir.uid(), dir.gid()))
}

/// A thread reading a helper's output, keeping it drained; lines arrive on the channel.
fn log_lines(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            // Once nobody listens, keep draining so the helper never blocks on the pipe.
            let _ = tx.send(line);
        }
    });
    rx
}

/// Waits (bounded) for the first line `found` accepts; the lines before it are the error.
fn wait_for<T>(
    lines: &mpsc::Receiver<String>,
    name: &str,
    found: impl Fn(&str) -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut log = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => match found(&line) {
                Some(value) => return Ok(value),
                None => {
                    log.push_str(&line);
                    log.push('\n');
                }
            },
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(
                    format!("{name} did not start within {START_TIMEOUT:?}:\n{log}").into(),
                );
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(format!("{name} exited:\n{log}").into());
            }
        }
    }
}

/// Client sessions on the server (ours, pgbench's, the pools').
fn client_backends(cluster: &Cluster) -> Result<usize> {
    let count = cluster
        .psql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend';")?;
    Ok(count.trim().parse()?)
}

/// Opens `count` sessions through `helper`, each running one query (so that PgBouncer in
/// session mode links a server connection to it, as the proxy does at login), lets them sit
/// idle, and returns the growth of the helper's resident memory per session, in KiB.
fn idle_memory(
    runtime: &tokio::runtime::Runtime,
    cluster: &Cluster,
    name: &str,
    helper: &Helper,
    count: usize,
) -> Result<f64> {
    let before_backends = client_backends(cluster)?;
    let before = helper.rss_kib()?;
    let opened = Instant::now();
    let sessions = runtime.block_on(open_idle(helper.port, count))?;
    let open_time = opened.elapsed();
    // Let freed login buffers settle.
    std::thread::sleep(Duration::from_secs(2));
    let after = helper.rss_kib()?;
    let backends = client_backends(cluster)?;
    let per_session = after.saturating_sub(before) as f64 / count as f64;
    println!(
        "idle: {count} sessions through {name} (opened in {:.1} s; server sessions {before_backends} -> {backends}): VmRSS {before} KiB -> {after} KiB, {per_session:.1} KiB per session",
        open_time.as_secs_f64()
    );
    runtime.block_on(async move {
        for (client, connection) in sessions {
            drop(client);
            let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
        }
    });
    Ok(per_session)
}

type Session = (tokio_postgres::Client, tokio::task::JoinHandle<()>);

/// `count` logged-in plain-text sessions to `port`, 16 logins at a time (within 2 minutes).
async fn open_idle(port: u16, count: usize) -> Result<Vec<Session>> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(ROLE)
        .dbname(DATABASE)
        .application_name("proxy_vs_pgbouncer idle")
        .connect_timeout(Duration::from_secs(30));
    let limit = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let (config, limit) = (config.clone(), Arc::clone(&limit));
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await.map_err(|e| e.to_string())?;
            let (client, connection) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            let connection = tokio::spawn(async move {
                let _ = connection.await;
            });
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((client, connection))
        });
    }
    let mut sessions = Vec::with_capacity(count);
    let all = async {
        while let Some(done) = tasks.join_next().await {
            sessions.push(done.map_err(|e| e.to_string())??);
        }
        Ok::<_, String>(())
    };
    tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .map_err(|_| format!("{count} idle sessions not open within 2 minutes"))?
        .map_err(|e| format!("opening idle sessions: {e}"))?;
    Ok(sessions)
}

/// The proxy helper: serves `args[0]` (the upstream conninfo) with up to `args[1]` sessions on
/// a free loopback port, which it prints as `listening on ADDR`, and on a Unix socket in
/// `args[2]`, until its standard input closes.
fn serve_proxy(args: &[String]) -> Result<()> {
    let [
        upstream,
        max_connections,
        socket_dir,
        mode,
        size,
        credential,
        ..,
    ] = args
    else {
        return Err(
            "usage: --serve-proxy CONNINFO MAX_CONNECTIONS SOCKET_DIR none|session|transaction POOL_SIZE static|az"
                .into(),
        );
    };
    let mut instance = Instance::new(ConnInfo::parse(upstream)?, "127.0.0.1:0".parse()?);
    let auth = if credential == "az" {
        // The real Azure CLI credential, on the emulator's `az` (on PATH): the role is the
        // token's.
        EntraAuth::builder()
            .credential_chain(pgentra::credential::CredentialChain::from_vars([
                ("PATH", std::env::var("PATH")?),
                ("AZURE_TOKEN_CREDENTIALS", "AzureCliCredential".into()),
            ])?)
            .build()?
    } else {
        // The cluster trusts loopback: an Entra-shaped token for its superuser.
        let issuer = Issuer::new("bench-tenant", Duration::from_secs(3600));
        let issued = issuer.issue(&Principal::user(USER), pgentra::Cloud::Public.audience());
        let expires_on = OffsetDateTime::from_unix_timestamp(i64::try_from(issued.expires_on)?)?;
        instance.user = Some(ROLE.to_owned());
        let token = AccessToken::new(issued.token, expires_on);
        EntraAuth::builder()
            .credential_named(
                "emulator issuer",
                TestCredential::minting(move || token.clone()),
            )
            .username(ROLE)
            .build()?
    };
    instance.unix_socket_dir = Some(PathBuf::from(socket_dir));
    let mut config = ProxyConfig::default();
    config.instances = vec![instance];
    config.max_connections = max_connections.parse()?;
    config.drain_timeout = Duration::from_secs(2);
    config.pool.size = size.parse()?;
    config.pool.mode = mode.parse()?;
    // The runtime `pgentra proxy` uses, unless told otherwise (for comparison).
    let workers: usize = match std::env::var("PGENTRA_BENCH_PROXY_WORKERS") {
        Ok(workers) => workers.parse()?,
        Err(_) => pgentra_proxy::default_threads(),
    };
    let runtime = pgentra_proxy::runtime(workers)?;
    runtime.block_on(async {
        let proxy = Proxy::bind(config, auth).await?;
        proxy.check().await?;
        let addr = proxy.local_addrs().first().copied().ok_or("no listener")?;
        let mut stdout = std::io::stdout();
        writeln!(stdout, "listening on {addr}")?;
        stdout.flush()?;
        let (closed, lifeline) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            let _ = closed.send(());
        });
        proxy
            .run(async {
                let _ = lifeline.await;
            })
            .await;
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
