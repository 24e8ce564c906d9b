//! The options shared by the subcommands that get a token: the credential, and the role.

use crate::error::CliError;
use pgentra::conninfo::ConnInfo;
use pgentra::credential::CredentialChain;
use pgentra::{Cloud, EntraAuth};
use std::time::Duration;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

crate::settings::settings! {
    /// How to get a token: the default credential chain, narrowed or pointed elsewhere (also
    /// keys of the proxy's configuration file).
    pub(crate) struct AuthArgs {
        /// The cloud whose database scope to ask for (default: from `AZURE_AUTHORITY_HOST`, else
        /// public).
        #[arg(long, value_parser = crate::settings::cloud_parser(), conflicts_with = "scope")]
        #[serde(default, deserialize_with = "crate::settings::cloud")]
        cloud: Cloud,
        /// An explicit token scope, like `https://ossrdbms-aad.database.windows.net/.default`.
        #[arg(long)]
        scope: String,
        /// Use only this credential of the chain: a name like `AzureCliCredential` or
        /// `ManagedIdentityCredential`, or `dev` / `prod` (as `AZURE_TOKEN_CREDENTIALS`).
        #[arg(long, value_name = "NAME")]
        credential: String,
        /// Give up on getting a token after this long [default: 30s].
        #[arg(long, value_name = "TIME", value_parser = humantime::parse_duration)]
        #[serde(default, deserialize_with = "crate::settings::duration")]
        timeout: Duration,
    }
}

impl AuthArgs {
    /// A provider from these options and the environment. `user` pins the role; without it,
    /// the role comes from the token's claims.
    pub(crate) fn provider(&self, user: Option<&str>) -> Result<EntraAuth, CliError> {
        let mut vars: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| self.credential.is_none() || k != "AZURE_TOKEN_CREDENTIALS")
            .collect();
        if let Some(name) = &self.credential {
            vars.push(("AZURE_TOKEN_CREDENTIALS".into(), name.clone()));
        }
        let mut builder = EntraAuth::builder()
            .credential_chain(CredentialChain::from_vars(vars)?)
            .timeout(self.timeout.unwrap_or(DEFAULT_TIMEOUT));
        builder = match (&self.scope, &self.cloud) {
            (Some(scope), _) => builder.scope(scope.clone()),
            (None, Some(cloud)) => builder.cloud(cloud.clone()),
            (None, None) => match std::env::var("AZURE_AUTHORITY_HOST") {
                Ok(host) => builder.cloud(Cloud::from_authority_host(&host)),
                Err(_) => builder,
            },
        };
        if let Some(user) = user.filter(|u| !u.is_empty()) {
            builder = builder.username(user);
        }
        Ok(builder.build()?)
    }
}

/// `-U/--user`, the role a client logs in as, for every subcommand that gets a token for one
/// (`token`, `whoami`, `check`, `env`, `exec`; `psql` reads psql's own `-U`). The proxy's
/// `--user` pins the role of all its sessions instead, and is one of its settings.
#[derive(Debug, Default, clap::Args)]
pub(crate) struct UserArg {
    /// The role to log in as [default: the connection settings' user (`user=`, else
    /// `PGUSER`), else the role derived from the token].
    #[arg(short = 'U', long, value_name = "ROLE")]
    user: Option<String>,
}

impl UserArg {
    /// The role to pin: `--user`, else the user of `settings` (which read `PGUSER`). `None`
    /// leaves the role to the token's claims.
    pub(crate) fn role(&self, settings: &ConnInfo) -> Option<String> {
        self.user.clone().or_else(|| settings.user.clone())
    }
}

/// The credential and the role, for the subcommands that get a token without connecting
/// (`token`, `whoami`).
#[derive(Debug, clap::Args)]
pub(crate) struct TokenArgs {
    #[command(flatten)]
    auth: AuthArgs,
    #[command(flatten)]
    user: UserArg,
}

impl TokenArgs {
    /// A provider for `--user`, else `PGUSER`.
    pub(crate) fn provider(&self) -> Result<EntraAuth, CliError> {
        // Only `PGUSER`: the other `PG*` variables (and the `PGPASSWORD` that `pgentra env`
        // sets) describe a server these subcommands do not connect to.
        let user = std::env::var("PGUSER").ok().map(|user| ("PGUSER", user));
        let role = self.user.role(&ConnInfo::from_vars(user)?);
        self.auth.provider(role.as_deref())
    }
}
