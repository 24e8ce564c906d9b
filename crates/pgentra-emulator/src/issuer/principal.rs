//! The principals the issuer makes tokens for: their kinds, stable IDs, and the name claims
//! (`upn`, `appid`, `xms_mirid`, `tid`, `oid`, ...) each kind's tokens carry.

use serde_json::{Value, json};
use std::hash::{Hash, Hasher};

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
    pub(super) fn tenant_or<'a>(&'a self, issuer: &'a str) -> &'a str {
        self.tenant.as_deref().unwrap_or(issuer)
    }

    pub(super) fn name_claims(&self, tenant: &str, claims: &mut serde_json::Map<String, Value>) {
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
