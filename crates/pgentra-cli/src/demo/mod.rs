//! `pgentra demo`: a pool kept logged in across several token lifetimes, against the emulator.
//!
//! The emulator issues short-lived tokens; the real `ManagedIdentityCredential` fetches them
//! from its IMDS endpoint; a deadpool-postgres pool retires connections after a fraction of a
//! token's life, so new logins keep happening with whatever token is current. Progress goes to
//! standard error, the summary (or `--json`) to standard output.
//!
//! This file wires the emulator, the credential and the pool together and runs the clock;
//! [`workload`] is the clients, [`progress`] what is shown meanwhile, [`summary`] the result.

mod progress;
mod summary;
mod workload;

use crate::Context;
use crate::error::CliError;
use crate::output::print_json;
use deadpool_postgres::Pool;
use pgentra::EntraAuth;
use pgentra::conninfo::ConnInfo;
use pgentra::credential::CredentialChain;
use pgentra::tls::SslMode;
use pgentra_emulator::{Emulator, EmulatorConfig};
use progress::Progress;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};
use summary::{Summary, rss_kib};
use tokio::time::MissedTickBehavior;
use workload::Workload;

/// Starts the emulator with a throwaway PostgreSQL and short-lived tokens, and runs a pooled
/// workload through pgentra while tokens expire and are refreshed.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// How long to run the workload.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Lifetime of the emulator's tokens.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    token_lifetime: Duration,
    /// Pool size: connections used at once.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Also run this many sessions through a `pgentra proxy` (in this process), each
    /// reconnecting like a pooled connection.
    #[arg(long, default_value_t = 0)]
    proxy_sessions: usize,
}

pub(crate) fn run(args: &Args, context: Context) -> Result<ExitCode, CliError> {
    validate(args)?;
    // azure_identity picks App Service, Arc or Cloud Shell over IMDS from the process
    // environment, which would send the demo's token requests away from the emulator.
    if let Some(name) = ["IDENTITY_ENDPOINT", "MSI_ENDPOINT"]
        .into_iter()
        .find(|name| std::env::var_os(name).is_some())
    {
        return Err(CliError::Usage(format!(
            "{name} is set, so ManagedIdentityCredential would not ask the emulator's IMDS endpoint; unset it for the demo"
        )));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(CliError::io("starting the runtime"))?;
    eprintln!("pgentra demo: starting a throwaway PostgreSQL and the Entra ID emulator…");
    let emulator = Emulator::start(EmulatorConfig {
        token_lifetime: args.token_lifetime,
        ..EmulatorConfig::default()
    })?;
    // The unchanged managed-identity credential, its IMDS requests sent to the emulator.
    let chain = CredentialChain::from_vars([
        (
            "AZURE_TOKEN_CREDENTIALS",
            "ManagedIdentityCredential".to_owned(),
        ),
        (
            "AZURE_POD_IDENTITY_AUTHORITY_HOST",
            emulator.identity().imds_authority(),
        ),
    ])?;
    let auth = EntraAuth::builder().credential_chain(chain).build()?;
    let mut info = ConnInfo::default();
    info.host = Some("localhost".into());
    info.port = Some(emulator.gateway().port());
    info.dbname = Some("postgres".into());
    info.sslmode = Some(SslMode::VerifyFull);
    info.sslrootcert = Some(emulator.ca_file().to_owned());
    let connector = pgentra::tokio_postgres::EntraConnector::new(auth.clone(), &info)?;
    let pool = pgentra::deadpool::pool(connector, args.connections)?;

    let summary = runtime.block_on(demo(args, context, &emulator, &auth, &info, pool))?;
    let problems = summary.problems();
    if context.json {
        print_json(&serde_json::json!(summary.json(&problems)));
    } else {
        summary.print(context, &problems);
    }
    if problems.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(CliError::Failed(format!(
            "demo failed: {}",
            problems.join("; ")
        )))
    }
}

fn validate(args: &Args) -> Result<(), CliError> {
    if args.duration.is_zero() {
        return Err(CliError::Usage("--duration must be more than 0s".into()));
    }
    if args.token_lifetime < Duration::from_secs(2) {
        return Err(CliError::Usage(format!(
            "--token-lifetime must be at least 2s (got {})",
            humantime::format_duration(args.token_lifetime)
        )));
    }
    if !(1..=100).contains(&args.connections) {
        return Err(CliError::Usage(format!(
            "--connections must be between 1 and 100 (got {})",
            args.connections
        )));
    }
    if args.proxy_sessions > 100 {
        return Err(CliError::Usage(format!(
            "--proxy-sessions must be at most 100 (got {})",
            args.proxy_sessions
        )));
    }
    Ok(())
}

/// Starts the workers and shows progress until the duration passes or Ctrl-C.
async fn demo(
    args: &Args,
    context: Context,
    emulator: &Emulator,
    auth: &EntraAuth,
    info: &ConnInfo,
    pool: Pool,
) -> Result<Summary, CliError> {
    // The first token, before the clock starts: it names the role, and a credential that
    // cannot get one fails here with its reason.
    let first = auth.credentials().await?;
    progress::print_intro(args, context, emulator, auth, &first);
    let workload = Workload::start(args, &pool, auth, info, first.user()).await?;
    let counters = Arc::clone(&workload.counters);

    let progress = Progress::start(auth, emulator, &counters);
    let mut tokens = auth.subscribe();
    let mut previous = tokens.borrow_and_update().clone().unwrap_or(first);
    let mut refresh_leads = Vec::new();
    let mut ticks = tokio::time::interval(progress.interval());
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    ticks.tick().await;
    let deadline = tokio::time::sleep(args.duration);
    tokio::pin!(deadline);
    // Memory is first measured once the workload has run for a while (pools full, caches
    // warm), so that start and end compare like with like.
    let warm = tokio::time::sleep(args.token_lifetime.min(args.duration / 4));
    tokio::pin!(warm);
    let mut rss_start = None;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let interrupted = loop {
        tokio::select! {
            () = &mut deadline => break false,
            _ = &mut ctrl_c => break true,
            () = &mut warm, if rss_start.is_none() => rss_start = rss_kib(),
            _ = ticks.tick() => progress.show(),
            Ok(()) = tokens.changed() => {
                let Some(new) = tokens.borrow_and_update().clone() else { continue };
                if new.fetched_at() == previous.fetched_at() {
                    continue;
                }
                let lead = seconds_between(new.fetched_at(), previous.expires_at());
                refresh_leads.push(lead);
                progress.refreshed(refresh_leads.len() + 1, lead);
                previous = new;
            }
        }
    };
    let elapsed = progress.elapsed();
    let rss_end = rss_kib();
    workload.stop().await;
    progress.finish(elapsed);
    // Closes the connections before the emulator goes.
    pool.close();

    Ok(Summary {
        elapsed,
        interrupted,
        token_lifetime: args.token_lifetime,
        connections: args.connections,
        proxy_sessions: args.proxy_sessions,
        role: previous.user().to_owned(),
        tokens_fetched: auth.stats().tokens_fetched,
        connections_opened: emulator.gateway().logins(),
        gateway_refused: emulator.gateway().rejected(),
        queries: counters.queries.load(Ordering::Relaxed),
        login_failures: counters.login_failures.load(Ordering::Relaxed),
        query_failures: counters.query_failures.load(Ordering::Relaxed),
        refresh_leads,
        login_seconds: counters.login_seconds(),
        rss_kib: (rss_start, rss_end),
        first_error: counters.first_error(),
    })
}

/// `later − earlier` in seconds, negative if `later` is before `earlier`.
fn seconds_between(earlier: SystemTime, later: SystemTime) -> f64 {
    match later.duration_since(earlier) {
        Ok(ahead) => ahead.as_secs_f64(),
        Err(behind) => -behind.duration().as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(duration: u64, token_lifetime: u64, connections: usize) -> Args {
        Args {
            duration: Duration::from_secs(duration),
            token_lifetime: Duration::from_secs(token_lifetime),
            connections,
            proxy_sessions: 0,
        }
    }

    #[test]
    fn flags_are_checked() {
        assert!(validate(&args(60, 20, 8)).is_ok());
        for (bad, flag) in [
            (args(0, 20, 8), "--duration"),
            (args(60, 1, 8), "--token-lifetime"),
            (args(60, 20, 0), "--connections"),
            (args(60, 20, 101), "--connections"),
        ] {
            let error = validate(&bad).unwrap_err();
            assert!(matches!(error, CliError::Usage(_)), "{error:?}");
            assert!(error.to_string().starts_with(flag), "{error}");
        }
    }

    #[test]
    fn leads_are_signed() {
        let now = SystemTime::now();
        let later = now + Duration::from_millis(1500);
        assert!((seconds_between(now, later) - 1.5).abs() < 1e-9);
        assert!((seconds_between(later, now) + 1.5).abs() < 1e-9);
    }
}
