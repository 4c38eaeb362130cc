//! The broadcast server of the benchmarks (`tests/bench`), as a plugin:
//! Socket.IO namespace `/` (CONNECT auth `{room}`) and Misskey channel
//! `bench` (params `{room}`) join that room; a message `publish {room,
//! data}` is broadcast to the room as `message data`. The Node socket.io
//! and socketioxide peers implement the same contract.

use chanhost_plugin::types::{
    ChannelSpec, ConnectRequest, DisconnectReason, Instance, Manifest, NamespaceSpec, Payload,
    Rejection,
};
use chanhost_plugin::{export, host, Guest, Message};
use serde_json::Value;

mod publish;

use publish::publish;

struct Bench;

impl Guest for Bench {
    fn fetched(_id: u64, _response: Result<chanhost_plugin::types::HttpResponse, String>) {}

    fn timer(_key: String) {}

    /// Recovered sockets need nothing more here: the host restored their
    /// rooms and identity.
    fn recover(
        _req: chanhost_plugin::types::RecoverRequest,
    ) -> Result<(), chanhost_plugin::types::Rejection> {
        Ok(())
    }

    fn describe() -> Manifest {
        Manifest {
            version: "bench-1".into(),
            channels: vec![ChannelSpec {
                name: "bench".into(),
                requires_user: false,
                shared: false,
            }],
            namespaces: vec![NamespaceSpec { name: "/".into() }],
            frames: vec![],
        }
    }

    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn connect(req: ConnectRequest) -> Result<(), Rejection> {
        let params: Value = serde_json::from_str(&req.params).unwrap_or(Value::Null);
        if let Some(room) = params.get("room").and_then(Value::as_str) {
            host::join(&req.target, room);
        }
        Ok(())
    }

    /// Read in place, from the batch the host gives (WIT 0.4.0); the
    /// broadcasts go back together when the batch ends.
    fn on_message(m: Message<'_>) {
        match m.event {
            "publish" => {
                if let Some((room, data)) = publish(m.data) {
                    host::broadcast_json(&room, "message", data, None);
                }
            }
            // Not part of the contract: the dispatch benchmark's floor, one
            // broadcast of the payload as it came, without reading it.
            "forward" => host::broadcast_json("fan", "message", m.data, None),
            _ => {}
        }
    }

    fn disconnect(_target: Instance, _reason: DisconnectReason) {}

    fn event(_room: String, _event: String, _data: Payload) {}

    fn frame(_connection: u64, _kind: String, _body: String) {}
}

export!(Bench);
