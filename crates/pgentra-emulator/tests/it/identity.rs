//! The managed-identity endpoints against the real `azure_identity` credentials and pgentra's
//! provider.

use pgentra::EntraAuth;
use pgentra::claims::{Claims, UsernameSource};
use pgentra::credential::CredentialChain;
use pgentra_emulator::ca::Ca;
use pgentra_emulator::identity::{Endpoint, Identities, IdentityServer};
use pgentra_emulator::issuer::{Issuer, Principal};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

const TENANT: &str = "72f988bf-0000-4000-8000-00000000e001";
const VM: &str =
    "/subscriptions/s/resourcegroups/g/providers/Microsoft.Compute/virtualMachines/build-vm";

const SP_SECRET: &str = "emulator-secret~value";

fn server(lifetime: Duration) -> (IdentityServer, Principal, Arc<Issuer>) {
    server_with_ca(lifetime).0
}

fn server_with_ca(lifetime: Duration) -> ((IdentityServer, Principal, Arc<Issuer>), Ca) {
    let ca = Ca::new().unwrap();
    let issuer = Arc::new(Issuer::new(TENANT, lifetime));
    let uami = Principal::user_assigned_identity("orders-mi");
    let server = IdentityServer::start(
        Arc::clone(&issuer),
        Identities {
            default_identity: Principal::system_assigned_identity(VM),
            user_assigned: vec![uami.clone()],
            cli_user: Principal::user("dev@contoso.com"),
            service_principals: vec![(
                Principal::service_principal("reporting-app"),
                SP_SECRET.into(),
            )],
        },
        ca.server_config(&[]).unwrap(),
        0,
    )
    .unwrap();
    ((server, uami, issuer), ca)
}

/// A provider whose only credential is the real managed-identity credential, with IMDS
/// requests sent to the emulator.
fn imds_provider(server: &IdentityServer, client_id: Option<&str>) -> pgentra::EntraAuthBuilder {
    assert!(
        std::env::var_os("IDENTITY_ENDPOINT").is_none(),
        "IDENTITY_ENDPOINT is set in this environment, so azure_identity would use App Service instead of IMDS"
    );
    let mut vars = vec![
        (
            "AZURE_TOKEN_CREDENTIALS".to_owned(),
            "ManagedIdentityCredential".to_owned(),
        ),
        (
            "AZURE_POD_IDENTITY_AUTHORITY_HOST".to_owned(),
            server.imds_authority(),
        ),
    ];
    if let Some(id) = client_id {
        vars.push(("AZURE_CLIENT_ID".to_owned(), id.to_owned()));
    }
    EntraAuth::builder().credential_chain(CredentialChain::from_vars(vars).unwrap())
}

#[tokio::test]
async fn imds_user_assigned_identity_logs_in_as_its_name() {
    let (server, uami, _) = server(Duration::from_secs(3600));
    let auth = imds_provider(&server, Some(&uami.client_id))
        .build()
        .unwrap();
    let creds = auth.credentials().await.unwrap();
    assert_eq!(creds.user(), "orders-mi");
    assert_eq!(creds.user_source(), UsernameSource::UserAssignedIdentity);
    assert_eq!(creds.credential(), "ManagedIdentityCredential");
    assert_eq!(server.requests(Endpoint::Imds), 1);
}

#[tokio::test]
async fn imds_system_assigned_identity_logs_in_as_its_resource() {
    let (server, _, _) = server(Duration::from_secs(3600));
    let auth = imds_provider(&server, None).build().unwrap();
    let creds = auth.credentials().await.unwrap();
    assert_eq!(creds.user(), "build-vm");
    assert_eq!(creds.user_source(), UsernameSource::SystemAssignedIdentity);
}

/// Run by the next test in a child process whose environment has the App Service variables:
/// the unchanged `ManagedIdentityCredential` reads them from the process environment.
#[tokio::test]
async fn child_app_service_credential() {
    if std::env::var_os("PGENTRA_APP_SERVICE_CHILD").is_none() {
        return;
    }
    use azure_core::credentials::TokenCredential as _;
    let credential = azure_identity::ManagedIdentityCredential::new(None).unwrap();
    let token = credential
        .get_token(
            &["https://ossrdbms-aad.database.windows.net/.default"],
            None,
        )
        .await
        .unwrap();
    let claims = Claims::decode(token.token.secret()).unwrap();
    println!("ROLE={}", claims.role_name().unwrap().0);
    println!("EXPIRES={}", token.expires_on.unix_timestamp());
}

#[test]
fn app_service_protocol_serves_the_unchanged_managed_identity_credential() {
    let (server, _, issuer) = server(Duration::from_secs(600));
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "identity::child_app_service_credential",
            "--nocapture",
        ])
        .env("PGENTRA_APP_SERVICE_CHILD", "1")
        .env("IDENTITY_ENDPOINT", server.identity_endpoint())
        .env("IDENTITY_HEADER", server.identity_header())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("ROLE=build-vm"), "{stdout}");
    let expires: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("EXPIRES="))
        .unwrap()
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(expires > now && expires <= now + issuer.lifetime().as_secs());
    assert_eq!(server.requests(Endpoint::AppService), 1);
}

/// A raw HTTP GET; returns the status code and body.
fn get(server: &IdentityServer, path_and_query: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let authority = server.imds_authority();
    let addr = authority.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let mut request =
        format!("GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

const MSI: &str =
    "/msi/token?api-version=2019-08-01&resource=https://ossrdbms-aad.database.windows.net";
const IMDS: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://ossrdbms-aad.database.windows.net";

#[test]
fn responses_have_the_shape_clients_parse_and_headers_are_checked() {
    let (server, uami, issuer) = server(Duration::from_secs(3600));
    let (status, body) = get(
        &server,
        MSI,
        &[("X-IDENTITY-HEADER", server.identity_header())],
    );
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(json["expires_on"].is_string(), "{json}");
    assert_eq!(json["token_type"], "Bearer");
    assert_eq!(
        json["resource"],
        "https://ossrdbms-aad.database.windows.net"
    );
    issuer
        .verify(
            json["access_token"].as_str().unwrap(),
            "https://ossrdbms-aad.database.windows.net",
            Duration::ZERO,
        )
        .unwrap();

    assert_eq!(get(&server, MSI, &[("X-IDENTITY-HEADER", "wrong")]).0, 401);
    assert_eq!(get(&server, MSI, &[]).0, 401);
    assert_eq!(get(&server, IMDS, &[]).0, 400);
    assert_eq!(get(&server, IMDS, &[("Metadata", "true")]).0, 200);
    let user_assigned = format!("{IMDS}&client_id={}", uami.client_id);
    assert_eq!(get(&server, &user_assigned, &[("Metadata", "true")]).0, 200);
    assert_eq!(
        get(
            &server,
            &format!("{IMDS}&client_id=unknown"),
            &[("Metadata", "true")]
        )
        .0,
        400
    );
    assert_eq!(
        get(
            &server,
            "/metadata/identity/oauth2/token",
            &[("Metadata", "true")]
        )
        .0,
        400
    );
    let (status, jwks) = get(&server, &format!("/{TENANT}/discovery/v2.0/keys"), &[]);
    assert_eq!(status, 200);
    assert!(jwks.contains("\"kty\":\"RSA\""), "{jwks}");
    assert_eq!(server.requests(Endpoint::Keys), 1);
}

#[test]
fn injected_failures_come_first_then_tokens() {
    let (server, _, _) = server(Duration::from_secs(3600));
    server.fail_next(2, 503);
    let imds = |server: &IdentityServer| get(server, IMDS, &[("Metadata", "true")]).0;
    assert_eq!(imds(&server), 503);
    assert_eq!(imds(&server), 503);
    assert_eq!(imds(&server), 200);
    server.fail_next(1, 429);
    assert_eq!(imds(&server), 429);
    assert_eq!(server.requests(Endpoint::Imds), 4);
}

#[test]
fn a_herd_is_throttled_like_imds() {
    let (server, _, _) = server(Duration::from_secs(3600));
    // Slow answers keep the first five busy, so the rest of the herd exceeds 5 at once.
    server.set_latency(Duration::from_millis(300));
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let herd: Vec<_> = (0..30)
            .map(|_| scope.spawn(|| get(&server, IMDS, &[("Metadata", "true")]).0))
            .collect();
        herd.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(ok + throttled, 30, "{statuses:?}");
    assert!((1..=5).contains(&ok), "at most 5 at once: {statuses:?}");
    assert_eq!(server.throttled(), throttled as u64);
}

#[test]
fn more_than_twenty_requests_a_second_are_throttled() {
    // 25 sequential requests on loopback take a few milliseconds; on a machine so loaded that
    // they take close to a second the window check is inconclusive, so try again.
    for _ in 0..3 {
        let (server, _, _) = server(Duration::from_secs(3600));
        let started = std::time::Instant::now();
        let statuses: Vec<u16> = (0..25)
            .map(|_| get(&server, IMDS, &[("Metadata", "true")]).0)
            .collect();
        if started.elapsed() > Duration::from_millis(900) {
            continue;
        }
        assert_eq!(statuses[..20], [200; 20], "{statuses:?}");
        assert_eq!(statuses[20..], [429; 5], "{statuses:?}");
        return;
    }
    panic!("the machine was too slow to send 25 requests within a second, three times");
}

#[tokio::test]
async fn provider_serves_a_valid_token_while_the_issuer_hangs_then_errors_within_its_timeout() {
    let (server, _, _) = server(Duration::from_secs(12));
    let auth = imds_provider(&server, None)
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let first = auth.credentials().await.unwrap();
    server.set_hang(true);
    // The 12 s token is refreshed at 5.4-6 s; that call hangs and is cut off after 1 s. Real
    // time is the subject here (expiry), so wait for the failure by watching the counter.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while auth.stats().fetch_failures == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the refresh never failed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Still before the safety margin: the old token is served.
    let served = auth.credentials().await.unwrap();
    assert_eq!(served.password(), first.password());
    assert!(
        auth.subscribe()
            .borrow()
            .as_ref()
            .is_some_and(|c| c.password() == first.password())
    );
    // Past the safety margin (a quarter of the 11-12 s the provider saw, so under 3 s) yet
    // before expiry: an error naming the credential, within the 1 s timeout.
    let past_margin = first.expires_at() - Duration::from_secs(2);
    let wait = past_margin
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait).await;
    let started = std::time::Instant::now();
    let err = auth.credentials().await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        err.to_string().contains("ManagedIdentityCredential"),
        "{err}"
    );
    // The issuer comes back: the provider recovers by itself within a backoff step.
    server.set_hang(false);
    let mut tokens = auth.subscribe();
    tokens
        .wait_for(|t| t.as_ref().is_some_and(|c| c.password() != first.password()))
        .await
        .unwrap();
    auth.credentials().await.unwrap();
}

/// A temp directory removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(format!("pgentra-{label}-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn cli_shims_serve_the_unchanged_cli_credentials() {
    let (server, _, issuer) = server(Duration::from_secs(3600));
    let bin = TempDir::new("shims");
    server.write_cli_shims(&bin.0).unwrap();
    for (name, endpoint) in [
        ("AzureCliCredential", Endpoint::AzureCli),
        ("AzureDeveloperCliCredential", Endpoint::AzureDeveloperCli),
    ] {
        let chain = CredentialChain::from_vars([
            ("PATH", bin.0.to_str().unwrap()),
            ("AZURE_TOKEN_CREDENTIALS", name),
        ])
        .unwrap();
        let auth = EntraAuth::builder()
            .credential_chain(chain)
            .build()
            .unwrap();
        let creds = auth.credentials().await.unwrap();
        assert_eq!(creds.user(), "dev@contoso.com", "{name}");
        assert_eq!(creds.user_source(), UsernameSource::Upn);
        assert_eq!(creds.credential(), name);
        issuer
            .verify(
                creds.password().expose_secret(),
                "https://ossrdbms-aad.database.windows.net",
                Duration::ZERO,
            )
            .unwrap();
        assert_eq!(server.requests(endpoint), 1, "{name}");
    }
}

#[test]
fn cli_shims_print_what_the_real_tools_print() {
    let (server, _, _) = server(Duration::from_secs(3600));
    let bin = TempDir::new("shim-output");
    server.write_cli_shims(&bin.0).unwrap();
    let run = |tool: &str, args: &[&str]| {
        let output = std::process::Command::new(bin.0.join(tool))
            .args(args)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    let scope = "https://ossrdbms-aad.database.windows.net/.default";
    let (ok, az) = run(
        "az",
        &[
            "account",
            "get-access-token",
            "-o",
            "json",
            "--scope",
            scope,
        ],
    );
    assert!(ok);
    let az: serde_json::Value = serde_json::from_str(&az).unwrap();
    assert!(az["expires_on"].is_u64(), "{az}");
    assert!(
        az["accessToken"].is_string() && az["expiresOn"].is_string(),
        "{az}"
    );
    let (ok, azd) = run("azd", &["auth", "token", "-o", "json", "--scope", scope]);
    assert!(ok);
    let azd: serde_json::Value = serde_json::from_str(&azd).unwrap();
    let expires = azd["expiresOn"].as_str().unwrap();
    assert!(expires.ends_with('Z') && expires.contains('T'), "{azd}");
    // No scope: fails like a CLI, with a message and exit code 1.
    let (ok, _) = run("az", &["account", "get-access-token", "-o", "json"]);
    assert!(!ok);
}

/// Run by the next test in a child process with the service-principal environment: the chain
/// from the process environment, the unchanged `ClientSecretCredential` inside it.
#[tokio::test]
async fn child_client_secret_credential() {
    if std::env::var_os("PGENTRA_OAUTH_CHILD").is_none() {
        return;
    }
    let chain = CredentialChain::from_env().unwrap();
    match chain
        .token("https://ossrdbms-aad.database.windows.net/.default")
        .await
    {
        Ok((token, kind)) => {
            let claims = Claims::decode(token.token.secret()).unwrap();
            println!("KIND={kind}");
            println!("APPID={}", claims.appid().unwrap_or_default());
        }
        Err(err) => println!("ERROR={err}"),
    }
}

#[test]
fn oauth_over_https_serves_the_unchanged_client_secret_credential() {
    let ((server, _, _), ca) = server_with_ca(Duration::from_secs(3600));
    let dir = TempDir::new("oauth");
    let ca_file = dir.0.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let sp = Principal::service_principal("reporting-app");
    let run = |secret: &str| {
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "identity::child_client_secret_credential",
                "--nocapture",
            ])
            .env("PGENTRA_OAUTH_CHILD", "1")
            .env("AZURE_TOKEN_CREDENTIALS", "EnvironmentCredential")
            .env("AZURE_TENANT_ID", TENANT)
            .env("AZURE_CLIENT_ID", &sp.client_id)
            .env("AZURE_CLIENT_SECRET", secret)
            .env("AZURE_AUTHORITY_HOST", server.authority_host())
            .env("SSL_CERT_FILE", &ca_file)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let good = run(SP_SECRET);
    assert!(good.contains("KIND=EnvironmentCredential"), "{good}");
    assert!(good.contains(&format!("APPID={}", sp.client_id)), "{good}");
    let bad = run("wrong-secret");
    assert!(bad.contains("AADSTS7000215"), "{bad}");
    assert!(
        !bad.contains("wrong-secret"),
        "the secret leaked into the error: {bad}"
    );
    assert_eq!(server.requests(Endpoint::OAuth), 2);
}

/// The App Service header secret protects the token endpoint from other local processes: it is
/// 128 bits from the OS's CSPRNG, not a seeded RNG's output (whose state a process on the
/// machine could recover). The server is made on this thread, so this thread's fastrand is the
/// RNG that would have been used.
#[test]
fn the_managed_identity_header_secret_is_unpredictable() {
    const SEED: u64 = 42;
    let mut headers = Vec::new();
    for _ in 0..2 {
        fastrand::seed(SEED);
        let (server, _, _) = server(Duration::from_secs(3600));
        let header = server.identity_header().to_owned();
        let hex = header.trim_start_matches("emulator-");
        assert!(
            hex.len() >= 32 && hex.chars().all(|c| c.is_ascii_hexdigit()),
            "{header}"
        );
        let predicted = format!("{:016x}", fastrand::Rng::with_seed(SEED).u64(..));
        assert!(!hex.contains(&predicted), "{header} was predicted");
        headers.push(header);
    }
    assert_ne!(headers[0], headers[1], "the same seed gave the same secret");
}
