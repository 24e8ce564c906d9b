//! The proxy's configuration from the merged settings, the file's instances and pool tables,
//! and the files they name (client TLS, the client password).

use super::DEFAULT_LISTEN;
use super::file::{File, FileInstance};
use super::settings::{PoolSettings, Settings};
use crate::error::CliError;
use pgentra::Secret;
use pgentra::conninfo::ConnInfo;
use pgentra_proxy::{ClientRoles, Instance, ProxyConfig};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// The proxy's configuration: the merged settings over the defaults, and the instances (the
/// upstreams named on the command line, then the file's) with the file's pool settings.
pub(super) fn config(
    upstreams: &[String],
    settings: &Settings,
    pool: &PoolSettings,
    file: &File,
) -> Result<ProxyConfig, CliError> {
    let mut config = ProxyConfig::default();
    config.instances = instances(upstreams, settings, file)?;
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
        config.client_password = Some(client_password(path)?);
    }
    Ok(config)
}

/// The instances: the upstreams named on the command line, then the file's, each with its
/// listener (the next port after the last, unless it names one), roles and pool settings.
fn instances(
    upstreams: &[String],
    settings: &Settings,
    file: &File,
) -> Result<Vec<Instance>, CliError> {
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
    let mut all = Vec::with_capacity(instances.len());
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
        all.push(instance);
    }
    Ok(all)
}

/// The client password: the first line of a file only its owner may read.
fn client_password(path: &Path) -> Result<Secret, CliError> {
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
    Ok(Secret::new(password))
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
    use super::super::file::parse_file;
    use super::*;
    use pgentra_proxy::PoolMode;
    use std::time::Duration;

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
