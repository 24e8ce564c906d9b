//! `pgentra whoami`: which identity logs in, as which role, until when. Never the token.

use crate::Context;
use crate::auth::TokenArgs;
use crate::error::CliError;
use crate::output::outln;
use crate::output::{print_json, relative, timestamp};
use pgentra::claims::Claims;
use pgentra::clock::unix_seconds;
use std::process::ExitCode;

/// Gets a token the way a connection would and describes it.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    token: TokenArgs,
}

pub(crate) fn run(args: &Args, context: Context) -> Result<ExitCode, CliError> {
    let auth = args.token.provider()?;
    let creds = auth.credentials_blocking()?;
    // The provider has already decoded this token once; decoding again cannot fail.
    let claims = Claims::decode(creds.password().expose_secret()).map_err(|source| {
        pgentra::Error::TokenFormat {
            credential: creds.credential().to_owned(),
            source,
        }
    })?;
    let kind = claims.principal_kind().describe();
    if context.json {
        print_json(&serde_json::json!({
            "credential": creds.credential(),
            "principal": kind,
            "object_id": claims.oid(),
            "tenant_id": claims.tid(),
            "app_id": claims.appid(),
            "role": creds.user(),
            "role_source": creds.user_source().describe(),
            "scope": auth.scope(),
            "expires_on": unix_seconds(creds.expires_at()),
        }));
        return Ok(ExitCode::SUCCESS);
    }
    let style = context.style;
    let row = |name: &str, value: &str| outln!("{}  {value}", style.dim(&format!("{name:<10}")));
    row("credential", creds.credential());
    row("principal", kind);
    row("object id", claims.oid().unwrap_or("-"));
    row("tenant", claims.tid().unwrap_or("-"));
    if let Some(appid) = claims.appid() {
        row("app id", appid);
    }
    row(
        "role",
        &format!("{} ({})", style.bold(creds.user()), creds.user_source()),
    );
    row("scope", auth.scope());
    row(
        "expires",
        &format!(
            "{} ({})",
            timestamp(creds.expires_at()),
            relative(creds.expires_at())
        ),
    );
    Ok(ExitCode::SUCCESS)
}
