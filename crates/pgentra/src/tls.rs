//! TLS for connections that carry a token: rustls client configurations that follow libpq's
//! `sslmode` semantics.
//!
//! A token is the password, so it must never cross the network in clear text: there is no
//! `disable`, `allow` or `prefer` here.
//!
//! | [`SslMode`] | Encrypts | Checks the chain | Checks the host name |
//! |-------------|----------|------------------|----------------------|
//! | `VerifyFull` (default) | yes | yes | yes |
//! | `VerifyCa` | yes | yes | no |
//! | `Require` | yes | no | no — for emulators and tests only |
//!
//! Roots: without a root file, the system's trust store plus the Mozilla roots of
//! `webpki-roots` (Azure PostgreSQL's DigiCert Global Root G2 and Microsoft RSA Root CA 2017 are
//! in both). With a root file (`sslrootcert`/`PGSSLROOTCERT`) only the certificates in that file
//! are trusted, as in libpq; the file name `system` means the default roots.

use crate::error::{Error, Result};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

/// How much of the server's certificate to verify; see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SslMode {
    /// Encrypt, but do not verify the server. Anyone on the path can impersonate the server and
    /// read the token: use only against a local emulator.
    Require,
    /// Encrypt and verify the certificate chain, not the host name.
    VerifyCa,
    /// Encrypt and verify the chain and the host name.
    #[default]
    VerifyFull,
}

impl SslMode {
    /// The libpq name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = Error;

    /// Parses a libpq `sslmode`. The modes that may fall back to plain text are refused.
    ///
    /// ```
    /// use pgentra::tls::SslMode;
    /// assert_eq!("verify-full".parse::<SslMode>()?, SslMode::VerifyFull);
    /// assert!("prefer".parse::<SslMode>().is_err());
    /// # Ok::<(), pgentra::Error>(())
    /// ```
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "require" => Ok(Self::Require),
            "verify-ca" => Ok(Self::VerifyCa),
            "verify-full" => Ok(Self::VerifyFull),
            insecure @ ("disable" | "allow" | "prefer") => Err(Error::conninfo(format!(
                "sslmode={insecure} could send the token without encryption; use verify-full (the default), verify-ca or require"
            ))),
            other => Err(Error::conninfo(format!(
                "unknown sslmode {other:?}; use verify-full, verify-ca or require"
            ))),
        }
    }
}

/// TLS settings for a connection: the mode and an optional root certificate file.
///
/// ```no_run
/// use pgentra::tls::TlsOptions;
/// // Azure: the default roots already trust it.
/// let azure = TlsOptions::verify_full().client_config()?;
/// // The pgentra emulator: trust its CA.
/// let emulator = TlsOptions::verify_full().with_root_cert("/tmp/pgentra-emulator/ca.pem").client_config()?;
/// # Ok::<(), pgentra::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct TlsOptions {
    /// The verification mode.
    pub mode: SslMode,
    /// A PEM file of trusted roots that replaces the default roots (`system` keeps them).
    pub root_cert: Option<PathBuf>,
}

impl TlsOptions {
    /// Verify the chain and the host name (the default).
    pub fn verify_full() -> Self {
        Self::default()
    }

    /// Verify the chain, not the host name.
    pub fn verify_ca() -> Self {
        Self {
            mode: SslMode::VerifyCa,
            root_cert: None,
        }
    }

    /// Encrypt without verifying the server: for emulators and tests only.
    pub fn require() -> Self {
        Self {
            mode: SslMode::Require,
            root_cert: None,
        }
    }

    /// Trusts only the certificates in this PEM file (the libpq `sslrootcert`).
    pub fn with_root_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.root_cert = Some(path.into());
        self
    }

    /// Builds the rustls client configuration.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::tls(e.to_string()))?;
        let config = match self.mode {
            SslMode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(
                    provider.signature_verification_algorithms,
                )))
                .with_no_client_auth(),
            mode => {
                let roots = Arc::new(self.roots()?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| Error::tls(e.to_string()))?;
                if mode == SslMode::VerifyCa {
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(AnyName(webpki)))
                        .with_no_client_auth()
                } else {
                    builder.with_webpki_verifier(webpki).with_no_client_auth()
                }
            }
        };
        Ok(Arc::new(config))
    }

    fn roots(&self) -> Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        match &self.root_cert {
            Some(path) if path != Path::new("system") => {
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| pem_error(path, e))?
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| pem_error(path, e))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(Error::tls(format!(
                        "{} holds no usable PEM certificate; point sslrootcert/PGSSLROOTCERT at the server's CA file",
                        path.display()
                    )));
                }
            }
            _ => {
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
                let native = rustls_native_certs::load_native_certs();
                for error in &native.errors {
                    tracing::debug!(%error, "skipping part of the system trust store");
                }
                roots.add_parsable_certificates(native.certs);
            }
        }
        Ok(roots)
    }

    /// A `tokio_postgres` TLS connector with these settings. Pair it with
    /// `SslMode::Require` in the `tokio_postgres::Config` so the connection never falls back
    /// to plain text.
    #[cfg(feature = "tokio-postgres-0_7")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio-postgres-0_7")))]
    pub fn make_tls_connect(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(
            Arc::unwrap_or_clone(self.client_config()?),
        ))
    }
}

fn pem_error(path: &Path, error: rustls::pki_types::pem::Error) -> Error {
    match error {
        rustls::pki_types::pem::Error::Io(io) => Error::io(path, io),
        other => Error::tls(format!(
            "{} is not a PEM certificate file: {other}",
            path.display()
        )),
    }
}

/// `verify-ca`: the chain must verify; a name mismatch is accepted.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `require`: any certificate is accepted, but the handshake signatures are still checked.
#[derive(Debug)]
struct NoVerification(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests;
