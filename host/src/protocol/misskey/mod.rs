//! The Misskey streaming protocol as a codec, without I/O.
//!
//! [`parse`] turns one client text frame into a [`ClientFrame`]; the
//! `encode_*` functions build server frames (an event's frame as a head,
//! the member's quoted id and a shared tail: [`encode_event_tail`]). Frames follow
//! misskey-dev/misskey `packages/backend/src/server/api/stream/Connection.ts`:
//! every frame is a JSON object `{type, body}`. Client frames that are not
//! JSON, or lack the fields a type needs, are reported as [`ParseError`] so
//! the session can ignore them, as Misskey does.
//!
//! [`bus`]: Misskey's own event bus message, as a room event.

pub mod bus;

pub use bus::NoteVisibility;

use serde::Deserialize;
use serde_json::value::RawValue;

/// Longest channel instance id or note id accepted (bytes). misskey-js
/// numbers its instances (`"1"`, `"2"`, ...) and Misskey's note ids are
/// 10 to 26 characters; a frame with a longer id is ignored like any other
/// malformed frame, so no client makes the host keep large keys.
pub const MAX_ID_BYTES: usize = 128;

/// Longest channel name accepted (bytes); Misskey's are under 20.
pub const MAX_CHANNEL_BYTES: usize = 128;

/// A client frame the host understands.
#[derive(Debug, PartialEq)]
pub enum ClientFrame<'a> {
    /// `connect {channel, id, params?, pong?}`.
    Connect {
        channel: String,
        id: String,
        /// `params` as JSON text, `{}` when absent or `null`.
        params: String,
        pong: bool,
    },
    /// `disconnect {id}`.
    Disconnect { id: String },
    /// `channel` / `ch {id, type, body}`; a frame without `body` is not
    /// one (Misskey ignores it), `"body": null` is.
    Channel {
        id: String,
        kind: String,
        /// `body` as JSON text.
        body: String,
    },
    /// `subNote` / `s` / `sr {id}`.
    SubNote { id: String },
    /// `unsubNote` / `un {id}`.
    UnsubNote { id: String },
    /// Any other type (e.g. `readNotification`), for plugins that declare it.
    Other { kind: &'a str, body: String },
}

/// Why a client frame was not understood.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("frame is not a JSON object with a string `type`")]
    NotJson,
    #[error("`{kind}` frame without a valid `{field}`")]
    MissingField {
        kind: &'static str,
        field: &'static str,
    },
    #[error("`{kind}` frame whose `{field}` is longer than {max} bytes")]
    TooLong {
        kind: &'static str,
        field: &'static str,
        max: usize,
    },
}

/// `value` if it is at most `max` bytes.
fn bounded(
    value: String,
    kind: &'static str,
    field: &'static str,
    max: usize,
) -> Result<String, ParseError> {
    if value.len() > max {
        return Err(ParseError::TooLong { kind, field, max });
    }
    Ok(value)
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(borrow, default)]
    body: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ConnectBody<'a> {
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    id: Option<IdValue>,
    #[serde(borrow, default)]
    params: Option<&'a RawValue>,
    #[serde(default)]
    pong: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct IdBody {
    #[serde(default)]
    id: Option<IdValue>,
}

#[derive(Deserialize)]
struct ChannelBody<'a> {
    #[serde(default)]
    id: Option<IdValue>,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    /// Present (`null` included) or absent.
    #[serde(borrow, default, deserialize_with = "present")]
    body: Option<&'a RawValue>,
}

/// A field that is there, whatever its value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue as serde::Deserialize>::deserialize(d).map(Some)
}

/// Ids are strings in misskey-js; numbers are accepted and read as their text,
/// as JavaScript's property lookup would.
#[derive(Deserialize)]
#[serde(untagged)]
enum IdValue {
    Str(String),
    Num(serde_json::Number),
}

impl IdValue {
    fn into_string(self) -> Option<String> {
        let s = match self {
            IdValue::Str(s) => s,
            IdValue::Num(n) => n.to_string(),
        };
        (!s.is_empty()).then_some(s)
    }
}

fn body_of<'a, T: Deserialize<'a>>(
    body: Option<&'a RawValue>,
    kind: &'static str,
    field: &'static str,
) -> Result<T, ParseError> {
    let raw = body.ok_or(ParseError::MissingField { kind, field })?;
    serde_json::from_str(raw.get()).map_err(|_| ParseError::MissingField { kind, field })
}

fn raw_or(v: Option<&RawValue>, default: &str) -> String {
    match v {
        Some(r) if r.get() != "null" => r.get().to_owned(),
        _ => default.to_owned(),
    }
}

fn id_of(body: Option<&RawValue>, kind: &'static str) -> Result<String, ParseError> {
    let b: IdBody = body_of(body, kind, "id")?;
    let id =
        b.id.and_then(IdValue::into_string)
            .ok_or(ParseError::MissingField { kind, field: "id" })?;
    bounded(id, kind, "id", MAX_ID_BYTES)
}

/// JavaScript truthiness of a JSON value (for `pong`).
fn truthy(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => false,
        serde_json::Value::Bool(b) => *b,
        serde_json::Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        serde_json::Value::String(s) => !s.is_empty(),
        _ => true,
    }
}

/// Parses one client text frame.
pub fn parse(text: &str) -> Result<ClientFrame<'_>, ParseError> {
    let env: Envelope<'_> = serde_json::from_str(text).map_err(|_| ParseError::NotJson)?;
    Ok(match env.kind {
        "connect" => {
            let b: ConnectBody<'_> = body_of(env.body, "connect", "channel")?;
            let channel = b.channel.filter(|c| !c.is_empty()).ok_or({
                ParseError::MissingField {
                    kind: "connect",
                    field: "channel",
                }
            })?;
            let id =
                b.id.and_then(IdValue::into_string)
                    .ok_or(ParseError::MissingField {
                        kind: "connect",
                        field: "id",
                    })?;
            ClientFrame::Connect {
                channel: bounded(channel, "connect", "channel", MAX_CHANNEL_BYTES)?,
                id: bounded(id, "connect", "id", MAX_ID_BYTES)?,
                params: raw_or(b.params, "{}"),
                pong: b.pong.as_ref().is_some_and(truthy),
            }
        }
        "disconnect" => ClientFrame::Disconnect {
            id: id_of(env.body, "disconnect")?,
        },
        "channel" | "ch" => {
            let b: ChannelBody<'_> = body_of(env.body, "channel", "id")?;
            let id =
                b.id.and_then(IdValue::into_string)
                    .ok_or(ParseError::MissingField {
                        kind: "channel",
                        field: "id",
                    })?;
            let kind = b.kind.ok_or(ParseError::MissingField {
                kind: "channel",
                field: "type",
            })?;
            let id = bounded(id, "channel", "id", MAX_ID_BYTES)?;
            let body = b.body.ok_or(ParseError::MissingField {
                kind: "channel",
                field: "body",
            })?;
            ClientFrame::Channel {
                id,
                kind,
                body: body.get().to_owned(),
            }
        }
        "subNote" | "s" | "sr" => ClientFrame::SubNote {
            id: id_of(env.body, "subNote")?,
        },
        "unsubNote" | "un" => ClientFrame::UnsubNote {
            id: id_of(env.body, "unsubNote")?,
        },
        kind => ClientFrame::Other {
            kind,
            body: raw_or(env.body, "null"),
        },
    })
}

pub use super::json_string;

/// The room of a note's updates (Misskey's `noteStream:<id>` channel), which
/// a stream that captures the note joins.
pub fn note_room(note: &str) -> String {
    format!("noteStream:{note}")
}

/// `{"type":"connected","body":{"id":<id>}}`.
pub fn encode_connected(id: &str) -> String {
    format!(
        r#"{{"type":"connected","body":{{"id":{}}}}}"#,
        json_string(id)
    )
}

/// Where an event is addressed on a Misskey stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressing {
    /// A channel instance: `{"type":"channel","body":{"id":..,"type":..,"body":..}}`.
    Channel,
    /// A captured note: `{"type":"noteUpdated","body":{"id":..,"type":..,"body":..}}`.
    NoteUpdated,
}

impl Addressing {
    pub fn head(self) -> &'static str {
        match self {
            Addressing::Channel => r#"{"type":"channel","body":{"id":"#,
            Addressing::NoteUpdated => r#"{"type":"noteUpdated","body":{"id":"#,
        }
    }
}

/// The part of an event frame that is the same for every recipient:
/// `,"type":<event>,"body":<data>}}`. Built once per event; each recipient's
/// frame is `head + <its id as JSON> + tail`.
pub fn encode_event_tail(event: &str, data: &str) -> String {
    let ev = json_string(event);
    let mut out = String::with_capacity(ev.len() + data.len() + 16);
    out.push_str(",\"type\":");
    out.push_str(&ev);
    out.push_str(",\"body\":");
    out.push_str(data);
    out.push_str("}}");
    out
}

/// Splices one recipient's frame: `head + quoted_id + tail`.
/// `quoted_id` is the id already written as a JSON string.
pub fn splice_event(addressing: Addressing, quoted_id: &str, tail: &str) -> String {
    let head = addressing.head();
    let mut out = String::with_capacity(head.len() + quoted_id.len() + tail.len());
    out.push_str(head);
    out.push_str(quoted_id);
    out.push_str(tail);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_with_and_without_params() {
        let f = parse(r#"{"type":"connect","body":{"channel":"main","id":"1"}}"#).unwrap();
        assert_eq!(
            f,
            ClientFrame::Connect {
                channel: "main".into(),
                id: "1".into(),
                params: "{}".into(),
                pong: false
            }
        );
        let f = parse(
            r#"{"type":"connect","body":{"channel":"g","id":2,"params":{"withRenotes":false},"pong":true}}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            ClientFrame::Connect {
                channel: "g".into(),
                id: "2".into(),
                params: r#"{"withRenotes":false}"#.into(),
                pong: true
            }
        );
    }

    #[test]
    fn ids_and_channel_names_are_bounded() {
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let ok = "x".repeat(MAX_ID_BYTES);
        for frame in [
            format!(r#"{{"type":"connect","body":{{"channel":"main","id":"{long}"}}}}"#),
            format!(r#"{{"type":"connect","body":{{"channel":"{long}","id":"1"}}}}"#),
            format!(r#"{{"type":"s","body":{{"id":"{long}"}}}}"#),
            format!(r#"{{"type":"subNote","body":{{"id":"{long}"}}}}"#),
            format!(r#"{{"type":"un","body":{{"id":"{long}"}}}}"#),
            format!(r#"{{"type":"disconnect","body":{{"id":"{long}"}}}}"#),
            format!(r#"{{"type":"ch","body":{{"id":"{long}","type":"x"}}}}"#),
        ] {
            assert!(
                matches!(parse(&frame), Err(ParseError::TooLong { .. })),
                "{}",
                &frame[..40]
            );
        }
        assert!(parse(&format!(r#"{{"type":"s","body":{{"id":"{ok}"}}}}"#)).is_ok());
        assert!(parse(&format!(
            r#"{{"type":"connect","body":{{"channel":"main","id":"{ok}"}}}}"#
        ))
        .is_ok());
    }

    #[test]
    fn aliases() {
        assert_eq!(
            parse(r#"{"type":"s","body":{"id":"n1"}}"#).unwrap(),
            ClientFrame::SubNote { id: "n1".into() }
        );
        assert_eq!(
            parse(r#"{"type":"sr","body":{"id":"n1"}}"#).unwrap(),
            ClientFrame::SubNote { id: "n1".into() }
        );
        assert_eq!(
            parse(r#"{"type":"un","body":{"id":"n1"}}"#).unwrap(),
            ClientFrame::UnsubNote { id: "n1".into() }
        );
        assert_eq!(
            parse(r#"{"type":"ch","body":{"id":"1","type":"x","body":{"a":1}}}"#).unwrap(),
            ClientFrame::Channel {
                id: "1".into(),
                kind: "x".into(),
                body: r#"{"a":1}"#.into()
            }
        );
        // Misskey drops a channel message without a body, not one whose
        // body is null.
        assert_eq!(
            parse(r#"{"type":"ch","body":{"id":"1","type":"x"}}"#),
            Err(ParseError::MissingField {
                kind: "channel",
                field: "body"
            })
        );
        assert_eq!(
            parse(r#"{"type":"ch","body":{"id":"1","type":"x","body":null}}"#).unwrap(),
            ClientFrame::Channel {
                id: "1".into(),
                kind: "x".into(),
                body: "null".into()
            }
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            "h",
            "ping",
            "",
            "[]",
            "{}",
            "null",
            r#"{"type":1}"#,
            r#"{"type":"connect"}"#,
            r#"{"type":"connect","body":{"id":"1"}}"#,
            r#"{"type":"connect","body":{"channel":"main"}}"#,
            r#"{"type":"connect","body":"x"}"#,
            r#"{"type":"subNote","body":{}}"#,
            r#"{"type":"subNote","body":{"id":""}}"#,
            r#"{"type":"ch","body":{"id":"1"}}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn other_types_pass_through() {
        assert_eq!(
            parse(r#"{"type":"readNotification"}"#).unwrap(),
            ClientFrame::Other {
                kind: "readNotification",
                body: "null".into()
            }
        );
    }

    #[test]
    fn event_frames_are_valid_json() {
        let tail = encode_event_tail("note", r#"{"id":"x"}"#);
        let frame = splice_event(Addressing::Channel, &json_string("a\"b"), &tail);
        let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["type"], "channel");
        assert_eq!(v["body"]["id"], "a\"b");
        assert_eq!(v["body"]["type"], "note");
        assert_eq!(v["body"]["body"]["id"], "x");
        let frame = splice_event(Addressing::NoteUpdated, &json_string("n"), &tail);
        let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["type"], "noteUpdated");
        let c: serde_json::Value = serde_json::from_str(&encode_connected("7")).unwrap();
        assert_eq!(c["body"]["id"], "7");
    }
}
