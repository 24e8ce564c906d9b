//! `emulator` and `demo` in a build without the `emulator` feature: they still parse,
//! whatever follows them, and fail with one line that says why (as ripgrep does for PCRE2), so
//! a script that calls them learns what it runs rather than that the command is unknown.

use crate::Context;
use crate::error::CliError;
use std::ffi::OsString;
use std::process::ExitCode;

/// Whatever follows the subcommand: this build cannot tell its flags apart.
#[derive(Debug, clap::Args)]
#[command(disable_help_flag = true)]
pub(crate) struct Args {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    _ignored: Vec<OsString>,
}

/// The one-line error, exit code 2.
fn not_built(command: &str) -> Result<ExitCode, CliError> {
    Err(CliError::Usage(format!(
        "`pgentra {command}` is not in this build: it was built without the `emulator` feature"
    )))
}

pub(crate) mod demo {
    pub(crate) use super::Args;

    pub(crate) fn run(_: &Args, _: super::Context) -> Result<super::ExitCode, super::CliError> {
        super::not_built("demo")
    }
}

pub(crate) mod emulator {
    pub(crate) use super::Args;

    pub(crate) fn run(_: &Args, _: super::Context) -> Result<super::ExitCode, super::CliError> {
        super::not_built("emulator")
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    #[test]
    fn the_subcommands_parse_and_say_they_are_not_built() {
        for (command, flag) in [("demo", "--duration"), ("emulator", "--help")] {
            let cli = crate::Cli::try_parse_from(["pgentra", command, flag, "5s"]).unwrap();
            let context = crate::Context {
                json: false,
                verbose: 0,
                style: crate::output::Style::for_stdout(),
            };
            let error = match cli.command {
                crate::Command::Demo(args) => super::demo::run(&args, context),
                crate::Command::Emulator(args) => super::emulator::run(&args, context),
                other => panic!("parsed as {other:?}"),
            }
            .unwrap_err();
            assert_eq!(
                error.to_string(),
                format!(
                    "`pgentra {command}` is not in this build: it was built without the `emulator` feature"
                )
            );
        }
    }
}
