//! Faults injected into the token endpoints: failures with a chosen status, latency, hanging.

use super::State;
use super::http::error;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use std::time::Duration;

/// Faults to inject into the token endpoints.
#[derive(Debug, Clone, Default)]
pub(super) struct Faults {
    /// Fail this many of the next token requests with `fail_status`.
    pub(super) fail_next: u32,
    pub(super) fail_status: u16,
    /// Delay every token response by this much.
    pub(super) latency: Duration,
    /// Never answer token requests.
    pub(super) hang: bool,
}

/// Applies the injected faults to one token request: hangs, delays, or returns the failure to
/// send (counting it down); `None` when the request should be answered normally.
pub(super) async fn injected_fault(state: &State) -> Option<Response<Full<Bytes>>> {
    let faults = {
        let mut faults = state.faults.lock();
        let snapshot = faults.clone();
        faults.fail_next = faults.fail_next.saturating_sub(1);
        snapshot
    };
    if faults.hang {
        std::future::pending::<()>().await;
    }
    if !faults.latency.is_zero() {
        tokio::time::sleep(faults.latency).await;
    }
    if faults.fail_next == 0 {
        return None;
    }
    let status =
        StatusCode::from_u16(faults.fail_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Some(error(
        status,
        "injected_fault",
        &format!("fault injected by the pgentra emulator (HTTP {status})"),
    ))
}
