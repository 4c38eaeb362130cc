// Shared by reload-a and reload-b: two versions of the plugin `reloadable`
// that differ only in the version they report.
//
// Channel `reloadable`: on connect the instance joins room `reloadable`;
// the message `version` is answered with `version {version, count}` where
// `count` is kept in the host key-value store (so it survives reloads).

use chanhost_plugin::types::{
    ChannelSpec, ConnectRequest, DisconnectReason, Instance, Manifest, Payload, Rejection,
};
use chanhost_plugin::{export, host, json, Guest};

struct Reloadable;

impl Guest for Reloadable {
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
            version: VERSION.into(),
            channels: vec![ChannelSpec {
                name: "reloadable".into(),
                requires_user: false,
                shared: false,
            }],
            namespaces: vec![],
            frames: vec![],
        }
    }

    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn connect(req: ConnectRequest) -> Result<(), Rejection> {
        host::join(&req.target, "reloadable");
        Ok(())
    }

    fn message(target: Instance, event: String, _data: Payload, _ack: Option<u64>) {
        if event == "version" {
            let count = host::kv_incr("count", 1);
            let body = format!(r#"{{"version":"{VERSION}","count":{count}}}"#);
            host::send(&target, "version", &json(body));
        }
    }

    fn disconnect(_target: Instance, _reason: DisconnectReason) {}

    fn event(_room: String, _event: String, _data: Payload) {}

    fn frame(_connection: u64, _kind: String, _body: String) {}
}

export!(Reloadable);
