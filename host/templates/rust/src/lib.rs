//! {{name}}: a chanhost channel plugin (Rust).
//!
//! Serves the Misskey channel `{{name}}` and the Socket.IO namespace
//! `/{{name}}`. Every instance joins room `{{name}}`; an `echo` message is
//! sent back to its sender. The contract is `wit/plugin.wit`.

wit_bindgen::generate!({ world: "plugin", path: "wit" });

use chanhost::plugin::host;
use chanhost::plugin::types::{
    ChannelSpec, ConnectRequest, Delivery, DisconnectReason, Effect, EventBatch, HttpResponse,
    Instance, LogLevel, Manifest, MessageBatch, NamespaceSpec, Payload, RecoverRequest, Rejection,
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

    /// Clients' messages, in the order they came: every message that
    /// waited while the plugin was busy (one alone when it was not),
    /// packed: every id, event and JSON text is in `batch.text`, and
    /// `batch.words` has twelve words per message (see `message-batch` in
    /// `wit/plugin.wit`). The answers go back to the host in one `apply`
    /// call.
    fn messages(batch: MessageBatch) {
        let text = std::str::from_utf8(&batch.text).unwrap_or_default();
        let mut attachments = batch.attachments.iter();
        let mut effects = Vec::new();
        for w in batch.words.chunks_exact(12) {
            let part = |i: usize| &text[w[i] as usize..w[i] as usize + w[i + 1] as usize];
            let data = Payload {
                json: part(6).to_owned(),
                attachments: attachments.by_ref().take(w[8] as usize).cloned().collect(),
            };
            if part(4) != "echo" {
                continue;
            }
            let d = Delivery {
                target: Instance {
                    connection: u64::from(w[0]) | u64::from(w[1]) << 32,
                    id: part(2).to_owned(),
                },
                event: "echo".to_owned(),
                data,
            };
            // Socket.IO (ids are namespaces) passes the arguments as an
            // array.
            effects.push(if d.target.id.starts_with('/') {
                Effect::Emit(d)
            } else {
                Effect::Send(d)
            });
        }
        if !effects.is_empty() {
            host::apply(&effects);
        }
    }

    fn disconnect(_target: Instance, _reason: DisconnectReason) {}

    /// Events of rooms the plugin listens to, in order, batched like
    /// messages (this skeleton listens to none).
    fn events(_batch: EventBatch) {}

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
