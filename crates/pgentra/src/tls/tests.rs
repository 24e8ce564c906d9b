//! The client configurations against a real rustls server on loopback: each `sslmode` must
//! accept and refuse exactly what libpq's does.

use super::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::PrivateKeyDer;
use rustls::{ServerConfig, SupportedProtocolVersion};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// How long one connection may take before the test fails instead of hanging.
const TIMEOUT: Duration = Duration::from_secs(20);

/// What the server writes once the handshake is done.
const GREETING: &[u8] = b"ok";

/// A file in the temp directory, unique to this process and call, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(label: &str, contents: impl AsRef<[u8]>) -> Self {
        let path = Self::path(label);
        std::fs::write(&path, contents).expect("write temp file");
        Self(path)
    }

    /// A unique path that is never created.
    fn path(label: &str) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!(
            "pgentra-tls-test-{}-{n}-{label}.pem",
            std::process::id()
        ))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A test CA, a server certificate it signed for `localhost` and `127.0.0.1`, and an unrelated
/// CA; both CA certificates are in PEM files.
struct Pki {
    ca: TempFile,
    other_ca: TempFile,
    server_chain: Vec<CertificateDer<'static>>,
    server_key_der: Vec<u8>,
}

impl Pki {
    fn new() -> Self {
        let ca = new_ca("pgentra test CA");
        let other_ca = new_ca("pgentra other CA");

        let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("server names");
        params
            .distinguished_name
            .push(DnType::CommonName, "pgentra test server");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("server key");
        let cert = params
            .signed_by(&key, &ca)
            .expect("sign server certificate");

        Self {
            ca: TempFile::new("ca", ca.pem()),
            other_ca: TempFile::new("other-ca", other_ca.pem()),
            server_chain: vec![cert.der().clone()],
            server_key_der: key.serialize_der(),
        }
    }

    /// A server configuration that speaks only `versions`.
    fn server_config(&self, versions: &[&'static SupportedProtocolVersion]) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let key = PrivateKeyDer::try_from(self.server_key_der.clone()).expect("server key DER");
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(self.server_chain.clone(), key)
            .expect("server certificate");
        Arc::new(config)
    }

    /// Connects with `options` and `server_name` to a server that speaks TLS 1.2 and 1.3.
    async fn connect(&self, options: &TlsOptions, server_name: &str) -> io::Result<Vec<u8>> {
        connect(
            self.server_config(rustls::ALL_VERSIONS),
            options,
            server_name,
        )
        .await
    }
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA")
}

/// Serves one TLS connection on loopback with `server` (handshake, [`GREETING`], close), connects
/// to it with the client configuration of `options` under `server_name`, and returns what the
/// client read.
async fn connect(
    server: Arc<ServerConfig>,
    options: &TlsOptions,
    server_name: &str,
) -> io::Result<Vec<u8>> {
    let client = options.client_config().expect("client config");
    let server_name = ServerName::try_from(server_name.to_owned()).expect("server name");

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = TlsAcceptor::from(server);
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        tls.write_all(GREETING).await?;
        tls.shutdown().await
    });

    let client_side = async {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = TlsConnector::from(client).connect(server_name, tcp).await?;
        let mut received = Vec::new();
        tls.read_to_end(&mut received).await?;
        Ok(received)
    };
    let result = tokio::time::timeout(TIMEOUT, client_side)
        .await
        .expect("the TLS exchange timed out");
    server_task.abort();
    result
}

/// The rustls error inside a failed handshake's I/O error.
fn rustls_error(error: &io::Error) -> &rustls::Error {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a rustls error: {error:?}"))
}

fn assert_connected(result: io::Result<Vec<u8>>) {
    match result {
        Ok(received) => assert_eq!(received, GREETING),
        Err(error) => panic!("handshake failed: {error:?}"),
    }
}

fn assert_rejected(result: io::Result<Vec<u8>>, expected: fn(&CertificateError) -> bool) {
    let error = result.expect_err("the handshake succeeded but must fail");
    match rustls_error(&error) {
        rustls::Error::InvalidCertificate(certificate) if expected(certificate) => {}
        other => panic!("wrong handshake error: {other:?}"),
    }
}

fn is_name_error(error: &CertificateError) -> bool {
    matches!(
        error,
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
    )
}

fn is_unknown_issuer(error: &CertificateError) -> bool {
    matches!(error, CertificateError::UnknownIssuer)
}

#[tokio::test]
async fn verify_full_accepts_a_trusted_certificate_for_the_right_name() {
    let pki = Pki::new();
    let options = TlsOptions::verify_full().with_root_cert(&pki.ca.0);
    for name in ["localhost", "127.0.0.1"] {
        assert_connected(pki.connect(&options, name).await);
    }
}

#[tokio::test]
async fn verify_full_rejects_the_wrong_name() {
    let pki = Pki::new();
    let options = TlsOptions::verify_full().with_root_cert(&pki.ca.0);
    assert_rejected(pki.connect(&options, "wrong.example").await, is_name_error);
}

#[tokio::test]
async fn verify_ca_accepts_the_wrong_name() {
    let pki = Pki::new();
    let options = TlsOptions::verify_ca().with_root_cert(&pki.ca.0);
    assert_connected(pki.connect(&options, "wrong.example").await);
}

#[tokio::test]
async fn verifying_modes_reject_an_untrusted_issuer() {
    let pki = Pki::new();
    for options in [TlsOptions::verify_full(), TlsOptions::verify_ca()] {
        let options = options.with_root_cert(&pki.other_ca.0);
        for name in ["localhost", "wrong.example"] {
            assert_rejected(pki.connect(&options, name).await, is_unknown_issuer);
        }
    }
}

#[tokio::test]
async fn default_roots_do_not_trust_a_private_ca() {
    let pki = Pki::new();
    for options in [
        TlsOptions::verify_full(),
        TlsOptions::verify_ca(),
        TlsOptions::verify_full().with_root_cert("system"),
        TlsOptions::verify_ca().with_root_cert("system"),
    ] {
        assert_rejected(pki.connect(&options, "localhost").await, is_unknown_issuer);
    }
}

#[tokio::test]
async fn require_accepts_any_certificate() {
    let pki = Pki::new();
    assert_connected(pki.connect(&TlsOptions::require(), "wrong.example").await);
    // Require ignores the roots entirely, even a file that does not exist.
    let missing = TempFile::path("missing");
    let options = TlsOptions::require().with_root_cert(missing);
    assert_connected(pki.connect(&options, "wrong.example").await);
}

/// `require` and `verify-ca` replace rustls's verifier, and must still check the handshake
/// signature under both protocol versions.
#[tokio::test]
async fn custom_verifiers_work_with_tls12_and_tls13() {
    let pki = Pki::new();
    let cases = [
        (TlsOptions::require(), "wrong.example"),
        (
            TlsOptions::verify_ca().with_root_cert(&pki.ca.0),
            "wrong.example",
        ),
        (
            TlsOptions::verify_full().with_root_cert(&pki.ca.0),
            "localhost",
        ),
    ];
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        for (options, name) in &cases {
            let server = pki.server_config(&[version]);
            assert_connected(connect(server, options, name).await);
        }
    }
}

#[test]
fn a_missing_root_file_is_an_io_error() {
    let missing = TempFile::path("missing");
    for options in [TlsOptions::verify_full(), TlsOptions::verify_ca()] {
        match options.with_root_cert(&missing).client_config() {
            Err(Error::Io { path, source }) => {
                assert_eq!(path, missing);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected an I/O error, got {other:?}"),
        }
    }
}

#[test]
fn a_root_file_without_certificates_is_a_tls_error_naming_it() {
    let key_only = KeyPair::generate().expect("key").serialize_pem();
    let contents = [
        ("empty", String::new()),
        ("text", "this is not a certificate\n".to_owned()),
        ("key-only", key_only),
        (
            "bad-base64",
            "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n".to_owned(),
        ),
        (
            "not-der",
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n".to_owned(),
        ),
    ];
    for (label, contents) in contents {
        let file = TempFile::new(label, contents);
        for options in [TlsOptions::verify_full(), TlsOptions::verify_ca()] {
            match options.with_root_cert(&file.0).client_config() {
                Err(Error::Tls { message }) => assert!(
                    message.contains(&file.0.display().to_string()),
                    "{label}: the message does not name the file: {message}"
                ),
                other => panic!("{label}: expected a TLS error, got {other:?}"),
            }
        }
    }
}

#[test]
fn sslmode_parses_the_encrypted_modes_only() {
    for (text, mode) in [
        ("verify-full", SslMode::VerifyFull),
        ("VERIFY-CA", SslMode::VerifyCa),
        ("require", SslMode::Require),
    ] {
        assert_eq!(text.parse::<SslMode>().expect(text), mode);
        assert_eq!(mode.as_str().parse::<SslMode>().expect(text), mode);
    }
    for text in ["disable", "allow", "prefer", "bogus", ""] {
        match text.parse::<SslMode>() {
            Err(Error::ConnInfo { .. }) => {}
            other => panic!("{text:?}: expected a connection settings error, got {other:?}"),
        }
    }
}

#[test]
fn the_default_is_verify_full_with_default_roots() {
    assert_eq!(TlsOptions::default(), TlsOptions::verify_full());
    assert_eq!(TlsOptions::default().mode, SslMode::VerifyFull);
    assert_eq!(TlsOptions::default().root_cert, None);
}

#[cfg(feature = "tokio-postgres-0_7")]
#[test]
fn the_tokio_postgres_connector_follows_the_options() {
    assert!(TlsOptions::verify_full().make_tls_connect().is_ok());
    assert!(TlsOptions::require().make_tls_connect().is_ok());
    let missing = TempFile::path("missing-for-connector");
    assert!(matches!(
        TlsOptions::verify_ca()
            .with_root_cert(&missing)
            .make_tls_connect(),
        Err(Error::Io { .. })
    ));
}
