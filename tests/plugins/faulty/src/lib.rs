//! A plugin that misbehaves on request, to show that a fault fails only
//! the call that caused it. Channel `faulty`; client messages:
//! `spin` loops forever, `trap` panics (a wasm trap), `bomb` allocates until
//! the memory limit, `busy {"ms":N}` works N ms (what arrives meanwhile
//! waits in the queue: the next call is a batch), `echo` answers `echo` with
//! the body, the number of messages this instance has served (guest
//! memory, reset by a rebuild) and the size of the batch it came in.
//!
//! Every instance is in room `faulty-watchers`. Events published to room
//! `faulty-in` come back to the watchers as `heard {body, batch}`, in the
//! plugin's `events` batches; an event named `trap` panics, `busy` works
//! as the message does.

use std::cell::Cell;

use chanhost_plugin::types::{
    ChannelSpec, ConnectRequest, DisconnectReason, Instance, Manifest, Payload, Rejection,
};
use chanhost_plugin::{export, host, json, Events, Guest, Messages};

thread_local! {
    static SERVED: Cell<u64> = const { Cell::new(0) };
    /// The size of the batch being handled.
    static BATCH: Cell<usize> = const { Cell::new(1) };
}

/// Works `{"ms":N}` milliseconds.
fn busy(body: &str) {
    let ms: u64 = body
        .chars()
        .filter(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or(0);
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_millis(ms) {
        std::hint::black_box(());
    }
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
        host::listen("faulty-in");
        Ok(())
    }

    fn connect(req: ConnectRequest) -> Result<(), Rejection> {
        host::join(&req.target, "faulty-watchers");
        Ok(())
    }

    fn messages(batch: &Messages) {
        BATCH.with(|b| b.set(batch.len()));
        for m in batch.iter() {
            Self::on_message(m);
        }
    }

    fn events(batch: &Events) {
        BATCH.with(|b| b.set(batch.len()));
        for e in batch.iter() {
            Self::on_event(e);
        }
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
            "busy" => busy(&data.json),
            "bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![7u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            _ => {
                let batch = BATCH.with(Cell::get);
                let body = format!(
                    r#"{{"body":{},"served":{served},"batch":{batch}}}"#,
                    data.json
                );
                host::send(&target, "echo", &json(body));
            }
        }
    }

    fn disconnect(_target: Instance, _reason: DisconnectReason) {}

    fn event(_room: String, event: String, data: Payload) {
        match event.as_str() {
            "trap" => panic!("asked to trap"),
            "busy" => busy(&data.json),
            _ => {
                let batch = BATCH.with(Cell::get);
                let body = format!(r#"{{"body":{},"batch":{batch}}}"#, data.json);
                host::broadcast("faulty-watchers", "heard", &json(body), None);
            }
        }
    }

    fn frame(_connection: u64, _kind: String, _body: String) {}
}

export!(Faulty);
