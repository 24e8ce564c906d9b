//! A token must never reach a log line, `Debug` or `Display`: capture every `tracing` event at
//! TRACE level (ours and azure_identity's) during full acquisitions, refreshes and failures,
//! format every public type involved, and look for the token text.

use azure_core::credentials::AccessToken;
use azure_core::time::OffsetDateTime;
use base64::Engine as _;
use pgentra::EntraAuth;
use pgentra::clock::{Clock, ManualClock};
use pgentra::credential::CredentialChain;
use pgentra_emulator::testing::TestCredential;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

const SIGNATURE: &str = "TOKENCANARYSIGNATURExyz";

fn token(expires_unix: u64) -> String {
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
        r#"{{"upn":"alice@contoso.com","oid":"o","exp":{expires_unix}}}"#
    ));
    format!("eyJhbGciOiJSUzI1NiJ9.{payload}.{SIGNATURE}")
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn no_token_in_logs_debug_or_display() {
    let capture = Capture::default();
    let writer = capture.clone();
    // The process's subscriber (the provider logs from a thread of its own): it also hears the
    // other tests of this binary, whose logs must not hold a token either.
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    let mut printed: Vec<String> = Vec::new();

    // 1. The provider: acquisition, refresh, failed refresh (warning), expiry with failure.
    let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_800_000_000));
    let minted = clock.clone();
    let credential = TestCredential::minting(move || {
        let expires = minted.now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 3600;
        AccessToken::new(
            token(expires),
            OffsetDateTime::from_unix_timestamp(expires as i64).unwrap(),
        )
    });
    let builder = EntraAuth::builder()
        .credential(credential.clone())
        .clock(clock.clone());
    printed.push(format!("{builder:?}"));
    let auth = builder.build().unwrap();
    let creds = auth.credentials().await.unwrap();
    assert!(creds.password().expose_secret().ends_with(SIGNATURE));
    printed.extend([
        format!("{auth:?}"),
        format!("{creds:?}"),
        format!("{:?}", creds.password()),
        format!("{:?}", auth.stats()),
        format!(
            "{:?}",
            pgentra::claims::Claims::decode(creds.password().expose_secret()).unwrap()
        ),
    ]);
    clock.set(clock.next_deadline().await);
    let mut tokens = auth.subscribe();
    tokens
        .wait_for(|t| {
            t.as_ref()
                .is_some_and(|c| c.expires_at() > creds.expires_at())
        })
        .await
        .unwrap();
    printed.push(format!("{:?}", *tokens.borrow()));
    credential.fail(true);
    clock.set(clock.next_deadline().await);
    // Wait for the failed refresh: the worker then sleeps 1 s until its retry.
    while clock.next_deadline().await != clock.now() + Duration::from_secs(1) {
        tokio::task::yield_now().await;
    }
    clock.advance(Duration::from_secs(2 * 3600));
    let err = auth.credentials().await.unwrap_err();
    printed.extend([format!("{err}"), format!("{err:?}"), format!("{auth:?}")]);

    // 2. The default chain with the real AzureCliCredential, whose `az` prints a token.
    let dir = std::env::temp_dir().join(format!("pgentra-leaks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let az = dir.join("az");
    let mut file = std::fs::File::create(&az).unwrap();
    write!(
        file,
        "#!/bin/sh\nprintf '%s' '{{\"accessToken\": \"{}\", \"expires_on\": 1893456000, \"tokenType\": \"Bearer\"}}'\n",
        token(1_893_456_000)
    )
    .unwrap();
    drop(file);
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&az, std::fs::Permissions::from_mode(0o755)).unwrap();
    let chain = CredentialChain::from_vars([
        ("PATH", dir.to_str().unwrap()),
        ("AZURE_TOKEN_CREDENTIALS", "dev"),
    ])
    .unwrap();
    printed.push(format!("{chain:?}"));
    let auth = EntraAuth::builder()
        .credential_chain(chain)
        .build()
        .unwrap();
    let creds = auth.credentials().await.unwrap();
    assert_eq!(creds.credential(), "AzureCliCredential");
    assert!(creds.password().expose_secret().ends_with(SIGNATURE));
    printed.extend([format!("{auth:?}"), format!("{creds:?}")]);
    std::fs::remove_dir_all(&dir).unwrap();

    drop(auth);
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("obtained a database token"),
        "logs were not captured:\n{logs}"
    );
    assert!(
        logs.contains("token refresh failed"),
        "the failure was not logged:\n{logs}"
    );
    for text in printed.iter().chain(std::iter::once(&logs)) {
        assert!(!text.contains(SIGNATURE), "token text leaked into:\n{text}");
        assert!(
            !text.contains("eyJhbGciOiJSUzI1NiJ9."),
            "token text leaked into:\n{text}"
        );
    }
}
