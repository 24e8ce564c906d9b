//! [diesel](https://docs.rs/diesel) 2.3, sync `PgConnection` (libpq): an r2d2
//! `ManageConnection` whose every new connection logs in with a fresh token.
//!
//! Each connection is established from a libpq `key='value'` conninfo that pgentra builds and
//! quotes itself (a token in a naive URL can break it, and libpq then echoes the token in its
//! error). libpq error texts are scrubbed of the token before they reach an error of ours.
//!
//! **Instrumentation caveat:** diesel hands the full connection string, password included, to
//! any `Instrumentation` you install (`StartEstablishConnection { url }`): do not log those
//! events' URLs.
//!
//! TLS is libpq's (OpenSSL): `sslmode=verify-full` by default with `sslrootcert` for the CA file.
//! libpq before version 16 has no `sslrootcert=system`; give it the CA file (for Azure, the
//! DigiCert Global Root G2 and Microsoft RSA Root CA 2017 certificates).
//!
//! ```no_run
//! use diesel::RunQueryDsl;
//! let auth = pgentra::EntraAuth::from_env()?;
//! let info = pgentra::conninfo::ConnInfo::parse(
//!     "host=srv.postgres.database.azure.com dbname=app sslrootcert=/etc/ssl/azure-pg.pem",
//! )?;
//! let pool = r2d2::Pool::builder()
//!     .max_size(8)
//!     .build(pgentra::diesel::EntraPgConnectionManager::new(auth, info))
//!     .map_err(pgentra::Error::connect)?;
//! let mut conn = pool.get().map_err(pgentra::Error::connect)?;
//! let user: String = diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>("current_user::text"))
//!     .get_result(&mut conn)
//!     .map_err(pgentra::Error::connect)?;
//! # let _ = user; Ok::<(), pgentra::Error>(())
//! ```

use crate::conninfo::ConnInfo;
use crate::provider::EntraAuth;
use diesel::r2d2::R2D2Connection;
use diesel::{Connection, ConnectionError, PgConnection};

/// An r2d2 `ManageConnection` for diesel's `PgConnection` with fresh Entra credentials.
#[derive(Debug, Clone)]
pub struct EntraPgConnectionManager {
    auth: EntraAuth,
    info: ConnInfo,
}

impl EntraPgConnectionManager {
    /// A manager for these connection settings; a user in them wins over the token's role.
    pub fn new(auth: EntraAuth, info: ConnInfo) -> Self {
        Self { auth, info }
    }

    /// Establishes one connection with the current credentials.
    pub fn establish(&self) -> Result<PgConnection, ConnectionError> {
        let creds = self
            .auth
            .credentials_blocking()
            .map_err(crate::diesel_errors::typed)?;
        let user = self.info.user.as_deref().unwrap_or_else(|| creds.user());
        let conninfo = self.info.to_libpq(user, creds.password());
        let token = creds.password().expose_secret();
        PgConnection::establish(conninfo.expose_secret()).map_err(|error| match error {
            // libpq may echo parts of the connection string.
            ConnectionError::BadConnection(text) => {
                ConnectionError::BadConnection(text.replace(token, "<token>"))
            }
            other => other,
        })
    }
}

impl r2d2::ManageConnection for EntraPgConnectionManager {
    type Connection = PgConnection;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<PgConnection, Self::Error> {
        self.establish()
            .map_err(diesel::r2d2::Error::ConnectionError)
    }

    fn is_valid(&self, conn: &mut PgConnection) -> Result<(), Self::Error> {
        conn.ping().map_err(diesel::r2d2::Error::QueryError)
    }

    fn has_broken(&self, conn: &mut PgConnection) -> bool {
        conn.is_broken()
    }
}

pub use crate::diesel_errors::cause;
