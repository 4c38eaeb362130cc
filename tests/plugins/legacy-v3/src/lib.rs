//! A component built against `chanhost:plugin@0.3.0` (the frozen
//! `wit/0.3.0/`), as plugins built before 0.4.0 are: it must keep loading
//! and serving beside 0.4.0 plugins, one `message` call per message.
//! Serves the Misskey channel `legacy-v3` and the Socket.IO namespace
//! `/legacy-v3`; every instance joins room `legacy-v3`; an `echo` message
//! comes back to its sender as `echo`, with `wit: "0.3.0"` added.

wit_bindgen::generate!({ world: "plugin", path: "../../../wit/0.3.0" });

use chanhost::plugin::host;
use chanhost::plugin::types::{
    ChannelSpec, ConnectRequest, DisconnectReason, HttpResponse, Instance, Manifest, NamespaceSpec,
    Payload, RecoverRequest, Rejection,
};
use exports::chanhost::plugin::channel::Guest;

struct LegacyV3;

impl Guest for LegacyV3 {
    fn describe() -> Manifest {
        Manifest {
            version: "legacy-v3-1".into(),
            channels: vec![ChannelSpec {
                name: "legacy-v3".into(),
                requires_user: false,
                shared: false,
            }],
            namespaces: vec![NamespaceSpec {
                name: "/legacy-v3".into(),
            }],
            frames: vec![],
        }
    }

    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn connect(req: ConnectRequest) -> Result<(), Rejection> {
        host::join(&req.target, "legacy-v3");
        Ok(())
    }

    fn message(target: Instance, event: String, data: Payload, _ack: Option<u64>) {
        if event != "echo" {
            return;
        }
        // Misskey: the body; Socket.IO: the array of arguments (the first).
        let body = if target.id.starts_with('/') {
            data.json
                .strip_prefix('[')
                .and_then(|s| s.strip_suffix(']'))
                .unwrap_or("null")
                .to_owned()
        } else {
            data.json
        };
        let reply = format!(r#"{{"wit":"0.3.0","body":{body}}}"#);
        host::send(
            &target,
            "echo",
            &Payload {
                json: reply,
                attachments: Vec::new(),
            },
        );
    }

    fn disconnect(_target: Instance, _reason: DisconnectReason) {}

    fn event(_room: String, _event: String, _data: Payload) {}

    fn frame(_connection: u64, _kind: String, _body: String) {}

    fn fetched(_id: u64, _response: Result<HttpResponse, String>) {}

    fn timer(_key: String) {}

    fn recover(_request: RecoverRequest) -> Result<(), Rejection> {
        Ok(())
    }
}

export!(LegacyV3);
