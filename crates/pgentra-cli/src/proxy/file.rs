//! The `--config` file: the settings, the pool settings and the credential options by their
//! keys, `[[instance]]` tables (an upstream each, with its listener, roles and pool settings),
//! and the pool settings of `[databases.NAME]` and `[roles.NAME]` tables.

use super::settings::{PoolSettings, Settings};
use crate::auth::AuthArgs;
use crate::error::CliError;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// One `[[instance]]`: an upstream, and optionally its own listener and roles.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileInstance {
    pub(super) upstream: String,
    pub(super) listen: Option<SocketAddr>,
    pub(super) unix_socket: Option<PathBuf>,
    pub(super) user: Option<String>,
    pub(super) client_roles: Option<String>,
}

/// The TOML file: the settings, the credential options, `[[instance]]` tables (each with its
/// pool settings) and the pool settings of `[databases.NAME]` and `[roles.NAME]`.
#[derive(Debug, Default, Clone)]
pub(super) struct File {
    pub(super) settings: Settings,
    pub(super) pool: PoolSettings,
    pub(super) auth: AuthArgs,
    pub(super) instances: Vec<(FileInstance, PoolSettings)>,
    pub(super) databases: BTreeMap<String, PoolSettings>,
    pub(super) roles: BTreeMap<String, PoolSettings>,
}

/// The file at `path`, parsed.
pub(super) fn read(path: &Path) -> Result<File, CliError> {
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
pub(super) fn parse_file(text: &str) -> Result<File, String> {
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
