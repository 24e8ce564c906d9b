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
    let alice_token = emulator().token_for(&alice()).token;
    assert_refused(
        &psql(MANAGED_IDENTITY, &alice_token, "SELECT 1", &[]),
        &format!("Service Principal oid mismatch for role[{MANAGED_IDENTITY}]."),
    );
    let identity_token = emulator()
        .token_for(&Principal::user_assigned_identity(MANAGED_IDENTITY))
        .token;
    assert_refused(
        &psql(USER, &identity_token, "SELECT 1", &[]),
        &format!("password authentication failed for user \"{USER}\""),
    );
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
        roles: Default::default(),
        backend: emulator().backend().clone(),
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
