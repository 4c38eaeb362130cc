//! {{name}}: a chanhost channel plugin (Rust).
//!
//! Serves the Misskey channel `{{name}}` and the Socket.IO namespace
//! `/{{name}}`. Every instance joins room `{{name}}`; an `echo` message is
//! sent back to its sender. The contract is `wit/plugin.wit`.

wit_bindgen::generate!({ world: "plugin", path: "wit" });

use chanhost::plugin::host;
use chanhost::plugin::types::{
    ChannelSpec, ConnectRequest, DisconnectReason, HttpResponse, Instance, LogLevel, Manifest,
    NamespaceSpec, Payload, RecoverRequest, Rejection,
};
use exports::chanhost::plugin::channel::Guest;

const NAME: &str = "{{name}}";

struct Plugin;

impl Guest for Plugin {
    fn describe() -> Manifest {
        Manifest {
            version: env!("CARGO_PKG_VERSION").into(),
            channels: vec![ChannelSpec {
                name: NAME.into(),
                requires_user: false,
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
        host::log(LogLevel::Info, &format!("{} opened {}", req.target.connection, req.channel));
        host::join(&req.target, NAME);
        Ok(())
    }

    fn message(target: Instance, event: String, data: Payload, _ack: Option<u64>) {
        if event != "echo" {
            return;
        }
        // Socket.IO (ids are namespaces) passes the arguments as an array.
        if target.id.starts_with('/') {
            host::emit(&target, "echo", &data);
        } else {
            host::send(&target, "echo", &data);
        }
    }

    fn disconnect(_target: Instance, _reason: DisconnectReason) {}

    fn event(_room: String, _event: String, _data: Payload) {}

    fn frame(_connection: u64, _kind: String, _body: String) {}

    /// The answer to a `host::fetch` (this skeleton starts none).
    fn fetched(_id: u64, _response: Result<HttpResponse, String>) {}

    /// A timer set with `host::set_timer` is due (this skeleton sets none).
    fn timer(_key: String) {}

    /// A Socket.IO socket back within `[socketio.recovery]
    /// max_disconnection_ms` of losing its connection, instead of a second
    /// `connect`: the host restored its rooms and identity and replays what
    /// it missed. `req.previous` is the instance it had, `req.away_ms` how
    /// long it was gone; an error refuses it.
    fn recover(req: RecoverRequest) -> Result<(), Rejection> {
        host::log(
            LogLevel::Info,
            &format!("{} came back after {} ms", req.socket_id, req.away_ms),
        );
        Ok(())
    }
}

export!(Plugin);
