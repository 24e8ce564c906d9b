//! A local PostgreSQL proxy and pooler that logs in to Azure Database for PostgreSQL with
//! Microsoft Entra ID tokens, so that any client — psql, pgAdmin, DBeaver, Grafana, ORMs in any
//! language — connects without a password.
//!
//! Clients connect to a loopback address or a Unix socket. Each connection goes through the
//! proxy's stages in order, each returning a typed result or a typed [`Refusal`] (which the
//! client gets as a `FATAL` error with a SQLSTATE, never a bare close):
//!
//! 1. [`startup`]: SSL and GSS requests (TLS with clients when configured), protocol version,
//!    cancel requests, the startup message — bounded in size and by the login timeout;
//! 2. the optional local password, throttled;
//! 3. a session slot (`max_connections`), the role (see below) and the settings of its pool
//!    ([`ProxyConfig::pool_settings`]: the proxy's, then its instance's, database's and role's);
//! 4. a server connection of its own ([`PoolMode::None`]), or a place in a pool, welcomed with
//!    a proxy-issued cancel key; a new server connection needs a token from
//!    [`pgentra::EntraAuth`] (cached, refreshed ahead, single-flight) and a login over verified
//!    TLS;
//! 5. the relay — one for both pooled modes, which differ only in when the server connection
//!    goes back: between transactions ([`PoolMode::Transaction`]) or at the end
//!    ([`PoolMode::Session`]).
//!
//! One process serves several upstream servers, one listener each. `docs/architecture.md` in
//! the repository follows a client message through these stages file by file.
//!
//! # The role
//!
//! The upstream role of a session is, in order:
//!
//! 1. the instance's pinned role ([`Instance::user`], `--user`), whatever the client sends;
//! 2. the client's `user`, when it is a role clients may pick ([`Instance::client_roles`],
//!    `--client-roles readers,reporting`, or `*` for any name);
//! 3. the role derived from the token's claims (the signed-in identity).
//!
//! By default no client picks its role, because the name a client sends by default is its
//! operating-system user's (libpq, pgjdbc and node-postgres send it when none is configured):
//! so `psql -h 127.0.0.1 app`, or an application container running as any user beside the
//! proxy, logs in as the identity.
//!
//! ```no_run
//! use pgentra::conninfo::ConnInfo;
//! use pgentra_proxy::{Instance, Proxy, ProxyConfig};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let auth = pgentra::EntraAuth::from_env()?;
//! let mut config = ProxyConfig::default();
//! config.instances.push(Instance::new(
//!     ConnInfo::parse("postgres://srv.postgres.database.azure.com/app")?,
//!     "127.0.0.1:5432".parse()?,
//! ));
//! let proxy = Proxy::bind(config, auth).await?;
//! // Serve until Ctrl-C, then let running sessions finish (up to the drain timeout).
//! proxy.run(async { let _ = tokio::signal::ctrl_c().await; }).await;
//! # Ok(()) }
//! ```

mod admin;
mod cancel;
mod config;
mod connector;
mod guard;
mod listen;
mod login_settings;
mod maintain;
mod metrics;
mod params;
mod password;
mod pinning;
mod pool;
mod protocol;
mod refusal;
mod relay;
mod server;
mod session;
mod settings;
mod shared;
pub mod startup;
mod state_check;
mod tracked;

pub use config::{
    ClientRoles, Instance, PoolConfig, PoolMode, PoolOverrides, ProxyConfig, ProxyError, StateCheck,
};
pub use metrics::Metrics;
pub use refusal::Refusal;

use listen::Listener;
use shared::{InstanceState, Shared};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Most worker threads [`runtime`] makes.
pub const MAX_THREADS: usize = 1024;

/// Worker threads for the proxy's runtime when none are configured: one on machines with up to
/// two cores, where cross-thread wakeups cost more CPU per transaction than a second thread
/// gains (measured with the `proxy_vs_pgbouncer` bench), else one per core.
pub fn default_threads() -> usize {
    match std::thread::available_parallelism().map(std::num::NonZero::get) {
        Ok(cores) if cores > 2 => cores,
        _ => 1,
    }
}

/// A tokio runtime for the proxy: current-thread for one thread, multi-thread otherwise. More
/// than [`MAX_THREADS`] (or none) is refused.
pub fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, ProxyError> {
    if !(1..=MAX_THREADS).contains(&threads) {
        return Err(ProxyError::Config(format!(
            "threads must be between 1 and {MAX_THREADS}, not {threads}"
        )));
    }
    let built = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    built.map_err(|error| ProxyError::Config(format!("starting the runtime: {error}")))
}

/// A proxy with its listeners open; [`run`](Self::run) serves it.
pub struct Proxy {
    shared: Arc<Shared>,
    listeners: Vec<(Arc<InstanceState>, Listener)>,
    admin: Option<TcpListener>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("addresses", &self.local_addrs())
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Checks the configuration and opens every listener (Unix sockets with the configured
    /// mode). Fails if any address is taken or not loopback (unless allowed).
    pub async fn bind(config: ProxyConfig, auth: pgentra::EntraAuth) -> Result<Self, ProxyError> {
        config.validate()?;
        protocol::statements::name_secret().map_err(|error| {
            ProxyError::Config(format!(
                "the operating system gave no random bytes: {error}"
            ))
        })?;
        let listen_error = |address: String| move |source| ProxyError::Listen { address, source };
        let mut instances = Vec::new();
        let mut listeners = Vec::new();
        for instance in &config.instances {
            let state = Arc::new(InstanceState::new(
                instance.clone(),
                config.max_server_connections,
            )?);
            instances.push(Arc::clone(&state));
            let mut tcp_port = None;
            if let Some(addr) = instance.listen {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(listen_error(addr.to_string()))?;
                tcp_port = listener.local_addr().ok().map(|a| a.port());
                listeners.push((Arc::clone(&state), Listener::Tcp(listener)));
            }
            if let Some(dir) = &instance.unix_socket_dir {
                let port = tcp_port.unwrap_or_else(|| instance.upstream.port.unwrap_or(5432));
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let listener = listen::bind_unix(&path, config.socket_mode)?;
                listeners.push((state, Listener::Unix(listener, path)));
            }
        }
        let admin = match config.admin {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(listen_error(addr.to_string()))?,
            ),
            None => None,
        };
        Ok(Self {
            shared: Arc::new(Shared::new(config, auth, instances)),
            listeners,
            admin,
        })
    }

    /// The TCP addresses the proxy listens on, in instance order (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(_, listener)| match listener {
                Listener::Tcp(tcp) => tcp.local_addr().ok(),
                Listener::Unix(..) => None,
            })
            .collect()
    }

    /// The admin HTTP address, if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// The proxy's counters.
    /// (A handle that stays valid while [`run`](Self::run) serves.)
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.shared.metrics)
    }

    /// Gets a token and logs in to every upstream server once (a startup connection test).
    pub async fn check(&self) -> Result<(), ProxyError> {
        let shared = &self.shared;
        for state in shared.instances() {
            let instance = &state.instance;
            let mut connector = connector::Connector::new(shared, state);
            let role = match &instance.user {
                Some(role) => role.clone(),
                None => (connector.creds().await)
                    .map_err(|refusal| check_failed(state, refusal))?
                    .user()
                    .to_owned(),
            };
            let database = instance.upstream.dbname.as_deref().or(Some("postgres"));
            let startup = server::startup(&role, database, &[])
                .map_err(|len| check_failed(state, Refusal::ForwardedStartupTooLong { len }))?;
            let mut server = (connector.open(&role, &startup).await)
                .map_err(|refusal| check_failed(state, refusal))?;
            server.terminate().await;
            tracing::info!(upstream = %state.target.name, role, "connection test passed");
        }
        Ok(())
    }

    /// Serves until `shutdown` completes, then stops accepting, lets running sessions finish
    /// for up to the drain timeout, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        for (state, listener) in self.listeners {
            let shared = Arc::clone(&self.shared);
            tasks.spawn(listen::accept_loop(
                listener,
                state,
                shared,
                stop_rx.clone(),
            ));
        }
        if let Some(admin) = self.admin {
            let shared = Arc::clone(&self.shared);
            tasks.spawn(admin::serve(
                admin,
                shared,
                stop_rx.clone(),
                stop_tx.clone(),
            ));
        }
        tasks.spawn(maintain::run(Arc::clone(&self.shared), stop_rx.clone()));
        let mut stopped = stop_rx.clone();
        tokio::select! {
            () = shutdown => {}
            _ = stopped.wait_for(|stop| *stop) => {}
        }
        let shared = &self.shared;
        shared.start_draining();
        let _ = stop_tx.send(true);
        // Listeners close as their loops end; sessions keep going.
        while tasks.join_next().await.is_some() {}
        let open = shared.metrics.connections_open();
        let limit = shared.config.drain_timeout;
        tracing::info!(
            open,
            ?limit,
            "draining: waiting for open sessions to finish"
        );
        match tokio::time::timeout(limit, shared.all_closed()).await {
            Ok(()) => tracing::info!("drained: every session has ended"),
            Err(_) => {
                tracing::warn!(
                    open = shared.metrics.connections_open(),
                    "drain timeout: closing the remaining sessions"
                );
                shared.end_sessions();
                // The sessions end at once; give them a moment to close their sockets.
                let _ = tokio::time::timeout(Duration::from_secs(1), shared.all_closed()).await;
            }
        }
    }
}

/// The connection test's error for `refusal`: the credential's error, or what a client would
/// have been told.
fn check_failed(state: &InstanceState, refusal: Refusal) -> ProxyError {
    match refusal {
        Refusal::Token(error) => ProxyError::Pgentra(error),
        refusal => ProxyError::Check {
            upstream: state.target.name.clone(),
            message: refusal.fields().get(b'M').unwrap_or_default().to_owned(),
        },
    }
}
