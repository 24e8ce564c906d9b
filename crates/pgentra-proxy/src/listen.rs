//! The listeners: TCP and Unix sockets, and the loop that accepts clients and starts a session
//! for each.

use crate::config::ProxyError;
use crate::session;
use crate::shared::{InstanceState, Shared};
use crate::startup::ClientConn;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// Binds a Unix socket at `path` with permissions `mode`, replacing a stale socket an earlier
/// run left behind.
pub(crate) fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, ProxyError> {
    use std::os::unix::fs::PermissionsExt as _;
    let error = |source| ProxyError::Listen {
        address: path.display().to_string(),
        source,
    };
    if std::fs::symlink_metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt as _;
        m.file_type().is_socket()
    }) && std::os::unix::net::UnixStream::connect(path).is_err()
    {
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(error)?;
    Ok(listener)
}

/// Accepts clients until `stop`, a session task each.
pub(crate) async fn accept_loop(
    listener: Listener,
    instance: Arc<InstanceState>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            accepted = accept(&listener) => accepted,
        };
        let conn = match accepted {
            Ok(conn) => conn,
            Err(error) => {
                // Out of file descriptors and the like: keep serving the open sessions.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        shared.metrics.connection_opened();
        let session = {
            let shared = Arc::clone(&shared);
            let instance = Arc::clone(&instance);
            async move {
                match Arc::clone(&shared.pending).try_acquire_owned() {
                    Ok(pending) => session::serve(conn, pending, instance, shared).await,
                    Err(error) => session::refuse_pending(conn, &shared, error).await,
                }
            }
        };
        shared.spawn_session(session);
    }
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
}

async fn accept(listener: &Listener) -> std::io::Result<ClientConn> {
    match listener {
        Listener::Tcp(tcp) => {
            let (stream, _) = tcp.accept().await?;
            let _ = stream.set_nodelay(true);
            // A client that vanished must not keep its server connection open.
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&crate::config::keepalive());
            Ok(ClientConn::new(Box::new(stream), false))
        }
        Listener::Unix(unix, _) => Ok(ClientConn::new(Box::new(unix.accept().await?.0), true)),
    }
}
