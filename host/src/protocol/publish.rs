//! The bodies of `POST /api/publish` and `/api/rooms/join|leave` as a
//! codec, without I/O or host types (so they can be fuzzed): a publish is
//! `{"room","event","data"}`, Misskey's own bus message
//! `{"channel","message"}`, or an array of them; a rooms body names a user
//! or a connection and the rooms.

use serde::Deserialize;
use serde_json::value::RawValue;

/// Who may see an update of a non-public Misskey note, as the bus message
/// says: the author and, for a `specified` note, the users it names (None:
/// a `followers` note, whose audience is the author's followers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteVisibility {
    pub author: String,
    pub visible_users: Option<Vec<String>>,
}

/// One item of a publish body, in either accepted shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawItem<'a> {
    room: Option<String>,
    event: Option<String>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    /// Misskey's event bus shape: `{"channel", "message"}`.
    channel: Option<String>,
    #[serde(borrow, default)]
    message: Option<&'a RawValue>,
}

/// The `message` of Misskey's bus: `{type, body}` (or a bare value for
/// `notesStream`).
#[derive(Deserialize)]
struct BusMessage<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(borrow, default)]
    body: Option<&'a RawValue>,
}

/// The body of a `noteStream:<id>` bus message: `{id, body}`, and in
/// current Misskey also the note's `userId`, `visibility` and
/// `visibleUserIds`, which decide who may see the update.
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

/// A validated publish: room, event, data (JSON text).
#[derive(Debug, PartialEq, Eq)]
pub struct PublishItem<'a> {
    pub room: String,
    pub event: String,
    pub data: &'a str,
    /// Misskey note updates of non-public notes: who may see them.
    pub audience: Option<NoteVisibility>,
}

fn raw_or_null(v: Option<&RawValue>) -> &str {
    v.map(RawValue::get).unwrap_or("null")
}

fn normalize(i: usize, it: RawItem<'_>) -> Result<PublishItem<'_>, String> {
    match (it.room, it.channel) {
        (Some(room), None) => {
            if it.message.is_some() {
                return Err(format!(
                    "item {i}: `message` goes with `channel`, not `room`"
                ));
            }
            let event = it
                .event
                .ok_or_else(|| format!("item {i}: missing field `event`"))?;
            if room.is_empty() {
                return Err(format!("item {i}: `room` must not be empty"));
            }
            if event.is_empty() {
                return Err(format!("item {i}: `event` must not be empty"));
            }
            Ok(PublishItem {
                room,
                event,
                data: raw_or_null(it.data),
                audience: None,
            })
        }
        (None, Some(channel)) => {
            if it.event.is_some() || it.data.is_some() {
                return Err(format!(
                    "item {i}: `event`/`data` go with `room`; Misskey's bus shape is {{\"channel\", \"message\"}}"
                ));
            }
            if channel.is_empty() {
                return Err(format!("item {i}: `channel` must not be empty"));
            }
            let message = it
                .message
                .ok_or_else(|| format!("item {i}: missing field `message`"))?;
            // `notesStream` carries the bare note.
            if channel == "notesStream" {
                return Ok(PublishItem {
                    room: channel,
                    event: "note".into(),
                    data: message.get(),
                    audience: None,
                });
            }
            let m: BusMessage<'_> = serde_json::from_str(message.get())
                .map_err(|e| format!("item {i}: `message` must be {{\"type\", \"body\"}}: {e}"))?;
            let mut data = raw_or_null(m.body);
            let mut audience = None;
            // Misskey wraps note stream events as {id, body, ...}.
            if channel.starts_with("noteStream:") {
                if let Ok(inner) = serde_json::from_str::<NoteStreamBody<'_>>(data) {
                    audience = inner.audience();
                    data = raw_or_null(inner.body);
                }
            }
            Ok(PublishItem {
                room: channel,
                event: m.kind,
                data,
                audience,
            })
        }
        (Some(_), Some(_)) => Err(format!("item {i}: give `room` or `channel`, not both")),
        (None, None) => Err(format!("item {i}: missing field `room`")),
    }
}

pub fn parse_publish(body: &[u8]) -> Result<Vec<PublishItem<'_>>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "body is not UTF-8".to_owned())?;
    let items: Vec<RawItem<'_>> = match text.trim_start().as_bytes().first() {
        Some(b'[') => {
            serde_json::from_str(text).map_err(|e| format!("invalid publish array: {e}"))?
        }
        Some(b'{') => {
            vec![serde_json::from_str(text).map_err(|e| format!("invalid publish object: {e}"))?]
        }
        _ => {
            return Err(
                "body must be a JSON object {\"room\",\"event\",\"data\"} (or Misskey's {\"channel\",\"message\"}) or an array of them"
                    .into(),
            )
        }
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, it)| normalize(i, it))
        .collect()
}

/// Body of `/api/rooms/join` and `/api/rooms/leave`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomsBody {
    /// Every connection of this user on this node...
    pub user: Option<String>,
    /// ...or this one connection.
    pub connection: Option<u64>,
    pub rooms: Vec<String>,
    /// Only instances of this channel or namespace (default: every
    /// instance of the connections).
    pub channel: Option<String>,
}

pub fn parse_rooms(body: &[u8]) -> Result<RoomsBody, String> {
    let b: RoomsBody = serde_json::from_slice(body).map_err(|e| {
        format!("body must be {{\"user\" or \"connection\", \"rooms\": [...]}}: {e}")
    })?;
    match (&b.user, b.connection) {
        (Some(_), Some(_)) => return Err("give `user` or `connection`, not both".into()),
        (None, None) => return Err("missing `user` or `connection`".into()),
        (Some(u), None) if u.is_empty() => return Err("`user` must not be empty".into()),
        _ => {}
    }
    if b.rooms.iter().any(String::is_empty) {
        return Err("room names must not be empty".into());
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_bodies() {
        assert_eq!(
            parse_publish(br#"{"room":"r","event":"e","data":{"a":1}}"#)
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            parse_publish(br#"[{"room":"r","event":"e"},{"room":"s","event":"e","data":1}]"#)
                .unwrap()
                .len(),
            2
        );
        assert!(parse_publish(b"nope").unwrap_err().contains("JSON object"));
        assert!(parse_publish(br#"{"event":"e"}"#)
            .unwrap_err()
            .contains("room"));
        assert!(parse_publish(br#"{"room":"","event":"e"}"#)
            .unwrap_err()
            .contains("room"));
        assert!(parse_publish(br#"{"room":"r","event":"e","extra":1}"#)
            .unwrap_err()
            .contains("extra"));
        assert!(parse_publish(br#"[{"room":"r","event":"e"},{"room":"r"}]"#)
            .unwrap_err()
            .contains("event"));
    }

    #[test]
    fn misskey_bus_shape() {
        let items = parse_publish(
            br#"[{"channel":"notesStream","message":{"id":"n1","text":"hi"}},
                 {"channel":"mainStream:u1","message":{"type":"notification","body":{"id":"x"}}},
                 {"channel":"noteStream:n1","message":{"type":"reacted","body":{"id":"n1","body":{"reaction":"+1"}}}},
                 {"channel":"broadcast","message":{"type":"emojiAdded"}}]"#,
        )
        .unwrap();
        let flat: Vec<_> = items
            .iter()
            .map(|i| (i.room.as_str(), i.event.as_str(), i.data))
            .collect();
        assert_eq!(
            flat,
            vec![
                ("notesStream", "note", r#"{"id":"n1","text":"hi"}"#),
                ("mainStream:u1", "notification", r#"{"id":"x"}"#),
                ("noteStream:n1", "reacted", r#"{"reaction":"+1"}"#),
                ("broadcast", "emojiAdded", "null"),
            ]
        );
        assert!(items.iter().all(|i| i.audience.is_none()));
        let items = parse_publish(
            br#"[{"channel":"noteStream:n2","message":{"type":"reacted","body":{"id":"n2","userId":"u1","visibility":"followers","visibleUserIds":[],"body":{"reaction":"+1"}}}},
                 {"channel":"noteStream:n3","message":{"type":"deleted","body":{"id":"n3","userId":"u1","visibility":"specified","visibleUserIds":["u2"],"body":{}}}},
                 {"channel":"noteStream:n4","message":{"type":"deleted","body":{"id":"n4","userId":"u1","visibility":"home","body":{}}}}]"#,
        )
        .unwrap();
        assert_eq!(items[0].data, r#"{"reaction":"+1"}"#);
        let vis = |author: &str, visible_users: Option<Vec<String>>| NoteVisibility {
            author: author.into(),
            visible_users,
        };
        assert_eq!(items[0].audience, Some(vis("u1", None)));
        assert_eq!(items[1].audience, Some(vis("u1", Some(vec!["u2".into()]))));
        assert_eq!(items[2].audience, None);
        assert!(parse_publish(br#"{"channel":"x"}"#)
            .unwrap_err()
            .contains("message"));
        assert!(parse_publish(br#"{"channel":"x","message":{"body":1}}"#)
            .unwrap_err()
            .contains("type"));
        assert!(parse_publish(br#"{"channel":"x","room":"y","message":{}}"#)
            .unwrap_err()
            .contains("not both"));
        assert!(
            parse_publish(br#"{"channel":"x","event":"e","message":{"type":"t"}}"#)
                .unwrap_err()
                .contains("bus shape")
        );
    }

    #[test]
    fn rooms_bodies() {
        assert!(parse_rooms(br#"{"user":"u","rooms":["a"]}"#).is_ok());
        assert!(parse_rooms(br#"{"connection":3,"rooms":[],"channel":"/"}"#).is_ok());
        assert!(parse_rooms(br#"{"rooms":["a"]}"#)
            .unwrap_err()
            .contains("missing"));
        assert!(parse_rooms(br#"{"user":"u","connection":1,"rooms":["a"]}"#)
            .unwrap_err()
            .contains("not both"));
        assert!(parse_rooms(br#"{"user":"u","rooms":[""]}"#)
            .unwrap_err()
            .contains("empty"));
        assert!(parse_rooms(br#"{"user":"u","rooms":"a"}"#)
            .unwrap_err()
            .contains("rooms"));
        assert!(parse_rooms(br#"{"user":"u"}"#)
            .unwrap_err()
            .contains("rooms"));
    }
}
