//! Verification of tokens as Azure PostgreSQL does it (signature, issuer and tenant, audience,
//! `nbf`/`exp`), with the emulator's own reading of their claims.

use super::Issuer;
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use pgentra::clock::unix_seconds;
use serde_json::Value;
use std::time::{Duration, SystemTime};

/// Why a token was not accepted by [`Issuer::verify`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenRejection {
    /// Not a JWT, or its header or payload cannot be read.
    #[error("the token is malformed: {0}")]
    Malformed(String),
    /// Not signed by this issuer's key (or not RS256).
    #[error("the token's signature does not verify")]
    BadSignature,
    /// Past `exp` (beyond the allowed skew).
    #[error("the token has expired")]
    Expired,
    /// Before `nbf` (beyond the allowed skew).
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `aud` is not the expected audience.
    #[error("the token's audience is not {expected}")]
    WrongAudience {
        /// The audience that was expected.
        expected: String,
    },
    /// `iss` is not this issuer.
    #[error("the token was issued by another issuer")]
    WrongIssuer,
    /// Issued by Entra ID for another tenant than the server's.
    #[error("the token is from tenant {tenant}, not the server's")]
    WrongTenant {
        /// The token's tenant.
        tenant: String,
    },
}

/// The claims of a verified token, read by the emulator's own code.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenClaims(serde_json::Map<String, Value>);

impl TokenClaims {
    /// A string claim.
    pub fn str(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(Value::as_str)
    }

    /// The principal's object ID (`oid`).
    pub fn oid(&self) -> Option<&str> {
        self.str("oid")
    }

    /// Whether it is an app-only token (a service principal's or a managed identity's).
    pub fn is_app(&self) -> bool {
        self.str("idtyp") == Some("app")
            || (self.str("appid").is_some()
                && self.str("upn").is_none()
                && self.str("unique_name").is_none())
    }

    /// An integer claim (`exp`, `nbf`, `iat`).
    fn seconds(&self, name: &str) -> Option<i64> {
        self.0.get(name).and_then(Value::as_i64)
    }

    /// The audiences: `aud` as a string or an array of strings.
    fn audiences(&self) -> Vec<&str> {
        match self.0.get("aud") {
            Some(Value::String(aud)) => vec![aud.as_str()],
            Some(Value::Array(auds)) => auds.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }
}

impl Issuer {
    /// Verifies a token as Azure PostgreSQL would: RS256 signature by this key, the server's
    /// tenant as issuer, audience, and `nbf`/`exp` with `skew` allowed. Returns its claims.
    pub fn verify(
        &self,
        token: &str,
        audience: &str,
        skew: Duration,
    ) -> Result<TokenClaims, TokenRejection> {
        let malformed = |what: &str| TokenRejection::Malformed(what.to_owned());
        let mut segments = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return Err(malformed("not three dot-separated segments"));
        };
        let json_of = |segment: &str| {
            URL_SAFE_NO_PAD
                .decode(segment)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        };
        let header = json_of(header).ok_or_else(|| malformed("unreadable header"))?;
        let Some(Value::Object(claims)) = json_of(payload) else {
            return Err(malformed("unreadable payload"));
        };
        let claims = TokenClaims(claims);
        if header["alg"] != "RS256" {
            return Err(TokenRejection::BadSignature);
        }
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenRejection::BadSignature)?;
        let signing_input = &token[..header_len(token)];
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, self.key.public_key().as_ref())
            .verify(signing_input.as_bytes(), &signature)
            .map_err(|_| TokenRejection::BadSignature)?;
        let issuer = claims.str("iss").unwrap_or_default();
        if issuer != self.issuer() {
            return Err(
                match issuer
                    .strip_prefix("https://sts.windows.net/")
                    .and_then(|rest| rest.strip_suffix('/'))
                {
                    Some(tenant) if !tenant.is_empty() => TokenRejection::WrongTenant {
                        tenant: tenant.to_owned(),
                    },
                    _ => TokenRejection::WrongIssuer,
                },
            );
        }
        let audience = audience.strip_suffix("/.default").unwrap_or(audience);
        if !claims.audiences().contains(&audience) {
            return Err(TokenRejection::WrongAudience {
                expected: audience.to_owned(),
            });
        }
        let now = i64::try_from(unix_seconds(SystemTime::now())).unwrap_or(i64::MAX);
        let skew = i64::try_from(skew.as_secs()).unwrap_or(i64::MAX);
        let exp = claims
            .seconds("exp")
            .ok_or_else(|| malformed("no exp claim"))?;
        if now > exp.saturating_add(skew) {
            return Err(TokenRejection::Expired);
        }
        if claims
            .seconds("nbf")
            .is_some_and(|nbf| now < nbf.saturating_sub(skew))
        {
            return Err(TokenRejection::NotYetValid);
        }
        if claims.oid().is_none() {
            return Err(malformed("no oid claim"));
        }
        Ok(claims)
    }
}

/// The length of a JWT's signing input: header, dot, payload.
fn header_len(token: &str) -> usize {
    token.rfind('.').unwrap_or(0)
}
