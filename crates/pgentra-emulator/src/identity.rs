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

use crate::issuer::{Issuer, Principal, PrincipalKind};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use parking_lot::Mutex;
use serde_json::{Value, json};
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

/// Faults to inject into the token endpoints.
#[derive(Debug, Clone, Default)]
struct Faults {
    /// Fail this many of the next token requests with `fail_status`.
    fail_next: u32,
    fail_status: u16,
    /// Delay every token response by this much.
    latency: Duration,
    /// Never answer token requests.
    hang: bool,
}

/// The IMDS managed-identity limits: 20 requests a second and 5 at once.
const RATE_PER_SECOND: usize = 20;
const MAX_CONCURRENT: usize = 5;

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
            concurrent: Arc::new(Semaphore::new(MAX_CONCURRENT)),
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
                accept_loop(listener, None, Arc::clone(&serving)),
                accept_loop(tls_listener, Some(acceptor), serving),
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
        use std::os::unix::fs::PermissionsExt as _;
        for (name, route) in [("az", "az"), ("azd", "azd")] {
            let script = SHIM
                .replace("@PORT@", &self.addr.port().to_string())
                .replace("@ROUTE@", route);
            let path = dir.join(name);
            std::fs::write(&path, script)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(())
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

/// The CLI shim: takes `--scope`, asks the emulator over `/dev/tcp`, prints the body on
/// success and fails like the real tool (message on stderr, exit 1) otherwise.
const SHIM: &str = r#"#!/bin/bash
# Written by the pgentra emulator: answers like the real CLI for the emulated signed-in user.
scope=""
while [ $# -gt 0 ]; do
  case "$1" in
    --scope|--resource) scope="$2"; shift ;;
  esac
  shift
done
if ! exec 3<>/dev/tcp/127.0.0.1/@PORT@; then
  echo "ERROR: the pgentra emulator is not running. Please run 'az login' to setup account." >&2
  exit 1
fi
printf 'GET /shim/@ROUTE@?scope=%s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$scope" >&3
status=""
while IFS= read -r line <&3; do
  line="${line%$'\r'}"
  [ -z "$status" ] && status="$line"
  [ -z "$line" ] && break
done
body=""
while IFS= read -r line <&3 || [ -n "$line" ]; do body+="$line"; done
case "$status" in
  *" 200 "*) printf '%s\n' "$body" ;;
  *) printf 'ERROR: %s\n' "$body" >&2; exit 1 ;;
esac
"#;

async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<State>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (state, tls) = (Arc::clone(&state), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => serve(stream, state).await,
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        serve(stream, state).await;
                    }
                }
            }
        });
    }
}

async fn serve<S>(stream: S, state: Arc<State>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let state = Arc::clone(&state);
        async move { Ok::<_, std::convert::Infallible>(handle(&state, request).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await;
}

fn respond(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, code: &str, description: &str) -> Response<Full<Bytes>> {
    respond(
        status,
        &json!({"error": code, "error_description": description}),
    )
}

async fn handle(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let query: HashMap<String, String> = request
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let tenant = state.issuer.tenant();
    if path == format!("/{tenant}/discovery/v2.0/keys") {
        count(state, Endpoint::Keys);
        return respond(StatusCode::OK, &state.issuer.jwks());
    }
    if path == format!("/{tenant}/v2.0/.well-known/openid-configuration") {
        count(state, Endpoint::Keys);
        return respond(
            StatusCode::OK,
            &json!({"issuer": state.issuer.issuer(), "jwks_uri": format!("/{tenant}/discovery/v2.0/keys")}),
        );
    }
    if path == format!("/{tenant}/oauth2/v2.0/token") && request.method() == hyper::Method::POST {
        count(state, Endpoint::OAuth);
        return client_credentials(state, request).await;
    }
    if let Some(tool) = path.strip_prefix("/shim/") {
        return cli(
            state,
            tool,
            query.get("scope").map(String::as_str).unwrap_or_default(),
        )
        .await;
    }
    let endpoint = match path.as_str() {
        "/msi/token" => Endpoint::AppService,
        "/metadata/identity/oauth2/token" => Endpoint::Imds,
        _ => return error(StatusCode::NOT_FOUND, "not_found", "unknown path"),
    };
    count(state, endpoint);
    let headers = request.headers();
    match endpoint {
        Endpoint::AppService => {
            let given = headers
                .get("x-identity-header")
                .and_then(|v| v.to_str().ok());
            if given != Some(state.header_secret.as_str()) {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "X-IDENTITY-HEADER is missing or wrong",
                );
            }
        }
        _ => {
            if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request_102",
                    "Required metadata header not specified",
                );
            }
        }
    }
    let (Some(_), Some(resource)) = (query.get("api-version"), query.get("resource")) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "api-version and resource are required",
        );
    };
    let Ok(_permit) = Arc::clone(&state.concurrent).try_acquire_owned() else {
        return throttle(state);
    };
    if !within_rate(state) {
        return throttle(state);
    }
    if let Some(fault) = injected_fault(state).await {
        return fault;
    }
    let principal = match query.get("client_id") {
        None => &state.default_identity,
        Some(client_id) => match state.identities.get(client_id) {
            Some(principal) if matches!(principal.kind, PrincipalKind::UserAssignedIdentity) => {
                principal
            }
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Identity not found: no user-assigned identity with this client_id is assigned",
                );
            }
        },
    };
    let issued = state.issuer.issue(principal, resource);
    let now = issued.expires_on - state.issuer.lifetime().as_secs();
    respond(
        StatusCode::OK,
        &json!({
            "access_token": issued.token,
            "client_id": principal.client_id,
            "expires_in": (issued.expires_on - now).to_string(),
            "expires_on": issued.expires_on.to_string(),
            "ext_expires_in": (issued.expires_on - now).to_string(),
            "not_before": now.to_string(),
            "resource": resource,
            "token_type": "Bearer",
        }),
    )
}

/// Applies the injected faults to one token request: hangs, delays, or returns the failure to
/// send (counting it down); `None` when the request should be answered normally.
async fn injected_fault(state: &State) -> Option<Response<Full<Bytes>>> {
    let faults = {
        let mut faults = state.faults.lock();
        let snapshot = faults.clone();
        faults.fail_next = faults.fail_next.saturating_sub(1);
        snapshot
    };
    if faults.hang {
        std::future::pending::<()>().await;
    }
    if !faults.latency.is_zero() {
        tokio::time::sleep(faults.latency).await;
    }
    if faults.fail_next == 0 {
        return None;
    }
    let status =
        StatusCode::from_u16(faults.fail_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Some(error(
        status,
        "injected_fault",
        &format!("fault injected by the pgentra emulator (HTTP {status})"),
    ))
}

/// Largest form body the OAuth2 endpoint reads.
const MAX_FORM: usize = 64 * 1024;

/// The OAuth2 client-credentials grant, answered as Entra ID does.
async fn client_credentials(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt as _;
    let entra_error = |status: StatusCode, code: &str, aadsts: u32, description: &str| {
        respond(
            status,
            &json!({
                "error": code,
                "error_description": format!("AADSTS{aadsts}: {description}"),
                "error_codes": [aadsts],
            }),
        )
    };
    let body = match http_body_util::Limited::new(request.into_body(), MAX_FORM)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return entra_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900144,
                "The request body is too large or unreadable.",
            );
        }
    };
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        );
    }
    let Some(scope) = form.get("scope") else {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'scope'.",
        );
    };
    let client_id = form
        .get("client_id")
        .map(String::as_str)
        .unwrap_or_default();
    let Some((principal, secret)) = state.service_principals.get(client_id) else {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            "Application was not found in the directory.",
        );
    };
    if form.get("client_secret") != Some(secret) {
        return entra_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            "Invalid client secret provided.",
        );
    }
    if let Some(fault) = injected_fault(state).await {
        return fault;
    }
    let issued = state.issuer.issue(principal, scope);
    let expires_in = state.issuer.lifetime().as_secs();
    respond(
        StatusCode::OK,
        &json!({
            "token_type": "Bearer",
            "expires_in": expires_in,
            "ext_expires_in": expires_in,
            "access_token": issued.token,
        }),
    )
}

/// What `az account get-access-token -o json` and `azd auth token -o json` print.
async fn cli(state: &State, tool: &str, scope: &str) -> Response<Full<Bytes>> {
    let endpoint = match tool {
        "az" => Endpoint::AzureCli,
        "azd" => Endpoint::AzureDeveloperCli,
        _ => return error(StatusCode::NOT_FOUND, "not_found", "unknown tool"),
    };
    count(state, endpoint);
    if scope.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "--scope is required",
        );
    }
    if let Some(fault) = injected_fault(state).await {
        return fault;
    }
    let issued = state.issuer.issue(&state.cli_user, scope);
    let expires = time::OffsetDateTime::from_unix_timestamp(issued.expires_on as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let body = if endpoint == Endpoint::AzureCli {
        // `expiresOn` is a deprecated local-time string; `expires_on` is what clients read.
        let expires_on_local = expires
            .format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:6]"
            ))
            .unwrap_or_default();
        json!({
            "accessToken": issued.token,
            "expiresOn": expires_on_local,
            "expires_on": issued.expires_on,
            "subscription": "00000000-0000-0000-0000-000000000000",
            "tenant": state.issuer.tenant(),
            "tokenType": "Bearer",
        })
    } else {
        let rfc3339 = expires
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        json!({"token": issued.token, "expiresOn": rfc3339})
    };
    respond(StatusCode::OK, &body)
}

fn count(state: &State, endpoint: Endpoint) {
    state.counters[&endpoint].fetch_add(1, Ordering::Relaxed);
}

fn throttle(state: &State) -> Response<Full<Bytes>> {
    state.throttled.fetch_add(1, Ordering::Relaxed);
    error(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_requests",
        "Too many requests (managed identity limits: 20 per second, 5 at once)",
    )
}

/// Sliding one-second window of accepted token requests.
fn within_rate(state: &State) -> bool {
    let now = Instant::now();
    let mut recent = state.recent.lock();
    while recent
        .front()
        .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
    {
        recent.pop_front();
    }
    if recent.len() >= RATE_PER_SECOND {
        return false;
    }
    recent.push_back(now);
    true
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
