//! The `pgentra` command run as a user runs it, against the emulator: one test binary, each
//! module one subcommand (or a group of them), `common` the fixtures they share.

mod check;
mod cli;
mod common;
#[cfg(feature = "emulator")]
mod demo;
mod proxy;
