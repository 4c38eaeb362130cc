//! The HTTP API for backends and operators: `POST /api/publish`,
//! `POST /api/rooms/join` and `/api/rooms/leave`, `GET /api/plugins/<name>/kv/<key>`,
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

use crate::hub::{Filter, NoteAudience};
use crate::node::Node;

/// Largest API request body (axum's default bound of a `Bytes` body).
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

/// One item of a publish body, in either accepted shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawItem<'a> {
    room: Option<String>,
    event: Option<String>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    /// Misskey's event bus shape: `{"channel", "message"}`.
    channel: Option<String>,
    #[serde(borrow, default)]
    message: Option<&'a RawValue>,
}

/// The `message` of Misskey's bus: `{type, body}` (or a bare value for
/// `notesStream`).
#[derive(Deserialize)]
struct BusMessage<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(borrow, default)]
    body: Option<&'a RawValue>,
}

/// The body of a `noteStream:<id>` bus message: `{id, body}`, and in
/// current Misskey also the note's `userId`, `visibility` and
/// `visibleUserIds`, which decide who may see the update.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NoteStreamBody<'a> {
    #[serde(borrow, default)]
    body: Option<&'a RawValue>,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    visibility: Option<String>,
    #[serde(default)]
    visible_user_ids: Option<Vec<String>>,
}

impl NoteStreamBody<'_> {
    fn audience(&self) -> Option<NoteAudience> {
        let author = self.user_id.as_deref()?;
        match self.visibility.as_deref()? {
            "followers" => Some(NoteAudience::new(author, None)),
            "specified" => Some(NoteAudience::new(
                author,
                Some(self.visible_user_ids.clone().unwrap_or_default()),
            )),
            _ => None,
        }
    }
}

/// A validated publish: room, event, data (JSON text).
#[derive(Debug, PartialEq, Eq)]
struct PublishItem<'a> {
    room: String,
    event: String,
    data: &'a str,
    /// Misskey note updates of non-public notes: who may see them.
    audience: Option<NoteAudience>,
}

fn raw_or_null(v: Option<&RawValue>) -> &str {
    v.map(RawValue::get).unwrap_or("null")
}

fn normalize(i: usize, it: RawItem<'_>) -> Result<PublishItem<'_>, String> {
    match (it.room, it.channel) {
        (Some(room), None) => {
            if it.message.is_some() {
                return Err(format!(
                    "item {i}: `message` goes with `channel`, not `room`"
                ));
            }
            let event = it
                .event
                .ok_or_else(|| format!("item {i}: missing field `event`"))?;
            if room.is_empty() {
                return Err(format!("item {i}: `room` must not be empty"));
            }
            if event.is_empty() {
                return Err(format!("item {i}: `event` must not be empty"));
            }
            Ok(PublishItem {
                room,
                event,
                data: raw_or_null(it.data),
                audience: None,
            })
        }
        (None, Some(channel)) => {
            if it.event.is_some() || it.data.is_some() {
                return Err(format!(
                    "item {i}: `event`/`data` go with `room`; Misskey's bus shape is {{\"channel\", \"message\"}}"
                ));
            }
            if channel.is_empty() {
                return Err(format!("item {i}: `channel` must not be empty"));
            }
            let message = it
                .message
                .ok_or_else(|| format!("item {i}: missing field `message`"))?;
            // `notesStream` carries the bare note.
            if channel == "notesStream" {
                return Ok(PublishItem {
                    room: channel,
                    event: "note".into(),
                    data: message.get(),
                    audience: None,
                });
            }
            let m: BusMessage<'_> = serde_json::from_str(message.get())
                .map_err(|e| format!("item {i}: `message` must be {{\"type\", \"body\"}}: {e}"))?;
            let mut data = raw_or_null(m.body);
            let mut audience = None;
            // Misskey wraps note stream events as {id, body, ...}.
            if channel.starts_with("noteStream:") {
                if let Ok(inner) = serde_json::from_str::<NoteStreamBody<'_>>(data) {
                    audience = inner.audience();
                    data = raw_or_null(inner.body);
                }
            }
            Ok(PublishItem {
                room: channel,
                event: m.kind,
                data,
                audience,
            })
        }
        (Some(_), Some(_)) => Err(format!("item {i}: give `room` or `channel`, not both")),
        (None, None) => Err(format!("item {i}: missing field `room`")),
    }
}

fn parse_publish(body: &[u8]) -> Result<Vec<PublishItem<'_>>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "body is not UTF-8".to_owned())?;
    let items: Vec<RawItem<'_>> = match text.trim_start().as_bytes().first() {
        Some(b'[') => {
            serde_json::from_str(text).map_err(|e| format!("invalid publish array: {e}"))?
        }
        Some(b'{') => {
            vec![serde_json::from_str(text).map_err(|e| format!("invalid publish object: {e}"))?]
        }
        _ => {
            return Err(
                "body must be a JSON object {\"room\",\"event\",\"data\"} (or Misskey's {\"channel\",\"message\"}) or an array of them"
                    .into(),
            )
        }
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, it)| normalize(i, it))
        .collect()
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
    let published = items.len();
    for it in items {
        let filter = Filter {
            audience: it.audience.map(Arc::new),
            ..Filter::default()
        };
        node.publish_filtered(&it.room, &it.event, it.data.into(), filter);
    }
    Json(json!({ "published": published })).into_response()
}

/// Body of `/api/rooms/join` and `/api/rooms/leave`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomsBody {
    /// Every connection of this user on this node...
    user: Option<String>,
    /// ...or this one connection.
    connection: Option<u64>,
    rooms: Vec<String>,
    /// Only instances of this channel or namespace (default: every
    /// instance of the connections).
    channel: Option<String>,
}

fn parse_rooms(body: &[u8]) -> Result<RoomsBody, String> {
    let b: RoomsBody = serde_json::from_slice(body).map_err(|e| {
        format!("body must be {{\"user\" or \"connection\", \"rooms\": [...]}}: {e}")
    })?;
    match (&b.user, b.connection) {
        (Some(_), Some(_)) => return Err("give `user` or `connection`, not both".into()),
        (None, None) => return Err("missing `user` or `connection`".into()),
        (Some(u), None) if u.is_empty() => return Err("`user` must not be empty".into()),
        _ => {}
    }
    if b.rooms.iter().any(String::is_empty) {
        return Err("room names must not be empty".into());
    }
    Ok(b)
}

/// `POST /api/rooms/join` (`JOIN`) and `/api/rooms/leave`.
async fn rooms<const JOIN: bool>(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = authorize(&node, peer, &headers) {
        return r;
    }
    let b = match parse_rooms(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let conns = match (&b.user, b.connection) {
        (Some(u), _) => node.hub.user_conns(u),
        (None, Some(c)) => node.hub.conn(c).into_iter().collect(),
        (None, None) => Vec::new(),
    };
    let mut instances = 0;
    for conn in &conns {
        let slots: Vec<_> = conn.with_state(|s| {
            s.instances
                .values()
                .filter(|i| b.channel.as_deref().is_none_or(|c| *i.channel == *c))
                .map(|i| i.slot.clone())
                .collect()
        });
        instances += slots.len();
        for slot in slots {
            for room in &b.rooms {
                if JOIN {
                    node.hub.join(conn, slot.clone(), room);
                } else {
                    node.hub.leave(conn, &slot, room);
                }
            }
        }
    }
    Json(json!({ "connections": conns.len(), "instances": instances })).into_response()
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
) -> Response {
    if let Err(r) = authorize(&node, peer, &headers) {
        return r;
    }
    use crate::plugin::HostServices;
    if key.starts_with('_') {
        return error(
            StatusCode::FORBIDDEN,
            format!("key `{key}` is private to plugin `{plugin}` (keys starting with `_` are)"),
        );
    }
    match node.kv().get(&plugin, &key) {
        Some(v) => {
            let value = serde_json::from_str::<serde_json::Value>(&v)
                .unwrap_or(serde_json::Value::String(v));
            Json(json!({ "plugin": plugin, "key": key, "value": value })).into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            format!("plugin `{plugin}` has no key `{key}`"),
        ),
    }
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
    fn misskey_bus_shape() {
        let items = parse_publish(
            br#"[{"channel":"notesStream","message":{"id":"n1","text":"hi"}},
                 {"channel":"mainStream:u1","message":{"type":"notification","body":{"id":"x"}}},
                 {"channel":"noteStream:n1","message":{"type":"reacted","body":{"id":"n1","body":{"reaction":"+1"}}}},
                 {"channel":"broadcast","message":{"type":"emojiAdded"}}]"#,
        )
        .unwrap();
        let flat: Vec<_> = items
            .iter()
            .map(|i| (i.room.as_str(), i.event.as_str(), i.data))
            .collect();
        assert_eq!(
            flat,
            vec![
                ("notesStream", "note", r#"{"id":"n1","text":"hi"}"#),
                ("mainStream:u1", "notification", r#"{"id":"x"}"#),
                ("noteStream:n1", "reacted", r#"{"reaction":"+1"}"#),
                ("broadcast", "emojiAdded", "null"),
            ]
        );
        assert!(items.iter().all(|i| i.audience.is_none()));
        let items = parse_publish(
            br#"[{"channel":"noteStream:n2","message":{"type":"reacted","body":{"id":"n2","userId":"u1","visibility":"followers","visibleUserIds":[],"body":{"reaction":"+1"}}}},
                 {"channel":"noteStream:n3","message":{"type":"deleted","body":{"id":"n3","userId":"u1","visibility":"specified","visibleUserIds":["u2"],"body":{}}}},
                 {"channel":"noteStream:n4","message":{"type":"deleted","body":{"id":"n4","userId":"u1","visibility":"home","body":{}}}}]"#,
        )
        .unwrap();
        assert_eq!(items[0].data, r#"{"reaction":"+1"}"#);
        assert_eq!(items[0].audience, Some(NoteAudience::new("u1", None)));
        assert_eq!(
            items[1].audience,
            Some(NoteAudience::new("u1", Some(vec!["u2".into()])))
        );
        assert_eq!(items[2].audience, None);
        assert!(parse_publish(br#"{"channel":"x"}"#)
            .unwrap_err()
            .contains("message"));
        assert!(parse_publish(br#"{"channel":"x","message":{"body":1}}"#)
            .unwrap_err()
            .contains("type"));
        assert!(parse_publish(br#"{"channel":"x","room":"y","message":{}}"#)
            .unwrap_err()
            .contains("not both"));
        assert!(
            parse_publish(br#"{"channel":"x","event":"e","message":{"type":"t"}}"#)
                .unwrap_err()
                .contains("bus shape")
        );
    }

    #[test]
    fn rooms_bodies() {
        assert!(parse_rooms(br#"{"user":"u","rooms":["a"]}"#).is_ok());
        assert!(parse_rooms(br#"{"connection":3,"rooms":[],"channel":"/"}"#).is_ok());
        assert!(parse_rooms(br#"{"rooms":["a"]}"#)
            .unwrap_err()
            .contains("missing"));
        assert!(parse_rooms(br#"{"user":"u","connection":1,"rooms":["a"]}"#)
            .unwrap_err()
            .contains("not both"));
        assert!(parse_rooms(br#"{"user":"u","rooms":[""]}"#)
            .unwrap_err()
            .contains("empty"));
        assert!(parse_rooms(br#"{"user":"u","rooms":"a"}"#)
            .unwrap_err()
            .contains("rooms"));
        assert!(parse_rooms(br#"{"user":"u"}"#)
            .unwrap_err()
            .contains("rooms"));
    }

    #[test]
    fn key_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
