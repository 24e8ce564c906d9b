//! `pgentra emulator`: the emulator in the foreground, for your own app or its tests.
//!
//! Standard output carries only the variables to set (for `eval`), then `# ready`; logs go to
//! standard error. Ctrl-C or SIGTERM stops it and removes its files.

use crate::Context;
use crate::error::CliError;
use crate::output::{Shell, print_vars, shutdown_signal};
use pgentra_emulator::issuer::{Principal, PrincipalKind};
use pgentra_emulator::{Emulator, EmulatorConfig};
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

/// Runs a local Entra ID (managed identity, OAuth2, `az`/`azd` shims) and an Azure-like gateway
/// in front of a throwaway PostgreSQL, and prints the environment that points clients at it.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Lifetime of issued tokens, like `20s`, `15m` or `2h`.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    token_lifetime: Duration,
    /// A principal with a role: `user:UPN`, `managed-identity:NAME`, `service-principal:NAME`
    /// (client secret `emulator-client-secret`); repeat for more. Default: user
    /// alice@contoso.com, managed identity orders-api-identity, service principal
    /// reporting-app, and a group `readers` of all three.
    #[arg(long = "principal", value_name = "KIND:NAME", value_parser = parse_principal)]
    principals: Vec<Principal>,
    /// A principal Entra ID knows but the database has no role for, as KIND:NAME: an Entra
    /// administrator creates its role with `pgaadauth_create_principal` (repeatable; default:
    /// managed identity billing-identity).
    #[arg(long = "no-role", value_name = "KIND:NAME", value_parser = parse_principal)]
    without_role: Vec<Principal>,
    /// The server's Entra administrator, a user principal's name (default: the first user).
    #[arg(long, value_name = "UPN")]
    admin: Option<String>,
    /// Group object IDs in every token, as for a user in that many groups (150 make an 8 KB
    /// token; Entra ID puts at most 200).
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=200))]
    token_groups: u16,
    /// Which managed identity the managed-identity endpoints answer as (default: the first).
    #[arg(long, value_name = "NAME")]
    answer_as: Option<String>,
    /// Use this PostgreSQL instead of a throwaway cluster (`postgres://user@host:port/db`; the
    /// user must be a superuser, and the server must trust loopback connections).
    #[arg(long, value_name = "URL")]
    backend: Option<String>,
    /// The gateway's port (default: any free port).
    #[arg(long, default_value_t = 0)]
    gateway_port: u16,
    /// The identity endpoints' HTTP port (default: any free port).
    #[arg(long, default_value_t = 0)]
    identity_port: u16,
    /// The shell to print the variables for.
    #[arg(long, value_enum, default_value_t)]
    shell: Shell,
}

fn parse_principal(value: &str) -> Result<Principal, String> {
    let (kind, name) = value
        .split_once(':')
        .filter(|(_, name)| !name.is_empty())
        .ok_or("expected KIND:NAME, like user:bob@contoso.com")?;
    match kind {
        "user" => Ok(Principal::user(name)),
        "managed-identity" | "mi" => Ok(Principal::user_assigned_identity(name)),
        "service-principal" | "sp" => Ok(Principal::service_principal(name)),
        _ => Err(format!(
            "unknown kind {kind:?}: use user, managed-identity or service-principal"
        )),
    }
}

fn config(args: &Args) -> Result<EmulatorConfig, CliError> {
    let mut config = EmulatorConfig {
        token_lifetime: args.token_lifetime,
        gateway_port: args.gateway_port,
        identity_port: args.identity_port,
        backend_url: args.backend.clone(),
        token_groups: usize::from(args.token_groups),
        ..EmulatorConfig::default()
    };
    if !args.without_role.is_empty() {
        config.without_role = args.without_role.clone();
    }
    if !args.principals.is_empty() {
        config.principals = args.principals.clone();
        config.groups.clear();
        config.service_principals = args
            .principals
            .iter()
            .filter(|p| matches!(p.kind, PrincipalKind::ServicePrincipal))
            .map(|p| (p.clone(), pgentra_emulator::CLIENT_SECRET.to_owned()))
            .collect();
        if let Some(user) = config.principals.iter().find(|p| !p.is_app()) {
            config.cli_user = user.clone();
        }
        if let Some(identity) = config
            .principals
            .iter()
            .find(|p| matches!(p.kind, PrincipalKind::UserAssignedIdentity))
        {
            config.managed_identity = identity.clone();
        }
    }
    if let Some(name) = &args.answer_as {
        config.managed_identity = config
            .principals
            .iter()
            .chain(&config.without_role)
            .find(|p| &p.role == name && matches!(p.kind, PrincipalKind::UserAssignedIdentity))
            .cloned()
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "--answer-as {name}: no such managed identity (add it with --principal managed-identity:{name} or --no-role managed-identity:{name})"
                ))
            })?;
    }
    if let Some(admin) = &args.admin {
        if !config
            .principals
            .iter()
            .any(|p| &p.role == admin && p.kind == PrincipalKind::User)
        {
            return Err(CliError::Usage(format!(
                "--admin {admin}: no such user principal (add it with --principal user:{admin})"
            )));
        }
        config.admin = Some(admin.clone());
    }
    Ok(config)
}

pub(crate) fn run(args: &Args, context: Context) -> Result<ExitCode, CliError> {
    let config = config(args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::io("starting the runtime"))?;
    let emulator = Emulator::start(config)?;
    let _guard = runtime.enter();
    let shutdown = shutdown_signal();
    print_vars(emulator.env(), args.shell, context.json);
    let mut out = std::io::stdout().lock();
    if !context.json {
        let _ = writeln!(out, "# ready");
    }
    let _ = out.flush();
    drop(out);
    eprintln!(
        "pgentra emulator: gateway on localhost:{}, tokens live {}; Ctrl-C to stop",
        emulator.gateway().port(),
        humantime::format_duration(emulator.issuer().lifetime()),
    );
    runtime.block_on(shutdown);
    eprintln!("pgentra emulator: stopping");
    // Stops PostgreSQL and removes the cluster directory with the CA and shims.
    drop(emulator);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn args(flags: &[&str]) -> Args {
        let cli = crate::Cli::parse_from(["pgentra", "emulator"].iter().chain(flags));
        match cli.command {
            crate::Command::Emulator(args) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn flags_choose_principals_and_the_managed_identity() {
        let config = config(&args(&[
            "--token-lifetime",
            "20s",
            "--principal",
            "user:bob@contoso.com",
            "--principal",
            "managed-identity:a-mi",
            "--principal",
            "mi:b-mi",
            "--principal",
            "service-principal:etl",
            "--answer-as",
            "b-mi",
        ]))
        .unwrap();
        assert_eq!(config.token_lifetime, Duration::from_secs(20));
        let roles: Vec<&str> = config.principals.iter().map(|p| p.role.as_str()).collect();
        assert_eq!(roles, ["bob@contoso.com", "a-mi", "b-mi", "etl"]);
        assert_eq!(config.managed_identity.role, "b-mi");
        assert_eq!(config.cli_user.role, "bob@contoso.com");
        assert_eq!(config.service_principals.len(), 1);
        assert_eq!(config.service_principals[0].0.role, "etl");
        assert!(config.groups.is_empty());
    }

    #[test]
    fn principals_without_a_role_an_admin_and_large_tokens() {
        let chosen = config(&args(&[
            "--no-role",
            "managed-identity:billing",
            "--answer-as",
            "billing",
            "--admin",
            "alice@contoso.com",
            "--token-groups",
            "150",
        ]))
        .unwrap();
        let without: Vec<&str> = chosen
            .without_role
            .iter()
            .map(|p| p.role.as_str())
            .collect();
        assert_eq!(without, ["billing"]);
        assert_eq!(chosen.managed_identity.role, "billing");
        assert_eq!(chosen.admin.as_deref(), Some("alice@contoso.com"));
        assert_eq!(chosen.token_groups, 150);
        let not_a_user = config(&args(&["--admin", "orders-api-identity"])).unwrap_err();
        assert!(
            not_a_user.to_string().contains("no such user principal"),
            "{not_a_user}"
        );
    }

    #[test]
    fn bad_principals_and_unknown_identities_are_refused() {
        let unknown = config(&args(&["--answer-as", "nobody"])).unwrap_err();
        assert!(unknown.to_string().contains("no such managed identity"));
        for bad in ["bob", "user:", "robot:x"] {
            assert!(parse_principal(bad).is_err(), "{bad}");
        }
    }
}
