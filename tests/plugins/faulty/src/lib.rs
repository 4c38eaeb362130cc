//! A plugin that misbehaves on request, to show that a fault fails only
//! the call that caused it. Channel `faulty`; client messages:
//! `spin` loops forever, `trap` panics (a wasm trap), `bomb` allocates until
//! the memory limit, `echo` answers `echo` with the body and the number of
//! calls this instance has served (guest memory, reset by a rebuild).

use std::cell::Cell;

use chanhost_plugin::types::{
    ChannelSpec, ConnectRequest, DisconnectReason, Instance, Manifest, Payload, Rejection,
};
use chanhost_plugin::{export, host, json, Guest};

thread_local! {
    static SERVED: Cell<u64> = const { Cell::new(0) };
}

struct Faulty;

impl Guest for Faulty {
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
            version: "1".into(),
            channels: vec![ChannelSpec {
                name: "faulty".into(),
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

    fn connect(_req: ConnectRequest) -> Result<(), Rejection> {
        Ok(())
    }

    fn message(target: Instance, event: String, data: Payload, _ack: Option<u64>) {
        let served = SERVED.with(|s| {
            s.set(s.get() + 1);
            s.get()
        });
        match event.as_str() {
            "spin" => {
                let mut i = 0u64;
                loop {
                    i = std::hint::black_box(i.wrapping_add(1));
                }
            }
            "trap" => panic!("asked to trap"),
            "bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![7u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            _ => {
                let body = format!(r#"{{"body":{},"served":{served}}}"#, data.json);
                host::send(&target, "echo", &json(body));
            }
        }
    }

    fn disconnect(_target: Instance, _reason: DisconnectReason) {}

    fn event(_room: String, _event: String, _data: Payload) {}

    fn frame(_connection: u64, _kind: String, _body: String) {}
}

export!(Faulty);
