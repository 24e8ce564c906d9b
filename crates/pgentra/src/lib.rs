//! Passwordless Microsoft Entra ID authentication for Azure Database for PostgreSQL.
//!
//! Azure PostgreSQL accepts an Entra ID access token as the password of a login. Tokens expire
//! after about an hour, and every *new* connection (above all the ones a pool opens long after
//! start) needs one that is valid at that moment. `pgentra` turns any Entra ID credential into
//! PostgreSQL credentials — the role name and a token — through a provider that:
//!
//! - serves a cached token from a lock-free, allocation-free hot path;
//! - refreshes ahead of expiry in the background, with jitter;
//! - makes one credential call however many connections ask at once (single flight);
//! - keeps serving a still-valid token while the token endpoint fails, retrying with backoff;
//! - derives the role name from the token's claims, including system-assigned managed
//!   identities, which Microsoft's own libraries miss;
//! - never lets a token reach a log line, `Debug` output or an error.
//!
//! # Quick start
//!
//! ```no_run
//! # async fn demo() -> Result<(), pgentra::Error> {
//! // The default credential chain (service principal, workload identity, managed identity,
//! // Azure CLI, Azure Developer CLI), PGUSER if set, public cloud.
//! let auth = pgentra::EntraAuth::from_env()?;
//! // For each new connection:
//! let creds = auth.credentials().await?;
//! let (user, password) = (creds.user(), creds.password().expose_secret());
//! # let _ = (user, password);
//! # Ok(()) }
//! ```
//!
//! Sync code calls [`EntraAuth::credentials_blocking`], which works inside or outside a tokio
//! runtime.
//!
//! # Modules
//!
//! - [`provider`]: [`EntraAuth`], the cache and refresh, and how refresh is timed.
//! - [`credential`]: [`CredentialChain`](credential::CredentialChain), the default chain.
//! - [`claims`]: reading token claims and deriving the role name.
//! - [`cloud`]: scopes for the public, US Government and China clouds.
//! - [`conninfo`]: libpq URLs, `key=value` strings and `PG*` variables.
//! - [`tls`]: rustls configurations with libpq `sslmode` semantics.
//! - [`clock`]: the injectable clock used for expiry, and Unix-seconds conversions.
//!
//! # Drivers
//!
//! - [`tokio_postgres`]: [`EntraConnector`](tokio_postgres::EntraConnector), the base every
//!   integration shares: libpq URLs with `sslmode=verify-full`, TLS forced on, fresh
//!   credentials per connection.
//! - [`postgres`]: the sync client.
//! - [`deadpool`]: a `deadpool_postgres::Connect` and ready-made pools.
//! - [`bb8`]: a `bb8::ManageConnection` and an error sink that keeps the real connect error.
//! - [`r2d2`]: an `r2d2::ManageConnection` for the sync client.
//! - [`sqlx`]: [`SqlxConnector`](sqlx::SqlxConnector): one-shot options, and pools whose
//!   shared connect options a refresher keeps fresh (sqlx has no per-connection hook).
//! - [`sea_orm`]: a `DatabaseConnection` over such a sqlx pool.
//! - [`diesel_async`]: a `ManagerConfig` whose `custom_setup` connects over rustls with a fresh
//!   token, for diesel-async's deadpool and bb8 pools.
//! - [`diesel`]: an r2d2 `ManageConnection` for diesel's sync `PgConnection` (libpq).
//!
//! # Features
//!
//! | Feature | Description | Extra dependencies | Default |
//! |---------|-------------|--------------------|---------|
//! | `tokio-postgres-0_7` | [`tokio_postgres`] module, [`TlsOptions::make_tls_connect`](tls::TlsOptions::make_tls_connect) | `tokio-postgres`, `tokio-postgres-rustls` | no |
//! | `postgres-0_19` | [`postgres`] module | `postgres` | no |
//! | `deadpool-postgres-0_14` | [`deadpool`] module | `deadpool-postgres` | no |
//! | `bb8-0_9` | [`bb8`] module | `bb8` | no |
//! | `r2d2-0_8` | [`r2d2`] module | `r2d2`, `postgres` | no |
//! | `sqlx-0_9` | [`sqlx`] module (the application picks sqlx's TLS feature) | `sqlx` | no |
//! | `sea-orm-2` | [`sea_orm`] module | `sea-orm`, `sqlx` | no |
//! | `diesel-async-0_9` | [`diesel_async`] module | `diesel-async`, `diesel` | no |
//! | `diesel-2` | [`diesel`] module | `diesel`, `r2d2`, libpq (`libpq-dev`) | no |
//! | `client-certificate` | service principals with a certificate (`AZURE_CLIENT_CERTIFICATE_PATH`) | OpenSSL | no |

#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "bb8-0_9")]
#[cfg_attr(docsrs, doc(cfg(feature = "bb8-0_9")))]
pub mod bb8;
pub mod claims;
pub mod clock;
pub mod cloud;
pub mod conninfo;
pub mod credential;
#[cfg(feature = "deadpool-postgres-0_14")]
#[cfg_attr(docsrs, doc(cfg(feature = "deadpool-postgres-0_14")))]
pub mod deadpool;
#[cfg(feature = "diesel-2")]
#[cfg_attr(docsrs, doc(cfg(feature = "diesel-2")))]
pub mod diesel;
#[cfg(feature = "diesel-async-0_9")]
#[cfg_attr(docsrs, doc(cfg(feature = "diesel-async-0_9")))]
pub mod diesel_async;
#[cfg(any(feature = "diesel-2", feature = "diesel-async-0_9"))]
mod diesel_errors;
mod error;
#[cfg(feature = "postgres-0_19")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres-0_19")))]
pub mod postgres;
pub mod provider;
#[cfg(feature = "r2d2-0_8")]
#[cfg_attr(docsrs, doc(cfg(feature = "r2d2-0_8")))]
pub mod r2d2;
#[cfg(feature = "sea-orm-2")]
#[cfg_attr(docsrs, doc(cfg(feature = "sea-orm-2")))]
pub mod sea_orm;
mod secret;
#[cfg(feature = "sqlx-0_9")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlx-0_9")))]
pub mod sqlx;
mod sync;
pub mod tls;
#[cfg(feature = "tokio-postgres-0_7")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio-postgres-0_7")))]
pub mod tokio_postgres;

pub use cloud::Cloud;
pub use error::{CredentialAttempt, Error, ErrorChain, Result};
pub use provider::{DbCredentials, EntraAuth, EntraAuthBuilder, Stats};
pub use secret::Secret;

/// The README's examples, compiled as doc tests so they cannot drift from the API.
#[cfg(all(
    doctest,
    feature = "tokio-postgres-0_7",
    feature = "deadpool-postgres-0_14"
))]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
