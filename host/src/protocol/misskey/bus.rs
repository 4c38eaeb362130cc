//! Misskey's event bus message, `{"channel", "message"}`, as its
//! `GlobalEventService` publishes it (misskey-dev/misskey
//! `packages/backend/src/core/GlobalEventService.ts`): the channel names a
//! stream (`mainStream:<user>`, `noteStream:<note>`, `notesStream`,
//! `broadcast`, ...) and is the room; the message is `{type, body}` (the
//! bare note for `notesStream`). A note stream's body is `{id, body}` and
//! in current Misskey also the note's `userId`, `visibility` and
//! `visibleUserIds`, which decide who may see the update.

use serde::Deserialize;
use serde_json::value::RawValue;

/// Who may see an update of a non-public note, as the bus message says:
/// the author and, for a `specified` note, the users it names (None: a
/// `followers` note, whose audience is the author's followers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteVisibility {
    pub author: String,
    pub visible_users: Option<Vec<String>>,
}

/// A bus message as a room event.
#[derive(Debug, PartialEq, Eq)]
pub struct BusEvent<'a> {
    pub room: String,
    pub event: String,
    /// JSON text.
    pub data: &'a str,
    /// Set for updates of non-public notes.
    pub audience: Option<NoteVisibility>,
}

/// Why a bus message is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("not UTF-8")]
    NotUtf8,
    #[error("not {{\"channel\", \"message\"}}: {0}")]
    Envelope(String),
    #[error("`channel` must not be empty")]
    EmptyChannel,
    #[error("`message` must be {{\"type\", \"body\"}}: {0}")]
    Message(String),
}

/// The `message` of a bus item: `{type, body}`.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(borrow, default)]
    body: Option<&'a RawValue>,
}

/// The body of a `noteStream:<id>` message.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NoteStreamBody<'a> {
    #[serde(borrow, default)]
    body: Option<&'a RawValue>,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    visibility: Option<String>,
    #[serde(default)]
    visible_user_ids: Option<Vec<String>>,
}

impl NoteStreamBody<'_> {
    fn audience(&self) -> Option<NoteVisibility> {
        let author = self.user_id.clone()?;
        match self.visibility.as_deref()? {
            "followers" => Some(NoteVisibility {
                author,
                visible_users: None,
            }),
            "specified" => Some(NoteVisibility {
                author,
                visible_users: Some(self.visible_user_ids.clone().unwrap_or_default()),
            }),
            _ => None,
        }
    }
}

fn raw_or_null(v: Option<&RawValue>) -> &str {
    v.map(RawValue::get).unwrap_or("null")
}

/// A message as Misskey publishes it on Redis.
#[derive(Deserialize)]
struct Envelope<'a> {
    channel: String,
    #[serde(borrow)]
    message: &'a RawValue,
}

/// Reads one message of Misskey's Redis channel, `{"channel", "message"}`.
pub fn parse(payload: &[u8]) -> Result<BusEvent<'_>, BusError> {
    let text = std::str::from_utf8(payload).map_err(|_| BusError::NotUtf8)?;
    let e: Envelope<'_> =
        serde_json::from_str(text).map_err(|e| BusError::Envelope(e.to_string()))?;
    translate(e.channel, e.message)
}

/// The bus channel of events for every stream (`emojiAdded`,
/// `announcementCreated`, ...), sent as top-level frames
/// `{"type":<type>,"body":<body>}`; every Misskey stream is a member of the
/// room of that name.
pub const BROADCAST: &str = "broadcast";

/// Turns one bus message into the event of room `channel`.
pub fn translate(channel: String, message: &RawValue) -> Result<BusEvent<'_>, BusError> {
    if channel.is_empty() {
        return Err(BusError::EmptyChannel);
    }
    // `notesStream` carries the bare note.
    if channel == "notesStream" {
        return Ok(BusEvent {
            room: channel,
            event: "note".into(),
            data: message.get(),
            audience: None,
        });
    }
    let m: Message<'_> =
        serde_json::from_str(message.get()).map_err(|e| BusError::Message(e.to_string()))?;
    let mut data = raw_or_null(m.body);
    let mut audience = None;
    // Misskey wraps note stream events as {id, body, ...}.
    if channel.starts_with("noteStream:") {
        if let Ok(inner) = serde_json::from_str::<NoteStreamBody<'_>>(data) {
            audience = inner.audience();
            data = raw_or_null(inner.body);
        }
    }
    Ok(BusEvent {
        room: channel,
        event: m.kind,
        data,
        audience,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn channels_become_rooms_and_note_streams_are_unwrapped() {
        let m = raw(r#"{"type":"reacted","body":{"id":"n1","body":{"reaction":"+1"}}}"#);
        let e = translate("noteStream:n1".into(), &m).unwrap();
        assert_eq!(
            (e.room.as_str(), e.event.as_str(), e.data),
            ("noteStream:n1", "reacted", r#"{"reaction":"+1"}"#)
        );
        let m = raw(r#"{"id":"n1","text":"hi"}"#);
        let e = translate("notesStream".into(), &m).unwrap();
        assert_eq!(
            (e.event.as_str(), e.data),
            ("note", r#"{"id":"n1","text":"hi"}"#)
        );
        let m = raw(r#"{"type":"emojiAdded"}"#);
        assert_eq!(translate("broadcast".into(), &m).unwrap().data, "null");
    }

    #[test]
    fn a_non_public_note_update_carries_who_may_see_it() {
        let m = raw(
            r#"{"type":"deleted","body":{"id":"n3","userId":"u1","visibility":"specified","visibleUserIds":["u2"],"body":{}}}"#,
        );
        assert_eq!(
            translate("noteStream:n3".into(), &m).unwrap().audience,
            Some(NoteVisibility {
                author: "u1".into(),
                visible_users: Some(vec!["u2".into()])
            })
        );
        let m = raw(
            r#"{"type":"deleted","body":{"id":"n4","userId":"u1","visibility":"home","body":{}}}"#,
        );
        assert_eq!(
            translate("noteStream:n4".into(), &m).unwrap().audience,
            None
        );
    }

    #[test]
    fn redis_messages_are_read_whole() {
        let e = parse(
            br#"{"channel":"mainStream:u1","message":{"type":"notification","body":{"id":"x"}}}"#,
        )
        .unwrap();
        assert_eq!(
            (e.room.as_str(), e.event.as_str(), e.data),
            ("mainStream:u1", "notification", r#"{"id":"x"}"#)
        );
        assert!(matches!(parse(b"nope"), Err(BusError::Envelope(_))));
        assert_eq!(parse(&[0xff, 0xfe]), Err(BusError::NotUtf8));
        assert!(matches!(
            parse(br#"{"message":{}}"#),
            Err(BusError::Envelope(_))
        ));
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert_eq!(
            translate(String::new(), &raw("{}")),
            Err(BusError::EmptyChannel)
        );
        assert!(matches!(
            translate("x".into(), &raw(r#"{"body":1}"#)),
            Err(BusError::Message(m)) if m.contains("type")
        ));
    }
}
