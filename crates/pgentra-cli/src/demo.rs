//! `pgentra demo`: a pool kept logged in across several token lifetimes, against the emulator.
//!
//! The emulator issues short-lived tokens; the real `ManagedIdentityCredential` fetches them
//! from its IMDS endpoint; a deadpool-postgres pool retires connections after a fraction of a
//! token's life, so new logins keep happening with whatever token is current. Progress goes to
//! standard error, the summary (or `--json`) to standard output.

use crate::Context;
use crate::error::CliError;
use crate::output::print_json;
use deadpool_postgres::{Object, Pool};
use pgentra::conninfo::ConnInfo;
use pgentra::credential::CredentialChain;
use pgentra::tls::SslMode;
use pgentra::{DbCredentials, EntraAuth};
use pgentra_emulator::{Emulator, EmulatorConfig};
use pgentra_proxy::{Instance, Proxy, ProxyConfig};
use serde_json::json;
use std::error::Error as StdError;
use std::hash::{DefaultHasher, Hash, Hasher as _};
use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::time::MissedTickBehavior;

/// Starts the emulator with a throwaway PostgreSQL and short-lived tokens, and runs a pooled
/// workload through pgentra while tokens expire and are refreshed.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// How long to run the workload.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Lifetime of the emulator's tokens.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    token_lifetime: Duration,
    /// Pool size: connections used at once.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Also run this many sessions through a `pgentra proxy` (in this process), each
    /// reconnecting like a pooled connection.
    #[arg(long, default_value_t = 0)]
    proxy_sessions: usize,
}

/// Pause between two queries of one worker, so the demo does not saturate a small machine.
const PAUSE: Duration = Duration::from_millis(20);
/// How often the progress line is redrawn on a terminal.
const TTY_PROGRESS: Duration = Duration::from_millis(250);
/// How often a progress line is printed when standard error is a file or a pipe.
const LOG_PROGRESS: Duration = Duration::from_secs(5);
/// How long workers may take to finish their last query once told to stop.
const STOP_GRACE: Duration = Duration::from_secs(5);

pub(crate) fn run(args: &Args, context: Context) -> Result<ExitCode, CliError> {
    validate(args)?;
    // azure_identity picks App Service, Arc or Cloud Shell over IMDS from the process
    // environment, which would send the demo's token requests away from the emulator.
    if let Some(name) = ["IDENTITY_ENDPOINT", "MSI_ENDPOINT"]
        .into_iter()
        .find(|name| std::env::var_os(name).is_some())
    {
        return Err(CliError::Usage(format!(
            "{name} is set, so ManagedIdentityCredential would not ask the emulator's IMDS endpoint; unset it for the demo"
        )));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(CliError::io("starting the runtime"))?;
    eprintln!("pgentra demo: starting a throwaway PostgreSQL and the Entra ID emulator…");
    let emulator = Emulator::start(EmulatorConfig {
        token_lifetime: args.token_lifetime,
        ..EmulatorConfig::default()
    })?;
    // The unchanged managed-identity credential, its IMDS requests sent to the emulator.
    let chain = CredentialChain::from_vars([
        (
            "AZURE_TOKEN_CREDENTIALS",
            "ManagedIdentityCredential".to_owned(),
        ),
        (
            "AZURE_POD_IDENTITY_AUTHORITY_HOST",
            emulator.identity().imds_authority(),
        ),
    ])?;
    let auth = EntraAuth::builder().credential_chain(chain).build()?;
    let mut info = ConnInfo::default();
    info.host = Some("localhost".into());
    info.port = Some(emulator.gateway().port());
    info.dbname = Some("postgres".into());
    info.sslmode = Some(SslMode::VerifyFull);
    info.sslrootcert = Some(emulator.ca_file().to_owned());
    let connector = pgentra::tokio_postgres::EntraConnector::new(auth.clone(), &info)?;
    let pool = pgentra::deadpool::pool(connector, args.connections)?;

    let summary = runtime.block_on(demo(args, context, &emulator, &auth, &info, pool))?;
    let problems = summary.problems();
    if context.json {
        print_json(&summary.to_json(problems.is_empty()));
    } else {
        summary.print(context, &problems);
    }
    if problems.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(CliError::Failed(format!(
            "demo failed: {}",
            problems.join("; ")
        )))
    }
}

fn validate(args: &Args) -> Result<(), CliError> {
    if args.duration.is_zero() {
        return Err(CliError::Usage("--duration must be more than 0s".into()));
    }
    if args.token_lifetime < Duration::from_secs(2) {
        return Err(CliError::Usage(format!(
            "--token-lifetime must be at least 2s (got {})",
            humantime::format_duration(args.token_lifetime)
        )));
    }
    if !(1..=100).contains(&args.connections) {
        return Err(CliError::Usage(format!(
            "--connections must be between 1 and 100 (got {})",
            args.connections
        )));
    }
    if args.proxy_sessions > 100 {
        return Err(CliError::Usage(format!(
            "--proxy-sessions must be at most 100 (got {})",
            args.proxy_sessions
        )));
    }
    Ok(())
}

/// What the workers count, read by the progress display and the summary.
#[derive(Debug, Default)]
struct Counters {
    queries: AtomicU64,
    login_failures: AtomicU64,
    query_failures: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// How long each new login took, in seconds (pool and proxy sessions).
    login_seconds: Mutex<Vec<f64>>,
}

impl Counters {
    fn fail(&self, counter: &AtomicU64, what: &str, error: &(dyn StdError + 'static)) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut first = lock(&self.first_error);
        if first.is_none() {
            *first = Some(format!("{what}: {}", one_line(error)));
        }
    }

    fn login_took(&self, started: Instant) {
        lock(&self.login_seconds).push(started.elapsed().as_secs_f64());
    }

    fn failures(&self) -> u64 {
        self.login_failures.load(Ordering::Relaxed) + self.query_failures.load(Ordering::Relaxed)
    }
}

/// An error and its causes on one line; for a failed login, pgentra's own cause if it has one.
fn one_line(error: &(dyn StdError + 'static)) -> String {
    if let Some(cause) = pgentra::deadpool::cause(error) {
        return cause.to_string().replace('\n', " ");
    }
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&dyn StdError> = Some(error);
    while let Some(current) = next {
        let part = current.to_string();
        // Wrappers often repeat their source's message.
        if !parts.last().is_some_and(|last| last.contains(&part)) {
            parts.push(part);
        }
        next = current.source();
    }
    parts.join(": ").replace('\n', " ")
}

/// The age at which a connection is closed instead of returned to the pool: between a quarter
/// and a half of the token lifetime, fixed per connection (from its id) so that connections
/// are not all replaced at once, like a pool's maximum connection lifetime with jitter.
fn retire_after(id: impl Hash, token_lifetime: Duration) -> Duration {
    let mut hasher = DefaultHasher::new();
    id.hash(&mut hasher);
    let fraction = (hasher.finish() >> 11) as f64 / (1_u64 << 53) as f64;
    token_lifetime.mul_f64(0.25 + 0.25 * fraction)
}

/// One client of the pool: a small query, a short pause, again, until told to stop.
async fn worker(
    pool: Pool,
    token_lifetime: Duration,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) {
    while !stop.load(Ordering::Relaxed) {
        let asked = Instant::now();
        match pool.get().await {
            Err(error) => counters.fail(&counters.login_failures, "login", &error),
            Ok(client) => {
                if Object::metrics(&client).recycled.is_none() {
                    // Never recycled: this get opened the connection.
                    counters.login_took(asked);
                }
                let failed = match client.simple_query("SELECT current_user, now()").await {
                    Ok(_) => {
                        counters.queries.fetch_add(1, Ordering::Relaxed);
                        false
                    }
                    Err(error) => {
                        counters.fail(&counters.query_failures, "query", &error);
                        true
                    }
                };
                let age = Object::metrics(&client).age();
                if failed || age >= retire_after(Object::id(&client), token_lifetime) {
                    // Closed rather than recycled: the pool's next connection logs in anew.
                    drop(Object::take(client));
                }
            }
        }
        tokio::time::sleep(PAUSE).await;
    }
}

/// One client of the proxy: connects as psql would, queries for the same lifetime as a pooled
/// connection, disconnects, again.
async fn proxy_worker(
    addr: std::net::SocketAddr,
    role: String,
    token_lifetime: Duration,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) {
    let mut config = tokio_postgres::Config::new();
    config
        .host(addr.ip().to_string())
        .port(addr.port())
        .dbname("postgres")
        // The token's own role, named on purpose (see the proxy's role rule).
        .user(role);
    let mut session = 0_u64;
    while !stop.load(Ordering::Relaxed) {
        let asked = Instant::now();
        let client = match config.connect(tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                counters.login_took(asked);
                tokio::spawn(connection);
                client
            }
            Err(error) => {
                counters.fail(&counters.login_failures, "proxy login", &error);
                tokio::time::sleep(PAUSE).await;
                continue;
            }
        };
        session += 1;
        let retire = retire_after((addr.port(), session, asked), token_lifetime);
        while !stop.load(Ordering::Relaxed) && asked.elapsed() < retire {
            match client.simple_query("SELECT current_user, now()").await {
                Ok(_) => counters.queries.fetch_add(1, Ordering::Relaxed),
                Err(error) => {
                    counters.fail(&counters.query_failures, "proxy query", &error);
                    break;
                }
            };
            tokio::time::sleep(PAUSE).await;
        }
    }
}

/// Starts an in-process `pgentra proxy` in front of the gateway.
async fn start_proxy(
    auth: &EntraAuth,
    info: &ConnInfo,
) -> Result<(std::net::SocketAddr, tokio::sync::oneshot::Sender<()>), CliError> {
    let mut config = ProxyConfig::default();
    config
        .instances
        .push(Instance::new(info.clone(), ([127, 0, 0, 1], 0).into()));
    let proxy = Proxy::bind(config, auth.clone())
        .await
        .map_err(|error| CliError::Failed(error.to_string()))?;
    let addr = proxy.local_addrs()[0];
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(proxy.run(async {
        let _ = stopped.await;
    }));
    Ok((addr, stop))
}

/// This process's resident memory in KiB, from `/proc/self/status`.
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Everything the summary reports.
#[derive(Debug)]
struct Summary {
    elapsed: Duration,
    interrupted: bool,
    token_lifetime: Duration,
    connections: usize,
    proxy_sessions: usize,
    role: String,
    tokens_fetched: u64,
    connections_opened: u64,
    gateway_refused: u64,
    queries: u64,
    login_failures: u64,
    query_failures: u64,
    /// For each refresh, seconds between fetching the new token and the old one's expiry
    /// (negative if it came late).
    refresh_leads: Vec<f64>,
    /// New logins' durations in seconds, sorted.
    login_seconds: Vec<f64>,
    /// Resident memory once the workload ran for a while, and at the end.
    rss_kib: (Option<u64>, Option<u64>),
    first_error: Option<String>,
}

/// Starts the workers and shows progress until the duration passes or Ctrl-C.
async fn demo(
    args: &Args,
    context: Context,
    emulator: &Emulator,
    auth: &EntraAuth,
    info: &ConnInfo,
    pool: Pool,
) -> Result<Summary, CliError> {
    // The first token, before the clock starts: it names the role, and a credential that
    // cannot get one fails here with its reason.
    let first = auth.credentials().await?;
    print_intro(args, context, emulator, auth, &first);

    let tty = std::io::stderr().is_terminal();
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.connections {
        workers.spawn(worker(
            pool.clone(),
            args.token_lifetime,
            Arc::clone(&stop),
            Arc::clone(&counters),
        ));
    }
    let proxy = if args.proxy_sessions > 0 {
        let (addr, stop_proxy) = start_proxy(auth, info).await?;
        for _ in 0..args.proxy_sessions {
            workers.spawn(proxy_worker(
                addr,
                first.user().to_owned(),
                args.token_lifetime,
                Arc::clone(&stop),
                Arc::clone(&counters),
            ));
        }
        Some(stop_proxy)
    } else {
        None
    };

    let started = Instant::now();
    let mut tokens = auth.subscribe();
    let mut previous = tokens.borrow_and_update().clone().unwrap_or(first);
    let mut refresh_leads = Vec::new();
    let mut ticks = tokio::time::interval(if tty { TTY_PROGRESS } else { LOG_PROGRESS });
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    ticks.tick().await;
    let progress = |elapsed: Duration| {
        progress_line(
            elapsed,
            auth.stats().tokens_fetched,
            emulator.gateway().logins(),
            counters.queries.load(Ordering::Relaxed),
            counters.failures(),
        )
    };
    let deadline = tokio::time::sleep(args.duration);
    tokio::pin!(deadline);
    // Memory is first measured once the workload has run for a while (pools full, caches
    // warm), so that start and end compare like with like.
    let warm = tokio::time::sleep(args.token_lifetime.min(args.duration / 4));
    tokio::pin!(warm);
    let mut rss_start = None;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let interrupted = loop {
        tokio::select! {
            () = &mut deadline => break false,
            _ = &mut ctrl_c => break true,
            () = &mut warm, if rss_start.is_none() => rss_start = rss_kib(),
            _ = ticks.tick() => {
                if tty {
                    eprint!("\r{}\x1b[K", progress(started.elapsed()));
                } else {
                    eprintln!("{}", progress(started.elapsed()));
                }
            }
            Ok(()) = tokens.changed() => {
                let Some(new) = tokens.borrow_and_update().clone() else { continue };
                if new.fetched_at() == previous.fetched_at() {
                    continue;
                }
                let lead = seconds_between(new.fetched_at(), previous.expires_at());
                refresh_leads.push(lead);
                let event = format!(
                    "{:>5.1}s  new token #{}, fetched {lead:.1} s before the previous one expired",
                    started.elapsed().as_secs_f64(),
                    refresh_leads.len() + 1,
                );
                if tty {
                    eprint!("\r{event}\x1b[K\n{}\x1b[K", progress(started.elapsed()));
                } else {
                    eprintln!("{event}");
                }
                previous = new;
            }
        }
    };
    let elapsed = started.elapsed();
    let rss_end = rss_kib();
    stop.store(true, Ordering::Relaxed);
    if tokio::time::timeout(STOP_GRACE, async {
        while workers.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        workers.abort_all();
    }
    if tty {
        eprintln!("\r{}\x1b[K", progress(elapsed));
    } else {
        eprintln!("{}", progress(elapsed));
    }
    // Closes the connections before the emulator goes.
    pool.close();
    if let Some(stop_proxy) = proxy {
        let _ = stop_proxy.send(());
    }

    let first_error = lock(&counters.first_error).clone();
    let mut login_seconds = std::mem::take(&mut *lock(&counters.login_seconds));
    login_seconds.sort_by(f64::total_cmp);
    Ok(Summary {
        elapsed,
        interrupted,
        token_lifetime: args.token_lifetime,
        connections: args.connections,
        proxy_sessions: args.proxy_sessions,
        role: previous.user().to_owned(),
        tokens_fetched: auth.stats().tokens_fetched,
        connections_opened: emulator.gateway().logins(),
        gateway_refused: emulator.gateway().rejected(),
        queries: counters.queries.load(Ordering::Relaxed),
        login_failures: counters.login_failures.load(Ordering::Relaxed),
        query_failures: counters.query_failures.load(Ordering::Relaxed),
        refresh_leads,
        login_seconds,
        rss_kib: (rss_start, rss_end),
        first_error,
    })
}

/// `later − earlier` in seconds, negative if `later` is before `earlier`.
fn seconds_between(earlier: SystemTime, later: SystemTime) -> f64 {
    match later.duration_since(earlier) {
        Ok(ahead) => ahead.as_secs_f64(),
        Err(behind) => -behind.duration().as_secs_f64(),
    }
}

/// What is about to happen; on standard error with `--json`, whose standard output is data.
fn print_intro(
    args: &Args,
    context: Context,
    emulator: &Emulator,
    auth: &EntraAuth,
    first: &DbCredentials,
) {
    // Colour is decided for standard output, so none when the intro goes to standard error.
    let style = context.style;
    let bold = |text: &str| {
        if context.json {
            text.to_owned()
        } else {
            style.bold(text)
        }
    };
    let dim = |text: &str| {
        if context.json {
            text.to_owned()
        } else {
            style.dim(text)
        }
    };
    let lifetime = args.token_lifetime;
    let backend = emulator
        .cluster()
        .map_or_else(String::new, |c| format!(" (port {})", c.port()));
    let retire = |fraction: f64| lifetime.mul_f64(fraction).as_secs_f64();
    let rows = [
        (
            "database",
            format!(
                "a throwaway PostgreSQL{backend} behind an Azure-like gateway on localhost:{}, TLS verify-full",
                emulator.gateway().port()
            ),
        ),
        (
            "tokens",
            format!(
                "from the Entra ID emulator, each valid {}",
                humantime::format_duration(lifetime)
            ),
        ),
        (
            "credential",
            format!(
                "{} through IMDS at {}, role {}",
                auth.credential_name(),
                emulator.identity().imds_authority(),
                bold(first.user())
            ),
        ),
        (
            "pool",
            format!(
                "deadpool-postgres, {} connections, each closed after {:.1}–{:.1} s so new logins keep happening",
                args.connections,
                retire(0.25),
                retire(0.5),
            ),
        ),
        (
            "workload",
            format!(
                "SELECT current_user, now() in a loop for {}; Ctrl-C stops early",
                humantime::format_duration(args.duration)
            ),
        ),
    ];
    let proxy = (args.proxy_sessions > 0).then(|| {
        (
            "proxy",
            format!(
                "{} sessions through a pgentra proxy, reconnecting as often",
                args.proxy_sessions
            ),
        )
    });
    let mut text = format!(
        "{}\n",
        bold("pgentra demo: a pool kept logged in across token lifetimes")
    );
    for (name, value) in rows.into_iter().chain(proxy) {
        text.push_str(&format!("  {}  {value}\n", dim(&format!("{name:<10}"))));
    }
    if context.json {
        eprint!("{text}");
    } else {
        println!("{text}");
    }
}

fn progress_line(
    elapsed: Duration,
    tokens: u64,
    connections: u64,
    queries: u64,
    failures: u64,
) -> String {
    format!(
        "{:>5.1}s  tokens {tokens} · connections {connections} · queries {} · failures {failures}",
        elapsed.as_secs_f64(),
        thousands(queries),
    )
}

/// `1 token`, `1,234 tokens`.
fn count(n: u64, one: &str, many: &str) -> String {
    format!("{} {}", thousands(n), if n == 1 { one } else { many })
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

impl Summary {
    fn failed_logins(&self) -> u64 {
        // A refusal by the gateway is also a failed login on the client: adding the two would
        // count it twice, the larger count misses neither.
        self.login_failures.max(self.gateway_refused)
    }

    /// Why the run did not show what it should; empty if it did.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.failed_logins() > 0 {
            problems.push(count(self.failed_logins(), "failed login", "failed logins"));
        }
        if self.query_failures > 0 {
            problems.push(count(self.query_failures, "failed query", "failed queries"));
        }
        if self.elapsed > self.token_lifetime && self.refresh_leads.is_empty() {
            problems.push(format!(
                "no token was refreshed in {:.1} s of {} s tokens",
                self.elapsed.as_secs_f64(),
                self.token_lifetime.as_secs_f64()
            ));
        }
        let late = self
            .refresh_leads
            .iter()
            .filter(|lead| **lead <= 0.0)
            .count();
        if late > 0 {
            problems.push(format!(
                "{} only after the previous one expired",
                count(late as u64, "token was refreshed", "tokens were refreshed")
            ));
        }
        if let (false, Some(error)) = (problems.is_empty(), &self.first_error) {
            problems.push(format!("first error: {error}"));
        }
        problems
    }

    /// The login time below which `share` of the logins took, in milliseconds.
    fn login_ms(&self, share: f64) -> Option<f64> {
        let sorted = &self.login_seconds;
        let last = sorted.len().checked_sub(1)?;
        let index = ((last as f64) * share).round() as usize;
        Some(sorted[index.min(last)] * 1000.0)
    }

    fn leads(&self) -> Option<(f64, f64, f64)> {
        let leads = &self.refresh_leads;
        let min = leads.iter().copied().reduce(f64::min)?;
        let max = leads.iter().copied().reduce(f64::max)?;
        Some((min, leads.iter().sum::<f64>() / leads.len() as f64, max))
    }

    fn print(&self, context: Context, problems: &[String]) {
        let style = context.style;
        let row = |name: &str, value: &str| {
            println!("  {}  {value}", style.dim(&format!("{name:<20}")));
        };
        let failed = |count: u64| {
            if count == 0 {
                style.good("0")
            } else {
                style.bad(&thousands(count))
            }
        };
        println!();
        println!(
            "{}",
            style.bold(if self.interrupted {
                "Summary (stopped early by Ctrl-C)"
            } else {
                "Summary"
            })
        );
        let proxied = if self.proxy_sessions > 0 {
            format!(" and {} through the proxy", self.proxy_sessions)
        } else {
            String::new()
        };
        row(
            "ran for",
            &format!(
                "{:.1} s with {} connections{proxied}, tokens valid {} each",
                self.elapsed.as_secs_f64(),
                self.connections,
                humantime::format_duration(self.token_lifetime)
            ),
        );
        row("tokens fetched", &thousands(self.tokens_fetched));
        let per_token = self.connections_opened as f64 / self.tokens_fetched.max(1) as f64;
        row(
            "connections opened",
            &format!(
                "{}  ({per_token:.1} per token, as {})",
                thousands(self.connections_opened),
                self.role
            ),
        );
        if let (Some(p50), Some(p99)) = (self.login_ms(0.5), self.login_ms(0.99)) {
            row("login time", &format!("p50 {p50:.1} ms · p99 {p99:.1} ms"));
        }
        row("queries", &thousands(self.queries));
        row(
            "failed logins",
            &format!(
                "{}  (refused by the gateway: {})",
                failed(self.failed_logins()),
                self.gateway_refused
            ),
        );
        row("failed queries", &failed(self.query_failures));
        row(
            "refreshed ahead",
            &match self.leads() {
                Some((min, avg, max)) => format!(
                    "min {min:.1} s · avg {avg:.1} s · max {max:.1} s before expiry  ({})",
                    count(self.refresh_leads.len() as u64, "refresh", "refreshes")
                ),
                None => "no refresh (the run was shorter than a token's life)".into(),
            },
        );
        if let (Some(start), Some(end)) = self.rss_kib {
            row(
                "memory (RSS)",
                &format!(
                    "{:.1} MiB once warm, {:.1} MiB at the end",
                    start as f64 / 1024.0,
                    end as f64 / 1024.0
                ),
            );
        }
        println!();
        if problems.is_empty() {
            println!(
                "{}",
                style.good(&format!(
                    "✓ {} logged in with {}; no login failed.",
                    count(self.connections_opened, "new connection", "new connections"),
                    count(self.tokens_fetched, "token", "tokens")
                ))
            );
        } else {
            println!("{}", style.bad(&format!("✗ {}", problems.join("; "))));
        }
    }

    fn to_json(&self, ok: bool) -> serde_json::Value {
        let ms = |seconds: f64| (seconds * 1000.0).round() / 1000.0;
        json!({
            "duration_s": ms(self.elapsed.as_secs_f64()),
            "interrupted": self.interrupted,
            "token_lifetime_s": ms(self.token_lifetime.as_secs_f64()),
            "connections": self.connections,
            "proxy_sessions": self.proxy_sessions,
            "role": self.role,
            "tokens_fetched": self.tokens_fetched,
            "connections_opened": self.connections_opened,
            "queries": self.queries,
            "failed_logins": self.failed_logins(),
            "gateway_refused": self.gateway_refused,
            "query_failures": self.query_failures,
            "refresh_leads_s": self.refresh_leads.iter().copied().map(ms).collect::<Vec<_>>(),
            "logins_timed": self.login_seconds.len(),
            "login_p50_ms": self.login_ms(0.5).map(|v| ms(v / 1000.0) * 1000.0),
            "login_p99_ms": self.login_ms(0.99).map(|v| ms(v / 1000.0) * 1000.0),
            "rss_start_kib": self.rss_kib.0,
            "rss_end_kib": self.rss_kib.1,
            "first_error": self.first_error,
            "ok": ok,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(duration: u64, token_lifetime: u64, connections: usize) -> Args {
        Args {
            duration: Duration::from_secs(duration),
            token_lifetime: Duration::from_secs(token_lifetime),
            connections,
            proxy_sessions: 0,
        }
    }

    #[test]
    fn flags_are_checked() {
        assert!(validate(&args(60, 20, 8)).is_ok());
        for (bad, flag) in [
            (args(0, 20, 8), "--duration"),
            (args(60, 1, 8), "--token-lifetime"),
            (args(60, 20, 0), "--connections"),
            (args(60, 20, 101), "--connections"),
        ] {
            let error = validate(&bad).unwrap_err();
            assert!(matches!(error, CliError::Usage(_)), "{error:?}");
            assert!(error.to_string().starts_with(flag), "{error}");
        }
    }

    #[test]
    fn connections_retire_between_a_quarter_and_a_half_of_a_token_life() {
        let lifetime = Duration::from_secs(20);
        let ages: Vec<Duration> = (0..100_u64).map(|id| retire_after(id, lifetime)).collect();
        assert!(
            ages.iter()
                .all(|age| *age >= lifetime / 4 && *age <= lifetime / 2)
        );
        // Spread out, so the pool does not replace every connection at once.
        let (min, max) = (ages.iter().min().unwrap(), ages.iter().max().unwrap());
        assert!(*max - *min > lifetime / 5, "{min:?}..{max:?}");
    }

    #[test]
    fn numbers_are_readable() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(count(1, "token", "tokens"), "1 token");
        assert_eq!(count(1200, "token", "tokens"), "1,200 tokens");
        let now = SystemTime::now();
        let later = now + Duration::from_millis(1500);
        assert!((seconds_between(now, later) - 1.5).abs() < 1e-9);
        assert!((seconds_between(later, now) + 1.5).abs() < 1e-9);
    }
}
