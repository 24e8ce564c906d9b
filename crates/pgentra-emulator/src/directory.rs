//! The emulated tenant's directory: the principals Entra ID knows and its groups. Azure's
//! `pgaadauth_create_principal` looks names up in the directory; the gateway asks it whether a
//! token's principal belongs to a group role's group.

use crate::issuer::{Principal, stable_id};

/// An Entra group, with the object IDs of its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// The display name (a group role has it as its name).
    pub name: String,
    /// The group's object ID (stable, derived from the name).
    pub oid: String,
    /// The members' object IDs.
    pub members: Vec<String>,
}

impl Group {
    /// A group named `name` with `members`.
    pub fn new<'a>(name: &str, members: impl IntoIterator<Item = &'a Principal>) -> Self {
        Self {
            name: name.to_owned(),
            oid: stable_id("group-oid", name),
            members: members.into_iter().map(|m| m.oid.clone()).collect(),
        }
    }
}

/// Everything the tenant's directory holds.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    /// Users, service principals and managed identities, with a role or not.
    pub principals: Vec<Principal>,
    /// Groups.
    pub groups: Vec<Group>,
}

/// A directory object as `pgaadauth_create_principal` finds it: its display name, object ID
/// and Azure's object type (`user`, `group` or `service`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryObject {
    /// The display name (a user's UPN).
    pub name: String,
    /// The object ID.
    pub oid: String,
    /// `user`, `group` or `service`.
    pub object_type: &'static str,
}

impl Directory {
    /// Whether the principal with object ID `member` belongs to the group `group`.
    pub fn is_member(&self, group: &str, member: &str) -> bool {
        self.groups
            .iter()
            .any(|g| g.oid == group && g.members.iter().any(|m| m == member))
    }

    /// Every object, as `pgaadauth_create_principal` sees them.
    pub fn objects(&self) -> Vec<DirectoryObject> {
        let principals = self.principals.iter().map(|p| DirectoryObject {
            name: p.role.clone(),
            oid: p.oid.clone(),
            object_type: if p.is_app() { "service" } else { "user" },
        });
        let groups = self.groups.iter().map(|g| DirectoryObject {
            name: g.name.clone(),
            oid: g.oid.clone(),
            object_type: "group",
        });
        principals.chain(groups).collect()
    }
}
