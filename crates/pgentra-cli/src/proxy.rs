//! `pgentra proxy`: Entra ID logins for every PostgreSQL client, with no code.
//!
//! Settings come from flags, then `PGENTRA_PROXY_*` variables, then a TOML file (`--config`),
//! then the defaults.

use crate::Context;
use crate::auth::AuthArgs;
use crate::error::CliError;
use crate::output::{LogFormat, init_logging, shutdown_signal};
use pgentra::Secret;
use pgentra::conninfo::ConnInfo;
use pgentra_proxy::{ClientRoles, Instance, Proxy, ProxyConfig};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Listens locally and logs clients in to Azure Database for PostgreSQL with a fresh Entra ID
/// token over verified TLS.
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
    /// A TOML file with the same settings (flags and variables win over it).
    #[arg(long, value_name = "FILE", env = "PGENTRA_PROXY_CONFIG")]
    config: Option<PathBuf>,
    /// The TCP address of the first upstream's listener [default: 127.0.0.1:5432].
    #[arg(long, value_name = "ADDR", env = "PGENTRA_PROXY_LISTEN")]
    listen: Option<SocketAddr>,
    /// Also listen on a Unix socket in this directory (`.s.PGSQL.<port>`, mode 0600).
    #[arg(long, value_name = "DIR", env = "PGENTRA_PROXY_UNIX_SOCKET")]
    unix_socket: Option<PathBuf>,
    /// Listen on the Unix socket only, not on TCP.
    #[arg(long, env = "PGENTRA_PROXY_NO_TCP", requires = "unix_socket")]
    no_tcp: bool,
    /// Log every session in as this role, whatever the client asks for.
    #[arg(long, short = 'U', value_name = "ROLE", env = "PGENTRA_PROXY_USER")]
    user: Option<String>,
    /// Roles a client may pick with its user name (comma-separated, or `*` for any name);
    /// other names get the token's role [default: none].
    #[arg(long, value_name = "ROLES", env = "PGENTRA_PROXY_CLIENT_ROLES")]
    client_roles: Option<String>,
    /// Most client sessions at once [default: 1000].
    #[arg(long, value_name = "N", env = "PGENTRA_PROXY_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Limit for connecting to the upstream server [default: 10s].
    #[arg(long, value_parser = humantime::parse_duration, env = "PGENTRA_PROXY_CONNECT_TIMEOUT")]
    connect_timeout: Option<Duration>,
    /// Limit for a client's whole login [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration, env = "PGENTRA_PROXY_LOGIN_TIMEOUT")]
    login_timeout: Option<Duration>,
    /// On SIGTERM or SIGINT, how long running sessions may go on [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration, env = "PGENTRA_PROXY_DRAIN_TIMEOUT")]
    drain_timeout: Option<Duration>,
    /// HTTP address for /healthz, /readyz, /metrics and POST /quitquitquit.
    #[arg(long, value_name = "ADDR", env = "PGENTRA_PROXY_ADMIN")]
    admin: Option<SocketAddr>,
    /// Certificate chain (PEM) for TLS with clients; needs --client-tls-key.
    #[arg(
        long,
        value_name = "FILE",
        env = "PGENTRA_PROXY_CLIENT_TLS_CERT",
        requires = "client_tls_key"
    )]
    client_tls_cert: Option<PathBuf>,
    /// Private key (PEM) for TLS with clients.
    #[arg(
        long,
        value_name = "FILE",
        env = "PGENTRA_PROXY_CLIENT_TLS_KEY",
        requires = "client_tls_cert"
    )]
    client_tls_key: Option<PathBuf>,
    /// A file whose first line is a password clients must give.
    #[arg(long, value_name = "FILE", env = "PGENTRA_PROXY_CLIENT_PASSWORD_FILE")]
    client_password_file: Option<PathBuf>,
    /// Allow listening on non-loopback addresses (anyone who reaches them uses your identity).
    #[arg(long, env = "PGENTRA_PROXY_ALLOW_REMOTE")]
    allow_remote: bool,
    /// Unix socket permissions, in octal [default: 600].
    #[arg(long, value_name = "MODE", env = "PGENTRA_PROXY_SOCKET_MODE")]
    socket_mode: Option<String>,
    /// Worker threads [default: 1 with up to 2 cores, else one per core].
    #[arg(long, value_name = "N", env = "PGENTRA_PROXY_THREADS")]
    threads: Option<usize>,
    /// Log format on standard error.
    #[arg(long, value_enum, env = "PGENTRA_PROXY_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// Get a token and log in to every upstream once before serving; exit 1 if that fails.
    #[arg(long, env = "PGENTRA_PROXY_CHECK")]
    check: bool,
    #[command(flatten)]
    auth: AuthArgs,
}

/// The TOML file: the flags' names in snake case, plus `[[instance]]` tables.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<SocketAddr>,
    unix_socket: Option<PathBuf>,
    no_tcp: Option<bool>,
    user: Option<String>,
    client_roles: Option<String>,
    max_connections: Option<usize>,
    #[serde(default, with = "humantime_serde_opt")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    login_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    drain_timeout: Option<Duration>,
    admin: Option<SocketAddr>,
    client_tls_cert: Option<PathBuf>,
    client_tls_key: Option<PathBuf>,
    client_password_file: Option<PathBuf>,
    allow_remote: Option<bool>,
    socket_mode: Option<String>,
    threads: Option<usize>,
    log_format: Option<LogFormat>,
    check: Option<bool>,
    credential: Option<String>,
    #[serde(default)]
    instance: Vec<FileInstance>,
}

/// One `[[instance]]`: an upstream, and optionally its own listener and role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileInstance {
    upstream: String,
    listen: Option<SocketAddr>,
    unix_socket: Option<PathBuf>,
    user: Option<String>,
    client_roles: Option<String>,
}

impl FileInstance {
    /// An upstream named on the command line, with the shared listener settings.
    fn new(upstream: &str) -> Self {
        Self {
            upstream: upstream.to_owned(),
            listen: None,
            unix_socket: None,
            user: None,
            client_roles: None,
        }
    }
}

/// Durations in the file are strings like `30s`.
mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| humantime::parse_duration(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

const DEFAULT_LISTEN: &str = "127.0.0.1:5432";

pub(crate) fn run(args: &Args, context: Context) -> Result<ExitCode, CliError> {
    let file = match &args.config {
        Some(path) => read_file(path)?,
        None => File::default(),
    };
    // A service: its sessions are logged (info) unless RUST_LOG says otherwise.
    init_logging(
        context.verbose.max(1),
        args.log_format.or(file.log_format).unwrap_or_default(),
    );
    let config = config(args, &file)?;
    let mut auth_args = args.auth.clone();
    auth_args.credential = auth_args.credential.or_else(|| file.credential.clone());
    let auth = auth_args.provider(None)?;
    let threads = args
        .threads
        .or(file.threads)
        .unwrap_or_else(pgentra_proxy::default_threads);
    let runtime = pgentra_proxy::runtime(threads).map_err(proxy_error)?;
    let check = args.check || file.check.unwrap_or(false);
    runtime.block_on(async {
        let shutdown = shutdown_signal();
        let proxy = Proxy::bind(config, auth).await.map_err(proxy_error)?;
        if check {
            proxy.check().await.map_err(proxy_error)?;
        }
        for addr in proxy.local_addrs() {
            tracing::info!(%addr, "listening; SIGTERM or Ctrl-C drains and stops");
        }
        proxy.run(shutdown).await;
        Ok::<_, CliError>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn proxy_error(error: pgentra_proxy::ProxyError) -> CliError {
    match error {
        pgentra_proxy::ProxyError::Config(message) => CliError::Usage(message),
        other => CliError::Failed(other.to_string()),
    }
}

fn read_file(path: &Path) -> Result<File, CliError> {
    let text = std::fs::read_to_string(path).map_err(|error| match error.kind() {
        // Bad input, not a failure to read it.
        std::io::ErrorKind::InvalidData => {
            CliError::Usage(format!("{}: the file is not UTF-8 text", path.display()))
        }
        _ => CliError::io(format!("reading {}", path.display()))(error),
    })?;
    toml::from_str(&text)
        .map_err(|error| CliError::Usage(format!("{}: {}", path.display(), error.message())))
}

/// The proxy's configuration: flags and variables over the file over the defaults.
fn config(args: &Args, file: &File) -> Result<ProxyConfig, CliError> {
    let mut config = ProxyConfig::default();
    let listen = args.listen.or(file.listen);
    let unix_socket = args
        .unix_socket
        .clone()
        .or_else(|| file.unix_socket.clone());
    let no_tcp = args.no_tcp || file.no_tcp.unwrap_or(false);
    let user = args.user.clone().or_else(|| file.user.clone());
    let client_roles = args
        .client_roles
        .clone()
        .or_else(|| file.client_roles.clone());
    let first_listen: SocketAddr = listen.unwrap_or_else(|| {
        DEFAULT_LISTEN
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 5432)))
    });
    // Flags and variables name upstreams in order; the file's instances come after them.
    let mut upstreams: Vec<FileInstance> = args
        .upstreams
        .iter()
        .map(|upstream| FileInstance::new(upstream))
        .chain(file.instance.iter().cloned())
        .collect();
    let env_default = ConnInfo::from_env()?;
    if upstreams.is_empty() {
        if env_default.host.is_none() {
            return Err(CliError::Usage(
                "no upstream server: give one (`pgentra proxy srv.postgres.database.azure.com`) or set PGHOST".into(),
            ));
        }
        upstreams.push(FileInstance::new(""));
    }
    for (index, own) in upstreams.into_iter().enumerate() {
        let info = parse_upstream(&own.upstream)?.or(env_default.clone());
        let port_offset = u16::try_from(index).unwrap_or(u16::MAX);
        let tcp = own.listen.or_else(|| {
            let port = first_listen.port();
            // Port 0 (any free port) stays 0 for every instance.
            let port = if port == 0 {
                0
            } else {
                port.saturating_add(port_offset)
            };
            Some(SocketAddr::new(first_listen.ip(), port))
        });
        let mut instance = Instance::new(info.clone(), first_listen);
        instance.listen = if no_tcp { None } else { tcp };
        instance.unix_socket_dir = own.unix_socket.or_else(|| unix_socket.clone());
        instance.user = own.user.or_else(|| user.clone()).or(info.user);
        if let Some(roles) = own.client_roles.as_ref().or(client_roles.as_ref()) {
            instance.client_roles = ClientRoles::parse(roles);
        }
        config.instances.push(instance);
    }
    if let Some(n) = args.max_connections.or(file.max_connections) {
        config.max_connections = n;
    }
    if let Some(d) = args.connect_timeout.or(file.connect_timeout) {
        config.connect_timeout = d;
    }
    if let Some(d) = args.login_timeout.or(file.login_timeout) {
        config.login_timeout = d;
    }
    if let Some(d) = args.drain_timeout.or(file.drain_timeout) {
        config.drain_timeout = d;
    }
    config.admin = args.admin.or(file.admin);
    config.allow_remote = args.allow_remote || file.allow_remote.unwrap_or(false);
    if let Some(mode) = args.socket_mode.as_ref().or(file.socket_mode.as_ref()) {
        config.socket_mode = u32::from_str_radix(mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|mode| *mode <= 0o777)
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "socket mode {mode:?} is not an octal mode like 600"
                ))
            })?;
    }
    let cert = args
        .client_tls_cert
        .as_ref()
        .or(file.client_tls_cert.as_ref());
    let key = args
        .client_tls_key
        .as_ref()
        .or(file.client_tls_key.as_ref());
    config.client_tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(client_tls(cert, key)?),
        (None, None) => None,
        _ => {
            return Err(CliError::Usage(
                "client TLS needs both a certificate and a key".into(),
            ));
        }
    };
    if let Some(path) = args
        .client_password_file
        .as_ref()
        .or(file.client_password_file.as_ref())
    {
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
        let file: File = toml::from_str(
            r#"
            listen = "127.0.0.1:6000"
            max_connections = 5
            drain_timeout = "3s"
            socket_mode = "660"
            [[instance]]
            upstream = "host=a.example"
            [[instance]]
            upstream = "host=b.example"
            listen = "127.0.0.1:7000"
            user = "reporting"
            client_roles = "readers, writers"
            "#,
        )
        .unwrap();
        let args = Args {
            max_connections: Some(9),
            ..Args::default()
        };
        let config = config(&args, &file).unwrap();
        assert_eq!(config.max_connections, 9);
        assert_eq!(config.drain_timeout, Duration::from_secs(3));
        assert_eq!(config.socket_mode, 0o660);
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
        assert!(toml::from_str::<File>("nonsense = 1").is_err());
    }
}
