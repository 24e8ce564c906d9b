//! pgentra against the emulator, end to end: a throwaway PostgreSQL behind the Azure-like
//! gateway, short-lived tokens from the emulator's `az`, the real `AzureCliCredential`, and
//! new connections across several token lifetimes. Copy this into your own test suite.
//!
//! ```sh
//! cargo run -p pgentra-emulator --example emulated_login
//! ```

use pgentra::EntraAuth;
use pgentra::credential::CredentialChain;
use pgentra::tls::TlsOptions;
use pgentra_emulator::{Emulator, EmulatorConfig};
use std::time::{Duration, Instant};
use tokio_postgres::config::SslMode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Tokens that live 6 seconds, so refresh happens while you watch.
    let emulator = Emulator::start(EmulatorConfig {
        token_lifetime: Duration::from_secs(6),
        ..EmulatorConfig::default()
    })?;
    // The unchanged AzureCliCredential, running the emulator's `az`.
    let chain = CredentialChain::from_vars([
        ("PATH", emulator.bin_dir().to_str().unwrap_or_default()),
        ("AZURE_TOKEN_CREDENTIALS", "AzureCliCredential"),
    ])?;
    let auth = EntraAuth::builder().credential_chain(chain).build()?;
    let tls = TlsOptions::verify_full()
        .with_root_cert(emulator.ca_file())
        .make_tls_connect()?;

    let started = Instant::now();
    for round in 1..=4 {
        // What a pool does for each new connection: fresh credentials, verified TLS.
        let creds = auth.credentials().await?;
        let mut config = tokio_postgres::Config::new();
        config
            .host("localhost")
            .port(emulator.gateway().port())
            .dbname("postgres")
            .user(creds.user())
            .password(creds.password().expose_secret())
            .ssl_mode(SslMode::Require);
        let (client, connection) = config.connect(tls.clone()).await?;
        tokio::spawn(connection);
        let row = client
            .query_one("SELECT current_user::text, now()::text", &[])
            .await?;
        let (user, now): (String, String) = (row.get(0), row.get(1));
        let expires_in = creds
            .expires_at()
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        println!(
            "t={:>4.1}s round {round}: logged in as {user} at {now}; token expires in {:.1}s",
            started.elapsed().as_secs_f64(),
            expires_in.as_secs_f64(),
        );
        // Wait past this token's lifetime: the next connection needs a newer one.
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    let stats = auth.stats();
    println!(
        "tokens fetched: {}, failed fetches: {}, gateway logins: {}, refused: {}",
        stats.tokens_fetched,
        stats.fetch_failures,
        emulator.gateway().logins(),
        emulator.gateway().rejected(),
    );
    if emulator.gateway().rejected() > 0 {
        return Err("a login was refused".into());
    }
    Ok(())
}
