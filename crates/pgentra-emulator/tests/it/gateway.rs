//! The gateway with real clients: psql (libpq) and tokio-postgres, against the real PostgreSQL
//! behind it.

use pgentra_emulator::gateway::{Gateway, GatewayConfig};
use pgentra_emulator::issuer::{Issuer, Principal};
use pgentra_emulator::{Emulator, MANAGED_IDENTITY, USER};
use std::io::{Read, Write};
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn emulator() -> &'static Emulator {
    Emulator::shared()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Runs `psql -c sql` as `user` with `password`, with the emulator's environment.
fn psql(user: &str, password: &str, sql: &str, extra_env: &[(&str, &str)]) -> Output {
    let mut command = std::process::Command::new("psql");
    command
        .args(["-X", "-A", "-t", "-c", sql])
        .envs(emulator().env())
        .env("PGUSER", user)
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10");
    for (k, v) in extra_env {
        command.env(k, v);
    }
    command
        .output()
        .expect("run psql (install the PostgreSQL client: apt-get install postgresql-client)")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts that psql was refused with `expected` in its error, and that no token text shows.
fn assert_refused(output: &Output, expected: &str) {
    assert!(
        !output.status.success(),
        "psql logged in: {}",
        stdout(output)
    );
    let err = stderr(output);
    assert!(err.contains(expected), "expected {expected:?} in:\n{err}");
}

fn alice() -> Principal {
    Principal::user(USER)
}

#[test]
fn psql_logs_in_with_a_token_over_verified_tls() {
    let token = emulator().token_for(&alice()).token;
    let output = psql(USER, &token, "SELECT current_user", &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), USER);
}

#[test]
fn a_managed_identity_logs_in_as_its_name_and_a_member_as_its_group() {
    let identity = Principal::user_assigned_identity(MANAGED_IDENTITY);
    let token = emulator().token_for(&identity).token;
    let output = psql(MANAGED_IDENTITY, &token, "SELECT current_user", &[]);
    assert_eq!(stdout(&output), MANAGED_IDENTITY, "{}", stderr(&output));
    let output = psql("readers", &token, "SELECT current_user", &[]);
    assert_eq!(stdout(&output), "readers", "{}", stderr(&output));
}

#[test]
fn expired_token_is_refused() {
    let lifetime = emulator().issuer().lifetime().as_secs();
    let token = emulator()
        .issuer()
        .issue_at(
            &alice(),
            &emulator().config().audience,
            now() - lifetime - 60,
        )
        .token;
    assert_refused(
        &psql(USER, &token, "SELECT 1", &[]),
        "The access token has expired. Acquire a new token and try again.",
    );
}

#[test]
fn token_not_yet_valid_is_refused() {
    let token = emulator()
        .issuer()
        .issue_at(&alice(), &emulator().config().audience, now() + 600)
        .token;
    assert_refused(&psql(USER, &token, "SELECT 1", &[]), "not valid yet");
}

#[test]
fn wrong_audience_is_refused_with_the_resource_to_ask_for() {
    let token = emulator()
        .issuer()
        .issue(&alice(), "https://management.azure.com/.default")
        .token;
    assert_refused(
        &psql(USER, &token, "SELECT 1", &[]),
        "The access token does not have a valid audience claim. Please acquire a new token for the resource \"https://ossrdbms-aad.database.windows.net\".",
    );
}

#[test]
fn token_signed_by_another_key_is_refused() {
    let forger = Issuer::new(emulator().issuer().tenant(), Duration::from_secs(3600));
    let token = forger.issue(&alice(), &emulator().config().audience).token;
    assert_refused(
        &psql(USER, &token, "SELECT 1", &[]),
        "An error occurred while validating the access token",
    );
}

#[test]
fn a_principal_cannot_use_another_principals_role() {
    let token = |principal: &Principal| emulator().token_for(principal).token;
    let identity = Principal::user_assigned_identity(MANAGED_IDENTITY);
    // Each refusal with Azure's text for its case.
    let cases = [
        (
            MANAGED_IDENTITY,
            token(&alice()),
            format!(
                "Azure AD user token for role[{MANAGED_IDENTITY}] is neither an AAD_AUTH_TOKENTYPE_APP_USER or an AAD_AUTH_TOKENTYPE_APP_OBO token."
            ),
        ),
        (
            USER,
            token(&identity),
            format!(
                "Service Principals cannot generate AAD_AUTH_TOKENTYPE_APP_USER tokens for role[{USER}]"
            ),
        ),
        (
            MANAGED_IDENTITY,
            token(&Principal::service_principal("reporting-app")),
            format!("Service Principal oid mismatch for role[{MANAGED_IDENTITY}]."),
        ),
        (
            USER,
            token(&Principal::user("bob@contoso.com")),
            format!("password authentication failed for user \"{USER}\""),
        ),
    ];
    for (role, token, expected) in cases {
        assert_refused(&psql(role, &token, "SELECT 1", &[]), &expected);
    }
}

#[test]
fn a_password_that_is_not_a_jwt_is_refused() {
    assert_refused(
        &psql(USER, "hunter2", "SELECT 1", &[]),
        "The access token has invalid format.",
    );
}

#[test]
fn plain_text_login_is_refused() {
    let token = emulator().token_for(&alice()).token;
    let output = psql(USER, &token, "SELECT 1", &[("PGSSLMODE", "disable")]);
    assert_refused(&output, "no encryption");
    assert!(!stderr(&output).contains(&token));
}

/// A raw TCP connection to a gateway.
fn raw(port: u16) -> std::net::TcpStream {
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

/// Reads until the gateway closes the connection; returns what it sent.
fn read_to_close(stream: &mut std::net::TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received);
    received
}

#[test]
fn oversized_startup_packet_is_dropped_and_others_are_unaffected() {
    let mut stream = raw(emulator().gateway().port());
    let mut packet = 20_000i32.to_be_bytes().to_vec();
    packet.extend(196_608i32.to_be_bytes());
    packet.resize(20_000, b'x');
    let _ = stream.write_all(&packet);
    assert!(
        read_to_close(&mut stream).is_empty(),
        "the gateway answered an oversized packet"
    );
    // Garbage of every kind on other connections...
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"\x00\x00\x00\x04",
        b"\xff\xff\xff\xff",
        b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
    ] {
        let mut stream = raw(emulator().gateway().port());
        let _ = stream.write_all(garbage);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        read_to_close(&mut stream);
    }
    // ...and a real login still works.
    let token = emulator().token_for(&alice()).token;
    assert_eq!(
        stdout(&psql(USER, &token, "SELECT current_user", &[])),
        USER
    );
}

#[test]
fn a_silent_client_is_dropped_after_the_login_timeout() {
    // A gateway of its own with a short login timeout, in front of the shared cluster.
    let config = GatewayConfig {
        audience: emulator().config().audience.clone(),
        skew: Duration::from_secs(5),
        login_timeout: Duration::from_millis(300),
        directory: Default::default(),
        backend: emulator().backend().clone(),
        backend_user: "postgres".into(),
        port: 0,
    };
    let ca = pgentra_emulator::ca::Ca::new().unwrap();
    let gateway = Gateway::start(
        config,
        Arc::clone(emulator().issuer()),
        ca.server_config(&[]).unwrap(),
    )
    .unwrap();
    let mut stream = raw(gateway.port());
    let started = std::time::Instant::now();
    // Sends nothing; the gateway closes the connection (read returns 0).
    assert!(read_to_close(&mut stream).is_empty());
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

/// tokio-postgres settings for the gateway as alice, TLS required.
fn gateway_config() -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host("localhost")
        .port(emulator().gateway().port())
        .dbname("postgres")
        .user(USER)
        .ssl_mode(tokio_postgres::config::SslMode::Require);
    config
}

/// verify-full TLS trusting the emulator's CA.
fn tls() -> tokio_postgres_rustls::MakeRustlsConnect {
    pgentra::tls::TlsOptions::verify_full()
        .with_root_cert(emulator().ca_file())
        .make_tls_connect()
        .unwrap()
}

async fn connect(token: &str) -> (tokio_postgres::Client, tokio::task::JoinHandle<()>) {
    let mut config = gateway_config();
    config.password(token);
    let tls = tls();
    let (client, connection) = config.connect(tls).await.unwrap();
    (
        client,
        tokio::spawn(async move {
            let _ = connection.await;
        }),
    )
}

#[tokio::test]
async fn an_open_session_outlives_its_token() {
    let lifetime = emulator().issuer().lifetime().as_secs();
    // A token that expires in 2 seconds.
    let token = emulator()
        .issuer()
        .issue_at(
            &alice(),
            &emulator().config().audience,
            now() + 2 - lifetime,
        )
        .token;
    let (client, _connection) = connect(&token).await;
    // Wait until the gateway refuses new logins with this token (expiry plus skew)...
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let output = tokio::task::spawn_blocking({
            let token = token.clone();
            move || psql(USER, &token, "SELECT 1", &[])
        })
        .await
        .unwrap();
        if !output.status.success() {
            assert!(
                stderr(&output).contains("has expired"),
                "{}",
                stderr(&output)
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the token never expired"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // ...while the session opened with it keeps working.
    let row = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), USER);
}

#[tokio::test]
async fn cancel_requests_reach_the_backend() {
    let token = emulator().token_for(&alice()).token;
    let (client, _connection) = connect(&token).await;
    let cancel = client.cancel_token();
    let query = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    // Cancel once the query is running on the backend.
    let (watcher, _watching) = connect(&token).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let running = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
                &[],
            )
            .await
            .unwrap();
        if running.get::<_, i64>(0) > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the query never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel_query(tls()).await.unwrap();
    let err = query.await.unwrap().unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{err}"
    );
}

/// A token for alice padded to about `size` bytes.
fn padded_token(size: usize) -> String {
    let issuer = emulator().issuer();
    let alice = alice();
    // base64 grows by 4/3; the header and signature take about 450 bytes.
    let pad = "x".repeat((size.saturating_sub(600)) * 3 / 4);
    let token = issuer.sign(&serde_json::json!({
        "aud": emulator().config().audience, "iss": issuer.issuer(), "tid": issuer.tenant(),
        "oid": alice.oid, "upn": USER, "nbf": now(), "iat": now(), "exp": now() + 3600, "pad": pad,
    }));
    assert!(
        (size * 9 / 10..=size * 11 / 10).contains(&token.len()),
        "{} bytes",
        token.len()
    );
    token
}

#[test]
fn tokens_up_to_64_kib_are_accepted_and_larger_ones_refused() {
    // Real user tokens reach about 7 KB; the gateway, like Azure, takes far more.
    for size in [7_000, 60_000] {
        let token = padded_token(size);
        assert!(token.len() < 64 * 1024);
        let output = psql(USER, &token, "SELECT current_user", &[]);
        assert_eq!(stdout(&output), USER, "{size}: {}", stderr(&output));
    }
    let oversized = padded_token(70_000);
    assert!(oversized.len() > 64 * 1024 + 1);
    let output = psql(USER, &oversized, "SELECT 1", &[]);
    assert!(!output.status.success());
}

#[tokio::test]
async fn rejections_carry_sqlstates_28p01_and_28000() {
    let config = gateway_config();
    let expired = config
        .clone()
        .password("not-a-token")
        .connect(tls())
        .await
        .err()
        .expect("a bad token is refused");
    assert_eq!(
        expired.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
        "{expired}"
    );
    let plain = config
        .clone()
        .password(emulator().token_for(&alice()).token)
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("a plain-text login is refused");
    assert_eq!(
        plain.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{plain}"
    );
}

/// The `BackendKeyData` the gateway sends for one login as alice (a raw client over TLS).
async fn gateway_cancel_key() -> (i32, Vec<u8>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let config = pgentra::tls::TlsOptions::verify_full()
        .with_root_cert(emulator().ca_file())
        .client_config()
        .unwrap();
    let port = emulator().gateway().port();
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tcp.write_all(&pgentra_wire::ssl_request()).await.unwrap();
    assert_eq!(tcp.read_u8().await.unwrap(), b'S');
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    let startup = pgentra_wire::startup_message(&[("user", USER), ("database", "postgres")]);
    tls.write_all(&startup).await.unwrap();
    let mut key = None;
    loop {
        let (tag, body) = pgentra_wire::read_message(&mut tls, 1 << 20).await.unwrap();
        match tag {
            b'R' if body[..] == [0, 0, 0, 3] => {
                let mut password = emulator().token_for(&alice()).token.into_bytes();
                password.push(0);
                let message = pgentra_wire::message(b'p', &password);
                tls.write_all(&message).await.unwrap();
            }
            b'K' => {
                key = Some((
                    i32::from_be_bytes(body[..4].try_into().unwrap()),
                    body[4..].to_vec(),
                ))
            }
            b'Z' => return key.expect("a BackendKeyData before ReadyForQuery"),
            b'E' => panic!("{:?}", pgentra_wire::ErrorFields::parse(&body)),
            _ => {}
        }
    }
}

/// Keys come from the OS's CSPRNG: process IDs are not a counter a client can step from its
/// own, and no two sessions share a key.
#[tokio::test]
async fn cancel_keys_are_random_not_sequential() {
    let mut keys = Vec::new();
    for _ in 0..8 {
        keys.push(gateway_cancel_key().await);
    }
    for pair in keys.windows(2) {
        assert_ne!(pair[1].0, pair[0].0 + 1, "sequential process IDs: {keys:?}");
    }
    assert!(
        keys.iter().all(|(pid, key)| *pid > 0 && key.len() == 4),
        "{keys:?}"
    );
    let mut distinct = keys.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), keys.len(), "{keys:?}");
}

// ---------------------------------------------------------------------------------------------
// Provisioning like Azure: the Entra administrator and pgaadauth_*.
// ---------------------------------------------------------------------------------------------

/// A session through the gateway as `role` with `principal`'s token.
async fn session(
    role: &str,
    principal: &Principal,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = gateway_config();
    config
        .user(role)
        .password(emulator().token_for(principal).token);
    let (client, connection) = config.connect(tls()).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The admin's session (alice, the first user principal).
async fn admin() -> tokio_postgres::Client {
    let admin = emulator().admin().expect("an Entra administrator").clone();
    session(&admin.role, &admin).await.unwrap()
}

fn code(error: &tokio_postgres::Error) -> String {
    error
        .code()
        .map(|c| c.code().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn the_entra_administrator_is_an_azure_pg_admin_with_createrole_createdb() {
    let admin = admin().await;
    let row = admin
        .query_one(
            "SELECT rolcreaterole, rolcreatedb, pg_has_role(current_user, 'azure_pg_admin', 'MEMBER'), \
             rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, bool>(0),
            row.get::<_, bool>(1),
            row.get::<_, bool>(2),
            row.get::<_, bool>(3)
        ),
        (true, true, true, false)
    );
    // As on Azure, where public belongs to azure_pg_admin: the admin creates tables there...
    admin
        .batch_execute("CREATE TABLE admin_made (x int); DROP TABLE admin_made;")
        .await
        .unwrap();
    // ...and another principal (PostgreSQL 15+) does not.
    let identity = Principal::user_assigned_identity(MANAGED_IDENTITY);
    let other = session(MANAGED_IDENTITY, &identity).await.unwrap();
    let refused = other
        .batch_execute("CREATE TABLE t (x int)")
        .await
        .unwrap_err();
    assert_eq!(code(&refused), "42501", "{refused}");
}

/// The admin creates a role for a managed identity that had none; it logs in at once with its
/// own token; `pgaadauth_list_principals` shows it; after `DROP ROLE` its token is refused.
#[tokio::test]
async fn roles_created_with_pgaadauth_are_accepted_at_once_and_dropped_ones_refused() {
    let admin = admin().await;
    let billing = Principal::user_assigned_identity(pgentra_emulator::IDENTITY_WITHOUT_ROLE);
    // No role yet.
    let before = session(&billing.role, &billing).await.unwrap_err();
    assert_eq!(code(&before), "28P01");
    // A role name of the test's own, so tests of this binary do not share one.
    let role = format!("billing-{}", std::process::id());
    let created: String = admin
        .query_one(
            "SELECT * FROM pgaadauth_create_principal_with_oid($1, $2, 'service', false, false)",
            &[&role, &billing.oid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(created, format!("Created role for \"{role}\""));
    let client = session(&role, &billing).await.unwrap();
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, role);
    let listed = admin
        .query(
            "SELECT rolname::text, principaltype, objectid, tenantid, ismfa, isadmin \
             FROM pgaadauth_list_principals(false) WHERE rolname = $1",
            &[&role],
        )
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    let row = &listed[0];
    assert_eq!(row.get::<_, &str>(1), "service");
    assert_eq!(row.get::<_, &str>(2), billing.oid);
    assert_eq!(row.get::<_, &str>(3), emulator().issuer().tenant());
    assert_eq!((row.get::<_, i32>(4), row.get::<_, i32>(5)), (0, 0));
    let admins = admin
        .query(
            "SELECT rolname::text FROM pgaadauth_list_principals(true)",
            &[],
        )
        .await
        .unwrap();
    let admins: Vec<&str> = admins.iter().map(|r| r.get(0)).collect();
    assert_eq!(admins, [USER]);

    drop(client);
    admin
        .batch_execute(&format!("DROP ROLE \"{role}\""))
        .await
        .unwrap();
    let after = session(&role, &billing).await.unwrap_err();
    assert_eq!(code(&after), "28P01", "{after}");
    // The same name made by plain CREATE ROLE is not an Entra role.
    admin
        .batch_execute(&format!("CREATE ROLE \"{role}\" LOGIN"))
        .await
        .unwrap();
    assert_eq!(code(&session(&role, &billing).await.unwrap_err()), "28P01");
    admin
        .batch_execute(&format!("DROP ROLE \"{role}\""))
        .await
        .unwrap();
}

/// Azure's errors: an unknown name, a wrong object type, a caller who is not an Entra
/// administrator, a database other than `postgres`.
#[tokio::test]
async fn provisioning_fails_as_on_azure() {
    let admin = admin().await;
    let unknown = admin
        .query_one(
            "SELECT * FROM pgaadauth_create_principal('nobody@contoso.com', false, false)",
            &[],
        )
        .await
        .unwrap_err();
    let message = unknown.as_db_error().unwrap().message().to_owned();
    assert_eq!(
        message,
        "Could not validate AAD user \"nobody@contoso.com\" because its name is not found in the tenant. Make sure it's correct and retry."
    );
    let billing = Principal::user_assigned_identity(pgentra_emulator::IDENTITY_WITHOUT_ROLE);
    let wrong_type = admin
        .query_one(
            "SELECT * FROM pgaadauth_create_principal_with_oid('x', $1, 'user', false, false)",
            &[&billing.oid],
        )
        .await
        .unwrap_err();
    assert_eq!(
        wrong_type.as_db_error().unwrap().message(),
        "incorrect object type provided for principal, given object type: 'user', actual object type: 'service'"
    );
    // An existing role: PostgreSQL's own error.
    let exists = admin
        .query_one(
            &format!("SELECT * FROM pgaadauth_create_principal('{USER}', false, false)"),
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(code(&exists), "42710", "{exists}");

    // A principal that is not an Entra administrator.
    let identity = Principal::user_assigned_identity(MANAGED_IDENTITY);
    let other = session(MANAGED_IDENTITY, &identity).await.unwrap();
    let denied = other
        .query_one(
            "SELECT * FROM pgaadauth_create_principal('billing-identity', false, false)",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(code(&denied), "42501");
    assert_eq!(
        denied.as_db_error().unwrap().message(),
        "permission denied for function pgaadauth_create_principal"
    );

    // Only in the postgres database.
    admin
        .batch_execute("CREATE DATABASE provisioning_elsewhere")
        .await
        .unwrap();
    let mut config = gateway_config();
    let alice = alice();
    config
        .dbname("provisioning_elsewhere")
        .password(emulator().token_for(&alice).token);
    let (elsewhere, connection) = config.connect(tls()).await.unwrap();
    let task = tokio::spawn(connection);
    let missing = elsewhere
        .query_one("SELECT * FROM pgaadauth_list_principals(false)", &[])
        .await
        .unwrap_err();
    assert_eq!(code(&missing), "42883", "{missing}");
    drop(elsewhere);
    let _ = task.await;
    admin
        .batch_execute("DROP DATABASE provisioning_elsewhere")
        .await
        .unwrap();
}

/// A token from another tenant, signed by the same key as Entra ID signs every tenant's, is
/// refused as one the server cannot validate.
#[test]
fn a_token_from_another_tenant_is_refused() {
    let eve = Principal::user(USER).in_tenant("11111111-2222-3333-4444-555555555555");
    let token = emulator().token_for(&eve).token;
    assert_refused(
        &psql(USER, &token, "SELECT 1", &[]),
        "An error occurred while validating the access token. Please acquire a new token and retry",
    );
}

/// Tokens with 150 group claims (8 KB, as real users' tokens reach) log in.
#[test]
fn an_8_kb_token_logs_in() {
    use base64::Engine as _;
    let token = emulator().token_for(&alice()).token;
    let payload = token.split('.').nth(1).unwrap();
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    let mut claims: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    let groups: Vec<String> = (0..150u32)
        .map(|i| format!("{i:08x}-0000-4000-8000-{i:012x}"))
        .collect();
    claims["groups"] = serde_json::json!(groups);
    let large = emulator().issuer().sign(&claims);
    assert!(large.len() >= 8_000, "{}", large.len());
    let output = psql(USER, &large, "SELECT current_user", &[]);
    assert_eq!(stdout(&output), USER, "{}", stderr(&output));
}
