//! The proxy in process, against the emulator: psql, tokio-postgres and raw sockets through
//! it. One test binary; each module is one concern, and `support` holds what they share.

mod access;
mod admin;
mod cancel;
mod frameworks;
mod isolation;
mod large;
mod leaving;
mod pooling;
mod refusals;
mod sessions;
mod support;
mod timeouts;
mod transactions;
