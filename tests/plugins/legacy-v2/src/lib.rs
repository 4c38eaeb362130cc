//! A component built against `chanhost:plugin@0.2.0` (the frozen
//! `wit/0.2.0/`), as plugins built before 0.3.0 are: it must keep loading
//! and serving beside 0.3.0 plugins, with 0.2.0's imports. Serves the
//! Misskey channel `legacy-v2` and the Socket.IO namespace `/legacy-v2`;
//! every instance joins room `legacy-v2`; an `echo` message comes back to
//! its sender as `echo` with `wit: "0.2.0"` added, a moment later (through
//! a 0.2.0 timer). Its sockets are not recovered (no `recover` in 0.2.0).

wit_bindgen::generate!({ world: "plugin", path: "../../../wit/0.2.0" });

use std::cell::RefCell;
use std::collections::HashMap;

use chanhost::plugin::host;
use chanhost::plugin::types::{
    ChannelSpec, ConnectRequest, DisconnectReason, HttpResponse, Instance, Manifest, NamespaceSpec,
    Payload, Rejection,
};
use exports::chanhost::plugin::channel::Guest;

struct LegacyV2;

thread_local! {
    /// Echoes waiting for their timer: key -> (target, reply).
    static WAITING: RefCell<HashMap<String, (Instance, String)>> = RefCell::new(HashMap::new());
}

impl Guest for LegacyV2 {
    fn describe() -> Manifest {
        Manifest {
            version: "legacy-v2-1".into(),
            channels: vec![ChannelSpec {
                name: "legacy-v2".into(),
                requires_user: false,
                shared: false,
            }],
            namespaces: vec![NamespaceSpec {
                name: "/legacy-v2".into(),
            }],
            frames: vec![],
        }
    }

    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn connect(req: ConnectRequest) -> Result<(), Rejection> {
        host::join(&req.target, "legacy-v2");
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
        let reply = format!(r#"{{"wit":"0.2.0","body":{body}}}"#);
        let key = format!("{}:{}", target.connection, target.id);
        WAITING.with(|w| w.borrow_mut().insert(key.clone(), (target, reply)));
        host::set_timer(&key, 1);
    }

    fn disconnect(_target: Instance, _reason: DisconnectReason) {}

    fn event(_room: String, _event: String, _data: Payload) {}

    fn frame(_connection: u64, _kind: String, _body: String) {}

    fn fetched(_id: u64, _response: Result<HttpResponse, String>) {}

    fn timer(key: String) {
        if let Some((target, reply)) = WAITING.with(|w| w.borrow_mut().remove(&key)) {
            host::send(
                &target,
                "echo",
                &Payload {
                    json: reply,
                    attachments: Vec::new(),
                },
            );
        }
    }
}

export!(LegacyV2);
