//! Fixtures for tests of pgentra and of applications that use it.
//!
//! [`PasswordTrap`] is a server that looks like PostgreSQL to a client that does not verify
//! certificates, and counts the passwords it is sent: a test points a redirect (a hostile
//! `.env`, a stale `PGHOSTADDR`) at it and asserts that no token arrived.
//!
//! [`TestCredential`] is an `azure_core` token credential that answers as a test says (a token
//! it mints, or another credential's answer), fails while told to, and counts its calls.
//!
//! [`azure_cli`] is the real Azure CLI credential alone, running the `az` of a directory (an
//! emulator's, or one without any for a credential that fails).
//!
//! [`within`] bounds what a test waits for, and [`temp_dir`] gives it a directory of its own.
//!
//! ```no_run
//! use pgentra_emulator::testing::PasswordTrap;
//! let trap = PasswordTrap::start("127.0.0.2:0".parse().unwrap()).unwrap();
//! // ... run the client with PGHOSTADDR=127.0.0.2 and the trap's port ...
//! assert_eq!(trap.passwords(), 0, "a token reached a server the user did not name");
//! ```

use crate::background;
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use pgentra::credential::CredentialChain;
use pgentra_wire::{
    ErrorFields, MAX_STARTUP_PACKET, StartupPacket, cleartext_password_request,
    parse_startup_packet, read_message, read_startup_packet,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

/// A fake PostgreSQL server that takes any TLS (a self-signed certificate for `localhost`,
/// which no client that verifies will accept) or none, asks for a cleartext password and
/// counts what it receives. It never logs or keeps the password itself.
pub struct PasswordTrap {
    addr: SocketAddr,
    counts: Arc<Counts>,
    _stop: oneshot::Sender<()>,
}

#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    passwords: AtomicU64,
}

impl std::fmt::Debug for PasswordTrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordTrap")
            .field("addr", &self.addr)
            .field("connections", &self.connections())
            .field("passwords", &self.passwords())
            .finish()
    }
}

impl PasswordTrap {
    /// Listens on `addr` (any loopback address; port 0 for a free one) on a thread of its own.
    pub fn start(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let tls = self_signed_tls().map_err(std::io::Error::other)?;
        let counts = Arc::new(Counts::default());
        let served = Arc::clone(&counts);
        let stop = background::run("pgentra-password-trap", move || async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((stream, _)) = listener.accept().await {
                served.connections.fetch_add(1, Ordering::SeqCst);
                let counts = Arc::clone(&served);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, tls, &counts).await;
                });
            }
        })?;
        Ok(Self {
            addr,
            counts,
            _stop: stop,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.counts.connections.load(Ordering::SeqCst)
    }

    /// Password messages received so far.
    pub fn passwords(&self) -> u64 {
        self.counts.passwords.load(Ordering::SeqCst)
    }
}

async fn serve(
    mut stream: tokio::net::TcpStream,
    tls: tokio_rustls::TlsAcceptor,
    counts: &Counts,
) -> Result<(), pgentra_wire::WireError> {
    loop {
        let packet = read_startup_packet(&mut stream, MAX_STARTUP_PACKET).await?;
        match parse_startup_packet(&packet)? {
            StartupPacket::SslRequest => {
                stream.write_all(b"S").await?;
                let mut stream = tls.accept(stream).await?;
                let packet = read_startup_packet(&mut stream, MAX_STARTUP_PACKET).await?;
                return ask_password(&mut stream, &packet, counts).await;
            }
            StartupPacket::GssEncRequest => stream.write_all(b"N").await?,
            StartupPacket::CancelRequest { .. } => return Ok(()),
            StartupPacket::Startup { .. } => {
                return ask_password(&mut stream, &packet, counts).await;
            }
        }
    }
}

async fn ask_password<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    packet: &[u8],
    counts: &Counts,
) -> Result<(), pgentra_wire::WireError> {
    if !matches!(parse_startup_packet(packet)?, StartupPacket::Startup { .. }) {
        return Ok(());
    }
    stream.write_all(&cleartext_password_request()).await?;
    let (tag, _password) = read_message(stream, 1 << 20).await?;
    if tag == b'p' {
        counts.passwords.fetch_add(1, Ordering::SeqCst);
    }
    let refusal = ErrorFields::fatal("28P01", "password authentication failed (a trap)", None);
    stream.write_all(&refusal.to_error_response()).await?;
    Ok(())
}

fn self_signed_tls() -> Result<tokio_rustls::TlsAcceptor, Box<dyn std::error::Error + Send + Sync>>
{
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?
        .self_signed(&key)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Fails the test (panics, naming `what`) if `future` takes longer than `limit`: a test waits
/// for events, never for ever.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use pgentra_emulator::testing::within;
/// use std::time::Duration;
/// let answer = within(Duration::from_secs(5), "the answer", async { 42 }).await;
/// assert_eq!(answer, 42);
/// # });
/// ```
pub async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: no result within {limit:?}"),
    }
}

/// A new directory under the system's temporary directory, named after `name`, this process
/// and a random number, so that tests running at once never share one.
///
/// ```
/// let dir = pgentra_emulator::testing::temp_dir("example");
/// assert!(dir.is_dir());
/// # std::fs::remove_dir_all(dir).unwrap();
/// ```
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pgentra-{name}-{}-{:016x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

/// The real Azure CLI credential and no other, running the `az` found in `dir`: an emulator's
/// [`bin_dir`](crate::Emulator::bin_dir), or a directory without one for a credential that
/// fails.
///
/// ```
/// let failing = pgentra_emulator::testing::azure_cli(std::path::Path::new("/nonexistent"));
/// let auth = pgentra::EntraAuth::builder().credential_chain(failing).build().unwrap();
/// assert!(auth.credentials_blocking().is_err());
/// ```
pub fn azure_cli(dir: &Path) -> CredentialChain {
    CredentialChain::from_vars([
        ("PATH", dir.to_str().expect("a UTF-8 path")),
        ("AZURE_TOKEN_CREDENTIALS", "AzureCliCredential"),
    ])
    .expect("the Azure CLI credential")
}

/// An `azure_core` token credential for tests: its answers come from a function (a token the
/// test mints) or from another credential (which it then counts); while [`fail`](Self::fail)
/// says so it returns a credential error instead. `Debug` shows the counts, never a token.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use azure_core::credentials::{AccessToken, TokenCredential};
/// use pgentra_emulator::testing::TestCredential;
///
/// let expires = azure_core::time::OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1);
/// let credential = TestCredential::minting(move || AccessToken::new("a.b.c", expires));
/// assert!(credential.get_token(&["scope"], None).await.is_ok());
/// credential.fail(true);
/// assert!(credential.get_token(&["scope"], None).await.is_err());
/// assert_eq!(credential.calls(), 2);
/// # });
/// ```
pub struct TestCredential {
    answer: Answer,
    failing: AtomicBool,
    calls: AtomicUsize,
}

type Mint = Box<dyn Fn() -> AccessToken + Send + Sync>;

enum Answer {
    Mint(Mint),
    Inner(Arc<dyn TokenCredential>),
}

impl std::fmt::Debug for TestCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCredential")
            .field("calls", &self.calls())
            .field("failing", &self.failing.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl TestCredential {
    /// Answers with what `mint` returns, at every call.
    pub fn minting(mint: impl Fn() -> AccessToken + Send + Sync + 'static) -> Arc<Self> {
        Self::new(Answer::Mint(Box::new(mint)))
    }

    /// Answers as `inner` does, counting the calls.
    pub fn counting(inner: Arc<dyn TokenCredential>) -> Arc<Self> {
        Self::new(Answer::Inner(inner))
    }

    fn new(answer: Answer) -> Arc<Self> {
        Arc::new(Self {
            answer,
            failing: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
        })
    }

    /// From now on, fails every call (`true`) or answers again (`false`).
    pub fn fail(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Calls so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl TokenCredential for TestCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(azure_core::Error::with_message(
                azure_core::error::ErrorKind::Credential,
                "the test credential was told to fail: endpoint returned 503",
            ));
        }
        match &self.answer {
            Answer::Mint(mint) => Ok(mint()),
            Answer::Inner(inner) => inner.get_token(scopes, options).await,
        }
    }
}
