//! `pgentra-emulator`: runs the emulator in the foreground.
//!
//! Standard output carries only `export NAME=value` lines a shell can `eval`, then `# ready`;
//! logs go to standard error. Ctrl-C or SIGTERM stops it and removes its files.
//!
//! ```sh
//! eval "$(cargo run -q -p pgentra-emulator -- --token-lifetime 60s | sed '/^# ready/q')"
//! ```

use clap::Parser;
use pgentra_emulator::issuer::Principal;
use pgentra_emulator::{Emulator, EmulatorConfig};
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

/// A local Entra ID and Azure-PostgreSQL-like gateway in front of a throwaway PostgreSQL.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Lifetime of issued tokens, like `20s`, `15m` or `2h`.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    token_lifetime: Duration,
    /// A user principal (UPN) with a role; repeat for more. Default: alice@contoso.com.
    #[arg(long = "user", value_name = "UPN")]
    users: Vec<String>,
    /// A user-assigned managed identity with a role; repeat for more. Default:
    /// orders-api-identity.
    #[arg(long = "managed-identity", value_name = "NAME")]
    managed_identities: Vec<String>,
    /// Which managed identity the managed-identity endpoints answer as (default: the first).
    #[arg(long, value_name = "NAME")]
    answer_as: Option<String>,
    /// Use this PostgreSQL instead of a throwaway cluster (`postgres://user@host:port/db`; the
    /// user must be able to create roles, and the server must trust loopback connections).
    #[arg(long, value_name = "URL")]
    backend: Option<String>,
    /// The gateway's port (default: any free port).
    #[arg(long, default_value_t = 0)]
    gateway_port: u16,
    /// The identity endpoints' HTTP port (default: any free port).
    #[arg(long, default_value_t = 0)]
    identity_port: u16,
}

fn config(args: &Args) -> Result<EmulatorConfig, String> {
    let mut config = EmulatorConfig {
        token_lifetime: args.token_lifetime,
        gateway_port: args.gateway_port,
        identity_port: args.identity_port,
        backend_url: args.backend.clone(),
        ..EmulatorConfig::default()
    };
    if !args.users.is_empty() || !args.managed_identities.is_empty() {
        let users = args.users.iter().map(|u| Principal::user(u));
        let identities: Vec<Principal> = args
            .managed_identities
            .iter()
            .map(|m| Principal::user_assigned_identity(m))
            .collect();
        config.principals = users.chain(identities.iter().cloned()).collect();
        config.groups.clear();
        if let Some(user) = config.principals.iter().find(|p| !p.is_app()) {
            config.cli_user = user.clone();
        }
        if let Some(identity) = identities.first() {
            config.managed_identity = identity.clone();
        }
    }
    if let Some(name) = &args.answer_as {
        config.managed_identity = config
            .principals
            .iter()
            .find(|p| &p.role == name && p.is_app())
            .cloned()
            .ok_or_else(|| {
                format!(
                    "--answer-as {name}: no such managed identity (add it with --managed-identity)"
                )
            })?;
    }
    Ok(config)
}

/// A value quoted for `sh`.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match config(&args) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("pgentra-emulator: {message}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("pgentra-emulator: {error}");
            return ExitCode::FAILURE;
        }
    };
    let emulator = match Emulator::start(config) {
        Ok(emulator) => emulator,
        Err(error) => {
            eprintln!("pgentra-emulator: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    for (name, value) in emulator.env() {
        let _ = writeln!(out, "export {name}={}", shell_quote(&value));
    }
    let _ = writeln!(out, "# ready");
    let _ = out.flush();
    drop(out);
    eprintln!(
        "pgentra-emulator: gateway on 127.0.0.1:{}, tokens live {}; Ctrl-C to stop",
        emulator.gateway().port(),
        humantime::format_duration(emulator.issuer().lifetime()),
    );
    runtime.block_on(async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            Some(()) = async { match terminate.as_mut() { Some(t) => t.recv().await, None => None } } => {}
        }
    });
    eprintln!("pgentra-emulator: stopping");
    // Stops PostgreSQL and removes the cluster directory with the CA and shims.
    drop(emulator);
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_choose_principals_and_the_managed_identity() {
        let args = Args::parse_from([
            "pgentra-emulator",
            "--token-lifetime",
            "20s",
            "--user",
            "bob@contoso.com",
            "--managed-identity",
            "a-mi",
            "--managed-identity",
            "b-mi",
            "--answer-as",
            "b-mi",
        ]);
        let config = config(&args).unwrap();
        assert_eq!(config.token_lifetime, Duration::from_secs(20));
        let roles: Vec<&str> = config.principals.iter().map(|p| p.role.as_str()).collect();
        assert_eq!(roles, ["bob@contoso.com", "a-mi", "b-mi"]);
        assert_eq!(config.managed_identity.role, "b-mi");
        assert_eq!(config.cli_user.role, "bob@contoso.com");
        let unknown = Args::parse_from(["pgentra-emulator", "--answer-as", "nobody"]);
        assert!(config_error(&unknown).contains("no such managed identity"));
    }

    fn config_error(args: &Args) -> String {
        config(args).unwrap_err()
    }

    #[test]
    fn values_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
