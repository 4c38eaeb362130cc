//! The HTTP API for backends and operators: `POST /api/publish`,
//! `POST /api/rooms/join` and `/api/rooms/leave`, `GET /api/plugins/<name>/kv/<key>`,
//! `GET /healthz`, `GET /metrics`.
//!
//! `/api/*` needs `Authorization: Bearer <[api] key>`; without a configured
//! key it answers loopback clients only. Errors are JSON `{"error": ...}`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::broker::{BrokerError, Publication};
use crate::hub::Filter;
use crate::node::Node;
use crate::protocol::publish::{parse_publish, parse_rooms, PublishError, RoomsError};
use crate::server::{read_body, BodyError};

/// Largest API request body.
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// Routes of the API.
pub fn router() -> Router<Arc<Node>> {
    Router::new()
        .route("/api/publish", post(publish))
        .route("/api/rooms/join", post(rooms::<true>))
        .route("/api/rooms/leave", post(rooms::<false>))
        .route("/api/plugins/{plugin}/kv/{key}", get(plugin_kv))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
}

/// Why an API request is refused; the response is its status and JSON
/// `{"error": <this text>}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("wrong API key")]
    WrongKey,
    #[error("missing `Authorization: Bearer <api key>`")]
    MissingKey,
    #[error("no API key is configured ([api] key or CHANHOST_API_KEY); /api/* answers loopback clients only")]
    NotLoopback,
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Rooms(#[from] RoomsError),
    #[error("key `{key}` is private to plugin `{plugin}` (keys starting with `_` are)")]
    PrivateKey { plugin: String, key: String },
    #[error("plugin `{plugin}` has no key `{key}`")]
    NoKey { plugin: String, key: String },
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::WrongKey | ApiError::MissingKey => StatusCode::UNAUTHORIZED,
            ApiError::NotLoopback | ApiError::PrivateKey { .. } => StatusCode::FORBIDDEN,
            ApiError::Body(e) => e.status(),
            ApiError::Publish(_) | ApiError::Rooms(_) => StatusCode::BAD_REQUEST,
            ApiError::NoKey { .. } => StatusCode::NOT_FOUND,
            ApiError::Broker(e) => e.status(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            // Its own response: the connection is closed too.
            ApiError::Body(e) => e.into_response(),
            e => (e.status(), Json(json!({ "error": e.to_string() }))).into_response(),
        }
    }
}

/// Compares in time independent of where the strings differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The key of an `Authorization: Bearer <key>` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Checks the API key (or, without one, that the caller is local).
pub fn authorize(node: &Node, peer: SocketAddr, headers: &HeaderMap) -> Result<(), ApiError> {
    match &node.config().api_key {
        Some(key) => match bearer(headers) {
            Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => Ok(()),
            Some(_) => Err(ApiError::WrongKey),
            None => Err(ApiError::MissingKey),
        },
        None if peer.ip().is_loopback() => Ok(()),
        None => Err(ApiError::NotLoopback),
    }
}

async fn publish(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&node, peer, &headers)?;
    let body = read_body(&node, body, MAX_BODY_BYTES).await?;
    let items = parse_publish(&body)?;
    let published = items.len();
    let batch = items
        .into_iter()
        .map(|it| Publication {
            room: it.room.into(),
            event: it.event.into(),
            data: it.data.into(),
            attachments: Arc::from(Vec::new()),
            filter: Filter {
                audience: it
                    .audience
                    .map(|v| Arc::new(crate::server::misskey::note_audience(&v))),
                ..Filter::default()
            },
            args: None,
            offset: None,
        })
        .collect();
    // Answered once the cluster's Redis took it (at once on one node).
    node.publish_batch(batch)?.await?;
    Ok(Json(json!({ "published": published })).into_response())
}

/// `POST /api/rooms/join` (`JOIN`) and `/api/rooms/leave`.
async fn rooms<const JOIN: bool>(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&node, peer, &headers)?;
    let body = read_body(&node, body, MAX_BODY_BYTES).await?;
    let b = parse_rooms(&body)?;
    // The other nodes first: when the cluster cannot be reached, nothing is
    // applied anywhere (503), as for publishes.
    let (others_c, others_i) = node.rooms_elsewhere(&b, JOIN).await?;
    let (c, i) = node.apply_rooms(&b, JOIN);
    Ok(Json(json!({ "connections": c + others_c, "instances": i + others_i })).into_response())
}

/// `GET /api/plugins/<plugin>/kv/<key>`: a value of a plugin's key-value
/// store, for operators (plugins publish their state there, e.g. the online
/// services of `mew-infra`). JSON values are returned as JSON. Keys starting
/// with `_` are private to the plugin (configs, credentials) and refused.
async fn plugin_kv(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    axum::extract::Path((plugin, key)): axum::extract::Path<(String, String)>,
) -> Result<Response, ApiError> {
    authorize(&node, peer, &headers)?;
    use crate::plugin::HostServices;
    if key.starts_with('_') {
        return Err(ApiError::PrivateKey { plugin, key });
    }
    let Some(v) = node.kv().get(&plugin, &key) else {
        return Err(ApiError::NoKey { plugin, key });
    };
    let value =
        serde_json::from_str::<serde_json::Value>(&v).unwrap_or(serde_json::Value::String(v));
    Ok(Json(json!({ "plugin": plugin, "key": key, "value": value })).into_response())
}

async fn healthz(State(node): State<Arc<Node>>) -> Response {
    let (state, nodes) = node.cluster();
    let adapter = match node.adapter() {
        None => "off",
        Some(a) if a.is_up() => "up",
        Some(_) => "down",
    };
    Json(json!({
        "status": "ok",
        "connections": node.hub().conn_count(),
        "plugins": node.plugins().names().iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        "cluster": { "redis": state.as_str(), "nodes": nodes },
        "socketio_adapter": adapter,
    }))
    .into_response()
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        node.render_metrics(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
