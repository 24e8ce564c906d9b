//! Fixtures shared by the test modules.
#![allow(dead_code)]

use pgentra_emulator::Emulator;
use std::process::{Command, Output};

/// `pgentra` with an empty environment but `PATH`: no inherited Azure, identity or libpq
/// settings, so nothing can reach a real identity endpoint.
pub(crate) fn bare() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pgentra"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    command
}

/// The emulator's environment, with its `az` as the only credential.
pub(crate) fn emulator_env(emulator: &Emulator) -> Vec<(String, String)> {
    let mut env = emulator.env();
    env.push((
        "AZURE_TOKEN_CREDENTIALS".into(),
        "AzureCliCredential".into(),
    ));
    env
}

pub(crate) fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub(crate) fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Every JWT starts with `eyJ` (`{"` in base64url).
pub(crate) fn assert_no_token(text: &str, place: &str) {
    assert!(
        !text.contains("eyJ"),
        "a token was printed on {place}:\n{text}"
    );
}

/// Neither output stream holds a token.
pub(crate) fn assert_output_has_no_token(output: &Output) {
    assert_no_token(&stdout(output), "stdout");
    assert_no_token(&stderr(output), "stderr");
}
