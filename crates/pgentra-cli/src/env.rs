//! `pgentra env`, `pgentra exec` and `pgentra psql`: the libpq environment with a fresh token,
//! printed for `eval` or handed to a command.

use crate::Context;
use crate::error::CliError;
use crate::output::{Shell, print_vars};
use crate::target::Target;
use pgentra::conninfo::ConnInfo;
use pgentra::tls::SslMode;
use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, ExitCode};

/// Prints `PGHOST`, `PGPORT`, `PGDATABASE`, `PGUSER`, `PGPASSWORD` (a fresh token) and
/// `PGSSLMODE` (and `PGSSLROOTCERT`) for `eval "$(pgentra env)"`.
#[derive(Debug, clap::Args)]
pub(crate) struct EnvArgs {
    #[command(flatten)]
    pub(crate) target: Target,
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
    /// The command and its arguments, after `--` (so that CONNINFO is not taken for the
    /// command).
    #[arg(last = true, required = true, value_name = "COMMAND")]
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

/// The libpq variables that say where and as whom to connect. A child gets exactly the ones
/// pgentra chose: inherited values for another server are removed, not left for libpq to apply.
const CONNECTION_VARS: [&str; 9] = [
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGPASSWORD",
    "PGSSLMODE",
    "PGSSLROOTCERT",
    "PGAPPNAME",
];

/// The libpq variables for `explicit` over the environment, `PGPASSWORD` holding a fresh
/// token from `target`'s credential.
fn vars(target: &Target, explicit: ConnInfo) -> Result<Vec<(&'static str, String)>, CliError> {
    if std::env::var_os("PGSERVICE").is_some_and(|s| !s.is_empty()) {
        // libpq lets a service file override the variables set here, sslmode included.
        return Err(CliError::Usage(
            "PGSERVICE is set, and a service file could send the token elsewhere or without TLS; unset it and name the server with CONNINFO or PGHOST".into(),
        ));
    }
    let info = explicit.or(ConnInfo::from_env()?);
    let role = target.user.role(&info);
    let creds = target
        .auth
        .provider(role.as_deref())?
        .credentials_blocking()?;
    let mode = info.sslmode.unwrap_or_default();
    let root_cert = match &info.sslrootcert {
        Some(path) => Some(path.display().to_string()),
        None if mode != SslMode::Require => system_root_bundle(),
        None => None,
    };
    let optional = [
        ("PGHOST", info.host),
        ("PGHOSTADDR", info.hostaddr),
        ("PGPORT", info.port.map(|p| p.to_string())),
        ("PGDATABASE", info.dbname),
        ("PGAPPNAME", info.application_name),
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
    let vars = vars(&args.target, args.target.explicit()?)?;
    print_vars(vars, args.shell, context.json);
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn run_exec(args: &ExecArgs) -> Result<ExitCode, CliError> {
    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| CliError::Usage("exec needs a command to run".into()))?;
    let vars = vars(&args.target, args.target.explicit()?)?;
    run_with(vars, program, rest)
}

pub(crate) fn run_psql(args: &PsqlArgs) -> Result<ExitCode, CliError> {
    let vars = vars(&Target::default(), psql_settings(&args.args)?)?;
    run_with(vars, &OsString::from("psql"), &args.args)
}

fn run_with(
    vars: Vec<(&'static str, String)>,
    program: &OsString,
    args: &[OsString],
) -> Result<ExitCode, CliError> {
    let mut command = Command::new(program);
    command.args(args);
    for name in CONNECTION_VARS {
        command.env_remove(name);
    }
    command.envs(vars);
    let name = Path::new(program).display().to_string();
    run(command, &name)
}

/// psql's options that take a value (its getopt string `c:d:f:F:h:L:o:p:P:R:T:U:v:`).
const PSQL_SHORT_WITH_VALUE: &[u8] = b"cdfFhLopPRTUv";
const PSQL_LONG_WITH_VALUE: [&str; 14] = [
    "command",
    "dbname",
    "file",
    "field-separator",
    "host",
    "log-file",
    "output",
    "port",
    "pset",
    "record-separator",
    "set",
    "table-attr",
    "username",
    "variable",
];

/// The connection settings psql's own arguments name (`-h`, `-p`, `-U`, `-d` or the first
/// argument, which may be a URL or `key=value` string, and the second, a user), so that the
/// environment's settings for another server are not handed to psql beside them.
fn psql_settings(args: &[OsString]) -> Result<ConnInfo, CliError> {
    let mut options: Vec<(String, String)> = Vec::new();
    let mut positional: Vec<String> = Vec::new();
    let mut args = args.iter().map(|a| a.to_string_lossy().into_owned());
    let mut only_positional = false;
    while let Some(arg) = args.next() {
        if only_positional || arg == "-" || !arg.starts_with('-') {
            positional.push(arg);
        } else if arg == "--" {
            only_positional = true;
        } else if let Some(long) = arg.strip_prefix("--") {
            let (name, value) = match long.split_once('=') {
                Some((name, value)) => (name, Some(value.to_owned())),
                None => (long, None),
            };
            if PSQL_LONG_WITH_VALUE.contains(&name) {
                let value = value.or_else(|| args.next()).unwrap_or_default();
                options.push((name.to_owned(), value));
            }
        } else {
            // A cluster of short flags, the first one that takes a value ending it.
            let flags = &arg.as_bytes()[1..];
            if let Some(at) = flags.iter().position(|f| PSQL_SHORT_WITH_VALUE.contains(f)) {
                let rest = &arg[at + 2..];
                let value = if rest.is_empty() {
                    args.next().unwrap_or_default()
                } else {
                    rest.to_owned()
                };
                let name = match flags[at] {
                    b'h' => "host",
                    b'p' => "port",
                    b'U' => "username",
                    b'd' => "dbname",
                    _ => "other",
                };
                options.push((name.to_owned(), value));
            }
        }
    }
    let option = |name: &str| {
        options
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let mut info = ConnInfo::default();
    match option("dbname").or_else(|| positional.first().cloned()) {
        // psql expands a database name that is a URL or `key=value` string.
        Some(db)
            if db.contains('=')
                || db.starts_with("postgres://")
                || db.starts_with("postgresql://") =>
        {
            info = ConnInfo::parse(&db)?;
        }
        Some(db) => info.dbname = Some(db),
        None => {}
    }
    // Options win over the expanded string, as in psql.
    if let Some(host) = option("host").filter(|h| !h.is_empty()) {
        info.host = Some(host);
    }
    if let Some(port) = option("port").filter(|p| !p.is_empty()) {
        info.port = Some(port.parse().map_err(|_| {
            CliError::Usage(format!(
                "psql port {port:?} is not a number between 0 and 65535"
            ))
        })?);
    }
    if let Some(user) = option("username").or_else(|| positional.get(1).cloned()) {
        info.user = Some(user);
    }
    Ok(info)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(args: &[&str]) -> ConnInfo {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        psql_settings(&args).unwrap()
    }

    #[test]
    fn psql_arguments_name_the_server() {
        let info = settings(&["-h", "srv", "-p", "6432", "-U", "readers", "app"]);
        assert_eq!(
            (
                info.host.as_deref(),
                info.port,
                info.user.as_deref(),
                info.dbname.as_deref()
            ),
            (Some("srv"), Some(6432), Some("readers"), Some("app"))
        );
        // Clustered flags, attached values, long forms, and `-c` values that look like options.
        let info = settings(&[
            "-qAt",
            "-hsrv",
            "--port=7000",
            "-c",
            "-h other",
            "--username",
            "u",
        ]);
        assert_eq!(
            (info.host.as_deref(), info.port, info.user.as_deref()),
            (Some("srv"), Some(7000), Some("u"))
        );
        let info = settings(&["-Xqh", "srv", "db", "role"]);
        assert_eq!(
            (
                info.host.as_deref(),
                info.dbname.as_deref(),
                info.user.as_deref()
            ),
            (Some("srv"), Some("db"), Some("role"))
        );
        assert_eq!(settings(&["-c", "select 1"]), ConnInfo::default());
    }

    #[test]
    fn psql_connection_strings_are_parsed_and_checked() {
        let info = settings(&["postgres://srv:6000/app?sslmode=verify-ca"]);
        assert_eq!((info.host.as_deref(), info.port), (Some("srv"), Some(6000)));
        let info = settings(&["-d", "host=srv hostaddr=10.0.0.1 dbname=app", "-h", "other"]);
        assert_eq!(
            (info.host.as_deref(), info.hostaddr.as_deref()),
            (Some("other"), Some("10.0.0.1"))
        );
        // Options that would send the token in clear text are refused, as everywhere.
        let args: Vec<OsString> = ["host=srv sslmode=disable"]
            .iter()
            .map(OsString::from)
            .collect();
        assert!(psql_settings(&args).is_err());
        let args: Vec<OsString> = ["-p", "x"].iter().map(OsString::from).collect();
        assert!(matches!(psql_settings(&args), Err(CliError::Usage(_))));
    }
}
