//! [`EntraAuth`]: the token provider every integration takes.
//!
//! # How refresh works
//!
//! ```text
//!  fetched                refresh_at          usable_until   expires_at
//!     |-----------------------|-------------------|--------------|
//!     |   cached token served |  refresh in the   |  never handed
//!     |   lock-free           |  background; the  |  out (safety
//!     |                       |  old token is     |  margin)
//!     |                       |  served meanwhile |
//! ```
//!
//! - `refresh_at` is `expires_at - margin`, where the margin is the configured refresh margin
//!   (5 minutes by default) or half the token's lifetime if that is shorter, minus up to 10 %
//!   jitter so that many processes do not refresh together.
//! - `usable_until` is `expires_at - safety`, where the safety margin is 30 seconds by default or
//!   a quarter of the lifetime if that is shorter: a 60-second token is refreshed around 30 s and
//!   never handed out in its last 15 s.
//! - A failed refresh while the token is usable is logged as a warning and retried with capped
//!   exponential backoff; callers keep getting the cached token.
//! - With no usable token, the first caller wakes the background task and every concurrent
//!   caller waits for that one credential call (single flight), for at most the timeout. While
//!   the credential is failing, callers get its last error at once instead of waiting.
//! - When the token endpoint refuses that call (the [default chain](crate::credential)'s
//!   selected credential got an HTTP error answer), waiting callers get the endpoint's answer
//!   at once, as [`Error::Credential`], rather than waiting out `azure_identity`'s own retries
//!   (over a minute for managed identity), which go on in the background: if one succeeds,
//!   later callers get its token. If the timeout cuts the call off, its error is that answer
//!   too.
//!
//! The background task runs on a small runtime on a dedicated thread owned by the provider,
//! which is why [`EntraAuth::credentials_blocking`] works inside and outside a tokio runtime,
//! and why the refresh keeps going between calls. The thread stops when the last clone of the
//! provider is dropped.

mod builder;
mod cache;
mod credentials;
mod refresh;

pub use builder::EntraAuthBuilder;
pub use credentials::DbCredentials;

use crate::clock::unix_seconds;
use crate::cloud::Cloud;
use crate::error::{Error, Result};
use refresh::Shared;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{oneshot, watch};

/// Counters describing the provider's work, for diagnostics and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Tokens obtained from the credential.
    pub tokens_fetched: u64,
    /// Credential calls that failed (including timeouts).
    pub fetch_failures: u64,
    /// Expiry of the cached token, if any.
    pub expires_at: Option<SystemTime>,
    /// For the latest refresh that replaced a token: how long before the old token's expiry it
    /// happened.
    pub last_refresh_lead: Option<Duration>,
}

/// Stops the provider's thread when the last [`EntraAuth`] clone is dropped.
struct Inner {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    _stop: oneshot::Sender<()>,
}

/// The token provider: turns an Entra ID credential into PostgreSQL credentials, with a cache
/// that refreshes ahead of expiry. See the [module docs](self) for how refresh works.
///
/// Cheap to clone; clones share the cache and the background refresh.
///
/// ```no_run
/// # async fn demo() -> Result<(), pgentra::Error> {
/// let auth = pgentra::EntraAuth::from_env()?;
/// let creds = auth.credentials().await?;
/// println!("log in as {} until {:?}", creds.user(), creds.expires_at());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EntraAuth {
    inner: Arc<Inner>,
}

impl fmt::Debug for EntraAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = &self.inner.shared;
        f.debug_struct("EntraAuth")
            .field("scope", &shared.scope)
            .field("credential", &shared.source.name())
            .field("user", &shared.explicit_user)
            .field("expires_at", &shared.stats().expires_at.map(unix_seconds))
            .finish_non_exhaustive()
    }
}

impl EntraAuth {
    /// A provider configured from the environment: the [default credential
    /// chain](crate::credential), the cloud named by `AZURE_AUTHORITY_HOST` (public cloud if
    /// unset), and `PGUSER` as the role if set (otherwise the role is derived from the token).
    pub fn from_env() -> Result<Self> {
        let mut builder = Self::builder();
        if let Ok(host) = std::env::var("AZURE_AUTHORITY_HOST") {
            builder = builder.cloud(Cloud::from_authority_host(&host));
        }
        if let Some(user) = std::env::var("PGUSER").ok().filter(|u| !u.is_empty()) {
            builder = builder.username(user);
        }
        builder.build()
    }

    /// A builder with the defaults: default credential chain, public cloud, role from the token,
    /// refresh margin 5 min, safety margin 30 s, timeout 30 s, retry backoff 1 s doubling to 30 s.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// let auth = pgentra::EntraAuth::builder()
    ///     .cloud(pgentra::Cloud::UsGovernment)
    ///     .username("app-identity")
    ///     .timeout(Duration::from_secs(10))
    ///     .build()?;
    /// # Ok::<(), pgentra::Error>(())
    /// ```
    pub fn builder() -> EntraAuthBuilder {
        EntraAuthBuilder::default()
    }

    /// Credentials for a new connection. Returns at once when a usable token is cached;
    /// otherwise waits (at most the timeout) for the one credential call that every concurrent
    /// caller shares, or until the token endpoint refuses it (see the [module docs](self)).
    pub async fn credentials(&self) -> Result<DbCredentials> {
        if let Some(creds) = self.inner.shared.usable() {
            return Ok(creds);
        }
        let (tx, rx) = oneshot::channel();
        self.spawn_acquire(move |result| {
            let _ = tx.send(result);
        });
        rx.await.map_err(|_| Error::ProviderStopped)?
    }

    /// The blocking twin of [`credentials`](Self::credentials), for sync drivers.
    ///
    /// Safe to call from any thread, including inside a tokio runtime (it never starts or
    /// enters a runtime on the caller's thread); on a cache miss it blocks the calling thread,
    /// so from async code prefer `spawn_blocking`.
    ///
    /// ```no_run
    /// let auth = pgentra::EntraAuth::from_env()?;
    /// let creds = auth.credentials_blocking()?;
    /// println!("user {}", creds.user());
    /// # Ok::<(), pgentra::Error>(())
    /// ```
    pub fn credentials_blocking(&self) -> Result<DbCredentials> {
        if let Some(creds) = self.inner.shared.usable() {
            return Ok(creds);
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.spawn_acquire(move |result| {
            let _ = tx.send(result);
        });
        rx.recv().map_err(|_| Error::ProviderStopped)?
    }

    fn spawn_acquire(&self, reply: impl FnOnce(Result<DbCredentials>) + Send + 'static) {
        let shared = Arc::clone(&self.inner.shared);
        // If the runtime is gone the task is dropped, `reply` with it, and the caller sees
        // ProviderStopped.
        drop(
            self.inner
                .runtime
                .spawn(async move { reply(refresh::acquire(shared).await) }),
        );
    }

    /// A receiver that yields each new token (after the first, as soon as it is fetched), for
    /// pools that hold one shared set of connect options.
    ///
    /// ```no_run
    /// # async fn demo(auth: pgentra::EntraAuth) {
    /// let mut tokens = auth.subscribe();
    /// while tokens.changed().await.is_ok() {
    ///     if let Some(creds) = tokens.borrow_and_update().clone() {
    ///         println!("new token for {} until {:?}", creds.user(), creds.expires_at());
    ///     }
    /// }
    /// # }
    /// ```
    pub fn subscribe(&self) -> watch::Receiver<Option<DbCredentials>> {
        self.inner.shared.tokens.subscribe()
    }

    /// Counters: tokens fetched, failures, current expiry.
    pub fn stats(&self) -> Stats {
        self.inner.shared.stats().clone()
    }

    /// The scope tokens are requested for.
    pub fn scope(&self) -> &str {
        &self.inner.shared.scope
    }

    /// The credential in use: for the default chain, the one that answered (or "the credential
    /// chain" before any did).
    pub fn credential_name(&self) -> String {
        self.inner.shared.source.name()
    }
}

#[cfg(test)]
mod tests;
