//! The OAuth2 client-credentials endpoint, `POST /{tenant}/oauth2/v2.0/token`, for service
//! principals and their secrets, answering (and failing) as Entra ID does.

use super::State;
use super::faults::injected_fault;
use super::http::respond;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use std::collections::HashMap;

/// Largest form body the OAuth2 endpoint reads.
const MAX_FORM: usize = 64 * 1024;

/// The OAuth2 client-credentials grant, answered as Entra ID does.
pub(super) async fn client_credentials(
    state: &State,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt as _;
    let body = match http_body_util::Limited::new(request.into_body(), MAX_FORM)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return entra_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900144,
                "The request body is too large or unreadable.",
            );
        }
    };
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        );
    }
    let Some(scope) = form.get("scope") else {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'scope'.",
        );
    };
    let client_id = form
        .get("client_id")
        .map(String::as_str)
        .unwrap_or_default();
    let Some((principal, secret)) = state.service_principals.get(client_id) else {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            "Application was not found in the directory.",
        );
    };
    if form.get("client_secret") != Some(secret) {
        return entra_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            "Invalid client secret provided.",
        );
    }
    if let Some(fault) = injected_fault(state).await {
        return fault;
    }
    let issued = state.issuer.issue(principal, scope);
    let expires_in = state.issuer.lifetime().as_secs();
    respond(
        StatusCode::OK,
        &json!({
            "token_type": "Bearer",
            "expires_in": expires_in,
            "ext_expires_in": expires_in,
            "access_token": issued.token,
        }),
    )
}

/// An error as Entra ID sends it: the OAuth2 `error`, and the `AADSTS` code in the description
/// and in `error_codes`.
fn entra_error(
    status: StatusCode,
    code: &str,
    aadsts: u32,
    description: &str,
) -> Response<Full<Bytes>> {
    respond(
        status,
        &json!({
            "error": code,
            "error_description": format!("AADSTS{aadsts}: {description}"),
            "error_codes": [aadsts],
        }),
    )
}
