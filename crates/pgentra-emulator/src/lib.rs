//! A local stand-in for Microsoft Entra ID and for Azure Database for PostgreSQL's token check,
//! in front of a real PostgreSQL, so that token refresh and expiry can be tested for real.
//!
//! This crate is being built up; today it holds the throwaway PostgreSQL cluster
//! ([`backend::Cluster`]) and the token issuer ([`issuer::Issuer`]).

pub mod backend;
pub mod ca;
mod emulator;
pub mod gateway;
pub mod identity;
pub mod issuer;

pub use emulator::{
    CLIENT_SECRET, Emulator, EmulatorConfig, EmulatorError, MANAGED_IDENTITY, USER,
};
