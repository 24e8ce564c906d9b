//! The byte relay of a session with a server connection of its own (`--pool-mode none`, and
//! replication connections): bytes both ways until the session ends.
//!
//! When the client's side ends (it closed, or only shut down its sending side), the server is
//! told (the proxy shuts down its sending side too) and the client still gets what the server
//! sends; a server that has not closed within [`CLIENT_GONE_GRACE`] is running a query for a
//! client that left, so the query is cancelled — PostgreSQL would notice only when it next
//! reads or writes — and the session ends. When the server closes, the session ends at once.

use super::Relayed;
use crate::cancel::{self, CancelTarget};
use crate::startup::Stream;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Relay buffer per direction: small, since idle sessions are the common case and the kernel
/// buffers the rest.
const BUFFER: usize = 4096;
/// How long the server may go on after the client's side ended before its query is cancelled.
pub(crate) const CLIENT_GONE_GRACE: Duration = Duration::from_millis(500);

/// Relays until the server closes, or the client's side ends (and the server follows, or its
/// query is cancelled). `cancel` is where the server's queries are cancelled.
pub(crate) async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Box<dyn Stream>,
    server: &mut S,
    cancel: CancelTarget,
    connect_timeout: Duration,
) -> Relayed {
    let mut relayed = Relayed::default();
    {
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (mut server_read, mut server_write) = tokio::io::split(server);
        let to_server = pipe(&mut client_read, &mut server_write, &mut relayed.to_server);
        let to_client = pipe(&mut server_read, &mut client_write, &mut relayed.to_client);
        let grace = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(to_server, to_client, grace);
        let mut client_done = false;
        loop {
            tokio::select! {
                _ = &mut to_server, if !client_done => {
                    client_done = true;
                    grace.as_mut().reset(tokio::time::Instant::now() + CLIENT_GONE_GRACE);
                }
                _ = &mut to_client => break,
                () = &mut grace, if client_done => {
                    cancel::spawn_send(cancel, connect_timeout);
                    break;
                }
            }
        }
    }
    relayed
}

/// Copies `from` to `to` until `from` ends, then shuts `to` down (passing on the end).
async fn pipe<R, W>(from: &mut R, to: &mut W, count: &mut u64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0; BUFFER];
    loop {
        let n = from.read(&mut buffer).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buffer[..n]).await?;
        // TLS buffers records until flushed.
        to.flush().await?;
        *count += n as u64;
    }
}
