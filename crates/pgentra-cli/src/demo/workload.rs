//! The demo's workload: clients of the pool (and of an in-process proxy) that query in a loop
//! and retire their connections early, so that new logins keep happening, and the counters
//! they keep.

use super::Args;
use crate::error::{CliError, chain};
use deadpool_postgres::{Object, Pool};
use parking_lot::Mutex;
use pgentra::EntraAuth;
use pgentra::conninfo::ConnInfo;
use pgentra_proxy::{Instance, Proxy, ProxyConfig};
use std::error::Error as StdError;
use std::hash::{DefaultHasher, Hash, Hasher as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// Pause between two queries of one worker, so the demo does not saturate a small machine.
const PAUSE: Duration = Duration::from_millis(20);
/// How long workers may take to finish their last query once told to stop.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// What the workers count, read by the progress display and the summary.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) queries: AtomicU64,
    pub(super) login_failures: AtomicU64,
    pub(super) query_failures: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// How long each new login took, in seconds (pool and proxy sessions).
    login_seconds: Mutex<Vec<f64>>,
}

impl Counters {
    fn fail(&self, counter: &AtomicU64, what: &str, error: &(dyn StdError + 'static)) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock();
        if first.is_none() {
            // For a failed login, pgentra's own error says why better than the pool's wrapper.
            let error = pgentra::deadpool::cause(error).map_or(error, |cause| cause as _);
            *first = Some(format!("{what}: {}", chain(error)));
        }
    }

    fn login_took(&self, started: Instant) {
        self.login_seconds
            .lock()
            .push(started.elapsed().as_secs_f64());
    }

    pub(super) fn failures(&self) -> u64 {
        self.login_failures.load(Ordering::Relaxed) + self.query_failures.load(Ordering::Relaxed)
    }

    pub(super) fn first_error(&self) -> Option<String> {
        self.first_error.lock().clone()
    }

    /// The new logins' durations in seconds, sorted.
    pub(super) fn login_seconds(&self) -> Vec<f64> {
        let mut seconds = self.login_seconds.lock().clone();
        seconds.sort_by(f64::total_cmp);
        seconds
    }
}

/// The running workers.
pub(super) struct Workload {
    pub(super) counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    workers: JoinSet<()>,
    stop_proxy: Option<oneshot::Sender<()>>,
}

impl Workload {
    /// Starts `--connections` clients of the pool and `--proxy-sessions` clients of a proxy in
    /// front of `info`, the latter logging in as `role`.
    pub(super) async fn start(
        args: &Args,
        pool: &Pool,
        auth: &EntraAuth,
        info: &ConnInfo,
        role: &str,
    ) -> Result<Self, CliError> {
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = JoinSet::new();
        for _ in 0..args.connections {
            workers.spawn(worker(
                pool.clone(),
                args.token_lifetime,
                Arc::clone(&stop),
                Arc::clone(&counters),
            ));
        }
        let mut stop_proxy = None;
        if args.proxy_sessions > 0 {
            let (addr, stop_sender) = start_proxy(auth, info).await?;
            stop_proxy = Some(stop_sender);
            for _ in 0..args.proxy_sessions {
                workers.spawn(proxy_worker(
                    addr,
                    role.to_owned(),
                    args.token_lifetime,
                    Arc::clone(&stop),
                    Arc::clone(&counters),
                ));
            }
        }
        Ok(Self {
            counters,
            stop,
            workers,
            stop_proxy,
        })
    }

    /// Tells the workers to stop, waits a little for their last queries, then stops the proxy.
    pub(super) async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let finished = tokio::time::timeout(STOP_GRACE, async {
            while self.workers.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            self.workers.abort_all();
        }
        if let Some(stop_proxy) = self.stop_proxy {
            let _ = stop_proxy.send(());
        }
    }
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
    addr: SocketAddr,
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
) -> Result<(SocketAddr, oneshot::Sender<()>), CliError> {
    let mut config = ProxyConfig::default();
    config
        .instances
        .push(Instance::new(info.clone(), ([127, 0, 0, 1], 0).into()));
    let proxy = Proxy::bind(config, auth.clone()).await?;
    let addr = proxy.local_addrs()[0];
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(proxy.run(async {
        let _ = stopped.await;
    }));
    Ok((addr, stop))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
