//! The one error type of the command, and how it ends the process.

use std::process::ExitCode;

/// Why a subcommand failed. Printed as one line on standard error, without the token.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// Getting a token, parsing settings or connecting failed.
    #[error(transparent)]
    Pgentra(#[from] pgentra::Error),
    /// The emulator could not start.
    #[error("the emulator could not start: {0}")]
    Emulator(#[from] pgentra_emulator::EmulatorError),
    /// Bad input on the command line or standard input (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// A token given to `inspect` is not a JWT pgentra can read (exit code 2).
    #[error("not a readable token: {0}")]
    BadToken(#[from] pgentra::claims::TokenFormatError),
    /// Reading input, writing output or running a command failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `exec` or `psql` could not start the command (exit code 127 if it was not found, as in
    /// a shell).
    #[error("could not run {program}: {source}")]
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
            Self::Usage(_) | Self::BadToken(_) => ExitCode::from(2),
            Self::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ExitCode::from(127)
            }
            Self::Spawn { .. } => ExitCode::from(126),
            _ => ExitCode::FAILURE,
        }
    }

    /// Prints the error as one line (pgentra's errors already carry their causes).
    pub(crate) fn report(&self) {
        let line = self.to_string().replace('\n', " ");
        eprintln!("pgentra: {line}");
    }
}
