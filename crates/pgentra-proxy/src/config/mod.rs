//! The proxy's settings: its upstream servers ([`Instance`]), limits and timeouts
//! ([`ProxyConfig`]), and the errors of setting it up ([`ProxyError`]).

mod pool;

pub(crate) use pool::humantime_like;
pub use pool::{PoolConfig, PoolMode, PoolOverrides, StateCheck};

use pgentra::Secret;
use pgentra::conninfo::ConnInfo;
use std::collections::BTreeMap;
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
    /// Pool settings of this instance's pools, over the proxy's.
    pub pool: PoolOverrides,
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
            pool: PoolOverrides::default(),
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
    /// Server connections per upstream over all its pools, to stay under the server's
    /// `max_connections` (0: no cap). At the cap, an idle connection of another pool is closed
    /// to make room.
    pub max_server_connections: usize,
    /// How server connections are pooled: each pool's settings, unless overridden.
    pub pool: PoolConfig,
    /// Pool settings for the pools of a database, by its name, over the instance's.
    pub databases: BTreeMap<String, PoolOverrides>,
    /// Pool settings for the pools of a role, by its name, over the database's.
    pub roles: BTreeMap<String, PoolOverrides>,
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
            max_server_connections: 0,
            pool: PoolConfig::default(),
            databases: BTreeMap::new(),
            roles: BTreeMap::new(),
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
            .field("max_server_connections", &self.max_server_connections)
            .field("pool", &self.pool)
            .field("databases", &self.databases)
            .field("roles", &self.roles)
            .finish()
    }
}

impl ProxyConfig {
    /// The settings of the pool of `role` and `database` on `instance`: the proxy's, then the
    /// instance's, the database's and the role's, each over the one before.
    pub fn pool_settings(&self, instance: &Instance, database: &str, role: &str) -> PoolConfig {
        let mut settings = self.pool.clone();
        settings.apply(&instance.pool);
        if let Some(overrides) = self.databases.get(database) {
            settings.apply(overrides);
        }
        if let Some(overrides) = self.roles.get(role) {
            settings.apply(overrides);
        }
        settings
    }

    /// The proxy-wide settings with a default, by name, as `--help` shows it; the pool
    /// settings' are in [`PoolConfig::defaults`].
    pub fn defaults() -> Vec<(&'static str, String)> {
        let defaults = Self::default();
        vec![
            ("max_connections", defaults.max_connections.to_string()),
            ("connect_timeout", humantime_like(defaults.connect_timeout)),
            ("login_timeout", humantime_like(defaults.login_timeout)),
            ("drain_timeout", humantime_like(defaults.drain_timeout)),
            ("socket_mode", format!("{:o}", defaults.socket_mode)),
            (
                "max_server_connections",
                defaults.max_server_connections.to_string(),
            ),
        ]
    }

    /// Each set of overrides, applied on the proxy's settings, must make a usable pool.
    fn validate_pools(&self) -> Result<(), String> {
        self.pool.validate("the pool settings")?;
        let instances = self
            .instances
            .iter()
            .map(|i| (format!("upstream {}", i.upstream_name()), &i.pool));
        let databases = (self.databases.iter()).map(|(name, o)| (format!("database {name}"), o));
        let roles = (self.roles.iter()).map(|(name, o)| (format!("role {name}"), o));
        for (whose, overrides) in instances.chain(databases).chain(roles) {
            let mut settings = self.pool.clone();
            settings.apply(overrides);
            settings.validate(&whose)?;
        }
        Ok(())
    }

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
        self.validate_pools().map_err(ProxyError::Config)?;
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
