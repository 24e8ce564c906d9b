//! Provider behaviour with a controllable clock and a scripted credential.

use super::refresh::Status;
use super::*;
use crate::claims::{MissingRole, UsernameSource};
use crate::clock::{Clock, ManualClock};
use crate::cloud::MANAGEMENT_SCOPE;
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::time::OffsetDateTime;
use base64::Engine as _;
use serde_json::{Value, json};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::UNIX_EPOCH;

const START: Duration = Duration::from_secs(1_800_000_000);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Succeed,
    Fail,
    Hang,
    /// Wait until the gate opens, then succeed.
    Gated,
}

/// A credential whose behaviour the test sets, which records every call.
#[derive(Debug)]
struct Scripted {
    clock: ManualClock,
    lifetime: Duration,
    mode: Mutex<Mode>,
    gate: watch::Sender<bool>,
    calls: watch::Sender<usize>,
    scopes: Mutex<Vec<String>>,
    claims: fn(&str) -> Value,
    minted: AtomicUsize,
}

fn user_claims(_scope: &str) -> Value {
    json!({"upn": "alice@contoso.com", "oid": "o-alice", "tid": "t"})
}

impl Scripted {
    fn new(clock: &ManualClock, lifetime: Duration) -> Arc<Self> {
        Self::with_claims(clock, lifetime, user_claims)
    }

    fn with_claims(
        clock: &ManualClock,
        lifetime: Duration,
        claims: fn(&str) -> Value,
    ) -> Arc<Self> {
        Arc::new(Self {
            clock: clock.clone(),
            lifetime,
            mode: Mutex::new(Mode::Succeed),
            gate: watch::Sender::new(false),
            calls: watch::Sender::new(0),
            scopes: Mutex::new(Vec::new()),
            claims,
            minted: AtomicUsize::new(0),
        })
    }

    fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn calls(&self) -> usize {
        *self.calls.borrow()
    }

    async fn wait_for_calls(&self, n: usize) {
        self.calls.subscribe().wait_for(|c| *c >= n).await.unwrap();
    }

    fn token_text(&self, scope: &str) -> String {
        let mut claims = (self.claims)(scope);
        let serial = self.minted.fetch_add(1, Ordering::SeqCst);
        claims["serial"] = json!(serial);
        claims["aud"] = json!(scope.trim_end_matches("/.default"));
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string());
        format!("eyJhbGciOiJSUzI1NiJ9.{payload}.U0VDUkVUU0lH")
    }
}

#[async_trait::async_trait]
impl TokenCredential for Scripted {
    async fn get_token(
        &self,
        scopes: &[&str],
        _: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        self.scopes.lock().unwrap().push(scopes[0].to_owned());
        self.calls.send_modify(|c| *c += 1);
        let mode = *self.mode.lock().unwrap();
        match mode {
            Mode::Fail => {
                return Err(azure_core::Error::with_message(
                    azure_core::error::ErrorKind::Credential,
                    "scripted failure: endpoint returned 500",
                ));
            }
            Mode::Hang => std::future::pending::<()>().await,
            Mode::Gated => {
                self.gate.subscribe().wait_for(|open| *open).await.unwrap();
            }
            Mode::Succeed => {}
        }
        let expires = self.clock.now() + self.lifetime;
        let expires = OffsetDateTime::from_unix_timestamp(unix_seconds(expires) as i64).unwrap();
        Ok(AccessToken::new(self.token_text(scopes[0]), expires))
    }
}

fn clock() -> ManualClock {
    ManualClock::new(UNIX_EPOCH + START)
}

fn provider(clock: &ManualClock, credential: &Arc<Scripted>) -> EntraAuth {
    EntraAuth::builder()
        .credential_named("Scripted", credential.clone())
        .clock(clock.clone())
        .build()
        .unwrap()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[tokio::test]
async fn refresh_happens_ahead_of_expiry() {
    let clock = clock();
    let credential = Scripted::new(&clock, Duration::from_secs(3600));
    let auth = provider(&clock, &credential);

    let first = auth.credentials().await.unwrap();
    assert_eq!(first.user(), "alice@contoso.com");
    assert_eq!(first.user_source(), UsernameSource::Upn);
    assert_eq!(first.credential(), "Scripted");
    let expiry = first.expires_at();

    // The refresher sleeps until 5 minutes (minus up to 10 % jitter) before expiry.
    let refresh_at = clock.next_deadline().await;
    let lead = expiry.duration_since(refresh_at).unwrap();
    assert!(
        (270.0..=300.0).contains(&secs(lead)),
        "refresh {lead:?} before expiry"
    );

    clock.set(refresh_at);
    credential.wait_for_calls(2).await;
    // The new token is served once stored; until then the old one is still valid.
    let mut tokens = auth.subscribe();
    tokens
        .wait_for(|t| t.as_ref().is_some_and(|c| c.expires_at() > expiry))
        .await
        .unwrap();
    let second = auth.credentials().await.unwrap();
    assert!(second.expires_at() > expiry);
    assert_ne!(second.password(), first.password());
    let stats = auth.stats();
    assert_eq!(stats.tokens_fetched, 2);
    assert_eq!(stats.last_refresh_lead, Some(lead));
}

#[tokio::test]
async fn short_tokens_are_refreshed_around_their_midpoint() {
    let clock = clock();
    let credential = Scripted::new(&clock, Duration::from_secs(60));
    let auth = provider(&clock, &credential);
    let creds = auth.credentials().await.unwrap();
    let refresh_at = clock.next_deadline().await;
    let lead = creds.expires_at().duration_since(refresh_at).unwrap();
    assert!(
        (27.0..=30.0).contains(&secs(lead)),
        "refresh {lead:?} before expiry"
    );

    // The safety margin is a quarter of the lifetime: 15 s. At 46 s the token is not handed
    // out any more even if the refresh has not happened, so a caller triggers a fetch.
    credential.set_mode(Mode::Gated);
    clock.advance(Duration::from_secs(46));
    let waiting = tokio::spawn({
        let auth = auth.clone();
        async move { auth.credentials().await }
    });
    credential.wait_for_calls(2).await;
    assert!(!waiting.is_finished());
    credential.gate.send_replace(true);
    let fresh = waiting.await.unwrap().unwrap();
    assert!(fresh.expires_at() > creds.expires_at());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_callers_on_a_cold_cache_make_one_credential_call() {
    let clock = clock();
    let credential = Scripted::new(&clock, Duration::from_secs(3600));
    credential.set_mode(Mode::Gated);
    let auth = provider(&clock, &credential);

    let callers: Vec<_> = (0..1000)
        .map(|_| {
            let auth = auth.clone();
            tokio::spawn(async move { auth.credentials().await })
        })
        .collect();
    // Every caller waits with a timeout sleeper, and the fetch has one too: 1001 sleepers
    // means all 1000 callers are waiting on the single call.
    clock.wait_for_sleepers(1001).await;
    assert_eq!(credential.calls(), 1);
    credential.gate.send_replace(true);

    let mut passwords = std::collections::HashSet::new();
    for caller in callers {
        let creds = caller.await.unwrap().unwrap();
        passwords.insert(creds.password().expose_secret().to_owned());
    }
    assert_eq!(passwords.len(), 1, "all callers share one token");
    assert_eq!(credential.calls(), 1);
    assert_eq!(auth.stats().tokens_fetched, 1);
}

#[tokio::test]
async fn failure_while_valid_serves_the_cached_token_and_backs_off() {
    let clock = clock();
    let credential = Scripted::new(&clock, Duration::from_secs(3600));
    let auth = provider(&clock, &credential);
    let first = auth.credentials().await.unwrap();

    credential.set_mode(Mode::Fail);
    let refresh_at = clock.next_deadline().await;
    clock.set(refresh_at);
    let mut failed_at = refresh_at;
    // Backoff: 1 s, 2 s, 4 s, 8 s, then capped at 30 s... here we watch four steps.
    for (attempt, expected) in [1u64, 2, 4, 8].into_iter().enumerate() {
        wait_for_failures(&auth, attempt as u64 + 1).await;
        let retry_at = wait_for_deadline_after(&clock, failed_at).await;
        assert_eq!(
            retry_at.duration_since(clock.now()).unwrap(),
            Duration::from_secs(expected),
            "backoff after failure {}",
            attempt + 1
        );
        // Callers keep getting the still-valid token, without waiting.
        let served = auth.credentials().await.unwrap();
        assert_eq!(served.password(), first.password());
        clock.set(retry_at);
        failed_at = retry_at;
    }
    wait_for_failures(&auth, 5).await;
    assert_eq!(credential.calls(), 6);

    // The credential comes back: the next retry succeeds and the new token is served.
    credential.set_mode(Mode::Succeed);
    let retry_at = wait_for_deadline_after(&clock, failed_at).await;
    clock.set(retry_at);
    let mut tokens = auth.subscribe();
    tokens
        .wait_for(|t| t.as_ref().is_some_and(|c| c.password() != first.password()))
        .await
        .unwrap();
    let renewed = auth.credentials().await.unwrap();
    assert!(renewed.expires_at() > first.expires_at());
}

/// Waits until the worker has recorded `n` failed fetches.
async fn wait_for_failures(auth: &EntraAuth, n: u64) {
    let mut status = auth.inner.shared.status.subscribe();
    status
        .wait_for(|s| matches!(s, Status::Failed { .. }) && auth.stats().fetch_failures >= n)
        .await
        .unwrap();
}

/// The earliest sleeper deadline later than `after` (the worker's next wake-up once it has
/// processed the last event).
async fn wait_for_deadline_after(clock: &ManualClock, after: SystemTime) -> SystemTime {
    loop {
        let deadline = clock.next_deadline().await;
        if deadline > after {
            return deadline;
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn expired_and_hanging_credential_times_out_at_the_configured_limit() {
    let clock = clock();
    let credential = Scripted::new(&clock, Duration::from_secs(3600));
    credential.set_mode(Mode::Hang);
    let auth = EntraAuth::builder()
        .credential_named("Scripted", credential.clone())
        .clock(clock.clone())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let caller = tokio::spawn({
        let auth = auth.clone();
        async move { auth.credentials().await }
    });
    // The caller's timeout and the fetch's timeout.
    clock.wait_for_sleepers(2).await;
    assert!(
        clock
            .deadlines()
            .iter()
            .all(|d| *d == clock.now() + Duration::from_secs(30))
    );
    clock.advance(Duration::from_secs(30));
    let err = caller.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, Error::Timeout { credential, timeout } if credential == "Scripted" && *timeout == Duration::from_secs(30)),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("did not return a token within 30s"),
        "{err}"
    );
}

#[tokio::test]
async fn hanging_credential_with_the_system_clock_returns_within_the_timeout() {
    let credential = Scripted::new(&clock(), Duration::from_secs(3600));
    credential.set_mode(Mode::Hang);
    let auth = EntraAuth::builder()
        .credential_named("Scripted", credential.clone())
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let err = auth.credentials().await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    // A bound, not a benchmark: the call must not hang.
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn failing_credential_without_a_token_fails_fast_with_its_reason() {
    let clock = clock();
    let credential = Scripted::new(&clock, Duration::from_secs(3600));
    credential.set_mode(Mode::Fail);
    let auth = provider(&clock, &credential);
    let err = auth.credentials().await.unwrap_err();
    match &err {
        Error::Credential { credential, reason } => {
            assert_eq!(credential, "Scripted");
            assert!(
                reason.contains("scripted failure: endpoint returned 500"),
                "{reason}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    // During the backoff, callers get the last error at once, without another call.
    let again = auth.credentials().await.unwrap_err();
    assert_eq!(again.to_string(), err.to_string());
    assert_eq!(credential.calls(), 1);

    // Recovery: the scheduled retry succeeds by itself, and callers get a token again.
    credential.set_mode(Mode::Succeed);
    let retry_at = clock.next_deadline().await;
    assert_eq!(retry_at, clock.now() + Duration::from_secs(1));
    clock.set(retry_at);
    auth.subscribe().wait_for(Option::is_some).await.unwrap();
    assert_eq!(
        auth.credentials().await.unwrap().user(),
        "alice@contoso.com"
    );
}

#[tokio::test]
async fn clock_jumping_past_expiry_triggers_a_fetch() {
    let clock = clock();
    let credential = Scripted::new(&clock, Duration::from_secs(3600));
    let auth = provider(&clock, &credential);
    let first = auth.credentials().await.unwrap();
    clock.advance(Duration::from_secs(2 * 3600));
    let second = auth.credentials().await.unwrap();
    assert!(second.expires_at() > clock.now());
    assert_ne!(second.password(), first.password());
}

#[tokio::test]
async fn a_token_that_is_already_expired_is_refused() {
    let clock = clock();
    let credential = Scripted::new(&clock, Duration::ZERO);
    let auth = provider(&clock, &credential);
    let err = auth.credentials().await.unwrap_err();
    assert!(matches!(err, Error::TokenExpiresTooSoon { .. }), "{err:?}");
}

#[test]
fn blocking_api_works_outside_a_runtime() {
    let clock = clock();
    let credential = Scripted::new(&clock, Duration::from_secs(3600));
    let auth = provider(&clock, &credential);
    let creds = std::thread::spawn(move || auth.credentials_blocking())
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(creds.user(), "alice@contoso.com");
}

#[tokio::test(flavor = "current_thread")]
async fn blocking_api_works_inside_a_current_thread_runtime() {
    let clock = clock();
    let credential = Scripted::new(&clock, Duration::from_secs(3600));
    let auth = provider(&clock, &credential);
    // A cold cache: the call blocks this (only) runtime thread while the provider's own
    // thread fetches, which neither panics nor deadlocks.
    let creds = auth.credentials_blocking().unwrap();
    assert_eq!(creds.user(), "alice@contoso.com");
    // And a warm one.
    assert_eq!(
        auth.credentials_blocking().unwrap().password(),
        creds.password()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_api_works_inside_a_multi_thread_runtime() {
    let clock = clock();
    let credential = Scripted::new(&clock, Duration::from_secs(3600));
    let auth = provider(&clock, &credential);
    let creds = auth.credentials_blocking().unwrap();
    let from_blocking = tokio::task::spawn_blocking({
        let auth = auth.clone();
        move || auth.credentials_blocking()
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(creds.password(), from_blocking.password());
}

#[tokio::test]
async fn explicit_user_wins_over_the_token() {
    let clock = clock();
    let credential = Scripted::new(&clock, Duration::from_secs(3600));
    let auth = EntraAuth::builder()
        .credential_named("Scripted", credential.clone())
        .clock(clock.clone())
        .username("reporting-group")
        .build()
        .unwrap();
    let creds = auth.credentials().await.unwrap();
    assert_eq!(creds.user(), "reporting-group");
    assert_eq!(creds.user_source(), UsernameSource::Explicit);
}

fn service_principal(_scope: &str) -> Value {
    json!({"appid": "0000aaaa-1111", "oid": "o-sp", "idtyp": "app"})
}

fn named_only_by_management(scope: &str) -> Value {
    if scope == MANAGEMENT_SCOPE {
        json!({"xms_mirid": "/subscriptions/s/resourcegroups/g/providers/Microsoft.Web/sites/shop/slots/staging"})
    } else {
        json!({"appid": "0000aaaa-1111", "oid": "o-mi"})
    }
}

fn guest(_scope: &str) -> Value {
    json!({"iss": "https://sts.windows.net/t/", "idp": "live.com", "unique_name": "live.com#bob@outlook.com"})
}

#[tokio::test]
async fn service_principal_falls_back_to_the_management_token_then_asks_for_a_user() {
    let clock = clock();
    let credential = Scripted::with_claims(&clock, Duration::from_secs(3600), service_principal);
    let auth = provider(&clock, &credential);
    let err = auth.credentials().await.unwrap_err();
    assert!(
        matches!(&err, Error::NoUsername { reason: MissingRole::AppOnly { appid } } if appid == "0000aaaa-1111"),
        "{err:?}"
    );
    assert!(err.to_string().contains("set the user explicitly"), "{err}");
    let scopes = credential.scopes.lock().unwrap().clone();
    assert_eq!(scopes, [Cloud::Public.scope(), MANAGEMENT_SCOPE]);
}

#[tokio::test]
async fn role_can_come_from_the_management_token() {
    let clock = clock();
    let credential =
        Scripted::with_claims(&clock, Duration::from_secs(3600), named_only_by_management);
    let auth = provider(&clock, &credential);
    let creds = auth.credentials().await.unwrap();
    assert_eq!(creds.user(), "shop/slots/staging");
    assert_eq!(creds.user_source(), UsernameSource::SystemAssignedIdentity);
    // The derived name is kept: a refresh makes no second management call.
    clock.set(clock.next_deadline().await);
    credential.wait_for_calls(3).await;
    let scopes = credential.scopes.lock().unwrap().clone();
    assert_eq!(
        scopes,
        [
            Cloud::Public.scope(),
            MANAGEMENT_SCOPE,
            Cloud::Public.scope()
        ]
    );
}

#[tokio::test]
async fn guest_gets_a_hint_without_a_management_call() {
    let clock = clock();
    let credential = Scripted::with_claims(&clock, Duration::from_secs(3600), guest);
    let auth = provider(&clock, &credential);
    let err = auth.credentials().await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::NoUsername {
                reason: MissingRole::Guest { .. }
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("#EXT#"), "{err}");
    assert_eq!(credential.calls(), 1);
}

#[tokio::test]
async fn scopes_follow_the_cloud() {
    let clock = clock();
    for (cloud, scope) in [
        (
            Cloud::UsGovernment,
            "https://ossrdbms-aad.database.usgovcloudapi.net/.default",
        ),
        (
            Cloud::China,
            "https://ossrdbms-aad.database.chinacloudapi.cn/.default",
        ),
        (
            Cloud::custom_scope("api://emulator/.default"),
            "api://emulator/.default",
        ),
    ] {
        let credential = Scripted::new(&clock, Duration::from_secs(3600));
        let auth = EntraAuth::builder()
            .credential_named("Scripted", credential.clone())
            .clock(clock.clone())
            .cloud(cloud)
            .build()
            .unwrap();
        auth.credentials().await.unwrap();
        assert_eq!(auth.scope(), scope);
        assert_eq!(credential.scopes.lock().unwrap().as_slice(), [scope]);
    }
}

#[test]
fn invalid_settings_are_refused() {
    let clock = clock();
    let credential = Scripted::new(&clock, Duration::from_secs(3600));
    let base = || EntraAuth::builder().credential(credential.clone());
    assert!(matches!(
        base().timeout(Duration::ZERO).build(),
        Err(Error::Config { .. })
    ));
    assert!(matches!(
        base()
            .retry_backoff(Duration::from_secs(5), Duration::from_secs(1))
            .build(),
        Err(Error::Config { .. })
    ));
    assert!(matches!(
        base().username("").build(),
        Err(Error::Config { .. })
    ));
}

#[test]
fn credential_names_come_from_the_type() {
    let clock = clock();
    let credential = Scripted::new(&clock, Duration::from_secs(1));
    let auth = EntraAuth::builder().credential(credential).build().unwrap();
    assert_eq!(auth.credential_name(), "Scripted");
    // Without the path or the generic arguments.
    assert_eq!(credentials::name_of::<Vec<Scripted>>(), "Vec");
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_provider_thread() {
    let clock = clock();
    let credential = Scripted::new(&clock, Duration::from_secs(3600));
    let auth = provider(&clock, &credential);
    auth.credentials().await.unwrap();
    let mut tokens = auth.subscribe();
    drop(auth);
    // The token sender lives in the worker's state; once the thread ends it is dropped.
    assert!(tokens.changed().await.is_err());
}

#[tokio::test]
async fn refresh_is_never_scheduled_after_the_token_stops_being_served() {
    let clock = clock();
    let credential = Scripted::new(&clock, Duration::from_secs(3600));
    let auth = EntraAuth::builder()
        .credential_named("Scripted", credential.clone())
        .clock(clock.clone())
        .refresh_margin(Duration::from_secs(10))
        .safety_margin(Duration::from_secs(60))
        .build()
        .unwrap();
    let creds = auth.credentials().await.unwrap();
    let refresh_at = clock.next_deadline().await;
    assert_eq!(refresh_at, creds.expires_at() - Duration::from_secs(60));
}
