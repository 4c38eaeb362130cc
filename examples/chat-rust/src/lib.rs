//! A chat-room channel: clients join a room by param, messages they post
//! are broadcast to the room with the sender's user id, and the room's
//! message count lives in the host's key-value store (so it survives a hot
//! reload). The same plugin exists in JavaScript, Python and C beside this
//! folder; all four behave identically.
//!
//! - Misskey: channel `chat-rust`, params `{room}`, send `post {text}`.
//! - Socket.IO: namespace `/chat-rust`, auth `{token, room}`, emit `post {text}`.
//! - Every member of the room, sender included, receives
//!   `message {userId, text, n}`.

use chanhost_plugin::types::{
    ChannelSpec, ConnectRequest, DisconnectReason, Instance, Manifest, NamespaceSpec, Payload,
    Protocol, Rejection,
};
use chanhost_plugin::{export, host, json, Guest};
use serde_json::{json, Value};

const NAME: &str = "chat-rust";

struct Chat;

fn reject(message: &str) -> Rejection {
    Rejection {
        message: message.into(),
        data: None,
    }
}

/// Where an instance's room is kept: the store outlives guest memory.
fn member_key(t: &Instance) -> String {
    format!("member:{}:{}", t.connection, t.id)
}

/// The params of a connect (or a recovery), and the room they name.
fn room_of(params: &str) -> Result<(Value, String), Rejection> {
    let params: Value = serde_json::from_str(params).unwrap_or(Value::Null);
    let room = params
        .get("room")
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| reject("a room is required"))?;
    Ok((params, room))
}

impl Guest for Chat {
    fn fetched(_id: u64, _response: Result<chanhost_plugin::types::HttpResponse, String>) {}

    fn timer(_key: String) {}

    /// A Socket.IO socket back after losing its connection (the host
    /// restored its room and identity): its room is kept again under its
    /// new connection.
    fn recover(req: chanhost_plugin::types::RecoverRequest) -> Result<(), Rejection> {
        let (_, room) = room_of(&req.params)?;
        host::kv_set(&member_key(&req.target), &room);
        Ok(())
    }

    fn describe() -> Manifest {
        Manifest {
            version: "1.0.0".into(),
            channels: vec![ChannelSpec {
                name: NAME.into(),
                requires_user: true,
                shared: false,
            }],
            namespaces: vec![NamespaceSpec {
                name: format!("/{NAME}"),
            }],
            frames: vec![],
        }
    }

    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn connect(req: ConnectRequest) -> Result<(), Rejection> {
        let (params, room) = room_of(&req.params)?;
        if req.protocol == Protocol::Socketio {
            // Socket.IO connections start anonymous: check the token.
            let token = params
                .get("token")
                .and_then(Value::as_str)
                .ok_or_else(|| reject("a token is required"))?;
            let who =
                host::verify_token(token).map_err(|e| reject(&format!("invalid token: {e}")))?;
            host::set_identity(req.target.connection, &who).map_err(|e| reject(&e))?;
        }
        host::kv_set(&member_key(&req.target), &room);
        host::join(&req.target, &format!("{NAME}:{room}"));
        Ok(())
    }

    fn message(target: Instance, event: String, data: Payload, _ack: Option<u64>) {
        if event != "post" {
            return;
        }
        let data: Value = serde_json::from_str(&data.json).unwrap_or(Value::Null);
        // Socket.IO passes the event's arguments as an array.
        let body = match &data {
            Value::Array(args) => args.first().cloned().unwrap_or(Value::Null),
            other => other.clone(),
        };
        let Some(text) = body.get("text").and_then(Value::as_str) else {
            return;
        };
        let (Some(room), Some(who)) = (
            host::kv_get(&member_key(&target)),
            host::connection_identity(target.connection),
        ) else {
            return;
        };
        let n = host::kv_incr(&format!("count:{room}"), 1);
        let message = json!({ "userId": who.user_id, "text": text, "n": n });
        host::broadcast(
            &format!("{NAME}:{room}"),
            "message",
            &json(message.to_string()),
            None,
        );
    }

    fn disconnect(target: Instance, _reason: DisconnectReason) {
        host::kv_delete(&member_key(&target));
    }

    fn event(_room: String, _event: String, _data: Payload) {}

    fn frame(_connection: u64, _kind: String, _body: String) {}
}

export!(Chat);
