//! The HTTP API for backends and operators: `POST /api/publish`,
//! `GET /healthz`, `GET /metrics`.
//!
//! `/api/*` needs `Authorization: Bearer <[api] key>`; without a configured
//! key it answers loopback clients only. Errors are JSON `{"error": ...}`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use crate::node::Node;

/// Routes of the API.
pub fn router() -> Router<Arc<Node>> {
    Router::new()
        .route("/api/publish", post(publish))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// Compares in time independent of where the strings differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks the API key (or, without one, that the caller is local).
#[allow(clippy::result_large_err)]
pub fn authorize(node: &Node, peer: SocketAddr, headers: &HeaderMap) -> Result<(), Response> {
    match &node.config.api_key {
        Some(key) => {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            match given {
                Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => Ok(()),
                Some(_) => Err(error(StatusCode::UNAUTHORIZED, "wrong API key")),
                None => Err(error(
                    StatusCode::UNAUTHORIZED,
                    "missing `Authorization: Bearer <api key>`",
                )),
            }
        }
        None if peer.ip().is_loopback() => Ok(()),
        None => Err(error(
            StatusCode::FORBIDDEN,
            "no API key is configured ([api] key or CHANHOST_API_KEY); /api/* answers loopback clients only",
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishItem<'a> {
    room: String,
    event: String,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

fn parse_publish(body: &[u8]) -> Result<Vec<PublishItem<'_>>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "body is not UTF-8".to_owned())?;
    let items: Vec<PublishItem<'_>> = match text.trim_start().as_bytes().first() {
        Some(b'[') => {
            serde_json::from_str(text).map_err(|e| format!("invalid publish array: {e}"))?
        }
        Some(b'{') => {
            vec![serde_json::from_str(text).map_err(|e| format!("invalid publish object: {e}"))?]
        }
        _ => {
            return Err(
                "body must be a JSON object {\"room\",\"event\",\"data\"} or an array of them"
                    .into(),
            )
        }
    };
    for (i, it) in items.iter().enumerate() {
        if it.room.is_empty() {
            return Err(format!("item {i}: `room` must not be empty"));
        }
        if it.event.is_empty() {
            return Err(format!("item {i}: `event` must not be empty"));
        }
    }
    Ok(items)
}

async fn publish(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = authorize(&node, peer, &headers) {
        return r;
    }
    let items = match parse_publish(&body) {
        Ok(items) => items,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    for it in &items {
        let data = it.data.map(|d| d.get()).unwrap_or("null");
        node.publish(&it.room, &it.event, data.into());
    }
    Json(json!({ "published": items.len() })).into_response()
}

async fn healthz(State(node): State<Arc<Node>>) -> Response {
    Json(json!({
        "status": "ok",
        "connections": node.hub.conn_count(),
        "plugins": node.plugins.names().iter().map(|n| n.to_string()).collect::<Vec<_>>(),
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
    fn publish_bodies() {
        assert_eq!(
            parse_publish(br#"{"room":"r","event":"e","data":{"a":1}}"#)
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            parse_publish(br#"[{"room":"r","event":"e"},{"room":"s","event":"e","data":1}]"#)
                .unwrap()
                .len(),
            2
        );
        assert!(parse_publish(b"nope").unwrap_err().contains("JSON object"));
        assert!(parse_publish(br#"{"event":"e"}"#)
            .unwrap_err()
            .contains("room"));
        assert!(parse_publish(br#"{"room":"","event":"e"}"#)
            .unwrap_err()
            .contains("room"));
        assert!(parse_publish(br#"{"room":"r","event":"e","extra":1}"#)
            .unwrap_err()
            .contains("extra"));
        assert!(parse_publish(br#"[{"room":"r","event":"e"},{"room":"r"}]"#)
            .unwrap_err()
            .contains("event"));
    }

    #[test]
    fn key_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
