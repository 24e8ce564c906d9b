//! The managed-identity endpoints of the emulator, over HTTP on loopback:
//!
//! - App Service protocol: `GET /msi/token?api-version=2019-08-01&resource=R[&client_id=C]`
//!   with the `X-IDENTITY-HEADER` secret; point `IDENTITY_ENDPOINT`/`IDENTITY_HEADER` at it and
//!   `azure_identity::ManagedIdentityCredential` works unchanged.
//! - IMDS protocol: `GET /metadata/identity/oauth2/token?...` with `Metadata: true`; point
//!   `AZURE_POD_IDENTITY_AUTHORITY_HOST` at [`IdentityServer::imds_authority`] and pgentra's
//!   credential chain sends the IMDS client there.
//! - OAuth2 client credentials: `POST /{tenant}/oauth2/v2.0/token` over HTTPS with the
//!   emulator's CA; with `AZURE_AUTHORITY_HOST` set to [`IdentityServer::authority_host`] and
//!   the CA trusted (`SSL_CERT_FILE`), `ClientSecretCredential` works unchanged.
//! - JWKS and OpenID configuration: `GET /{tenant}/discovery/v2.0/keys` and
//!   `GET /{tenant}/v2.0/.well-known/openid-configuration`.
//! - Developer CLIs: [`IdentityServer::write_cli_shims`] writes `az` and `azd` executables
//!   that answer `az account get-access-token -o json --scope S` and
//!   `azd auth token -o json --scope S` exactly as the real tools print them (`expires_on` an
//!   integer for `az`, RFC 3339 `expiresOn` for `azd`), for the signed-in CLI user; with their
//!   directory first on `PATH`, `AzureCliCredential` and `AzureDeveloperCliCredential` run
//!   unchanged.
//!
//! Both token protocols answer as Azure does: `expires_on` as a JSON string of epoch seconds,
//! plus `resource` and `token_type`. They enforce the IMDS limits (20 requests a second, 5 at
//! once) with 429s, so a thundering herd is visible. Faults can be injected into every token
//! endpoint (managed identity, OAuth2, the CLI shims), and every endpoint counts its requests.
mod cli;
mod faults;
mod http;
mod managed;
mod oauth;

use crate::issuer::{Issuer, Principal};
use faults::Faults;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, oneshot};

/// An endpoint whose requests are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Endpoint {
    /// The App Service managed-identity endpoint.
    AppService,
    /// The IMDS managed-identity endpoint.
    Imds,
    /// JWKS and OpenID configuration.
    Keys,
    /// The `az` shim.
    AzureCli,
    /// The `azd` shim.
    AzureDeveloperCli,
    /// The OAuth2 client-credentials endpoint.
    OAuth,
}

/// Who the identity endpoints answer as.
#[derive(Debug, Clone)]
pub struct Identities {
    /// The system-assigned identity: requests without `client_id`.
    pub default_identity: Principal,
    /// User-assigned identities, selected by their `client_id`.
    pub user_assigned: Vec<Principal>,
    /// The user signed in to the `az` and `azd` shims.
    pub cli_user: Principal,
    /// Service principals and their client secrets, for the OAuth2 endpoint.
    pub service_principals: Vec<(Principal, String)>,
}

struct State {
    issuer: Arc<Issuer>,
    /// The identity the endpoints answer as when no `client_id` is given (system-assigned).
    default_identity: Principal,
    /// Identities selectable with `client_id`, by client ID.
    identities: HashMap<String, Principal>,
    cli_user: Principal,
    /// Client ID → (principal, secret).
    service_principals: HashMap<String, (Principal, String)>,
    header_secret: String,
    faults: Mutex<Faults>,
    counters: HashMap<Endpoint, AtomicU64>,
    concurrent: Arc<Semaphore>,
    recent: Mutex<VecDeque<Instant>>,
    throttled: AtomicU64,
}

/// The running endpoints; stopped when dropped.
pub struct IdentityServer {
    addr: SocketAddr,
    tls_addr: SocketAddr,
    state: Arc<State>,
    _stop: oneshot::Sender<()>,
}

impl std::fmt::Debug for IdentityServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl IdentityServer {
    /// Starts the endpoints on a free loopback port, on a runtime of their own (so they outlive
    /// any one test's runtime).
    /// `tls` serves the HTTPS listener (see [`Ca::server_config`](crate::ca::Ca::server_config));
    /// `http_port` is the HTTP listener's port (0: any free port; HTTPS always takes a free
    /// one).
    pub fn start(
        issuer: Arc<Issuer>,
        identities: Identities,
        tls: Arc<rustls::ServerConfig>,
        http_port: u16,
    ) -> std::io::Result<Self> {
        let bind = |port: u16| -> std::io::Result<std::net::TcpListener> {
            let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        };
        let (listener, tls_listener) = (bind(http_port)?, bind(0)?);
        let addr = listener.local_addr()?;
        let tls_addr = tls_listener.local_addr()?;
        let state = Arc::new(State {
            issuer,
            default_identity: identities.default_identity,
            identities: identities
                .user_assigned
                .into_iter()
                .map(|p| (p.client_id.clone(), p))
                .collect(),
            cli_user: identities.cli_user,
            service_principals: identities
                .service_principals
                .into_iter()
                .map(|(p, secret)| (p.client_id.clone(), (p, secret)))
                .collect(),
            header_secret: header_secret()?,
            faults: Mutex::new(Faults::default()),
            counters: [
                Endpoint::AppService,
                Endpoint::Imds,
                Endpoint::Keys,
                Endpoint::AzureCli,
                Endpoint::AzureDeveloperCli,
                Endpoint::OAuth,
            ]
            .into_iter()
            .map(|e| (e, AtomicU64::new(0)))
            .collect(),
            concurrent: Arc::new(Semaphore::new(managed::MAX_CONCURRENT)),
            recent: Mutex::new(VecDeque::new()),
            throttled: AtomicU64::new(0),
        });
        let serving = Arc::clone(&state);
        let stop = crate::background::run("pgentra-emulator-identity", move || async move {
            let (Ok(listener), Ok(tls_listener)) = (
                tokio::net::TcpListener::from_std(listener),
                tokio::net::TcpListener::from_std(tls_listener),
            ) else {
                return;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            tokio::join!(
                http::accept_loop(listener, None, Arc::clone(&serving)),
                http::accept_loop(tls_listener, Some(acceptor), serving),
            );
        })?;
        Ok(Self {
            addr,
            tls_addr,
            state,
            _stop: stop,
        })
    }

    /// `IDENTITY_ENDPOINT` for the App Service protocol.
    pub fn identity_endpoint(&self) -> String {
        format!("http://{}/msi/token", self.addr)
    }

    /// `IDENTITY_HEADER`: the secret the App Service protocol requires.
    pub fn identity_header(&self) -> &str {
        &self.state.header_secret
    }

    /// The authority to send IMDS requests to (`AZURE_POD_IDENTITY_AUTHORITY_HOST`).
    pub fn imds_authority(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `AZURE_AUTHORITY_HOST`: the HTTPS address of the OAuth2 endpoint.
    pub fn authority_host(&self) -> String {
        format!("https://{}", self.tls_addr)
    }

    /// The JWKS URL.
    pub fn jwks_uri(&self) -> String {
        format!(
            "http://{}/{}/discovery/v2.0/keys",
            self.addr,
            self.state.issuer.tenant()
        )
    }

    /// Writes the `az` and `azd` shims into `dir` (prepend it to `PATH`). They are bash
    /// scripts that fetch their answer from this server, using only shell builtins.
    pub fn write_cli_shims(&self, dir: &Path) -> std::io::Result<()> {
        cli::write_shims(dir, self.addr.port())
    }

    /// Fails the next `count` token requests with HTTP `status` (429 or 500, say), on every
    /// token endpoint: managed identity, OAuth2 and the CLI shims (which then fail like the real
    /// tool, with the error body on stderr). The error description names the status.
    pub fn fail_next(&self, count: u32, status: u16) {
        let mut faults = self.state.faults.lock();
        faults.fail_next = count;
        faults.fail_status = status;
    }

    /// Delays every token response by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.state.faults.lock().latency = latency;
    }

    /// Stops answering token requests (they hang) until called with `false`. Requests already
    /// hanging stay unanswered.
    pub fn set_hang(&self, hang: bool) {
        self.state.faults.lock().hang = hang;
    }

    /// Removes every injected fault: pending failures, latency and hanging.
    pub fn clear_faults(&self) {
        *self.state.faults.lock() = Faults::default();
    }

    /// Requests received by `endpoint` so far (including refused ones).
    pub fn requests(&self, endpoint: Endpoint) -> u64 {
        self.state.counters[&endpoint].load(Ordering::Relaxed)
    }

    /// Token requests refused with 429 by the rate limits.
    pub fn throttled(&self) -> u64 {
        self.state.throttled.load(Ordering::Relaxed)
    }
}

/// Counts one request to `endpoint`.
fn count(state: &State, endpoint: Endpoint) {
    state.counters[&endpoint].fetch_add(1, Ordering::Relaxed);
}

/// The App Service managed-identity header secret: 128 bits from the OS's CSPRNG, so that only
/// a process given the environment can ask for tokens (as App Service's own secret).
fn header_secret() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)?;
    Ok(bytes
        .iter()
        .fold(String::from("emulator-"), |mut hex, byte| {
            hex.push_str(&format!("{byte:02x}"));
            hex
        }))
}
