//! `pgentra inspect`: decode a token offline.

use crate::Context;
use crate::error::CliError;
use crate::output::outln;
use crate::output::{print_json, relative, timestamp};
use pgentra::Cloud;
use pgentra::claims::Claims;
use pgentra::clock::from_unix_seconds;
use serde_json::{Value, json};
use std::io::{IsTerminal as _, Read as _};
use std::process::ExitCode;
use std::time::SystemTime;

/// Longest input read from standard input; Entra tokens are a few kilobytes.
const MAX_INPUT: u64 = 1 << 20;

/// Decodes a token's claims without verifying its signature (that needs the issuer's keys,
/// which the server checks) and shows the role pgentra would log in as.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The token; `-` or nothing reads it from standard input. A `Bearer ` prefix and the JSON
    /// of `az account get-access-token` are accepted too.
    token: Option<String>,
}

pub(crate) fn run(args: &Args, context: Context) -> Result<ExitCode, CliError> {
    let input = match args.token.as_deref() {
        Some(token) if token != "-" => token.to_owned(),
        _ => read_stdin()?,
    };
    let token = extract_token(&input)?;
    let claims = Claims::decode(&token)?;
    let header = decode_header(&token);
    let role = claims.role_name();
    let kind = claims.principal_kind().describe();
    let audience = claims
        .audiences()
        .iter()
        .find_map(|audience| Cloud::from_audience(audience))
        .and_then(|cloud| cloud.name());
    let expired = claims
        .exp()
        .is_some_and(|exp| from_unix_seconds(exp) <= SystemTime::now());

    if context.json {
        let (role, source, role_error) = match &role {
            Ok((role, source)) => (Some(role.as_str()), Some(source.describe()), None),
            Err(missing) => (None, None, Some(missing.to_string())),
        };
        print_json(&json!({
            "signature_verified": false,
            "header": header,
            "claims": claims.as_map(),
            "principal": kind,
            "role": role,
            "role_source": source,
            "role_error": role_error,
            "database_audience": audience,
            "expired": expired,
        }));
        return Ok(ExitCode::SUCCESS);
    }

    let style = context.style;
    let row = |name: &str, value: &str| outln!("{}  {value}", style.dim(&format!("{name:<10}")));
    row(
        "signature",
        "not verified (decoded offline; the server checks it)",
    );
    if let Some(Value::Object(header)) = &header {
        let field = |name: &str| printable(header.get(name).and_then(Value::as_str).unwrap_or("-"));
        row(
            "header",
            &format!("alg {}, kid {}", field("alg"), field("kid")),
        );
    }
    row("principal", kind);
    match &role {
        Ok((role, source)) => row(
            "role",
            &format!("{} ({source})", style.bold(&printable(role))),
        ),
        Err(missing) => row("role", &style.bad(&printable(&format!("none: {missing}")))),
    }
    let audiences = printable(&claims.audiences().join(", ")).into_owned();
    match audience {
        Some(cloud) => row(
            "audience",
            &format!("{audiences} (database, {cloud} cloud)"),
        ),
        None => row(
            "audience",
            &style.bad(&format!(
                "{audiences} (not a database audience: get a token for {})",
                Cloud::Public.scope()
            )),
        ),
    }
    for (name, value) in [
        ("issued", claims.iat()),
        ("not before", claims.nbf()),
        ("expires", claims.exp()),
    ] {
        if let Some(seconds) = value {
            let time = from_unix_seconds(seconds);
            let text = format!("{} ({})", timestamp(time), relative(time));
            let expired_now = name == "expires" && expired;
            row(
                name,
                &if expired_now {
                    style.bad(&format!("{text}, expired"))
                } else {
                    text
                },
            );
        }
    }
    outln!("{}", style.dim("claims"));
    for (name, value) in claims.as_map() {
        outln!(
            "  {:<20} {}",
            printable(name),
            printable(&value.to_string())
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `text` with control characters (ESC, and the C1 controls some terminals take for it) and
/// bidirectional overrides escaped, so a token's claims cannot drive the terminal or disguise
/// what is printed.
fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let hostile =
        |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !text.chars().any(hostile) {
        return std::borrow::Cow::Borrowed(text);
    }
    text.chars()
        .map(|c| {
            if hostile(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

fn read_stdin() -> Result<String, CliError> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Err(CliError::Usage(
            "give a token as an argument, or pipe one in: `pgentra token | pgentra inspect`".into(),
        ));
    }
    let mut bytes = Vec::new();
    stdin
        .lock()
        .take(MAX_INPUT + 1)
        .read_to_end(&mut bytes)
        .map_err(CliError::io("reading the token from standard input"))?;
    if bytes.len() as u64 > MAX_INPUT {
        return Err(CliError::Usage(format!(
            "the input is larger than {} KiB; a token is a few KiB",
            MAX_INPUT / 1024
        )));
    }
    String::from_utf8(bytes).map_err(|_| CliError::Usage("the input is not UTF-8 text".into()))
}

/// The token in `input`: trimmed, without a `Bearer ` prefix, or taken out of the JSON that
/// `az account get-access-token` and `pgentra token --json` print.
fn extract_token(input: &str) -> Result<String, CliError> {
    let input = input.trim();
    if input.starts_with('{') {
        let value: Value = serde_json::from_str(input).map_err(|error| {
            CliError::Usage(format!(
                "the input looks like JSON but is not valid JSON (line {}, column {})",
                error.line(),
                error.column()
            ))
        })?;
        return ["accessToken", "access_token", "token"]
            .iter()
            .find_map(|key| value.get(key).and_then(Value::as_str))
            .map(|token| token.trim().to_owned())
            .ok_or_else(|| {
                CliError::Usage("the JSON has no accessToken, access_token or token field".into())
            });
    }
    let token = input
        .strip_prefix("Bearer ")
        .or_else(|| input.strip_prefix("bearer "))
        .unwrap_or(input);
    Ok(token.trim().to_owned())
}

/// The JOSE header, if it is readable JSON (it is informational only).
fn decode_header(token: &str) -> Option<Value> {
    serde_json::from_slice(&pgentra::claims::decode_segment(token.split('.').next()?)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_taken_out_of_what_people_paste() {
        assert_eq!(extract_token("  a.b.c\n").unwrap(), "a.b.c");
        assert_eq!(extract_token("Bearer a.b.c").unwrap(), "a.b.c");
        assert_eq!(
            extract_token(r#"{"accessToken": "a.b.c", "expiresOn": "x"}"#).unwrap(),
            "a.b.c"
        );
        assert!(matches!(
            extract_token(r#"{"nothing": 1}"#),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(extract_token("{oops"), Err(CliError::Usage(_))));
    }

    #[test]
    fn claims_cannot_drive_the_terminal() {
        assert_eq!(printable("alice@contoso.com"), "alice@contoso.com");
        assert_eq!(printable("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(printable("x\u{9b}31m"), "x\\u{9b}31m");
        assert_eq!(printable("evil\u{202e}gpj.exe"), "evil\\u{202e}gpj.exe");
        assert_eq!(printable("tab\there"), "tab\\u{9}here");
    }

    #[test]
    fn times_outside_the_range_do_not_panic() {
        assert_eq!(from_unix_seconds(-5), std::time::UNIX_EPOCH);
        assert_eq!(
            timestamp(from_unix_seconds(i64::MAX)),
            "9999-12-31T23:59:59Z"
        );
    }
}
