//! `pgentra token`, `whoami`, `inspect`, `env`, `exec`, `psql` and `emulator`, run as a user
//! runs them, against the emulator with the real `azure_identity` credentials.

use super::common::{assert_output_has_no_token, bare, emulator_env, stderr, stdout};
use base64::Engine as _;
use pgentra_emulator::issuer::Principal;
use pgentra_emulator::{Emulator, MANAGED_IDENTITY, USER};
use serde_json::Value;
use std::io::Write as _;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `pgentra` with only the emulator's environment (no inherited Azure or libpq settings), its
/// `az` as the credential.
fn pgentra(emulator: &Emulator) -> Command {
    let mut command = bare();
    command.envs(emulator_env(emulator));
    command
}

fn run(command: &mut Command) -> Output {
    command.output().expect("run pgentra")
}

/// A failed command: the given exit code and one `pgentra: ...` line on stderr.
fn assert_one_line_error(output: &Output, code: i32) -> String {
    assert_eq!(output.status.code(), Some(code), "{}", stderr(output));
    let err = stderr(output);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{err}");
    assert!(lines[0].starts_with("pgentra: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    lines[0].to_owned()
}

fn json(output: &Output) -> Value {
    assert!(output.status.success(), "{}", stderr(output));
    serde_json::from_str(&stdout(output)).expect("one JSON object on stdout")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn token_prints_a_database_token_the_gateway_accepts() {
    let emulator = Emulator::shared();
    let output = run(pgentra(emulator).arg("token"));
    assert!(output.status.success(), "{}", stderr(&output));
    let out = stdout(&output);
    let token = out.trim_end();
    assert_eq!(out.lines().count(), 1);
    let claims = emulator
        .issuer()
        .verify(token, &emulator.config().audience, Duration::ZERO)
        .expect("a valid database token");
    assert_eq!(claims.str("upn"), Some(USER));

    let value = json(&run(pgentra(emulator).args(["token", "--json"])));
    assert_eq!(value["user"], USER);
    let expires_on = value["expires_on"].as_u64().unwrap();
    assert!(expires_on > now() && expires_on <= now() + 3600 + 5);
    assert!(value["token"].as_str().unwrap().starts_with("eyJ"));

    // --user pins the role; --scope changes the audience.
    let value = json(&run(pgentra(emulator).args([
        "token",
        "--json",
        "--user",
        "readers",
        "--scope",
        "https://other.example/.default",
    ])));
    assert_eq!(value["user"], "readers");
    let token = value["token"].as_str().unwrap();
    let aud = emulator
        .issuer()
        .verify(token, "https://other.example", Duration::ZERO)
        .expect("a token for the other audience");
    assert_eq!(aud.str("upn"), Some(USER));
}

#[test]
fn whoami_names_the_credential_principal_and_role_without_the_token() {
    let emulator = Emulator::shared();
    let output = run(pgentra(emulator).args(["whoami", "-vv"]));
    assert!(output.status.success(), "{}", stderr(&output));
    assert_output_has_no_token(&output);
    let out = stdout(&output);
    for expected in [
        "AzureCliCredential",
        "user",
        &format!("{USER} (upn claim)"),
        emulator.issuer().tenant(),
        "https://ossrdbms-aad.database.windows.net/.default",
        "expires",
    ] {
        assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
    }

    // The managed identity, through the App Service endpoint the emulator's env points at.
    let output = run(pgentra(emulator).args([
        "whoami",
        "--json",
        "--credential",
        "ManagedIdentityCredential",
    ]));
    assert_output_has_no_token(&output);
    let value = json(&output);
    assert_eq!(value["credential"], "ManagedIdentityCredential");
    assert_eq!(value["principal"], "user-assigned managed identity");
    assert_eq!(value["role"], MANAGED_IDENTITY);
    assert_eq!(
        value["role_source"],
        "user-assigned managed identity name (xms_mirid)"
    );
    assert_eq!(value["tenant_id"], emulator.issuer().tenant());
}

#[test]
fn failures_are_one_line_errors_without_the_token() {
    // No `az` on PATH: the CLI credential fails, with its reason.
    let output = run(bare()
        .env("AZURE_TOKEN_CREDENTIALS", "AzureCliCredential")
        .env("PATH", "/nonexistent")
        .args(["whoami"]));
    let line = assert_one_line_error(&output, 1);
    assert!(line.contains("AzureCliCredential"), "{line}");

    // An unknown credential name.
    let output = run(bare().args(["token", "--credential", "NoSuchCredential"]));
    let line = assert_one_line_error(&output, 1);
    assert!(line.contains("NoSuchCredential"), "{line}");

    // Bad flags are clap's usage errors (exit 2).
    let output = run(bare().args(["token", "--timeout", "soon"]));
    assert_eq!(output.status.code(), Some(2));
}

fn inspect(input: &str) -> Output {
    let mut child = bare()
        .args(["inspect", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The child may stop reading early (oversized input), so a write error is fine.
    let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
    child.wait_with_output().unwrap()
}

#[test]
fn inspect_decodes_tokens_offline_and_derives_the_role() {
    let emulator = Emulator::shared();
    let token = emulator
        .token_for(&Principal::user_assigned_identity("inventory-mi"))
        .token;
    let output = run(bare().args(["inspect", &token]));
    assert!(output.status.success(), "{}", stderr(&output));
    let out = stdout(&output);
    for expected in [
        "not verified",
        "user-assigned managed identity",
        "inventory-mi (user-assigned managed identity name (xms_mirid))",
        "(database, public cloud)",
        "xms_mirid",
        "alg RS256",
    ] {
        assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
    }

    // From stdin, as `az account get-access-token` prints it, as JSON.
    let az = format!(r#"{{"accessToken": "{token}", "expiresOn": "2030-01-01"}}"#);
    let mut child = bare()
        .args(["--json", "inspect"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(az.as_bytes())
        .unwrap();
    let value = json(&child.wait_with_output().unwrap());
    assert_eq!(value["signature_verified"], false);
    assert_eq!(value["role"], "inventory-mi");
    assert_eq!(value["expired"], false);
    assert_eq!(value["database_audience"], "public");
    assert_eq!(value["claims"]["tid"], emulator.issuer().tenant());

    // A guest's role is not in the token: said, not guessed.
    let guest = emulator
        .token_for(&Principal::guest(
            "bob_fabrikam.com#EXT#@contoso.onmicrosoft.com",
            "bob@fabrikam.com",
        ))
        .token;
    let value = json(&run(bare().args(["--json", "inspect", &guest])));
    assert_eq!(value["role"], Value::Null);
    assert!(
        value["role_error"].as_str().unwrap().contains("guest"),
        "{value}"
    );

    // An expired token is decoded and marked expired.
    let old = emulator
        .issuer()
        .issue_at(
            &Principal::user(USER),
            &emulator.config().audience,
            now() - 7200,
        )
        .token;
    let output = run(bare().args(["inspect", &format!("Bearer {old}")]));
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("expired"), "{}", stdout(&output));
    let value = json(&run(bare().args(["--json", "inspect", &old])));
    assert_eq!(value["expired"], true);
}

#[test]
fn inspect_refuses_malformed_tokens_with_exit_code_2() {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let with_payload = |payload: &[u8]| format!("e30.{}.c2ln", b64(payload));
    let cases: Vec<(&str, String)> = vec![
        ("empty", String::new()),
        ("blank", "  \n\t ".into()),
        ("one segment", "notatoken".into()),
        ("two segments", "e30.e30".into()),
        ("four segments", "e30.e30.c2ln.extra".into()),
        ("encrypted JWE", "a.b.c.d.e".into()),
        ("bad base64", "e30.!!!not-base64!!!.c2ln".into()),
        ("payload not UTF-8", with_payload(&[0xff, 0xfe, 0xfd])),
        ("payload not JSON", with_payload(b"hello")),
        ("payload a JSON array", with_payload(b"[1, 2]")),
        ("exp not a number", with_payload(br#"{"exp": "soon"}"#)),
        ("oid not a string", with_payload(br#"{"oid": 42}"#)),
        (
            "JSON without a token",
            r#"{"expiresOn": "2030-01-01"}"#.into(),
        ),
        ("broken JSON", r#"{"accessToken": "#.into()),
        ("oversized input", "a".repeat(2 << 20)),
    ];
    for (kind, input) in &cases {
        let output = inspect(input);
        let line = assert_one_line_error(&output, 2);
        assert!(stdout(&output).is_empty(), "{kind}: {}", stdout(&output));
        // The input is never echoed back.
        if input.len() > 8 {
            assert!(!line.contains(input.as_str()), "{kind}: {line}");
        }
    }
}

#[test]
fn env_prints_exports_a_shell_can_eval_to_log_in() {
    let emulator = Emulator::shared();
    let output = run(pgentra(emulator).args(["env"]));
    assert!(output.status.success(), "{}", stderr(&output));
    let out = stdout(&output);
    for name in [
        "PGHOST",
        "PGPORT",
        "PGDATABASE",
        "PGUSER",
        "PGPASSWORD",
        "PGSSLMODE",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("export {name}='"))),
            "{name} missing from:\n{out}"
        );
    }
    assert!(out.contains(&format!("export PGUSER='{USER}'")), "{out}");

    // The shell way: eval, then psql.
    let script = format!(
        "eval \"$('{}' env)\" && psql -X -A -t -c 'SELECT current_user'",
        env!("CARGO_BIN_EXE_pgentra")
    );
    let psql = Command::new("sh")
        .args(["-c", &script])
        .env_clear()
        .envs(emulator.env())
        .env("AZURE_TOKEN_CREDENTIALS", "AzureCliCredential")
        .output()
        .unwrap();
    assert_eq!(stdout(&psql).trim(), USER, "{}", stderr(&psql));

    let fish = stdout(&run(pgentra(emulator).args(["env", "--shell", "fish"])));
    assert!(fish.contains(&format!("set -gx PGUSER '{USER}'")), "{fish}");
    let powershell = stdout(&run(pgentra(emulator).args([
        "env",
        "--shell",
        "powershell",
    ])));
    assert!(
        powershell.contains(&format!("$Env:PGUSER = '{USER}'")),
        "{powershell}"
    );
    let value = json(&run(
        pgentra(emulator).args(["env", "--json", "--user", "readers"])
    ));
    assert_eq!(value["PGUSER"], "readers");
    assert_eq!(value["PGSSLMODE"], "verify-full");
}

#[test]
fn exec_and_psql_pass_the_token_and_the_exit_code() {
    let emulator = Emulator::shared();
    let output = run(pgentra(emulator).args(["exec", "--", "sh", "-c", "exit 7"]));
    assert_eq!(output.status.code(), Some(7));

    let output = run(pgentra(emulator).args([
        "exec",
        "--",
        "sh",
        "-c",
        r#"printf '%s\n%s' "$PGUSER" "$PGPASSWORD""#,
    ]));
    assert!(output.status.success(), "{}", stderr(&output));
    let out = stdout(&output);
    let (user, token) = out.split_once('\n').unwrap();
    assert_eq!(user, USER);
    emulator
        .issuer()
        .verify(token, &emulator.config().audience, Duration::ZERO)
        .expect("PGPASSWORD holds a valid database token");

    let output = run(pgentra(emulator).args(["exec", "--", "no-such-program-pgentra"]));
    let line = assert_one_line_error(&output, 127);
    assert!(line.contains("no-such-program-pgentra"), "{line}");

    // psql gets every argument, including its own -v, -X and -c.
    let output = run(pgentra(emulator).args([
        "psql",
        "-X",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        "SELECT current_user",
    ]));
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output).trim(), USER);
    // A group the user belongs to, chosen with psql's own -U.
    let output =
        run(pgentra(emulator).args(["psql", "-XAt", "-U", "readers", "-c", "SELECT current_user"]));
    assert_eq!(stdout(&output).trim(), "readers", "{}", stderr(&output));
    // psql's failure is the command's failure.
    let output = run(pgentra(emulator).args(["psql", "-X", "-c", "SELECT 1/0"]));
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("division by zero"));
}

#[cfg(feature = "emulator")]
/// `pgentra emulator ARGS` running in the background: the process, the variables it printed
/// before `# ready`, and the rest of its standard output.
fn start_emulator(
    args: &[&str],
) -> (
    std::process::Child,
    Vec<(String, String)>,
    std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
) {
    use std::io::BufRead as _;
    let mut child = bare()
        .arg("emulator")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut env = Vec::new();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line == "# ready" {
            break;
        }
        let (name, value) = line
            .strip_prefix("export ")
            .and_then(|l| l.split_once('='))
            .unwrap_or_else(|| panic!("stdout must carry only exports, got {line:?}"));
        env.push((name.to_owned(), value.trim_matches('\'').to_owned()));
    }
    (child, env, lines)
}

#[cfg(feature = "emulator")]
/// The shared emulator's cluster as a `--backend` URL: a `pgentra emulator` that borrows it
/// starts no cluster of its own.
fn shared_backend() -> String {
    Emulator::shared()
        .cluster()
        .expect("the shared emulator runs a cluster")
        .url()
}

#[cfg(feature = "emulator")]
#[test]
fn emulator_prints_its_environment_serves_logins_and_stops_cleanly() {
    let (mut child, env, lines) = start_emulator(&["--token-lifetime", "30s"]);
    let names: Vec<&str> = env.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "PGHOST",
        "PGPORT",
        "PGDATABASE",
        "PGSSLMODE",
        "PGSSLROOTCERT",
        "IDENTITY_ENDPOINT",
        "IDENTITY_HEADER",
        "AZURE_AUTHORITY_HOST",
        "SSL_CERT_FILE",
        "PATH",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }

    // Its environment is all `pgentra psql` needs: token from its `az`, TLS verified by its CA.
    let output = run(bare()
        .envs(env.iter().cloned())
        .env("AZURE_TOKEN_CREDENTIALS", "AzureCliCredential")
        .args(["psql", "-XAt", "-c", "SELECT current_user"]));
    assert_eq!(stdout(&output).trim(), USER, "{}", stderr(&output));

    // SIGTERM: exit 0, and the cluster directory (which held the CA and the shims) is gone.
    let ca = std::path::PathBuf::from(&env.iter().find(|(n, _)| n == "PGSSLROOTCERT").unwrap().1);
    assert!(ca.is_file());
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let cluster_dir = ca.parent().and_then(|p| p.parent()).unwrap();
    assert!(
        !cluster_dir.exists(),
        "{} was not removed",
        cluster_dir.display()
    );
    assert_eq!(
        lines.count(),
        0,
        "nothing may follow the ready line on stdout"
    );
}

// ---------------------------------------------------------------------------------------------
// No token goes to a server the user did not name (a hostile `.env`, a stale environment).
// ---------------------------------------------------------------------------------------------

/// A trap on `ip` at the gateway's port: where `PGHOSTADDR=<ip>` would send a client that was
/// told to connect to `localhost:<gateway port>`. (Each test uses its own address.)
fn trap_beside(emulator: &Emulator, ip: &str) -> pgentra_emulator::testing::PasswordTrap {
    let addr = std::net::SocketAddr::new(ip.parse().unwrap(), emulator.gateway().port());
    pgentra_emulator::testing::PasswordTrap::start(addr).expect("listen on the trap's address")
}

/// A directory holding the `.env` a cloned repository could carry, pointing at `ip`.
fn hostile_checkout(name: &str, ip: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pgentra-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(".env"),
        format!("PGHOSTADDR={ip}\nPGSSLMODE=require\n"),
    )
    .unwrap();
    dir
}

#[test]
fn a_dotenv_in_the_working_directory_cannot_redirect_the_token() {
    let emulator = Emulator::shared();
    let trap = trap_beside(emulator, "127.0.0.2");
    let dir = hostile_checkout("dotenv", "127.0.0.2");
    let url = format!(
        "postgres://localhost:{}/postgres",
        emulator.gateway().port()
    );

    let output = run(pgentra(emulator).current_dir(&dir).args(["check", &url]));
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    assert!(
        stdout(&output).contains("sslmode verify-full"),
        "{}",
        stdout(&output)
    );

    let port = emulator.gateway().port().to_string();
    let output = run(pgentra(emulator).current_dir(&dir).args([
        "psql",
        "-h",
        "localhost",
        "-p",
        &port,
        "-XAtc",
        "select current_user",
    ]));
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output).trim(), USER);

    let output = run(pgentra(emulator).current_dir(&dir).args([
        "exec",
        "--",
        "sh",
        "-c",
        "echo ${PGHOSTADDR:-none} $PGSSLMODE",
    ]));
    assert_eq!(
        stdout(&output).trim(),
        "none verify-full",
        "{}",
        stderr(&output)
    );

    assert_eq!(
        (trap.connections(), trap.passwords()),
        (0, 0),
        "the .env sent the client to the trap"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn environment_settings_for_another_host_are_not_applied_to_the_named_server() {
    let emulator = Emulator::shared();
    let trap = trap_beside(emulator, "127.0.0.3");
    let port = emulator.gateway().port();
    let ca = emulator.ca_file().display().to_string();
    // The user names 127.0.0.1 (its certificate is for that address too); the environment is
    // the emulator's, for `localhost`, plus a stale address and a weak sslmode.
    let stale = [("PGHOSTADDR", "127.0.0.3"), ("PGSSLMODE", "require")];
    let url = format!("postgres://127.0.0.1:{port}/postgres?sslrootcert={ca}");

    let output = run(pgentra(emulator).envs(stale).args(["check", &url]));
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    assert!(
        stdout(&output).contains("sslmode verify-full"),
        "{}",
        stdout(&output)
    );

    let output =
        run(pgentra(emulator)
            .envs(stale)
            .args(["psql", &url, "-XAtc", "select current_user"]));
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output).trim(), USER);

    // The server named positionally, as `check` takes it (and by the older `--conninfo`).
    for named in [&[url.as_str()][..], &["--conninfo", url.as_str()]] {
        let output = run(pgentra(emulator).envs(stale).arg("exec").args(named).args([
            "--",
            "sh",
            "-c",
            "echo ${PGHOSTADDR:-none} $PGSSLMODE",
        ]));
        assert_eq!(
            stdout(&output).trim(),
            "none verify-full",
            "{named:?}: {}",
            stderr(&output)
        );
    }
    let output = run(pgentra(emulator).envs(stale).args(["env", &url]));
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        !stdout(&output).contains("PGHOSTADDR"),
        "{}",
        stdout(&output)
    );
    // Both forms at once are a usage error.
    let output = run(pgentra(emulator).args(["check", &url, "--conninfo", &url]));
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));

    assert_eq!(
        (trap.connections(), trap.passwords()),
        (0, 0),
        "the stale environment sent the client to the trap"
    );
}

#[test]
fn exec_and_psql_refuse_a_service_file() {
    let emulator = Emulator::shared();
    let output = run(pgentra(emulator)
        .env("PGSERVICE", "elsewhere")
        .args(["exec", "--", "true"]));
    let line = assert_one_line_error(&output, 2);
    assert!(line.contains("PGSERVICE"), "{line}");
}

/// A token's claims are data, never terminal control: escape sequences in names and values
/// (ESC, the C1 CSI, a bidirectional override) are printed escaped.
#[test]
fn inspect_escapes_what_could_drive_the_terminal() {
    let b64 = |json: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
    let header = b64(r#"{"alg":"RS256","kid":"\u001b]0;owned\u0007"}"#);
    let payload = b64(
        r#"{"aud":"https://ossrdbms-aad.database.windows.net","oid":"x","tid":"t","upn":"alice\u001b[2J@contoso.com","x\u001b[31m":"\u009b31m\u202e"}"#,
    );
    let output = inspect(&format!("{header}.{payload}.sig"));
    assert!(output.status.success(), "{}", stderr(&output));
    let out = stdout(&output);
    for hostile in ['\u{1b}', '\u{9b}', '\u{202e}', '\u{7}'] {
        assert!(
            !out.contains(hostile),
            "{hostile:?} reached the terminal:\n{out:?}"
        );
    }
    assert!(out.contains("\\u{1b}[2J"), "{out}");
}

#[cfg(feature = "emulator")]
/// The setup script of a new managed identity, as a user runs it against `pgentra emulator`:
/// the Entra administrator (the signed-in user) creates the identity's role with
/// `pgaadauth_create_principal`; the identity logs in with its own token through `pgentra psql`
/// and through a driver; a non-administrator's call fails with Azure's error; after `DROP ROLE`
/// the identity's token is refused.
#[test]
fn a_provisioning_script_runs_against_the_emulator() {
    // A cluster of its own: an emulator's directory replaces the one of any emulator before it
    // on the same cluster.
    let (mut child, env, _) = start_emulator(&[
        "--no-role",
        "managed-identity:billing",
        "--answer-as",
        "billing",
    ]);
    let as_admin = || {
        let mut command = bare();
        command
            .envs(env.iter().cloned())
            .env("AZURE_TOKEN_CREDENTIALS", "AzureCliCredential");
        command
    };
    let as_identity = || {
        let mut command = bare();
        command
            .envs(env.iter().cloned())
            .env("AZURE_TOKEN_CREDENTIALS", "ManagedIdentityCredential");
        command
    };
    let psql = |mut command: Command, sql: &str| run(command.args(["psql", "-XAt", "-c", sql]));

    // Before: Entra ID knows the identity, the database does not.
    let refused = psql(as_identity(), "SELECT current_user");
    assert!(
        stderr(&refused).contains("password authentication failed for user \"billing\""),
        "{}",
        stderr(&refused)
    );

    let created = psql(
        as_admin(),
        "SELECT * FROM pgaadauth_create_principal('billing', false, false)",
    );
    assert_eq!(
        stdout(&created).trim(),
        "Created role for \"billing\"",
        "{}",
        stderr(&created)
    );
    let granted = psql(
        as_admin(),
        "CREATE TABLE invoices (id int); GRANT SELECT ON invoices TO billing",
    );
    assert!(granted.status.success(), "{}", stderr(&granted));

    let logged_in = psql(as_identity(), "SELECT current_user, count(*) FROM invoices");
    assert_eq!(
        stdout(&logged_in).trim(),
        "billing|0",
        "{}",
        stderr(&logged_in)
    );

    // Through a driver: tokio-postgres with pgentra's connector and the real managed-identity
    // credential (IMDS, the identity picked by its client ID).
    let var = |name: &str| env.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let billing = Principal::user_assigned_identity("billing");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let user: String = runtime.block_on(async {
        let chain = pgentra::credential::CredentialChain::from_vars([
            (
                "AZURE_TOKEN_CREDENTIALS",
                "ManagedIdentityCredential".to_owned(),
            ),
            (
                "AZURE_POD_IDENTITY_AUTHORITY_HOST",
                var("AZURE_POD_IDENTITY_AUTHORITY_HOST"),
            ),
            ("AZURE_CLIENT_ID", billing.client_id.clone()),
        ])
        .unwrap();
        let auth = pgentra::EntraAuth::builder()
            .credential_chain(chain)
            .build()
            .unwrap();
        let info = pgentra::conninfo::ConnInfo::from_vars(env.iter().cloned()).unwrap();
        let connector = pgentra::tokio_postgres::EntraConnector::new(auth, &info).unwrap();
        let (client, connection) = connector.connect().await.unwrap();
        tokio::spawn(connection);
        client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0)
    });
    assert_eq!(user, "billing");

    // A principal that is not an Entra administrator cannot create roles.
    let denied = psql(
        as_identity(),
        "SELECT * FROM pgaadauth_create_principal('reporting-app', false, false)",
    );
    assert!(
        stderr(&denied).contains("permission denied for function pgaadauth_create_principal"),
        "{}",
        stderr(&denied)
    );
    // The administrator lists the Entra roles, drops the identity's, and its token is refused.
    let listed = psql(
        as_admin(),
        "SELECT rolname, principaltype FROM pgaadauth_list_principals(false) ORDER BY 1",
    );
    assert!(
        stdout(&listed).lines().any(|l| l == "billing|service"),
        "{}",
        stdout(&listed)
    );
    let dropped = psql(as_admin(), "DROP TABLE invoices; DROP ROLE billing");
    assert!(dropped.status.success(), "{}", stderr(&dropped));
    let refused = psql(as_identity(), "SELECT current_user");
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("password authentication failed for user \"billing\""),
        "{}",
        stderr(&refused)
    );

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(child.wait().unwrap().success());
}

#[cfg(feature = "emulator")]
/// Tokens of 8 KB (a user in 150 groups), which broke middleboxes with small password limits,
/// log in through `pgentra psql`, `pgentra check` and `pgentra proxy`.
#[test]
fn an_8_kb_token_logs_in_through_psql_check_and_the_proxy() {
    let backend = shared_backend();
    let (mut child, env, _) = start_emulator(&["--token-groups", "150", "--backend", &backend]);
    let pgentra = || {
        let mut command = bare();
        command
            .envs(env.iter().cloned())
            .env("AZURE_TOKEN_CREDENTIALS", "AzureCliCredential");
        command
    };
    let token = run(pgentra().arg("token"));
    assert!(
        stdout(&token).trim().len() >= 8_000,
        "a {}-byte token",
        stdout(&token).trim().len()
    );
    let output = run(pgentra().args(["psql", "-XAtc", "SELECT current_user"]));
    assert_eq!(stdout(&output).trim(), USER, "{}", stderr(&output));
    let output = run(pgentra().arg("check"));
    assert!(output.status.success(), "{}", stdout(&output));

    let mut proxy = pgentra()
        .args(["proxy", "--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = std::io::BufRead::lines(std::io::BufReader::new(proxy.stderr.take().unwrap()));
    let port = log
        .by_ref()
        .find_map(|line| {
            let line = line.ok()?;
            let at = line.find("addr=127.0.0.1:")?;
            Some(
                line[at + "addr=127.0.0.1:".len()..]
                    .split_whitespace()
                    .next()?
                    .to_owned(),
            )
        })
        .expect("the proxy's listening line");
    let through = run(Command::new("psql")
        .args([
            "-XAt",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-d",
            "postgres",
            "-c",
            "SELECT current_user",
        ])
        .env("PGCONNECT_TIMEOUT", "10"));
    assert_eq!(stdout(&through).trim(), USER, "{}", stderr(&through));
    for process in [&proxy, &child] {
        let killed = Command::new("kill")
            .args(["-TERM", &process.id().to_string()])
            .status();
        assert!(killed.unwrap().success());
    }
    assert!(proxy.wait().unwrap().success());
    assert!(child.wait().unwrap().success());
}

/// Built without the `emulator` feature (a production sidecar), `demo` and `emulator` say they
/// are not in this build: exit code 2, one line, nothing on standard output.
#[cfg(not(feature = "emulator"))]
#[test]
fn demo_and_emulator_say_they_are_not_in_this_build() {
    for args in [&["demo", "--duration", "1s"][..], &["emulator"]] {
        let output = bare().args(args).output().unwrap();
        let stderr = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains("is not in this build") && stderr.contains("`emulator` feature"),
            "{args:?}: {stderr}"
        );
        assert!(output.stdout.is_empty(), "{args:?}");
    }
}

/// A reader of standard output that went away (`pgentra inspect … | head -1`) ends the command
/// quietly with 141, as `SIGPIPE` ends a C program: no panic, nothing on standard error.
#[test]
fn a_closed_standard_output_ends_the_command_quietly() {
    let b64 = |json: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
    let token = format!(
        "{}.{}.sig",
        b64(r#"{"alg":"RS256"}"#),
        b64(
            r#"{"aud":"https://ossrdbms-aad.database.windows.net","oid":"o","tid":"t","upn":"alice@contoso.com"}"#
        )
    );
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = bare()
        .args(["inspect", &token])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(141), "{}", stderr(&output));
    assert_eq!(stderr(&output), "");
}
