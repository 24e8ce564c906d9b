//! A wrapper that keeps access tokens out of logs.

use std::fmt;
use std::sync::Arc;

/// An access token (or any other secret) that never prints itself.
///
/// `Debug` shows `Secret(_)` and there is no `Display`, so a token cannot reach a log line or an
/// error message by accident. Call [`expose_secret`](Self::expose_secret) at the one place the
/// raw text is needed: the password field of a connection.
///
/// Cloning is cheap (the text is shared).
///
/// ```
/// let secret = pgentra::Secret::new("eyJ0eXAiOiJKV1Qi");
/// assert_eq!(format!("{secret:?}"), "Secret(_)");
/// assert_eq!(secret.expose_secret(), "eyJ0eXAiOiJKV1Qi");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Self(value.into())
    }

    /// Returns the secret text. Pass it straight to the driver; never log it.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// Length of the secret in bytes, which is safe to log.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(_)")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}
