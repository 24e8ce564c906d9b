//! The default credential chain: the `DefaultAzureCredential` of the other Azure SDKs, built from
//! the official `azure_identity` credentials.
//!
//! [`CredentialChain::from_env`] tries, in order:
//!
//! | # | Credential | Configured by |
//! |---|------------|---------------|
//! | 1 | `EnvironmentCredential` (service principal) | `AZURE_TENANT_ID` + `AZURE_CLIENT_ID` + `AZURE_CLIENT_SECRET`, or `AZURE_CLIENT_CERTIFICATE_PATH` (feature `client-certificate`) |
//! | 2 | `WorkloadIdentityCredential` | `AZURE_FEDERATED_TOKEN_FILE` + `AZURE_TENANT_ID` + `AZURE_CLIENT_ID` |
//! | 3 | `ManagedIdentityCredential` | App Service (`IDENTITY_ENDPOINT`/`IDENTITY_HEADER`) or IMDS; user-assigned with `AZURE_CLIENT_ID` |
//! | 4 | `AzureCliCredential` | `az login` |
//! | 5 | `AzureDeveloperCliCredential` | `azd auth login` |
//!
//! The first credential that returns a token is kept for every later call. When all fail, the
//! error lists each credential and its reason.
//!
//! `AZURE_TOKEN_CREDENTIALS` narrows the chain: `dev` (the two CLIs), `prod` (the first three),
//! or one credential's name, such as `ManagedIdentityCredential`.
//!
//! Managed identity is probed: while other credentials remain to be tried, its first attempt is
//! cut off after one second (the IMDS client otherwise retries for over a minute on a machine
//! that has no managed-identity endpoint). `AZURE_POD_IDENTITY_AUTHORITY_HOST`, as in the other
//! Azure SDKs, sends IMDS requests to another host (an emulator or a pod identity proxy).
//!
//! Every credential that asks a token endpoint over HTTP (all but the two CLIs) does so through
//! a transport that notes the endpoint's failed answers (status and a short excerpt of the body,
//! never anything from the request), so that the [provider](crate::EntraAuth) can report them
//! at once while the credential retries.

mod observed;

pub(crate) use observed::{AnswerRecorder, Answers};

use crate::error::{CredentialAttempt, Error};
use azure_core::credentials::{
    AccessToken, Secret as AzureSecret, TokenCredential, TokenRequestOptions,
};
use azure_core::http::{AsyncRawResponse, ClientOptions, HttpClient, Request, Url};
use azure_identity::{
    AzureCliCredential, AzureCliCredentialOptions, AzureDeveloperCliCredential,
    AzureDeveloperCliCredentialOptions, ClientSecretCredential, ClientSecretCredentialOptions,
    Executor, ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId,
    WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use observed::Observed;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// How long the managed-identity credential may take on its first attempt while other
/// credentials remain to be tried.
pub const MANAGED_IDENTITY_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The address the IMDS managed-identity client always calls.
const IMDS_HOST: &str = "169.254.169.254";

/// One kind of credential in the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CredentialKind {
    /// A service principal configured by `AZURE_TENANT_ID`, `AZURE_CLIENT_ID` and a secret or
    /// certificate.
    Environment,
    /// Kubernetes workload identity (`AZURE_FEDERATED_TOKEN_FILE`).
    WorkloadIdentity,
    /// The managed identity of the Azure resource the process runs on.
    ManagedIdentity,
    /// The signed-in Azure CLI user (`az`).
    AzureCli,
    /// The signed-in Azure Developer CLI user (`azd`).
    AzureDeveloperCli,
}

impl CredentialKind {
    /// Every kind, in chain order.
    pub const ALL: [Self; 5] = [
        Self::Environment,
        Self::WorkloadIdentity,
        Self::ManagedIdentity,
        Self::AzureCli,
        Self::AzureDeveloperCli,
    ];

    /// The name the Azure SDKs use, which is also the value `AZURE_TOKEN_CREDENTIALS` accepts.
    pub fn name(self) -> &'static str {
        match self {
            Self::Environment => "EnvironmentCredential",
            Self::WorkloadIdentity => "WorkloadIdentityCredential",
            Self::ManagedIdentity => "ManagedIdentityCredential",
            Self::AzureCli => "AzureCliCredential",
            Self::AzureDeveloperCli => "AzureDeveloperCliCredential",
        }
    }

    /// Whether `AZURE_TOKEN_CREDENTIALS=dev` keeps this credential (`prod` keeps the others).
    pub fn is_developer_tool(self) -> bool {
        matches!(self, Self::AzureCli | Self::AzureDeveloperCli)
    }
}

impl fmt::Display for CredentialKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Environment variables, read once so the chain is configured from one consistent view.
struct Vars(HashMap<String, String>);

impl Vars {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

struct Entry {
    kind: CredentialKind,
    /// The credential, or why it could not be configured (its reason in a failure report).
    credential: Result<Arc<dyn TokenCredential>, String>,
}

/// A chain of `azure_identity` credentials that behaves like `DefaultAzureCredential`; see the
/// [module docs](self).
///
/// ```no_run
/// use azure_core::credentials::TokenCredential;
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let chain = pgentra::credential::CredentialChain::from_env()?;
/// let (token, used) = chain.token(pgentra::Cloud::Public.scope()).await?;
/// println!("{used} answered; token expires at {}", token.expires_on);
/// # Ok(()) }
/// ```
pub struct CredentialChain {
    entries: Vec<Entry>,
    /// Index of the entry that first returned a token, or `usize::MAX`.
    selected: AtomicUsize,
    /// Where the credentials' transports record their token endpoints' failed answers.
    answers: AnswerRecorder,
}

impl fmt::Debug for CredentialChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialChain")
            .field("credentials", &self.kinds())
            .field("selected", &self.selected())
            .finish()
    }
}

impl CredentialChain {
    /// Builds the chain from the process environment.
    ///
    /// Fails only if `AZURE_TOKEN_CREDENTIALS` has a value it does not know; credentials that
    /// are not configured stay in the chain and report why when it is used.
    pub fn from_env() -> crate::Result<Self> {
        Self::from_vars(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    /// Builds the chain from the given variables instead of the process environment.
    ///
    /// The chain reads its configuration (and the `PATH` it runs `az` and `azd` with) from
    /// `vars`. The managed-identity credential of `azure_identity` still decides between App
    /// Service (`IDENTITY_ENDPOINT`) and IMDS from the process environment.
    pub fn from_vars<K, V>(vars: impl IntoIterator<Item = (K, V)>) -> crate::Result<Self>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let vars = Vars(
            vars.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        );
        let kinds = selected_kinds(vars.get("AZURE_TOKEN_CREDENTIALS"))?;
        let answers = AnswerRecorder::new();
        let entries = kinds
            .into_iter()
            .map(|kind| Entry {
                kind,
                credential: build(kind, &vars, &answers),
            })
            .collect();
        Ok(Self {
            entries,
            selected: AtomicUsize::new(usize::MAX),
            answers,
        })
    }

    /// The failed answers of the chain's token endpoints (see the [module docs](self)).
    pub(crate) fn answers(&self) -> &AnswerRecorder {
        &self.answers
    }

    /// The credentials in the chain, in the order they are tried.
    pub fn kinds(&self) -> Vec<CredentialKind> {
        self.entries.iter().map(|e| e.kind).collect()
    }

    /// The credential that answered first and is now used for every call, if any has.
    pub fn selected(&self) -> Option<CredentialKind> {
        self.entries
            .get(self.selected.load(Ordering::Acquire))
            .map(|e| e.kind)
    }

    /// Gets a token for `scope`, and says which credential produced it.
    pub async fn token(&self, scope: &str) -> crate::Result<(AccessToken, CredentialKind)> {
        let scopes = [scope];
        if let Some(Entry {
            kind,
            credential: Ok(credential),
        }) = self.entries.get(self.selected.load(Ordering::Acquire))
        {
            return credential
                .get_token(&scopes, None)
                .await
                .map(|token| (token, *kind))
                .map_err(|e| Error::credential(kind.name(), &e));
        }
        let mut attempts = Vec::with_capacity(self.entries.len());
        for (index, entry) in self.entries.iter().enumerate() {
            let reason = match &entry.credential {
                Err(reason) => reason.clone(),
                Ok(credential) => {
                    let probe = entry.kind == CredentialKind::ManagedIdentity
                        && index + 1 < self.entries.len();
                    match attempt(credential.as_ref(), &scopes, probe).await {
                        Ok(token) => {
                            self.selected.store(index, Ordering::Release);
                            tracing::debug!(
                                credential = entry.kind.name(),
                                "credential chain selected a credential"
                            );
                            return Ok((token, entry.kind));
                        }
                        Err(reason) => reason,
                    }
                }
            };
            tracing::debug!(credential = entry.kind.name(), %reason, "credential unavailable");
            attempts.push(CredentialAttempt {
                credential: entry.kind.name().to_owned(),
                reason,
            });
        }
        Err(Error::NoCredential { attempts })
    }
}

async fn attempt(
    credential: &dyn TokenCredential,
    scopes: &[&str],
    probe: bool,
) -> Result<AccessToken, String> {
    let request = credential.get_token(scopes, None);
    if !probe {
        return request.await.map_err(|e| crate::error::reason(&e));
    }
    match tokio::time::timeout(MANAGED_IDENTITY_PROBE_TIMEOUT, request).await {
        Ok(result) => result.map_err(|e| crate::error::reason(&e)),
        Err(_) => Err(format!(
            "no managed identity endpoint answered within {MANAGED_IDENTITY_PROBE_TIMEOUT:?}"
        )),
    }
}

#[async_trait::async_trait]
impl TokenCredential for CredentialChain {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let [scope] = scopes else {
            return Err(azure_core::Error::with_message(
                azure_core::error::ErrorKind::Credential,
                "CredentialChain needs exactly one scope",
            ));
        };
        self.token(scope)
            .await
            .map(|(token, _)| token)
            .map_err(|e| {
                azure_core::Error::with_message(
                    azure_core::error::ErrorKind::Credential,
                    e.to_string(),
                )
            })
    }
}

fn selected_kinds(filter: Option<&str>) -> crate::Result<Vec<CredentialKind>> {
    let Some(filter) = filter.map(str::trim) else {
        return Ok(CredentialKind::ALL.to_vec());
    };
    let kinds: Vec<CredentialKind> = match filter.to_ascii_lowercase().as_str() {
        "dev" => CredentialKind::ALL
            .into_iter()
            .filter(|k| k.is_developer_tool())
            .collect(),
        "prod" => CredentialKind::ALL
            .into_iter()
            .filter(|k| !k.is_developer_tool())
            .collect(),
        name => CredentialKind::ALL
            .into_iter()
            .filter(|k| k.name().eq_ignore_ascii_case(name))
            .collect(),
    };
    if kinds.is_empty() {
        let names: Vec<&str> = CredentialKind::ALL.iter().map(|k| k.name()).collect();
        return Err(Error::config(format!(
            "AZURE_TOKEN_CREDENTIALS={filter:?} is not one of dev, prod, {}",
            names.join(", ")
        )));
    }
    Ok(kinds)
}

fn build(
    kind: CredentialKind,
    vars: &Vars,
    answers: &AnswerRecorder,
) -> Result<Arc<dyn TokenCredential>, String> {
    let built: azure_core::Result<Arc<dyn TokenCredential>> = match kind {
        CredentialKind::Environment => return environment(vars, answers),
        CredentialKind::WorkloadIdentity => {
            let (Some(file), Some(tenant), Some(client)) = (
                vars.get("AZURE_FEDERATED_TOKEN_FILE"),
                vars.get("AZURE_TENANT_ID"),
                vars.get("AZURE_CLIENT_ID"),
            ) else {
                return Err(
                    "not configured: set AZURE_FEDERATED_TOKEN_FILE, AZURE_TENANT_ID and AZURE_CLIENT_ID"
                        .into(),
                );
            };
            let mut options = WorkloadIdentityCredentialOptions {
                client_id: Some(client.to_owned()),
                tenant_id: Some(tenant.to_owned()),
                token_file_path: Some(file.into()),
                ..Default::default()
            };
            options.credential_options.client_options = client_options(vars, answers);
            WorkloadIdentityCredential::new(Some(options)).map(|c| c as _)
        }
        CredentialKind::ManagedIdentity => {
            let mut http = azure_core::http::new_http_client(None);
            if let Some(host) = vars.get("AZURE_POD_IDENTITY_AUTHORITY_HOST") {
                let target = Url::parse(host).map_err(|e| {
                    format!("AZURE_POD_IDENTITY_AUTHORITY_HOST={host:?} is not a URL: {e}")
                })?;
                http = Arc::new(ImdsRedirect {
                    target,
                    inner: http,
                });
            }
            let client_options = ClientOptions {
                transport: Some(Observed::transport(http, answers)),
                ..ClientOptions::default()
            };
            ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                user_assigned_id: vars
                    .get("AZURE_CLIENT_ID")
                    .map(|id| UserAssignedId::ClientId(id.to_owned())),
                client_options,
            }))
            .map(|c| c as _)
        }
        CredentialKind::AzureCli => AzureCliCredential::new(Some(AzureCliCredentialOptions {
            executor: Some(path_executor(vars)),
            ..Default::default()
        }))
        .map(|c| c as _),
        CredentialKind::AzureDeveloperCli => {
            AzureDeveloperCliCredential::new(Some(AzureDeveloperCliCredentialOptions {
                executor: Some(path_executor(vars)),
                ..Default::default()
            }))
            .map(|c| c as _)
        }
    };
    configured(built)
}

fn environment(vars: &Vars, answers: &AnswerRecorder) -> Result<Arc<dyn TokenCredential>, String> {
    let (Some(tenant), Some(client)) = (vars.get("AZURE_TENANT_ID"), vars.get("AZURE_CLIENT_ID"))
    else {
        return Err(
            "not configured: set AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET (or AZURE_CLIENT_CERTIFICATE_PATH)"
                .into(),
        );
    };
    if let Some(secret) = vars.get("AZURE_CLIENT_SECRET") {
        let options = ClientSecretCredentialOptions {
            client_options: client_options(vars, answers),
        };
        return configured(
            ClientSecretCredential::new(
                tenant,
                client.to_owned(),
                AzureSecret::new(secret.to_owned()),
                Some(options),
            )
            .map(|c| c as _),
        );
    }
    match vars.get("AZURE_CLIENT_CERTIFICATE_PATH") {
        Some(path) => certificate(vars, answers, tenant, client, path),
        None => Err("not configured: AZURE_CLIENT_ID is set but neither AZURE_CLIENT_SECRET nor AZURE_CLIENT_CERTIFICATE_PATH is".into()),
    }
}

#[cfg(feature = "client-certificate")]
fn certificate(
    vars: &Vars,
    answers: &AnswerRecorder,
    tenant: &str,
    client: &str,
    path: &str,
) -> Result<Arc<dyn TokenCredential>, String> {
    use azure_identity::{ClientCertificateCredential, ClientCertificateCredentialOptions};
    let bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read AZURE_CLIENT_CERTIFICATE_PATH {path}: {e}"))?;
    let mut options = ClientCertificateCredentialOptions {
        client_options: client_options(vars, answers),
        ..Default::default()
    };
    options.password = vars
        .get("AZURE_CLIENT_CERTIFICATE_PASSWORD")
        .map(|p| AzureSecret::new(p.to_owned()));
    configured(
        ClientCertificateCredential::new(
            tenant.to_owned(),
            client.to_owned(),
            bytes.into(),
            Some(options),
        )
        .map(|c| c as _),
    )
}

#[cfg(not(feature = "client-certificate"))]
fn certificate(
    _vars: &Vars,
    _answers: &AnswerRecorder,
    _tenant: &str,
    _client: &str,
    _path: &str,
) -> Result<Arc<dyn TokenCredential>, String> {
    Err("AZURE_CLIENT_CERTIFICATE_PATH is set, but pgentra was built without its `client-certificate` feature".into())
}

/// A built credential, or the reason it could not be built.
fn configured(
    built: azure_core::Result<Arc<dyn TokenCredential>>,
) -> Result<Arc<dyn TokenCredential>, String> {
    built.map_err(|e| format!("cannot be configured: {}", crate::error::reason(&e)))
}

/// Client options that honour `AZURE_AUTHORITY_HOST` from `vars` (azure_identity would
/// otherwise read it from the process environment), with a transport that records failed
/// answers in `answers`.
fn client_options(vars: &Vars, answers: &AnswerRecorder) -> ClientOptions {
    let mut options = ClientOptions {
        transport: Some(Observed::transport(
            azure_core::http::new_http_client(None),
            answers,
        )),
        ..ClientOptions::default()
    };
    if let Some(host) = vars.get("AZURE_AUTHORITY_HOST") {
        let mut custom = azure_core::cloud::CustomConfiguration::default();
        custom.authority_host = host.to_owned();
        options.cloud = Some(Arc::new(custom.into()));
    }
    options
}

fn path_executor(vars: &Vars) -> Arc<dyn Executor> {
    Arc::new(PathExecutor {
        path: vars.get("PATH").map(OsString::from),
    })
}

/// Runs the CLI credentials' commands with the chain's `PATH`.
#[derive(Debug)]
struct PathExecutor {
    path: Option<OsString>,
}

#[async_trait::async_trait]
impl Executor for PathExecutor {
    async fn run(&self, program: &OsStr, args: &[&OsStr]) -> std::io::Result<std::process::Output> {
        let mut command = tokio::process::Command::new(program);
        command.args(args).kill_on_drop(true);
        if let Some(path) = &self.path {
            command.env("PATH", path);
        }
        command.output().await
    }
}

/// Sends requests meant for IMDS to `AZURE_POD_IDENTITY_AUTHORITY_HOST` instead.
#[derive(Debug)]
struct ImdsRedirect {
    target: Url,
    inner: Arc<dyn HttpClient>,
}

#[async_trait::async_trait]
impl HttpClient for ImdsRedirect {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        if request.url().host_str() != Some(IMDS_HOST) {
            return self.inner.execute_request(request).await;
        }
        let mut redirected = request.clone();
        let url = redirected.url_mut();
        // Both URLs are http(s) with a host, so these setters cannot fail.
        let _ = url.set_scheme(self.target.scheme());
        let _ = url.set_host(self.target.host_str());
        let _ = url.set_port(self.target.port());
        self.inner.execute_request(&redirected).await
    }
}

#[cfg(test)]
mod tests;
