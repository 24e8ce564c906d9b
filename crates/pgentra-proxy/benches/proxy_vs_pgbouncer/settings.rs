//! Session settings in transaction pooling: each client sets two settings once after it
//! connects (as pgjdbc and Sequelize do), then runs select-only transactions. pgentra replays
//! them on its pool's connections; the previous build, when one is given, pinned each client to
//! a server connection of its own (so it needs a pool as large as the clients to run at all);
//! PgBouncer lets them leak to whichever client gets the connection next.

use super::{
    Helper, Knobs, Pooling, Result, Setup, Target, Workload, client_backends, median, pgbench_run,
    rotating_rounds,
};
use std::path::{Path, PathBuf};

/// The pgbench script: the settings once per client (`-D configured=0`; pgbench keeps a
/// client's variables across its transactions), then a select-only transaction.
const SCRIPT: &str = "\\if :configured = 0
SET extra_float_digits = 3;
SET statement_timeout = '30s';
\\set configured 1
\\endif
\\set aid random(1, 100000)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
";

/// The script's file, written once.
pub(super) fn script() -> Result<&'static Path> {
    static FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(file) = FILE.get() {
        return Ok(file);
    }
    let file =
        std::env::temp_dir().join(format!("pgentra-bench-settings-{}.sql", std::process::id()));
    std::fs::write(&file, SCRIPT)?;
    Ok(FILE.get_or_init(|| file))
}

/// The section: fresh helpers, so that the server connections each opens can be counted.
pub(super) fn replay_vs_pinned(
    knobs: &Knobs,
    setup: &Setup,
    previous: Option<&Path>,
) -> Result<()> {
    let clients = knobs.txn_clients;
    let (proxy, bouncer) = setup.transaction_helpers(knobs)?;
    // A server connection for each client, which it pins.
    let own = Pooling {
        mode: "transaction",
        size: clients as usize,
    };
    let sessions = clients as usize + 10;
    let pinned = previous
        .map(|exe| {
            let serving = Helper::serving(&setup.upstream, sessions, &setup.sockets, own, &[]);
            Helper::serve(exe, serving)
        })
        .transpose()?;
    let mut targets = vec![
        Target::through("pgbouncer", &bouncer, None, "simple"),
        Target::through("pgentra", &proxy, None, "simple"),
    ];
    if let Some(pinned) = &pinned {
        targets.push(Target::through("pinned", pinned, None, "simple"));
    }
    println!();
    println!(
        "transaction pooling, two SETs per client then select-only: pgbench -n -T {} -c {clients} -j 2, {} round(s); pgentra and PgBouncer with {} server connections, the previous build (settings pin) with one per client; ratios are the median of each round's value / PgBouncer's",
        knobs.seconds, knobs.rounds, knobs.txn_pool
    );
    // Each target's first run opens its server connections: counted here.
    let mut used = Vec::new();
    for target in &targets {
        let before = client_backends(&setup.cluster)?;
        pgbench_run(&setup.pgbench, target, Workload::Settings, clients, 1)?;
        // pgbench's own sessions are gone when it returns.
        used.push(client_backends(&setup.cluster)?.saturating_sub(before));
    }
    let rounds = rotating_rounds(&setup.pgbench, &targets, Workload::Settings, clients, knobs)?;
    let m = |measure: &dyn Fn(&[super::Sample]) -> f64| median(rounds.iter().map(|r| measure(r)));
    println!(
        "{:<10} {:>8} {:>7} {:>9} {:>7} {:>12}  per round: tps ratios",
        "through", "tps", "ratio", "cpu µs", "ratio", "server conns"
    );
    for (i, target) in targets.iter().enumerate() {
        let per_round: Vec<String> = (rounds.iter())
            .map(|r| format!("{:.3}", r[i].tps / r[0].tps))
            .collect();
        println!(
            "{:<10} {:>8.0} {:>7.3} {:>9.1} {:>7.3} {:>12}  {}",
            target.name,
            m(&|r| r[i].tps),
            m(&|r| r[i].tps / r[0].tps),
            m(&|r| r[i].cpu_us),
            m(&|r| r[i].cpu_us / r[0].cpu_us),
            used[i],
            per_round.join(" "),
        );
    }
    drop((proxy, bouncer, pinned));
    Ok(())
}
