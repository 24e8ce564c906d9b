//! `pgentra check` against the emulator: every step passing, and the specific hint for each
//! known failure (role missing, expired token, untrusted certificate, nothing listening),
//! with exit codes, and never a token in the output.

use super::common::{assert_output_has_no_token, bare, emulator_env, stderr, stdout};
use pgentra_emulator::issuer::Principal;
use pgentra_emulator::{Emulator, EmulatorConfig, USER};
use serde_json::Value;
use std::process::Output;
use std::time::Duration;

const STEPS: [&str; 8] = [
    "settings", "dns", "tcp", "tls", "token", "role", "login", "query",
];

/// `pgentra -vv check` with only `PATH` and `extra` in its environment (no inherited Azure or
/// libpq settings, so nothing reaches a real identity endpoint).
fn check(extra: &[(String, String)], args: &[&str]) -> Output {
    bare()
        .envs(extra.iter().map(|(k, v)| (k, v)))
        .args(["-vv", "check"])
        .args(args)
        .output()
        .expect("run pgentra")
}

/// The line of `step` in the text report.
fn line<'a>(out: &'a str, step: &str) -> &'a str {
    out.lines()
        .find(|l| {
            let mut words = l.split_whitespace();
            matches!(words.next(), Some("✓" | "✗" | "-")) && words.next() == Some(step)
        })
        .unwrap_or_else(|| panic!("no {step} line in:\n{out}"))
}

/// Asserts a failed check: exit code 1, ✓ up to `step`, ✗ there with a hint containing each of
/// `hint`, the rest skipped, and one error line on stderr. Returns stdout.
fn assert_fails_at(output: &Output, step: &str, hint: &[&str]) -> String {
    let out = stdout(output);
    assert_eq!(output.status.code(), Some(1), "{out}\n{}", stderr(output));
    let failed = STEPS.iter().position(|s| *s == step).unwrap();
    for (index, name) in STEPS.iter().enumerate() {
        let mark = match index.cmp(&failed) {
            std::cmp::Ordering::Less => "✓",
            std::cmp::Ordering::Equal => "✗",
            std::cmp::Ordering::Greater => "-",
        };
        let l = line(&out, name);
        assert!(l.starts_with(mark), "{name} should be {mark}:\n{out}");
        if mark == "-" {
            assert!(l.ends_with("skipped"), "{out}");
        }
    }
    let hint_line = out
        .lines()
        .find(|l| l.trim_start().starts_with("hint: "))
        .unwrap_or_else(|| panic!("no hint in:\n{out}"));
    for part in hint {
        assert!(hint_line.contains(part), "hint lacks {part:?}:\n{out}");
    }
    let err = stderr(output);
    assert!(
        err.lines()
            .any(|l| l.starts_with(&format!("pgentra: check failed at the {step} step"))),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_output_has_no_token(output);
    out
}

#[test]
fn every_step_passes_against_the_emulator() {
    let emulator = Emulator::shared();
    let output = check(&emulator_env(emulator), &[]);
    let out = stdout(&output);
    assert!(output.status.success(), "{out}\n{}", stderr(&output));
    assert_output_has_no_token(&output);
    for step in STEPS {
        assert!(line(&out, step).starts_with('✓'), "{step}:\n{out}");
    }
    assert!(line(&out, "tls").contains("TLS 1."), "{out}");
    assert!(line(&out, "token").contains("AzureCliCredential"), "{out}");
    assert!(
        line(&out, "token").contains(emulator.issuer().tenant()),
        "{out}"
    );
    assert!(line(&out, "role").contains("upn claim"), "{out}");
    let query = line(&out, "query");
    assert!(query.contains(&format!("logged in as {USER}")), "{out}");
    assert!(query.contains("PostgreSQL"), "{out}");
    assert!(!out.contains("hint:"), "{out}");
}

#[test]
fn json_has_every_step() {
    let emulator = Emulator::shared();
    // A connection string over the environment: its port wins over PGPORT.
    let mut env = emulator_env(emulator);
    env.retain(|(k, _)| k != "PGPORT");
    let url = format!(
        "postgres://localhost:{}/postgres",
        emulator.gateway().port()
    );
    let output = check(&env, &["--json", &url]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_output_has_no_token(&output);
    let report: Value = serde_json::from_str(&stdout(&output)).expect("one JSON object");
    assert_eq!(report["ok"], true, "{report}");
    let steps = report["steps"].as_array().unwrap();
    assert_eq!(steps.len(), STEPS.len(), "{report}");
    for (step, name) in steps.iter().zip(STEPS) {
        assert_eq!(step["step"], name, "{report}");
        assert_eq!(step["status"], "ok", "{report}");
        assert!(step["detail"].as_str().is_some_and(|d| !d.is_empty()));
        assert!(step["hint"].is_null(), "{report}");
    }
    assert!(steps[7]["detail"].as_str().unwrap().contains(USER));
}

#[test]
fn a_principal_without_a_role_is_told_how_to_create_it() {
    let stranger = Principal::user("mallory@contoso.com");
    let emulator = Emulator::shared()
        .beside(EmulatorConfig {
            cli_user: stranger.clone(),
            ..EmulatorConfig::default()
        })
        .expect("start the emulator");
    let output = check(&emulator_env(&emulator), &[]);
    let out = assert_fails_at(
        &output,
        "login",
        &[
            "pgaadauth_create_principal('mallory@contoso.com', false, false)",
            &stranger.oid,
        ],
    );
    assert!(
        line(&out, "login").contains("password authentication failed"),
        "{out}"
    );

    let output = check(&emulator_env(&emulator), &["--json"]);
    assert_eq!(output.status.code(), Some(1));
    assert_output_has_no_token(&output);
    let report: Value = serde_json::from_str(&stdout(&output)).expect("one JSON object");
    assert_eq!(report["ok"], false);
    let statuses: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["ok", "ok", "ok", "ok", "ok", "ok", "failed", "skipped"]
    );
    assert!(
        report["steps"][6]["hint"]
            .as_str()
            .unwrap()
            .contains("pgaadauth_create_principal")
    );
}

#[test]
fn an_expired_token_gets_the_clock_hint() {
    // One-second tokens, with `expires_on` in whole seconds: always under the one second of
    // life the provider requires.
    let emulator = Emulator::shared()
        .beside(EmulatorConfig {
            token_lifetime: Duration::from_secs(1),
            ..EmulatorConfig::default()
        })
        .expect("start the emulator");
    let output = check(&emulator_env(&emulator), &[]);
    let out = assert_fails_at(&output, "token", &["already expired", "az login", "clock"]);
    assert!(line(&out, "token").contains("AzureCliCredential"), "{out}");
}

#[test]
fn an_untrusted_certificate_gets_the_root_certificate_hint() {
    let emulator = Emulator::shared();
    let mut env = emulator_env(emulator);
    env.retain(|(k, _)| k != "PGSSLROOTCERT" && k != "SSL_CERT_FILE");
    let output = check(&env, &[]);
    let out = assert_fails_at(
        &output,
        "tls",
        &["not trusted", "PGSSLROOTCERT", "DigiCert Global Root G2"],
    );
    assert!(line(&out, "tls").contains("UnknownIssuer"), "{out}");
}

#[test]
fn nothing_listening_gets_the_port_hint() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let conninfo = format!("host=127.0.0.1 port={port}");
    let output = check(&[], &[&conninfo]);
    assert_fails_at(
        &output,
        "tcp",
        &[&format!("nothing is listening on 127.0.0.1:{port}")],
    );
}

#[test]
fn no_host_fails_the_settings_step() {
    let output = check(&[], &["dbname=app"]);
    assert_fails_at(&output, "settings", &["PGHOST"]);
}

#[test]
fn a_token_from_another_tenant_gets_the_tenant_hint() {
    let other = "11111111-2222-3333-4444-555555555555";
    let emulator = Emulator::shared()
        .beside(EmulatorConfig {
            cli_user: Principal::user(USER).in_tenant(other),
            ..EmulatorConfig::default()
        })
        .expect("start the emulator");
    let output = check(&emulator_env(&emulator), &[]);
    let out = assert_fails_at(
        &output,
        "login",
        &[&format!("tenant {other}"), "az login --tenant"],
    );
    assert!(
        line(&out, "login").contains("An error occurred while validating the access token"),
        "{out}"
    );
}
