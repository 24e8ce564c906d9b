//! [`Emulator`]: issuer, identity endpoints, gateway and a throwaway PostgreSQL, started together.

use crate::backend::{BackendError, Cluster, psql_url};
use crate::ca::Ca;
use crate::directory::{Directory, Group};
use crate::gateway::{BackendAddr, Gateway, GatewayConfig};
use crate::identity::{Identities, IdentityServer};
use crate::issuer::{IssuedToken, Issuer, Principal, PrincipalKind};
use crate::provision;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Errors from starting the emulator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmulatorError {
    /// The PostgreSQL backend could not be started.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A listener or file could not be set up.
    #[error("{what} failed")]
    Io {
        /// What was being set up.
        what: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The backend URL is not a usable `postgres://` URL.
    #[error("invalid backend URL: {0}")]
    BackendUrl(String),
    /// The certificate authority could not be made.
    #[error("making the emulator's certificates: {0}")]
    Certificates(String),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> EmulatorError {
    move |source| EmulatorError::Io { what, source }
}

/// What the emulator issues tokens for and accepts.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// Lifetime of issued tokens (seconds to hours).
    pub token_lifetime: Duration,
    /// The tenant ID.
    pub tenant: String,
    /// The accepted audience (the public cloud's by default).
    pub audience: String,
    /// Principals with a role in the database from the start.
    pub principals: Vec<Principal>,
    /// Principals Entra ID knows that have no role yet: an Entra administrator creates theirs
    /// with `pgaadauth_create_principal`.
    pub without_role: Vec<Principal>,
    /// Group roles and their members.
    pub groups: Vec<(String, Vec<Principal>)>,
    /// The role of the server's Entra administrator, among `principals` (member of
    /// `azure_pg_admin`, `CREATEROLE`, `CREATEDB`). `None`: the first user principal.
    pub admin: Option<String>,
    /// Group object IDs in every token (see [`Issuer::set_token_groups`]): 150 make an 8 KB
    /// token.
    pub token_groups: usize,
    /// The identity the managed-identity endpoints answer as without a `client_id`.
    pub managed_identity: Principal,
    /// The user signed in to the `az`/`azd` shims.
    pub cli_user: Principal,
    /// Service principals and their client secrets.
    pub service_principals: Vec<(Principal, String)>,
    /// How long a client may take to log in to the gateway.
    pub login_timeout: Duration,
    /// Allowed clock skew when checking `nbf`/`exp`.
    pub skew: Duration,
    /// The gateway's port (0: any free port).
    pub gateway_port: u16,
    /// The identity endpoints' HTTP port (0: any free port).
    pub identity_port: u16,
    /// An existing PostgreSQL to use instead of a throwaway cluster, as a
    /// `postgres://user@host:port/db` URL whose user is a superuser (it installs Azure's
    /// provisioning functions in the `postgres` database). The server must trust
    /// the gateway's connections from loopback (`host all all 127.0.0.1/32 trust`).
    pub backend_url: Option<String>,
}

/// The default user principal.
pub const USER: &str = "alice@contoso.com";
/// The default user-assigned managed identity, which the managed-identity endpoints answer as.
pub const MANAGED_IDENTITY: &str = "orders-api-identity";
/// The default service principal's client secret.
pub const CLIENT_SECRET: &str = "emulator-client-secret";
/// A user-assigned managed identity Entra ID knows but the database has no role for (yet): an
/// Entra administrator creates it with `pgaadauth_create_principal('billing-identity', false,
/// false)`.
pub const IDENTITY_WITHOUT_ROLE: &str = "billing-identity";

impl Default for EmulatorConfig {
    /// A user ([`USER`], also signed in to the CLI shims, and the Entra administrator), a
    /// user-assigned managed identity ([`MANAGED_IDENTITY`], answering the managed-identity
    /// endpoints), a service principal `reporting-app`, a group `readers` with all three, a
    /// managed identity without a role ([`IDENTITY_WITHOUT_ROLE`]), 1-hour tokens.
    fn default() -> Self {
        let user = Principal::user(USER);
        let identity = Principal::user_assigned_identity(MANAGED_IDENTITY);
        let app = Principal::service_principal("reporting-app");
        Self {
            token_lifetime: Duration::from_secs(3600),
            tenant: "72f988bf-0000-4000-8000-00000000e001".into(),
            audience: pgentra::Cloud::Public.audience().into(),
            principals: vec![user.clone(), identity.clone(), app.clone()],
            without_role: vec![Principal::user_assigned_identity(IDENTITY_WITHOUT_ROLE)],
            groups: vec![(
                "readers".into(),
                vec![user.clone(), identity.clone(), app.clone()],
            )],
            admin: None,
            token_groups: 0,
            managed_identity: identity,
            cli_user: user,
            service_principals: vec![(app, CLIENT_SECRET.into())],
            login_timeout: Duration::from_secs(10),
            skew: Duration::from_secs(5),
            gateway_port: 0,
            identity_port: 0,
            backend_url: None,
        }
    }
}

/// A running emulator: Entra ID endpoints, the gateway, and the PostgreSQL behind it.
///
/// ```no_run
/// use pgentra_emulator::Emulator;
/// let emulator = Emulator::shared(); // started once per test binary
/// for (name, value) in emulator.env() {
///     println!("export {name}={value}");
/// }
/// ```
#[derive(Debug)]
pub struct Emulator {
    config: EmulatorConfig,
    issuer: Arc<Issuer>,
    identity: IdentityServer,
    gateway: Gateway,
    ca_file: PathBuf,
    /// What the gateway presents: a certificate from the CA for `localhost`.
    server_tls: Arc<rustls::ServerConfig>,
    bin_dir: PathBuf,
    backend: BackendAddr,
    // Last: the directory that holds the files above (the cluster's, or a temp dir).
    files: Files,
}

/// Where the emulator's files live: inside the throwaway cluster's directory, or in a temp
/// directory of their own when the backend is external.
#[derive(Debug)]
enum Files {
    Cluster(Cluster),
    Own(PathBuf),
}

impl Drop for Files {
    fn drop(&mut self) {
        if let Self::Own(dir) = self {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Emulator {
    /// Starts everything: the cluster (with Azure's provisioning functions, the Entra
    /// administrator, and a role per principal and group), the issuer, the identity endpoints
    /// and the gateway.
    pub fn start(config: EmulatorConfig) -> Result<Self, EmulatorError> {
        let directory = Arc::new(directory_of(&config));
        let admin = config.admin_role().map(str::to_owned);
        let mut sql = provision::setup(&directory, &config.tenant);
        for principal in &config.principals {
            let object_type = if principal.is_app() {
                "service"
            } else {
                "user"
            };
            let is_admin = admin.as_deref() == Some(principal.role.as_str());
            sql.push_str(&provision::role(
                &principal.role,
                &principal.oid,
                object_type,
                is_admin,
            ));
        }
        for group in &directory.groups {
            sql.push_str(&provision::role(&group.name, &group.oid, "group", false));
        }
        let (files, files_dir, backend, backend_user) = match &config.backend_url {
            None => {
                let cluster = Cluster::start()?;
                cluster.psql(&sql)?;
                let dir = cluster.scratch_dir("emulator")?;
                // The server's user removes the cluster directory, so it must own `bin` too.
                cluster.scratch_dir("emulator/bin")?;
                let backend = BackendAddr::Unix {
                    dir: cluster.socket_dir().to_owned(),
                    port: cluster.port(),
                };
                (Files::Cluster(cluster), dir, backend, "postgres".to_owned())
            }
            Some(url) => {
                let (backend, user) = backend_addr(url)?;
                psql_url(url, &sql)?;
                let dir = std::env::temp_dir().join(format!(
                    "pgentra-emulator-{}-{:08x}",
                    std::process::id(),
                    fastrand::u32(..)
                ));
                std::fs::create_dir_all(&dir).map_err(io("creating the emulator directory"))?;
                (Files::Own(dir.clone()), dir, backend, user)
            }
        };

        let ca = Ca::new().map_err(|e| EmulatorError::Certificates(e.to_string()))?;
        let ca_file = files_dir.join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).map_err(io("writing the CA file"))?;
        let bin_dir = files_dir.join("bin");
        std::fs::create_dir_all(&bin_dir).map_err(io("creating the shim directory"))?;

        let issuer = Arc::new(Issuer::new(&config.tenant, config.token_lifetime));
        issuer.set_token_groups(config.token_groups);
        let user_assigned = directory
            .principals
            .iter()
            .filter(|p| matches!(p.kind, PrincipalKind::UserAssignedIdentity))
            .cloned()
            .collect();
        let https = ca
            .server_config(&[])
            .map_err(|e| EmulatorError::Certificates(e.to_string()))?;
        let identity = IdentityServer::start(
            Arc::clone(&issuer),
            Identities {
                default_identity: config.managed_identity.clone(),
                user_assigned,
                cli_user: config.cli_user.clone(),
                service_principals: config.service_principals.clone(),
            },
            https,
            config.identity_port,
        )
        .map_err(io("starting the identity endpoints"))?;
        identity
            .write_cli_shims(&bin_dir)
            .map_err(io("writing the CLI shims"))?;

        let gateway_config = GatewayConfig {
            audience: config.audience.clone(),
            skew: config.skew,
            login_timeout: config.login_timeout,
            directory: Arc::clone(&directory),
            backend: backend.clone(),
            backend_user,
            port: config.gateway_port,
        };
        let pg_tls = ca
            .server_config(&[b"postgresql"])
            .map_err(|e| EmulatorError::Certificates(e.to_string()))?;
        let gateway = Gateway::start(gateway_config, Arc::clone(&issuer), Arc::clone(&pg_tls))
            .map_err(io("starting the gateway"))?;
        Ok(Self {
            config,
            issuer,
            identity,
            gateway,
            ca_file,
            server_tls: pg_tls,
            bin_dir,
            backend,
            files,
        })
    }

    /// One emulator with the default configuration for the whole test binary, started on
    /// first use. Panics with the reason (such as the package to install) if it cannot start.
    pub fn shared() -> &'static Self {
        static SHARED: OnceLock<Emulator> = OnceLock::new();
        SHARED.get_or_init(|| match Self::start(EmulatorConfig::default()) {
            Ok(emulator) => emulator,
            Err(error) => panic!(
                "the pgentra emulator could not start: {}",
                pgentra::ErrorChain(&error)
            ),
        })
    }

    /// Another emulator with `config`, on this one's backend (its cluster, or its external
    /// backend): emulators with other settings — short-lived or large tokens, another tenant's
    /// user — without another cluster to start.
    pub fn beside(&self, config: EmulatorConfig) -> Result<Self, EmulatorError> {
        let backend_url = match self.cluster() {
            Some(cluster) => cluster.url(),
            None => self
                .config
                .backend_url
                .clone()
                .ok_or_else(|| EmulatorError::BackendUrl("no backend to share".into()))?,
        };
        Self::start(EmulatorConfig {
            backend_url: Some(backend_url),
            ..config
        })
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &EmulatorConfig {
        &self.config
    }

    /// The server's Entra administrator, if any.
    pub fn admin(&self) -> Option<&Principal> {
        let role = self.config.admin_role()?;
        self.config.principals.iter().find(|p| p.role == role)
    }

    /// The token issuer.
    pub fn issuer(&self) -> &Arc<Issuer> {
        &self.issuer
    }

    /// The identity endpoints (fault injection, counters).
    pub fn identity(&self) -> &IdentityServer {
        &self.identity
    }

    /// The gateway.
    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// Restarts the gateway on the same port: open connections drop, new ones are accepted
    /// again once this returns. See [`Gateway::restart`] (it blocks briefly).
    pub fn restart_gateway(&self) -> Result<(), EmulatorError> {
        self.gateway.restart().map_err(io("restarting the gateway"))
    }

    /// The throwaway PostgreSQL cluster behind the gateway (`None` with an external backend).
    pub fn cluster(&self) -> Option<&Cluster> {
        match &self.files {
            Files::Cluster(cluster) => Some(cluster),
            Files::Own(_) => None,
        }
    }

    /// Where the gateway's backend listens.
    pub fn backend(&self) -> &BackendAddr {
        &self.backend
    }

    /// The emulator CA's PEM file (`PGSSLROOTCERT`, `SSL_CERT_FILE`).
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The TLS configuration the gateway presents (a certificate for `localhost` and
    /// `127.0.0.1` from the CA in [`ca_file`](Self::ca_file), ALPN `postgresql`), for a server
    /// of a test's own that clients are to trust as they trust the gateway: a proxy in front of
    /// it, say.
    ///
    /// ```no_run
    /// let emulator = pgentra_emulator::Emulator::shared();
    /// let tls = tokio_rustls::TlsAcceptor::from(emulator.server_tls());
    /// # drop(tls);
    /// ```
    pub fn server_tls(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.server_tls)
    }

    /// The directory with the `az` and `azd` shims.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// A token for `principal`, valid for the database.
    pub fn token_for(&self, principal: &Principal) -> IssuedToken {
        self.issuer.issue(principal, &self.config.audience)
    }

    /// The environment that points clients and `azure_identity` at the emulator: the `PG*`
    /// variables for the gateway, the App Service managed-identity variables, the OAuth
    /// authority and its CA, the IMDS redirect, and `PATH` with the CLI shims first.
    pub fn env(&self) -> Vec<(String, String)> {
        let path = std::env::var("PATH").unwrap_or_default();
        let ca = self.ca_file.display().to_string();
        [
            ("PGHOST", "localhost".to_owned()),
            ("PGPORT", self.gateway.port().to_string()),
            ("PGDATABASE", "postgres".to_owned()),
            ("PGSSLMODE", "verify-full".to_owned()),
            ("PGSSLROOTCERT", ca.clone()),
            ("IDENTITY_ENDPOINT", self.identity.identity_endpoint()),
            (
                "IDENTITY_HEADER",
                self.identity.identity_header().to_owned(),
            ),
            (
                "AZURE_POD_IDENTITY_AUTHORITY_HOST",
                self.identity.imds_authority(),
            ),
            ("AZURE_AUTHORITY_HOST", self.identity.authority_host()),
            ("SSL_CERT_FILE", ca),
            ("PATH", format!("{}:{path}", self.bin_dir.display())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

impl EmulatorConfig {
    /// The Entra administrator's role: the configured one, or the first user principal's.
    fn admin_role(&self) -> Option<&str> {
        match &self.admin {
            Some(role) => Some(role),
            None => self
                .principals
                .iter()
                .find(|p| p.kind == PrincipalKind::User)
                .map(|p| p.role.as_str()),
        }
    }
}

/// Everyone the tenant knows: the principals with and without a role, the identities the
/// endpoints answer as, and the groups.
fn directory_of(config: &EmulatorConfig) -> Directory {
    let mut principals: Vec<Principal> = Vec::new();
    let service_principals = config.service_principals.iter().map(|(p, _)| p);
    for principal in config
        .principals
        .iter()
        .chain(&config.without_role)
        .chain([&config.managed_identity, &config.cli_user])
        .chain(service_principals)
    {
        if principal.tenant.is_none() && !principals.iter().any(|p| p.oid == principal.oid) {
            principals.push(principal.clone());
        }
    }
    let groups = config
        .groups
        .iter()
        .map(|(name, members)| Group::new(name, members))
        .collect();
    Directory { principals, groups }
}

/// The TCP address and user of a `postgres://` backend URL.
fn backend_addr(url: &str) -> Result<(BackendAddr, String), EmulatorError> {
    let parsed = url::Url::parse(url).map_err(|e| EmulatorError::BackendUrl(e.to_string()))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(EmulatorError::BackendUrl(
            "the scheme must be postgres://".into(),
        ));
    }
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| EmulatorError::BackendUrl("no host".into()))?;
    let addr = BackendAddr::Tcp {
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port: parsed.port().unwrap_or(5432),
    };
    let user = match parsed.username() {
        "" => "postgres".to_owned(),
        user => user.to_owned(),
    };
    Ok((addr, user))
}
