//! The pools' upkeep, once a second: idle server connections past their lifetime or idle
//! timeout are closed, and each pool is topped up to its minimum of idle connections (the
//! instance's own pool is opened at start), one login at a time.

use crate::config::PoolMode;
use crate::pool::{Pool, PoolKey};
use crate::server;
use crate::shared::{InstanceState, Shared};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::watch;

/// How often the pools are looked after.
const TICK: Duration = Duration::from_secs(1);

pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let pool_config = &shared.config.pool;
    if pool_config.mode == PoolMode::None {
        return;
    }
    if pool_config.min_idle > 0 {
        for instance in shared.instances() {
            if let Some(key) = own_pool(instance, &shared).await {
                instance.pools.pool(&key);
            }
        }
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

/// The key of the pool an instance's clients use when they send no startup parameters that
/// shape a session: its pinned role (or the token's) and its database. `None` when the
/// upstream names no database (the client's then decides) or no token is to be had.
async fn own_pool(instance: &InstanceState, shared: &Shared) -> Option<PoolKey> {
    let database = instance.instance.upstream.dbname.clone()?;
    let role = match &instance.instance.user {
        Some(role) => role.clone(),
        None => match shared.auth.credentials().await {
            Ok(creds) => creds.user().to_owned(),
            Err(error) => {
                tracing::warn!(
                    error = %pgentra::ErrorChain(&error),
                    "no token to open server connections ahead with"
                );
                return None;
            }
        },
    };
    Some(PoolKey {
        role,
        database,
        params: Vec::new(),
    })
}

/// Opens one connection ahead for `pool`, if there is room (failures are logged: a client
/// that comes meanwhile opens its own).
async fn warm(instance: &InstanceState, pool: &Arc<Pool>, shared: &Shared) {
    let pools = &instance.pools;
    let Some(slots) = pools.try_slots(pool) else {
        return;
    };
    let key = &pool.key;
    let Ok(startup) = server::startup(&key.role, Some(&key.database), &key.params) else {
        return;
    };
    let opened = async {
        let creds =
            (shared.auth.credentials().await).map_err(|e| pgentra::ErrorChain(&e).to_string())?;
        let server = server::login(
            &instance.target,
            shared.config.connect_timeout,
            &startup,
            creds.password(),
        )
        .await
        .map_err(|e| e.to_string())?;
        Ok::<_, String>((server, creds.expires_at()))
    };
    match tokio::time::timeout(shared.config.login_timeout, opened).await {
        Ok(Ok((server, expiry))) => {
            pool.stats.opened.fetch_add(1, Ordering::Relaxed);
            pool.put(pools.pooled(server, slots, expiry));
        }
        Ok(Err(error)) => tracing::warn!(
            upstream = %instance.target.name,
            role = key.role,
            error,
            "could not open a server connection ahead"
        ),
        Err(_) => tracing::warn!(
            upstream = %instance.target.name,
            role = key.role,
            "opening a server connection ahead timed out"
        ),
    }
}
