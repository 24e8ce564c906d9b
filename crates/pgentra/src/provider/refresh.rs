//! The provider's state and its background task, the only code that calls the credential:
//! when to fetch, what a fetched token must satisfy, how failures back off, and how callers
//! wait for a token.
//!
//! A caller with no usable token waits for the running fetch, unless the credential is the
//! chain's selected one and its token endpoint has refused a request during that fetch: then
//! the caller gets the endpoint's answer at once, while the credential's own retries go on in
//! the background (`azure_identity` retries 429 and 5xx answers for up to a minute or more).

use super::builder::Settings;
use super::cache::Cache;
use super::credentials::{CredentialsInner, Source};
use super::{DbCredentials, Stats};
use crate::claims::{Claims, MissingRole, UsernameSource};
use crate::clock::{Clock, from_unix_seconds};
use crate::cloud::MANAGEMENT_SCOPE;
use crate::credential::Answers;
use crate::error::{Error, ErrorChain, Result};
use crate::secret::Secret;
use crate::sync::lock;
use azure_core::credentials::AccessToken;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::{Notify, oneshot, watch};

/// A token the credential returned must have at least this much life left to be accepted.
const MIN_TOKEN_LIFE: Duration = Duration::from_secs(1);

/// Where the background task is; callers (and the tests) wait on its changes.
#[derive(Debug, Clone)]
pub(super) enum Status {
    /// No token requested yet.
    Idle,
    /// A credential call is running. `answers_mark` is the chain's count of failed answers when
    /// it started, if its credential was already selected (see [`Source::answers_mark`]).
    Fetching { answers_mark: Option<u64> },
    /// The last call succeeded.
    Ready,
    /// The last call failed; the next one is due at `retry_at`.
    Failed { error: Error, retry_at: SystemTime },
}

/// What every handle of one provider, and its background task, share.
pub(super) struct Shared {
    pub(super) source: Source,
    pub(super) scope: String,
    pub(super) explicit_user: Option<String>,
    derived_user: Mutex<Option<(String, UsernameSource)>>,
    settings: Settings,
    clock: Arc<dyn Clock>,
    cache: Cache,
    pub(super) status: watch::Sender<Status>,
    pub(super) tokens: watch::Sender<Option<DbCredentials>>,
    demand: Notify,
    stats: Mutex<Stats>,
}

impl Shared {
    pub(super) fn new(
        source: Source,
        scope: String,
        explicit_user: Option<String>,
        settings: Settings,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            source,
            scope,
            explicit_user,
            derived_user: Mutex::new(None),
            settings,
            clock,
            cache: Cache::new(),
            status: watch::Sender::new(Status::Idle),
            tokens: watch::Sender::new(None),
            demand: Notify::new(),
            stats: Mutex::new(Stats::default()),
        }
    }

    /// The hot path (see [`Cache::usable`]).
    pub(super) fn usable(&self) -> Option<DbCredentials> {
        self.cache.usable(&*self.clock)
    }

    pub(super) fn stats(&self) -> MutexGuard<'_, Stats> {
        lock(&self.stats)
    }

    fn next_wake(&self) -> Option<SystemTime> {
        match &*self.status.borrow() {
            Status::Failed { retry_at, .. } => Some(*retry_at),
            _ => self.cache.refresh_at(),
        }
    }

    fn fetch_due(&self) -> bool {
        let now = self.clock.now();
        if let Status::Failed { retry_at, .. } = &*self.status.borrow() {
            return now >= *retry_at;
        }
        self.cache.refresh_at().is_none_or(|at| now >= at)
    }

    async fn fetch(&self) -> Result<DbCredentials> {
        let (token, credential) = self.source.token(&self.scope).await?;
        let now = self.clock.now();
        let expires_at = from_unix_seconds(token.expires_on.unix_timestamp());
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
        let expires_at = creds.expires_at();
        let lifetime = expires_at.duration_since(now).unwrap_or_default();
        let margin = self.settings.refresh_margin.min(lifetime / 2);
        // Up to 10 % earlier, so that a fleet started together spreads its refreshes.
        let margin = margin.mul_f64(1.0 - 0.1 * fastrand::f64());
        let safety = self.settings.safety_margin.min(lifetime / 4);
        let usable_until = expires_at - safety;
        // Never later than the moment the token stops being handed out (a refresh margin
        // configured below the safety margin).
        let refresh_at = (expires_at - margin).min(usable_until);
        let previous_expiry = self.cache.replace(creds.clone(), refresh_at, usable_until);
        {
            let mut stats = self.stats();
            stats.tokens_fetched += 1;
            stats.expires_at = Some(expires_at);
            if let Some(previous_expiry) = previous_expiry {
                stats.last_refresh_lead =
                    Some(previous_expiry.duration_since(now).unwrap_or_default());
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
        let retry_in_ms = backoff.as_millis() as u64;
        if self.usable().is_some() {
            tracing::warn!(error = %ErrorChain(&error), retry_in_ms,
                "token refresh failed; still serving the cached token");
        } else {
            tracing::warn!(error = %ErrorChain(&error), retry_in_ms,
                "token request failed and no valid token is cached");
        }
        self.status.send_replace(Status::Failed { error, retry_at });
    }

    fn timeout_error(&self) -> Error {
        Error::Timeout {
            credential: self.source.name(),
            timeout: self.settings.timeout,
        }
    }

    /// Fetches with the configured timeout (see [`cut_off_error`](Self::cut_off_error)).
    async fn fetch_bounded(&self, answers_mark: Option<u64>) -> Result<DbCredentials> {
        let deadline = self.clock.now() + self.settings.timeout;
        tokio::select! {
            result = self.fetch() => result,
            () = self.clock.sleep_until(deadline) => Err(self.cut_off_error(answers_mark)),
        }
    }

    /// The error for a fetch the timeout cut off: the token endpoint's latest answer if it
    /// refused the fetch, otherwise [`Error::Timeout`].
    fn cut_off_error(&self, answers_mark: Option<u64>) -> Error {
        let note = format!("; still no token after {:?}", self.settings.timeout);
        answers_mark
            .zip(self.source.answers())
            .and_then(|(mark, answers)| self.source.answered_since(&answers.borrow(), mark, &note))
            .unwrap_or_else(|| self.timeout_error())
    }
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

/// Starts the background task on a runtime on a thread of its own. The task runs until the
/// returned sender is dropped.
pub(super) fn start(shared: &Arc<Shared>) -> Result<(tokio::runtime::Handle, oneshot::Sender<()>)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::config(format!("cannot start the provider's runtime: {e}")))?;
    let handle = runtime.handle().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = Arc::clone(shared);
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
    Ok((handle, stop))
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
        let answers_mark = shared.source.answers_mark();
        shared
            .status
            .send_replace(Status::Fetching { answers_mark });
        match shared.fetch_bounded(answers_mark).await {
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

/// A caller's wait for a usable token, run on the provider's runtime: it ends with a token, the
/// last fetch's error, a failed answer of the token endpoint during the running fetch (see the
/// [module docs](self)), or the timeout.
pub(super) async fn acquire(shared: Arc<Shared>) -> Result<DbCredentials> {
    let deadline = shared.clock.now() + shared.settings.timeout;
    let mut timeout = shared.clock.sleep_until(deadline);
    let mut status = shared.status.subscribe();
    let mut answers = shared.source.answers();
    loop {
        if let Some(creds) = shared.usable() {
            return Ok(creds);
        }
        // Marks the latest answer seen whatever the status, so that it wakes no one twice.
        let latest = answers.as_mut().map(|a| a.borrow_and_update().clone());
        match &*status.borrow_and_update() {
            Status::Failed { error, .. } => return Err(error.clone()),
            Status::Fetching { answers_mark } => {
                let answered = answers_mark
                    .zip(latest.as_ref())
                    .and_then(|(mark, latest)| shared.source.answered_since(latest, mark, ""));
                if let Some(error) = answered {
                    return Err(error);
                }
            }
            Status::Idle | Status::Ready => shared.demand.notify_one(),
        }
        tokio::select! {
            changed = status.changed() => {
                if changed.is_err() {
                    return Err(Error::ProviderStopped);
                }
            }
            () = answer_recorded(answers.as_mut()) => {}
            () = &mut timeout => return Err(shared.timeout_error()),
        }
    }
}

/// Returns when `answers` has a new failed answer; never if there is no such receiver.
async fn answer_recorded(answers: Option<&mut watch::Receiver<Answers>>) {
    if let Some(answers) = answers
        && answers.changed().await.is_ok()
    {
        return;
    }
    // No chain, or its recorder is gone (it lives as long as the provider).
    std::future::pending().await
}
