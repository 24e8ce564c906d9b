//! The emulator's parts, run as their users run them: one test binary, each module one part
//! (the throwaway cluster's TLS, the default chain in child processes, an external backend, the
//! gateway, the identity endpoints).

mod backend_tls;
mod chain;
mod external_backend;
mod gateway;
mod identity;
