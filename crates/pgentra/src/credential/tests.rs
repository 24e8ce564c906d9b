//! The chain with the real `azure_identity` credentials, kept on this machine: `PATH` points at
//! a directory of our choosing and IMDS at a loopback port that never answers.

use super::*;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU32;

const SCOPE: &str = "https://ossrdbms-aad.database.windows.net/.default";

/// A temp directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "pgentra-chain-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback port that accepts connections (into the backlog) and never answers.
fn black_hole() -> (std::net::TcpListener, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (listener, url)
}

/// Writes an executable `az` that logs its arguments and prints a token the way Azure CLI
/// 2.54+ does.
fn write_az(dir: &Path) {
    let script = format!(
        // Builtins only: the chain's PATH holds nothing but this directory.
        "#!/bin/sh\necho \"$@\" >> '{log}'\nprintf '%s' '{{\"accessToken\": \"e30.eyJ1cG4iOiJhQGIifQ.c2ln\", \"expiresOn\": \"2030-01-01 00:00:00.000000\", \"expires_on\": 1893456000, \"tenant\": \"t\", \"tokenType\": \"Bearer\"}}'\n",
        log = dir.join("az.log").display()
    );
    let path = dir.join("az");
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(script.as_bytes()).unwrap();
    drop(file);
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn az_calls(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("az.log")).map_or(0, |log| log.lines().count())
}

fn chain(vars: &[(&str, &str)]) -> CredentialChain {
    CredentialChain::from_vars(vars.iter().map(|(k, v)| (*k, *v))).unwrap()
}

#[test]
fn default_order() {
    assert_eq!(chain(&[]).kinds(), CredentialKind::ALL.to_vec());
}

#[test]
fn azure_token_credentials_narrows_the_chain() {
    use CredentialKind::*;
    let cases: [(&str, Vec<CredentialKind>); 5] = [
        ("dev", vec![AzureCli, AzureDeveloperCli]),
        ("PROD", vec![Environment, WorkloadIdentity, ManagedIdentity]),
        ("ManagedIdentityCredential", vec![ManagedIdentity]),
        ("azureclicredential", vec![AzureCli]),
        (" AzureDeveloperCliCredential ", vec![AzureDeveloperCli]),
    ];
    for (value, expected) in cases {
        assert_eq!(
            chain(&[("AZURE_TOKEN_CREDENTIALS", value)]).kinds(),
            expected,
            "{value}"
        );
    }
    let err = CredentialChain::from_vars([("AZURE_TOKEN_CREDENTIALS", "everything")]).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::Config { .. }));
    for name in [
        "dev",
        "prod",
        "ManagedIdentityCredential",
        "AzureDeveloperCliCredential",
    ] {
        assert!(message.contains(name), "{message}");
    }
}

#[tokio::test]
async fn when_all_fail_the_error_lists_every_credential_and_the_probe_is_bounded() {
    let empty_path = TempDir::new();
    let (_imds, imds_url) = black_hole();
    let path = empty_path.0.to_str().unwrap();
    let chain = chain(&[
        ("PATH", path),
        ("AZURE_POD_IDENTITY_AUTHORITY_HOST", &imds_url),
    ]);

    let started = std::time::Instant::now();
    let err = chain.token(SCOPE).await.unwrap_err();
    let elapsed = started.elapsed();

    let Error::NoCredential { attempts } = &err else {
        panic!("unexpected {err:?}");
    };
    let names: Vec<&str> = attempts.iter().map(|a| a.credential.as_str()).collect();
    assert_eq!(
        names,
        CredentialKind::ALL
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
    );
    assert!(
        attempts[0].reason.contains("AZURE_CLIENT_SECRET"),
        "{:?}",
        attempts[0]
    );
    assert!(
        attempts[1].reason.contains("AZURE_FEDERATED_TOKEN_FILE"),
        "{:?}",
        attempts[1]
    );
    // Outside App Service this is IMDS, which never answers here: cut off by the probe.
    if std::env::var_os("IDENTITY_ENDPOINT").is_none() {
        assert!(
            attempts[2]
                .reason
                .contains("no managed identity endpoint answered within 1s"),
            "{:?}",
            attempts[2]
        );
        // A bound on the stall, not a benchmark: without the probe the IMDS client retries for
        // over a minute.
        assert!(elapsed < Duration::from_secs(10), "chain took {elapsed:?}");
    }
    let message = err.to_string();
    for kind in CredentialKind::ALL {
        assert!(message.contains(kind.name()), "{message}");
    }
    assert!(message.contains("az login"), "{message}");
    assert_eq!(chain.selected(), None);
}

#[tokio::test]
async fn the_first_credential_that_answers_is_kept() {
    let bin = TempDir::new();
    write_az(&bin.0);
    let (_imds, imds_url) = black_hole();
    let chain = chain(&[
        ("PATH", bin.0.to_str().unwrap()),
        ("AZURE_POD_IDENTITY_AUTHORITY_HOST", &imds_url),
    ]);

    let (token, kind) = chain.token(SCOPE).await.unwrap();
    assert_eq!(kind, CredentialKind::AzureCli);
    assert_eq!(token.token.secret(), "e30.eyJ1cG4iOiJhQGIifQ.c2ln");
    assert_eq!(token.expires_on.unix_timestamp(), 1_893_456_000);
    assert_eq!(chain.selected(), Some(CredentialKind::AzureCli));

    // The second call goes straight to the Azure CLI: no managed-identity probe again.
    let started = std::time::Instant::now();
    let (_, kind) = chain.token(SCOPE).await.unwrap();
    assert_eq!(kind, CredentialKind::AzureCli);
    assert!(started.elapsed() < MANAGED_IDENTITY_PROBE_TIMEOUT);
    assert_eq!(az_calls(&bin.0), 2);
    let log = std::fs::read_to_string(bin.0.join("az.log")).unwrap();
    assert!(
        log.contains(&format!("account get-access-token -o json --scope {SCOPE}")),
        "{log}"
    );
}

#[tokio::test]
async fn a_single_credential_is_not_probed_and_reports_its_own_error() {
    let bin = TempDir::new();
    let chain = chain(&[
        ("PATH", bin.0.to_str().unwrap()),
        ("AZURE_TOKEN_CREDENTIALS", "AzureCliCredential"),
    ]);
    let err = chain.token(SCOPE).await.unwrap_err();
    let Error::NoCredential { attempts } = err else {
        panic!("unexpected {err:?}");
    };
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].credential, "AzureCliCredential");
}

#[test]
fn certificate_without_the_feature_or_file_is_explained() {
    let chain = chain(&[
        ("AZURE_TENANT_ID", "72f988bf-86f1-41af-91ab-2d7cd011db47"),
        ("AZURE_CLIENT_ID", "c"),
        ("AZURE_CLIENT_CERTIFICATE_PATH", "/nonexistent/cert.pfx"),
        ("AZURE_TOKEN_CREDENTIALS", "EnvironmentCredential"),
    ]);
    let Err(reason) = &chain.entries[0].credential else {
        panic!("the certificate credential must not be built");
    };
    if cfg!(feature = "client-certificate") {
        assert!(reason.contains("/nonexistent/cert.pfx"), "{reason}");
    } else {
        assert!(reason.contains("client-certificate"), "{reason}");
    }
}

#[test]
fn client_secret_configures_the_environment_credential() {
    let chain = chain(&[
        ("AZURE_TENANT_ID", "72f988bf-86f1-41af-91ab-2d7cd011db47"),
        ("AZURE_CLIENT_ID", "c"),
        ("AZURE_CLIENT_SECRET", "s3cr3t-value"),
    ]);
    assert!(chain.entries[0].credential.is_ok());
    assert!(!format!("{chain:?}").contains("s3cr3t-value"));
}

#[test]
fn a_bad_imds_override_is_reported_as_the_reason() {
    let chain = chain(&[("AZURE_POD_IDENTITY_AUTHORITY_HOST", "not a url")]);
    let Err(reason) = &chain.entries[2].credential else {
        panic!("expected a configuration error");
    };
    assert!(
        reason.contains("AZURE_POD_IDENTITY_AUTHORITY_HOST"),
        "{reason}"
    );
}
