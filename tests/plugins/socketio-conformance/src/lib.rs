//! Behaves like the server of the official Socket.IO protocol test suites.
//!
//! Serves `/` and `/custom`. On connect it emits `auth` with the
//! handshake's auth payload and, if the payload has a `room`, joins the
//! socket to that room. `message` is answered with `message-back` carrying
//! the same arguments; `message-with-ack` is acknowledged with the same
//! arguments (binary attachments included).
//!
//! Extras for chanhost's own tests: an auth payload `{"reject": X}` refuses
//! the connect with message `rejected` and data X; events `disconnect-me`
//! (server-side disconnect of this socket), `close-me` (closes the whole
//! connection), `verify` (acks the result of verifying the token argument
//! with the host's auth providers) and `broadcast` (`{room, event, data,
//! exceptSelf}` to a room), `identify` (verifies the token argument and
//! identifies the connection; acks `{count, connection}` or `{error}`) and
//! `online` (acks the online user ids). Presence changes announced by the
//! host are relayed as `presence` events to room `presence-watchers`, and
//! what a socket.io server of the same Redis sends with `serverSideEmit`
//! on `/` as `server-side` events (`{event, data}`) to room
//! `server-side-watchers`.
//!
//! Connection state recovery: a recovered socket gets `recovered`
//! (`{socketId, previous, awayMs, missed, rooms, userId,
//! userConnections}`, what `recover` was told) and no second `auth`; an
//! auth with `refuseRecovery` refuses the recovery; one with `quiet`
//! gets no `auth` event on connect. Every instance's end
//! is told to room `disconnect-watchers` as `disconnected` (`{connection,
//! reason}`).

use chanhost_plugin::types::{
    ChannelSpec, ConnectRequest, DisconnectReason, Instance, Manifest, NamespaceSpec, Payload,
    Rejection,
};
use chanhost_plugin::{export, host, json, Guest};
use serde_json::{json as j, Value};

struct Conformance;

impl Guest for Conformance {
    fn fetched(_id: u64, _response: Result<chanhost_plugin::types::HttpResponse, String>) {}

    fn timer(_key: String) {}

    fn recover(req: chanhost_plugin::types::RecoverRequest) -> Result<(), Rejection> {
        let auth: Value = serde_json::from_str(&req.params).unwrap_or(Value::Null);
        if auth.get("refuseRecovery").is_some() {
            return Err(Rejection {
                message: "recovery refused".into(),
                data: None,
            });
        }
        let told = j!({
            "socketId": req.socket_id,
            "previous": req.previous.connection,
            "awayMs": req.away_ms,
            "missed": req.missed,
            "rooms": req.rooms,
            "userId": req.identity.map(|i| i.user_id),
            "userConnections": req.user_connections,
        });
        host::send(&req.target, "recovered", &json(told.to_string()));
        Ok(())
    }

    fn describe() -> Manifest {
        Manifest {
            version: "1".into(),
            channels: Vec::<ChannelSpec>::new(),
            namespaces: vec![
                NamespaceSpec { name: "/".into() },
                NamespaceSpec {
                    name: "/custom".into(),
                },
            ],
            frames: vec![],
        }
    }

    fn init(_config: String) -> Result<(), String> {
        host::listen("chanhost:presence");
        host::listen(&chanhost_plugin::conventions::server_side_room("/"));
        Ok(())
    }

    fn connect(req: ConnectRequest) -> Result<(), Rejection> {
        let auth: Value = serde_json::from_str(&req.params).unwrap_or(Value::Null);
        if let Some(data) = auth.get("reject") {
            return Err(Rejection {
                message: "rejected".into(),
                data: Some(data.to_string()),
            });
        }
        if auth.get("quiet").is_none() {
            host::send(&req.target, "auth", &json(req.params.clone()));
        }
        if let Some(room) = auth.get("room").and_then(Value::as_str) {
            host::join(&req.target, room);
        }
        Ok(())
    }

    fn message(target: Instance, event: String, data: Payload, ack: Option<u64>) {
        match event.as_str() {
            "message" => host::emit(&target, "message-back", &data),
            "message-with-ack" => {
                if let Some(id) = ack {
                    host::ack(&target, id, &data);
                }
            }
            "disconnect-me" => host::end_instance(&target),
            "close-me" => host::close_connection(target.connection, "asked to close"),
            "verify" => {
                let args: Value = serde_json::from_str(&data.json).unwrap_or(Value::Null);
                let token = args.get(0).and_then(Value::as_str).unwrap_or("");
                let result = match host::verify_token(token) {
                    Ok(id) => j!([{"userId": id.user_id}]),
                    Err(e) => j!([{"error": e}]),
                };
                if let Some(id) = ack {
                    host::ack(&target, id, &json(result.to_string()));
                }
            }
            "identify" => {
                let args: Value = serde_json::from_str(&data.json).unwrap_or(Value::Null);
                let token = args.get(0).and_then(Value::as_str).unwrap_or("");
                let result = match host::verify_token(token)
                    .and_then(|id| host::set_identity(target.connection, &id))
                {
                    Ok(count) => j!([{"count": count, "connection": target.connection}]),
                    Err(e) => j!([{"error": e}]),
                };
                if let Some(id) = ack {
                    host::ack(&target, id, &json(result.to_string()));
                }
            }
            "online" => {
                if let Some(id) = ack {
                    let users = j!([host::online_users()]);
                    host::ack(&target, id, &json(users.to_string()));
                }
            }
            "broadcast" => {
                let args: Value = serde_json::from_str(&data.json).unwrap_or(Value::Null);
                let b = args.get(0).cloned().unwrap_or(Value::Null);
                let room = b.get("room").and_then(Value::as_str).unwrap_or("");
                let ev = b.get("event").and_then(Value::as_str).unwrap_or("");
                let payload = b.get("data").cloned().unwrap_or(Value::Null).to_string();
                let except =
                    (b.get("exceptSelf") == Some(&Value::Bool(true))).then(|| target.clone());
                host::broadcast(room, ev, &json(payload), except.as_ref());
            }
            _ => {}
        }
    }

    fn disconnect(target: Instance, reason: DisconnectReason) {
        let reason = match reason {
            DisconnectReason::Client => "client",
            DisconnectReason::ConnectionClosed => "connection-closed",
            DisconnectReason::Replaced => "replaced",
            DisconnectReason::Server => "server",
            DisconnectReason::ConnectionLost => "connection-lost",
        };
        let told = j!({"connection": target.connection, "reason": reason}).to_string();
        host::broadcast("disconnect-watchers", "disconnected", &json(told), None);
    }

    fn event(room: String, event: String, data: Payload) {
        if room == "chanhost:presence" {
            let change = format!(r#"{{"status":"{event}","change":{}}}"#, data.json);
            host::broadcast("presence-watchers", "presence", &json(change), None);
        } else if room == chanhost_plugin::conventions::server_side_room("/") {
            let ev = serde_json::to_string(&event).unwrap_or_default();
            let relayed = format!(r#"{{"event":{ev},"data":{}}}"#, data.json);
            host::broadcast("server-side-watchers", "server-side", &json(relayed), None);
        }
    }

    fn frame(_connection: u64, _kind: String, _body: String) {}
}

export!(Conformance);
