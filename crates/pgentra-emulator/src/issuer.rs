//! The token issuer: an RSA key made at start, and RS256 JWTs shaped like the v1 access tokens
//! Entra ID issues for Azure PostgreSQL, for configured principals.
//!
//! Verification ([`Issuer::verify`]) reads tokens with this module's own code, not with
//! `pgentra::claims` (the code under test): the emulator is an independent oracle, so a bug in
//! pgentra's decoding cannot make a wrong token pass here as well.

mod principal;
mod verify;

pub(crate) use principal::stable_id;
pub use principal::{Principal, PrincipalKind};
pub use verify::{TokenClaims, TokenRejection};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_SHA256};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use pgentra::clock::unix_seconds;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

/// A signed token and its expiry.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The JWT.
    pub token: String,
    /// Expiry, in seconds since the Unix epoch.
    pub expires_on: u64,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken")
            .field("token", &"_")
            .field("expires_on", &self.expires_on)
            .finish()
    }
}

/// Issues and verifies tokens with one RSA key.
pub struct Issuer {
    key: KeyPair,
    kid: String,
    tenant: String,
    lifetime_secs: AtomicU64,
    token_groups: AtomicUsize,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("kid", &self.kid)
            .field("tenant", &self.tenant)
            .field("lifetime", &self.lifetime())
            .field("token_groups", &self.token_groups())
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// An issuer for `tenant` with a fresh 2048-bit key, issuing tokens valid for `lifetime`.
    pub fn new(tenant: &str, lifetime: Duration) -> Self {
        // Key generation only fails if the system has no entropy source.
        let key = KeyPair::generate(KeySize::Rsa2048).expect("generate an RSA key");
        let components = PublicKeyComponents::<Vec<u8>>::from(key.public_key());
        let kid = URL_SAFE_NO_PAD.encode(&components.n[..12]);
        Self {
            key,
            kid,
            tenant: tenant.to_owned(),
            lifetime_secs: AtomicU64::new(lifetime.as_secs().max(1)),
            token_groups: AtomicUsize::new(0),
        }
    }

    /// How many group object IDs each token carries in a `groups` claim.
    pub fn token_groups(&self) -> usize {
        self.token_groups.load(Ordering::Relaxed)
    }

    /// Makes tokens issued from now on carry `count` group object IDs, as a user's token does
    /// for a user in that many groups: about 50 bytes each, so 150 make an 8 KB token, the size
    /// that broke middleboxes (PgBouncer #874). Entra ID puts at most 200 in a token.
    pub fn set_token_groups(&self, count: usize) {
        self.token_groups.store(count, Ordering::Relaxed);
    }

    /// The tenant ID.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The `iss` claim of its tokens (the v1 issuer, as for Azure PostgreSQL tokens).
    pub fn issuer(&self) -> String {
        issuer_of(&self.tenant)
    }

    /// The lifetime of newly issued tokens.
    pub fn lifetime(&self) -> Duration {
        Duration::from_secs(self.lifetime_secs.load(Ordering::Relaxed))
    }

    /// Changes the lifetime of tokens issued from now on (at least one second).
    pub fn set_lifetime(&self, lifetime: Duration) {
        self.lifetime_secs
            .store(lifetime.as_secs().max(1), Ordering::Relaxed);
    }

    /// Issues a token for `principal` with audience `audience` (a resource URI such as
    /// `https://ossrdbms-aad.database.windows.net`; a trailing `/.default` is removed).
    pub fn issue(&self, principal: &Principal, audience: &str) -> IssuedToken {
        self.issue_at(principal, audience, unix_seconds(SystemTime::now()))
    }

    /// As [`issue`](Self::issue), as if issued at `now` (seconds since the epoch), for tests of
    /// expired or not-yet-valid tokens.
    pub fn issue_at(&self, principal: &Principal, audience: &str, now: u64) -> IssuedToken {
        let expires_on = now + self.lifetime().as_secs();
        let mut claims = serde_json::Map::new();
        claims.insert(
            "aud".into(),
            json!(audience.strip_suffix("/.default").unwrap_or(audience)),
        );
        let tenant = principal.tenant_or(&self.tenant);
        claims.insert("iss".into(), json!(issuer_of(tenant)));
        claims.insert("iat".into(), json!(now));
        claims.insert("nbf".into(), json!(now));
        claims.insert("exp".into(), json!(expires_on));
        claims.insert("ver".into(), json!("1.0"));
        // Entra's unique token identifier: two tokens issued in the same second still differ.
        claims.insert("uti".into(), json!(unique_token_id()));
        principal.name_claims(tenant, &mut claims);
        let groups = self.token_groups();
        if groups > 0 {
            let ids: Vec<String> = (0..groups)
                .map(|i| stable_id("group", &i.to_string()))
                .collect();
            claims.insert("groups".into(), json!(ids));
        }
        IssuedToken {
            token: self.sign(&Value::Object(claims)),
            expires_on,
        }
    }

    /// Signs any JSON payload with this issuer's key (for tests of tampered claims).
    pub fn sign(&self, payload: &Value) -> String {
        let header = json!({"typ": "JWT", "alg": "RS256", "kid": self.kid, "x5t": self.kid});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload.to_string())
        );
        let mut signature = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .expect("RSA signing with a valid key and buffer");
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// The JSON Web Key Set with this issuer's public key.
    pub fn jwks(&self) -> Value {
        let components = PublicKeyComponents::<Vec<u8>>::from(self.key.public_key());
        json!({"keys": [{
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid,
            "n": URL_SAFE_NO_PAD.encode(&components.n),
            "e": URL_SAFE_NO_PAD.encode(&components.e),
        }]})
    }
}

/// A token identifier like Entra's `uti`: 16 random bytes, base64url.
fn unique_token_id() -> String {
    let mut bytes = [0u8; 16];
    // Uniqueness, not secrecy: a failing OS generator still gives distinct identifiers here.
    if getrandom::fill(&mut bytes).is_err() {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        bytes[..8].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    }
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Entra ID's v1 issuer for `tenant`.
fn issuer_of(tenant: &str) -> String {
    format!("https://sts.windows.net/{tenant}/")
}

#[cfg(test)]
mod tests;
