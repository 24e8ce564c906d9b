//! The emulator's own certificate authority and the server certificate it issues for
//! `localhost` and `127.0.0.1`, used by the HTTPS token endpoint and the gateway.
//!
//! Clients trust it through its PEM file: `PGSSLROOTCERT` for PostgreSQL clients,
//! `SSL_CERT_FILE` for `azure_identity`'s HTTPS client.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

/// A CA made at start, and a server certificate it signed.
pub struct Ca {
    pem: String,
    server_chain: Vec<CertificateDer<'static>>,
    server_key_der: Vec<u8>,
    server_cert_pem: String,
    server_key_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// Makes a CA and a server certificate for `localhost` and `127.0.0.1`.
    pub fn new() -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "pgentra emulator CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;

        let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "pgentra emulator");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        Ok(Self {
            pem: ca.pem(),
            server_chain: vec![cert.der().clone()],
            server_key_der: key.serialize_der(),
            server_cert_pem: cert.pem(),
            server_key_pem: key.serialize_pem(),
        })
    }

    /// The CA certificate, PEM-encoded: write it to a file and trust it.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The server certificate for `localhost` and `127.0.0.1`, PEM-encoded, for a server
    /// that reads files (PostgreSQL's `ssl_cert_file`, see
    /// [`Cluster::enable_tls`](crate::backend::Cluster::enable_tls)).
    pub fn server_cert_pem(&self) -> &str {
        &self.server_cert_pem
    }

    /// The server certificate's private key, PEM-encoded (PKCS#8). A test key: it lives in
    /// memory and in the files a test writes.
    pub fn server_key_pem(&self) -> &str {
        &self.server_key_pem
    }

    /// A rustls server configuration presenting the server certificate, with `alpn` protocols.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, rustls::Error> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let key = PrivateKeyDer::try_from(self.server_key_der.clone())
            .map_err(|e| rustls::Error::General(e.to_owned()))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.server_chain.clone(), key)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}
