//! The `az` and `azd` shims: the bash scripts written for `PATH`, and the answers they fetch
//! from the server, printed as `az account get-access-token -o json` and
//! `azd auth token -o json` print them.

use super::faults::injected_fault;
use super::http::{error, respond};
use super::{Endpoint, State, count};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use serde_json::json;
use std::path::Path;

/// The CLI shim: takes `--scope`, asks the emulator over `/dev/tcp`, prints the body on
/// success and fails like the real tool (message on stderr, exit 1) otherwise.
const SHIM: &str = r#"#!/bin/bash
# Written by the pgentra emulator: answers like the real CLI for the emulated signed-in user.
scope=""
while [ $# -gt 0 ]; do
  case "$1" in
    --scope|--resource) scope="$2"; shift ;;
  esac
  shift
done
if ! exec 3<>/dev/tcp/127.0.0.1/@PORT@; then
  echo "ERROR: the pgentra emulator is not running. Please run 'az login' to setup account." >&2
  exit 1
fi
printf 'GET /shim/@ROUTE@?scope=%s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$scope" >&3
status=""
while IFS= read -r line <&3; do
  line="${line%$'\r'}"
  [ -z "$status" ] && status="$line"
  [ -z "$line" ] && break
done
body=""
while IFS= read -r line <&3 || [ -n "$line" ]; do body+="$line"; done
case "$status" in
  *" 200 "*) printf '%s\n' "$body" ;;
  *) printf 'ERROR: %s\n' "$body" >&2; exit 1 ;;
esac
"#;

/// Writes the `az` and `azd` shims into `dir`, asking the server on loopback port `port`.
pub(super) fn write_shims(dir: &Path, port: u16) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    for (name, route) in [("az", "az"), ("azd", "azd")] {
        let script = SHIM
            .replace("@PORT@", &port.to_string())
            .replace("@ROUTE@", route);
        let path = dir.join(name);
        std::fs::write(&path, script)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// What `az account get-access-token -o json` and `azd auth token -o json` print.
pub(super) async fn answer(state: &State, tool: &str, scope: &str) -> Response<Full<Bytes>> {
    let endpoint = match tool {
        "az" => Endpoint::AzureCli,
        "azd" => Endpoint::AzureDeveloperCli,
        _ => return error(StatusCode::NOT_FOUND, "not_found", "unknown tool"),
    };
    count(state, endpoint);
    if scope.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "--scope is required",
        );
    }
    if let Some(fault) = injected_fault(state).await {
        return fault;
    }
    let issued = state.issuer.issue(&state.cli_user, scope);
    let expires = time::OffsetDateTime::from_unix_timestamp(issued.expires_on as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let body = if endpoint == Endpoint::AzureCli {
        // `expiresOn` is a deprecated local-time string; `expires_on` is what clients read.
        let expires_on_local = expires
            .format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:6]"
            ))
            .unwrap_or_default();
        json!({
            "accessToken": issued.token,
            "expiresOn": expires_on_local,
            "expires_on": issued.expires_on,
            "subscription": "00000000-0000-0000-0000-000000000000",
            "tenant": state.issuer.tenant(),
            "tokenType": "Bearer",
        })
    } else {
        let rfc3339 = expires
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        json!({"token": issued.token, "expiresOn": rfc3339})
    };
    respond(StatusCode::OK, &body)
}
