//! `pgentra proxy` as a user runs it, against the emulator: the startup check, psql through
//! it, graceful drain on SIGTERM, the TOML file, JSON logs, and never a token in the logs.

use super::common::assert_no_token;
use pgentra_emulator::testing::{temp_dir, within};
use pgentra_emulator::{Emulator, USER};
use std::net::SocketAddr;
use std::process::{ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

const SHORT: Duration = Duration::from_secs(15);

/// `pgentra proxy` with only the emulator's environment (its `az` the only credential, so
/// nothing reaches a real identity endpoint), plus `env`.
fn command(emulator: &Emulator, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pgentra"));
    command
        .env_clear()
        .envs(emulator.env())
        .env("AZURE_TOKEN_CREDENTIALS", "AzureCliCredential")
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// A running `pgentra proxy`, its standard error collected as it comes.
struct ProxyProcess {
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    reader: tokio::task::JoinHandle<()>,
}

impl ProxyProcess {
    /// Starts the proxy and waits for its first `listening` log line (text or JSON).
    async fn start(emulator: &Emulator, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn(command(emulator, args, env)).await
    }

    /// As [`start`](Self::start), for a command set up by the caller.
    async fn spawn(mut command: Command) -> Self {
        let mut child = command.spawn().expect("run pgentra");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
        let mut pipe = BufReader::new(child.stderr.take().unwrap()).lines();
        let reader = tokio::spawn({
            let stderr = Arc::clone(&stderr);
            async move {
                while let Ok(Some(line)) = pipe.next_line().await {
                    let mut all = stderr.lock().unwrap();
                    all.push_str(&line);
                    all.push('\n');
                    let _ = lines_tx.send(line);
                }
            }
        });
        let addr = within(SHORT, "the proxy to listen", async {
            while let Some(line) = lines.recv().await {
                if let Some(addr) = listening_addr(&line) {
                    return addr;
                }
            }
            panic!(
                "the proxy ended before listening: {:?}\n{}",
                child.try_wait(),
                stderr.lock().unwrap()
            );
        })
        .await;
        Self {
            child,
            addr,
            stderr,
            reader,
        }
    }

    fn port(&self) -> String {
        self.addr.port().to_string()
    }

    fn terminate(&self) {
        signal("-TERM", self.child.id().expect("the proxy is running"));
    }

    /// Waits for the proxy to exit; its status and everything it wrote on standard error.
    async fn wait(mut self, limit: Duration) -> (ExitStatus, String) {
        let status = within(limit, "the proxy to exit", self.child.wait())
            .await
            .unwrap();
        within(SHORT, "the proxy's stderr", &mut self.reader)
            .await
            .unwrap();
        let stderr = self.stderr.lock().unwrap().clone();
        (status, stderr)
    }
}

/// Sends a signal to a process this test started.
fn signal(signal: &str, pid: u32) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// `psql -X -qAt -h 127.0.0.1 -p PORT -d postgres ARGS`, only `PATH` in its environment.
fn psql(port: &str, args: &[&str]) -> Command {
    let mut command = Command::new("psql");
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PGCONNECT_TIMEOUT", "10")
        .args([
            "-X",
            "-qAt",
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-d",
            "postgres",
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

async fn output(command: &mut Command) -> Output {
    within(SHORT, "psql", command.output()).await.unwrap()
}

/// psql's standard output, which must succeed.
async fn psql_ok(port: &str, args: &[&str]) -> String {
    let out = output(&mut psql(port, args)).await;
    assert!(
        out.status.success(),
        "psql {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Waits until a query containing `marker` runs in the server, looking through the proxy.
async fn wait_until_running(port: &str, marker: &str) {
    let sql = format!(
        "select count(*) from pg_stat_activity where state = 'active' \
         and pid <> pg_backend_pid() and strpos(query, '{marker}') > 0"
    );
    within(SHORT, "the query to start", async {
        while psql_ok(port, &["-c", &sql]).await.trim() != "1" {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// Waits until nothing accepts connections on `addr` any more.
async fn wait_until_refused(addr: SocketAddr) {
    within(SHORT, "new connections to be refused", async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// The emulator's gateway as `key=value` settings.
fn upstream(emulator: &Emulator) -> String {
    format!(
        "host=localhost port={} dbname=postgres sslmode=verify-full sslrootcert={}",
        emulator.gateway().port(),
        emulator.ca_file().display()
    )
}

/// `--check` logs in once before serving (the upstream from the `PG*` variables), then psql
/// works through the proxy with the documented role rule; SIGTERM stops it with status 0.
#[tokio::test(flavor = "multi_thread")]
async fn check_then_serve_psql() {
    let emulator = Emulator::shared();
    let logins = emulator.gateway().logins();
    let proxy = ProxyProcess::start(
        emulator,
        &[
            "proxy",
            "--check",
            "--listen",
            "127.0.0.1:0",
            "--client-roles",
            "readers",
        ],
        &[],
    )
    .await;
    // The connection test logged in before the proxy said it was listening.
    assert!(emulator.gateway().logins() > logins);
    let port = proxy.port();
    assert_eq!(
        psql_ok(&port, &["-c", "select current_user"]).await,
        format!("{USER}\n")
    );
    assert_eq!(
        psql_ok(&port, &["-U", "readers", "-c", "select current_user"]).await,
        "readers\n"
    );
    proxy.terminate();
    let (status, stderr) = proxy.wait(SHORT).await;
    assert!(status.success(), "{status}: {stderr}");
    assert_no_token(&stderr, "the log");
}

/// `--check` with a role that does not exist: exit 1 and one line naming the role.
#[tokio::test(flavor = "multi_thread")]
async fn check_fails_for_a_missing_role() {
    let emulator = Emulator::shared();
    let upstream = upstream(emulator);
    let out = within(
        SHORT,
        "pgentra proxy --check",
        command(
            emulator,
            &[
                "proxy",
                "--check",
                "--listen",
                "127.0.0.1:0",
                "--user",
                "nobody@contoso.com",
                &upstream,
            ],
            &[],
        )
        .output(),
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("pgentra: ") && lines[0].contains("\"nobody@contoso.com\""),
        "{stderr}"
    );
    assert!(
        lines[0].contains("password authentication failed"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

/// SIGTERM stops accepting at once and lets a running query finish; then the proxy exits 0.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_running_queries_finish() {
    let emulator = Emulator::shared();
    let upstream = upstream(emulator);
    let proxy = ProxyProcess::start(
        emulator,
        &["proxy", "--listen", "127.0.0.1:0", &upstream],
        &[],
    )
    .await;
    let port = proxy.port();
    let marker = format!("drain-{}", std::process::id());
    let running = psql(
        &port,
        &["-c", &format!("select pg_sleep(3), 'done' /* {marker} */")],
    )
    .spawn()
    .unwrap();
    wait_until_running(&port, &marker).await;

    proxy.terminate();
    wait_until_refused(proxy.addr).await;
    let out = within(SHORT, "the running psql", running.wait_with_output())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "the running query was cut: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "|done\n");
    let (status, stderr) = proxy.wait(SHORT).await;
    assert!(status.success(), "{status}: {stderr}");
}

/// With `--drain-timeout 1s`, a long query is cut after about a second and the proxy exits 0.
#[tokio::test(flavor = "multi_thread")]
async fn drain_timeout_cuts_long_queries() {
    let emulator = Emulator::shared();
    let upstream = upstream(emulator);
    let proxy = ProxyProcess::start(
        emulator,
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--drain-timeout",
            "1s",
            &upstream,
        ],
        &[],
    )
    .await;
    let port = proxy.port();
    let marker = format!("cut-{}", std::process::id());
    let running = psql(
        &port,
        &["-c", &format!("select pg_sleep(30) /* {marker} */")],
    )
    .spawn()
    .unwrap();
    wait_until_running(&port, &marker).await;

    let signalled = Instant::now();
    proxy.terminate();
    let (status, stderr) = proxy.wait(SHORT).await;
    let took = signalled.elapsed();
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "exited {took:?} after SIGTERM"
    );
    let out = within(SHORT, "the cut psql", running.wait_with_output())
        .await
        .unwrap();
    assert!(!out.status.success(), "the query was not cut");
    assert!(signalled.elapsed() < Duration::from_secs(20));
}

/// A TOML file with an `[[instance]]` (listen address and pinned role), and JSON log lines.
#[tokio::test(flavor = "multi_thread")]
async fn config_file_and_json_logs() {
    let emulator = Emulator::shared();
    let dir = temp_dir("toml");
    let file = dir.join("proxy.toml");
    std::fs::write(
        &file,
        format!(
            "drain_timeout = \"5s\"\nmax_connections = 10\n\n[[instance]]\nupstream = \"{}\"\nlisten = \"127.0.0.1:0\"\nuser = \"readers\"\n",
            upstream(emulator)
        ),
    )
    .unwrap();
    let proxy = ProxyProcess::start(
        emulator,
        &[
            "-v",
            "proxy",
            "--config",
            file.to_str().unwrap(),
            "--log-format",
            "json",
        ],
        &[],
    )
    .await;
    assert!(proxy.addr.ip().is_loopback() && proxy.addr.port() != 0);
    let port = proxy.port();
    // The file's role wins over the client's.
    assert_eq!(
        psql_ok(&port, &["-U", USER, "-c", "select current_user"]).await,
        "readers\n"
    );
    proxy.terminate();
    let (status, stderr) = proxy.wait(SHORT).await;
    assert!(status.success(), "{status}: {stderr}");

    let mut logs = Vec::new();
    for line in stderr.lines() {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}\n{stderr}"));
        logs.push(value);
    }
    let login = logs
        .iter()
        .find(|log| log["fields"]["message"] == "session logged in")
        .unwrap_or_else(|| panic!("no session log:\n{stderr}"));
    assert_eq!(login["level"], "INFO");
    assert_eq!(login["fields"]["role"], "readers");
    assert_no_token(&stderr, "the log");
    let _ = std::fs::remove_dir_all(dir);
}

/// Even at trace level, through a session, a refused login and a cancel, no token is logged.
#[tokio::test(flavor = "multi_thread")]
async fn no_token_in_trace_logs() {
    let emulator = Emulator::shared();
    let upstream = upstream(emulator);
    let proxy = ProxyProcess::start(
        emulator,
        &["-vvv", "proxy", &upstream],
        // Settings from the environment too.
        &[
            ("PGENTRA_PROXY_LISTEN", "127.0.0.1:0"),
            // The refused role below is one clients may pick.
            ("PGENTRA_PROXY_CLIENT_ROLES", "nobody@contoso.com"),
        ],
    )
    .await;
    let port = proxy.port();
    assert_eq!(
        psql_ok(&port, &["-c", "select current_user"]).await,
        format!("{USER}\n")
    );
    let refused = output(&mut psql(
        &port,
        &["-U", "nobody@contoso.com", "-c", "select 1"],
    ))
    .await;
    assert!(!refused.status.success());
    let refused = String::from_utf8_lossy(&refused.stderr);
    assert!(
        refused.contains("password authentication failed"),
        "{refused}"
    );
    // psql sends a cancel request on SIGINT.
    let marker = format!("interrupt-{}", std::process::id());
    let running = psql(
        &port,
        &["-c", &format!("select pg_sleep(30) /* {marker} */")],
    )
    .spawn()
    .unwrap();
    wait_until_running(&port, &marker).await;
    signal("-INT", running.id().unwrap());
    let cancelled = within(SHORT, "the cancelled psql", running.wait_with_output())
        .await
        .unwrap();
    let cancelled = String::from_utf8_lossy(&cancelled.stderr);
    assert!(
        cancelled.contains("canceling statement due to user request"),
        "{cancelled}"
    );
    proxy.terminate();
    let (status, stderr) = proxy.wait(SHORT).await;
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        stderr.contains("session logged in") && stderr.contains("TRACE"),
        "trace logging is not on:\n{stderr}"
    );
    assert_no_token(&stderr, "the log");
}

/// SIGTERM as soon as the proxy says it listens is a graceful stop too.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_right_after_start() {
    let emulator = Emulator::shared();
    let upstream = upstream(emulator);
    for _ in 0..5 {
        let proxy = ProxyProcess::start(
            emulator,
            &["proxy", "--listen", "127.0.0.1:0", &upstream],
            &[],
        )
        .await;
        proxy.terminate();
        let (status, stderr) = proxy.wait(SHORT).await;
        assert!(status.success(), "{status}: {stderr}");
    }
}

/// The address in a `listening` log line: `... INFO listening; ... addr=ADDR` as text, or
/// `{"fields": {"message": "listening; ...", "addr": "ADDR"}, ...}` as JSON.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    if line.starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        let fields = &value["fields"];
        if !fields["message"].as_str()?.starts_with("listening") {
            return None;
        }
        return fields["addr"].as_str()?.parse().ok();
    }
    if !line.contains(" listening") {
        return None;
    }
    line.split("addr=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A non-loopback address is refused (exit 2, one line naming the flag) unless
/// `--allow-remote` is given.
#[tokio::test(flavor = "multi_thread")]
async fn remote_listen_addresses_need_allow_remote() {
    let emulator = Emulator::shared();
    let upstream = upstream(emulator);
    let refused = within(
        SHORT,
        "pgentra proxy --listen 0.0.0.0:0",
        command(
            emulator,
            &["proxy", "--listen", "0.0.0.0:0", &upstream],
            &[],
        )
        .output(),
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--allow-remote"), "{stderr}");

    let proxy = ProxyProcess::start(
        emulator,
        &[
            "proxy",
            "--listen",
            "0.0.0.0:0",
            "--allow-remote",
            &upstream,
        ],
        &[],
    )
    .await;
    assert!(proxy.addr.ip().is_unspecified(), "{}", proxy.addr);
    proxy.terminate();
    let (status, stderr) = proxy.wait(SHORT).await;
    assert!(status.success(), "{status}: {stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dotenv_or_a_stale_environment_cannot_redirect_the_upstream() {
    let emulator = Emulator::shared();
    let port = emulator.gateway().port();
    let trap_addr = SocketAddr::from(([127, 0, 0, 4], port));
    let trap = pgentra_emulator::testing::PasswordTrap::start(trap_addr).unwrap();
    let dir = temp_dir("dotenv");
    std::fs::write(
        dir.join(".env"),
        "PGHOSTADDR=127.0.0.4\nPGSSLMODE=require\n",
    )
    .unwrap();

    // The upstream from the environment (PGHOST=localhost), in a checkout with a hostile .env.
    let mut in_checkout = command(emulator, &["proxy", "--listen", "127.0.0.1:0"], &[]);
    in_checkout.current_dir(&dir);
    let proxy = ProxyProcess::spawn(in_checkout).await;
    let user = psql_ok(&proxy.port(), &["-c", "select current_user"]).await;
    assert_eq!(user.trim(), USER);
    proxy.terminate();
    assert!(proxy.wait(SHORT).await.0.success());

    // An upstream named explicitly, with settings in the environment meant for `localhost`.
    let ca = emulator.ca_file().display().to_string();
    let upstream = format!("postgres://127.0.0.1:{port}/postgres?sslrootcert={ca}");
    let stale = [("PGHOSTADDR", "127.0.0.4"), ("PGSSLMODE", "require")];
    let proxy = ProxyProcess::start(
        emulator,
        &["proxy", "--listen", "127.0.0.1:0", &upstream],
        &stale,
    )
    .await;
    let user = psql_ok(&proxy.port(), &["-c", "select current_user"]).await;
    assert_eq!(user.trim(), USER);
    proxy.terminate();
    assert!(proxy.wait(SHORT).await.0.success());

    assert_eq!(
        (trap.connections(), trap.passwords()),
        (0, 0),
        "the proxy was sent to the trap"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bad settings are usage errors (exit 2) with one line saying which: a client password file
/// others may read (as libpq refuses such a `.pgpass`), a config file that is not UTF-8, an
/// absurd thread count.
#[tokio::test(flavor = "multi_thread")]
async fn bad_settings_exit_2_with_a_reason() {
    use std::os::unix::fs::PermissionsExt as _;
    let emulator = Emulator::shared();
    let dir = temp_dir("settings");
    let password = dir.join("password");
    std::fs::write(&password, "pw\n").unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o644)).unwrap();
    let not_utf8 = dir.join("proxy.toml");
    std::fs::write(&not_utf8, b"listen = \"127.0.0.1:0\"\n# caf\xe9\n").unwrap();
    let cases: [(&[&str], &str); 3] = [
        (
            &["--client-password-file", password.to_str().unwrap()],
            "chmod 600",
        ),
        (&["--config", not_utf8.to_str().unwrap()], "not UTF-8"),
        (
            &["--threads", "100000"],
            "threads must be between 1 and 1024",
        ),
    ];
    for (args, reason) in cases {
        let mut all = vec!["proxy", "--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let output = within(
            SHORT,
            "pgentra proxy",
            command(emulator, &all, &[]).output(),
        )
        .await
        .unwrap();
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(reason), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    // Readable by its owner only: accepted.
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
    let proxy = ProxyProcess::start(
        emulator,
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--client-password-file",
            password.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    proxy.terminate();
    assert!(proxy.wait(SHORT).await.0.success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The Entra administrator (the signed-in user, whom the proxy logs in as) initialises and runs
/// pgbench through `pgentra proxy`: it may create tables in `public`, as on Azure.
#[tokio::test(flavor = "multi_thread")]
async fn pgbench_init_through_the_proxy_as_the_entra_administrator() {
    let emulator = Emulator::shared();
    let proxy = ProxyProcess::start(emulator, &["proxy", "--listen", "127.0.0.1:0"], &[]).await;
    let port = proxy.port();
    let pgbench = |args: &[&str]| {
        let mut command = Command::new("pgbench");
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .args(["-h", "127.0.0.1", "-p", &port])
            .args(args)
            .arg("postgres")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    };
    let init = output(&mut pgbench(&["-i", "-s", "1", "-q", "--foreign-keys"])).await;
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let run = output(&mut pgbench(&["-n", "-t", "20", "-c", "2"])).await;
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        out.contains("number of transactions actually processed: 40/40"),
        "{out}"
    );
    let owner = psql_ok(
        &port,
        &[
            "-c",
            "select tableowner from pg_tables where tablename = 'pgbench_accounts'",
        ],
    )
    .await;
    assert_eq!(owner.trim(), USER);
    psql_ok(
        &port,
        &[
            "-c",
            "drop table pgbench_accounts, pgbench_branches, pgbench_history, pgbench_tellers",
        ],
    )
    .await;
    proxy.terminate();
    assert!(proxy.wait(SHORT).await.0.success());
}

/// The README's flag table of `pgentra proxy` and its `--help` list the same flags, with the
/// same variables and defaults: neither can gain or lose a setting, or change a default,
/// without the other.
#[test]
fn the_readme_flag_table_matches_help() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_pgentra"))
        .args(["proxy", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    // Flags of every subcommand, not settings of the proxy.
    let global = ["--help", "--version", "--verbose", "--json"];
    // Each flag: its variable and its default, as --help shows them.
    let mut from_help = std::collections::BTreeMap::new();
    let mut flag: Option<String> = None;
    for line in help.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('-') && line.starts_with("  ") && !line.starts_with("        ") {
            flag = trimmed
                .split([' ', ',', '[', '.'])
                .find(|word| word.starts_with("--"))
                .map(str::to_owned)
                .filter(|f| !global.contains(&f.as_str()));
            if let Some(flag) = &flag {
                from_help.insert(flag.clone(), (None, None));
            }
            continue;
        }
        let Some(flag) = &flag else { continue };
        let entry = from_help.get_mut(flag).unwrap();
        if let Some(env) = trimmed.strip_prefix("[env: PGENTRA_PROXY_") {
            entry.0 = Some(format!("_{}", env.split('=').next().unwrap()));
        } else if let Some((_, default)) = trimmed.rsplit_once("[default: ") {
            entry.1 = Some(default.trim_end_matches(']').to_owned());
        }
    }
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let table = readme
        .split("| Flag (`PGENTRA_PROXY_*` variable) | Default | Meaning |")
        .nth(1)
        .expect("the proxy's flag table in README.md");
    let mut from_readme = std::collections::BTreeMap::new();
    for row in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
        let columns: Vec<&str> = row.split(" | ").collect();
        let default = columns[1].replace('`', "");
        // `--flag VALUE` (`_VARIABLE`), one or more per row.
        for part in columns[0].split("`, `").flat_map(|p| p.split("), ")) {
            let words: Vec<&str> = part
                .split(['`', ' ', '(', ')', '|', ','])
                .filter(|w| !w.is_empty())
                .collect();
            let Some(flag) = words.iter().find(|w| w.starts_with("--")) else {
                continue;
            };
            let env = words
                .iter()
                .find(|w| w.starts_with('_'))
                .map(|e| (*e).to_owned());
            from_readme.insert((*flag).to_owned(), (env, default.clone()));
        }
    }
    assert_eq!(
        from_help.keys().collect::<Vec<_>>(),
        from_readme.keys().collect::<Vec<_>>(),
        "flags in --help but not in the README, or the reverse"
    );
    let mut defaults = 0;
    for (flag, (env, default)) in &from_help {
        let (readme_env, readme_default) = &from_readme[flag];
        if env.is_some() {
            assert_eq!(env, readme_env, "{flag}: the README names another variable");
        }
        if let Some(default) = default {
            defaults += 1;
            assert!(
                readme_default.starts_with(default.as_str()),
                "{flag}: --help says the default is {default:?}, the README {readme_default:?}"
            );
        }
    }
    assert!(defaults >= 20, "only {defaults} defaults in --help");
}
