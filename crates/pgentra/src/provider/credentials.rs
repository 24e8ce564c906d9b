//! What a provider calls and what it hands out: the Entra credential (the default chain or one
//! the application gave, with the name errors use for it), and [`DbCredentials`].

use crate::claims::UsernameSource;
use crate::clock::unix_seconds;
use crate::credential::{Answers, CredentialChain};
use crate::error::{Error, Result};
use crate::secret::Secret;
use azure_core::credentials::{AccessToken, TokenCredential};
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::watch;

/// Credentials for one PostgreSQL login: the role name and the token to send as its password.
///
/// Cheap to clone. `Debug` shows the user and expiry, never the token.
#[derive(Clone)]
pub struct DbCredentials(pub(super) Arc<CredentialsInner>);

#[derive(Clone)]
pub(super) struct CredentialsInner {
    pub(super) user: String,
    pub(super) password: Secret,
    pub(super) expires_at: SystemTime,
    pub(super) fetched_at: SystemTime,
    pub(super) user_source: UsernameSource,
    pub(super) credential: String,
}

impl DbCredentials {
    /// A copy that shares no reference count with `self` (see the per-thread copies in
    /// `cache`).
    pub(super) fn unshared(&self) -> Self {
        Self(Arc::new((*self.0).clone()))
    }

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

/// The credential a provider calls.
pub(super) enum Source {
    Chain(Arc<CredentialChain>),
    Custom {
        credential: Arc<dyn TokenCredential>,
        name: String,
    },
}

impl Source {
    /// A token for `scope`, and the name of the credential that gave it.
    pub(super) async fn token(&self, scope: &str) -> Result<(AccessToken, String)> {
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

    /// For a chain whose credential is already selected, the number of failed answers its
    /// token endpoints have given so far: a fetch then calls the selected credential only, so
    /// every failed answer recorded during it is that credential's. `None` for a custom
    /// credential, and for a chain still choosing (where a failing credential only means that
    /// the chain tries the next one).
    pub(super) fn answers_mark(&self) -> Option<u64> {
        match self {
            Self::Chain(chain) => chain.selected().map(|_| chain.answers().count()),
            Self::Custom { .. } => None,
        }
    }

    /// A receiver that wakes at each failed answer of the chain's token endpoints; `None` for a
    /// custom credential.
    pub(super) fn answers(&self) -> Option<watch::Receiver<Answers>> {
        match self {
            Self::Chain(chain) => Some(chain.answers().subscribe()),
            Self::Custom { .. } => None,
        }
    }

    /// The selected credential's error for the latest of `answers` if it came after `mark`
    /// (see [`answers_mark`](Self::answers_mark)); `note` is added to the endpoint's answer.
    pub(super) fn answered_since(&self, answers: &Answers, mark: u64, note: &str) -> Option<Error> {
        let Self::Chain(chain) = self else {
            return None;
        };
        let kind = chain.selected()?;
        let answer = answers.last.as_ref().filter(|_| answers.count > mark)?;
        Some(Error::Credential {
            credential: kind.name().to_owned(),
            reason: format!("{answer}{note}"),
        })
    }

    /// The credential's name: for the chain, the one that answered (if any has yet).
    pub(super) fn name(&self) -> String {
        match self {
            Self::Chain(chain) => chain.selected().map_or_else(
                || "the credential chain".to_owned(),
                |k| k.name().to_owned(),
            ),
            Self::Custom { name, .. } => name.clone(),
        }
    }
}

/// The name errors use for a credential of type `T`: its type's name without the path or
/// generic arguments, like `ManagedIdentityCredential`, as the Azure SDKs name credentials.
pub(super) fn name_of<T>() -> String {
    // `type_name`'s format is not guaranteed: fall back to a generic name if it is unexpected.
    let path = std::any::type_name::<T>()
        .split('<')
        .next()
        .unwrap_or_default();
    let name = path.rsplit("::").next().unwrap_or_default();
    if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
        "the credential".to_owned()
    } else {
        name.to_owned()
    }
}
