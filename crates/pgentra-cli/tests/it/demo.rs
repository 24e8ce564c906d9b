//! `pgentra demo`, run as a user runs it: its own emulator, the real `ManagedIdentityCredential`,
//! a pool across several short token lifetimes. Needs the PostgreSQL server binaries.

use super::common::{assert_output_has_no_token, bare, stderr, stdout};
use serde_json::Value;
use std::process::Output;

/// `pgentra demo` with an empty environment but `PATH`.
fn demo(args: &[&str]) -> Output {
    bare()
        .arg("demo")
        .args(args)
        .output()
        .expect("run pgentra demo")
}

/// Short enough for CI, long enough for three token lifetimes (the provider refreshes a 3 s
/// token about 1.5 s before it expires, and each connection is retired after 0.75–1.5 s).
const SHORT: [&str; 6] = [
    "--duration",
    "9s",
    "--token-lifetime",
    "3s",
    "--connections",
    "4",
];

/// Succeeded, and no token anywhere.
fn assert_ok_without_token(output: &Output) -> (String, String) {
    let (stdout, stderr) = (stdout(output), stderr(output));
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert_output_has_no_token(output);
    (stdout, stderr)
}

/// The number in the summary row `label` (`  tokens fetched        7`).
fn row(summary: &str, label: &str) -> u64 {
    let line = summary
        .lines()
        .find(|line| line.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} row in:\n{summary}"));
    let value = line.trim_start()[label.len()..]
        .split_whitespace()
        .next()
        .unwrap_or_default();
    value
        .replace(',', "")
        .parse()
        .unwrap_or_else(|_| panic!("{label:?} is not a number in {line:?}"))
}

#[test]
fn keeps_a_pool_logged_in_across_token_lifetimes() {
    let output = demo(&SHORT);
    let (stdout, stderr) = assert_ok_without_token(&output);
    let tokens = row(&stdout, "tokens fetched");
    let connections = row(&stdout, "connections opened");
    assert_eq!(row(&stdout, "failed logins"), 0, "{stdout}");
    assert_eq!(row(&stdout, "failed queries"), 0, "{stdout}");
    assert!(row(&stdout, "queries") > 0, "{stdout}");
    // Three lifetimes need at least three tokens, and the pool logs in more often than the
    // provider fetches: connections share tokens, and keep logging in after refreshes.
    assert!(
        tokens >= 3,
        "{tokens} tokens in 9 s of 3 s tokens:\n{stdout}"
    );
    assert!(
        connections > tokens,
        "{connections} connections for {tokens} tokens:\n{stdout}"
    );
    assert!(stdout.contains("ManagedIdentityCredential"), "{stdout}");
    assert!(stdout.contains("✓"), "{stdout}");
    // Progress and refresh events go to standard error, not as a terminal line.
    assert!(stderr.contains("new token #2"), "{stderr}");
    assert!(!stderr.contains('\r'), "{stderr}");
}

#[test]
fn json_summary_with_debug_logs() {
    let mut args = SHORT.to_vec();
    args.extend(["--json", "-vv"]);
    let output = demo(&args);
    let (stdout, stderr) = assert_ok_without_token(&output);
    // The debug logs are there to be searched for tokens.
    assert!(stderr.contains("DEBUG"), "{stderr}");
    // azure_identity logs the IMDS address; the request itself goes to the emulator.
    for line in stderr.lines().filter(|l| l.contains("performing request")) {
        assert!(line.contains("'http://127.0.0.1:"), "{line}");
    }
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout is one JSON object:\n{stdout}");
    let summary: Value = serde_json::from_str(lines[0]).expect("JSON summary");
    let number = |key: &str| {
        summary[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key}: {summary}"))
    };
    assert_eq!(summary["ok"], true, "{summary}");
    assert_eq!(summary["problems"], serde_json::json!([]), "{summary}");
    assert_eq!(number("failed_logins"), 0, "{summary}");
    assert_eq!(number("gateway_refused"), 0, "{summary}");
    assert_eq!(number("query_failures"), 0, "{summary}");
    assert_eq!(summary["role"], "orders-api-identity", "{summary}");
    assert!(number("tokens_fetched") >= 3, "{summary}");
    assert!(
        number("connections_opened") > number("tokens_fetched"),
        "{summary}"
    );
    let leads = summary["refresh_leads_s"]
        .as_array()
        .expect("refresh leads");
    // One lead per refresh: every token after the first (one more may come as the run ends).
    let refreshes = leads.len() as u64;
    assert!(
        refreshes >= 2 && refreshes < number("tokens_fetched"),
        "{summary}"
    );
    for lead in leads {
        let lead = lead.as_f64().expect("a lead in seconds");
        assert!(
            lead > 0.0 && lead < 3.0,
            "refreshed {lead} s before expiry: {summary}"
        );
    }
}

#[test]
fn bad_flags_and_a_foreign_identity_endpoint_are_refused() {
    for (args, expected) in [
        (&["--token-lifetime", "1s"][..], "--token-lifetime"),
        (&["--connections", "0"], "--connections"),
        (&["--connections", "101"], "--connections"),
        (&["--duration", "0s"], "--duration"),
    ] {
        let output = demo(args);
        let stderr = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("pgentra: ") && stderr.contains(expected),
            "{args:?}: {stderr}"
        );
        assert!(output.stdout.is_empty(), "{args:?}");
    }
    // App Service's variable would take ManagedIdentityCredential away from the emulator.
    let output = bare()
        .env("IDENTITY_ENDPOINT", "http://127.0.0.1:9/msi/token")
        .args(["demo", "--duration", "1s"])
        .output()
        .expect("run pgentra demo");
    let stderr = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("IDENTITY_ENDPOINT"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
