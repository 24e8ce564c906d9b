//! The one error type of the command, the one way an error and its causes are printed, and
//! how an error ends the process.

use std::error::Error as StdError;
use std::process::ExitCode;

/// Why a subcommand failed. Each variant's message says only what it adds: its cause is its
/// `source()`, which [`chain`] prints after it, so no cause is printed twice.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// Getting a token, parsing settings or connecting failed.
    #[error(transparent)]
    Pgentra(#[from] pgentra::Error),
    /// The proxy could not start (exit code 2 for a bad configuration).
    #[error(transparent)]
    Proxy(#[from] pgentra_proxy::ProxyError),
    /// The emulator could not start.
    #[cfg(feature = "emulator")]
    #[error("the emulator could not start")]
    Emulator(#[from] pgentra_emulator::EmulatorError),
    /// Bad input on the command line or standard input (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// A token given to `inspect` is not a JWT pgentra can read (exit code 2).
    #[error("not a readable token")]
    BadToken(#[from] pgentra::claims::TokenFormatError),
    /// Reading input, writing output or running a command failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `exec` or `psql` could not start the command (exit code 127 if it was not found, as in
    /// a shell, else 126).
    #[error("could not run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why it could not start.
        source: std::io::Error,
    },
    /// The subcommand already reported what failed (a failed check or demo).
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn exit_code(&self) -> ExitCode {
        match self {
            Self::Usage(_)
            | Self::BadToken(_)
            | Self::Proxy(pgentra_proxy::ProxyError::Config(_)) => ExitCode::from(2),
            Self::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ExitCode::from(127)
            }
            Self::Spawn { .. } => ExitCode::from(126),
            _ => ExitCode::FAILURE,
        }
    }

    /// Prints the error and its causes as one line on standard error.
    pub(crate) fn report(&self) {
        eprintln!("pgentra: {}", chain(self));
    }
}

/// An error and its causes on one line (the library's [`pgentra::ErrorChain`], with any line
/// breaks a server's message carries folded): for this command's errors, the steps of `check`
/// and the workers of `demo`.
pub(crate) fn chain(error: &(dyn StdError + 'static)) -> String {
    pgentra::ErrorChain(error).to_string().replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_follow_the_error_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let error = CliError::io("reading x.toml")(io);
        assert_eq!(chain(&error), "reading x.toml: no such file");
        assert_eq!(chain(&CliError::Usage("two\nlines".into())), "two lines");
    }
}
