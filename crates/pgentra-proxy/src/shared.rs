//! What every session of a proxy shares: its settings, the token provider, limits, the cancel
//! keys and the metrics.

use crate::cancel::CancelKeys;
use crate::config::{Instance, ProxyConfig, ProxyError};
use crate::metrics::Metrics;
use crate::password::PasswordGate;
use crate::pool::Pools;
use crate::server::Target;
use parking_lot::Mutex;
use pgentra::EntraAuth;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;

pub(crate) struct Shared {
    pub(crate) config: ProxyConfig,
    instances: Vec<Arc<InstanceState>>,
    pub(crate) auth: EntraAuth,
    pub(crate) metrics: Arc<Metrics>,
    /// Slots of authenticated sessions (`max_connections`).
    pub(crate) sessions: Arc<Semaphore>,
    /// Slots of clients still in the startup phase.
    pub(crate) pending: Arc<Semaphore>,
    pub(crate) cancel_keys: CancelKeys,
    pub(crate) password: Option<PasswordGate>,
    pub(crate) client_tls: Option<tokio_rustls::TlsAcceptor>,
    draining: watch::Sender<bool>,
    /// The sessions' tasks, which the drain timeout ends.
    sessions_running: Mutex<JoinSet<()>>,
    /// Woken each time a client connection closes.
    closed: Notify,
}

impl Shared {
    pub(crate) fn new(
        config: ProxyConfig,
        auth: EntraAuth,
        instances: Vec<Arc<InstanceState>>,
    ) -> Self {
        Self {
            instances,
            sessions: Arc::new(Semaphore::new(config.max_connections)),
            pending: Arc::new(Semaphore::new(config.pending_logins())),
            password: config.client_password.clone().map(PasswordGate::new),
            client_tls: config
                .client_tls
                .clone()
                .map(tokio_rustls::TlsAcceptor::from),
            config,
            auth,
            metrics: Arc::default(),
            cancel_keys: CancelKeys::default(),
            draining: watch::Sender::new(false),
            sessions_running: Mutex::new(JoinSet::new()),
            closed: Notify::new(),
        }
    }

    /// Every upstream server, in configuration order.
    pub(crate) fn instances(&self) -> &[Arc<InstanceState>] {
        &self.instances
    }

    pub(crate) fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    pub(crate) fn start_draining(&self) {
        self.draining.send_replace(true);
    }

    /// Turns true when the proxy starts draining.
    pub(crate) fn draining(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// Runs a client connection's session in a task of its own, until it ends or the drain
    /// timeout ends it ([`end_sessions`](Self::end_sessions)); the connection is counted as
    /// closed then, whichever way it ends.
    pub(crate) fn spawn_session(
        self: &Arc<Self>,
        session: impl Future<Output = ()> + Send + 'static,
    ) {
        let shared = Arc::clone(self);
        let session = async move {
            let _counted = Closed(shared);
            session.await;
        };
        let mut running = self.sessions_running.lock();
        // Sessions that ended are reaped as new ones start, so the set holds the running ones.
        while running.try_join_next().is_some() {}
        running.spawn(session);
    }

    /// Ends every session still running: their server connections are closed, and their
    /// clients' connections (the drain timeout has passed).
    pub(crate) fn end_sessions(&self) {
        self.sessions_running.lock().abort_all();
    }

    /// Resolves once no client connection is open.
    pub(crate) async fn all_closed(&self) {
        loop {
            let closed = self.closed.notified();
            if self.metrics.connections_open() == 0 {
                return;
            }
            closed.await;
        }
    }
}

/// Counts a client connection as closed when dropped: when its session ends, or is ended.
struct Closed(Arc<Shared>);

impl Drop for Closed {
    fn drop(&mut self) {
        self.0.metrics.connection_closed();
        self.0.closed.notify_waiters();
    }
}

/// One upstream server's settings, how to reach it, and its server connections.
pub(crate) struct InstanceState {
    pub(crate) instance: Instance,
    pub(crate) target: Arc<Target>,
    pub(crate) pools: Pools,
}

impl InstanceState {
    pub(crate) fn new(
        instance: Instance,
        max_server_connections: usize,
    ) -> Result<Self, ProxyError> {
        Ok(Self {
            target: Arc::new(Target::new(&instance)?),
            pools: Pools::new(max_server_connections),
            instance,
        })
    }
}
