//! The token issuer: an RSA key made at start, and RS256 JWTs shaped like the v1 access tokens
//! Entra ID issues for Azure PostgreSQL, for configured principals.
//!
//! Verification ([`Issuer::verify`]) reads tokens with this module's own code, not with
//! `pgentra::claims` (the code under test): the emulator is an independent oracle, so a bug in
//! pgentra's decoding cannot make a wrong token pass here as well.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{
    KeyPair as _, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256, UnparsedPublicKey,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use pgentra::clock::unix_seconds;
use serde_json::{Value, json};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

/// The kind of an emulated principal, which decides the claims of its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PrincipalKind {
    /// A member user: `upn`, `unique_name`, `idtyp: user`.
    User,
    /// A guest: no `upn`; `unique_name` is `live.com#<email>` and `idp` is `live.com`.
    Guest {
        /// The guest's home e-mail address.
        email: String,
    },
    /// An app registration's service principal: `appid`, `oid`, `idtyp: app`, no name.
    ServicePrincipal,
    /// A user-assigned managed identity: app claims plus `xms_mirid` of the identity.
    UserAssignedIdentity,
    /// A system-assigned managed identity: app claims plus `xms_mirid` of its host resource.
    SystemAssignedIdentity {
        /// The host resource's ARM ID, like
        /// `/subscriptions/S/resourcegroups/G/providers/Microsoft.Compute/virtualMachines/vm1`.
        resource_id: String,
    },
}

/// An Entra principal the emulator issues tokens for, and the PostgreSQL role it may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The PostgreSQL role name of the principal (its UPN, display name or resource name).
    pub role: String,
    /// Object ID (stable, derived from the role).
    pub oid: String,
    /// Application (client) ID for apps and managed identities (stable, derived from the role).
    pub client_id: String,
    /// What kind of principal this is.
    pub kind: PrincipalKind,
    /// The tenant of a principal from another directory (`None`: the issuer's own), whose
    /// tokens carry that tenant's `tid` and `iss`.
    pub tenant: Option<String>,
}

/// A stable GUID-shaped ID for `seed`, so principals keep their IDs across runs.
pub(crate) fn stable_id(namespace: &str, seed: &str) -> String {
    let half = |salt: u8| {
        let mut hasher = std::hash::DefaultHasher::new();
        (namespace, seed, salt).hash(&mut hasher);
        hasher.finish()
    };
    let (a, b) = (half(1), half(2));
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

impl Principal {
    fn new(role: &str, kind: PrincipalKind) -> Self {
        Self {
            role: role.to_owned(),
            oid: stable_id("oid", role),
            client_id: stable_id("appid", role),
            kind,
            tenant: None,
        }
    }

    /// The same principal, in the directory of `tenant` (a second tenant's user, say): its
    /// tokens are signed by the same key, as Entra ID signs every tenant's, but name that tenant.
    pub fn in_tenant(mut self, tenant: &str) -> Self {
        self.tenant = Some(tenant.to_owned());
        self
    }

    /// A member user with this UPN.
    pub fn user(upn: &str) -> Self {
        Self::new(upn, PrincipalKind::User)
    }

    /// A guest whose role is its `#EXT#` UPN in this tenant, like
    /// `bob_outlook.com#EXT#@contoso.onmicrosoft.com` for `bob@outlook.com`.
    pub fn guest(ext_upn: &str, email: &str) -> Self {
        Self::new(
            ext_upn,
            PrincipalKind::Guest {
                email: email.to_owned(),
            },
        )
    }

    /// A service principal whose display name (and role) is `name`.
    pub fn service_principal(name: &str) -> Self {
        Self::new(name, PrincipalKind::ServicePrincipal)
    }

    /// A user-assigned managed identity named `name`.
    pub fn user_assigned_identity(name: &str) -> Self {
        Self::new(name, PrincipalKind::UserAssignedIdentity)
    }

    /// The system-assigned identity of the resource `resource_id`; its role is the resource
    /// name (`app/slots/slot` for an App Service slot).
    pub fn system_assigned_identity(resource_id: &str) -> Self {
        // Entra names a system-assigned identity after its resource, and a deployment slot's
        // `<app>/slots/<slot>` (derived here independently of pgentra's own code).
        let segments: Vec<&str> = resource_id.trim_end_matches('/').split('/').collect();
        let role = match segments.as_slice() {
            [.., site, slots, slot] if slots.eq_ignore_ascii_case("slots") => {
                format!("{site}/slots/{slot}")
            }
            [.., name] if !name.is_empty() => (*name).to_owned(),
            _ => resource_id.to_owned(),
        };
        Self::new(
            &role,
            PrincipalKind::SystemAssignedIdentity {
                resource_id: resource_id.to_owned(),
            },
        )
    }

    /// Whether this principal is an application (service principal or managed identity).
    pub fn is_app(&self) -> bool {
        !matches!(self.kind, PrincipalKind::User | PrincipalKind::Guest { .. })
    }

    /// The principal's tenant: its own, or the issuer's.
    fn tenant_or<'a>(&'a self, issuer: &'a str) -> &'a str {
        self.tenant.as_deref().unwrap_or(issuer)
    }

    fn name_claims(&self, tenant: &str, claims: &mut serde_json::Map<String, Value>) {
        let app = |claims: &mut serde_json::Map<String, Value>| {
            claims.insert("appid".into(), json!(self.client_id));
            claims.insert("idtyp".into(), json!("app"));
        };
        match &self.kind {
            PrincipalKind::User => {
                claims.insert("upn".into(), json!(self.role));
                claims.insert("unique_name".into(), json!(self.role));
                claims.insert("idtyp".into(), json!("user"));
            }
            PrincipalKind::Guest { email } => {
                claims.insert("unique_name".into(), json!(format!("live.com#{email}")));
                claims.insert("idp".into(), json!("live.com"));
                claims.insert("idtyp".into(), json!("user"));
            }
            PrincipalKind::ServicePrincipal => app(claims),
            PrincipalKind::UserAssignedIdentity => {
                app(claims);
                claims.insert(
                    "xms_mirid".into(),
                    json!(format!(
                        "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/emulator/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{}",
                        self.role
                    )),
                );
            }
            PrincipalKind::SystemAssignedIdentity { resource_id } => {
                app(claims);
                claims.insert("xms_mirid".into(), json!(resource_id));
            }
        }
        claims.insert("tid".into(), json!(tenant));
        claims.insert("oid".into(), json!(self.oid));
        claims.insert("sub".into(), json!(self.oid));
    }
}

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
mod tests {
    use super::*;
    use pgentra::claims::UsernameSource;

    const AUD: &str = "https://ossrdbms-aad.database.windows.net";
    const SKEW: Duration = Duration::from_secs(5);

    fn issuer() -> Issuer {
        Issuer::new(
            "72f988bf-0000-4000-8000-00000000e001",
            Duration::from_secs(3600),
        )
    }

    #[test]
    fn tokens_verify_and_name_their_role_as_pgentra_derives_it() {
        let issuer = issuer();
        let cases = [
            (
                Principal::user("alice@contoso.com"),
                Ok(UsernameSource::Upn),
            ),
            (
                Principal::user_assigned_identity("orders-mi"),
                Ok(UsernameSource::UserAssignedIdentity),
            ),
            (
                Principal::system_assigned_identity(
                    "/subscriptions/s/resourcegroups/g/providers/Microsoft.Web/sites/shop/slots/staging",
                ),
                Ok(UsernameSource::SystemAssignedIdentity),
            ),
            (Principal::service_principal("reporting-app"), Err(())),
            (
                Principal::guest(
                    "bob_outlook.com#EXT#@contoso.onmicrosoft.com",
                    "bob@outlook.com",
                ),
                Err(()),
            ),
        ];
        for (principal, expected) in cases {
            let issued = issuer.issue(&principal, &format!("{AUD}/.default"));
            let verified = issuer.verify(&issued.token, AUD, SKEW).unwrap();
            assert_eq!(verified.oid(), Some(principal.oid.as_str()));
            assert_eq!(verified.is_app(), principal.is_app());
            // The emulator's tokens and pgentra's reading of them agree.
            let claims = pgentra::claims::Claims::decode(&issued.token).unwrap();
            assert_eq!(claims.exp(), Some(issued.expires_on as i64));
            match (claims.role_name(), expected) {
                (Ok((role, source)), Ok(expected)) => {
                    assert_eq!(role, principal.role);
                    assert_eq!(source, expected);
                }
                (Err(_), Err(())) => {}
                (got, expected) => panic!("{}: got {got:?}, expected {expected:?}", principal.role),
            }
        }
        assert_eq!(
            Principal::system_assigned_identity(
                "/subscriptions/s/resourcegroups/g/providers/Microsoft.Web/sites/shop/slots/staging"
            )
            .role,
            "shop/slots/staging"
        );
    }

    #[test]
    fn rejections() {
        let issuer = issuer();
        let alice = Principal::user("alice@contoso.com");
        let now = unix_seconds(SystemTime::now());
        let expired = issuer.issue_at(&alice, AUD, now - 7200);
        assert_eq!(
            issuer.verify(&expired.token, AUD, SKEW),
            Err(TokenRejection::Expired)
        );
        let future = issuer.issue_at(&alice, AUD, now + 600);
        assert_eq!(
            issuer.verify(&future.token, AUD, SKEW),
            Err(TokenRejection::NotYetValid)
        );
        let wrong_aud = issuer.issue(&alice, "https://management.azure.com/.default");
        assert!(matches!(
            issuer.verify(&wrong_aud.token, AUD, SKEW),
            Err(TokenRejection::WrongAudience { .. })
        ));
        let other = Issuer::new(issuer.tenant(), Duration::from_secs(3600));
        let forged = other.issue(&alice, AUD);
        assert_eq!(
            issuer.verify(&forged.token, AUD, SKEW),
            Err(TokenRejection::BadSignature)
        );
        let good = issuer.issue(&alice, AUD).token;
        let (head, _) = good.rsplit_once('.').unwrap();
        let tampered = format!("{head}.{}", URL_SAFE_NO_PAD.encode([0u8; 256]));
        assert_eq!(
            issuer.verify(&tampered, AUD, SKEW),
            Err(TokenRejection::BadSignature)
        );
        let other_issuer = issuer
            .sign(&json!({"iss": "https://login.example/other/", "aud": AUD, "exp": now + 60}));
        assert_eq!(
            issuer.verify(&other_issuer, AUD, SKEW),
            Err(TokenRejection::WrongIssuer)
        );
        for garbage in ["", "not a jwt", "a.b.c", "{\"eyJ\"}"] {
            assert!(
                matches!(
                    issuer.verify(garbage, AUD, SKEW),
                    Err(TokenRejection::Malformed(_))
                ),
                "{garbage}"
            );
        }
    }

    #[test]
    fn another_tenants_tokens_are_signed_alike_but_refused() {
        let issuer = issuer();
        let other = "11111111-2222-3333-4444-555555555555";
        let eve = Principal::user("eve@fabrikam.com").in_tenant(other);
        let token = issuer.issue(&eve, AUD).token;
        assert_eq!(
            issuer.verify(&token, AUD, SKEW),
            Err(TokenRejection::WrongTenant {
                tenant: other.into()
            })
        );
        let claims = pgentra::claims::Claims::decode(&token).unwrap();
        assert_eq!(claims.tid(), Some(other));
    }

    #[test]
    fn group_claims_grow_a_token_to_the_size_of_a_real_users() {
        let issuer = issuer();
        let alice = Principal::user("alice@contoso.com");
        let plain = issuer.issue(&alice, AUD).token;
        issuer.set_token_groups(150);
        let large = issuer.issue(&alice, AUD).token;
        assert!(plain.len() < 1500, "{}", plain.len());
        assert!((8_000..10_000).contains(&large.len()), "{}", large.len());
        let claims = pgentra::claims::Claims::decode(&large).unwrap();
        assert_eq!(claims.as_map()["groups"].as_array().unwrap().len(), 150);
        assert!(issuer.verify(&large, AUD, SKEW).is_ok());
    }

    #[test]
    fn the_oracle_reads_tokens_with_its_own_code() {
        let issuer = issuer();
        let now = unix_seconds(SystemTime::now());
        // Claims pgentra's decoder and the server see alike, signed but broken.
        for (payload, expected) in [
            (
                json!({"iss": issuer.issuer(), "aud": [AUD, "x"], "exp": now + 60, "oid": "o"}),
                true,
            ),
            (
                json!({"iss": issuer.issuer(), "aud": AUD, "exp": now + 60}),
                false,
            ),
            (
                json!({"iss": issuer.issuer(), "aud": AUD, "exp": "soon", "oid": "o"}),
                false,
            ),
            (
                json!({"iss": issuer.issuer(), "exp": now + 60, "oid": "o"}),
                false,
            ),
        ] {
            let token = issuer.sign(&payload);
            assert_eq!(
                issuer.verify(&token, AUD, SKEW).is_ok(),
                expected,
                "{payload}"
            );
        }
    }

    #[test]
    fn lifetime_is_configurable_from_seconds_to_hours() {
        let issuer = issuer();
        for lifetime in [
            Duration::from_secs(3),
            Duration::from_secs(20),
            Duration::from_secs(6 * 3600),
        ] {
            issuer.set_lifetime(lifetime);
            let now = unix_seconds(SystemTime::now());
            let issued = issuer.issue_at(&Principal::user("a@b"), AUD, now);
            assert_eq!(issued.expires_on - now, lifetime.as_secs());
        }
    }

    #[test]
    fn jwks_publishes_the_verifying_key() {
        let issuer = issuer();
        let jwks = issuer.jwks();
        let key = &jwks["keys"][0];
        assert_eq!(key["kty"], "RSA");
        let n = URL_SAFE_NO_PAD.decode(key["n"].as_str().unwrap()).unwrap();
        let e = URL_SAFE_NO_PAD.decode(key["e"].as_str().unwrap()).unwrap();
        let token = issuer.issue(&Principal::user("a@b"), AUD).token;
        let (input, signature) = token.rsplit_once('.').unwrap();
        PublicKeyComponents { n, e }
            .verify(
                &RSA_PKCS1_2048_8192_SHA256,
                input.as_bytes(),
                &URL_SAFE_NO_PAD.decode(signature).unwrap(),
            )
            .unwrap();
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(Principal::user("a@b").oid, Principal::user("a@b").oid);
        assert_ne!(Principal::user("a@b").oid, Principal::user("c@d").oid);
        assert_eq!(Principal::user("a@b").oid.len(), 36);
    }
}
