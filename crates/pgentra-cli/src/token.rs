//! `pgentra token`: a database access token on standard output.

use crate::Context;
use crate::auth::TokenArgs;
use crate::error::CliError;
use crate::output::outln;
use crate::output::print_json;
use pgentra::clock::unix_seconds;
use std::process::ExitCode;

/// Prints a token for the database scope (and nothing else), so that
/// `PGPASSWORD="$(pgentra token)"` works; `--json` adds its expiry and role.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    token: TokenArgs,
}

pub(crate) fn run(args: &Args, context: Context) -> Result<ExitCode, CliError> {
    let creds = args.token.provider()?.credentials_blocking()?;
    let token = creds.password().expose_secret();
    if context.json {
        print_json(&serde_json::json!({
            "token": token,
            "expires_on": unix_seconds(creds.expires_at()),
            "user": creds.user(),
        }));
    } else {
        outln!("{token}");
    }
    Ok(ExitCode::SUCCESS)
}
