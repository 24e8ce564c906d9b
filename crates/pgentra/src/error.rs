//! The crate's error type.

use crate::claims::{MissingRole, TokenFormatError};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Everything that can go wrong while turning an Entra ID credential into database credentials.
///
/// Each variant's message says what to do next. `Display` prints the error itself; a cause
/// (an I/O error, the driver's error, what is wrong with a token) is its `source()`, which
/// [`ErrorChain`] prints with it. No variant ever contains token text, in `Display`, in
/// `Debug` or in a source. Errors are cheap to clone, so one failed token request can be
/// reported to every caller that waited for it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The credential was asked for a token and failed.
    #[error("{credential} could not get a token: {reason}")]
    Credential {
        /// Which credential failed.
        credential: String,
        /// The credential's own explanation.
        reason: String,
    },
    /// Every credential of the default chain failed; `attempts` says why each one did.
    #[error(
        "no credential could get a token: {}. Sign in with `az login` or `azd auth login`, or configure a service principal, workload identity or managed identity (see AZURE_TOKEN_CREDENTIALS)",
        Attempts(attempts)
    )]
    NoCredential {
        /// One entry per credential that was tried, in order.
        attempts: Vec<CredentialAttempt>,
    },
    /// The credential did not answer in time.
    #[error(
        "{credential} did not return a token within {timeout:?}; check that its token endpoint is reachable, or raise the limit with EntraAuthBuilder::timeout"
    )]
    Timeout {
        /// Which credential was asked.
        credential: String,
        /// The limit that was reached.
        timeout: Duration,
    },
    /// The credential returned something that is not a readable JWT, so the role name could
    /// not be derived from it; the source says what is wrong with it.
    #[error(
        "the token from {credential} is not a readable JWT, so the PostgreSQL role name cannot be derived from it; set the user explicitly (PGUSER, the connection string's user, or EntraAuthBuilder::username)"
    )]
    TokenFormat {
        /// Which credential returned it.
        credential: String,
        /// What is wrong with it.
        source: TokenFormatError,
    },
    /// The credential returned a token that is already expired or about to expire.
    #[error(
        "the token from {credential} expires in {remaining:?}, too soon to be used; check this machine's clock"
    )]
    TokenExpiresTooSoon {
        /// Which credential returned it.
        credential: String,
        /// Time left before the token expires (zero if it already has).
        remaining: Duration,
    },
    /// The PostgreSQL role name could not be derived from the token.
    #[error(
        "cannot derive the PostgreSQL role name: {reason}; set the user explicitly (PGUSER, the connection string's user, or EntraAuthBuilder::username)"
    )]
    NoUsername {
        /// Why the claims do not name the role.
        reason: MissingRole,
    },
    /// A connection string or the libpq environment is invalid.
    #[error("invalid connection settings: {message}")]
    ConnInfo {
        /// What is wrong, and how to fix it.
        message: String,
    },
    /// A configuration value (environment variable or builder setting) is invalid.
    #[error("invalid configuration: {message}")]
    Config {
        /// What is wrong, and how to fix it.
        message: String,
    },
    /// A file could not be read; the source is the I/O error.
    #[error("cannot read {}; check that it exists and that this user may read it", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: Arc<std::io::Error>,
    },
    /// The TLS configuration could not be built.
    #[error("TLS setup failed: {message}")]
    Tls {
        /// What is wrong, and how to fix it.
        message: String,
    },
    /// The database driver failed to connect or the server refused the login. The driver's own
    /// error is the source (for example a `tokio_postgres::Error` with the server's message);
    /// [`ErrorChain`] prints both.
    #[error(
        "connecting to the database failed; check the server's address and that an Entra administrator created this role (pgaadauth_create_principal)"
    )]
    Connect {
        /// The driver's error.
        source: Arc<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The provider's background thread is gone (it panicked or the process is exiting).
    #[error("the token provider has stopped; create a new EntraAuth")]
    ProviderStopped,
}

impl Error {
    pub(crate) fn conninfo(message: impl Into<String>) -> Self {
        Self::ConnInfo {
            message: message.into(),
        }
    }

    pub(crate) fn credential(credential: &str, error: &azure_core::Error) -> Self {
        Self::Credential {
            credential: credential.to_owned(),
            reason: reason(error),
        }
    }

    /// Wraps a database driver's error (see [`Error::Connect`]).
    pub fn connect(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Connect {
            source: Arc::new(error),
        }
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Self::Config {
            message: message.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source: Arc::new(source),
        }
    }

    pub(crate) fn tls(message: impl Into<String>) -> Self {
        Self::Tls {
            message: message.into(),
        }
    }

    /// Whether the error came from acquiring a token (as opposed to configuration), so that
    /// trying again later may succeed.
    pub fn is_token_acquisition(&self) -> bool {
        matches!(
            self,
            Self::Credential { .. }
                | Self::NoCredential { .. }
                | Self::Timeout { .. }
                | Self::TokenExpiresTooSoon { .. }
        )
    }
}

/// An `azure_identity` error as one line (its messages end with a troubleshooting link on a
/// line of its own).
pub(crate) fn reason(error: &azure_core::Error) -> String {
    error
        .to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// One credential's failure inside [`Error::NoCredential`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialAttempt {
    /// The credential's name, like `AzureCliCredential`.
    pub credential: String,
    /// Why it did not produce a token.
    pub reason: String,
}

/// An error and its sources on one line, `error: cause: cause`.
///
/// Each error's `Display` prints only itself and `source()` returns its cause (as
/// tokio-postgres does: it says "db error" and keeps the server's message in the source), so a
/// log line or a message that must tell the whole story prints the chain.
///
/// ```
/// let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
/// let error = pgentra::Error::connect(refused);
/// let line = pgentra::ErrorChain(&error).to_string();
/// assert!(line.starts_with("connecting to the database failed; "), "{line}");
/// assert!(line.ends_with(": connection refused"), "{line}");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        for cause in std::iter::successors(self.0.source(), |e| e.source()) {
            write!(f, ": {cause}")?;
        }
        Ok(())
    }
}

struct Attempts<'a>(&'a [CredentialAttempt]);

impl fmt::Display for Attempts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, attempt) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", attempt.credential, attempt.reason)?;
        }
        Ok(())
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests;
