//! `pgentra token`: a database access token on standard output.

use crate::Context;
use crate::auth::AuthArgs;
use crate::error::CliError;
use crate::output::{print_json, unix_seconds};
use std::process::ExitCode;

/// Prints a token for the database scope (and nothing else), so that
/// `PGPASSWORD="$(pgentra token)"` works; `--json` adds its expiry and role.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    auth: AuthArgs,
    /// The role to report in `--json` (default: `PGUSER`, else derived from the token).
    #[arg(long, short = 'U', env = "PGUSER", hide_env_values = true)]
    user: Option<String>,
}

pub(crate) fn run(args: &Args, context: Context) -> Result<ExitCode, CliError> {
    let creds = args
        .auth
        .provider(args.user.as_deref())?
        .credentials_blocking()?;
    let token = creds.password().expose_secret();
    if context.json {
        print_json(&serde_json::json!({
            "token": token,
            "expires_on": unix_seconds(creds.expires_at()),
            "user": creds.user(),
        }));
    } else {
        println!("{token}");
    }
    Ok(ExitCode::SUCCESS)
}
