//! [sqlx](https://docs.rs/sqlx) (PostgreSQL): pools whose connect options are kept fresh.
//!
//! A sqlx pool holds one shared `PgConnectOptions` and has no per-connection password hook
//! (sqlx issues #445 and #3117). pgentra therefore runs a **refresher**: it subscribes to the
//! provider and pushes each new token into the pool with `Pool::set_connect_options` as soon as
//! it is fetched, which the provider does well before the previous token expires. Every
//! connection the pool opens, at any time, carries a valid token.
//!
//! The refresher runs as a tokio task while its [`RefreshGuard`] lives. It ends by itself when
//! the pool is closed, and when the guard is dropped; keep the guard as long as the pool.
//!
//! **Never log `PgConnectOptions`**: its `Debug` prints the password, that is, the token.
//!
//! TLS: `sslmode` maps to sqlx's `PgSslMode` (`verify-full` by default) and `sslrootcert` to
//! `ssl_root_cert`. sqlx's `require` does not verify the server even with a root certificate:
//! use `verify-full` with the emulator's CA. The roots and the TLS backend come from the sqlx
//! TLS feature your application enables (for example `tls-rustls-aws-lc-rs`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use pgentra::sqlx::SqlxConnector;
//! let auth = pgentra::EntraAuth::from_env()?;
//! let connector = SqlxConnector::from_url(auth, "postgres://srv.postgres.database.azure.com/app")?;
//! let (pool, _refresher) = connector.pool(sqlx::postgres::PgPoolOptions::new().max_connections(10)).await?;
//! let user: String = sqlx::query_scalar("SELECT current_user::text").fetch_one(&pool).await?;
//! # let _ = user; Ok(()) }
//! ```

use crate::conninfo::ConnInfo;
use crate::error::{Error, Result};
use crate::provider::{DbCredentials, EntraAuth};
use crate::tls::SslMode;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};

/// Builds sqlx connect options with fresh credentials, and pools that stay fresh.
#[derive(Clone)]
pub struct SqlxConnector {
    auth: EntraAuth,
    base: PgConnectOptions,
    /// A role chosen by the connection settings, which wins over the token's.
    user: Option<String>,
}

impl std::fmt::Debug for SqlxConnector {
    // Not the options: their Debug prints the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlxConnector")
            .field("auth", &self.auth)
            .field("host", &self.base.get_host())
            .field("port", &self.base.get_port())
            .field("database", &self.base.get_database())
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl SqlxConnector {
    /// A connector for parsed connection settings.
    pub fn new(auth: EntraAuth, info: &ConnInfo) -> Result<Self> {
        Ok(Self {
            auth,
            base: options_from(info)?,
            user: info.user.clone(),
        })
    }

    /// A connector for a `postgres://` URL or libpq `key=value` string; unset settings come from
    /// the process's libpq environment (`PGHOST`, `PGDATABASE`, ...; see
    /// [`ConnInfo::or`] for which of them apply to another host). No `.env` file is read.
    pub fn from_url(auth: EntraAuth, url: &str) -> Result<Self> {
        Self::new(auth, &ConnInfo::parse(url)?.or(ConnInfo::from_env()?))
    }

    /// A connector for the process's libpq environment alone (no `.env` file; for one, pass
    /// [`ConnInfo::from_env_with_dotenv`] to [`new`](Self::new)).
    pub fn from_env(auth: EntraAuth) -> Result<Self> {
        Self::new(auth, &ConnInfo::from_env()?)
    }

    /// A connector for options you built; `user` (if any) wins over the token's role. Their
    /// password is replaced by the token.
    pub fn from_options(auth: EntraAuth, base: PgConnectOptions, user: Option<String>) -> Self {
        Self { auth, base, user }
    }

    /// The provider.
    pub fn auth(&self) -> &EntraAuth {
        &self.auth
    }

    /// The base options with `creds` as user (unless the settings chose one) and password.
    pub fn options_with(&self, creds: &DbCredentials) -> PgConnectOptions {
        self.base
            .clone()
            .username(self.user.as_deref().unwrap_or_else(|| creds.user()))
            .password(creds.password().expose_secret())
    }

    /// One-shot options for a single connection, with the current credentials.
    pub async fn connect_options(&self) -> Result<PgConnectOptions> {
        Ok(self.options_with(&self.auth.credentials().await?))
    }

    /// A pool (one connection is opened to check the settings) whose options the returned
    /// refresher keeps fresh. Keep the [`RefreshGuard`] as long as the pool.
    pub async fn pool(&self, options: PgPoolOptions) -> Result<(PgPool, RefreshGuard)> {
        let pool = options
            .connect_with(self.connect_options().await?)
            .await
            .map_err(Error::connect)?;
        let guard = self.attach(&pool);
        Ok((pool, guard))
    }

    /// Keeps the options of a pool you built fresh from now on. Must be called inside a tokio
    /// runtime (sqlx's, with the `runtime-tokio` feature).
    pub fn attach(&self, pool: &PgPool) -> RefreshGuard {
        let connector = self.clone();
        let pool = pool.clone();
        let mut tokens = self.auth.subscribe();
        let task = tokio::spawn(async move {
            // The token the pool may have been built with is already current; push any newer
            // one as it arrives.
            tokens.borrow_and_update();
            let mut closed = pool.close_event();
            let refresh = async {
                while tokens.changed().await.is_ok() {
                    let creds = tokens.borrow_and_update().clone();
                    if let Some(creds) = creds {
                        pool.set_connect_options(connector.options_with(&creds));
                        tracing::debug!(
                            user = creds.user(),
                            "pushed a new token into the sqlx pool"
                        );
                    }
                }
            };
            // Ends when the pool is closed (or the provider is gone).
            let _ = closed.do_until(refresh).await;
        });
        RefreshGuard { task }
    }
}

/// Keeps a pool's connect options fresh while it lives; see the [module docs](self).
#[must_use = "the refresher stops when the guard is dropped"]
#[derive(Debug)]
pub struct RefreshGuard {
    task: tokio::task::JoinHandle<()>,
}

impl RefreshGuard {
    /// Whether the refresher has ended (its pool was closed).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits until the refresher has ended (after the pool is closed).
    pub async fn finished(mut self) {
        let _ = (&mut self.task).await;
    }
}

impl Drop for RefreshGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// sqlx connect options from connection settings, without user or password.
pub(crate) fn options_from(info: &ConnInfo) -> Result<PgConnectOptions> {
    // Not `PgConnectOptions::new()`: it would read `~/.pgpass`.
    let mut options = PgConnectOptions::new_without_pgpass();
    let host = info
        .host
        .as_deref()
        .or(info.hostaddr.as_deref())
        .ok_or_else(|| Error::conninfo("no host: give one in the URL or set PGHOST"))?;
    options = options.host(host);
    if let Some(port) = info.port {
        options = options.port(port);
    }
    if let Some(dbname) = &info.dbname {
        options = options.database(dbname);
    }
    if let Some(name) = &info.application_name {
        options = options.application_name(name);
    }
    options = options.ssl_mode(match info.sslmode.unwrap_or_default() {
        SslMode::Require => PgSslMode::Require,
        SslMode::VerifyCa => PgSslMode::VerifyCa,
        _ => PgSslMode::VerifyFull,
    });
    if let Some(root) = &info.sslrootcert {
        options = options.ssl_root_cert(root);
    }
    for (key, value) in &info.params {
        match key.as_str() {
            "options" => {
                // `-c name=value` settings, as libpq passes them.
                for setting in value.split_whitespace().filter(|s| *s != "-c") {
                    let setting = setting.trim_start_matches("-c");
                    let (name, value) = setting.split_once('=').ok_or_else(|| {
                        Error::conninfo(format!("options {value:?}: expected -c name=value"))
                    })?;
                    options = options.options([(name, value)]);
                }
            }
            other => {
                return Err(Error::conninfo(format!(
                    "connection parameter {other:?} is not supported by pgentra's sqlx integration"
                )));
            }
        }
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_settings_become_sqlx_options() {
        let info = ConnInfo::parse(
            "postgres://srv.example.com:6432/app?sslrootcert=/ca.pem&application_name=svc&options=-c%20statement_timeout%3D5s",
        )
        .unwrap();
        let options = options_from(&info).unwrap();
        assert_eq!(options.get_host(), "srv.example.com");
        assert_eq!(options.get_port(), 6432);
        assert_eq!(options.get_database(), Some("app"));
        assert_eq!(options.get_application_name(), Some("svc"));
        assert!(matches!(options.get_ssl_mode(), PgSslMode::VerifyFull));
        assert_eq!(options.get_options(), Some("-c statement_timeout=5s"));
    }

    #[test]
    fn unsupported_parameters_are_errors() {
        let info = ConnInfo::parse("host=h connect_timeout=5").unwrap();
        assert!(matches!(options_from(&info), Err(Error::ConnInfo { .. })));
    }
}
