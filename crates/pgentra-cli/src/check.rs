//! `pgentra check`: diagnose a connection step by step.
//!
//! Each step prints `✓` or `✗` as soon as it is done; the first failure comes with a hint and
//! the remaining steps are skipped. The token itself never appears: only its credential,
//! tenant and expiry.

use crate::Context;
use crate::auth::AuthArgs;
use crate::error::CliError;
use crate::output::{print_json, relative};
use pgentra::claims::{Claims, MissingRole, PrincipalKind, UsernameSource};
use pgentra::conninfo::ConnInfo;
use pgentra::tls::{SslMode, TlsOptions};
use pgentra::tokio_postgres::EntraConnector;
use pgentra::{DbCredentials, EntraAuth};
use rustls::pki_types::ServerName;
use rustls::{CertificateError, ProtocolVersion};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Checks DNS, TCP, TLS and the certificate, token acquisition, role derivation, login and a
/// query, each with a hint when it fails.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    auth: AuthArgs,
    /// Connection settings (URL or `key=value`) over the `PG*` variables and `.env`.
    conninfo: Option<String>,
    /// Pin the role (default: the connection settings' user, else derived from the token).
    #[arg(long, short = 'U')]
    user: Option<String>,
}

/// The steps, in the order they run.
const STEPS: [&str; 8] = [
    "settings", "dns", "tcp", "tls", "token", "role", "login", "query",
];
const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// Per address: a firewall that drops packets shows up as a timeout, not a refusal.
const TCP_TIMEOUT: Duration = Duration::from_secs(5);
const TLS_TIMEOUT: Duration = Duration::from_secs(10);
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);
const DEFAULT_PORT: u16 = 5432;
const DEFAULT_DBNAME: &str = "postgres";

pub(crate) fn run(args: &Args, context: Context) -> Result<ExitCode, CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::io("starting the async runtime"))?;
    let mut report = Report {
        context,
        steps: Vec::new(),
    };
    runtime.block_on(diagnose(args, &mut report));
    report.finish()
}

/// Runs the steps in [`STEPS`] order until one fails.
async fn diagnose(args: &Args, report: &mut Report) -> Option<()> {
    let settings = report.record("settings", settings(args))?;
    let addrs = report.record("dns", resolve(&settings).await)?;
    let stream = report.record("tcp", connect(&settings, &addrs).await)?;
    report.record("tls", tls(&settings, stream).await)?;
    let (auth, identity) = report.record("token", token(&args.auth, &settings).await)?;
    let identity = report.record("role", role(identity))?;
    let client = report.record("login", login(&auth, &settings, &identity).await)?;
    report.record("query", query(&client).await)
}

/// Why a step failed, and what to do about it.
struct Failure {
    detail: String,
    hint: String,
}

fn failure(detail: impl Into<String>, hint: impl Into<String>) -> Failure {
    Failure {
        detail: detail.into(),
        hint: hint.into(),
    }
}

/// A step's result: a value for the next steps and a one-line detail.
type StepResult<T> = Result<(T, String), Failure>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Failed,
    Skipped,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }
}

struct Step {
    name: &'static str,
    status: Status,
    detail: String,
    hint: Option<String>,
}

struct Report {
    context: Context,
    steps: Vec<Step>,
}

impl Report {
    /// Records (and, without `--json`, prints) a step; the value if it passed.
    fn record<T>(&mut self, name: &'static str, result: StepResult<T>) -> Option<T> {
        let (value, status, detail, hint) = match result {
            Ok((value, detail)) => (Some(value), Status::Ok, detail, None),
            Err(Failure { detail, hint }) => (None, Status::Failed, detail, Some(hint)),
        };
        self.push(Step {
            name,
            status,
            detail,
            hint,
        });
        value
    }

    fn push(&mut self, step: Step) {
        if !self.context.json {
            print_step(&step, self.context);
        }
        self.steps.push(step);
    }

    /// Marks the steps that did not run as skipped, prints the JSON, and fails if a step did.
    fn finish(mut self) -> Result<ExitCode, CliError> {
        let failed = self
            .steps
            .iter()
            .position(|step| step.status == Status::Failed);
        for name in STEPS.iter().skip(self.steps.len()) {
            let after = failed.map_or("", |index| STEPS[index]);
            self.push(Step {
                name,
                status: Status::Skipped,
                detail: format!("not run: the {after} step failed"),
                hint: None,
            });
        }
        if self.context.json {
            let steps: Vec<_> = self
                .steps
                .iter()
                .map(|step| {
                    serde_json::json!({
                        "step": step.name,
                        "status": step.status.as_str(),
                        "detail": step.detail,
                        "hint": step.hint,
                    })
                })
                .collect();
            print_json(&serde_json::json!({ "ok": failed.is_none(), "steps": steps }));
        }
        match failed.map(|index| &self.steps[index]) {
            None => Ok(ExitCode::SUCCESS),
            Some(step) => Err(CliError::Failed(format!(
                "check failed at the {} step: {}",
                step.name, step.detail
            ))),
        }
    }
}

fn print_step(step: &Step, context: Context) {
    let style = context.style;
    let name = format!("{:<8}", step.name);
    match step.status {
        Status::Ok => println!("{} {}  {}", style.good("✓"), style.bold(&name), step.detail),
        Status::Failed => {
            println!(
                "{} {}  {}",
                style.bad("✗"),
                style.bold(&name),
                style.bad(&step.detail)
            );
            if let Some(hint) = &step.hint {
                // Under the detail: the mark, a space, the name and two spaces.
                println!("{:12}{} {hint}", "", style.dim("hint:"));
            }
        }
        Status::Skipped => println!("{}", style.dim(&format!("- {name}  skipped"))),
    }
}

/// What is checked: the connection settings with their defaults filled in.
struct Settings {
    /// For the login; its user is cleared, since the provider decides the role.
    info: ConnInfo,
    /// The name to resolve and to check the certificate against.
    host: String,
    hostaddr: Option<IpAddr>,
    port: u16,
    /// A role pinned by `--user` or the settings.
    user: Option<String>,
}

fn settings(args: &Args) -> StepResult<Settings> {
    let parsed = match &args.conninfo {
        Some(text) => ConnInfo::parse(text).and_then(|info| Ok(info.or(ConnInfo::from_env()?))),
        None => ConnInfo::from_env(),
    };
    let mut info = parsed.map_err(|error| {
        failure(
            error.to_string(),
            "give a URL like postgres://<server>.postgres.database.azure.com/postgres or key=value pairs like `host=<server> dbname=postgres`, and check the PG* variables",
        )
    })?;
    let hostaddr = match info.hostaddr.as_deref() {
        Some(addr) => Some(addr.parse::<IpAddr>().map_err(|_| {
            failure(
                format!("hostaddr {addr:?} is not an IP address"),
                "set hostaddr to the server's IP address, or leave it out",
            )
        })?),
        None => None,
    };
    let host = match (&info.host, hostaddr) {
        (Some(host), _) => host.clone(),
        (None, Some(addr)) => addr.to_string(),
        (None, None) => {
            return Err(failure(
                "no host",
                "give a connection string (`pgentra check postgres://<server>.postgres.database.azure.com/postgres`) or set PGHOST",
            ));
        }
    };
    if host.starts_with('/') || host.starts_with('@') {
        return Err(failure(
            format!("host {host} is a Unix socket"),
            "check diagnoses TCP connections with TLS, as Azure takes them: give the server's name",
        ));
    }
    let port = *info.port.get_or_insert(DEFAULT_PORT);
    let dbname = info
        .dbname
        .get_or_insert_with(|| DEFAULT_DBNAME.to_owned())
        .clone();
    let user = args.user.clone().or_else(|| info.user.take());
    let options = info.tls_options();
    let roots = match (&options.mode, &options.root_cert) {
        (SslMode::Require, _) => "not verified".to_owned(),
        (_, Some(path)) if path != Path::new("system") => path.display().to_string(),
        _ => "the system's and Mozilla's".to_owned(),
    };
    let mut detail = format!(
        "{host}:{port}, database {dbname}, sslmode {}, root certificates {roots}",
        options.mode
    );
    if let Some(addr) = hostaddr {
        detail.push_str(&format!(", hostaddr {addr}"));
    }
    if let Some(user) = &user {
        detail.push_str(&format!(", role {user}"));
    }
    let settings = Settings {
        info,
        host,
        hostaddr,
        port,
        user,
    };
    Ok((settings, detail))
}

async fn resolve(settings: &Settings) -> StepResult<Vec<SocketAddr>> {
    let Settings { host, port, .. } = settings;
    if let Some(addr) = settings.hostaddr {
        let detail = format!("not needed: hostaddr {addr}");
        return Ok((vec![SocketAddr::new(addr, *port)], detail));
    }
    let hint = format!(
        "check the server name {host}: for Azure it is <server>.postgres.database.azure.com; with a private endpoint, the private DNS zone (privatelink.postgres.database.azure.com) must be linked to this network"
    );
    let addrs: Vec<SocketAddr> =
        match timeout(DNS_TIMEOUT, tokio::net::lookup_host((host.as_str(), *port))).await {
            Err(_) => return Err(failure(format!("resolving {host} timed out"), hint)),
            Ok(Err(error)) => return Err(failure(format!("cannot resolve {host}: {error}"), hint)),
            Ok(Ok(addrs)) => addrs.collect(),
        };
    if addrs.is_empty() {
        return Err(failure(format!("{host} has no address"), hint));
    }
    let detail = if host.parse::<IpAddr>().is_ok() {
        format!("not needed: {host} is an IP address")
    } else {
        let mut ips: Vec<String> = Vec::new();
        for addr in &addrs {
            let ip = addr.ip().to_string();
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        format!("{host} → {}", ips.join(", "))
    };
    Ok((addrs, detail))
}

async fn connect(settings: &Settings, addrs: &[SocketAddr]) -> StepResult<TcpStream> {
    let target = format!("{}:{}", settings.host, settings.port);
    let (mut refused, mut timed_out) = (false, false);
    let mut attempts = Vec::new();
    for &addr in addrs {
        let started = Instant::now();
        match timeout(TCP_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let millis = started.elapsed().as_secs_f64() * 1000.0;
                return Ok((stream, format!("connected to {addr} in {millis:.1} ms")));
            }
            Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                refused = true;
                attempts.push(format!("{addr} refused the connection"));
            }
            Ok(Err(error)) => attempts.push(format!("{addr}: {error}")),
            Err(_) => {
                timed_out = true;
                attempts.push(format!(
                    "{addr} did not answer within {}",
                    humantime::format_duration(TCP_TIMEOUT)
                ));
            }
        }
    }
    let hint = if timed_out {
        "a firewall is probably dropping the connection: add your client IP address to the server's firewall rules (Networking, in the Azure portal), or check the VNet, private endpoint and network security groups".to_owned()
    } else if refused {
        format!("nothing is listening on {target}: check the port and that the server is running")
    } else {
        "check the network route to the server (VPN, proxy, routing)".to_owned()
    };
    Err(failure(attempts.join("; "), hint))
}

async fn tls(settings: &Settings, mut stream: TcpStream) -> StepResult<()> {
    let options = settings.info.tls_options();
    let config = options.client_config().map_err(|error| {
        failure(
            error.to_string(),
            "point sslrootcert (or PGSSLROOTCERT) at a PEM file with the server's CA certificates",
        )
    })?;
    let name = ServerName::try_from(settings.host.clone()).map_err(|_| {
        failure(
            format!("{} is not a valid TLS server name", settings.host),
            "connect with the server's DNS name",
        )
    })?;
    let not_postgres =
        "is this a PostgreSQL server? Check the port (Azure: 5432, or 6432 for its PgBouncer)";
    let answer = timeout(TLS_TIMEOUT, async {
        stream.write_all(&pgentra_wire::ssl_request()).await?;
        stream.read_u8().await
    })
    .await;
    match answer {
        Ok(Ok(b'S')) => {}
        Ok(Ok(b'N')) => {
            return Err(failure(
                "the server does not accept TLS (it answered N to the SSLRequest)",
                "the token is the password and is only ever sent over TLS: enable TLS on the server (Azure always has it), or check that this is the right server and port",
            ));
        }
        Ok(Ok(other)) => {
            return Err(failure(
                format!(
                    "unexpected answer {:?} to the SSLRequest",
                    char::from(other)
                ),
                not_postgres,
            ));
        }
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(failure(
                "the server closed the connection instead of answering the SSLRequest",
                not_postgres,
            ));
        }
        Ok(Err(error)) => {
            return Err(failure(
                format!("sending the SSLRequest failed: {error}"),
                not_postgres,
            ));
        }
        Err(_) => {
            return Err(failure("no answer to the SSLRequest in time", not_postgres));
        }
    }
    let handshake = timeout(
        TLS_TIMEOUT,
        tokio_rustls::TlsConnector::from(config).connect(name, stream),
    )
    .await
    .map_err(|_| {
        failure(
            "the TLS handshake did not finish in time",
            "check for a proxy or middlebox between this machine and the server",
        )
    })?;
    let stream = handshake.map_err(|error| handshake_failure(settings, &options, &error))?;
    let (_, connection) = stream.get_ref();
    let version = match connection.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => "TLS 1.3".to_owned(),
        Some(ProtocolVersion::TLSv1_2) => "TLS 1.2".to_owned(),
        Some(other) => format!("{other:?}"),
        None => "TLS".to_owned(),
    };
    let suite = connection.negotiated_cipher_suite().map_or_else(
        || "unknown cipher suite".to_owned(),
        |s| format!("{:?}", s.suite()),
    );
    let certificates = connection.peer_certificates().map_or(0, <[_]>::len);
    let plural = if certificates == 1 { "" } else { "s" };
    let verified = match options.mode {
        SslMode::Require => "not verified (sslmode=require)",
        SslMode::VerifyCa => "chain verified, host name not checked (sslmode=verify-ca)",
        _ => "chain and host name verified",
    };
    let detail = format!("{version}, {suite}, {certificates} certificate{plural}, {verified}");
    Ok(((), detail))
}

/// The hint for a failed handshake, from the rustls error inside the I/O error.
fn handshake_failure(settings: &Settings, options: &TlsOptions, error: &std::io::Error) -> Failure {
    let detail = format!("TLS handshake failed: {error}");
    let cause = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let Some(rustls::Error::InvalidCertificate(certificate)) = cause else {
        return failure(
            detail,
            "the server and this client agree on no TLS version or cipher suite, or something between them interferes: Azure needs TLS 1.2 or later",
        );
    };
    let hint = match certificate {
        CertificateError::UnknownIssuer | CertificateError::BadSignature => {
            let trusted_by = match &options.root_cert {
                Some(path) if path != Path::new("system") => {
                    format!(" by the CA certificates in {}", path.display())
                }
                _ => " by the system's or Mozilla's root certificates".to_owned(),
            };
            format!(
                "the server's certificate is not trusted{trusted_by}: set PGSSLROOTCERT (or sslrootcert=) to the CA file — for Azure, DigiCert Global Root G2 and Microsoft RSA Root CA 2017; for the pgentra emulator, the PGSSLROOTCERT it prints"
            )
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!(
                "the server's certificate is not valid for the name {}: connect with a name it holds (for Azure, <server>.postgres.database.azure.com, not an IP address or a custom alias), or use sslmode=verify-ca to check only the chain",
                settings.host
            )
        }
        CertificateError::Expired
        | CertificateError::ExpiredContext { .. }
        | CertificateError::NotValidYet
        | CertificateError::NotValidYetContext { .. } => {
            "the server's certificate is outside its validity period: check this machine's clock"
                .to_owned()
        }
        _ => "the server's certificate was rejected: check sslrootcert / PGSSLROOTCERT and sslmode"
            .to_owned(),
    };
    failure(detail, hint)
}

/// The credentials of a login, and the claims of their token.
struct Identity {
    creds: DbCredentials,
    claims: Claims,
}

/// The provider, and its credentials unless the token names no role.
type Token = (EntraAuth, Result<Identity, MissingRole>);

async fn token(auth_args: &AuthArgs, settings: &Settings) -> StepResult<Token> {
    let auth = auth_args
        .provider(settings.user.as_deref())
        .map_err(|error| {
            failure(
                error.to_string(),
                "fix --credential, --cloud or --scope, or the AZURE_* variables",
            )
        })?;
    let creds = match auth.credentials().await {
        Ok(creds) => creds,
        Err(pgentra::Error::NoUsername { reason }) => {
            // The token is fine; the role step reports what is missing.
            let detail = format!("from {}", auth.credential_name());
            return Ok(((auth, Err(reason)), detail));
        }
        Err(error) => return Err(token_failure(&error)),
    };
    let claims = Claims::decode(creds.password().expose_secret()).map_err(|error| {
        failure(
            format!(
                "the token from {} is not readable: {error}",
                creds.credential()
            ),
            "the credential did not return an Entra ID access token: check its configuration",
        )
    })?;
    let detail = format!(
        "from {}, tenant {}, expires {}",
        creds.credential(),
        claims.tid().unwrap_or("unknown"),
        relative(creds.expires_at())
    );
    Ok(((auth, Ok(Identity { creds, claims })), detail))
}

fn token_failure(error: &pgentra::Error) -> Failure {
    let hint = match error {
        pgentra::Error::TokenExpiresTooSoon { .. } => {
            "the credential returned a token that has already expired: sign in again (`az login`) and check this machine's clock"
        }
        pgentra::Error::Timeout { .. } => {
            "the credential did not answer in time: check that its token endpoint is reachable (proxy, firewall), or allow longer with --timeout"
        }
        pgentra::Error::Config { .. } => {
            "fix the configuration named above (AZURE_* variables, --credential)"
        }
        _ => {
            "sign in with `az login` (or `azd auth login`), or set up a managed identity, workload identity or service principal (AZURE_CLIENT_ID, AZURE_TENANT_ID, ...); --credential picks one credential"
        }
    };
    failure(error.to_string(), hint)
}

fn role(identity: Result<Identity, MissingRole>) -> StepResult<Identity> {
    let identity = identity.map_err(|reason| {
        let hint = match reason {
            MissingRole::Guest { .. } => {
                "give the role with --user (or user= / PGUSER): the guest's #EXT# user principal name in the server's tenant"
            }
            MissingRole::AppOnly { .. } => {
                "give the role with --user (or user= / PGUSER): the name an Entra administrator gave this service principal with pgaadauth_create_principal_with_oid"
            }
            _ => "give the role with --user (or user= / PGUSER)",
        };
        failure(format!("cannot derive the role: {reason}"), hint)
    })?;
    let source = identity.creds.user_source();
    let source = if source == UsernameSource::Explicit {
        source.describe().to_owned()
    } else {
        format!("from the {}", source.describe())
    };
    let detail = format!(
        "{} ({}, {source}; object id {})",
        identity.creds.user(),
        crate::inspect::principal_kind(&identity.claims),
        identity.claims.oid().unwrap_or("unknown")
    );
    Ok((identity, detail))
}

async fn login(
    auth: &EntraAuth,
    settings: &Settings,
    identity: &Identity,
) -> StepResult<tokio_postgres::Client> {
    let connector = EntraConnector::new(auth.clone(), &settings.info)
        .map_err(|error| failure(error.to_string(), "fix the connection settings named above"))?;
    // The credentials the earlier steps described, not a newer token.
    let config = connector.with_credentials(&identity.creds);
    let (client, connection) = timeout(LOGIN_TIMEOUT, config.connect(connector.tls().clone()))
        .await
        .map_err(|_| {
            failure(
                "the login did not finish in time",
                "the server accepted TCP and TLS but did not answer the login: check its load and logs",
            )
        })?
        .map_err(|error| login_failure(&error, auth, identity))?;
    tokio::spawn(connection);
    let detail = format!(
        "accepted as {} in database {}",
        identity.creds.user(),
        settings.info.dbname.as_deref().unwrap_or(DEFAULT_DBNAME)
    );
    Ok((client, detail))
}

/// The server's refusal, with Azure's known messages turned into advice.
fn login_failure(error: &tokio_postgres::Error, auth: &EntraAuth, identity: &Identity) -> Failure {
    let Some(db) = error.as_db_error() else {
        return failure(
            error_chain(error),
            "the earlier steps reached the server, so this failed during the login itself: run with -vv for details",
        );
    };
    let message = db.message();
    let detail = format!("{message} (SQLSTATE {})", db.code().code());
    let role = identity.creds.user();
    let oid = identity.claims.oid().unwrap_or("<object id>");
    let tenant = identity.claims.tid().unwrap_or("unknown");
    let quoted_role = role.replace('\'', "''");
    let create_for_app = format!(
        "SELECT * FROM pgaadauth_create_principal_with_oid('{quoted_role}', '{oid}', 'service', false, false);"
    );
    let hint = if message.starts_with("password authentication failed") {
        let (create, who) = match identity.claims.principal_kind() {
            PrincipalKind::User | PrincipalKind::GuestUser => (
                format!("SELECT * FROM pgaadauth_create_principal('{quoted_role}', false, false);"),
                "users and groups",
            ),
            _ => (create_for_app, "managed identities and service principals"),
        };
        let mut hint = format!(
            "the server has no Entra role {role:?} for this {} (oid {oid}): an Entra administrator creates it, connected to the postgres database, with `{create}` ({who})",
            crate::inspect::principal_kind(&identity.claims)
        );
        if identity.creds.user_source() == UsernameSource::Explicit {
            hint.push_str(&format!(
                "; if {role:?} is a group role, add this principal to that group in Entra ID"
            ));
        }
        hint
    } else if message.starts_with("The access token has expired")
        || message.starts_with("The access token is not valid yet")
    {
        "the server found the token expired or not yet valid: check this machine's clock, and sign in again (`az login`)".to_owned()
    } else if message.contains("does not have a valid audience claim") {
        format!(
            "the token is for another audience than this server ({} was asked for): choose the server's cloud with --cloud, or its scope with --scope",
            auth.scope()
        )
    } else if message.starts_with("An error occurred while validating the access token") {
        format!(
            "the server did not accept a token from tenant {tenant}: sign in to the server's tenant (`az login --tenant <server's tenant>`, or AZURE_TENANT_ID)"
        )
    } else if message.starts_with("Service Principals cannot generate")
        || message.starts_with("Service Principal oid mismatch")
    {
        format!(
            "the role {role:?} is mapped to another principal: log in as the role created for this principal (oid {oid}), or have an Entra administrator create one with `{create_for_app}`"
        )
    } else if db.code().code() == "3D000" {
        "the database does not exist: check dbname / PGDATABASE (every Azure server has postgres)"
            .to_owned()
    } else {
        "the server refused the login with the message above; `pgentra whoami` shows the principal and role".to_owned()
    };
    failure(detail, hint)
}

async fn query(client: &tokio_postgres::Client) -> StepResult<()> {
    let row = timeout(
        LOGIN_TIMEOUT,
        client.query_one("SELECT current_user::text, version()", &[]),
    )
    .await
    .map_err(|_| {
        failure(
            "the query did not finish in time",
            "check the server's load",
        )
    })?
    .map_err(|error| {
        let detail = error
            .as_db_error()
            .map_or_else(|| error_chain(&error), |db| db.message().to_owned());
        failure(
            detail,
            "the login worked but the query failed: check the role's privileges on the database",
        )
    })?;
    let text = |index: usize| row.try_get::<_, String>(index).unwrap_or_default();
    let version = text(1);
    // `PostgreSQL 15.8 (Debian ...) on x86_64-pc-linux-gnu, compiled by ...`: up to the comma.
    let version = version.split(',').next().unwrap_or_default();
    Ok(((), format!("logged in as {}; {version}", text(0))))
}

/// An error and its sources on one line (tokio-postgres keeps the cause in a source).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(error), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}
