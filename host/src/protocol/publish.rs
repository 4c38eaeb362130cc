//! The bodies of `POST /api/publish` and `/api/rooms/join|leave` as a
//! codec, without I/O or host types (so they can be fuzzed): a publish is
//! `{"room","event","data"}`, Misskey's own bus message
//! `{"channel","message"}` (read by [`super::misskey::bus`]), or an array of
//! them; a rooms body names a user or a connection and the rooms.

use serde::Deserialize;
use serde_json::value::RawValue;

pub use super::misskey::bus::NoteVisibility;
use super::misskey::bus::{self, BusError};

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

/// A validated publish: room, event, data (JSON text).
#[derive(Debug, PartialEq, Eq)]
pub struct PublishItem<'a> {
    pub room: String,
    pub event: String,
    pub data: &'a str,
    /// Misskey note updates of non-public notes: who may see them.
    pub audience: Option<NoteVisibility>,
}

/// What is wrong with one item of a publish body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemError {
    #[error("`message` goes with `channel`, not `room`")]
    MessageWithRoom,
    #[error("missing field `event`")]
    MissingEvent,
    #[error("`room` must not be empty")]
    EmptyRoom,
    #[error("`event` must not be empty")]
    EmptyEvent,
    #[error("`event`/`data` go with `room`; Misskey's bus shape is {{\"channel\", \"message\"}}")]
    EventWithChannel,
    #[error("missing field `message`")]
    MissingMessage,
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("give `room` or `channel`, not both")]
    RoomAndChannel,
    #[error("missing field `room`")]
    MissingRoom,
}

/// Why a publish body is refused (the API answers 400 with this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("body is not UTF-8")]
    NotUtf8,
    #[error("invalid publish {shape}: {reason}")]
    Json { shape: &'static str, reason: String },
    #[error("body must be a JSON object {{\"room\",\"event\",\"data\"}} (or Misskey's {{\"channel\",\"message\"}}) or an array of them")]
    Shape,
    #[error("item {index}: {error}")]
    Item { index: usize, error: ItemError },
}

fn raw_or_null(v: Option<&RawValue>) -> &str {
    v.map(RawValue::get).unwrap_or("null")
}

fn normalize(it: RawItem<'_>) -> Result<PublishItem<'_>, ItemError> {
    match (it.room, it.channel) {
        (Some(room), None) => {
            if it.message.is_some() {
                return Err(ItemError::MessageWithRoom);
            }
            let event = it.event.ok_or(ItemError::MissingEvent)?;
            if room.is_empty() {
                return Err(ItemError::EmptyRoom);
            }
            if event.is_empty() {
                return Err(ItemError::EmptyEvent);
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
                return Err(ItemError::EventWithChannel);
            }
            if channel.is_empty() {
                return Err(BusError::EmptyChannel.into());
            }
            let message = it.message.ok_or(ItemError::MissingMessage)?;
            let e = bus::translate(channel, message)?;
            Ok(PublishItem {
                room: e.room,
                event: e.event,
                data: e.data,
                audience: e.audience,
            })
        }
        (Some(_), Some(_)) => Err(ItemError::RoomAndChannel),
        (None, None) => Err(ItemError::MissingRoom),
    }
}

pub fn parse_publish(body: &[u8]) -> Result<Vec<PublishItem<'_>>, PublishError> {
    let text = std::str::from_utf8(body).map_err(|_| PublishError::NotUtf8)?;
    let json = |shape: &'static str| {
        move |e: serde_json::Error| PublishError::Json {
            shape,
            reason: e.to_string(),
        }
    };
    let items: Vec<RawItem<'_>> = match text.trim_start().as_bytes().first() {
        Some(b'[') => serde_json::from_str(text).map_err(json("array"))?,
        Some(b'{') => vec![serde_json::from_str(text).map_err(json("object"))?],
        _ => return Err(PublishError::Shape),
    };
    items
        .into_iter()
        .enumerate()
        .map(|(index, it)| normalize(it).map_err(|error| PublishError::Item { index, error }))
        .collect()
}

/// Body of `/api/rooms/join` and `/api/rooms/leave` (also carried to the
/// other nodes of a cluster as is).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
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

/// Why a rooms body is refused (the API answers 400 with this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomsError {
    #[error("body must be {{\"user\" or \"connection\", \"rooms\": [...]}}: {0}")]
    Json(String),
    #[error("give `user` or `connection`, not both")]
    UserAndConnection,
    #[error("missing `user` or `connection`")]
    NoTarget,
    #[error("`user` must not be empty")]
    EmptyUser,
    #[error("room names must not be empty")]
    EmptyRoom,
}

pub fn parse_rooms(body: &[u8]) -> Result<RoomsBody, RoomsError> {
    let b: RoomsBody = serde_json::from_slice(body).map_err(|e| RoomsError::Json(e.to_string()))?;
    match (&b.user, b.connection) {
        (Some(_), Some(_)) => return Err(RoomsError::UserAndConnection),
        (None, None) => return Err(RoomsError::NoTarget),
        (Some(u), None) if u.is_empty() => return Err(RoomsError::EmptyUser),
        _ => {}
    }
    if b.rooms.iter().any(String::is_empty) {
        return Err(RoomsError::EmptyRoom);
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
        assert!(parse_publish(b"nope")
            .unwrap_err()
            .to_string()
            .contains("JSON object"));
        assert!(parse_publish(br#"{"event":"e"}"#)
            .unwrap_err()
            .to_string()
            .contains("room"));
        assert!(parse_publish(br#"{"room":"","event":"e"}"#)
            .unwrap_err()
            .to_string()
            .contains("room"));
        assert!(parse_publish(br#"{"room":"r","event":"e","extra":1}"#)
            .unwrap_err()
            .to_string()
            .contains("extra"));
        assert!(parse_publish(br#"[{"room":"r","event":"e"},{"room":"r"}]"#)
            .unwrap_err()
            .to_string()
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
            .to_string()
            .contains("message"));
        assert!(parse_publish(br#"{"channel":"x","message":{"body":1}}"#)
            .unwrap_err()
            .to_string()
            .contains("type"));
        assert!(parse_publish(br#"{"channel":"x","room":"y","message":{}}"#)
            .unwrap_err()
            .to_string()
            .contains("not both"));
        assert!(
            parse_publish(br#"{"channel":"x","event":"e","message":{"type":"t"}}"#)
                .unwrap_err()
                .to_string()
                .contains("bus shape")
        );
    }

    #[test]
    fn rooms_bodies() {
        assert!(parse_rooms(br#"{"user":"u","rooms":["a"]}"#).is_ok());
        assert!(parse_rooms(br#"{"connection":3,"rooms":[],"channel":"/"}"#).is_ok());
        assert!(parse_rooms(br#"{"rooms":["a"]}"#)
            .unwrap_err()
            .to_string()
            .contains("missing"));
        assert!(parse_rooms(br#"{"user":"u","connection":1,"rooms":["a"]}"#)
            .unwrap_err()
            .to_string()
            .contains("not both"));
        assert!(parse_rooms(br#"{"user":"u","rooms":[""]}"#)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(parse_rooms(br#"{"user":"u","rooms":"a"}"#)
            .unwrap_err()
            .to_string()
            .contains("rooms"));
        assert!(parse_rooms(br#"{"user":"u"}"#)
            .unwrap_err()
            .to_string()
            .contains("rooms"));
    }
}
