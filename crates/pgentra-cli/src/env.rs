//! `pgentra env`, `pgentra exec` and `pgentra psql`: the libpq environment with a fresh token,
//! printed for `eval` or handed to a command.

use crate::Context;
use crate::auth::AuthArgs;
use crate::error::CliError;
use crate::output::{Shell, print_vars};
use pgentra::conninfo::ConnInfo;
use pgentra::tls::SslMode;
use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, ExitCode};

/// Where to connect and as whom; shared by `env`, `exec` and `psql`.
#[derive(Debug, Default, clap::Args)]
pub(crate) struct Target {
    #[command(flatten)]
    auth: AuthArgs,
    /// Connection settings (URL or `key=value`) over the `PG*` variables and `.env`.
    #[arg(long, value_name = "CONNINFO")]
    conninfo: Option<String>,
    /// Pin the role (default: the connection settings' user, else derived from the token).
    #[arg(long, short = 'U')]
    user: Option<String>,
}

/// Prints `PGHOST`, `PGPORT`, `PGDATABASE`, `PGUSER`, `PGPASSWORD` (a fresh token) and
/// `PGSSLMODE` (and `PGSSLROOTCERT`) for `eval "$(pgentra env)"`.
#[derive(Debug, clap::Args)]
pub(crate) struct EnvArgs {
    #[command(flatten)]
    target: Target,
    /// The shell to print for.
    #[arg(long, value_enum, default_value_t)]
    shell: Shell,
}

/// Runs a command with a fresh token in `PGPASSWORD` and the role in `PGUSER` (and the other
/// `PG*` variables), and exits with its exit code.
#[derive(Debug, clap::Args)]
pub(crate) struct ExecArgs {
    #[command(flatten)]
    target: Target,
    /// The command and its arguments (after `--`).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

/// Runs `psql` with a fresh token. Every argument goes to psql (`pgentra psql -h srv -U role
/// -c 'SELECT 1'`); choose the credential with `AZURE_TOKEN_CREDENTIALS`.
#[derive(Debug, clap::Args)]
#[command(disable_help_flag = true)]
pub(crate) struct PsqlArgs {
    /// Arguments for psql.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub(crate) args: Vec<OsString>,
}

impl Target {
    /// The libpq variables for this target, `PGPASSWORD` holding a fresh token.
    fn vars(&self) -> Result<Vec<(&'static str, String)>, CliError> {
        let env = ConnInfo::from_env()?;
        let info = match &self.conninfo {
            Some(conninfo) => ConnInfo::parse(conninfo)?.or(env),
            None => env,
        };
        let user = self.user.as_deref().or(info.user.as_deref());
        let creds = self.auth.provider(user)?.credentials_blocking()?;
        let mode = info.sslmode.unwrap_or_default();
        let root_cert = match &info.sslrootcert {
            Some(path) => Some(path.display().to_string()),
            None if mode != SslMode::Require => system_root_bundle(),
            None => None,
        };
        let optional = [
            ("PGHOST", info.host.clone()),
            ("PGHOSTADDR", info.hostaddr.clone()),
            ("PGPORT", info.port.map(|p| p.to_string())),
            ("PGDATABASE", info.dbname.clone()),
            ("PGAPPNAME", info.application_name.clone()),
            ("PGSSLROOTCERT", root_cert),
        ];
        let mut vars: Vec<(&'static str, String)> = optional
            .into_iter()
            .filter_map(|(name, value)| Some((name, value?)))
            .collect();
        vars.push(("PGSSLMODE", mode.as_str().to_owned()));
        vars.push(("PGUSER", creds.user().to_owned()));
        vars.push(("PGPASSWORD", creds.password().expose_secret().to_owned()));
        Ok(vars)
    }
}

/// The operating system's CA bundle, for libpq before 16 (which has no `sslrootcert=system`).
/// Azure's server certificates chain to roots every such bundle holds.
fn system_root_bundle() -> Option<String> {
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ]
    .into_iter()
    .find(|path| Path::new(path).is_file())
    .map(str::to_owned)
    .or_else(|| Some("system".to_owned()))
}

pub(crate) fn run_env(args: &EnvArgs, context: Context) -> Result<ExitCode, CliError> {
    print_vars(args.target.vars()?, args.shell, context.json);
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn run_exec(args: &ExecArgs) -> Result<ExitCode, CliError> {
    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| CliError::Usage("exec needs a command to run".into()))?;
    run_with_token(&args.target, program, rest)
}

pub(crate) fn run_psql(args: &PsqlArgs) -> Result<ExitCode, CliError> {
    run_with_token(&Target::default(), &OsString::from("psql"), &args.args)
}

fn run_with_token(
    target: &Target,
    program: &OsString,
    args: &[OsString],
) -> Result<ExitCode, CliError> {
    let mut command = Command::new(program);
    command.args(args).envs(target.vars()?);
    let name = Path::new(program).display().to_string();
    run(command, &name)
}

/// Replaces this process with the command, so its exit code and signals are its own.
#[cfg(unix)]
fn run(mut command: Command, name: &str) -> Result<ExitCode, CliError> {
    use std::os::unix::process::CommandExt as _;
    let error = command.exec();
    Err(CliError::Spawn {
        program: name.to_owned(),
        source: error,
    })
}

/// Runs the command and passes its exit code on.
#[cfg(not(unix))]
fn run(mut command: Command, name: &str) -> Result<ExitCode, CliError> {
    let status = command.status().map_err(|source| CliError::Spawn {
        program: name.to_owned(),
        source,
    })?;
    let code = status.code().unwrap_or(1);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
