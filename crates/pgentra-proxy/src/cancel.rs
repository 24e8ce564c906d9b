//! Cancel requests: the proxy issues each session its own key and maps it to the server
//! connection the session holds (in transaction pooling, the one it holds now, if any); a
//! cancel request with that key is sent on over a new verified TLS connection with the server's
//! real key. Unknown keys, and keys of sessions holding no server connection, do nothing, as in
//! PostgreSQL.

use crate::server::{self, ServerConn, Target};
use bytes::BytesMut;
use parking_lot::Mutex;
use postgres_protocol::message::frontend;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

/// A protocol 3.0 `BackendKeyData`: process ID and secret.
pub(crate) type Key = (i32, [u8; 4]);

/// Where a proxy-issued key's cancel requests go: a server and its own key.
#[derive(Clone)]
pub(crate) struct CancelTarget {
    pub(crate) target: Arc<Target>,
    pub(crate) key: Key,
    /// The server connection's count of cancels on their way.
    pub(crate) in_flight: Arc<CancelsInFlight>,
}

impl CancelTarget {
    /// Where cancel requests for a query on `server` (of `target`) go.
    pub(crate) fn of(target: &Arc<Target>, server: &ServerConn) -> Self {
        Self {
            target: Arc::clone(target),
            key: server.key,
            in_flight: Arc::clone(&server.cancels),
        }
    }
}

/// Where one session's cancel requests go now: the server connection it holds, or none.
#[derive(Default)]
pub(crate) struct Pointer(Mutex<Option<CancelTarget>>);

impl Pointer {
    /// Points the session's key at the server connection it now holds, or at none. Once it
    /// points away, no new cancel request reaches the old connection; those already on their
    /// way are counted in its [`CancelsInFlight`].
    pub(crate) fn point(&self, to: Option<CancelTarget>) {
        *self.0.lock() = to;
    }

    /// Where a cancel request goes, counted in flight from here (under the same lock as
    /// [`point`](Self::point), so a connection is never handed on with one uncounted).
    fn start(&self) -> Option<(CancelTarget, CancelGuard)> {
        let to = self.0.lock().clone()?;
        let guard = to.in_flight.start();
        Some((to, guard))
    }
}

/// The proxy-issued keys of open sessions, each with its session's [`Pointer`] (which the
/// session points without looking its key up).
#[derive(Default)]
pub(crate) struct CancelKeys {
    keys: Mutex<HashMap<Key, Arc<Pointer>>>,
}

impl CancelKeys {
    /// A new key for a session whose cancel requests go to `to` (nowhere yet: `None`), from
    /// the OS's CSPRNG ([`pgentra_wire::random_cancel_key`]), and its pointer.
    pub(crate) fn issue(&self, to: Option<CancelTarget>) -> std::io::Result<(Key, Arc<Pointer>)> {
        let pointer = Arc::new(Pointer(Mutex::new(to)));
        loop {
            let ours = pgentra_wire::random_cancel_key()?;
            if let Entry::Vacant(entry) = self.keys.lock().entry(ours) {
                entry.insert(Arc::clone(&pointer));
                return Ok((ours, pointer));
            }
        }
    }

    pub(crate) fn forget(&self, key: &Key) {
        self.keys.lock().remove(key);
    }

    /// Where a cancel request with `key` goes, counted in flight from here.
    fn start(&self, key: &Key) -> Option<(CancelTarget, CancelGuard)> {
        let pointer = Arc::clone(self.keys.lock().get(key)?);
        pointer.start()
    }
}

/// Forwards a cancel request for a proxy-issued key, if it is one.
pub(crate) async fn forward(keys: &CancelKeys, pid: i32, key: &[u8], connect_timeout: Duration) {
    let Ok(key): Result<[u8; 4], _> = key.try_into() else {
        return;
    };
    // Until the server has it, the connection is not handed to another client.
    let Some((to, _in_flight)) = keys.start(&(pid, key)) else {
        tracing::debug!("cancel request with an unknown key, or for no query, ignored");
        return;
    };
    send(&to, connect_timeout).await;
}

/// Sends a cancel request to `to` in the background, counted in flight (so the connection is
/// not handed to another client before the server has it).
pub(crate) fn spawn_send(to: CancelTarget, connect_timeout: Duration) {
    let in_flight = to.in_flight.start();
    tokio::spawn(async move {
        send(&to, connect_timeout).await;
        drop(in_flight);
    });
}

/// Sends a cancel request to `to` over a new verified TLS connection, and waits for the server
/// to close it (it has then signalled the backend); marks the connection unsure when it does
/// not in time.
pub(crate) async fn send(to: &CancelTarget, connect_timeout: Duration) {
    match server::connect(&to.target, connect_timeout).await {
        Ok(mut stream) => {
            let mut request = BytesMut::new();
            frontend::cancel_request(to.key.0, i32::from_be_bytes(to.key.1), &mut request);
            let _ = stream.write_all(&request).await;
            let _ = stream.flush().await;
            // The server closes the connection once it has read the request.
            if tokio::time::timeout(connect_timeout, stream.read(&mut [0; 1]))
                .await
                .is_err()
            {
                to.in_flight.unsure();
            }
        }
        Err(error) => tracing::warn!(%error, "could not forward a cancel request"),
    }
}

/// Cancel requests sent on to a server connection and not yet acknowledged (the server closes
/// the cancel connection once it has signalled the backend): a connection is not handed to
/// another client while one is on its way, or it could cancel that client's query.
#[derive(Debug, Default)]
pub(crate) struct CancelsInFlight {
    count: AtomicUsize,
    done: Notify,
    /// A cancel request was sent on, but the server did not close its connection in time:
    /// it may still act on it, so the connection is never handed on.
    unsure: AtomicBool,
}

impl CancelsInFlight {
    /// Counts one until the returned guard is dropped.
    pub(crate) fn start(self: &Arc<Self>) -> CancelGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        CancelGuard(Arc::clone(self))
    }

    /// Whether none is in flight now.
    pub(crate) fn none(&self) -> bool {
        self.count.load(Ordering::SeqCst) == 0 && !self.unsure.load(Ordering::SeqCst)
    }

    /// Marks the connection as one a cancel request may still reach.
    pub(crate) fn unsure(&self) {
        self.unsure.store(true, Ordering::SeqCst);
    }

    /// Resolves once none is in flight, or after `limit`; whether none is.
    pub(crate) async fn settled(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let done = self.done.notified();
                if self.count.load(Ordering::SeqCst) == 0 {
                    return;
                }
                done.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok() && !self.unsure.load(Ordering::SeqCst)
    }
}

/// One cancel request in flight.
pub(crate) struct CancelGuard(Arc<CancelsInFlight>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
        self.0.done.notify_waiters();
    }
}
