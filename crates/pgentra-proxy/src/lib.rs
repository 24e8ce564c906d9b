//! A local PostgreSQL proxy that logs in to Azure Database for PostgreSQL with Microsoft Entra
//! ID tokens, so that any client — psql, pgAdmin, DBeaver, Grafana, ORMs in any language —
//! connects without a password.
//!
//! Clients connect to a loopback address or a Unix socket. The proxy terminates the startup
//! phase itself (SSL and GSS requests, protocol version, cancel requests, an optional local
//! password), logs in upstream over verified TLS with a token from [`pgentra::EntraAuth`]
//! (cached, refreshed ahead, single-flight), relays the server's answers with its own cancel
//! keys, then copies bytes both ways. One process serves several upstream servers, one
//! listener each.
//!
//! # The role
//!
//! The upstream role of a session is, in order:
//!
//! 1. the instance's pinned role ([`Instance::user`], `--user`), whatever the client sends;
//! 2. the client's `user`, when it names a role on purpose — anything but the empty name and
//!    the local operating-system user names (which libpq sends when no user is given), so
//!    `psql -U readers` logs in as the group `readers`;
//! 3. the role derived from the token's claims (the signed-in identity), so
//!    `psql -h 127.0.0.1 -p 5432 app` just works.
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
mod metrics;
mod session;
mod upstream;

pub use metrics::Metrics;

use pgentra::conninfo::ConnInfo;
use pgentra::{EntraAuth, Secret};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Notify, Semaphore, watch};

/// Worker threads for the proxy's runtime when none are configured: one on machines with up to
/// two cores, where cross-thread wakeups cost more CPU per transaction than a second thread
/// gains (measured with the `proxy_vs_pgbouncer` bench), else one per core.
pub fn default_threads() -> usize {
    match std::thread::available_parallelism().map(std::num::NonZero::get) {
        Ok(cores) if cores > 2 => cores,
        _ => 1,
    }
}

/// A tokio runtime for the proxy: current-thread for one thread, multi-thread otherwise.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// Errors from setting up the proxy. (Session failures are logged and reported to that client
/// only.)
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The configuration is not usable; the message says which setting.
    #[error("invalid proxy configuration: {0}")]
    Config(String),
    /// A listener could not be opened.
    #[error("listening on {address}: {source}")]
    Listen {
        /// The address or socket path.
        address: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Getting a token or logging in upstream failed (from [`Proxy::check`]).
    #[error(transparent)]
    Pgentra(#[from] pgentra::Error),
    /// The startup connection test failed upstream.
    #[error("connection test for {upstream} failed: {message}")]
    Check {
        /// The upstream server.
        upstream: String,
        /// What went wrong.
        message: String,
    },
}

/// One upstream server and where the proxy listens for it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Instance {
    /// The upstream server: host, port (5432), database (the client's by default), TLS mode
    /// (`verify-full` by default) and root certificate.
    pub upstream: ConnInfo,
    /// The TCP address to listen on.
    pub listen: Option<SocketAddr>,
    /// A directory for a Unix socket named `.s.PGSQL.<port>` (libpq's convention; the port is
    /// the TCP listener's, else the upstream's).
    pub unix_socket_dir: Option<PathBuf>,
    /// A role every session of this instance uses, whatever the client sends.
    pub user: Option<String>,
}

impl Instance {
    /// An instance listening on `listen`, with the role chosen by the [rule](crate#the-role).
    pub fn new(upstream: ConnInfo, listen: SocketAddr) -> Self {
        Self {
            upstream,
            listen: Some(listen),
            unix_socket_dir: None,
            user: None,
        }
    }

    /// The upstream as `host:port`, for logs and errors.
    pub fn upstream_name(&self) -> String {
        format!(
            "{}:{}",
            self.upstream.host.as_deref().unwrap_or("localhost"),
            self.upstream.port.unwrap_or(5432)
        )
    }

    /// Where to connect: `hostaddr` (which skips name resolution) or the host, and the port.
    pub(crate) fn upstream_addr(&self) -> (&str, u16) {
        let upstream = &self.upstream;
        let host = upstream
            .hostaddr
            .as_deref()
            .or(upstream.host.as_deref())
            .unwrap_or("localhost");
        (host, upstream.port.unwrap_or(5432))
    }
}

/// The proxy's settings. [`Default`] gives the documented defaults and no instances.
#[derive(Clone)]
#[non_exhaustive]
pub struct ProxyConfig {
    /// The upstream servers, one listener (or socket) each.
    pub instances: Vec<Instance>,
    /// Most client sessions at once, over all instances; more are refused with SQLSTATE
    /// 53300. Cancel requests are always served.
    pub max_connections: usize,
    /// Limit for the TCP connect and TLS handshake to the upstream server.
    pub connect_timeout: Duration,
    /// Limit for a client's whole login: startup packets, local password and the upstream
    /// login.
    pub login_timeout: Duration,
    /// On shutdown, how long running sessions may go on before they are closed.
    pub drain_timeout: Duration,
    /// An HTTP address for `/healthz`, `/readyz` and `/metrics`.
    pub admin: Option<SocketAddr>,
    /// TLS for clients (after `SSLRequest`, or PostgreSQL 17 direct TLS) on TCP listeners.
    /// Without it, `SSLRequest` is answered `N`.
    pub client_tls: Option<Arc<rustls::ServerConfig>>,
    /// A password clients must give (cleartext, so use it with client TLS or on loopback).
    pub client_password: Option<Secret>,
    /// Listen on addresses other than loopback.
    pub allow_remote: bool,
    /// Permissions of Unix sockets.
    pub socket_mode: u32,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            instances: Vec::new(),
            max_connections: 1000,
            connect_timeout: Duration::from_secs(10),
            login_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            admin: None,
            client_tls: None,
            client_password: None,
            allow_remote: false,
            socket_mode: 0o600,
        }
    }
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("instances", &self.instances)
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("login_timeout", &self.login_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .field("admin", &self.admin)
            .field("client_tls", &self.client_tls.is_some())
            .field("client_password", &self.client_password)
            .field("allow_remote", &self.allow_remote)
            .field("socket_mode", &format_args!("{:o}", self.socket_mode))
            .finish()
    }
}

impl ProxyConfig {
    fn validate(&self) -> Result<(), ProxyError> {
        let config = |message: String| Err(ProxyError::Config(message));
        if self.instances.is_empty() {
            return config("no upstream server".into());
        }
        if self.max_connections == 0 {
            return config("max_connections must be at least 1".into());
        }
        for instance in &self.instances {
            if instance.upstream.host.is_none() {
                return config(format!("upstream {} has no host", instance.upstream_name()));
            }
            if instance.listen.is_none() && instance.unix_socket_dir.is_none() {
                return config(format!(
                    "upstream {} has neither a TCP address nor a Unix socket",
                    instance.upstream_name()
                ));
            }
            let remote = instance
                .listen
                .into_iter()
                .chain(self.admin)
                .find(|addr| !addr.ip().is_loopback());
            if let (Some(addr), false) = (remote, self.allow_remote) {
                return config(format!(
                    "{addr} is not a loopback address: anyone who can reach it would use your identity; pass --allow-remote (and set a client password) if you mean it"
                ));
            }
        }
        Ok(())
    }
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

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// What every session shares.
pub(crate) struct Shared {
    pub(crate) config: ProxyConfig,
    pub(crate) auth: EntraAuth,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) sessions: Arc<Semaphore>,
    /// Proxy-issued cancel key → the upstream's, and where to send it.
    pub(crate) cancel_keys: Mutex<HashMap<CancelKey, upstream::UpstreamKey>>,
    /// Operating-system user names that mean "no role chosen" (see the crate docs).
    pub(crate) local_users: Vec<String>,
    pub(crate) draining: AtomicBool,
    /// Set when the drain timeout has passed: relays still running end.
    pub(crate) kill: watch::Sender<bool>,
    /// Woken each time a client connection closes.
    closed: Notify,
}

impl Shared {
    /// Resolves once no client connection is open.
    async fn all_closed(&self) {
        loop {
            let closed = self.closed.notified();
            if self.metrics.connections_open() == 0 {
                return;
            }
            closed.await;
        }
    }

    /// A new proxy-issued key for a session's upstream key, from the OS's CSPRNG
    /// ([`pgentra_wire::random_cancel_key`]).
    pub(crate) fn issue_cancel_key(
        &self,
        upstream: upstream::UpstreamKey,
    ) -> std::io::Result<CancelKey> {
        loop {
            let ours = pgentra_wire::random_cancel_key()?;
            let mut keys = lock(&self.cancel_keys);
            if let std::collections::hash_map::Entry::Vacant(entry) = keys.entry(ours) {
                entry.insert(upstream);
                return Ok(ours);
            }
        }
    }

    pub(crate) fn forget_cancel_key(&self, key: &CancelKey) {
        lock(&self.cancel_keys).remove(key);
    }

    pub(crate) fn cancel_target(&self, key: &CancelKey) -> Option<upstream::UpstreamKey> {
        lock(&self.cancel_keys).get(key).cloned()
    }
}

/// Locks a mutex, recovering from a panic elsewhere (the maps stay consistent).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A proxy-issued `BackendKeyData`: a positive process ID and a 4-byte key.
pub(crate) type CancelKey = (i32, [u8; 4]);

/// Per-instance state: its settings and its upstream TLS.
pub(crate) struct InstanceState {
    pub(crate) instance: Instance,
    pub(crate) tls: tokio_rustls::TlsConnector,
    pub(crate) server_name: rustls::pki_types::ServerName<'static>,
}

impl Proxy {
    /// Checks the configuration and opens every listener (Unix sockets with the configured
    /// mode). Fails if any address is taken or not loopback (unless allowed).
    pub async fn bind(config: ProxyConfig, auth: EntraAuth) -> Result<Self, ProxyError> {
        config.validate()?;
        let mut listeners = Vec::new();
        for instance in &config.instances {
            let state = Arc::new(upstream::instance_state(instance.clone())?);
            if let Some(addr) = instance.listen {
                let listener =
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| ProxyError::Listen {
                            address: addr.to_string(),
                            source,
                        })?;
                listeners.push((Arc::clone(&state), Listener::Tcp(listener)));
            }
            if let Some(dir) = &instance.unix_socket_dir {
                let port = match (&listeners.last(), instance.listen) {
                    (Some((_, Listener::Tcp(tcp))), Some(_)) => {
                        tcp.local_addr().map(|a| a.port()).unwrap_or(5432)
                    }
                    _ => instance.upstream.port.unwrap_or(5432),
                };
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let listener = bind_unix(&path, config.socket_mode)?;
                listeners.push((state, Listener::Unix(listener, path)));
            }
        }
        let admin = match config.admin {
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| ProxyError::Listen {
                            address: addr.to_string(),
                            source,
                        })?,
                )
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            sessions: Arc::new(Semaphore::new(config.max_connections)),
            config,
            auth,
            metrics: Arc::default(),
            cancel_keys: Mutex::new(HashMap::new()),
            local_users: session::local_user_names(),
            draining: AtomicBool::new(false),
            kill: watch::Sender::new(false),
            closed: Notify::new(),
        });
        Ok(Self {
            shared,
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
        for (state, _) in &self.listeners {
            upstream::check(&self.shared, state).await?;
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
            let stop = stop_rx.clone();
            tasks.spawn(accept_loop(listener, state, shared, stop));
        }
        if let Some(admin) = self.admin {
            let shared = Arc::clone(&self.shared);
            let stop = stop_rx.clone();
            let trigger = stop_tx.clone();
            tasks.spawn(admin::serve(admin, shared, stop, trigger));
        }
        let mut stopped = stop_rx.clone();
        tokio::select! {
            () = shutdown => {}
            _ = stopped.wait_for(|stop| *stop) => {}
        }
        self.shared.draining.store(true, Ordering::SeqCst);
        let _ = stop_tx.send(true);
        // Listeners close as their loops end; sessions keep going.
        while tasks.join_next().await.is_some() {}
        let open = self.shared.metrics.connections_open();
        tracing::info!(
            open,
            limit = ?self.shared.config.drain_timeout,
            "draining: waiting for open sessions to finish"
        );
        let drained =
            tokio::time::timeout(self.shared.config.drain_timeout, self.shared.all_closed()).await;
        match drained {
            Ok(()) => tracing::info!("drained: every session has ended"),
            Err(_) => {
                tracing::warn!(
                    open = self.shared.metrics.connections_open(),
                    "drain timeout: closing the remaining sessions"
                );
                let _ = self.shared.kill.send(true);
                // The relays end at once; give them a moment to close their sockets.
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), self.shared.all_closed()).await;
            }
        }
    }
}

fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, ProxyError> {
    use std::os::unix::fs::PermissionsExt as _;
    let error = |source| ProxyError::Listen {
        address: path.display().to_string(),
        source,
    };
    // A socket left by an earlier run that did not clean up would make bind fail.
    if std::fs::symlink_metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt as _;
        m.file_type().is_socket()
    }) && std::os::unix::net::UnixStream::connect(path).is_err()
    {
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(error)?;
    Ok(listener)
}

async fn accept_loop(
    listener: Listener,
    state: Arc<InstanceState>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            accepted = accept(&listener) => accepted,
        };
        let client = match accepted {
            Ok(client) => client,
            Err(error) => {
                // Out of file descriptors and the like: keep serving the open sessions.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        shared.metrics.connection_opened();
        let shared = Arc::clone(&shared);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            session::serve(client, &state, &shared).await;
            shared.metrics.connection_closed();
            shared.closed.notify_waiters();
        });
    }
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
}

/// TCP keepalive for both sides of a session: a dead peer is noticed in about two minutes.
pub(crate) fn keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
}

async fn accept(listener: &Listener) -> std::io::Result<session::Client> {
    match listener {
        Listener::Tcp(tcp) => {
            let (stream, _) = tcp.accept().await?;
            let _ = stream.set_nodelay(true);
            // A client that vanished must not keep its upstream session open.
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive());
            Ok(session::Client::Tcp(stream))
        }
        Listener::Unix(unix, _) => Ok(session::Client::Unix(unix.accept().await?.0)),
    }
}
