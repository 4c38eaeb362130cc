//! What a plugin call costs over a native handler doing the same work:
//! a client message of ~200 bytes of JSON (`publish {room, data}`) read
//! (`room` decoded, `data` kept as JSON text) and turned into one broadcast,
//! by the `bench` test plugin
//! (`target/test-plugins/bench.wasm`, built by `cargo xtask plugins`) and by
//! the same logic in Rust. Host effects go to `DetachedServices` (dropped),
//! so both sides measure the dispatch, not the fan-out. `plugin-noop` is the
//! bare call: the same arguments, an event the plugin ignores.
//! `plugin-forward` / `native-forward` broadcast the payload as it came,
//! without reading it: what a call and one host call back cost with no work
//! in between. `plugin-batch` gives the plugin 32 messages in one
//! `messages` call (a busy plugin's queue, WIT 0.4.0): the figure is per
//! message, the broadcasts going back in one `apply`.
//!
//! `cargo bench -p chanhost --bench dispatch`; `cargo xtask bench` runs it
//! and reports the difference.

use std::sync::Arc;

use chanhost::config::Config;
use chanhost::plugin::{
    ClientMessage, DetachedServices, HostServices, InstanceRef, Messages, Payload, PluginEngine,
};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

/// Messages per batched call in `plugin-batch`.
const BATCH: usize = 32;

#[path = "../../tests/plugins/bench/src/publish.rs"]
mod publish;

use publish::publish;

/// ~200 bytes, as a Socket.IO client sends it (the argument array).
fn message() -> String {
    let data = format!(r#"{{"t":1732233445566778899,"p":"{}"}}"#, "x".repeat(140));
    format!(r#"[{{"room":"fan","data":{data}}}]"#)
}

/// The plugin's logic, natively.
fn native(services: &dyn HostServices, json: &str) {
    if let Some((room, data)) = publish(json) {
        broadcast(services, &room, data);
    }
}

/// The broadcast both native handlers end in.
fn broadcast(services: &dyn HostServices, room: &str, data: &str) {
    services.broadcast(
        "bench",
        room,
        "message",
        Payload::json(data),
        None,
        Vec::new(),
        false,
    );
}

fn dispatch(c: &mut Criterion) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let wasm = root.join("target/test-plugins/bench.wasm");
    let Ok(bytes) = std::fs::read(&wasm) else {
        eprintln!(
            "{} is missing: run `cargo xtask plugins` first",
            wasm.display()
        );
        return;
    };
    let limits = Config::for_plugins(".").plugin_runtime;
    let engine = PluginEngine::new(&limits, None).expect("engine");
    let component = engine.compile(&bytes).expect("compile");
    let pre = engine.link(&component).expect("link");
    let services: Arc<dyn HostServices> = Arc::new(DetachedServices::default());
    let mut started = engine
        .start(&pre, "bench".into(), Arc::downgrade(&services), "{}")
        .expect("start");
    let json = message();
    let target = InstanceRef {
        connection: 1,
        id: "/".into(),
    };
    let mut group = c.benchmark_group("dispatch");
    // `publish` reads the message and broadcasts; `noop`, an event the plugin
    // ignores, is the bare call; `forward` broadcasts without reading.
    for (name, event) in [
        ("plugin", "publish"),
        ("plugin-noop", "noop"),
        ("plugin-forward", "forward"),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                engine.arm_call(&mut started.store);
                let m = ClientMessage {
                    target: target.clone(),
                    event: event.into(),
                    data: Payload::json(black_box(json.as_str())),
                    ack_id: None,
                };
                started.guest.message(&mut started.store, m).expect("call")
            })
        });
    }
    group.throughput(Throughput::Elements(BATCH as u64));
    for (name, event) in [
        ("plugin-batch", "publish"),
        ("plugin-batch-noop", "noop"),
        ("plugin-batch-forward", "forward"),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                engine.arm_call(&mut started.store);
                let batch = Messages::new(
                    (0..BATCH)
                        .map(|_| ClientMessage {
                            target: target.clone(),
                            event: event.into(),
                            data: Payload::json(black_box(json.as_str())),
                            ack_id: None,
                        })
                        .collect(),
                );
                started
                    .guest
                    .messages(&mut started.store, &batch, 0..BATCH)
                    .expect("call")
            })
        });
    }
    group.throughput(Throughput::Elements(1));
    group.bench_function("native", |b| {
        b.iter(|| native(&*services, black_box(&json)))
    });
    group.bench_function("native-forward", |b| {
        b.iter(|| broadcast(&*services, "fan", black_box(&json)))
    });
    group.finish();
}

criterion_group!(benches, dispatch);
criterion_main!(benches);
