//! The emulator in front of an existing PostgreSQL given by URL instead of its own cluster.

use pgentra_emulator::issuer::Principal;
use pgentra_emulator::{Emulator, EmulatorConfig, EmulatorError};

/// A user only this emulator knows: its role must be created on the external server.
const EXTERNAL_USER: &str = "external-user@contoso.com";

#[test]
fn an_external_backend_gets_the_roles_and_serves_logins() {
    // "External": a server this emulator did not start, reached over TCP (the shared
    // emulator's cluster).
    let server = Emulator::shared()
        .cluster()
        .expect("the shared emulator runs a cluster of its own");
    let url = server.url();
    let config = || {
        let mut config = EmulatorConfig {
            backend_url: Some(url.clone()),
            ..EmulatorConfig::default()
        };
        config.principals.push(Principal::user(EXTERNAL_USER));
        config
    };
    let emulator = Emulator::start(config()).unwrap();
    assert!(emulator.cluster().is_none());
    let roles = server
        .psql(&format!(
            "SELECT count(*) FROM pg_roles WHERE rolname = '{EXTERNAL_USER}';"
        ))
        .unwrap();
    assert_eq!(roles.trim(), "1");

    let token = emulator.token_for(&Principal::user(EXTERNAL_USER)).token;
    let output = std::process::Command::new("psql")
        .args(["-X", "-A", "-t", "-c", "SELECT current_user"])
        .envs(emulator.env())
        .env("PGUSER", EXTERNAL_USER)
        .env("PGPASSWORD", &token)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        EXTERNAL_USER,
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Starting again against the same server finds the roles already there.
    let ca = emulator.ca_file().to_owned();
    drop(emulator);
    assert!(!ca.exists(), "the emulator's own files are removed");
    drop(Emulator::start(config()).unwrap());
}

#[test]
fn a_bad_backend_url_is_a_typed_error() {
    for url in ["mysql://h/db", "not a url", "postgres:///db"] {
        let err = Emulator::start(EmulatorConfig {
            backend_url: Some(url.into()),
            ..EmulatorConfig::default()
        })
        .unwrap_err();
        assert!(matches!(err, EmulatorError::BackendUrl(_)), "{url}: {err}");
    }
}
