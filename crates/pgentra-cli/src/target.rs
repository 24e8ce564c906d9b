//! Where to connect and as whom: the arguments `check`, `env` and `exec` share.

use crate::auth::{AuthArgs, UserArg};
use pgentra::conninfo::ConnInfo;

/// The connection settings, the credential and the role.
///
/// The connection settings are positional, as psql's are (`pgentra psql` hands its arguments
/// to psql unchanged); `--conninfo` is accepted as their older spelling.
#[derive(Debug, Default, clap::Args)]
pub(crate) struct Target {
    /// Connection settings (a `postgres://` URL or `key=value` pairs) over the `PG*`
    /// variables. The variables' `PGHOSTADDR`, `PGPORT`, `PGSSLMODE` and `PGSSLROOTCERT` apply
    /// only if their `PGHOST` is the host named here.
    #[arg(value_name = "CONNINFO")]
    conninfo: Option<String>,
    /// The same as CONNINFO.
    #[arg(
        long = "conninfo",
        value_name = "CONNINFO",
        hide = true,
        conflicts_with = "conninfo"
    )]
    conninfo_flag: Option<String>,
    #[command(flatten)]
    pub(crate) auth: AuthArgs,
    #[command(flatten)]
    pub(crate) user: UserArg,
}

impl Target {
    /// The settings named on the command line, without the environment's.
    pub(crate) fn explicit(&self) -> Result<ConnInfo, pgentra::Error> {
        match self.conninfo.as_ref().or(self.conninfo_flag.as_ref()) {
            Some(conninfo) => ConnInfo::parse(conninfo),
            None => Ok(ConnInfo::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    fn explicit(args: &[&str]) -> Result<Option<String>, clap::Error> {
        let cli = crate::Cli::try_parse_from(["pgentra", "env"].iter().chain(args))?;
        let crate::Command::Env(env) = cli.command else {
            panic!("not env");
        };
        Ok(env.target.explicit().unwrap().host)
    }

    #[test]
    fn conninfo_is_positional_or_a_flag_but_not_both() {
        assert_eq!(explicit(&["host=a"]).unwrap().as_deref(), Some("a"));
        assert_eq!(
            explicit(&["--conninfo", "host=b"]).unwrap().as_deref(),
            Some("b")
        );
        assert_eq!(explicit(&[]).unwrap(), None);
        assert!(explicit(&["host=a", "--conninfo", "host=b"]).is_err());
    }
}
