//! `pgentra proxy`: Entra ID logins for every PostgreSQL client, with no code, and a pool of
//! server connections between them.
//!
//! Every setting is defined once, in [`settings`]: its flag, its `PGENTRA_PROXY_*` variable and
//! its key in the TOML file (`--config`). Flags win over variables, which win over the file,
//! which wins over the defaults.

mod config;
mod file;
mod settings;

pub(crate) use settings::with_defaults;

use crate::Context;
use crate::auth::AuthArgs;
use crate::error::CliError;
use crate::output::{init_logging, shutdown_signal};
use pgentra_proxy::Proxy;
use settings::{PoolSettings, Settings};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Listens locally and logs clients in to Azure Database for PostgreSQL with a fresh Entra ID
/// token over verified TLS, pooling the server connections.
#[derive(Debug, Default, clap::Args)]
pub(crate) struct Args {
    /// Upstream servers: a `postgres://` URL, `key=value` settings or a host name. The first
    /// listens on --listen, the next ones on the following ports. Default: the `PG*`
    /// variables.
    #[arg(
        value_name = "UPSTREAM",
        env = "PGENTRA_PROXY_UPSTREAM",
        value_delimiter = ','
    )]
    upstreams: Vec<String>,
    /// A TOML file with the same settings, in snake case, and `[[instance]]` tables (flags and
    /// variables win over it).
    #[arg(long, value_name = "FILE", env = "PGENTRA_PROXY_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
    #[command(flatten)]
    pool: PoolSettings,
    #[command(flatten)]
    auth: AuthArgs,
}

pub(super) const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 5432);

pub(crate) fn run(args: &Args, context: Context) -> Result<ExitCode, CliError> {
    let file = match &args.config {
        Some(path) => file::read(path)?,
        None => file::File::default(),
    };
    let settings = args.settings.clone().or(file.settings.clone());
    let pool = args.pool.clone().or(file.pool.clone());
    let auth = args.auth.clone().or(file.auth.clone());
    // A service: its sessions are logged (info) unless RUST_LOG says otherwise.
    init_logging(
        context.verbose.max(1),
        settings.log_format.unwrap_or_default(),
    );
    let config = config::config(&args.upstreams, &settings, &pool, &file)?;
    let auth = auth.provider(None)?;
    let threads = settings
        .threads
        .unwrap_or_else(pgentra_proxy::default_threads);
    let runtime = pgentra_proxy::runtime(threads)?;
    let check = settings.check.unwrap_or(false);
    runtime.block_on(async {
        let shutdown = shutdown_signal();
        let proxy = Proxy::bind(config, auth).await?;
        if check {
            proxy.check().await?;
        }
        for addr in proxy.local_addrs() {
            tracing::info!(%addr, "listening; SIGTERM or Ctrl-C drains and stops");
        }
        proxy.run(shutdown).await;
        Ok::<_, CliError>(())
    })?;
    Ok(ExitCode::SUCCESS)
}
