//! The proxy's settings: its upstream servers ([`Instance`]), limits and timeouts
//! ([`ProxyConfig`]), and the errors of setting it up ([`ProxyError`]).

use pgentra::Secret;
use pgentra::conninfo::ConnInfo;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Errors from setting up the proxy. (Session failures are logged, and reported to that client
/// only.)
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The configuration is not usable; the message says which setting.
    #[error("invalid proxy configuration: {0}")]
    Config(String),
    /// A listener could not be opened.
    #[error("could not listen on {address}")]
    Listen {
        /// The address or socket path.
        address: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Getting a token failed (from [`Proxy::check`](crate::Proxy::check)).
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

/// Which user names a client may pick its role with (see [the role rule](crate#the-role)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientRoles {
    /// None: every session uses the pinned role or the token's, whatever user name the client
    /// sends. libpq, pgjdbc and node-postgres send the client's operating-system user when none
    /// is configured, and that name says nothing about Entra roles.
    #[default]
    None,
    /// A client whose user name is one of these roles (a group the identity belongs to, say)
    /// logs in as it; other names get the token's role.
    Listed(Vec<String>),
    /// Any: a client's non-empty user name is always its role, as in PgBouncer; clients must
    /// name one.
    Any,
}

impl ClientRoles {
    /// Parses `*` (any), an empty list (none) or a comma-separated list of roles.
    ///
    /// ```
    /// use pgentra_proxy::ClientRoles;
    /// assert_eq!(ClientRoles::parse("*"), ClientRoles::Any);
    /// assert_eq!(ClientRoles::parse(""), ClientRoles::None);
    /// assert_eq!(ClientRoles::parse("readers, writers"), ClientRoles::Listed(vec!["readers".into(), "writers".into()]));
    /// ```
    pub fn parse(text: &str) -> Self {
        let roles: Vec<String> = text
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
            .collect();
        match roles.as_slice() {
            [] => Self::None,
            [any] if any == "*" => Self::Any,
            _ => Self::Listed(roles),
        }
    }

    /// The role a client that sent `user` may pick, if any.
    pub(crate) fn pick<'a>(&self, user: Option<&'a str>) -> Option<&'a str> {
        let user = user.filter(|u| !u.is_empty())?;
        match self {
            Self::None => None,
            Self::Listed(roles) => roles.iter().any(|r| r == user).then_some(user),
            Self::Any => Some(user),
        }
    }
}

/// How client sessions get server connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolMode {
    /// Each client session logs in a server connection of its own, closed with it: for
    /// clients that need a dedicated connection (or a replication one).
    None,
    /// A client gets a pooled server connection for its whole session; when it leaves, the
    /// connection is reset (`DISCARD ALL`) and kept for the next client (PgBouncer's
    /// `pool_mode = session`).
    #[default]
    Session,
    /// A client holds a pooled server connection only for each of its transactions: from its
    /// first message until the server is idle again (`ReadyForQuery` `I`); between
    /// transactions the connection serves other clients (PgBouncer's `pool_mode =
    /// transaction`). Prepared statements work; session state pins a client to its
    /// connection (see the README).
    Transaction,
}

impl std::str::FromStr for PoolMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "none" => Ok(Self::None),
            "session" => Ok(Self::Session),
            "transaction" => Ok(Self::Transaction),
            other => Err(format!(
                "pool mode {other:?}: use none, session or transaction"
            )),
        }
    }
}

impl PoolMode {
    /// The mode's name, as `--pool-mode` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Session => "session",
            Self::Transaction => "transaction",
        }
    }
}

/// How server connections are pooled. [`Default`] gives the documented defaults.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PoolConfig {
    /// The pool mode.
    pub mode: PoolMode,
    /// Server connections per pool: per upstream, role, database and the startup parameters
    /// that shape a session (20).
    pub size: usize,
    /// Idle server connections each pool keeps open (0); the pool of an instance's own role
    /// and database (when the upstream names one) is filled at start.
    pub min_idle: usize,
    /// Server connections per upstream over all its pools, to stay under the server's
    /// `max_connections` (0: no cap). At the cap, an idle connection of another pool is closed
    /// to make room.
    pub max_server_connections: usize,
    /// How long a server connection lives (1 h); never longer than the token it logged in with
    /// is valid, so a revoked identity loses access.
    pub server_lifetime: Duration,
    /// How long a server connection may stay idle before it is closed (10 min).
    pub idle_timeout: Duration,
    /// A connection idle longer than this is checked with an empty query before a client gets
    /// it (30 s); one the server closed is never handed out, whatever its age.
    pub check_delay: Duration,
    /// What resets a connection when its client leaves (`DISCARD ALL`; empty: none).
    pub reset_query: String,
    /// How long a client waits for a server connection when the pool is full (30 s, and
    /// never past its login timeout); then it gets SQLSTATE 53300.
    pub queue_timeout: Duration,
    /// In transaction pooling, how many statements the proxy keeps prepared on each server
    /// connection for its clients (200, as PgBouncer's `max_prepared_statements`); past it,
    /// the least recently used is closed, and prepared again when a client needs it.
    pub max_prepared_statements: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            mode: PoolMode::Session,
            size: 20,
            min_idle: 0,
            max_server_connections: 0,
            server_lifetime: Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(600),
            check_delay: Duration::from_secs(30),
            reset_query: "DISCARD ALL".into(),
            queue_timeout: Duration::from_secs(30),
            max_prepared_statements: 200,
        }
    }
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
    /// Which user names a client may pick its role with (none by default).
    pub client_roles: ClientRoles,
}

impl Instance {
    /// An instance listening on `listen`, with the role chosen by the [rule](crate#the-role).
    pub fn new(upstream: ConnInfo, listen: SocketAddr) -> Self {
        Self {
            upstream,
            listen: Some(listen),
            unix_socket_dir: None,
            user: None,
            client_roles: ClientRoles::None,
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
}

/// The proxy's settings. [`Default`] gives the documented defaults and no instances.
#[derive(Clone)]
#[non_exhaustive]
pub struct ProxyConfig {
    /// The upstream servers, one listener (or socket) each.
    pub instances: Vec<Instance>,
    /// Most client sessions at once, over all instances; more are refused with SQLSTATE
    /// 53300. A client takes its slot once it is authenticated; cancel requests need none.
    pub max_connections: usize,
    /// Limit for the TCP connect and TLS handshake to the upstream server.
    pub connect_timeout: Duration,
    /// Limit for a client's whole login: startup packets, local password, the token and the
    /// upstream login. A client still waiting for the proxy when it passes gets a `FATAL`.
    pub login_timeout: Duration,
    /// On shutdown, how long running sessions may go on before they are closed.
    pub drain_timeout: Duration,
    /// An HTTP address for `/healthz`, `/readyz`, `/metrics` and `POST /quitquitquit`.
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
    /// How server connections are pooled.
    pub pool: PoolConfig,
}

/// Clients that may be in the startup phase at once, at the least: the bound on connections
/// that have not authenticated (each for at most the login timeout), separate from
/// `max_connections` so that they cannot take the sessions' slots.
pub(crate) const MIN_PENDING_LOGINS: usize = 128;

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
            pool: PoolConfig::default(),
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
            .field("pool", &self.pool)
            .finish()
    }
}

impl ProxyConfig {
    /// How many clients may be in the startup phase at once.
    pub(crate) fn pending_logins(&self) -> usize {
        self.max_connections.max(MIN_PENDING_LOGINS)
    }

    pub(crate) fn validate(&self) -> Result<(), ProxyError> {
        let config = |message: String| Err(ProxyError::Config(message));
        if self.instances.is_empty() {
            return config("no upstream server".into());
        }
        if self.max_connections == 0 {
            return config("max_connections must be at least 1".into());
        }
        if self.pool.size == 0 {
            return config("the pool size must be at least 1".into());
        }
        if self.pool.max_prepared_statements == 0 {
            return config("max_prepared_statements must be at least 1".into());
        }
        if self.pool.min_idle > self.pool.size {
            return config(format!(
                "the minimum of idle server connections ({}) is more than the pool size ({})",
                self.pool.min_idle, self.pool.size
            ));
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

/// TCP keepalive for both sides of a session: a dead peer is noticed in about two minutes,
/// so a client that vanished does not keep its server connection open.
pub(crate) fn keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_picks_its_role_only_from_the_list() {
        let none = ClientRoles::None;
        assert_eq!(none.pick(Some("appuser")), None);
        let listed = ClientRoles::parse("readers");
        assert_eq!(listed.pick(Some("readers")), Some("readers"));
        assert_eq!(listed.pick(Some("appuser")), None);
        assert_eq!(listed.pick(Some("")), None);
        let any = ClientRoles::parse(" * ");
        assert_eq!(any.pick(Some("appuser")), Some("appuser"));
        assert_eq!(any.pick(Some("")), None);
        assert_eq!(any.pick(None), None);
    }
}
