//! [tokio-postgres](https://docs.rs/tokio-postgres): a connection with fresh Entra credentials
//! each time, over verified TLS.
//!
//! [`EntraConnector`] keeps a base `tokio_postgres::Config` (without user or password), the TLS
//! connector and the provider. Each [`connect`](EntraConnector::connect) takes the current
//! token (cached and refreshed ahead by the provider) and opens a connection with it.
//!
//! libpq-style URLs with `sslmode=verify-full|verify-ca|require` and `sslrootcert`, which
//! tokio-postgres's own parser rejects, are accepted: pgentra takes those keys out, builds the
//! rustls connector from them, and sets `SslMode::Require` so the token never travels in clear
//! text (tokio-postgres's default `prefer` falls back to plain TCP).
//!
//! ```no_run
//! # async fn demo() -> Result<(), pgentra::Error> {
//! let auth = pgentra::EntraAuth::from_env()?;
//! let connector = pgentra::tokio_postgres::EntraConnector::from_url(
//!     auth,
//!     "postgres://srv.postgres.database.azure.com/app?sslmode=verify-full",
//! )?;
//! let (client, connection) = connector.connect().await?;
//! tokio::spawn(connection);
//! let row = client.query_one("SELECT current_user", &[]).await.map_err(pgentra::Error::connect)?;
//! # let _ = row; Ok(()) }
//! ```

use crate::conninfo::ConnInfo;
use crate::error::{Error, Result};
use crate::provider::{DbCredentials, EntraAuth};
use crate::tls::TlsOptions;
use ::tokio_postgres as tp;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The TLS connector pgentra uses with tokio-postgres.
pub type Tls = MakeRustlsConnect;

/// A connection as returned by [`EntraConnector::connect`]: spawn it.
pub type Connection =
    tp::Connection<tp::Socket, <Tls as tp::tls::MakeTlsConnect<tp::Socket>>::Stream>;

/// Opens tokio-postgres connections with fresh Entra credentials; see the [module
/// docs](self). Cheap to clone.
#[derive(Clone)]
pub struct EntraConnector {
    auth: EntraAuth,
    config: tp::Config,
    /// A role chosen by the connection settings, which wins over the token's.
    user: Option<String>,
    tls: Tls,
}

impl std::fmt::Debug for EntraConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio_postgres::Config's Debug redacts the password (and it has none here).
        f.debug_struct("EntraConnector")
            .field("auth", &self.auth)
            .field("config", &self.config)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl EntraConnector {
    /// A connector for parsed connection settings.
    pub fn new(auth: EntraAuth, info: &ConnInfo) -> Result<Self> {
        let config = config_from(info)?;
        let tls = info.tls_options().make_tls_connect()?;
        Ok(Self {
            auth,
            config,
            user: info.user.clone(),
            tls,
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

    /// A connector for an existing tokio-postgres `Config`. Its TLS mode is forced to
    /// `Require` and its password is ignored; `tls` decides how the server is verified.
    pub fn from_config(auth: EntraAuth, mut config: tp::Config, tls: &TlsOptions) -> Result<Self> {
        config.ssl_mode(tp::config::SslMode::Require);
        let user = config.get_user().map(str::to_owned);
        Ok(Self {
            auth,
            config,
            user,
            tls: tls.make_tls_connect()?,
        })
    }

    /// The provider.
    pub fn auth(&self) -> &EntraAuth {
        &self.auth
    }

    /// The TLS connector.
    pub fn tls(&self) -> &Tls {
        &self.tls
    }

    /// The base configuration, without credentials.
    pub fn base_config(&self) -> &tp::Config {
        &self.config
    }

    /// The configuration for one new connection: the base plus the current credentials.
    pub async fn config(&self) -> Result<tp::Config> {
        let creds = self.auth.credentials().await?;
        Ok(self.with_credentials(&creds))
    }

    /// The base configuration with `creds` as user (unless the settings chose one) and
    /// password. For the sync driver and pools that get credentials their own way.
    pub fn with_credentials(&self, creds: &DbCredentials) -> tp::Config {
        let mut config = self.config.clone();
        config
            .user(self.user.as_deref().unwrap_or_else(|| creds.user()))
            .password(creds.password().expose_secret());
        config
    }

    /// Opens a connection with the current credentials. Spawn the returned connection.
    pub async fn connect(&self) -> Result<(tp::Client, Connection)> {
        let config = self.config().await?;
        config
            .connect(self.tls.clone())
            .await
            .map_err(Error::connect)
    }
}

/// A tokio-postgres `Config` from connection settings: no user or password, TLS required.
pub(crate) fn config_from(info: &ConnInfo) -> Result<tp::Config> {
    // tokio-postgres parses the libpq parameters it supports; the TLS keys, user and password
    // are handled by pgentra and never reach it.
    let mut params = String::new();
    for (key, value) in &info.params {
        let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
        params.push_str(&format!("{key}='{quoted}' "));
    }
    let mut config: tp::Config = params.parse().map_err(|e: tp::Error| {
        Error::conninfo(format!(
            "a connection parameter is not supported by tokio-postgres: {e}"
        ))
    })?;
    match (&info.host, &info.hostaddr) {
        (Some(host), hostaddr) => {
            config.host(host);
            if let Some(addr) = hostaddr {
                config.hostaddr(addr.parse().map_err(|_| {
                    Error::conninfo(format!("hostaddr {addr:?} is not an IP address"))
                })?);
            }
        }
        (None, Some(addr)) => {
            // verify-full needs a name to check the certificate against.
            config.host(addr);
        }
        (None, None) => {
            return Err(Error::conninfo(
                "no host: give one in the URL or set PGHOST (the server's name, like srv.postgres.database.azure.com)",
            ));
        }
    }
    if let Some(port) = info.port {
        config.port(port);
    }
    if let Some(dbname) = &info.dbname {
        config.dbname(dbname);
    }
    if let Some(name) = &info.application_name {
        config.application_name(name);
    }
    config.ssl_mode(tp::config::SslMode::Require);
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_urls_become_configs_that_require_tls() {
        let info = ConnInfo::parse(
            "postgres://srv.example.com:6432/app?sslmode=verify-full&sslrootcert=/ca.pem&application_name=svc&connect_timeout=7&options=-c%20statement_timeout%3D5s",
        )
        .unwrap();
        let config = config_from(&info).unwrap();
        assert_eq!(
            config.get_hosts(),
            [tp::config::Host::Tcp("srv.example.com".into())]
        );
        assert_eq!(config.get_ports(), [6432]);
        assert_eq!(config.get_dbname(), Some("app"));
        assert_eq!(config.get_application_name(), Some("svc"));
        assert_eq!(
            config.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(7))
        );
        assert_eq!(config.get_options(), Some("-c statement_timeout=5s"));
        assert_eq!(config.get_ssl_mode(), tp::config::SslMode::Require);
        assert_eq!(config.get_user(), None);
        assert_eq!(config.get_password(), None);
    }

    #[test]
    fn unsupported_parameters_and_missing_hosts_are_errors() {
        let unsupported = ConnInfo::parse("host=h gssencmode=require").unwrap();
        assert!(matches!(
            config_from(&unsupported),
            Err(Error::ConnInfo { .. })
        ));
        let no_host = ConnInfo::parse("dbname=app").unwrap();
        let err = config_from(&no_host).unwrap_err();
        assert!(err.to_string().contains("PGHOST"), "{err}");
    }
}
