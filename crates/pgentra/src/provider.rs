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
//!
//! The background task runs on a small runtime on a dedicated thread owned by the provider,
//! which is why [`EntraAuth::credentials_blocking`] works inside and outside a tokio runtime,
//! and why the refresh keeps going between calls. The thread stops when the last clone of the
//! provider is dropped.

use crate::claims::{Claims, MissingRole, UsernameSource};
use crate::clock::{Clock, SystemClock};
use crate::cloud::{Cloud, MANAGEMENT_SCOPE};
use crate::credential::CredentialChain;
use crate::error::{Error, Result};
use crate::secret::Secret;
use arc_swap::ArcSwapOption;
use azure_core::credentials::{AccessToken, TokenCredential};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, oneshot, watch};

/// Credentials for one PostgreSQL login: the role name and the token to send as its password.
///
/// Cheap to clone. `Debug` shows the user and expiry, never the token.
#[derive(Clone)]
pub struct DbCredentials(Arc<CredentialsInner>);

#[derive(Clone)]
struct CredentialsInner {
    user: String,
    password: Secret,
    expires_at: SystemTime,
    fetched_at: SystemTime,
    user_source: UsernameSource,
    credential: String,
}

impl DbCredentials {
    /// The PostgreSQL role to log in as.
    pub fn user(&self) -> &str {
        &self.0.user
    }

    /// The access token, to send as the password.
    pub fn password(&self) -> &Secret {
        &self.0.password
    }

    /// When the token expires.
    pub fn expires_at(&self) -> SystemTime {
        self.0.expires_at
    }

    /// When the token was obtained.
    pub fn fetched_at(&self) -> SystemTime {
        self.0.fetched_at
    }

    /// How the role name was chosen.
    pub fn user_source(&self) -> UsernameSource {
        self.0.user_source
    }

    /// The name of the credential that produced the token, like `ManagedIdentityCredential`.
    pub fn credential(&self) -> &str {
        &self.0.credential
    }
}

impl fmt::Debug for DbCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbCredentials")
            .field("user", &self.0.user)
            .field("password", &self.0.password)
            .field("expires_at", &unix_seconds(self.0.expires_at))
            .field("user_source", &self.0.user_source)
            .field("credential", &self.0.credential)
            .finish()
    }
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

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

/// Tuning knobs; see [`EntraAuthBuilder`].
#[derive(Debug, Clone)]
struct Settings {
    refresh_margin: Duration,
    safety_margin: Duration,
    timeout: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            refresh_margin: Duration::from_secs(5 * 60),
            safety_margin: Duration::from_secs(30),
            timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// A token the credential returned must have at least this much life left to be accepted.
const MIN_TOKEN_LIFE: Duration = Duration::from_secs(1);

enum Source {
    Chain(Arc<CredentialChain>),
    Custom {
        credential: Arc<dyn TokenCredential>,
        name: String,
    },
}

impl Source {
    async fn token(&self, scope: &str) -> Result<(AccessToken, String)> {
        match self {
            Self::Chain(chain) => chain
                .token(scope)
                .await
                .map(|(token, kind)| (token, kind.name().to_owned())),
            Self::Custom { credential, name } => credential
                .get_token(&[scope], None)
                .await
                .map(|token| (token, name.clone()))
                .map_err(|e| Error::credential(name, &e)),
        }
    }

    fn name(&self) -> String {
        match self {
            Self::Chain(chain) => chain.selected().map_or_else(
                || "the credential chain".to_owned(),
                |k| k.name().to_owned(),
            ),
            Self::Custom { name, .. } => name.clone(),
        }
    }
}

struct Cached {
    /// Unique across all providers, so per-thread copies can be keyed by it alone.
    generation: u64,
    creds: DbCredentials,
    usable_until: SystemTime,
    refresh_at: SystemTime,
}

static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// Per-thread copies of the current credentials.
///
/// Cloning one shared `Arc` from many threads makes every core fight over its reference count;
/// each thread instead clones its own copy (made once per token), so the hot path touches no
/// cache line that another thread writes.
mod thread_copies {
    use super::DbCredentials;
    use std::cell::RefCell;
    use std::time::SystemTime;

    /// A thread rarely uses more than a couple of providers; older copies are dropped.
    const MAX_COPIES: usize = 4;

    pub(super) struct ThreadCopy {
        pub(super) generation: u64,
        pub(super) usable_until: SystemTime,
        pub(super) creds: DbCredentials,
    }

    thread_local! {
        static COPIES: RefCell<Vec<ThreadCopy>> = const { RefCell::new(Vec::new()) };
    }

    /// This thread's copy of `generation`, made by `make` if the thread has none. `None` if
    /// `make` finds nothing to copy.
    pub(super) fn get(
        generation: u64,
        make: impl FnOnce() -> Option<ThreadCopy>,
    ) -> Option<(SystemTime, DbCredentials)> {
        let found = |copy: &ThreadCopy| (copy.usable_until, copy.creds.clone());
        let mut make = Some(make);
        COPIES
            .try_with(|copies| {
                let mut copies = copies.borrow_mut();
                if let Some(copy) = copies.iter().find(|c| c.generation == generation) {
                    return Some(found(copy));
                }
                let copy = make.take().and_then(|make| make())?;
                let result = found(&copy);
                if copies.len() >= MAX_COPIES {
                    copies.remove(0);
                }
                copies.push(copy);
                Some(result)
            })
            // During thread teardown the thread-local is gone: answer from a fresh copy.
            .unwrap_or_else(|_| {
                let copy = make.take().and_then(|make| make())?;
                Some((copy.usable_until, copy.creds))
            })
    }
}

#[derive(Debug, Clone)]
enum Status {
    /// No token requested yet.
    Idle,
    /// A credential call is running.
    Fetching,
    /// The last call succeeded.
    Ready,
    /// The last call failed; the next one is due at `retry_at`.
    Failed { error: Error, retry_at: SystemTime },
}

struct Shared {
    source: Source,
    scope: String,
    explicit_user: Option<String>,
    derived_user: Mutex<Option<(String, UsernameSource)>>,
    settings: Settings,
    clock: Arc<dyn Clock>,
    cache: ArcSwapOption<Cached>,
    /// Generation of the cached token, 0 before the first. Redundant with `cache`, but one
    /// plain atomic load is cheaper on the hot path than an `ArcSwap` load (33 ns against
    /// 45 ns a call in `provider_hot_path`).
    generation: AtomicU64,
    status: watch::Sender<Status>,
    tokens: watch::Sender<Option<DbCredentials>>,
    demand: Notify,
    stats: Mutex<Stats>,
}

impl Shared {
    /// The hot path: a cached token that may still be handed out. Lock-free, and
    /// allocation-free once this thread has its copy of the current token: an atomic load, a
    /// clock read, and a reference-count increment on a thread-private copy.
    fn usable(&self) -> Option<DbCredentials> {
        let generation = self.generation.load(Ordering::Acquire);
        if generation == 0 {
            return None;
        }
        let (usable_until, creds) = thread_copies::get(generation, || {
            let cached = self.cache.load_full()?;
            Some(thread_copies::ThreadCopy {
                generation: cached.generation,
                usable_until: cached.usable_until,
                creds: DbCredentials(Arc::new((*cached.creds.0).clone())),
            })
        })?;
        (self.clock.now() < usable_until).then_some(creds)
    }

    fn stats(&self) -> MutexGuard<'_, Stats> {
        lock(&self.stats)
    }

    fn next_wake(&self) -> Option<SystemTime> {
        match &*self.status.borrow() {
            Status::Failed { retry_at, .. } => Some(*retry_at),
            _ => self.cache.load().as_ref().map(|c| c.refresh_at),
        }
    }

    fn fetch_due(&self) -> bool {
        let now = self.clock.now();
        if let Status::Failed { retry_at, .. } = &*self.status.borrow() {
            return now >= *retry_at;
        }
        match self.cache.load().as_ref() {
            None => true,
            Some(c) => now >= c.refresh_at,
        }
    }

    async fn fetch(&self) -> Result<DbCredentials> {
        let (token, credential) = self.source.token(&self.scope).await?;
        let now = self.clock.now();
        let expires_at = UNIX_EPOCH
            + Duration::from_secs(u64::try_from(token.expires_on.unix_timestamp()).unwrap_or(0));
        let remaining = expires_at.duration_since(now).unwrap_or_default();
        if remaining < MIN_TOKEN_LIFE {
            return Err(Error::TokenExpiresTooSoon {
                credential,
                remaining,
            });
        }
        let (user, user_source) = self.username(&token, &credential).await?;
        Ok(DbCredentials(Arc::new(CredentialsInner {
            user,
            password: Secret::new(token.token.secret()),
            expires_at,
            fetched_at: now,
            user_source,
            credential,
        })))
    }

    /// The explicit user, or the role derived from the token (once; the principal behind a
    /// credential does not change).
    async fn username(
        &self,
        token: &AccessToken,
        credential: &str,
    ) -> Result<(String, UsernameSource)> {
        if let Some(user) = &self.explicit_user {
            return Ok((user.clone(), UsernameSource::Explicit));
        }
        if let Some(derived) = lock(&self.derived_user).clone() {
            return Ok(derived);
        }
        let derived = match role_from(token, credential)? {
            Ok(role) => role,
            Err(reason @ MissingRole::Guest { .. }) => return Err(Error::NoUsername { reason }),
            Err(reason) => {
                // As Microsoft's libraries do: a management-scope token may name the principal.
                tracing::debug!(%reason, "database token names no role; asking for a management token");
                let (management, credential) = self.source.token(MANAGEMENT_SCOPE).await?;
                role_from(&management, &credential)?.map_err(|_| Error::NoUsername { reason })?
            }
        };
        *lock(&self.derived_user) = Some(derived.clone());
        Ok(derived)
    }

    fn store(&self, creds: DbCredentials) {
        let now = self.clock.now();
        let lifetime = creds.expires_at().duration_since(now).unwrap_or_default();
        let margin = self.settings.refresh_margin.min(lifetime / 2);
        // Up to 10 % earlier, so that a fleet started together spreads its refreshes.
        let margin = margin.mul_f64(1.0 - 0.1 * fastrand::f64());
        let safety = self.settings.safety_margin.min(lifetime / 4);
        let generation = NEXT_GENERATION.fetch_add(1, Ordering::Relaxed);
        let cached = Cached {
            generation,
            // Never later than the moment the token stops being handed out (a refresh margin
            // configured below the safety margin).
            refresh_at: (creds.expires_at() - margin).min(creds.expires_at() - safety),
            usable_until: creds.expires_at() - safety,
            creds: creds.clone(),
        };
        let previous = self.cache.swap(Some(Arc::new(cached)));
        // After the swap, so a reader that sees this generation finds it (or a newer one).
        self.generation.store(generation, Ordering::Release);
        {
            let mut stats = self.stats();
            stats.tokens_fetched += 1;
            stats.expires_at = Some(creds.expires_at());
            if let Some(previous) = previous {
                stats.last_refresh_lead = Some(
                    previous
                        .creds
                        .expires_at()
                        .duration_since(now)
                        .unwrap_or_default(),
                );
            }
        }
        tracing::debug!(
            user = creds.user(),
            credential = creds.credential(),
            expires_in_s = lifetime.as_secs(),
            "obtained a database token"
        );
        self.status.send_replace(Status::Ready);
        self.tokens.send_replace(Some(creds));
    }

    fn record_failure(&self, error: Error, failures: u32) {
        let backoff = self
            .settings
            .backoff_initial
            .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1)))
            .min(self.settings.backoff_max);
        let retry_at = self.clock.now() + backoff;
        self.stats().fetch_failures += 1;
        if self.usable().is_some() {
            tracing::warn!(error = %error, retry_in_ms = backoff.as_millis() as u64,
                "token refresh failed; still serving the cached token");
        } else {
            tracing::warn!(error = %error, retry_in_ms = backoff.as_millis() as u64,
                "token request failed and no valid token is cached");
        }
        self.status.send_replace(Status::Failed { error, retry_at });
    }

    /// Fetches with the configured timeout.
    async fn fetch_bounded(&self) -> Result<DbCredentials> {
        let deadline = self.clock.now() + self.settings.timeout;
        tokio::select! {
            result = self.fetch() => result,
            () = self.clock.sleep_until(deadline) => Err(Error::Timeout {
                credential: self.source.name(),
                timeout: self.settings.timeout,
            }),
        }
    }
}

/// Locks a mutex whose data stays valid even if a holder panicked (counters and a cached
/// name), so poisoning is ignored.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The role named by `token`'s claims: `Err` if the token is unreadable, `Ok(Err)` if it names
/// no role.
fn role_from(
    token: &AccessToken,
    credential: &str,
) -> Result<Result<(String, UsernameSource), MissingRole>> {
    let claims = Claims::decode(token.token.secret()).map_err(|source| Error::TokenFormat {
        credential: credential.to_owned(),
        source,
    })?;
    Ok(claims.role_name())
}

/// The background task: the only place that calls the credential.
async fn refresh_loop(shared: Arc<Shared>) {
    let mut failures = 0u32;
    loop {
        let demand = shared.demand.notified();
        match shared.next_wake() {
            Some(at) => {
                tokio::select! {
                    () = demand => {}
                    () = shared.clock.sleep_until(at) => {}
                }
            }
            None => demand.await,
        }
        if !shared.fetch_due() {
            continue;
        }
        shared.status.send_replace(Status::Fetching);
        match shared.fetch_bounded().await {
            Ok(creds) => {
                failures = 0;
                shared.store(creds);
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                shared.record_failure(error, failures);
            }
        }
    }
}

/// A caller's wait for a usable token, run on the provider's runtime.
async fn acquire(shared: Arc<Shared>) -> Result<DbCredentials> {
    let deadline = shared.clock.now() + shared.settings.timeout;
    let mut timeout = shared.clock.sleep_until(deadline);
    let mut status = shared.status.subscribe();
    loop {
        if let Some(creds) = shared.usable() {
            return Ok(creds);
        }
        match &*status.borrow_and_update() {
            Status::Failed { error, .. } => return Err(error.clone()),
            Status::Fetching => {}
            Status::Idle | Status::Ready => shared.demand.notify_one(),
        }
        tokio::select! {
            changed = status.changed() => {
                if changed.is_err() {
                    return Err(Error::ProviderStopped);
                }
            }
            () = &mut timeout => {
                return Err(Error::Timeout {
                    credential: shared.source.name(),
                    timeout: shared.settings.timeout,
                });
            }
        }
    }
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
    /// caller shares.
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
                .spawn(async move { reply(acquire(shared).await) }),
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

/// Configures an [`EntraAuth`]; made by [`EntraAuth::builder`].
#[derive(Default)]
#[must_use]
pub struct EntraAuthBuilder {
    source: Option<Source>,
    cloud: Cloud,
    username: Option<String>,
    settings: Settings,
    clock: Option<Arc<dyn Clock>>,
}

impl fmt::Debug for EntraAuthBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntraAuthBuilder")
            .field("cloud", &self.cloud)
            .field("username", &self.username)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl EntraAuthBuilder {
    /// Uses `credential` instead of the default chain. Errors name it by its type, like
    /// `ManagedIdentityCredential`; use [`credential_named`](Self::credential_named) to choose.
    pub fn credential(self, credential: Arc<dyn TokenCredential>) -> Self {
        let name = type_name_of(&*credential);
        self.credential_named(name, credential)
    }

    /// Uses `credential`, called `name` in errors and diagnostics.
    pub fn credential_named(
        mut self,
        name: impl Into<String>,
        credential: Arc<dyn TokenCredential>,
    ) -> Self {
        self.source = Some(Source::Custom {
            credential,
            name: name.into(),
        });
        self
    }

    /// Uses this chain (for example one built with
    /// [`CredentialChain::from_vars`](crate::credential::CredentialChain::from_vars)).
    pub fn credential_chain(mut self, chain: CredentialChain) -> Self {
        self.source = Some(Source::Chain(Arc::new(chain)));
        self
    }

    /// The cloud whose database scope tokens are requested for (default: public).
    pub fn cloud(mut self, cloud: Cloud) -> Self {
        self.cloud = cloud;
        self
    }

    /// A custom token scope, like `https://ossrdbms-aad.database.windows.net/.default`.
    pub fn scope(self, scope: impl Into<String>) -> Self {
        self.cloud(Cloud::custom_scope(scope))
    }

    /// Logs in as this role instead of deriving it from the token (for example a group role).
    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.username = Some(username.into());
        self
    }

    /// How long before expiry to refresh (default 5 minutes; at most half a token's lifetime
    /// is used).
    pub fn refresh_margin(mut self, margin: Duration) -> Self {
        self.settings.refresh_margin = margin;
        self
    }

    /// Never hand out a token that expires within this margin (default 30 s; at most a quarter
    /// of a token's lifetime is used).
    pub fn safety_margin(mut self, margin: Duration) -> Self {
        self.settings.safety_margin = margin;
        self
    }

    /// How long a credential call, and a caller waiting for it, may take (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.settings.timeout = timeout;
        self
    }

    /// Backoff between failed credential calls: `initial`, doubling up to `max` (defaults 1 s
    /// and 30 s).
    pub fn retry_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.settings.backoff_initial = initial;
        self.settings.backoff_max = max;
        self
    }

    /// The clock used for expiry and scheduling (default: [`SystemClock`]); tests use
    /// [`ManualClock`](crate::clock::ManualClock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Builds the provider and starts its background thread. No token is requested until the
    /// first call to [`EntraAuth::credentials`].
    pub fn build(self) -> Result<EntraAuth> {
        let settings = self.settings;
        if settings.timeout.is_zero() {
            return Err(Error::config("the timeout must be greater than zero"));
        }
        if settings.backoff_initial.is_zero() || settings.backoff_max < settings.backoff_initial {
            return Err(Error::config(
                "retry backoff needs 0 < initial <= max (for example 1 s and 30 s)",
            ));
        }
        if self.username.as_deref() == Some("") {
            return Err(Error::config("the username must not be empty"));
        }
        let source = match self.source {
            Some(source) => source,
            None => Source::Chain(Arc::new(CredentialChain::from_env()?)),
        };
        let shared = Arc::new(Shared {
            source,
            scope: self.cloud.scope().to_owned(),
            explicit_user: self.username,
            derived_user: Mutex::new(None),
            settings,
            clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
            cache: ArcSwapOption::empty(),
            generation: AtomicU64::new(0),
            status: watch::Sender::new(Status::Idle),
            tokens: watch::Sender::new(None),
            demand: Notify::new(),
            stats: Mutex::new(Stats::default()),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::config(format!("cannot start the provider's runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let worker = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("pgentra-provider".into())
            .spawn(move || {
                runtime.block_on(async move {
                    tokio::select! {
                        () = refresh_loop(worker) => {}
                        _ = stopped => {}
                    }
                });
            })
            .map_err(|e| Error::config(format!("cannot start the provider's thread: {e}")))?;
        Ok(EntraAuth {
            inner: Arc::new(Inner {
                shared,
                runtime: handle,
                _stop: stop,
            }),
        })
    }
}

/// `ManagedIdentityCredential` from a `Debug` output such as
/// `azure_identity::ManagedIdentityCredential { .. }`.
fn type_name_of(credential: &dyn TokenCredential) -> String {
    let debug = format!("{credential:?}");
    let head = debug.split([' ', '{', '(']).next().unwrap_or_default();
    let name = head.rsplit("::").next().unwrap_or_default();
    if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
        "the credential".to_owned()
    } else {
        name.to_owned()
    }
}

#[cfg(test)]
mod tests;
