//! pgentra's default credential chain, read from the process environment as applications do,
//! picks the right `azure_identity` credential for each environment the emulator can stand in
//! for. Each case runs in a child process with exactly that environment.

use pgentra_emulator::{CLIENT_SECRET, Emulator, issuer::Principal};
use std::process::Command;

/// Run by the test below in each child: `EntraAuth::from_env()` as an application would;
/// prints which credential answered and the role.
#[tokio::test]
async fn child_default_chain() {
    if std::env::var_os("PGENTRA_CHAIN_CHILD").is_none() {
        return;
    }
    let auth = pgentra::EntraAuth::from_env().unwrap();
    match auth.credentials().await {
        Ok(creds) => println!("PICKED={} ROLE={}", creds.credential(), creds.user()),
        Err(err) => println!("ERROR={err}"),
    }
}

/// Runs the child with the emulator's variables named in `keep`, plus `extra`.
fn picked(keep: &[&str], extra: &[(&str, &str)]) -> String {
    let emulator = Emulator::shared();
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", "chain::child_default_chain", "--nocapture"])
        .env_clear()
        .env("PGENTRA_CHAIN_CHILD", "1");
    // No IMDS unless a case asks for it: a loopback port that accepts and never answers.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let imds = format!("http://{}", black_hole.local_addr().unwrap());
    command.env("AZURE_POD_IDENTITY_AUTHORITY_HOST", &imds);
    // The shims' directory only: no real az or azd.
    command.env("PATH", emulator.bin_dir());
    for (name, value) in emulator.env() {
        if keep.contains(&name.as_str()) {
            command.env(name, value);
        }
    }
    command.envs(extra.iter().copied());
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find(|l| l.starts_with("PICKED=") || l.starts_with("ERROR="))
        .unwrap_or_else(|| {
            panic!(
                "child printed nothing:\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
        .to_owned()
}

#[test]
fn the_default_chain_picks_the_credential_each_environment_offers() {
    let emulator = Emulator::shared();
    let app = Principal::service_principal("reporting-app");
    let tenant = emulator.issuer().tenant().to_owned();
    // A service principal in the environment comes first (its role must be set: not in token).
    assert_eq!(
        picked(
            &[
                "AZURE_AUTHORITY_HOST",
                "SSL_CERT_FILE",
                "IDENTITY_ENDPOINT",
                "IDENTITY_HEADER"
            ],
            &[
                ("AZURE_TENANT_ID", &tenant),
                ("AZURE_CLIENT_ID", &app.client_id),
                ("AZURE_CLIENT_SECRET", CLIENT_SECRET),
                ("PGUSER", "reporting-app")
            ],
        ),
        "PICKED=EnvironmentCredential ROLE=reporting-app"
    );
    // App Service managed identity next, before the CLI shims on PATH.
    assert_eq!(
        picked(&["IDENTITY_ENDPOINT", "IDENTITY_HEADER"], &[]),
        format!(
            "PICKED=ManagedIdentityCredential ROLE={}",
            pgentra_emulator::MANAGED_IDENTITY
        )
    );
    // IMDS, redirected to the emulator.
    assert_eq!(
        picked(&["AZURE_POD_IDENTITY_AUTHORITY_HOST"], &[]),
        format!(
            "PICKED=ManagedIdentityCredential ROLE={}",
            pgentra_emulator::MANAGED_IDENTITY
        )
    );
    // No managed identity: the Azure CLI (after the 1 s managed-identity probe).
    assert_eq!(
        picked(&[], &[]),
        format!("PICKED=AzureCliCredential ROLE={}", pgentra_emulator::USER)
    );
    // AZURE_TOKEN_CREDENTIALS narrows the chain even when a managed identity is there.
    assert_eq!(
        picked(
            &["IDENTITY_ENDPOINT", "IDENTITY_HEADER"],
            &[("AZURE_TOKEN_CREDENTIALS", "dev")]
        ),
        format!("PICKED=AzureCliCredential ROLE={}", pgentra_emulator::USER)
    );
    assert_eq!(
        picked(
            &["IDENTITY_ENDPOINT", "IDENTITY_HEADER"],
            &[("AZURE_TOKEN_CREDENTIALS", "AzureDeveloperCliCredential")]
        ),
        format!(
            "PICKED=AzureDeveloperCliCredential ROLE={}",
            pgentra_emulator::USER
        )
    );
}
