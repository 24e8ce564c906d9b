//! Fault injection against the emulator: what logins see when the token endpoint or the
//! gateway misbehaves.
//!
//! - The token endpoint answers 429 then 500 for 60 s while a valid token is cached: no login
//!   fails, and the refresh succeeds once the endpoint is back.
//! - The token endpoint is down past the token's expiry: logins fail at once with the
//!   credential's reason, and recover by themselves within one backoff step.
//! - The token endpoint refuses the managed-identity credential's refresh as the token runs
//!   out: callers get the endpoint's answer at once, not after azure_identity's retries or the
//!   timeout, and the retries still running recover when the endpoint is back.
//! - The token endpoint hangs: callers and pool logins wait no longer than the timeout.
//! - The gateway restarts mid-run: open connections die, and the pools log in again.
//! - The provider's clock jumps past the token's expiry: a refresh happens, and new logins use
//!   the new token.
//!
//! Provider time is a [`ManualClock`] wherever the scenario spans minutes, so nothing sleeps:
//! the tests wait for events (the provider's sleepers on the clock, new tokens from
//! `subscribe()`, the provider's and the emulator's counters), always with a bound. The emulator
//! issues 1-hour tokens, which stay valid at the gateway in real time however far provider time
//! moves.
//!
//! Those scenarios use the real `AzureCliCredential` with the emulator's `az` shim: it asks the
//! token endpoint on every call. The managed-identity credential would hide a clock-driven
//! outage: it caches tokens until 5 minutes before their real expiry, and retries 429 and 500
//! answers for over a minute of real time. It is used where time is real (the hang, the
//! restart), and with 60-second tokens, which its cache does not keep, where those retries are
//! the point (the refused refresh).

use pgentra::clock::{Clock, ManualClock};
use pgentra::conninfo::ConnInfo;
use pgentra::credential::CredentialChain;
use pgentra::tokio_postgres::EntraConnector;
use pgentra::{DbCredentials, EntraAuth, Error};
use pgentra_emulator::identity::Endpoint;
use pgentra_emulator::{Emulator, EmulatorConfig, MANAGED_IDENTITY, USER};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

const HOUR: Duration = Duration::from_secs(3600);

/// The longest any awaited event may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(10);

const QUERY: &str = "SELECT current_user::text";

/// The emulator for scenarios that inject faults or change the issuer's token lifetime: one
/// for the test binary, used by one scenario at a time (see [`exclusive`]).
fn faulty() -> &'static Emulator {
    static FAULTY: OnceLock<Emulator> = OnceLock::new();
    // Its own token endpoint and gateway, on the shared emulator's cluster.
    FAULTY.get_or_init(|| {
        Emulator::shared()
            .beside(EmulatorConfig::default())
            .expect("start an emulator beside the shared one")
    })
}

static EXCLUSIVE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The faulty emulator for one scenario, with no faults and 1-hour tokens (whatever an earlier,
/// maybe failed, scenario left).
async fn exclusive() -> (tokio::sync::MutexGuard<'static, ()>, &'static Emulator) {
    let guard = EXCLUSIVE.lock().await;
    let emulator = faulty();
    emulator.identity().clear_faults();
    emulator.issuer().set_lifetime(HOUR);
    (guard, emulator)
}

/// The real Azure CLI credential, running the emulator's `az` (a token request per call).
fn azure_cli(emulator: &Emulator) -> CredentialChain {
    pgentra_emulator::testing::azure_cli(emulator.bin_dir())
}

/// The real managed-identity credential over IMDS, redirected to the emulator (never to
/// 169.254.169.254).
fn managed_identity(emulator: &Emulator) -> CredentialChain {
    CredentialChain::from_vars([
        (
            "AZURE_TOKEN_CREDENTIALS",
            "ManagedIdentityCredential".to_owned(),
        ),
        (
            "AZURE_POD_IDENTITY_AUTHORITY_HOST",
            emulator.identity().imds_authority(),
        ),
    ])
    .unwrap()
}

/// A provider on `clock` asking the emulator's `az`.
fn cli_provider(emulator: &Emulator, clock: &ManualClock) -> EntraAuth {
    EntraAuth::builder()
        .credential_chain(azure_cli(emulator))
        .clock(clock.clone())
        .build()
        .unwrap()
}

/// A connector to `emulator`'s gateway, verify-full with its CA.
fn connector(emulator: &Emulator, auth: &EntraAuth) -> EntraConnector {
    let info = ConnInfo::parse(&format!(
        "host=localhost port={} dbname=postgres sslmode=verify-full sslrootcert={}",
        emulator.gateway().port(),
        emulator.ca_file().display()
    ))
    .unwrap();
    EntraConnector::new(auth.clone(), &info).unwrap()
}

fn deadpool(emulator: &Emulator, auth: &EntraAuth, size: usize) -> deadpool_postgres::Pool {
    pgentra::deadpool::pool(connector(emulator, auth), size).unwrap()
}

/// Opens a new connection through `pool` (a login at the gateway), asks for its role, and
/// closes it instead of returning it, so that the next call logs in again.
async fn fresh_login(pool: &deadpool_postgres::Pool) -> Result<String, String> {
    let login = async {
        let client = pool.get().await.map_err(|e| describe(&e))?;
        let row = client
            .query_one(QUERY, &[])
            .await
            .map_err(|e| describe(&e))?;
        drop(deadpool_postgres::Object::take(client));
        Ok(row.get(0))
    };
    tokio::time::timeout(PATIENCE, login)
        .await
        .unwrap_or_else(|_| Err(format!("no login within {PATIENCE:?}")))
}

/// Every message of an error's source chain, joined, plus its `Debug`.
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let chain: Vec<String> = std::iter::successors(Some(error), |e| e.source())
        .map(ToString::to_string)
        .collect();
    format!("{} | {error:?}", chain.join(": "))
}

/// Asserts that no token text (a JWT starts with `eyJ`) is in `text`.
fn assert_no_token(text: &str) {
    assert!(
        !text.contains("eyJ"),
        "a token leaked into an error: {text}"
    );
}

/// Waits (polling) until `done` holds; fails with `state()` after [`PATIENCE`].
async fn until(what: &str, mut done: impl FnMut() -> bool, state: impl Fn() -> String) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {}",
            state()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `future`'s output; fails if it takes longer than [`PATIENCE`].
async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Waits until the provider has fetched `fetched` tokens and failed `failures` times, and its
/// background task sleeps on `clock` (nothing else does: no credential call is running and no
/// caller waits); returns when that task wakes next (the refresh point or the next retry).
async fn settled(clock: &ManualClock, auth: &EntraAuth, fetched: u64, failures: u64) -> SystemTime {
    until(
        &format!("{fetched} tokens, {failures} failures and a sleeping provider"),
        || {
            let stats = auth.stats();
            stats.tokens_fetched == fetched
                && stats.fetch_failures == failures
                && clock.deadlines().len() == 1
        },
        || format!("{:?}, sleepers until {:?}", auth.stats(), clock.deadlines()),
    )
    .await;
    let wake = clock.deadlines()[0];
    assert!(wake > clock.now(), "the provider sleeps until the past");
    wake
}

/// `auth.credentials()`, failing the test if it takes longer than [`PATIENCE`].
async fn credentials(auth: &EntraAuth) -> pgentra::Result<DbCredentials> {
    bounded("credentials", auth.credentials()).await
}

/// Four callers of `auth.credentials()` at once: their results, and how long they took.
async fn four_callers(auth: &EntraAuth) -> (Vec<pgentra::Result<DbCredentials>>, Duration) {
    let started = Instant::now();
    let calls = futures::future::join_all((0..4).map(|_| auth.credentials()));
    (bounded("four callers", calls).await, started.elapsed())
}

/// Waits for the next token `tokens` yields.
async fn next_token(tokens: &mut watch::Receiver<Option<DbCredentials>>) -> DbCredentials {
    bounded("a new token", tokens.changed())
        .await
        .expect("the provider is running");
    tokens
        .borrow_and_update()
        .clone()
        .expect("a token after a change")
}

// ---------------------------------------------------------------------------------------------
// The token endpoint fails while a valid token is cached
// ---------------------------------------------------------------------------------------------

/// The endpoint answers 429, then 500, through 60 s of provider time from the refresh point:
/// every refresh attempt fails (one credential call per backoff step: 1, 2, 4, 8, 16, 30 s),
/// while every new connection still logs in with the cached token. Then the endpoint is back
/// and the next retry replaces the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_for_a_minute_fails_no_login_while_a_token_is_cached() {
    let (_exclusive, emulator) = exclusive().await;
    let (identity, gateway) = (emulator.identity(), emulator.gateway());
    let clock = ManualClock::new(SystemTime::now());
    let auth = cli_provider(emulator, &clock);
    let pool = deadpool(emulator, &auth, 4);

    let first = bounded("the first token", auth.credentials())
        .await
        .unwrap();
    let refresh_at = settled(&clock, &auth, 1, 0).await;
    let lead = first.expires_at().duration_since(refresh_at).unwrap();
    assert!(
        (Duration::from_secs(270)..=Duration::from_secs(300)).contains(&lead),
        "refresh {lead:?} before expiry: 5 min minus up to 10 % jitter"
    );
    // Just before the refresh point, logins work.
    clock.set(refresh_at - Duration::from_secs(1));
    assert_eq!(fresh_login(&pool).await.as_deref(), Ok(USER));
    let (logins, rejected) = (gateway.logins(), gateway.rejected());
    let calls = identity.requests(Endpoint::AzureCli);

    identity.fail_next(u32::MAX, 429);
    clock.set(refresh_at);
    let mut failures = 0;
    let mut opened = 0;
    let mut status = 429;
    let backoffs = [1, 2, 4, 8, 16, 30].map(Duration::from_secs);
    let retry_at = loop {
        failures += 1;
        let retry_at = settled(&clock, &auth, 1, failures).await;
        let backoff = retry_at.duration_since(clock.now()).unwrap();
        let expected = backoffs[(failures as usize - 1).min(backoffs.len() - 1)];
        assert_eq!(backoff, expected, "backoff after {failures} failures");
        // The cached token is served, and new connections log in with it.
        let served = credentials(&auth).await.unwrap();
        assert_eq!(served.password(), first.password());
        for _ in 0..2 {
            assert_eq!(fresh_login(&pool).await.as_deref(), Ok(USER));
            opened += 1;
        }
        let outage = clock.now().duration_since(refresh_at).unwrap();
        if outage >= Duration::from_secs(60) {
            break retry_at;
        }
        if outage >= Duration::from_secs(15) && status == 429 {
            // Halfway through the backoff steps, the endpoint starts failing differently.
            status = 500;
            identity.fail_next(u32::MAX, status);
        }
        clock.set(retry_at);
    };
    assert_eq!(status, 500, "the outage went from 429s to 500s");
    // 0 s, 1, 3, 7, 15, 31, 61: seven attempts, each exactly one credential call, none of them
    // caused by the logins.
    assert_eq!(failures, 7);
    assert_eq!(identity.requests(Endpoint::AzureCli) - calls, failures);
    let stats = auth.stats();
    assert_eq!((stats.tokens_fetched, stats.fetch_failures), (1, failures));
    assert_eq!(gateway.logins() - logins, opened);
    assert_eq!(gateway.rejected(), rejected, "no login failed");

    // The endpoint is back: the retry already scheduled replaces the token.
    identity.clear_faults();
    let mut tokens = auth.subscribe();
    clock.set(retry_at);
    let renewed = next_token(&mut tokens).await;
    assert_ne!(renewed.password(), first.password());
    let stats = auth.stats();
    assert_eq!((stats.tokens_fetched, stats.fetch_failures), (2, failures));
    assert!(
        stats.last_refresh_lead.unwrap() > Duration::from_secs(60),
        "replaced well before the old token's expiry: {stats:?}"
    );
    assert_eq!(
        credentials(&auth).await.unwrap().password(),
        renewed.password()
    );
    assert_eq!(fresh_login(&pool).await.as_deref(), Ok(USER));
    assert_eq!(gateway.rejected(), rejected);
}

// ---------------------------------------------------------------------------------------------
// The token endpoint is down past the token's expiry
// ---------------------------------------------------------------------------------------------

/// The endpoint fails from the refresh point on, and provider time moves past the token's
/// expiry: callers and new pool logins fail at once (no credential call each, no 30 s wait)
/// with the credential's reason, and no expired token reaches the gateway. When the endpoint is
/// back, the provider recovers by itself at its next retry, at most one backoff step later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_down_past_expiry_fails_logins_fast_then_recovers_by_itself() {
    let (_exclusive, emulator) = exclusive().await;
    let (identity, gateway) = (emulator.identity(), emulator.gateway());
    let clock = ManualClock::new(SystemTime::now());
    let auth = cli_provider(emulator, &clock);
    let pool = deadpool(emulator, &auth, 4);

    let first = bounded("the first token", auth.credentials())
        .await
        .unwrap();
    let refresh_at = settled(&clock, &auth, 1, 0).await;
    identity.fail_next(u32::MAX, 500);
    clock.set(refresh_at);
    settled(&clock, &auth, 1, 1).await;
    // Before the safety margin the old token is still served.
    assert_eq!(
        credentials(&auth).await.unwrap().password(),
        first.password()
    );

    // Past expiry in one step: the due retry fails as well, and nothing usable is left.
    clock.set(first.expires_at() + Duration::from_secs(1));
    let retry_at = settled(&clock, &auth, 1, 2).await;
    let backoff = retry_at.duration_since(clock.now()).unwrap();
    assert_eq!(backoff, Duration::from_secs(2));
    let (logins, rejected) = (gateway.logins(), gateway.rejected());
    let calls = identity.requests(Endpoint::AzureCli);

    let started = Instant::now();
    let err = credentials(&auth).await.unwrap_err();
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(2),
        "the last error is returned at once, not after the 30 s timeout: {waited:?}"
    );
    let expected_reason = |err: &Error| {
        matches!(err, Error::Credential { credential, reason }
            if credential == "AzureCliCredential"
                && reason.contains("fault injected by the pgentra emulator (HTTP 500"))
    };
    assert!(expected_reason(&err), "{err:?}");
    assert!(err.is_token_acquisition());
    assert!(err.to_string().contains("HTTP 500"), "{err}");
    assert_no_token(&format!("{err} | {err:?}"));

    // New connections, four at once: each fails at once with the credential's reason.
    let started = Instant::now();
    let gets = bounded(
        "four logins",
        futures::future::join_all((0..4).map(|_| pool.get())),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    for result in gets {
        let err = result.expect_err("no usable token, no connection");
        let cause = pgentra::deadpool::cause(&err).expect("pgentra's error in the chain");
        assert!(expected_reason(cause), "{cause:?}");
        let text = describe(&err);
        assert!(text.contains("HTTP 500"), "{text}");
        assert_no_token(&text);
    }
    // Failing fast means no credential call per caller, and no expired token sent anywhere.
    assert_eq!(identity.requests(Endpoint::AzureCli), calls);
    assert_eq!(auth.stats().fetch_failures, 2);
    assert_eq!((gateway.logins(), gateway.rejected()), (logins, rejected));

    // The endpoint is back. Provider time is now an hour ahead of the issuer's real time, so
    // the issuer's tokens are made to outlive the jump (a 1-hour token issued now would look
    // expired to this provider).
    emulator.issuer().set_lifetime(2 * HOUR);
    identity.clear_faults();
    let mut tokens = auth.subscribe();
    // Recovery within one backoff step, with no caller asking: the retry already scheduled.
    clock.set(retry_at);
    let renewed = next_token(&mut tokens).await;
    assert_ne!(renewed.password(), first.password());
    // About an hour left in provider time (the 2-hour token was issued an hour "earlier").
    assert!(
        renewed.expires_at() > clock.now() + HOUR / 2,
        "{:?} left",
        renewed.expires_at().duration_since(clock.now())
    );
    let stats = auth.stats();
    assert_eq!((stats.tokens_fetched, stats.fetch_failures), (2, 2));
    assert_eq!(
        credentials(&auth).await.unwrap().password(),
        renewed.password()
    );
    assert_eq!(fresh_login(&pool).await.as_deref(), Ok(USER));
    assert_eq!(gateway.logins(), logins + 1);
    assert_eq!(gateway.rejected(), rejected);
}

// ---------------------------------------------------------------------------------------------
// The token endpoint refuses managed identity while the token runs out
// ---------------------------------------------------------------------------------------------

/// The lifetime of the emulator's tokens in the managed-identity scenarios below: under the
/// 5 minutes in which azure_identity's own cache stops serving a token, so each credential call
/// asks the endpoint. The provider refreshes such a token 27 to 30 s before its expiry and stops
/// serving it 15 s before.
const SHORT_LIFETIME: Duration = Duration::from_secs(60);

/// The provider's timeout there: far above [`FAST`], and above the 12 to 15 s of provider time
/// between the refresh point and the end of the token's use, which the scenarios jump over.
const MI_TIMEOUT: Duration = Duration::from_secs(20);

/// How soon a caller must get the token endpoint's answer (real time).
const FAST: Duration = Duration::from_secs(2);

/// A managed-identity provider whose token ran out while its refresh is being refused.
struct Refused {
    auth: EntraAuth,
    first: DbCredentials,
    refresh_at: SystemTime,
}

/// The managed-identity credential (IMDS, redirected to the emulator) behind a provider on
/// `clock` gets a 60 s token. From the refresh point on, the endpoint answers 500: the refresh
/// is refused and azure_identity retries it (for over a minute); meanwhile callers get the
/// cached token. Then provider time reaches the end of the token's use, the refresh still
/// running, and four callers get the endpoint's answer within [`FAST`], not after the timeout
/// (which, on the manual clock, never comes by itself).
async fn refused_as_the_token_runs_out(emulator: &Emulator, clock: &ManualClock) -> Refused {
    let identity = emulator.identity();
    emulator.issuer().set_lifetime(SHORT_LIFETIME);
    let auth = EntraAuth::builder()
        .credential_chain(managed_identity(emulator))
        .clock(clock.clone())
        .timeout(MI_TIMEOUT)
        .build()
        .unwrap();
    let first = credentials(&auth).await.unwrap();
    assert_eq!(first.user(), MANAGED_IDENTITY);
    let refresh_at = settled(clock, &auth, 1, 0).await;
    let lifetime = first
        .expires_at()
        .duration_since(first.fetched_at())
        .unwrap();
    let usable_until = first.expires_at() - lifetime / 4;
    assert!(
        usable_until - MI_TIMEOUT < refresh_at,
        "the jump must not cut the refresh off"
    );

    let calls = identity.requests(Endpoint::Imds);
    identity.fail_next(u32::MAX, 500);
    clock.set(refresh_at);
    // A retry comes only after a refused request's answer.
    until(
        "the refresh to be refused and retried",
        || identity.requests(Endpoint::Imds) >= calls + 2,
        || {
            format!(
                "{} IMDS requests",
                identity.requests(Endpoint::Imds) - calls
            )
        },
    )
    .await;
    // Refused refreshes are invisible while the token is usable.
    let served = credentials(&auth).await.unwrap();
    assert_eq!(served.password(), first.password());

    clock.set(usable_until);
    let (results, waited) = four_callers(&auth).await;
    assert!(
        waited < FAST,
        "callers waited {waited:?} (timeout {MI_TIMEOUT:?}) for the endpoint's answer"
    );
    for result in results {
        let err = result.expect_err("no usable token, and the endpoint refuses");
        assert_endpoint_answer(&err, "");
    }
    eprintln!("four callers failed after {waited:?}");
    // The refresh is not over: azure_identity keeps retrying it.
    assert_eq!(auth.stats().fetch_failures, 0);
    Refused {
        auth,
        first,
        refresh_at,
    }
}

/// Asserts that `err` is the managed-identity credential's with the emulator's 500 answer (and
/// `note`), and holds nothing from the request.
fn assert_endpoint_answer(err: &Error, note: &str) {
    let expected = "the token endpoint answered HTTP 500 Internal Server Error: \
        {\"error\":\"injected_fault\",\"error_description\":\"fault injected by the pgentra emulator (HTTP 500 Internal Server Error)\"}";
    assert!(
        matches!(err, Error::Credential { credential, reason }
            if credential == "ManagedIdentityCredential" && *reason == format!("{expected}{note}")),
        "{err:?}"
    );
    assert!(err.is_token_acquisition());
    let text = format!("{err} | {err:?}");
    assert_no_token(&text);
    for request_part in [
        "ossrdbms",
        "metadata",
        "Metadata",
        "api-version",
        "127.0.0.1",
    ] {
        assert!(!text.contains(request_part), "{text}");
    }
}

/// The refresh of a managed-identity token is refused with 500s and the token runs out:
/// callers get the endpoint's answer at once instead of waiting out azure_identity's retries.
/// When the endpoint is back, the retry still running gets a token, which later callers get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_refresh_reaches_callers_at_once_and_its_retries_recover() {
    let (_exclusive, emulator) = exclusive().await;
    let clock = ManualClock::new(SystemTime::now());
    let refused = refused_as_the_token_runs_out(emulator, &clock).await;
    let auth = &refused.auth;

    // Subscribed first: the running retry may succeed at any moment after clear_faults.
    let mut tokens = auth.subscribe();
    emulator.issuer().set_lifetime(HOUR);
    emulator.identity().clear_faults();
    // azure_identity's retries wait 1.3 s, 2.7 s, 5.4 s ... (real time).
    let renewed = tokio::time::timeout(3 * PATIENCE, tokens.changed())
        .await
        .expect("the retry gets a token once the endpoint is back")
        .map(|()| tokens.borrow_and_update().clone().unwrap())
        .unwrap();
    assert_ne!(renewed.password(), refused.first.password());
    let creds = credentials(auth).await.unwrap();
    assert_eq!(creds.password(), renewed.password());
    assert_eq!(creds.user(), MANAGED_IDENTITY);
    let stats = auth.stats();
    assert_eq!((stats.tokens_fetched, stats.fetch_failures), (2, 0));
}

/// As above, but the endpoint stays down until the provider's timeout cuts the refresh off:
/// callers then get the endpoint's answer (not "did not return a token within 20s") until the
/// next retry, which recovers once the endpoint is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_refresh_cut_off_by_the_timeout_reports_the_endpoint_answer() {
    let (_exclusive, emulator) = exclusive().await;
    let clock = ManualClock::new(SystemTime::now());
    let refused = refused_as_the_token_runs_out(emulator, &clock).await;
    let auth = &refused.auth;

    clock.set(refused.refresh_at + MI_TIMEOUT);
    let retry_at = settled(&clock, auth, 1, 1).await;
    let started = Instant::now();
    let err = credentials(auth).await.unwrap_err();
    assert!(started.elapsed() < FAST, "{:?}", started.elapsed());
    assert_endpoint_answer(&err, &format!("; still no token after {MI_TIMEOUT:?}"));

    let mut tokens = auth.subscribe();
    emulator.issuer().set_lifetime(HOUR);
    emulator.identity().clear_faults();
    clock.set(retry_at);
    let renewed = next_token(&mut tokens).await;
    assert_ne!(renewed.password(), refused.first.password());
    assert_eq!(
        credentials(auth).await.unwrap().password(),
        renewed.password()
    );
    let stats = auth.stats();
    assert_eq!((stats.tokens_fetched, stats.fetch_failures), (2, 1));
}

// ---------------------------------------------------------------------------------------------
// The token endpoint hangs
// ---------------------------------------------------------------------------------------------

/// The endpoint stops answering: with a 500 ms timeout (real time), concurrent callers share
/// one credential call and all get `Error::Timeout` after about 500 ms, and a pool login fails
/// within a bounded time with that cause; both credentials (the CLI and managed identity) are
/// cut off. When the endpoint answers again, the providers recover by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_endpoint_is_cut_off_by_the_timeout() {
    let (_exclusive, emulator) = exclusive().await;
    let identity = emulator.identity();
    let timeout = Duration::from_millis(500);
    let provider = |chain| {
        EntraAuth::builder()
            .credential_chain(chain)
            .timeout(timeout)
            .build()
            .unwrap()
    };
    let providers = [
        (provider(azure_cli(emulator)), Endpoint::AzureCli, USER),
        (
            provider(managed_identity(emulator)),
            Endpoint::Imds,
            MANAGED_IDENTITY,
        ),
    ];
    identity.set_hang(true);

    let hung = providers.iter().map(|(auth, endpoint, _)| async move {
        let calls = identity.requests(*endpoint);
        let (results, waited) = four_callers(auth).await;
        for result in results {
            let err = result.expect_err("no token while the endpoint hangs");
            assert!(
                matches!(&err, Error::Timeout { timeout: t, .. } if *t == timeout),
                "{err:?}"
            );
            assert!(err.is_token_acquisition());
            assert_no_token(&format!("{err} | {err:?}"));
        }
        assert!(
            (Duration::from_millis(400)..Duration::from_secs(5)).contains(&waited),
            "{endpoint:?}: the callers waited {waited:?} for a {timeout:?} timeout"
        );
        // One call for the four callers (the request may not even have arrived in time).
        assert!(identity.requests(*endpoint) - calls <= 1, "{endpoint:?}");

        // A pool login: bounded too, and it says why.
        let pool = deadpool(emulator, auth, 2);
        let started = Instant::now();
        let err = bounded("a login", pool.get())
            .await
            .expect_err("no token, no connection");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{endpoint:?}: {:?}",
            started.elapsed()
        );
        let cause = pgentra::deadpool::cause(&err).expect("pgentra's error in the chain");
        assert!(matches!(cause, Error::Timeout { .. }), "{cause:?}");
        assert_no_token(&describe(&err));
        pool
    });
    let pools = bounded("the hung providers", futures::future::join_all(hung)).await;

    // The endpoint answers again: each provider recovers at its next retry, unasked.
    identity.set_hang(false);
    for ((auth, endpoint, user), pool) in providers.iter().zip(&pools) {
        let mut tokens = auth.subscribe();
        bounded(
            &format!("{endpoint:?} to recover"),
            tokens.wait_for(Option::is_some),
        )
        .await
        .unwrap();
        assert_eq!(credentials(auth).await.unwrap().user(), *user);
        assert_eq!(fresh_login(pool).await.as_deref(), Ok(*user));
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway restarts mid-run
// ---------------------------------------------------------------------------------------------

type Query =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>> + Send + Sync>;

/// Checks out a connection from a deadpool pool and asks for its role.
fn deadpool_query(pool: deadpool_postgres::Pool) -> Query {
    Arc::new(move || {
        let pool = pool.clone();
        Box::pin(async move {
            let client = pool.get().await.map_err(|e| describe(&e))?;
            let row = client
                .query_one(QUERY, &[])
                .await
                .map_err(|e| describe(&e))?;
            Ok(row.get(0))
        })
    })
}

/// Checks out a connection from a bb8 pool and asks for its role.
fn bb8_query(
    pool: bb8::Pool<pgentra::bb8::EntraConnectionManager>,
    errors: pgentra::bb8::LastErrorSink,
) -> Query {
    Arc::new(move || {
        let (pool, errors) = (pool.clone(), errors.clone());
        Box::pin(async move {
            let client = pool.get().await.map_err(|timeout| {
                errors
                    .last_error()
                    .map_or_else(|| describe(&timeout), |e| describe(&e))
            })?;
            let row = client
                .query_one(QUERY, &[])
                .await
                .map_err(|e| describe(&e))?;
            Ok(row.get(0))
        })
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Before,
    Restarting,
    After,
}

/// Successful queries before the restart, that every worker makes before it happens.
const WARM_UP: usize = 3;
/// Connections in each pool, and so the failed queries its workers may see after the restart
/// together: the pool hands out each connection the restart broke at most once (a query finds
/// it dead, and the pool drops it), before or after another worker's first success.
const POOL_SIZE: usize = 4;
/// Successful queries after the restart that end a worker.
const RECOVERED: usize = 5;

/// What one worker saw.
#[derive(Debug, Default)]
struct Report {
    name: String,
    ok_before: usize,
    errors_before: Vec<String>,
    /// Failures while the gateway restarted.
    errors_during: Vec<String>,
    /// Failures after the restart: connections the restart broke, found dead by using them.
    retries_after: Vec<String>,
    ok_after: usize,
    /// What must never happen: a session as another role.
    wrong_role: Vec<String>,
}

/// Runs `query` in a loop and sorts the outcomes by the phase they ended in, until `RECOVERED`
/// successes after the restart, or too many failures after it.
async fn worker(
    name: String,
    query: Query,
    phase: watch::Receiver<Phase>,
    warm: Arc<AtomicUsize>,
) -> Report {
    let mut report = Report {
        name,
        ..Report::default()
    };
    loop {
        let result = tokio::time::timeout(PATIENCE, query())
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {PATIENCE:?}")));
        let now = *phase.borrow();
        match (now, result) {
            (_, Ok(user)) if user != MANAGED_IDENTITY => {
                report.wrong_role.push(format!("logged in as {user}"));
                return report;
            }
            (Phase::Before, Ok(_)) => {
                report.ok_before += 1;
                if report.ok_before == WARM_UP {
                    warm.fetch_add(1, Ordering::SeqCst);
                }
            }
            (Phase::Before, Err(e)) => report.errors_before.push(e),
            // A query on a connection the restart has not reached yet.
            (Phase::Restarting, Ok(_)) => {}
            (Phase::Restarting, Err(e)) => report.errors_during.push(e),
            (Phase::After, Ok(_)) => {
                report.ok_after += 1;
                if report.ok_after == RECOVERED {
                    return report;
                }
            }
            (Phase::After, Err(e)) => {
                report.retries_after.push(e);
                if report.retries_after.len() > POOL_SIZE {
                    return report;
                }
            }
        }
        tokio::task::yield_now().await;
    }
}

/// Eight workers on a deadpool and a bb8 pool query the gateway in a loop; it restarts: the
/// connections open at that moment die (a connection held across it fails), errors happen only
/// during the restart and, after it, once at most for each pooled connection it broke, and every
/// worker then succeeds again through new logins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_recover_from_a_gateway_restart() {
    // A gateway of its own to restart, on the shared emulator's cluster.
    let emulator = Emulator::shared()
        .beside(EmulatorConfig::default())
        .expect("start an emulator beside the shared one");
    let gateway = emulator.gateway();
    let port = gateway.port();
    let auth = EntraAuth::builder()
        .credential_chain(managed_identity(&emulator))
        .build()
        .unwrap();
    let deadpool = deadpool(&emulator, &auth, POOL_SIZE);
    let errors = pgentra::bb8::LastErrorSink::default();
    let bb8 = bb8::Pool::builder()
        .max_size(POOL_SIZE as u32)
        .connection_timeout(Duration::from_secs(5))
        .error_sink(Box::new(errors.clone()))
        .build(pgentra::bb8::EntraConnectionManager::new(connector(
            &emulator, &auth,
        )))
        .await
        .unwrap();

    let (phase, phase_rx) = watch::channel(Phase::Before);
    let warm = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for i in 0..4 {
        for (name, query) in [
            ("deadpool", deadpool_query(deadpool.clone())),
            ("bb8", bb8_query(bb8.clone(), errors.clone())),
        ] {
            workers.push(tokio::spawn(worker(
                format!("{name} {i}"),
                query,
                phase_rx.clone(),
                Arc::clone(&warm),
            )));
        }
    }
    let count = workers.len();
    until(
        "every worker to warm up",
        || warm.load(Ordering::SeqCst) == count,
        || format!("{} of {count} warm", warm.load(Ordering::SeqCst)),
    )
    .await;
    // A connection held across the restart.
    let (held, connection) = bounded("a connection", connector(&emulator, &auth).connect())
        .await
        .unwrap();
    tokio::spawn(connection);
    bounded("a query", held.query_one(QUERY, &[]))
        .await
        .unwrap();
    let logins = gateway.logins();

    phase.send_replace(Phase::Restarting);
    let started = Instant::now();
    tokio::task::block_in_place(|| emulator.restart_gateway()).unwrap();
    let restart = started.elapsed();
    phase.send_replace(Phase::After);
    assert_eq!(emulator.gateway().port(), port);

    let err = bounded("a query after the restart", held.query_one(QUERY, &[]))
        .await
        .expect_err("the restart closed every open connection");
    assert_no_token(&describe(&err));

    let reports = bounded("the workers to recover", futures::future::join_all(workers)).await;
    let mut window_errors = 0;
    let mut retries = std::collections::HashMap::<&str, usize>::new();
    let reports: Vec<Report> = reports.into_iter().map(Result::unwrap).collect();
    for report in &reports {
        assert!(
            report.errors_before.is_empty(),
            "{}: {report:#?}",
            report.name
        );
        assert!(report.ok_before >= WARM_UP, "{report:#?}");
        assert_eq!(report.ok_after, RECOVERED, "{report:#?}");
        assert!(report.wrong_role.is_empty(), "{report:#?}");
        let pool = report.name.split(' ').next().unwrap_or_default();
        *retries.entry(pool).or_default() += report.retries_after.len();
        window_errors += report.errors_during.len() + report.retries_after.len();
        for error in report.errors_during.iter().chain(&report.retries_after) {
            assert_no_token(error);
        }
    }
    for (pool, retries) in retries {
        assert!(
            retries <= POOL_SIZE,
            "{pool}: {retries} failed queries after the restart on {POOL_SIZE} connections: {reports:#?}"
        );
    }
    // Both pools had to log in again, and every login went through.
    assert!(
        gateway.logins() >= logins + 2,
        "{} new logins",
        gateway.logins() - logins
    );
    assert_eq!(gateway.rejected(), 0);
    // The restart costs one credential call at most: the provider's token outlives it.
    assert_eq!(auth.stats().tokens_fetched, 1);
    eprintln!(
        "gateway restart took {restart:?}; {window_errors} failed queries during it and the retries after it; {} new logins",
        gateway.logins() - logins
    );
}

// ---------------------------------------------------------------------------------------------
// The clock moves past the token's expiry
// ---------------------------------------------------------------------------------------------

/// Provider time jumps past the token's expiry in one step (a suspended laptop, an NTP step): a
/// caller right after the jump never gets the expired token, one refresh serves both it and the
/// background task, and the next new connection logs in with the new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_moved_past_expiry_refreshes_the_token() {
    let (_exclusive, emulator) = exclusive().await;
    let (identity, gateway) = (emulator.identity(), emulator.gateway());
    let clock = ManualClock::new(SystemTime::now());
    let auth = cli_provider(emulator, &clock);
    let pool = deadpool(emulator, &auth, 4);

    let first = bounded("the first token", auth.credentials())
        .await
        .unwrap();
    settled(&clock, &auth, 1, 0).await;
    assert_eq!(fresh_login(&pool).await.as_deref(), Ok(USER));
    let (logins, rejected) = (gateway.logins(), gateway.rejected());
    let calls = identity.requests(Endpoint::AzureCli);

    // Tokens issued after the jump must outlive it in provider time (see the outage scenario).
    emulator.issuer().set_lifetime(2 * HOUR);
    let mut tokens = auth.subscribe();
    clock.set(first.expires_at() + Duration::from_secs(1));
    let served = bounded("credentials after the jump", auth.credentials())
        .await
        .unwrap();
    assert_ne!(
        served.password(),
        first.password(),
        "the expired token was served"
    );
    // About an hour left in provider time (the 2-hour token was issued an hour "earlier").
    assert!(
        served.expires_at() > clock.now() + HOUR / 2,
        "{:?} left",
        served.expires_at().duration_since(clock.now())
    );
    assert_eq!(served.fetched_at(), clock.now());
    let renewed = next_token(&mut tokens).await;
    assert_eq!(renewed.password(), served.password());
    let next_refresh = settled(&clock, &auth, 2, 0).await;
    assert!(next_refresh < renewed.expires_at());
    assert_eq!(
        identity.requests(Endpoint::AzureCli),
        calls + 1,
        "one refresh"
    );

    assert_eq!(fresh_login(&pool).await.as_deref(), Ok(USER));
    assert_eq!(gateway.logins(), logins + 1);
    assert_eq!(gateway.rejected(), rejected);
    assert_eq!(
        credentials(&auth).await.unwrap().password(),
        renewed.password()
    );
}
