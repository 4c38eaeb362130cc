//! How the benchmarks' broadcast server reads a `publish`: one source for
//! the `bench` WebAssembly plugin and its native twins (the Criterion handler
//! of `host/benches/dispatch.rs` and the native plugin of
//! `tests/bench/src/native.rs`, which include this file), so every side of a
//! comparison runs the same code.

use std::collections::BTreeMap;

use serde_json::value::RawValue;

/// `{room, data}` of a `publish`: the payload itself (Misskey) or its first
/// argument (Socket.IO). `data` stays JSON text, passed on as it came.
pub fn publish(payload: &str) -> Option<(String, &str)> {
    let mut body = payload;
    if payload.trim_start().starts_with('[') {
        let args: Vec<&RawValue> = serde_json::from_str(payload).ok()?;
        body = args.first()?.get();
    }
    let fields: BTreeMap<&str, &RawValue> = serde_json::from_str(body).ok()?;
    let room: String = serde_json::from_str(fields.get("room")?.get()).ok()?;
    Some((room, fields.get("data")?.get()))
}
