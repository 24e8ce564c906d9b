//! `pgentra`: Microsoft Entra ID authentication to Azure Database for PostgreSQL from the
//! command line.
//!
//! ```sh
//! pgentra demo                      # the whole story against a local emulator
//! pgentra whoami                    # which identity, which role, until when
//! pgentra psql -h srv.postgres.database.azure.com -d app
//! pgentra check postgres://srv.postgres.database.azure.com/app
//! ```
//!
//! Data goes to standard output (`--json` where it is data); logs, progress and errors go to
//! standard error. Exit codes: 0 success, 1 failure, 2 bad usage or input (and a subcommand
//! this build leaves out); `exec` and `psql` exit with their command's code, or 126 if it
//! could not be run and 127 if it was not found, as a shell does; 141 when the reader of
//! standard output went away (`pgentra check | head -1`), as for a process `SIGPIPE` ends.
//!
//! `emulator` and `demo` need the default `emulator` feature; a build without it (a
//! production sidecar's) still knows them, and says so.

mod auth;
mod check;
#[cfg(feature = "emulator")]
mod demo;
#[cfg(feature = "emulator")]
mod emulator;
mod env;
mod error;
mod inspect;
mod output;
mod proxy;
mod settings;
mod target;
mod token;
#[cfg(not(feature = "emulator"))]
mod unbuilt;
mod whoami;

#[cfg(not(feature = "emulator"))]
use unbuilt::{demo, emulator};

use clap::{ArgAction, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use std::ffi::OsString;
use std::process::ExitCode;

/// Microsoft Entra ID authentication to Azure Database for PostgreSQL: tokens, diagnostics,
/// a local emulator and a demo.
#[derive(Debug, Parser)]
#[command(name = "pgentra", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More log output on standard error: -v info, -vv debug, -vvv trace. `RUST_LOG`
    /// (like `pgentra=debug,azure_identity=trace`) overrides it.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
    /// Print data as JSON (token, whoami, inspect, env, check, emulator, demo).
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a database access token (like `az account get-access-token --resource-type
    /// oss-rdbms`).
    Token(token::Args),
    /// Show which credential answered, the principal, the role it logs in as and why. Never
    /// prints the token.
    Whoami(whoami::Args),
    /// Decode a token offline and show its claims and the role pgentra would derive. The
    /// signature is not verified.
    Inspect(inspect::Args),
    /// Print `PG*` variables, with a fresh token as `PGPASSWORD`, for `eval`.
    Env(env::EnvArgs),
    /// Run a command with a fresh token in `PGPASSWORD` and the role in `PGUSER`.
    Exec(env::ExecArgs),
    /// Run `psql` with a fresh token in `PGPASSWORD` and the role in `PGUSER`.
    Psql(env::PsqlArgs),
    /// Diagnose a connection step by step: DNS, TCP, TLS, token, role, login, query.
    Check(check::Args),
    /// Run the emulator in the foreground: a local Entra ID and an Azure-like gateway in front
    /// of a throwaway PostgreSQL.
    Emulator(emulator::Args),
    /// Watch pgentra keep a pool logged in across several token lifetimes, against the
    /// emulator.
    Demo(demo::Args),
    /// Listen locally and log any PostgreSQL client in with a fresh Entra ID token.
    Proxy(Box<proxy::Args>),
}

/// What every subcommand gets besides its own arguments.
#[derive(Debug, Clone, Copy)]
struct Context {
    json: bool,
    verbose: u8,
    style: output::Style,
}

/// Splits off everything after `psql`, which belongs to psql (whose `-h`, `-v` and `-U` would
/// otherwise be read as pgentra's own options).
fn split_psql_args(mut argv: Vec<OsString>) -> (Vec<OsString>, Option<Vec<OsString>>) {
    let is_global = |arg: &OsString| {
        arg.to_str().is_some_and(|arg| {
            matches!(arg, "--json" | "--verbose")
                || arg
                    .strip_prefix('-')
                    .is_some_and(|vs| !vs.is_empty() && vs.chars().all(|c| c == 'v'))
        })
    };
    match argv.iter().skip(1).position(|arg| !is_global(arg)) {
        Some(index) if argv[index + 1] == "psql" => {
            let rest = argv.split_off(index + 2);
            (argv, Some(rest))
        }
        _ => (argv, None),
    }
}

fn main() -> ExitCode {
    let (argv, psql_args) = split_psql_args(std::env::args_os().collect());
    let matches = proxy::with_defaults(Cli::command()).get_matches_from(argv);
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    if let (Command::Psql(args), Some(rest)) = (&mut cli.command, psql_args) {
        args.args = rest;
    }
    // The proxy starts logging itself, once it knows the log format.
    if !matches!(cli.command, Command::Proxy(_)) {
        output::init_logging(cli.verbose, output::LogFormat::Text);
    }
    let context = Context {
        json: cli.json,
        verbose: cli.verbose,
        style: output::Style::for_stdout(),
    };
    let result = match cli.command {
        Command::Token(args) => token::run(&args, context),
        Command::Whoami(args) => whoami::run(&args, context),
        Command::Inspect(args) => inspect::run(&args, context),
        Command::Env(args) => env::run_env(&args, context),
        Command::Exec(args) => env::run_exec(&args),
        Command::Psql(args) => env::run_psql(&args),
        Command::Check(args) => check::run(&args, context),
        Command::Emulator(args) => emulator::run(&args, context),
        Command::Demo(args) => demo::run(&args, context),
        Command::Proxy(args) => proxy::run(&args, context),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            error.report();
            error.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(args: &[&str]) -> (Vec<String>, Option<Vec<String>>) {
        let strings = |v: Vec<OsString>| -> Vec<String> {
            v.into_iter().map(|a| a.into_string().unwrap()).collect()
        };
        let (ours, theirs) = split_psql_args(args.iter().map(OsString::from).collect());
        (strings(ours), theirs.map(strings))
    }

    #[test]
    fn psql_gets_every_argument_after_its_name() {
        let (ours, theirs) = split(&[
            "pgentra", "-vv", "psql", "-h", "srv", "-v", "X=1", "-U", "r",
        ]);
        assert_eq!(ours, ["pgentra", "-vv", "psql"]);
        assert_eq!(theirs.unwrap(), ["-h", "srv", "-v", "X=1", "-U", "r"]);
        let (ours, theirs) = split(&["pgentra", "whoami", "psql"]);
        assert_eq!(ours, ["pgentra", "whoami", "psql"]);
        assert!(theirs.is_none());
    }
}
