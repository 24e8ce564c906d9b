//! The managed-identity token endpoints, App Service (`/msi/token`) and IMDS
//! (`/metadata/identity/oauth2/token`): their required headers and parameters, the IMDS rate
//! limits, and the choice of identity by `client_id`.

use super::faults::injected_fault;
use super::http::{error, respond};
use super::{Endpoint, State};
use crate::issuer::PrincipalKind;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::HeaderMap;
use hyper::{Response, StatusCode};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The IMDS managed-identity limits: 20 requests a second and 5 at once.
const RATE_PER_SECOND: usize = 20;
pub(super) const MAX_CONCURRENT: usize = 5;

/// A token request to `endpoint` (App Service or IMDS), with its headers and query.
pub(super) async fn token(
    state: &State,
    endpoint: Endpoint,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Response<Full<Bytes>> {
    if let Some(refused) = header_refusal(state, endpoint, headers) {
        return refused;
    }
    let (Some(_), Some(resource)) = (query.get("api-version"), query.get("resource")) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "api-version and resource are required",
        );
    };
    let Ok(_permit) = Arc::clone(&state.concurrent).try_acquire_owned() else {
        return throttle(state);
    };
    if !within_rate(state) {
        return throttle(state);
    }
    if let Some(fault) = injected_fault(state).await {
        return fault;
    }
    let principal = match query.get("client_id") {
        None => &state.default_identity,
        Some(client_id) => match state.identities.get(client_id) {
            Some(principal) if matches!(principal.kind, PrincipalKind::UserAssignedIdentity) => {
                principal
            }
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Identity not found: no user-assigned identity with this client_id is assigned",
                );
            }
        },
    };
    let issued = state.issuer.issue(principal, resource);
    let now = issued.expires_on - state.issuer.lifetime().as_secs();
    respond(
        StatusCode::OK,
        &json!({
            "access_token": issued.token,
            "client_id": principal.client_id,
            "expires_in": (issued.expires_on - now).to_string(),
            "expires_on": issued.expires_on.to_string(),
            "ext_expires_in": (issued.expires_on - now).to_string(),
            "not_before": now.to_string(),
            "resource": resource,
            "token_type": "Bearer",
        }),
    )
}

/// Checks the header each protocol requires (the App Service secret, or IMDS's
/// `Metadata: true`): the error to send when it is missing or wrong, `None` when it is right.
fn header_refusal(
    state: &State,
    endpoint: Endpoint,
    headers: &HeaderMap,
) -> Option<Response<Full<Bytes>>> {
    match endpoint {
        Endpoint::AppService => {
            let given = headers
                .get("x-identity-header")
                .and_then(|v| v.to_str().ok());
            if given != Some(state.header_secret.as_str()) {
                return Some(error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "X-IDENTITY-HEADER is missing or wrong",
                ));
            }
        }
        _ => {
            if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
                return Some(error(
                    StatusCode::BAD_REQUEST,
                    "bad_request_102",
                    "Required metadata header not specified",
                ));
            }
        }
    }
    None
}

fn throttle(state: &State) -> Response<Full<Bytes>> {
    state.throttled.fetch_add(1, Ordering::Relaxed);
    error(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_requests",
        "Too many requests (managed identity limits: 20 per second, 5 at once)",
    )
}

/// Sliding one-second window of accepted token requests.
fn within_rate(state: &State) -> bool {
    let now = Instant::now();
    let mut recent = state.recent.lock();
    while recent
        .front()
        .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
    {
        recent.pop_front();
    }
    if recent.len() >= RATE_PER_SECOND {
        return false;
    }
    recent.push_back(now);
    true
}
