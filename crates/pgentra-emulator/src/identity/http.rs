//! The HTTP side of the endpoints: the accept loops (HTTP and HTTPS), the routing of each
//! request to its endpoint, and the JSON responses they all send.

use super::{Endpoint, State, cli, count, managed, oauth};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;

pub(super) async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<State>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (state, tls) = (Arc::clone(&state), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => serve(stream, state).await,
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        serve(stream, state).await;
                    }
                }
            }
        });
    }
}

async fn serve<S>(stream: S, state: Arc<State>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let state = Arc::clone(&state);
        async move { Ok::<_, std::convert::Infallible>(handle(&state, request).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await;
}

pub(super) fn respond(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

pub(super) fn error(status: StatusCode, code: &str, description: &str) -> Response<Full<Bytes>> {
    respond(
        status,
        &json!({"error": code, "error_description": description}),
    )
}

/// Routes a request to its endpoint by path (and method, for the OAuth2 endpoint).
async fn handle(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let query: HashMap<String, String> = request
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let tenant = state.issuer.tenant();
    if path == format!("/{tenant}/discovery/v2.0/keys") {
        count(state, Endpoint::Keys);
        return respond(StatusCode::OK, &state.issuer.jwks());
    }
    if path == format!("/{tenant}/v2.0/.well-known/openid-configuration") {
        count(state, Endpoint::Keys);
        return respond(
            StatusCode::OK,
            &json!({"issuer": state.issuer.issuer(), "jwks_uri": format!("/{tenant}/discovery/v2.0/keys")}),
        );
    }
    if path == format!("/{tenant}/oauth2/v2.0/token") && request.method() == hyper::Method::POST {
        count(state, Endpoint::OAuth);
        return oauth::client_credentials(state, request).await;
    }
    if let Some(tool) = path.strip_prefix("/shim/") {
        return cli::answer(
            state,
            tool,
            query.get("scope").map(String::as_str).unwrap_or_default(),
        )
        .await;
    }
    let endpoint = match path.as_str() {
        "/msi/token" => Endpoint::AppService,
        "/metadata/identity/oauth2/token" => Endpoint::Imds,
        _ => return error(StatusCode::NOT_FOUND, "not_found", "unknown path"),
    };
    count(state, endpoint);
    managed::token(state, endpoint, request.headers(), &query).await
}
