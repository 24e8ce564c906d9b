//! The `pgentra-emulator` binary: exports on stdout, a login with a token from its `az` shim,
//! and a clean stop on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

#[test]
fn standalone_emulator_prints_its_environment_serves_logins_and_stops_cleanly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgentra-emulator"))
        .args(["--token-lifetime", "30s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut env = Vec::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line == "# ready" {
            break;
        }
        let (name, value) = line
            .strip_prefix("export ")
            .and_then(|l| l.split_once('='))
            .unwrap_or_else(|| panic!("stdout must carry only exports, got {line:?}"));
        env.push((name.to_owned(), value.trim_matches('\'').to_owned()));
    }
    let names: Vec<&str> = env.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "PGHOST",
        "PGPORT",
        "PGDATABASE",
        "PGSSLMODE",
        "PGSSLROOTCERT",
        "IDENTITY_ENDPOINT",
        "IDENTITY_HEADER",
        "AZURE_AUTHORITY_HOST",
        "SSL_CERT_FILE",
        "PATH",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }

    // A token from the emulator's own `az`, then psql through the gateway.
    let az = Command::new("az")
        .args([
            "account",
            "get-access-token",
            "-o",
            "json",
            "--scope",
            "https://ossrdbms-aad.database.windows.net/.default",
        ])
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    assert!(
        az.status.success(),
        "{}",
        String::from_utf8_lossy(&az.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&az.stdout).unwrap();
    let token = json["accessToken"].as_str().unwrap();
    let psql = Command::new("psql")
        .args(["-X", "-A", "-t", "-c", "SELECT current_user"])
        .envs(env.iter().cloned())
        .env("PGUSER", pgentra_emulator::USER)
        .env("PGPASSWORD", token)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&psql.stdout).trim(),
        pgentra_emulator::USER,
        "{}",
        String::from_utf8_lossy(&psql.stderr)
    );

    // SIGTERM: exit 0 and the files are gone.
    let ca = PathBuf::from(&env.iter().find(|(n, _)| n == "PGSSLROOTCERT").unwrap().1);
    assert!(ca.is_file());
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // The whole cluster directory, which held the CA and the shims, is gone.
    let cluster_dir = ca.parent().and_then(|p| p.parent()).unwrap();
    assert!(
        !cluster_dir.exists(),
        "{} was not removed",
        cluster_dir.display()
    );
    // Nothing else was printed on stdout after the ready line.
    assert_eq!(lines.count(), 0);
}
