//! The Misskey `main` channel: a shared, authenticated channel that
//! relays the user's own event stream. Each instance joins room
//! `mainStream:<userId>`; whatever the backend publishes there (`notification`,
//! `mention`, `reply`, `renote`, `follow`, `meUpdated`, ...) reaches the
//! client unchanged, framed by the host.

use chanhost_plugin::types::{
    ChannelSpec, ConnectRequest, DisconnectReason, Instance, Manifest, Payload, Rejection,
};
use chanhost_plugin::{export, host, Guest};

struct Main;

impl Guest for Main {
    fn describe() -> Manifest {
        Manifest {
            version: env!("CARGO_PKG_VERSION").into(),
            channels: vec![ChannelSpec {
                name: "main".into(),
                requires_user: true,
                shared: true,
            }],
            namespaces: vec![],
            frames: vec![],
        }
    }

    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn connect(req: ConnectRequest) -> Result<(), Rejection> {
        let Some(user) = req.identity else {
            return Err(Rejection {
                message: "the main channel needs a signed-in user".into(),
                data: None,
            });
        };
        host::join(&req.target, &format!("mainStream:{}", user.user_id));
        Ok(())
    }

    fn message(_target: Instance, _event: String, _data: Payload, _ack: Option<u64>) {}

    fn disconnect(_target: Instance, _reason: DisconnectReason) {}

    fn event(_room: String, _event: String, _data: Payload) {}

    fn frame(_connection: u64, _kind: String, _body: String) {}
}

export!(Main);
