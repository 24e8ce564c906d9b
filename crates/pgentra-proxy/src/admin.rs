//! The admin HTTP endpoint: `/healthz`, `/readyz`, `/metrics`, and `POST /quitquitquit`.

use crate::Shared;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How long `/readyz` waits for each upstream server to accept a TCP connection.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    trigger: watch::Sender<bool>,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let shared = Arc::clone(&shared);
        let trigger = trigger.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let shared = Arc::clone(&shared);
                let trigger = trigger.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(route(&request, &shared, &trigger).await)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
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
            let mut response = text(StatusCode::OK, shared.metrics.render(&shared.auth.stats()));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        (&Method::POST, "/quitquitquit") => {
            let _ = trigger.send(true);
            text(StatusCode::OK, "draining\n".into())
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Ready: not draining, a valid token cached, and every upstream server reachable.
async fn readiness(shared: &Shared) -> Result<(), String> {
    if shared.draining.load(Ordering::SeqCst) {
        return Err("draining".into());
    }
    let valid = shared
        .auth
        .stats()
        .expires_at
        .is_some_and(|at| at > SystemTime::now());
    if !valid {
        // Ask for one: the first request of a fresh proxy makes it ready.
        shared
            .auth
            .credentials()
            .await
            .map_err(|error| format!("no valid token: {error}"))?;
    }
    for instance in &shared.config.instances {
        let (host, port) = instance.upstream_addr();
        match tokio::time::timeout(READY_PROBE_TIMEOUT, TcpStream::connect((host, port))).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return Err(format!("{}: {error}", instance.upstream_name())),
            Err(_) => {
                return Err(format!(
                    "{}: no answer within {READY_PROBE_TIMEOUT:?}",
                    instance.upstream_name()
                ));
            }
        }
    }
    Ok(())
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
