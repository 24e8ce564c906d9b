//! `login_latency`: how long a login through the emulator's gateway takes, against a TLS login
//! straight to the PostgreSQL behind it, in the same run.
//!
//! Both sides are `pgbench -C` (a new connection for every transaction, `SELECT 1`) with one
//! client, `sslmode=verify-full`:
//!
//! - direct: pgbench → PostgreSQL over TLS (the throwaway cluster, given a certificate for this),
//!   trusted on loopback, so no password exchange;
//! - gateway: pgbench → the gateway over TLS, a token as the cleartext password, the token
//!   checked, then the gateway's own login to PostgreSQL on its Unix socket.
//!
//! Rounds run the two back to back in alternating order; the table shows medians of pgbench's
//! "average connection time" and of the transactions per second, and the median of each round's
//! gateway/direct ratio. Nothing is asserted; the last line compares with the target (within
//! 1.5× of the direct TLS login).
//!
//! ```sh
//! cargo bench -p pgentra-emulator --bench login_latency        # 5 rounds of 5 s
//! PGENTRA_BENCH_ROUNDS=3 PGENTRA_BENCH_SECONDS=2 cargo bench -p pgentra-emulator --bench login_latency
//! ```
//!
//! Needs the PostgreSQL server binaries with `pgbench` (`apt-get install postgresql`).

use pgentra_emulator::ca::Ca;
use pgentra_emulator::issuer::Principal;
use pgentra_emulator::{Emulator, EmulatorConfig, USER};
use std::path::Path;
use std::process::{Command, ExitCode};

type Result<T, E = Box<dyn std::error::Error>> = std::result::Result<T, E>;

/// The issue's target: a gateway login within this factor of a direct TLS login.
const TARGET: f64 = 1.5;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("login_latency: {}", pgentra::ErrorChain(&*error));
            ExitCode::FAILURE
        }
    }
}

fn knob(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(value) => Ok(value
            .trim()
            .parse()
            .map_err(|_| format!("{name}={value:?} is not a number"))?),
        Err(_) => Ok(default),
    }
}

/// One pgbench run's figures.
#[derive(Debug, Clone, Copy)]
struct Figures {
    /// pgbench's "average connection time", in milliseconds.
    connect_ms: f64,
    tps: f64,
}

fn run() -> Result<()> {
    let rounds = knob("PGENTRA_BENCH_ROUNDS", 5)?.max(1);
    let seconds = knob("PGENTRA_BENCH_SECONDS", 5)?.max(1);
    let emulator = Emulator::start(EmulatorConfig::default())?;
    let cluster = emulator.cluster().ok_or("no throwaway cluster")?;
    // The cluster's own TLS, from a CA of the bench's, for the direct logins.
    let ca = Ca::new()?;
    cluster.enable_tls(ca.server_cert_pem(), ca.server_key_pem())?;
    let dir = cluster.scratch_dir("login-latency")?;
    let direct_ca = dir.join("direct-ca.pem");
    std::fs::write(&direct_ca, ca.pem())?;
    let script = dir.join("select1.sql");
    std::fs::write(&script, "SELECT 1;\n")?;
    let pgbench = cluster.bin_dir().join("pgbench");
    let token = emulator.token_for(&Principal::user(USER)).token;

    let direct = Target {
        name: "direct TLS",
        env: vec![
            ("PGPORT", cluster.port().to_string()),
            ("PGUSER", "postgres".into()),
            ("PGSSLROOTCERT", direct_ca.display().to_string()),
        ],
    };
    let gateway = Target {
        name: "gateway",
        env: vec![
            ("PGPORT", emulator.gateway().port().to_string()),
            ("PGUSER", USER.into()),
            ("PGPASSWORD", token),
            ("PGSSLROOTCERT", emulator.ca_file().display().to_string()),
        ],
    };
    println!(
        "login_latency: pgbench -C, 1 client, SELECT 1, {rounds} rounds of {seconds} s, verify-full"
    );
    let (mut direct_runs, mut gateway_runs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [&direct, &gateway]
        } else {
            [&gateway, &direct]
        };
        let mut figures = [None, None];
        for target in order {
            let measured = target.run(&pgbench, &script, seconds)?;
            let slot = usize::from(std::ptr::eq(target, &gateway));
            figures[slot] = Some(measured);
        }
        let (Some(d), Some(g)) = (figures[0], figures[1]) else {
            return Err("a target did not run".into());
        };
        println!(
            "  round {}: direct {:.2} ms, gateway {:.2} ms, ratio {:.2}",
            round + 1,
            d.connect_ms,
            g.connect_ms,
            g.connect_ms / d.connect_ms
        );
        direct_runs.push(d);
        gateway_runs.push(g);
        ratios.push(g.connect_ms / d.connect_ms);
    }
    let median_of =
        |runs: &[Figures], pick: fn(&Figures) -> f64| median(runs.iter().map(pick).collect());
    println!();
    println!("| target | connection time | logins/s |");
    println!("|---|---|---|");
    for (target, runs) in [(&direct, &direct_runs), (&gateway, &gateway_runs)] {
        println!(
            "| {} | {:.2} ms | {:.0} |",
            target.name,
            median_of(runs, |f| f.connect_ms),
            median_of(runs, |f| f.tps)
        );
    }
    let ratio = median(ratios);
    let verdict = if ratio <= TARGET { "met" } else { "missed" };
    println!();
    println!(
        "gateway/direct login time: {ratio:.2} (median of {rounds} rounds); target ≤ {TARGET}: {verdict}"
    );
    Ok(())
}

struct Target {
    name: &'static str,
    env: Vec<(&'static str, String)>,
}

impl Target {
    fn run(&self, pgbench: &Path, script: &Path, seconds: u64) -> Result<Figures> {
        let output = Command::new(pgbench)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("PGHOST", "localhost")
            .env("PGDATABASE", "postgres")
            .env("PGSSLMODE", "verify-full")
            .env("PGCONNECT_TIMEOUT", "10")
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .args(["-n", "-C", "-c", "1", "-T", &seconds.to_string(), "-f"])
            .arg(script)
            .output()?;
        let out = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            return Err(format!(
                "pgbench against {} failed: {}{out}",
                self.name,
                String::from_utf8_lossy(&output.stderr)
            )
            .into());
        }
        let figure = |prefix: &str| -> Result<f64> {
            out.lines()
                .find_map(|line| line.trim().strip_prefix(prefix))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("no {prefix:?} in pgbench's output:\n{out}").into())
        };
        Ok(Figures {
            connect_ms: figure("average connection time =")?,
            tps: figure("tps =")?,
        })
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}
