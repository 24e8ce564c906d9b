//! The proxy's settings, each defined once: its flag, its `PGENTRA_PROXY_*` variable and its
//! key in the TOML file; the pool's in [`PoolSettings`], which the file's `[databases.NAME]`,
//! `[roles.NAME]` and `[[instance]]` tables may also set. Defaults come from the library's own
//! ([`with_defaults`] shows them in `--help`).

use super::DEFAULT_LISTEN;
use crate::output::LogFormat;
use crate::settings::{duration, settings};
use pgentra_proxy::{PoolConfig, PoolMode, PoolOverrides, ProxyConfig, StateCheck};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How to pool server connections, as `--pool-mode` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum PoolModeName {
    /// Each client session logs in a server connection of its own.
    None,
    /// A client gets a pooled server connection for its whole session.
    Session,
    /// A client gets a pooled server connection for each transaction.
    Transaction,
}

/// When to check a server connection's state, as `--state-check` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum StateCheckName {
    /// After code the proxy cannot read: a server-defined function, `DO`, `CALL`.
    Opaque,
    /// After every transaction.
    Always,
}

settings! {
    /// The proxy's settings: flags, `PGENTRA_PROXY_*` variables and file keys.
    pub(super) struct Settings {
        /// The TCP address of the first upstream's listener.
        #[arg(long, value_name = "ADDR", env = "PGENTRA_PROXY_LISTEN")]
        listen: SocketAddr,
        /// Also listen on a Unix socket in this directory (`.s.PGSQL.<port>`, mode 0600).
        #[arg(long, value_name = "DIR", env = "PGENTRA_PROXY_UNIX_SOCKET")]
        unix_socket: PathBuf,
        /// Listen on the Unix socket only, not on TCP.
        #[arg(long, env = "PGENTRA_PROXY_NO_TCP", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = clap::builder::FalseyValueParser::new())]
        no_tcp: bool,
        /// Log every session in as this role, whatever the client asks for [default: the
        /// token's role].
        #[arg(short = 'U', long, value_name = "ROLE", env = "PGENTRA_PROXY_USER")]
        user: String,
        /// Roles a client may pick with its user name (comma-separated, or `*` for any name);
        /// other names get the token's role [default: none].
        #[arg(long, value_name = "ROLES", env = "PGENTRA_PROXY_CLIENT_ROLES")]
        client_roles: String,
        /// Most authenticated client sessions at once; more get SQLSTATE 53300.
        #[arg(long, value_name = "N", env = "PGENTRA_PROXY_MAX_CONNECTIONS")]
        max_connections: usize,
        /// Limit for connecting to the upstream server (TCP and TLS).
        #[arg(long, value_name = "TIME", value_parser = humantime::parse_duration, env = "PGENTRA_PROXY_CONNECT_TIMEOUT")]
        #[serde(default, deserialize_with = "duration")]
        connect_timeout: Duration,
        /// Limit for a client's whole login.
        #[arg(long, value_name = "TIME", value_parser = humantime::parse_duration, env = "PGENTRA_PROXY_LOGIN_TIMEOUT")]
        #[serde(default, deserialize_with = "duration")]
        login_timeout: Duration,
        /// On SIGTERM or SIGINT, how long running sessions may go on.
        #[arg(long, value_name = "TIME", value_parser = humantime::parse_duration, env = "PGENTRA_PROXY_DRAIN_TIMEOUT")]
        #[serde(default, deserialize_with = "duration")]
        drain_timeout: Duration,
        /// Server connections per upstream over all its pools, to stay under its
        /// max_connections (0: no cap).
        #[arg(long, value_name = "N", env = "PGENTRA_PROXY_MAX_SERVER_CONNECTIONS")]
        max_server_connections: usize,
        /// HTTP address for /healthz, /readyz, /metrics, /pools and POST /quitquitquit.
        #[arg(long, value_name = "ADDR", env = "PGENTRA_PROXY_ADMIN")]
        admin: SocketAddr,
        /// Certificate chain (PEM) for TLS with clients; needs --client-tls-key.
        #[arg(long, value_name = "FILE", env = "PGENTRA_PROXY_CLIENT_TLS_CERT")]
        client_tls_cert: PathBuf,
        /// Private key (PEM) for TLS with clients.
        #[arg(long, value_name = "FILE", env = "PGENTRA_PROXY_CLIENT_TLS_KEY")]
        client_tls_key: PathBuf,
        /// A file, readable by its owner only, whose first line is a password clients must give.
        #[arg(long, value_name = "FILE", env = "PGENTRA_PROXY_CLIENT_PASSWORD_FILE")]
        client_password_file: PathBuf,
        /// Allow listening on non-loopback addresses (anyone who reaches them uses your identity).
        #[arg(long, env = "PGENTRA_PROXY_ALLOW_REMOTE", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = clap::builder::FalseyValueParser::new())]
        allow_remote: bool,
        /// Unix socket permissions, in octal.
        #[arg(long, value_name = "MODE", env = "PGENTRA_PROXY_SOCKET_MODE")]
        socket_mode: String,
        /// Worker threads, 1 to 1024 [default: 1 with up to 2 cores, else one per core].
        #[arg(long, value_name = "N", env = "PGENTRA_PROXY_THREADS")]
        threads: usize,
        /// Log format on standard error [default: text].
        #[arg(long, value_enum, env = "PGENTRA_PROXY_LOG_FORMAT")]
        log_format: LogFormat,
        /// Get a token and log in to every upstream once before serving; exit 1 if that fails.
        #[arg(long, env = "PGENTRA_PROXY_CHECK", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = clap::builder::FalseyValueParser::new())]
        check: bool,
    }
}

settings! {
    /// The settings of a pool, which `[databases.NAME]`, `[roles.NAME]` and `[[instance]]`
    /// tables of the file may also set (a role's over a database's over an instance's over
    /// these). A timeout of 0 is off.
    pub(super) struct PoolSettings {
        /// How client sessions get server connections: `session` (pooled, reset between
        /// clients), `transaction` (pooled, per transaction) or `none` (each its own).
        #[arg(long, value_enum, env = "PGENTRA_PROXY_POOL_MODE")]
        pool_mode: PoolModeName,
        /// Server connections per pool: per upstream, role, database and session-shaping
        /// startup parameters.
        #[arg(long, value_name = "N", env = "PGENTRA_PROXY_POOL_SIZE")]
        pool_size: usize,
        /// Idle server connections each pool keeps open.
        #[arg(long, value_name = "N", env = "PGENTRA_PROXY_MIN_POOL_SIZE")]
        min_pool_size: usize,
        /// How long a server connection lives, and never past its token's expiry.
        #[arg(long, value_name = "TIME", value_parser = humantime::parse_duration, env = "PGENTRA_PROXY_SERVER_LIFETIME")]
        #[serde(default, deserialize_with = "duration")]
        server_lifetime: Duration,
        /// How long a server connection may stay idle before it is closed.
        #[arg(long, value_name = "TIME", value_parser = humantime::parse_duration, env = "PGENTRA_PROXY_SERVER_IDLE_TIMEOUT")]
        #[serde(default, deserialize_with = "duration")]
        server_idle_timeout: Duration,
        /// Check a server connection idle this long before handing it out.
        #[arg(long, value_name = "TIME", value_parser = humantime::parse_duration, env = "PGENTRA_PROXY_SERVER_CHECK_DELAY")]
        #[serde(default, deserialize_with = "duration")]
        server_check_delay: Duration,
        /// What resets a server connection when its client leaves (empty: nothing).
        #[arg(long, value_name = "SQL", env = "PGENTRA_PROXY_SERVER_RESET_QUERY")]
        server_reset_query: String,
        /// How long a client waits for a server connection when its pool is full; then
        /// SQLSTATE 53300.
        #[arg(long, value_name = "TIME", value_parser = humantime::parse_duration, env = "PGENTRA_PROXY_QUEUE_TIMEOUT")]
        #[serde(default, deserialize_with = "duration")]
        queue_timeout: Duration,
        /// In transaction pooling, statements kept prepared on each server connection for
        /// clients; past it the least recently used is closed.
        #[arg(long, value_name = "N", env = "PGENTRA_PROXY_MAX_PREPARED_STATEMENTS")]
        max_prepared_statements: usize,
        /// Disconnect a client idle between transactions this long (FATAL 57P05).
        #[arg(long, value_name = "TIME", value_parser = humantime::parse_duration, env = "PGENTRA_PROXY_CLIENT_IDLE_TIMEOUT")]
        #[serde(default, deserialize_with = "duration")]
        client_idle_timeout: Duration,
        /// Disconnect a client idle inside a transaction this long, rolling it back (FATAL
        /// 25P03).
        #[arg(long, value_name = "TIME", value_parser = humantime::parse_duration, env = "PGENTRA_PROXY_IDLE_TRANSACTION_TIMEOUT")]
        #[serde(default, deserialize_with = "duration")]
        idle_transaction_timeout: Duration,
        /// Cancel a query that runs this long (the client gets 57014).
        #[arg(long, value_name = "TIME", value_parser = humantime::parse_duration, env = "PGENTRA_PROXY_QUERY_TIMEOUT")]
        #[serde(default, deserialize_with = "duration")]
        query_timeout: Duration,
        /// End a session whose transaction runs this long (FATAL 25P04).
        #[arg(long, value_name = "TIME", value_parser = humantime::parse_duration, env = "PGENTRA_PROXY_TRANSACTION_TIMEOUT")]
        #[serde(default, deserialize_with = "duration")]
        transaction_timeout: Duration,
        /// In transaction pooling, check a server connection's session state on the server
        /// before it goes back: `opaque` (after code the proxy cannot read: a server-defined
        /// function, `DO`, `CALL`) or `always` (also what views and triggers run).
        #[arg(long, value_enum, env = "PGENTRA_PROXY_STATE_CHECK")]
        state_check: StateCheckName,
        /// Disconnect a client that sent part of a message and then nothing this long, while it
        /// holds a server connection (FATAL 08006).
        #[arg(long, value_name = "TIME", value_parser = humantime::parse_duration, env = "PGENTRA_PROXY_CLIENT_STALL_TIMEOUT")]
        #[serde(default, deserialize_with = "duration")]
        client_stall_timeout: Duration,
    }
}

impl PoolSettings {
    /// These settings as overrides of the proxy's pool settings.
    pub(super) fn overrides(&self) -> PoolOverrides {
        // 0 turns a timeout off.
        let timeout = |t: Option<Duration>| t.map(|t| Some(t).filter(|t| !t.is_zero()));
        let mut overrides = PoolOverrides::default();
        overrides.mode = self.pool_mode.map(PoolModeName::mode);
        overrides.size = self.pool_size;
        overrides.min_idle = self.min_pool_size;
        overrides.server_lifetime = self.server_lifetime;
        overrides.idle_timeout = self.server_idle_timeout;
        overrides.check_delay = self.server_check_delay;
        overrides.reset_query.clone_from(&self.server_reset_query);
        overrides.queue_timeout = self.queue_timeout;
        overrides.max_prepared_statements = self.max_prepared_statements;
        overrides.state_check = self.state_check.map(|check| match check {
            StateCheckName::Opaque => StateCheck::Opaque,
            StateCheckName::Always => StateCheck::Always,
        });
        overrides.client_idle_timeout = timeout(self.client_idle_timeout);
        overrides.idle_transaction_timeout = timeout(self.idle_transaction_timeout);
        overrides.query_timeout = timeout(self.query_timeout);
        overrides.transaction_timeout = timeout(self.transaction_timeout);
        overrides.client_stall_timeout = timeout(self.client_stall_timeout);
        overrides
    }
}

impl PoolModeName {
    fn mode(self) -> PoolMode {
        match self {
            Self::None => PoolMode::None,
            Self::Session => PoolMode::Session,
            Self::Transaction => PoolMode::Transaction,
        }
    }
}

/// `pgentra proxy --help` with each setting's default, from the library's own defaults (so
/// that each is written once).
pub(crate) fn with_defaults(command: clap::Command) -> clap::Command {
    command.mut_subcommand("proxy", |mut proxy| {
        let listen = ("listen", DEFAULT_LISTEN.to_string());
        let defaults = ProxyConfig::defaults()
            .into_iter()
            .chain(PoolConfig::defaults());
        for (key, shown) in defaults.chain([listen]) {
            let shown = if shown.is_empty() {
                "nothing".to_owned()
            } else {
                shown
            };
            proxy = proxy.mut_arg(key, |arg| {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                arg.help(format!("{help} [default: {shown}]"))
            });
        }
        proxy
    })
}
