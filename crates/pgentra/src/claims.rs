//! Reading an Entra ID access token's claims and deriving the PostgreSQL role name from them.
//!
//! The payload is decoded **without verifying the signature**: a client has no way to verify a
//! token meant for the database server, and only needs the claims to name the role. Decoding is
//! total: every malformed input becomes a [`TokenFormatError`], never a panic.
//!
//! The role name of an Entra principal on Azure PostgreSQL is its name: a user's UPN, a managed
//! identity's resource name. [`Claims::role_name`] derives it in this order:
//!
//! 1. `xms_mirid` of a managed identity. For a user-assigned identity this is the identity's
//!    name; for a system-assigned one it is the name of the resource it belongs to, with child
//!    resources spelled as Azure names their identities (`<app>/slots/<slot>` for an App Service
//!    slot).
//! 2. `upn`, then `preferred_username`, then `unique_name`.
//!
//! Guests (whose role is their `#EXT#` UPN, which is not in the token) and service principals
//! (whose role is their display name, also not in the token) get a [`MissingRole`] that says so.

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde_json::{Map, Value};
use std::fmt;

/// Why a token's payload could not be read. The variants never include token text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenFormatError {
    /// The token is empty.
    #[error("the token is empty")]
    Empty,
    /// A JWS has three dot-separated segments; this token has another count (five is an
    /// encrypted JWE, which a client cannot read).
    #[error("the token has {found} dot-separated segments, a JWT has 3")]
    SegmentCount {
        /// Number of segments found.
        found: usize,
    },
    /// The payload is not base64url.
    #[error("the token payload is not valid base64url")]
    Base64,
    /// The payload is not UTF-8.
    #[error("the token payload is not UTF-8")]
    NotUtf8,
    /// The payload is not JSON.
    #[error("the token payload is not JSON: {message}")]
    Json {
        /// The JSON parser's message (position and kind, no payload text).
        message: String,
    },
    /// The payload is JSON but not an object.
    #[error("the token payload is not a JSON object")]
    NotAnObject,
    /// A known claim has the wrong JSON type.
    #[error("claim `{claim}` is not {expected}")]
    ClaimType {
        /// Claim name.
        claim: &'static str,
        /// What the claim should be.
        expected: &'static str,
    },
}

/// Claims that must be strings when present.
const STRING_CLAIMS: &[&str] = &[
    "upn",
    "preferred_username",
    "unique_name",
    "xms_mirid",
    "oid",
    "tid",
    "appid",
    "azp",
    "idtyp",
    "iss",
    "idp",
    "name",
    "sub",
];

/// Claims that must be integer seconds since the Unix epoch when present.
const TIME_CLAIMS: &[&str] = &["exp", "nbf", "iat"];

/// The decoded payload of an access token.
///
/// ```
/// use base64::Engine as _;
/// let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
///     .encode(r#"{"upn":"alice@contoso.com","oid":"1111","exp":1900000000}"#);
/// let token = format!("e30.{payload}.c2ln");
/// let claims = pgentra::claims::Claims::decode(&token)?;
/// let (role, source) = claims.role_name()?;
/// assert_eq!(role, "alice@contoso.com");
/// assert_eq!(source, pgentra::claims::UsernameSource::Upn);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, PartialEq)]
pub struct Claims {
    map: Map<String, Value>,
}

impl fmt::Debug for Claims {
    // Claims are not secret, but keep Debug short and stable: the identifying ones only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claims")
            .field("oid", &self.str("oid"))
            .field("tid", &self.str("tid"))
            .field("upn", &self.str("upn"))
            .field("xms_mirid", &self.str("xms_mirid"))
            .field("exp", &self.exp())
            .finish_non_exhaustive()
    }
}

/// Decodes one dot-separated segment of a JWT (header, payload or signature) from base64url,
/// padded or not (Entra tokens are unpadded, but some tools re-encode with padding). `None` if
/// it is not base64url.
///
/// ```
/// let token = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.e30.c2ln";
/// let header = token.split('.').next().unwrap();
/// let header = pgentra::claims::decode_segment(header).unwrap();
/// assert_eq!(header, br#"{"alg":"RS256","kid":"k1"}"#);
/// assert_eq!(pgentra::claims::decode_segment("e30="), Some(b"{}".to_vec()));
/// assert_eq!(pgentra::claims::decode_segment("not base64!"), None);
/// ```
pub fn decode_segment(segment: &str) -> Option<Vec<u8>> {
    const BASE64URL: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    BASE64URL.decode(segment).ok()
}

impl Claims {
    /// Decodes the payload of a JWT without verifying it, checking the types of the claims
    /// pgentra reads.
    pub fn decode(token: &str) -> Result<Self, TokenFormatError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(TokenFormatError::Empty);
        }
        let segments: Vec<&str> = token.split('.').collect();
        if segments.len() != 3 {
            return Err(TokenFormatError::SegmentCount {
                found: segments.len(),
            });
        }
        let bytes = decode_segment(segments[1]).ok_or(TokenFormatError::Base64)?;
        let text = String::from_utf8(bytes).map_err(|_| TokenFormatError::NotUtf8)?;
        let value: Value = serde_json::from_str(&text).map_err(|e| TokenFormatError::Json {
            message: format!(
                "{:?} error at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            ),
        })?;
        let Value::Object(map) = value else {
            return Err(TokenFormatError::NotAnObject);
        };
        Self::from_map(map)
    }

    /// Builds claims from an already-parsed JSON object, checking the types of known claims.
    pub fn from_map(map: Map<String, Value>) -> Result<Self, TokenFormatError> {
        for &claim in STRING_CLAIMS {
            if map.get(claim).is_some_and(|v| !v.is_string()) {
                return Err(TokenFormatError::ClaimType {
                    claim,
                    expected: "a string",
                });
            }
        }
        for &claim in TIME_CLAIMS {
            if map.get(claim).is_some_and(|v| v.as_i64().is_none()) {
                return Err(TokenFormatError::ClaimType {
                    claim,
                    expected: "an integer (seconds since the Unix epoch)",
                });
            }
        }
        match map.get("aud") {
            None | Some(Value::String(_)) => {}
            Some(Value::Array(items)) if items.iter().all(Value::is_string) => {}
            Some(_) => {
                return Err(TokenFormatError::ClaimType {
                    claim: "aud",
                    expected: "a string or an array of strings",
                });
            }
        }
        Ok(Self { map })
    }

    /// All claims, as JSON.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.map
    }

    /// A string claim by name (`None` if absent or not a string).
    pub fn str(&self, name: &str) -> Option<&str> {
        self.map.get(name).and_then(Value::as_str)
    }

    /// `oid`: the principal's immutable object ID.
    pub fn oid(&self) -> Option<&str> {
        self.str("oid")
    }

    /// `tid`: the tenant ID.
    pub fn tid(&self) -> Option<&str> {
        self.str("tid")
    }

    /// `appid` (v1) or `azp` (v2): the client application ID.
    pub fn appid(&self) -> Option<&str> {
        self.str("appid").or_else(|| self.str("azp"))
    }

    /// `exp`: expiry, in seconds since the Unix epoch.
    pub fn exp(&self) -> Option<i64> {
        self.map.get("exp").and_then(Value::as_i64)
    }

    /// `nbf`: not-before, in seconds since the Unix epoch.
    pub fn nbf(&self) -> Option<i64> {
        self.map.get("nbf").and_then(Value::as_i64)
    }

    /// `iat`: issued-at, in seconds since the Unix epoch.
    pub fn iat(&self) -> Option<i64> {
        self.map.get("iat").and_then(Value::as_i64)
    }

    /// `aud`: the audiences (usually one).
    pub fn audiences(&self) -> Vec<&str> {
        match self.map.get("aud") {
            Some(Value::String(aud)) => vec![aud.as_str()],
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }

    /// The kind of principal the token was issued to.
    pub fn principal_kind(&self) -> PrincipalKind {
        if let Some(mirid) = self.str("xms_mirid") {
            return match parse_mirid(mirid) {
                Some((_, true)) => PrincipalKind::UserAssignedManagedIdentity,
                Some((_, false)) => PrincipalKind::SystemAssignedManagedIdentity,
                None => PrincipalKind::ServicePrincipal,
            };
        }
        if self.is_guest() {
            PrincipalKind::GuestUser
        } else if self.str("idtyp") == Some("app")
            || (self.str("upn").is_none()
                && self.str("preferred_username").is_none()
                && self.str("unique_name").is_none()
                && self.appid().is_some())
        {
            PrincipalKind::ServicePrincipal
        } else {
            PrincipalKind::User
        }
    }

    /// A guest has no `upn`, and its identity provider (`idp`) differs from the issuer, or its
    /// `unique_name` carries a home-IdP prefix such as `live.com#`.
    fn is_guest(&self) -> bool {
        if self.str("upn").is_some() {
            return false;
        }
        let foreign_idp = match (self.str("idp"), self.str("iss")) {
            (Some(idp), Some(iss)) => idp.trim_end_matches('/') != iss.trim_end_matches('/'),
            (Some(_), None) => true,
            _ => false,
        };
        foreign_idp || self.str("unique_name").is_some_and(|n| n.contains('#'))
    }

    /// Derives the PostgreSQL role name, and says which claim it came from.
    pub fn role_name(&self) -> Result<(String, UsernameSource), MissingRole> {
        if let Some((name, user_assigned)) = self.str("xms_mirid").and_then(parse_mirid) {
            let source = if user_assigned {
                UsernameSource::UserAssignedIdentity
            } else {
                UsernameSource::SystemAssignedIdentity
            };
            return Ok((name, source));
        }
        if self.is_guest() {
            return Err(MissingRole::Guest {
                idp: self.str("idp").map(str::to_owned),
            });
        }
        let named = [
            ("upn", UsernameSource::Upn),
            ("preferred_username", UsernameSource::PreferredUsername),
            ("unique_name", UsernameSource::UniqueName),
        ];
        for (claim, source) in named {
            if let Some(name) = self.str(claim).filter(|n| !n.is_empty()) {
                return Ok((name.to_owned(), source));
            }
        }
        match self.appid() {
            Some(appid) => Err(MissingRole::AppOnly {
                appid: appid.to_owned(),
            }),
            None => Err(MissingRole::NoNameClaim),
        }
    }
}

/// Parses an `xms_mirid` ARM resource ID into the identity's role name and whether it is a
/// user-assigned identity.
///
/// `/subscriptions/S/resourcegroups/G/providers/Microsoft.ManagedIdentity/userAssignedIdentities/N`
/// gives `N`; a system-assigned identity's ID is its host resource's,
/// `/subscriptions/S/resourcegroups/G/providers/NS/TYPE/NAME[/CHILDTYPE/CHILDNAME]...`, which
/// gives `NAME[/CHILDTYPE/CHILDNAME]...` (for example `app/slots/staging`).
fn parse_mirid(mirid: &str) -> Option<(String, bool)> {
    let segments: Vec<&str> = mirid.trim_matches('/').split('/').collect();
    let providers = segments
        .iter()
        .position(|s| s.eq_ignore_ascii_case("providers"))?;
    // After "providers": namespace, type, name, then (child type, child name) pairs.
    let rest = &segments[providers + 1..];
    if rest.len() < 3 || rest.len().is_multiple_of(2) || rest.iter().any(|s| s.is_empty()) {
        return None;
    }
    let user_assigned = rest[0].eq_ignore_ascii_case("Microsoft.ManagedIdentity")
        && rest[1].eq_ignore_ascii_case("userAssignedIdentities")
        && rest.len() == 3;
    Some((rest[2..].join("/"), user_assigned))
}

/// The claim a role name was derived from, or how it was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum UsernameSource {
    /// Set explicitly (builder, `PGUSER`, connection string).
    Explicit,
    /// The name of a user-assigned managed identity, from `xms_mirid`.
    UserAssignedIdentity,
    /// The host resource name of a system-assigned managed identity, from `xms_mirid`.
    SystemAssignedIdentity,
    /// The `upn` claim.
    Upn,
    /// The `preferred_username` claim.
    PreferredUsername,
    /// The `unique_name` claim.
    UniqueName,
}

impl UsernameSource {
    /// A short description of the source, for diagnostics.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Explicit => "set explicitly",
            Self::UserAssignedIdentity => "user-assigned managed identity name (xms_mirid)",
            Self::SystemAssignedIdentity => {
                "system-assigned managed identity's resource (xms_mirid)"
            }
            Self::Upn => "upn claim",
            Self::PreferredUsername => "preferred_username claim",
            Self::UniqueName => "unique_name claim",
        }
    }
}

impl fmt::Display for UsernameSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// The kind of principal a token belongs to, as far as its claims tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PrincipalKind {
    /// A member user of the tenant.
    User,
    /// A guest (B2B) user.
    GuestUser,
    /// An application's service principal.
    ServicePrincipal,
    /// A user-assigned managed identity.
    UserAssignedManagedIdentity,
    /// A system-assigned managed identity.
    SystemAssignedManagedIdentity,
}

impl PrincipalKind {
    /// A short description of the kind, for diagnostics.
    ///
    /// ```
    /// use pgentra::claims::PrincipalKind;
    /// assert_eq!(PrincipalKind::GuestUser.describe(), "guest user");
    /// assert_eq!(PrincipalKind::UserAssignedManagedIdentity.to_string(), "user-assigned managed identity");
    /// ```
    pub fn describe(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::GuestUser => "guest user",
            Self::ServicePrincipal => "service principal",
            Self::UserAssignedManagedIdentity => "user-assigned managed identity",
            Self::SystemAssignedManagedIdentity => "system-assigned managed identity",
        }
    }
}

impl fmt::Display for PrincipalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// Why no role name could be derived from a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MissingRole {
    /// A guest user's role is the guest's `#EXT#` UPN in the resource tenant, which the token
    /// does not carry.
    #[error(
        "the token belongs to a guest user (identity provider {}); the role is the guest's #EXT# user principal name in this tenant (like alice_contoso.com#EXT#@fabrikam.onmicrosoft.com), which is not in the token",
        idp.as_deref().unwrap_or("unknown")
    )]
    Guest {
        /// The guest's home identity provider.
        idp: Option<String>,
    },
    /// An app-only token (service principal): its role is the application's display name,
    /// which is not in the token.
    #[error(
        "the token belongs to service principal with application ID {appid}; its role is the application's display name, which is not in the token"
    )]
    AppOnly {
        /// The application (client) ID.
        appid: String,
    },
    /// No claim names the principal.
    #[error("the token has none of the claims xms_mirid, upn, preferred_username, unique_name")]
    NoNameClaim,
}

#[cfg(test)]
mod tests;
