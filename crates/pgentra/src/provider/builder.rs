//! [`EntraAuthBuilder`]: which credential, cloud and role, and how refresh is tuned.

use super::credentials::{Source, name_of};
use super::refresh::{self, Shared};
use super::{EntraAuth, Inner};
use crate::clock::{Clock, SystemClock};
use crate::cloud::Cloud;
use crate::credential::CredentialChain;
use crate::error::{Error, Result};
use azure_core::credentials::TokenCredential;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Tuning knobs; see [`EntraAuthBuilder`].
#[derive(Debug, Clone)]
pub(super) struct Settings {
    pub(super) refresh_margin: Duration,
    pub(super) safety_margin: Duration,
    pub(super) timeout: Duration,
    pub(super) backoff_initial: Duration,
    pub(super) backoff_max: Duration,
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
    /// `ManagedIdentityCredential`; to choose the name, or to pass an
    /// `Arc<dyn TokenCredential>` (which has no type to name), use
    /// [`credential_named`](Self::credential_named).
    ///
    /// ```no_run
    /// let credential = azure_identity::ManagedIdentityCredential::new(None)?;
    /// let auth = pgentra::EntraAuth::builder().credential(credential).build()?;
    /// assert_eq!(auth.credential_name(), "ManagedIdentityCredential");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn credential<T: TokenCredential + 'static>(self, credential: Arc<T>) -> Self {
        let name = name_of::<T>();
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
        let shared = Arc::new(Shared::new(
            source,
            self.cloud.scope().to_owned(),
            self.username,
            settings,
            self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
        ));
        let (runtime, stop) = refresh::start(&shared)?;
        Ok(EntraAuth {
            inner: Arc::new(Inner {
                shared,
                runtime,
                _stop: stop,
            }),
        })
    }
}
