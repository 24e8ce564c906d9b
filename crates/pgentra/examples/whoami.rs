//! Which Entra ID principal would log in to Azure PostgreSQL, as which role, until when.
//! Never prints the token.
//!
//! ```sh
//! cargo run -p pgentra --example whoami
//! AZURE_TOKEN_CREDENTIALS=AzureCliCredential cargo run -p pgentra --example whoami
//! ```

use pgentra::EntraAuth;
use pgentra::claims::Claims;
use std::process::ExitCode;
use std::time::SystemTime;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("whoami: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), pgentra::Error> {
    let auth = EntraAuth::from_env()?;
    let creds = auth.credentials_blocking()?;
    let claims = Claims::decode(creds.password().expose_secret()).map_err(|source| {
        pgentra::Error::TokenFormat {
            credential: creds.credential().to_owned(),
            source,
        }
    })?;
    let expires_in = creds
        .expires_at()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    println!("credential:  {}", creds.credential());
    println!("principal:   {:?}", claims.principal_kind());
    println!("object id:   {}", claims.oid().unwrap_or("-"));
    println!("tenant:      {}", claims.tid().unwrap_or("-"));
    println!("role:        {} ({})", creds.user(), creds.user_source());
    println!("scope:       {}", auth.scope());
    println!("expires in:  {} s", expires_in.as_secs());
    Ok(())
}
