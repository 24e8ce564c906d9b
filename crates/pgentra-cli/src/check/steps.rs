//! What each step of `check` does, in the order they run: each returns the value the next
//! steps need and a one-line detail, or a [`Failure`].

use super::hints;
use super::{StepResult, failure};
use crate::auth::AuthArgs;
use crate::error::chain;
use crate::output::relative;
use crate::target::Target;
use pgentra::claims::{Claims, MissingRole, UsernameSource};
use pgentra::conninfo::ConnInfo;
use pgentra::tls::SslMode;
use pgentra::tokio_postgres::EntraConnector;
use pgentra::{DbCredentials, EntraAuth};
use rustls::ProtocolVersion;
use rustls::pki_types::ServerName;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::timeout;

const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// Per address: a firewall that drops packets shows up as a timeout, not a refusal.
const TCP_TIMEOUT: Duration = Duration::from_secs(5);
const TLS_TIMEOUT: Duration = Duration::from_secs(10);
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);
const DEFAULT_PORT: u16 = 5432;
const DEFAULT_DBNAME: &str = "postgres";

/// What is checked: the connection settings with their defaults filled in.
pub(super) struct Settings {
    /// For the login; its user is cleared, since the provider decides the role.
    info: ConnInfo,
    /// The name to resolve and to check the certificate against.
    pub(super) host: String,
    hostaddr: Option<IpAddr>,
    port: u16,
    /// A role pinned by `--user` or the settings.
    user: Option<String>,
}

pub(super) fn settings(target: &Target) -> StepResult<Settings> {
    let parsed = target
        .explicit()
        .and_then(|explicit| Ok(explicit.or(ConnInfo::from_env()?)));
    let mut info = parsed.map_err(|error| {
        failure(
            chain(&error),
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
    let user = target.user.role(&info);
    info.user = None;
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

pub(super) async fn resolve(settings: &Settings) -> StepResult<Vec<SocketAddr>> {
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

pub(super) async fn connect(settings: &Settings, addrs: &[SocketAddr]) -> StepResult<TcpStream> {
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

/// The SSLRequest and the handshake, with pgentra's own pieces (`pgentra_wire::ssl_request`,
/// `TlsOptions::client_config`) but a probe of its own: the drivers and the proxy connect in
/// one step and fold every failure into one error, where `check` must tell an `N` from a
/// closed connection, a timeout or each kind of certificate error.
pub(super) async fn tls(settings: &Settings, mut stream: TcpStream) -> StepResult<()> {
    let options = settings.info.tls_options();
    let config = options.client_config().map_err(|error| {
        failure(
            chain(&error),
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
    let stream = handshake.map_err(|error| hints::handshake(settings, &options, &error))?;
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

/// The credentials of a login, and the claims of their token.
pub(super) struct Identity {
    pub(super) creds: DbCredentials,
    pub(super) claims: Claims,
}

/// The provider, and its credentials unless the token names no role.
pub(super) type Token = (EntraAuth, Result<Identity, MissingRole>);

pub(super) async fn token(auth_args: &AuthArgs, settings: &Settings) -> StepResult<Token> {
    let auth = auth_args
        .provider(settings.user.as_deref())
        .map_err(|error| {
            failure(
                chain(&error),
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
        Err(error) => return Err(hints::token(&error)),
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

pub(super) fn role(identity: Result<Identity, MissingRole>) -> StepResult<Identity> {
    let identity = identity.map_err(|reason| hints::missing_role(&reason))?;
    let source = identity.creds.user_source();
    let source = if source == UsernameSource::Explicit {
        source.describe().to_owned()
    } else {
        format!("from the {}", source.describe())
    };
    let detail = format!(
        "{} ({}, {source}; object id {})",
        identity.creds.user(),
        identity.claims.principal_kind().describe(),
        identity.claims.oid().unwrap_or("unknown")
    );
    Ok((identity, detail))
}

pub(super) async fn login(
    auth: &EntraAuth,
    settings: &Settings,
    identity: &Identity,
) -> StepResult<tokio_postgres::Client> {
    let connector = EntraConnector::new(auth.clone(), &settings.info)
        .map_err(|error| failure(chain(&error), "fix the connection settings named above"))?;
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
        .map_err(|error| hints::login(&error, auth, identity))?;
    tokio::spawn(connection);
    let detail = format!(
        "accepted as {} in database {}",
        identity.creds.user(),
        settings.info.dbname.as_deref().unwrap_or(DEFAULT_DBNAME)
    );
    Ok((client, detail))
}

pub(super) async fn query(client: &tokio_postgres::Client) -> StepResult<()> {
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
            .map_or_else(|| chain(&error), |db| db.message().to_owned());
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
