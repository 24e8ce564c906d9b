//! The admin HTTP endpoint: `/healthz`, `/readyz`, `/metrics`, `/pools` (JSON, like PgBouncer's
//! `SHOW POOLS`), and `POST /quitquitquit`.
//!
//! It has no authentication, so it is bounded like a public one: at most
//! [`MAX_ADMIN_CONNECTIONS`] connections at once, one request each, within
//! [`ADMIN_REQUEST_TIMEOUT`]; and `/quitquitquit` refuses what a web page could send (an
//! `Origin` header, or a `Host` that is not loopback), so only a local process can stop the
//! proxy, never a browser.

use crate::server;
use crate::shared::Shared;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

/// Admin connections served at once; more get a 503 and are closed.
pub(crate) const MAX_ADMIN_CONNECTIONS: usize = 16;
/// The time a connection gets for its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The time a connection gets in all, for its one request and the answer.
pub(crate) const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `/readyz` waits for a token, and for each upstream's TLS handshake.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    trigger: watch::Sender<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((mut stream, _)) = accepted else {
            // Out of file descriptors and the like: try again shortly.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tokio::spawn(async move {
                let busy = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 5\r\nconnection: close\r\n\r\nbusy\n";
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(busy)).await;
            });
            continue;
        };
        let shared = Arc::clone(&shared);
        let trigger = trigger.clone();
        tokio::spawn(async move {
            let _slot = slot;
            serve_one(stream, shared, trigger).await;
        });
    }
}

async fn serve_one(stream: TcpStream, shared: Arc<Shared>, trigger: watch::Sender<bool>) {
    let service = hyper::service::service_fn(move |request| {
        let shared = Arc::clone(&shared);
        let trigger = trigger.clone();
        async move { Ok::<_, std::convert::Infallible>(route(&request, &shared, &trigger).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let _ = tokio::time::timeout(ADMIN_REQUEST_TIMEOUT, connection).await;
}

async fn route<B>(
    request: &Request<B>,
    shared: &Shared,
    trigger: &watch::Sender<bool>,
) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n".into()),
        (&Method::GET, "/readyz") => match readiness(shared).await {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        },
        (&Method::GET, "/metrics") => {
            let mut body = shared.metrics.render(&shared.auth.stats());
            body.push_str(&crate::metrics::render_pools(&pools(shared)));
            let mut response = text(StatusCode::OK, body);
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        (&Method::GET, "/pools") => {
            let mut response = text(StatusCode::OK, pools_json(shared));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            response
        }
        (&Method::POST, "/quitquitquit") => match from_a_local_process(request) {
            Ok(()) => {
                let _ = trigger.send(true);
                text(StatusCode::OK, "draining\n".into())
            }
            Err(reason) => text(StatusCode::FORBIDDEN, format!("{reason}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Whether a request can only have come from a local process, not from a web page: browsers
/// send `Origin` with every cross-origin POST (and cannot leave it out), and a page that
/// rebinds its own DNS name to 127.0.0.1 still sends that name as `Host`.
fn from_a_local_process<B>(request: &Request<B>) -> Result<(), &'static str> {
    let header = |name| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
    };
    if header(hyper::header::ORIGIN).is_some() {
        return Err(
            "refused: requests from web pages (with an Origin header) may not stop the proxy",
        );
    }
    let host = header(hyper::header::HOST).unwrap_or_default();
    if !is_loopback_host(host) {
        return Err("refused: the Host header must name a loopback address");
    }
    Ok(())
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Ready: not draining, a valid token, and a verified TLS handshake with every upstream (a
/// server that accepts TCP but never answers is not ready), each within a short limit.
async fn readiness(shared: &Shared) -> Result<(), String> {
    if shared.is_draining() {
        return Err("draining".into());
    }
    let valid = shared
        .auth
        .stats()
        .expires_at
        .is_some_and(|at| at > SystemTime::now());
    if !valid {
        // Ask for one: the first request of a fresh proxy makes it ready.
        match tokio::time::timeout(READY_PROBE_TIMEOUT, shared.auth.credentials()).await {
            Err(_) => return Err(format!("no token within {READY_PROBE_TIMEOUT:?}")),
            Ok(Err(error)) => return Err(format!("no valid token: {error}")),
            Ok(Ok(_)) => {}
        }
    }
    for instance in shared.instances() {
        let target = &instance.target;
        if let Err(error) = server::connect(target, READY_PROBE_TIMEOUT).await {
            return Err(format!("{}: {error}", target.name));
        }
    }
    Ok(())
}

/// Every upstream's pools, by its `host:port`.
fn pools(shared: &Shared) -> Vec<(String, Vec<crate::pool::PoolSnapshot>)> {
    shared
        .instances()
        .iter()
        .map(|state| (state.target.name.clone(), state.pools.snapshots()))
        .collect()
}

/// `/pools`, like PgBouncer's `SHOW POOLS`: one object per pool.
fn pools_json(shared: &Shared) -> String {
    let mode = shared.config.pool.mode.as_str();
    let pools: Vec<serde_json::Value> = pools(shared)
        .into_iter()
        .flat_map(|(upstream, snapshots)| {
            snapshots.into_iter().map(move |p| {
                let mode = p.mode.as_str();
                let closed: serde_json::Map<String, serde_json::Value> = p
                    .closed
                    .iter()
                    .map(|(reason, n)| ((*reason).to_owned(), (*n).into()))
                    .collect();
                let pins: serde_json::Map<String, serde_json::Value> = p
                    .pins
                    .iter()
                    .map(|(reason, n)| ((*reason).to_owned(), (*n).into()))
                    .collect();
                serde_json::json!({
                    "upstream": upstream,
                    "role": p.role,
                    "database": p.database,
                    "params": p.params,
                    "mode": mode,
                    "size": p.size,
                    "server_active": p.active,
                    "server_idle": p.idle,
                    "clients": p.clients,
                    "clients_waiting": p.waiting,
                    "clients_pinned": p.pinned,
                    "pins": pins,
                    "server_logins": p.opened,
                    "reuses": p.reused,
                    "resets": p.resets,
                    "replays": p.replays,
                    "state_checks": p.state_checks,
                    "waits": p.waits,
                    "wait_seconds": p.wait_seconds,
                    "server_closes": closed,
                })
            })
        })
        .collect();
    format!("{}\n", serde_json::json!({ "mode": mode, "pools": pools }))
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts() {
        for host in [
            "localhost",
            "localhost:9187",
            "127.0.0.1:9187",
            "127.1.2.3",
            "[::1]:9187",
            "[::1]",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "",
            "evil.example",
            "evil.example:9187",
            "10.0.0.1:9187",
            "[2001:db8::1]:1",
            "localhost.evil.example",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
