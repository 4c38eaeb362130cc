//! The Misskey `globalTimeline` channel.
//!
//! Listens to `notesStream` and delivers notes that are `public` and not in
//! a channel, as Misskey's `GlobalTimelineChannel` does, honouring the
//! `withRenotes` (default true) and `withFiles` (default false) params.
//!
//! Filtering costs one plugin call per note, never one per subscriber: each
//! instance joins the bucket room of its param combination
//! (`globalTimeline:renotes=<0|1>:files=<0|1>`), and each note is broadcast
//! to the buckets that accept it; the host fans out natively.

use chanhost_plugin::types::{
    ChannelSpec, ConnectRequest, DisconnectReason, Instance, Manifest, Payload, Rejection,
};
use chanhost_plugin::{export, host, json, Guest};
use serde::Deserialize;
use serde_json::Value;

const SOURCE: &str = "notesStream";

struct GlobalTimeline;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Params {
    with_renotes: Option<Value>,
    with_files: Option<Value>,
}

/// JavaScript `!!value`.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0 && !f.is_nan()),
        Value::String(s) => !s.is_empty(),
        _ => true,
    }
}

fn bucket(renotes: bool, files: bool) -> String {
    format!(
        "globalTimeline:renotes={}:files={}",
        u8::from(renotes),
        u8::from(files)
    )
}

fn present(note: &Value, key: &str) -> bool {
    note.get(key).is_some_and(|v| !v.is_null())
}

fn has_files(note: &Value) -> bool {
    note.get("fileIds")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
}

/// Misskey's `isRenotePacked && !isQuotePacked`.
fn is_pure_renote(note: &Value) -> bool {
    present(note, "renoteId")
        && !(present(note, "text")
            || present(note, "cw")
            || present(note, "replyId")
            || present(note, "poll")
            || has_files(note))
}

impl Guest for GlobalTimeline {
    fn describe() -> Manifest {
        Manifest {
            version: env!("CARGO_PKG_VERSION").into(),
            channels: vec![ChannelSpec {
                name: "globalTimeline".into(),
                requires_user: false,
                shared: false,
            }],
            namespaces: vec![],
            frames: vec![],
        }
    }

    fn init(_config: String) -> Result<(), String> {
        host::listen(SOURCE);
        Ok(())
    }

    fn connect(req: ConnectRequest) -> Result<(), Rejection> {
        let params: Params = serde_json::from_str(&req.params).unwrap_or_default();
        let renotes = params.with_renotes.as_ref().is_none_or(truthy);
        let files = params.with_files.as_ref().is_some_and(truthy);
        host::join(&req.target, &bucket(renotes, files));
        Ok(())
    }

    fn message(_target: Instance, _event: String, _data: Payload, _ack: Option<u64>) {}

    fn disconnect(_target: Instance, _reason: DisconnectReason) {}

    fn event(room: String, _event: String, data: Payload) {
        if room != SOURCE {
            return;
        }
        let Ok(note) = serde_json::from_str::<Value>(&data.json) else {
            return;
        };
        if note.get("visibility").and_then(Value::as_str) != Some("public") {
            return;
        }
        if present(&note, "channelId") {
            return;
        }
        let renote_buckets: &[bool] = if is_pure_renote(&note) {
            &[true]
        } else {
            &[false, true]
        };
        let file_buckets: &[bool] = if has_files(&note) {
            &[false, true]
        } else {
            &[false]
        };
        let payload = json(data.json);
        for &r in renote_buckets {
            for &f in file_buckets {
                host::broadcast(&bucket(r, f), "note", &payload, None);
            }
        }
    }

    fn frame(_connection: u64, _kind: String, _body: String) {}
}

export!(GlobalTimeline);
