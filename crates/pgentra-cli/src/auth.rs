//! The credential options shared by the subcommands that get a token.

use crate::error::CliError;
use pgentra::credential::CredentialChain;
use pgentra::{Cloud, EntraAuth};
use std::time::Duration;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Which cloud's database audience to ask a token for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum CloudName {
    /// Azure public cloud.
    Public,
    /// Azure US Government.
    UsGovernment,
    /// Azure operated by 21Vianet (China).
    China,
}

crate::settings::settings! {
    /// How to get a token: the default credential chain, narrowed or pointed elsewhere (also
    /// keys of the proxy's configuration file).
    pub(crate) struct AuthArgs {
        /// The cloud whose database scope to ask for (default: from `AZURE_AUTHORITY_HOST`, else
        /// public).
        #[arg(long, value_enum, conflicts_with = "scope")]
        cloud: CloudName,
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
        builder = match (&self.scope, self.cloud) {
            (Some(scope), _) => builder.scope(scope.clone()),
            (None, Some(cloud)) => builder.cloud(match cloud {
                CloudName::Public => Cloud::Public,
                CloudName::UsGovernment => Cloud::UsGovernment,
                CloudName::China => Cloud::China,
            }),
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
