//! The PostgreSQL protocol as the relay reads it, with no I/O and no pool: messages cut out of
//! the bytes as they arrive ([`frames`]), the answers a client is owed ([`owed`]), and a
//! client's prepared statements ([`statements`]) translated onto whichever server connection it
//! holds ([`translate`]). Each is tested from message transcripts, without a server.

pub(crate) mod frames;
pub(crate) mod messages;
pub(crate) mod owed;
pub(crate) mod statements;
pub(crate) mod translate;
