//! `pgentra proxy`: Entra ID logins for every PostgreSQL client, with no code, and a pool of
//! server connections between them.
//!
//! Every setting is defined once, in [`Settings`]: its flag, its `PGENTRA_PROXY_*` variable and
//! its key in the TOML file (`--config`). Flags win over variables, which win over the file,
//! which wins over the defaults.

use crate::Context;
use crate::auth::AuthArgs;
use crate::error::CliError;
use crate::output::{LogFormat, init_logging, shutdown_signal};
use crate::settings::{duration, settings};
use pgentra::Secret;
use pgentra::conninfo::ConnInfo;
use pgentra_proxy::{
    ClientRoles, Instance, PoolConfig, PoolMode, PoolOverrides, Proxy, ProxyConfig,
};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Listens locally and logs clients in to Azure Database for PostgreSQL with a fresh Entra ID
/// token over verified TLS, pooling the server connections.
#[derive(Debug, Default, clap::Args)]
pub(crate) struct Args {
    /// Upstream servers: a `postgres://` URL, `key=value` settings or a host name. The first
    /// listens on --listen, the next ones on the following ports. Default: the `PG*`
    /// variables.
    #[arg(
        value_name = "UPSTREAM",
        env = "PGENTRA_PROXY_UPSTREAM",
        value_delimiter = ','
    )]
    upstreams: Vec<String>,
    /// A TOML file with the same settings, in snake case, and `[[instance]]` tables (flags and
    /// variables win over it).
    #[arg(long, value_name = "FILE", env = "PGENTRA_PROXY_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
    #[command(flatten)]
    pool: PoolSettings,
    #[command(flatten)]
    auth: AuthArgs,
}

/// How to pool server connections, as `--pool-mode` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum PoolModeName {
    /// Each client session logs in a server connection of its own.
    None,
    /// A client gets a pooled server connection for its whole session.
    Session,
    /// A client gets a pooled server connection for each transaction.
    Transaction,
}

settings! {
    /// The proxy's settings: flags, `PGENTRA_PROXY_*` variables and file keys.
    struct Settings {
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
    struct PoolSettings {
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
        /// Disconnect a client that sent part of a message and then nothing this long, while it
        /// holds a server connection (FATAL 08006).
        #[arg(long, value_name = "TIME", value_parser = humantime::parse_duration, env = "PGENTRA_PROXY_CLIENT_STALL_TIMEOUT")]
        #[serde(default, deserialize_with = "duration")]
        client_stall_timeout: Duration,
    }
}

impl PoolSettings {
    /// These settings as overrides of the proxy's pool settings.
    fn overrides(&self) -> PoolOverrides {
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

/// One `[[instance]]`: an upstream, and optionally its own listener and roles.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileInstance {
    upstream: String,
    listen: Option<SocketAddr>,
    unix_socket: Option<PathBuf>,
    user: Option<String>,
    client_roles: Option<String>,
}

/// The TOML file: the settings, the credential options, `[[instance]]` tables (each with its
/// pool settings) and the pool settings of `[databases.NAME]` and `[roles.NAME]`.
#[derive(Debug, Default, Clone)]
struct File {
    settings: Settings,
    pool: PoolSettings,
    auth: AuthArgs,
    instances: Vec<(FileInstance, PoolSettings)>,
    databases: BTreeMap<String, PoolSettings>,
    roles: BTreeMap<String, PoolSettings>,
}

const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 5432);

pub(crate) fn run(args: &Args, context: Context) -> Result<ExitCode, CliError> {
    let file = match &args.config {
        Some(path) => read_file(path)?,
        None => File::default(),
    };
    let settings = args.settings.clone().or(file.settings.clone());
    let pool = args.pool.clone().or(file.pool.clone());
    let auth = args.auth.clone().or(file.auth.clone());
    // A service: its sessions are logged (info) unless RUST_LOG says otherwise.
    init_logging(
        context.verbose.max(1),
        settings.log_format.unwrap_or_default(),
    );
    let config = config(&args.upstreams, &settings, &pool, &file)?;
    let auth = auth.provider(None)?;
    let threads = settings
        .threads
        .unwrap_or_else(pgentra_proxy::default_threads);
    let runtime = pgentra_proxy::runtime(threads)?;
    let check = settings.check.unwrap_or(false);
    runtime.block_on(async {
        let shutdown = shutdown_signal();
        let proxy = Proxy::bind(config, auth).await?;
        if check {
            proxy.check().await?;
        }
        for addr in proxy.local_addrs() {
            tracing::info!(%addr, "listening; SIGTERM or Ctrl-C drains and stops");
        }
        proxy.run(shutdown).await;
        Ok::<_, CliError>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn read_file(path: &Path) -> Result<File, CliError> {
    let text = std::fs::read_to_string(path).map_err(|error| match error.kind() {
        // Bad input, not a failure to read it.
        std::io::ErrorKind::InvalidData => {
            CliError::Usage(format!("{}: the file is not UTF-8 text", path.display()))
        }
        _ => CliError::io(format!("reading {}", path.display()))(error),
    })?;
    parse_file(&text).map_err(|message| CliError::Usage(format!("{}: {message}", path.display())))
}

/// The file's settings: each key belongs to the settings, the pool settings or the credential
/// options (each defined once, there); `[[instance]]` tables add upstreams, and
/// `[databases.NAME]` and `[roles.NAME]` tables hold pool settings.
fn parse_file(text: &str) -> Result<File, String> {
    let message = |e: toml::de::Error| e.message().to_owned();
    let mut table: toml::Table = toml::from_str(text).map_err(message)?;
    let instances = match table.remove("instance") {
        Some(toml::Value::Array(tables)) => (tables.into_iter())
            .map(file_instance)
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("instance: use [[instance]] tables".into()),
        None => Vec::new(),
    };
    let databases = pool_tables(table.remove("databases"), "databases")?;
    let roles = pool_tables(table.remove("roles"), "roles")?;
    let (auth, rest) = partition(table, AuthArgs::KEYS);
    let (pool, settings) = partition(rest, PoolSettings::KEYS);
    if let Some(key) = settings
        .keys()
        .find(|key| !Settings::KEYS.contains(&key.as_str()))
    {
        return Err(format!("unknown setting {key:?}"));
    }
    Ok(File {
        settings: toml::Value::Table(settings).try_into().map_err(message)?,
        pool: toml::Value::Table(pool).try_into().map_err(message)?,
        auth: toml::Value::Table(auth).try_into().map_err(message)?,
        instances,
        databases,
        roles,
    })
}

/// The keys of `table` that are among `keys`, and the others.
fn partition(table: toml::Table, keys: &[&str]) -> (toml::Table, toml::Table) {
    table
        .into_iter()
        .partition(|(key, _)| keys.contains(&key.as_str()))
}

/// One `[[instance]]` table: the instance and its pool settings.
fn file_instance(value: toml::Value) -> Result<(FileInstance, PoolSettings), String> {
    let error = |e: toml::de::Error| format!("[[instance]]: {}", e.message());
    let toml::Value::Table(table) = value else {
        return Err("instance: use [[instance]] tables".into());
    };
    let (pool, own) = partition(table, PoolSettings::KEYS);
    Ok((
        toml::Value::Table(own).try_into().map_err(error)?,
        toml::Value::Table(pool).try_into().map_err(error)?,
    ))
}

/// `[databases.NAME]` or `[roles.NAME]` tables: pool settings by name.
fn pool_tables(
    value: Option<toml::Value>,
    what: &str,
) -> Result<BTreeMap<String, PoolSettings>, String> {
    let Some(value) = value else {
        return Ok(BTreeMap::new());
    };
    let toml::Value::Table(tables) = value else {
        return Err(format!("{what}: use [{what}.NAME] tables"));
    };
    (tables.into_iter())
        .map(|(name, settings)| {
            let settings = settings
                .try_into()
                .map_err(|e: toml::de::Error| format!("[{what}.{name}]: {}", e.message()))?;
            Ok((name, settings))
        })
        .collect()
}

/// The proxy's configuration: the merged settings over the defaults, and the instances (the
/// upstreams named on the command line, then the file's) with the file's pool settings.
fn config(
    upstreams: &[String],
    settings: &Settings,
    pool: &PoolSettings,
    file: &File,
) -> Result<ProxyConfig, CliError> {
    let mut config = ProxyConfig::default();
    let first_listen = settings.listen.unwrap_or(DEFAULT_LISTEN);
    let no_tcp = settings.no_tcp.unwrap_or(false);
    if no_tcp && settings.unix_socket.is_none() {
        return Err(CliError::Usage("--no-tcp needs --unix-socket".into()));
    }
    let mut instances: Vec<(FileInstance, PoolSettings)> = upstreams
        .iter()
        .map(|upstream| {
            let own = FileInstance {
                upstream: upstream.clone(),
                ..FileInstance::default()
            };
            (own, PoolSettings::default())
        })
        .chain(file.instances.iter().cloned())
        .collect();
    let env_default = ConnInfo::from_env()?;
    if instances.is_empty() {
        if env_default.host.is_none() {
            return Err(CliError::Usage(
                "no upstream server: give one (`pgentra proxy srv.postgres.database.azure.com`) or set PGHOST".into(),
            ));
        }
        instances.push(Default::default());
    }
    for (index, (own, own_pool)) in instances.into_iter().enumerate() {
        let info = parse_upstream(&own.upstream)?.or(env_default.clone());
        let port_offset = u16::try_from(index).unwrap_or(u16::MAX);
        let tcp = own.listen.unwrap_or_else(|| {
            // Port 0 (any free port) stays 0 for every instance.
            let port = match first_listen.port() {
                0 => 0,
                port => port.saturating_add(port_offset),
            };
            SocketAddr::new(first_listen.ip(), port)
        });
        let mut instance = Instance::new(info.clone(), first_listen);
        instance.listen = (!no_tcp).then_some(tcp);
        instance.unix_socket_dir = own.unix_socket.or_else(|| settings.unix_socket.clone());
        instance.user = own.user.or_else(|| settings.user.clone()).or(info.user);
        if let Some(roles) = own.client_roles.as_ref().or(settings.client_roles.as_ref()) {
            instance.client_roles = ClientRoles::parse(roles);
        }
        instance.pool = own_pool.overrides();
        config.instances.push(instance);
    }
    let defaults = ProxyConfig::default();
    config.max_connections = settings.max_connections.unwrap_or(defaults.max_connections);
    config.connect_timeout = settings.connect_timeout.unwrap_or(defaults.connect_timeout);
    config.login_timeout = settings.login_timeout.unwrap_or(defaults.login_timeout);
    config.drain_timeout = settings.drain_timeout.unwrap_or(defaults.drain_timeout);
    config.admin = settings.admin;
    config.allow_remote = settings.allow_remote.unwrap_or(false);
    config.max_server_connections = settings
        .max_server_connections
        .unwrap_or(defaults.max_server_connections);
    config.pool.apply(&pool.overrides());
    let overrides = |tables: &BTreeMap<String, PoolSettings>| {
        (tables.iter())
            .map(|(name, settings)| (name.clone(), settings.overrides()))
            .collect()
    };
    config.databases = overrides(&file.databases);
    config.roles = overrides(&file.roles);
    if let Some(mode) = &settings.socket_mode {
        config.socket_mode = u32::from_str_radix(mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|mode| *mode <= 0o777)
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "socket mode {mode:?} is not an octal mode like 600"
                ))
            })?;
    }
    config.client_tls = match (&settings.client_tls_cert, &settings.client_tls_key) {
        (Some(cert), Some(key)) => Some(client_tls(cert, key)?),
        (None, None) => None,
        _ => {
            return Err(CliError::Usage(
                "client TLS needs both a certificate and a key".into(),
            ));
        }
    };
    if let Some(path) = &settings.client_password_file {
        refuse_shared_secret_file(path)?;
        let text = std::fs::read_to_string(path)
            .map_err(CliError::io(format!("reading {}", path.display())))?;
        let password = text.lines().next().unwrap_or_default();
        if password.is_empty() {
            return Err(CliError::Usage(format!(
                "{} has no password on its first line",
                path.display()
            )));
        }
        config.client_password = Some(Secret::new(password));
    }
    Ok(config)
}

/// Refuses a secret file that others may read, as libpq refuses a `.pgpass` with group or
/// world access.
fn refuse_shared_secret_file(path: &Path) -> Result<(), CliError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .map_err(CliError::io(format!("reading {}", path.display())))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(CliError::Usage(format!(
            "{} has group or world access (mode {:o}); it holds the client password, so make it readable by its owner only: chmod 600 {}",
            path.display(),
            mode & 0o777,
            path.display()
        )));
    }
    Ok(())
}

/// An upstream given as a URL, `key=value` settings, or a bare host name.
fn parse_upstream(upstream: &str) -> Result<ConnInfo, CliError> {
    let upstream = upstream.trim();
    if upstream.is_empty() {
        return Ok(ConnInfo::default());
    }
    if upstream.contains("://") || upstream.contains('=') {
        return Ok(ConnInfo::parse(upstream)?);
    }
    let mut info = ConnInfo::default();
    match upstream.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => {
            info.host = Some(host.to_owned());
            info.port = port.parse().ok();
        }
        _ => info.host = Some(upstream.to_owned()),
    }
    Ok(info)
}

/// TLS for clients from PEM files, offering ALPN `postgresql` for direct TLS.
fn client_tls(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, CliError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let usage = |what: &Path, error: &dyn std::fmt::Display| {
        CliError::Usage(format!("{}: {error}", what.display()))
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| usage(cert, &e))?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| usage(key, &e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| usage(cert, &e))?
    .with_no_client_auth()
    .with_single_cert(chain, key_der)
    .map_err(|e| usage(cert, &e))?;
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_are_urls_settings_or_host_names() {
        let host = parse_upstream("srv.postgres.database.azure.com").unwrap();
        assert_eq!(
            host.host.as_deref(),
            Some("srv.postgres.database.azure.com")
        );
        let port = parse_upstream("localhost:6543").unwrap();
        assert_eq!(
            (port.host.as_deref(), port.port),
            (Some("localhost"), Some(6543))
        );
        let url = parse_upstream("postgres://srv/app?sslmode=verify-full").unwrap();
        assert_eq!(url.dbname.as_deref(), Some("app"));
        assert!(parse_upstream("postgres://srv/app?password=x").is_err());
    }

    #[test]
    fn the_file_fills_what_flags_leave_unset() {
        let file = parse_file(
            r#"
            listen = "127.0.0.1:6000"
            max_connections = 5
            drain_timeout = "3s"
            socket_mode = "660"
            pool_size = 4
            server_reset_query = ""
            credential = "AzureCliCredential"
            [[instance]]
            upstream = "host=a.example"
            [[instance]]
            upstream = "host=b.example"
            listen = "127.0.0.1:7000"
            user = "reporting"
            client_roles = "readers, writers"
            pool_mode = "transaction"
            [databases.orders]
            pool_size = 8
            query_timeout = "30s"
            [roles.reporting]
            pool_size = 2
            client_stall_timeout = "0"
            "#,
        )
        .unwrap();
        let flags = Settings {
            max_connections: Some(9),
            ..Settings::default()
        };
        let settings = flags.or(file.settings.clone());
        let config = config(&[], &settings, &file.pool, &file).unwrap();
        assert_eq!(config.max_connections, 9);
        assert_eq!(config.drain_timeout, Duration::from_secs(3));
        assert_eq!(config.socket_mode, 0o660);
        assert_eq!(
            (config.pool.size, config.pool.reset_query.as_str()),
            (4, "")
        );
        assert_eq!(file.auth.credential.as_deref(), Some("AzureCliCredential"));
        let listens: Vec<String> = config
            .instances
            .iter()
            .map(|i| i.listen.unwrap().to_string())
            .collect();
        assert_eq!(listens, ["127.0.0.1:6000", "127.0.0.1:7000"]);
        assert_eq!(config.instances[1].user.as_deref(), Some("reporting"));
        assert_eq!(config.instances[0].client_roles, ClientRoles::None);
        assert_eq!(
            config.instances[1].client_roles,
            ClientRoles::Listed(vec!["readers".into(), "writers".into()])
        );
        assert!(
            parse_file("nonsense = 1")
                .unwrap_err()
                .contains("unknown setting")
        );
        assert!(parse_file("[[instance]]\nupstream = \"x\"\nport = 1").is_err());
        assert!(parse_file("login_timeout = \"soon\"").is_err());
        let unknown = parse_file("[databases.app]\npool_sise = 1").unwrap_err();
        assert!(unknown.contains("[databases.app]"), "{unknown}");
        // The file's pool settings, resolved as they apply to each pool.
        let (a, b) = (&config.instances[0], &config.instances[1]);
        let orders = config.pool_settings(b, "orders", "app");
        assert_eq!(orders.mode, PoolMode::Transaction, "the instance's mode");
        assert_eq!(orders.size, 8, "the database's size");
        assert_eq!(orders.query_timeout, Some(Duration::from_secs(30)));
        let reporting = config.pool_settings(a, "orders", "reporting");
        assert_eq!((reporting.mode, reporting.size), (PoolMode::Session, 2));
        assert_eq!(
            reporting.client_stall_timeout, None,
            "0 turns a timeout off"
        );
        assert_eq!(config.pool_settings(a, "app", "app").size, 4);
    }
}
