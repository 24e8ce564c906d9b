//! A throwaway PostgreSQL cluster: `initdb` in a temp directory, a server on a free loopback
//! port with its socket in that directory, removed when dropped.
//!
//! The server binaries are found with `pg_config --bindir`, then under
//! `/usr/lib/postgresql/*/bin` (highest version first), then on `PATH`. PostgreSQL refuses to run
//! as root, so when this process is root the cluster runs as the `postgres` user.
//!
//! Cleanup does not depend on `Drop` alone: the server runs under a small shell supervisor that
//! reads its standard input, which is a pipe from this process. When this process exits for any
//! reason (a test binary's statics are never dropped, a panic aborts), the pipe closes and the
//! supervisor stops the server and deletes the directory.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Errors from starting or using the cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// No PostgreSQL server binaries were found.
    #[error(
        "no PostgreSQL server binaries found (looked at `pg_config --bindir`, /usr/lib/postgresql/*/bin and PATH); install them, e.g. `apt-get install postgresql` on Debian/Ubuntu"
    )]
    NoBinaries,
    /// This process is root and there is no `postgres` user to run the server as.
    #[error(
        "running as root, but there is no `postgres` user to run PostgreSQL as; create one or run as another user"
    )]
    NoUnprivilegedUser,
    /// A step failed.
    #[error("{step} failed: {detail}")]
    Step {
        /// What was being done.
        step: &'static str,
        /// The error or the program's output.
        detail: String,
    },
}

fn step(step: &'static str, detail: impl ToString) -> BackendError {
    BackendError::Step {
        step,
        detail: detail.to_string(),
    }
}

/// A running throwaway cluster. Stops and deletes its files when dropped (or when the process
/// exits).
#[derive(Debug)]
pub struct Cluster {
    bin_dir: PathBuf,
    dir: PathBuf,
    /// The unprivileged user the server runs as, when this process is root.
    owner: Option<(u32, u32)>,
    port: u16,
    supervisor: Child,
    /// Closing this pipe tells the supervisor to stop the server and delete `dir`.
    lifeline: Option<ChildStdin>,
}

/// How long the server may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the server may take to serve TLS after [`Cluster::enable_tls`] reloads it.
const TLS_TIMEOUT: Duration = Duration::from_secs(30);

/// Server settings of every cluster, unless [`Cluster::start_with`] replaces them: durability
/// off (the data is thrown away) and a quiet log.
const DEFAULT_SETTINGS: [(&str, &str); 6] = [
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "300"),
    ("log_min_messages", "warning"),
    ("log_connections", "off"),
];

impl Cluster {
    /// Initialises and starts a cluster whose superuser is `postgres` (trust authentication on
    /// its Unix socket and on loopback).
    pub fn start() -> Result<Self, BackendError> {
        Self::start_with(&[])
    }

    /// Like [`start`](Self::start), with server settings passed as `-c name=value`; they
    /// replace the defaults of the same name (`max_connections=300`, `fsync=off`,
    /// `synchronous_commit=off`, `full_page_writes=off`, `log_min_messages=warning`,
    /// `log_connections=off`). For example `&[("max_connections", "1100")]` for a load test.
    pub fn start_with(settings: &[(&str, &str)]) -> Result<Self, BackendError> {
        let mut options: Vec<(&str, &str)> = DEFAULT_SETTINGS.to_vec();
        for &(name, value) in settings {
            if name.is_empty() || name.contains(['=', ' ']) {
                return Err(step("checking the settings", format!("bad name {name:?}")));
            }
            options.retain(|(default, _)| !default.eq_ignore_ascii_case(name));
            options.push((name, value));
        }
        let bin_dir = find_bin_dir().ok_or(BackendError::NoBinaries)?;
        let owner = unprivileged_owner()?;
        let dir = make_dir()?;
        let data = dir.join("data");
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|e| step("chown", e))?;
        }
        let initdb = run_as(owner, &bin_dir.join("initdb"))
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .output()
            .map_err(|e| step("running initdb", e))?;
        if !initdb.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(step("initdb", String::from_utf8_lossy(&initdb.stderr)));
        }
        let port = free_port()?;
        let postgres = bin_dir.join("postgres");
        // The supervisor: start the server, wait for the lifeline to close, then stop and clean.
        // Arguments after the first three are the server's `-c name=value` options.
        let script = r#"
postgres=$1 dir=$2 port=$3
shift 3
"$postgres" -D "$dir/data" -p "$port" -k "$dir" -c listen_addresses=127.0.0.1 "$@" 2>&1 &
server=$!
cat > /dev/null
kill -INT "$server" 2>/dev/null
wait "$server"
rm -rf "$dir"
"#;
        let mut supervisor = run_as(owner, Path::new("/bin/sh"))
            .arg("-c")
            .arg(script)
            .arg("pgentra-backend")
            .arg(&postgres)
            .arg(&dir)
            .arg(port.to_string())
            .args(
                options
                    .iter()
                    .flat_map(|(name, value)| ["-c".to_owned(), format!("{name}={value}")]),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| step("starting postgres", e))?;
        let lifeline = supervisor.stdin.take();
        let stdout = supervisor.stdout.take();
        let mut cluster = Self {
            bin_dir,
            dir,
            owner,
            port,
            supervisor,
            lifeline,
        };
        cluster.wait_ready(stdout)?;
        Ok(cluster)
    }

    /// Reads the server log until it accepts connections (the event, not a poll).
    fn wait_ready(
        &mut self,
        stdout: Option<std::process::ChildStdout>,
    ) -> Result<(), BackendError> {
        let stdout = stdout.ok_or_else(|| step("starting postgres", "no log pipe"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut log = String::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("ready to accept connections") {
                    let _ = tx.send(Ok(()));
                    // Keep draining so the server never blocks on a full pipe.
                    continue;
                }
                log.push_str(&line);
                log.push('\n');
            }
            let _ = tx.send(Err(log));
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(log)) => Err(step(
                "postgres",
                format!("exited before it was ready:\n{log}"),
            )),
            Err(_) => Err(step(
                "postgres",
                format!("not ready within {START_TIMEOUT:?}"),
            )),
        }
    }

    /// The loopback TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for the superuser over loopback TCP (trusted), for instance another emulator's
    /// backend ([`EmulatorConfig::backend_url`](crate::EmulatorConfig::backend_url)): emulators
    /// with other settings that share one cluster.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The directory of the server binaries in use; Debian's client tools such as `pgbench`
    /// and `psql` of the same version are there too.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Turns on TLS on the TCP port with this certificate chain and private key (PEM), as a
    /// managed server has it: the files go to `tls/server.crt` and `tls/server.key` in the
    /// cluster's directory (owned by the server's user, the key with mode 0600), `ssl`,
    /// `ssl_cert_file` and `ssl_key_file` are set with `ALTER SYSTEM` and the configuration is
    /// reloaded. Returns once a new TCP connection with `sslmode=require` is encrypted
    /// (connections without TLS are still accepted, as `pg_hba.conf` allows `host`).
    ///
    /// [`ca::Ca`](crate::ca::Ca) makes a matching pair for `localhost` and `127.0.0.1`:
    /// `cluster.enable_tls(ca.server_cert_pem(), ca.server_key_pem())`.
    pub fn enable_tls(&self, cert_pem: &str, key_pem: &str) -> Result<(), BackendError> {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        let dir = self.scratch_dir("tls")?;
        let write = |name: &str, contents: &str, mode: u32| -> Result<PathBuf, BackendError> {
            let path = dir.join(name);
            let _ = std::fs::remove_file(&path);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)
                .map_err(|e| step("writing the server certificate", e))?;
            file.write_all(contents.as_bytes())
                .map_err(|e| step("writing the server certificate", e))?;
            // The umask may have narrowed the mode; PostgreSQL wants the key at 0600 exactly.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| step("writing the server certificate", e))?;
            if let Some((uid, gid)) = self.owner {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                    .map_err(|e| step("chown", e))?;
            }
            Ok(path)
        };
        let cert = write("server.crt", cert_pem, 0o644)?;
        let key = write("server.key", key_pem, 0o600)?;
        let literal = |path: &Path| format!("'{}'", path.display().to_string().replace('\'', "''"));
        self.psql(&format!(
            "ALTER SYSTEM SET ssl_cert_file = {};\n\
             ALTER SYSTEM SET ssl_key_file = {};\n\
             ALTER SYSTEM SET ssl = on;\n\
             SELECT pg_reload_conf();\n",
            literal(&cert),
            literal(&key)
        ))?;
        // The postmaster reloads on SIGHUP, after pg_reload_conf returns: wait for the result
        // (bounded), checking what matters, an encrypted session over TCP.
        let deadline = std::time::Instant::now() + TLS_TIMEOUT;
        loop {
            let mut command = Command::new(self.bin_dir.join("psql"));
            command.arg(format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require connect_timeout=5",
                self.port
            ));
            let answer = run_psql(
                command,
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid();",
            );
            match answer {
                Ok(answer) if answer.trim() == "t" => return Ok(()),
                answer if std::time::Instant::now() >= deadline => {
                    return Err(step(
                        "enabling TLS",
                        format!("no TLS session within {TLS_TIMEOUT:?}: {answer:?}"),
                    ));
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The directory holding the Unix socket (use it as `host`).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// Creates `name` inside the cluster's directory, for files that must go when the cluster
    /// goes (certificates, shims). Owned by the server's user so its cleanup can remove it.
    pub fn scratch_dir(&self, name: &str) -> Result<PathBuf, BackendError> {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| step("creating a scratch directory", e))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|e| step("chown", e))?;
        }
        Ok(dir)
    }

    /// Runs SQL as the superuser through `psql` on the Unix socket, stopping at the first
    /// error, and returns its standard output.
    pub fn psql(&self, sql: &str) -> Result<String, BackendError> {
        let mut command = Command::new(self.bin_dir.join("psql"));
        command
            .args(["-U", "postgres", "-d", "postgres", "-h"])
            .arg(&self.dir)
            .arg("-p")
            .arg(self.port.to_string());
        run_psql(command, sql)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        drop(self.lifeline.take());
        let _ = self.supervisor.wait();
    }
}

/// Runs SQL through `psql` (found on `PATH`) against the server of a `postgres://` URL,
/// stopping at the first error, and returns its standard output.
pub fn psql_url(url: &str, sql: &str) -> Result<String, BackendError> {
    let mut command = Command::new("psql");
    command.arg(url);
    run_psql(command, sql)
}

fn run_psql(mut command: Command, sql: &str) -> Result<String, BackendError> {
    let mut child = command
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| step("running psql", e))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| step("running psql", "no stdin"))?;
    stdin
        .write_all(sql.as_bytes())
        .map_err(|e| step("running psql", e))?;
    drop(stdin);
    let output = child
        .wait_with_output()
        .map_err(|e| step("running psql", e))?;
    if !output.status.success() {
        return Err(step("psql", String::from_utf8_lossy(&output.stderr)));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `name` as a quoted SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn find_bin_dir() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("postgres").is_file() && dir.join("initdb").is_file();
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(dir) = from_pg_config.filter(|d| has_server(d)) {
        return Some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Some(dir);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .find(|dir| has_server(dir))
}

/// `Some((uid, gid))` of the `postgres` user when this process is root, `None` otherwise.
fn unprivileged_owner() -> Result<Option<(u32, u32)>, BackendError> {
    use std::os::unix::fs::MetadataExt as _;
    // A process can read its own /proc entry's owner: that is its effective uid.
    let euid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    if euid != 0 {
        return Ok(None);
    }
    let passwd =
        std::fs::read_to_string("/etc/passwd").map_err(|e| step("reading /etc/passwd", e))?;
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&"postgres") && fields.len() > 3)
        .and_then(|fields| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
        .map(Some)
        .ok_or(BackendError::NoUnprivilegedUser)
}

fn run_as(owner: Option<(u32, u32)>, program: &Path) -> Command {
    use std::os::unix::process::CommandExt as _;
    let mut command = Command::new(program);
    if let Some((uid, gid)) = owner {
        // std also drops supplementary groups when it changes the uid.
        command.uid(uid).gid(gid);
        // The postgres user cannot enter root's working directory.
        command.current_dir("/");
    }
    command
}

fn make_dir() -> Result<PathBuf, BackendError> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "pgentra-pg-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| step("creating the cluster directory", e))?;
    Ok(dir)
}

fn free_port() -> Result<u16, BackendError> {
    // The port is free now; the server binds it a moment later (a small, accepted race).
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| step("finding a free port", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| step("finding a free port", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_runs_sql_and_cleans_up() {
        let cluster = Cluster::start().expect("start a throwaway PostgreSQL");
        let version = cluster.psql("SHOW server_version_num;").unwrap();
        assert!(
            version.trim().parse::<u32>().unwrap() >= 140_000,
            "{version}"
        );
        cluster
            .psql(r#"CREATE ROLE "alice@contoso.com" LOGIN;"#)
            .unwrap();
        let roles = cluster
            .psql("SELECT rolname FROM pg_roles WHERE rolname LIKE 'alice%';")
            .unwrap();
        assert_eq!(roles.trim(), "alice@contoso.com");
        let err = cluster.psql("SELECT * FROM no_such_table;").unwrap_err();
        assert!(err.to_string().contains("no_such_table"), "{err}");
        let dir = cluster.socket_dir().to_owned();
        assert!(dir.join("data/PG_VERSION").is_file());
        drop(cluster);
        assert!(!dir.exists(), "{} should be removed", dir.display());
    }

    #[test]
    fn missing_binaries_name_the_package_to_install() {
        let message = BackendError::NoBinaries.to_string();
        assert!(message.contains("apt-get install postgresql"), "{message}");
    }

    /// Run in a child process by the next test: start a cluster and exit without dropping it,
    /// as a test binary does with a cluster kept in a static.
    #[test]
    fn child_exits_without_dropping_its_cluster() {
        if std::env::var_os("PGENTRA_BACKEND_CHILD").is_none() {
            return;
        }
        let cluster = Cluster::start().expect("start a throwaway PostgreSQL");
        println!("DIR={}", cluster.socket_dir().display());
        std::mem::forget(cluster);
        std::process::exit(0);
    }

    #[test]
    fn cluster_is_removed_when_its_process_exits_without_drop() {
        let output = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "backend::tests::child_exits_without_dropping_its_cluster",
                "--nocapture",
            ])
            .env("PGENTRA_BACKEND_CHILD", "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let dir = stdout
            .lines()
            .find_map(|l| l.strip_prefix("DIR="))
            .unwrap_or_else(|| panic!("child printed no directory: {stdout}"));
        // The orphaned supervisor cleans up on its own; nothing here can be awaited, so look
        // for the result for a bounded time.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while Path::new(dir).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "{dir} was not removed"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
