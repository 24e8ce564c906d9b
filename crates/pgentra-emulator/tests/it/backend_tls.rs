//! The throwaway cluster with extra settings and TLS turned on, as the proxy benchmark uses it:
//! a verified TLS session to it works, one trusting another CA does not.

use pgentra::tls::TlsOptions;
use pgentra_emulator::backend::{BackendError, Cluster};
use pgentra_emulator::ca::Ca;
use tokio_postgres::config::SslMode;

/// A session to the cluster over TCP with `sslmode=require` (so no fallback to plain text),
/// verifying the server against `ca_file`; answers whether it is encrypted.
async fn encrypted_session(cluster: &Cluster, ca_file: &std::path::Path) -> Result<bool, String> {
    let tls = TlsOptions::verify_full()
        .with_root_cert(ca_file)
        .make_tls_connect()
        .map_err(|e| e.to_string())?;
    let mut config = tokio_postgres::Config::new();
    config
        .host("localhost")
        .hostaddr(std::net::Ipv4Addr::LOCALHOST.into())
        .port(cluster.port())
        .user("postgres")
        .dbname("postgres")
        .ssl_mode(SslMode::Require);
    let (client, connection) = config.connect(tls).await.map_err(|e| chain(&e))?;
    let connection = tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    drop(client);
    let _ = connection.await;
    Ok(row.get(0))
}

/// An error with its sources, which name the certificate problem.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

#[tokio::test]
async fn settings_apply_and_tls_serves_verified_sessions() {
    let cluster = Cluster::start_with(&[("max_connections", "42"), ("shared_buffers", "32MB")])
        .expect("start a throwaway PostgreSQL");
    assert_eq!(cluster.psql("SHOW max_connections;").unwrap().trim(), "42");
    assert_eq!(cluster.psql("SHOW shared_buffers;").unwrap().trim(), "32MB");
    // The defaults not replaced still hold.
    assert_eq!(cluster.psql("SHOW fsync;").unwrap().trim(), "off");

    let ca = Ca::new().unwrap();
    let dir = cluster.scratch_dir("test").unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    // Without TLS, a client that requires it is refused.
    let refused = encrypted_session(&cluster, &ca_file).await.unwrap_err();
    assert!(
        refused.to_lowercase().contains("tls") || refused.contains("SSL"),
        "{refused}"
    );

    cluster
        .enable_tls(ca.server_cert_pem(), ca.server_key_pem())
        .expect("turn on TLS");
    assert_eq!(encrypted_session(&cluster, &ca_file).await, Ok(true));
    assert_eq!(cluster.psql("SHOW ssl;").unwrap().trim(), "on");
    let key = cluster.socket_dir().join("tls/server.key");
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    }

    // A client trusting another CA does not accept the server.
    let other = dir.join("other-ca.pem");
    std::fs::write(&other, Ca::new().unwrap().pem()).unwrap();
    let untrusted = encrypted_session(&cluster, &other).await.unwrap_err();
    assert!(
        untrusted.to_lowercase().contains("certificate"),
        "{untrusted}"
    );

    // Turning it on again (new files, same paths) works too.
    cluster
        .enable_tls(ca.server_cert_pem(), ca.server_key_pem())
        .expect("turn on TLS again");
    assert_eq!(encrypted_session(&cluster, &ca_file).await, Ok(true));
}

#[test]
fn a_malformed_setting_name_is_refused() {
    let err = Cluster::start_with(&[("max_connections=5 -c fsync", "on")]).unwrap_err();
    assert!(matches!(err, BackendError::Step { .. }), "{err}");
}
