//! What to do when a step fails: the knowledge base of `check`, which turns rustls's
//! certificate errors, pgentra's token errors and Azure's login refusals into advice.

use super::steps::{Identity, Settings};
use super::{Failure, failure};
use crate::error::chain;
use pgentra::EntraAuth;
use pgentra::claims::{MissingRole, PrincipalKind, UsernameSource};
use pgentra::tls::TlsOptions;
use rustls::CertificateError;
use std::path::Path;

/// The hint for a failed handshake, from the rustls error inside the I/O error.
pub(super) fn handshake(
    settings: &Settings,
    options: &TlsOptions,
    error: &std::io::Error,
) -> Failure {
    let detail = format!("TLS handshake failed: {error}");
    let cause = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let Some(rustls::Error::InvalidCertificate(certificate)) = cause else {
        return failure(
            detail,
            "the server and this client agree on no TLS version or cipher suite, or something between them interferes: Azure needs TLS 1.2 or later",
        );
    };
    let hint = match certificate {
        CertificateError::UnknownIssuer | CertificateError::BadSignature => {
            let trusted_by = match &options.root_cert {
                Some(path) if path != Path::new("system") => {
                    format!(" by the CA certificates in {}", path.display())
                }
                _ => " by the system's or Mozilla's root certificates".to_owned(),
            };
            format!(
                "the server's certificate is not trusted{trusted_by}: set PGSSLROOTCERT (or sslrootcert=) to the CA file — for Azure, DigiCert Global Root G2 and Microsoft RSA Root CA 2017; for the pgentra emulator, the PGSSLROOTCERT it prints"
            )
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!(
                "the server's certificate is not valid for the name {}: connect with a name it holds (for Azure, <server>.postgres.database.azure.com, not an IP address or a custom alias), or use sslmode=verify-ca to check only the chain",
                settings.host
            )
        }
        CertificateError::Expired
        | CertificateError::ExpiredContext { .. }
        | CertificateError::NotValidYet
        | CertificateError::NotValidYetContext { .. } => {
            "the server's certificate is outside its validity period: check this machine's clock"
                .to_owned()
        }
        _ => "the server's certificate was rejected: check sslrootcert / PGSSLROOTCERT and sslmode"
            .to_owned(),
    };
    failure(detail, hint)
}
/// The hint for a failed token request.
pub(super) fn token(error: &pgentra::Error) -> Failure {
    let hint = match error {
        pgentra::Error::TokenExpiresTooSoon { .. } => {
            "the credential returned a token that has already expired: sign in again (`az login`) and check this machine's clock"
        }
        pgentra::Error::Timeout { .. } => {
            "the credential did not answer in time: check that its token endpoint is reachable (proxy, firewall), or allow longer with --timeout"
        }
        pgentra::Error::Config { .. } => {
            "fix the configuration named above (AZURE_* variables, --credential)"
        }
        _ => {
            "sign in with `az login` (or `azd auth login`), or set up a managed identity, workload identity or service principal (AZURE_CLIENT_ID, AZURE_TENANT_ID, ...); --credential picks one credential"
        }
    };
    failure(chain(error), hint)
}

/// The hint for a token that names no role.
pub(super) fn missing_role(reason: &MissingRole) -> Failure {
    let hint = match reason {
        MissingRole::Guest { .. } => {
            "give the role with --user (or user= / PGUSER): the guest's #EXT# user principal name in the server's tenant"
        }
        MissingRole::AppOnly { .. } => {
            "give the role with --user (or user= / PGUSER): the name an Entra administrator gave this service principal with pgaadauth_create_principal_with_oid"
        }
        _ => "give the role with --user (or user= / PGUSER)",
    };
    failure(format!("cannot derive the role: {reason}"), hint)
}

/// The server's refusal, with Azure's known messages turned into advice.
pub(super) fn login(
    error: &tokio_postgres::Error,
    auth: &EntraAuth,
    identity: &Identity,
) -> Failure {
    let Some(db) = error.as_db_error() else {
        return failure(
            chain(error),
            "the earlier steps reached the server, so this failed during the login itself: run with -vv for details",
        );
    };
    let message = db.message();
    let detail = format!("{message} (SQLSTATE {})", db.code().code());
    let role = identity.creds.user();
    let oid = identity.claims.oid().unwrap_or("<object id>");
    let tenant = identity.claims.tid().unwrap_or("unknown");
    let quoted_role = role.replace('\'', "''");
    let create_for_app = format!(
        "SELECT * FROM pgaadauth_create_principal_with_oid('{quoted_role}', '{oid}', 'service', false, false);"
    );
    let hint = if message.starts_with("password authentication failed") {
        let (create, who) = match identity.claims.principal_kind() {
            PrincipalKind::User | PrincipalKind::GuestUser => (
                format!("SELECT * FROM pgaadauth_create_principal('{quoted_role}', false, false);"),
                "users and groups",
            ),
            _ => (create_for_app, "managed identities and service principals"),
        };
        let mut hint = format!(
            "the server has no Entra role {role:?} for this {} (oid {oid}): an Entra administrator creates it, connected to the postgres database, with `{create}` ({who})",
            identity.claims.principal_kind().describe()
        );
        if identity.creds.user_source() == UsernameSource::Explicit {
            hint.push_str(&format!(
                "; if {role:?} is a group role, add this principal to that group in Entra ID"
            ));
        }
        hint
    } else if message.starts_with("The access token has expired")
        || message.starts_with("The access token is not valid yet")
    {
        "the server found the token expired or not yet valid: check this machine's clock, and sign in again (`az login`)".to_owned()
    } else if message.contains("does not have a valid audience claim") {
        format!(
            "the token is for another audience than this server ({} was asked for): choose the server's cloud with --cloud, or its scope with --scope",
            auth.scope()
        )
    } else if message.starts_with("An error occurred while validating the access token") {
        format!(
            "the server did not accept a token from tenant {tenant}: sign in to the server's tenant (`az login --tenant <server's tenant>`, or AZURE_TENANT_ID)"
        )
    } else if message.starts_with("Service Principals cannot generate")
        || message.starts_with("Service Principal oid mismatch")
    {
        format!(
            "the role {role:?} is mapped to another principal: log in as the role created for this principal (oid {oid}), or have an Entra administrator create one with `{create_for_app}`"
        )
    } else if db.code().code() == "3D000" {
        "the database does not exist: check dbname / PGDATABASE (every Azure server has postgres)"
            .to_owned()
    } else {
        "the server refused the login with the message above; `pgentra whoami` shows the principal and role".to_owned()
    };
    failure(detail, hint)
}
