//! A local stand-in for Microsoft Entra ID and for Azure Database for PostgreSQL's token check,
//! in front of a real PostgreSQL, so that token refresh and expiry can be tested for real, on
//! any machine.
//!
//! - [`issuer`]: an RSA key made at start; RS256 JWTs shaped like Entra's v1 access tokens for
//!   users, guests, service principals and user- or system-assigned managed identities.
//! - [`identity`]: the token endpoints the real `azure_identity` credentials call, unchanged:
//!   App Service and IMDS managed identity (with IMDS's rate limits), OAuth2 client
//!   credentials over HTTPS, `az`/`azd` shims; fault injection and request counters.
//! - [`gateway`]: a PostgreSQL-protocol server that validates tokens like Azure (TLS required,
//!   cleartext password, signature, tenant, audience, expiry, principal ↔ role) and relays to
//!   the backend as the role.
//! - [`backend`]: a throwaway PostgreSQL cluster from the machine's server binaries, set up as
//!   Azure's: an Entra administrator in `azure_pg_admin`, and `pgaadauth_create_principal`,
//!   `pgaadauth_create_principal_with_oid` and `pgaadauth_list_principals` in the `postgres`
//!   database, whose roles the gateway accepts at once.
//! - [`directory`]: the tenant's principals (with a role or not) and groups.
//! - [`testing`]: fixtures such as a server that counts the passwords it is sent.
//! - [`Emulator`]: all of the above in one line, once per test binary with
//!   [`Emulator::shared`].
//!
//! # In your tests
//!
//! ```no_run
//! use pgentra_emulator::{Emulator, USER};
//! let emulator = Emulator::shared();
//! // Point an application at it: PGHOST, PGPORT, PGSSLROOTCERT, IDENTITY_ENDPOINT, ...
//! let env = emulator.env();
//! // Or mint tokens directly, for a client that takes a password.
//! let token = emulator.token_for(&pgentra_emulator::issuer::Principal::user(USER));
//! # let _ = (env, token);
//! ```
//!
//! The emulator is for tests only: its CA key and token-signing key live in memory, anyone on
//! the machine can ask its endpoints for tokens, and its backend trusts local connections.

pub mod backend;
mod background;
pub mod ca;
pub mod directory;
mod emulator;
pub mod gateway;
pub mod identity;
pub mod issuer;
mod provision;
pub mod testing;

pub use emulator::{
    CLIENT_SECRET, Emulator, EmulatorConfig, EmulatorError, IDENTITY_WITHOUT_ROLE,
    MANAGED_IDENTITY, USER,
};
