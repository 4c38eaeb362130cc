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
    Span,
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
    /// waited while the plugin was busy (one alone when it was not). Every
    /// id, event and JSON text of the batch is in `batch.text`, each
    /// message naming its own by ranges. The answers go back to the host
    /// in one `apply` call.
    fn messages(batch: MessageBatch) {
        let text = std::str::from_utf8(&batch.text).unwrap_or_default();
        let part = |s: Span| &text[s.start as usize..(s.start + s.len) as usize];
        let effects: Vec<Effect> = batch
            .messages
            .iter()
            .filter(|m| part(m.event) == "echo")
            .map(|m| {
                let first = m.attachments.start as usize;
                let d = Delivery {
                    target: Instance {
                        connection: m.connection,
                        id: part(m.id).to_owned(),
                    },
                    event: "echo".to_owned(),
                    data: Payload {
                        json: part(m.data).to_owned(),
                        attachments: batch.attachments[first..first + m.attachments.len as usize]
                            .to_vec(),
                    },
                };
                // Socket.IO (ids are namespaces) passes the arguments as an
                // array.
                if d.target.id.starts_with('/') {
                    Effect::Emit(d)
                } else {
                    Effect::Send(d)
                }
            })
            .collect();
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
