//! A component built against `chanhost:plugin@0.1.0` (the frozen
//! `wit/0.1.0/`), as plugins built before 0.2.0 are: it must keep loading
//! and serving beside 0.2.0 plugins. Serves the Misskey channel `legacy`
//! and the Socket.IO namespace `/legacy`; every instance joins room
//! `legacy`; an `echo` message comes back to its sender as `echo`, with
//! `wit: "0.1.0"` added.

wit_bindgen::generate!({ world: "plugin", path: "../../../wit/0.1.0" });

use chanhost::plugin::host;
use chanhost::plugin::types::{
    ChannelSpec, ConnectRequest, DisconnectReason, Instance, Manifest, NamespaceSpec, Payload,
    Rejection,
};
use exports::chanhost::plugin::channel::Guest;

struct Legacy;

impl Guest for Legacy {
    fn describe() -> Manifest {
        Manifest {
            version: "legacy-1".into(),
            channels: vec![ChannelSpec {
                name: "legacy".into(),
                requires_user: false,
                shared: false,
            }],
            namespaces: vec![NamespaceSpec {
                name: "/legacy".into(),
            }],
            frames: vec![],
        }
    }

    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn connect(req: ConnectRequest) -> Result<(), Rejection> {
        host::join(&req.target, "legacy");
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
        let reply = format!(r#"{{"wit":"0.1.0","body":{body}}}"#);
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
}

export!(Legacy);
