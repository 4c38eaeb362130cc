//! The HTTP server: one port for the Misskey stream, the API and the
//! operational endpoints, graceful shutdown on SIGTERM/SIGINT.

pub mod misskey;
pub mod socketio;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::node::Node;

/// Lower-cased request headers, handed to plugins at connect.
pub fn header_list(headers: &HeaderMap) -> Arc<[(String, String)]> {
    headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect()
}

/// Query parameters of a request, except `skip`.
pub fn query_list(uri: &axum::http::Uri, skip: &[&str]) -> Arc<[(String, String)]> {
    uri.query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .filter(|(k, _)| !skip.contains(&k.as_str()))
                .collect()
        })
        .unwrap_or_default()
}

/// The full router of a node.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/streaming", get(misskey::handler))
        .merge(crate::api::router())
        .with_state(node.clone())
        .merge(socketio::router(node))
}

/// Serves until `node.shutdown` is cancelled, then closes every client with
/// 1001 and waits (up to `drain`) for the sessions to end.
///
/// HTTP/1.1 connections are served by hyper directly (not `axum::serve`),
/// so an upgraded connection hands back its `TcpStream` (see [`ws`]).
pub async fn serve(node: Arc<Node>, listener: TcpListener, drain: Duration) -> std::io::Result<()> {
    let app = router(node.clone());
    let token = node.shutdown.clone();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, most likely: back off a little
                    // instead of spinning; the open connections are unharmed.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = token.cancelled() => break,
        };
        tokio::spawn(serve_connection(app.clone(), tcp, peer, token.clone()));
    }
    let deadline = tokio::time::Instant::now() + drain;
    while node.hub.conn_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.plugins.stop_all();
    Ok(())
}

/// One HTTP/1.1 connection, with upgrades; finishes its request in flight
/// on shutdown.
async fn serve_connection(
    app: Router,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    token: tokio_util::sync::CancellationToken,
) {
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            let mut app = app.clone();
            async move { tower_service::Service::call(&mut app, req).await }
        });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::trace!("http connection ended: {e}");
            }
        }
        _ = token.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
