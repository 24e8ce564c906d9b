//! The pools' upkeep, once a second: idle server connections past their lifetime or idle
//! timeout are closed, and each pool is topped up to its minimum of idle connections (the
//! instance's own pool is opened at start when it keeps a minimum), one login at a time.

use crate::config::PoolMode;
use crate::connector::Connector;
use crate::pool::{Pool, PoolKey};
use crate::shared::{InstanceState, Shared};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often the pools are looked after.
const TICK: Duration = Duration::from_secs(1);

pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    for instance in shared.instances() {
        open_own_pool(instance, &shared).await;
    }
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            _ = tick.tick() => {}
        }
        for instance in shared.instances() {
            instance.pools.retire();
            for pool in instance.pools.all() {
                if instance.pools.missing_idle(&pool) > 0 {
                    warm(instance, &pool, &shared).await;
                }
            }
        }
    }
    for instance in shared.instances() {
        instance.pools.close_all();
    }
}

/// Makes the pool an instance's clients use when they send no startup parameters that shape a
/// session — its pinned role (or the token's) and its database — if its settings keep a
/// minimum of idle connections, so that the next ticks fill it. Nothing when the upstream names
/// no database (the client's then decides) or no token is to be had.
async fn open_own_pool(instance: &InstanceState, shared: &Shared) {
    let config = &shared.config;
    let Some(database) = instance.instance.upstream.dbname.clone() else {
        return;
    };
    let role = match &instance.instance.user {
        Some(role) => role.clone(),
        None => {
            // Only worth a token when some pool keeps connections ahead.
            let overrides = [&instance.instance.pool]
                .into_iter()
                .chain(config.databases.values())
                .chain(config.roles.values());
            let ahead =
                config.pool.min_idle > 0 || overrides.into_iter().any(|o| o.min_idle > Some(0));
            if !ahead {
                return;
            }
            match shared.auth.credentials().await {
                Ok(creds) => creds.user().to_owned(),
                Err(error) => {
                    tracing::warn!(
                        error = %pgentra::ErrorChain(&error),
                        "no token to open server connections ahead with"
                    );
                    return;
                }
            }
        }
    };
    let settings = config.pool_settings(&instance.instance, &database, &role);
    if settings.mode == PoolMode::None || settings.min_idle == 0 {
        return;
    }
    let key = PoolKey {
        role,
        database,
        params: Vec::new(),
    };
    instance.pools.pool(&key, || settings);
}

/// Opens one connection ahead for `pool`, if there is room (failures are logged: a client
/// that comes meanwhile opens its own).
async fn warm(instance: &InstanceState, pool: &Arc<Pool>, shared: &Shared) {
    let mut connector = Connector::new(shared, instance);
    if let Err(refusal) = connector.warm(pool).await {
        tracing::warn!(
            upstream = %instance.target.name,
            role = pool.key.role,
            error = refusal.fields().get(b'M').unwrap_or_default(),
            "could not open a server connection ahead"
        );
    }
}
