//! The byte relay of a session with its own server connection: bytes both ways until the
//! session ends.
//!
//! When the client half-closes (it shut down its sending side), the server still gets what
//! the client sent and the client still gets the answers, as a direct connection to PostgreSQL
//! would give it: the proxy shuts down its sending side to the server too, and the session ends
//! when the server closes. When the server closes, the session ends at once.

use crate::startup::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// Relay buffer per direction: small, since idle sessions are the common case and the kernel
/// buffers the rest.
const RELAY_BUFFER: usize = 4096;

/// Bytes relayed each way.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Relayed {
    pub(crate) to_server: u64,
    pub(crate) to_client: u64,
}

/// Relays until the server closes, the client goes away (resets, or closes and the server
/// follows), or `kill` turns true.
pub(crate) async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Box<dyn Stream>,
    server: &mut S,
    mut kill: watch::Receiver<bool>,
) -> Relayed {
    let mut relayed = Relayed::default();
    {
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (mut server_read, mut server_write) = tokio::io::split(server);
        let to_server = pipe(&mut client_read, &mut server_write, &mut relayed.to_server);
        let to_client = pipe(&mut server_read, &mut client_write, &mut relayed.to_client);
        tokio::pin!(to_server, to_client);
        let mut client_done = false;
        loop {
            tokio::select! {
                ended = &mut to_server, if !client_done => match ended {
                    // A clean end of the client's side: the server was told, and answers on.
                    Ok(()) => client_done = true,
                    Err(_) => break,
                },
                _ = &mut to_client => break,
                _ = kill.wait_for(|kill| *kill) => break,
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
    let mut buffer = vec![0; RELAY_BUFFER];
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
