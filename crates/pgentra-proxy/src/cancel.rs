//! Cancel requests: the proxy issues each session its own key and maps it to the server
//! connection the session holds; a cancel request with that key is sent on over a new verified
//! TLS connection with the server's real key. Unknown keys do nothing, as in PostgreSQL.

use crate::server::{self, CancelsInFlight, Target};
use bytes::BytesMut;
use postgres_protocol::message::frontend;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// The proxy-issued keys of open sessions.
#[derive(Default)]
pub(crate) struct CancelKeys {
    keys: Mutex<HashMap<Key, CancelTarget>>,
}

impl CancelKeys {
    /// A new key for a session whose cancel requests go to `to`, from the OS's CSPRNG
    /// ([`pgentra_wire::random_cancel_key`]).
    pub(crate) fn issue(&self, to: CancelTarget) -> std::io::Result<Key> {
        loop {
            let ours = pgentra_wire::random_cancel_key()?;
            if let Entry::Vacant(entry) = crate::sync::lock(&self.keys).entry(ours) {
                entry.insert(to);
                return Ok(ours);
            }
        }
    }

    pub(crate) fn forget(&self, key: &Key) {
        crate::sync::lock(&self.keys).remove(key);
    }

    fn get(&self, key: &Key) -> Option<CancelTarget> {
        crate::sync::lock(&self.keys).get(key).cloned()
    }
}

/// Forwards a cancel request for a proxy-issued key, if it is one.
pub(crate) async fn forward(keys: &CancelKeys, pid: i32, key: &[u8], connect_timeout: Duration) {
    let Ok(key): Result<[u8; 4], _> = key.try_into() else {
        return;
    };
    let Some(to) = keys.get(&(pid, key)) else {
        tracing::debug!("cancel request with an unknown key ignored");
        return;
    };
    // Until the server has it, the connection is not handed to another client.
    let _in_flight = to.in_flight.start();
    match server::connect(&to.target, connect_timeout).await {
        Ok(mut stream) => {
            let mut request = BytesMut::new();
            frontend::cancel_request(to.key.0, i32::from_be_bytes(to.key.1), &mut request);
            let _ = stream.write_all(&request).await;
            let _ = stream.flush().await;
            // The server closes the connection once it has read the request.
            let _ = tokio::time::timeout(connect_timeout, stream.read(&mut [0; 1])).await;
        }
        Err(error) => tracing::warn!(%error, "could not forward a cancel request"),
    }
}
