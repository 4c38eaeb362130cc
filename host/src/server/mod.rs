//! The HTTP server: one port for the Misskey stream, Socket.IO, the API and
//! the operational endpoints; the limits every request meets on the way in
//! (client admission, the request head's size, the body's deadline) and
//! what a connection keeps of its request; graceful shutdown on
//! SIGTERM/SIGINT.
//!
//! - [`admission`]: client connection caps and the client's address.
//! - [`ws`]: the WebSocket upgrade and the wire frames are written to.
//! - [`engineio`]: Engine.IO sessions and transports, below [`socketio`].
//! - [`misskey`], [`socketio`]: the protocol sessions.

pub mod admission;
pub mod engineio;
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

/// Headers of the request that opened a connection that plugins are not
/// handed: hop-by-hop headers and the WebSocket handshake's own.
pub const HEADERS_NOT_KEPT: &[&str] = &[
    "connection",
    "upgrade",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "content-length",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
];

/// Longest header value or query value kept for plugins; longer ones are
/// left out.
pub const MAX_KEPT_VALUE_BYTES: usize = 8 << 10;

/// Most bytes of headers and query parameters kept per connection (names
/// and values); what comes after is left out.
pub const MAX_KEPT_REQUEST_BYTES: usize = 16 << 10;

/// Name/value pairs of a request, as plugins are handed them.
pub use crate::hub::Pairs;

/// What a connection keeps of the request that opened it, to hand its
/// plugins at connect: the lower-cased headers (less [`HEADERS_NOT_KEPT`])
/// and the query parameters (less `skip`), each value at most
/// [`MAX_KEPT_VALUE_BYTES`], all of it at most [`MAX_KEPT_REQUEST_BYTES`].
/// The rest of the request is freed with it.
pub fn kept_request(headers: &HeaderMap, uri: &axum::http::Uri, skip: &[&str]) -> (Pairs, Pairs) {
    let mut budget = MAX_KEPT_REQUEST_BYTES;
    let mut keep = |k: &str, v: &str| {
        let size = k.len() + v.len();
        if v.len() > MAX_KEPT_VALUE_BYTES || size > budget {
            return false;
        }
        budget -= size;
        true
    };
    let kept_headers = headers
        .iter()
        .filter(|(k, _)| !HEADERS_NOT_KEPT.contains(&k.as_str()))
        .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)))
        .filter(|(k, v)| keep(k, v))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let query = uri
        .query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .filter(|(k, _)| !skip.contains(&k.as_ref()))
                .filter(|(k, v)| keep(k, v))
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    (kept_headers, query)
}

/// The full router of a node.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/streaming", get(misskey::handler))
        .merge(crate::api::router())
        .with_state(node.clone())
        .merge(crate::admin::router(node.clone()))
        .merge(socketio::router(node))
}

/// Why a request body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("request body not received in time")]
    Timeout,
    #[error("request body too large")]
    TooLarge,
    #[error("request body broken off")]
    Broken,
}

impl BodyError {
    pub fn status(self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self {
            BodyError::Timeout => StatusCode::REQUEST_TIMEOUT,
            BodyError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Broken => StatusCode::BAD_REQUEST,
        }
    }
}

impl axum::response::IntoResponse for BodyError {
    /// JSON `{"error"}` with the status, and the connection closed (the
    /// rest of the body, if any, is not read).
    fn into_response(self) -> axum::response::Response {
        use axum::http::{header, HeaderValue};
        let mut r = (
            self.status(),
            axum::Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response();
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    }
}

/// Reads request bodies whole within a deadline (`[limits]
/// body_timeout_ms`): a body that stalls, or a chunked body that never
/// ends, does not hold its request open. Timeouts are counted.
#[derive(Clone)]
pub struct BodyReader {
    pub timeout: Duration,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl BodyReader {
    /// A node's reader.
    pub fn of(node: &Node) -> Self {
        Self {
            timeout: node.config().limits.body_timeout,
            metrics: node.metrics().clone(),
        }
    }

    /// Reads a body, at most `max` bytes. Called by the handlers that take
    /// a body once they know the request is allowed, so nothing is
    /// buffered for a request that is refused anyway.
    pub async fn read(
        &self,
        body: axum::body::Body,
        max: usize,
    ) -> Result<axum::body::Bytes, BodyError> {
        let r = read_body_within(body, max, self.timeout).await;
        if r == Err(BodyError::Timeout) {
            self.metrics.body_timeouts.inc();
        }
        r
    }
}

/// Reads a request body with a node's [`BodyReader`].
pub async fn read_body(
    node: &Node,
    body: axum::body::Body,
    max: usize,
) -> Result<axum::body::Bytes, BodyError> {
    BodyReader::of(node).read(body, max).await
}

async fn read_body_within(
    body: axum::body::Body,
    max: usize,
    deadline: Duration,
) -> Result<axum::body::Bytes, BodyError> {
    match tokio::time::timeout(deadline, axum::body::to_bytes(body, max)).await {
        Err(_) => Err(BodyError::Timeout),
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            Err(if too_large {
                BodyError::TooLarge
            } else {
                BodyError::Broken
            })
        }
        Ok(Ok(bytes)) => Ok(bytes),
    }
}

/// Serves until `node.shutdown()` is cancelled, then closes every client with
/// 1001 and waits (up to `drain`) for the sessions to end.
///
/// HTTP/1.1 connections are served by hyper directly (not `axum::serve`),
/// so an upgraded connection hands back its `TcpStream` (see [`ws`]).
pub async fn serve(node: Arc<Node>, listener: TcpListener, drain: Duration) -> std::io::Result<()> {
    let app = router(node.clone());
    let token = node.shutdown().clone();
    let sockets = Arc::new(Sockets::new(admission::open_file_limit(), open_files()));
    let mut failures = 0u32;
    // When the last accept failure was reported: at most one warning per
    // ten seconds, however often the limit is met.
    let mut reported: Option<tokio::time::Instant> = None;
    loop {
        // At the descriptor limit, wait for a socket to close rather than
        // letting accept fail: the kernel's backlog holds newcomers.
        tokio::select! {
            _ = sockets.room() => {}
            _ = token.cancelled() => break,
        }
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors (other files count too): back off,
                    // doubling up to a second, and say so at most every ten
                    // seconds. The open connections are unharmed.
                    failures += 1;
                    if reported.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                        reported = Some(tokio::time::Instant::now());
                        tracing::warn!(failures, "accept failed: {e}; retrying with back-off");
                    }
                    let wait = Duration::from_millis(10u64 << failures.min(7)).min(Duration::from_secs(1));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = sockets.closed.notified() => {}
                    }
                    continue;
                }
            },
            _ = token.cancelled() => break,
        };
        if failures > 0 {
            tracing::debug!(failures, "accepting connections again");
            failures = 0;
        }
        let held = sockets.hold();
        let conn = serve_connection(
            app.clone(),
            tcp,
            peer,
            token.clone(),
            node.config().limits.max_header_bytes,
        );
        tokio::spawn(async move {
            conn.await;
            drop(held);
        });
    }
    let deadline = tokio::time::Instant::now() + drain;
    while node.hub().conn_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.plugins().stop_all();
    Ok(())
}

/// Accepted sockets, against the open-file limit.
struct Sockets {
    open: std::sync::atomic::AtomicUsize,
    /// Sockets accepted at most (the open-file limit less what the process
    /// needs besides them); None without a limit.
    max: Option<usize>,
    closed: tokio::sync::Notify,
}

/// An accepted socket, counted until dropped.
struct Held(Arc<Sockets>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.0.closed.notify_waiters();
    }
}

/// Files the process holds now (its plugins, caches, runtime and
/// listener), if the system tells.
fn open_files() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count())
}

impl Sockets {
    /// At most the open-file limit less what the process already holds
    /// and a margin of 32 for what it opens later (plugin reloads, the
    /// cache, outbound HTTP).
    fn new(file_limit: Option<usize>, held: Option<usize>) -> Self {
        Self {
            open: Default::default(),
            max: file_limit.map(|l| l.saturating_sub(held.unwrap_or(0) + 32).max(1)),
            closed: tokio::sync::Notify::new(),
        }
    }

    fn hold(self: &Arc<Self>) -> Held {
        self.open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Held(self.clone())
    }

    /// Resolves once another socket may be accepted: HTTP connections and
    /// upgraded ones (which outlive theirs) below the bound. An upgraded
    /// socket's end is not signalled, so a full process looks again every
    /// 50 ms as well.
    async fn room(&self) {
        let Some(max) = self.max else { return };
        loop {
            let closed = self.closed.notified();
            let held =
                self.open.load(std::sync::atomic::Ordering::Relaxed) + ws::upgraded_sockets();
            if held < max {
                return;
            }
            tokio::select! {
                _ = closed => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
}

/// One HTTP/1.1 connection, with upgrades; finishes its request in flight
/// on shutdown.
async fn serve_connection(
    app: Router,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    token: tokio_util::sync::CancellationToken,
    max_header_bytes: usize,
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
        // A larger request head gets 431 (hyper's own answer).
        .max_buf_size(max_header_bytes)
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    #[tokio::test]
    async fn bodies_are_read_whole_bounded_and_in_time() {
        let d = Duration::from_millis(200);
        let ok = read_body_within(Body::from("hello"), 10, d).await;
        assert_eq!(ok.as_deref(), Ok(&b"hello"[..]));
        let big = read_body_within(Body::from(vec![0u8; 11]), 10, d).await;
        assert_eq!(big, Err(BodyError::TooLarge));
        // A body whose sender stops before its end.
        let part = futures_util::stream::iter([Ok::<_, std::io::Error>(
            axum::body::Bytes::from_static(b"par"),
        )]);
        let stalled = Body::from_stream(futures_util::StreamExt::chain(
            part,
            futures_util::stream::pending(),
        ));
        assert_eq!(
            read_body_within(stalled, 10, d).await,
            Err(BodyError::Timeout)
        );
    }

    #[test]
    fn the_kept_request_is_bounded() {
        let mut h = HeaderMap::new();
        h.insert("cookie", "a=1".parse().unwrap());
        h.insert("sec-websocket-key", "k".parse().unwrap());
        h.insert(
            "x-huge",
            "h".repeat(MAX_KEPT_VALUE_BYTES + 1).parse().unwrap(),
        );
        for i in 0..20 {
            h.insert(
                axum::http::HeaderName::from_bytes(format!("x-fill-{i}").as_bytes()).unwrap(),
                "f".repeat(1000).parse().unwrap(),
            );
        }
        let uri: axum::http::Uri = "/streaming?i=secret&x=1".parse().unwrap();
        let (headers, query) = kept_request(&h, &uri, &["i"]);
        let names: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
        assert!(names.contains(&"cookie"));
        assert!(!names.contains(&"sec-websocket-key") && !names.contains(&"x-huge"));
        let size: usize = headers
            .iter()
            .chain(query.iter())
            .map(|(k, v)| k.len() + v.len())
            .sum();
        assert!(size <= MAX_KEPT_REQUEST_BYTES, "{size}");
        assert!(names.len() < 21, "what is past the budget is left out");
        assert!(query.iter().all(|(k, _)| k != "i"));
    }
}
