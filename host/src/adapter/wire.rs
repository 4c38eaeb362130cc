//! The channels and messages of `@socket.io/redis-adapter` 8.x (and of
//! `@socket.io/redis-emitter` 5.x, which writes the same), as pure
//! functions: one place for every name both sides must agree on.
//!
//! - Broadcasts: notepack `[uid, packet, {rooms, except, flags}]` on
//!   `<key>#<nsp>#` (several rooms, or none: the whole namespace) or
//!   `<key>#<nsp>#<room>#` (one room); `packet` is `{type: 2, data:
//!   [event, ...args], nsp}`, binary arguments as MessagePack `bin`.
//! - Requests: JSON (notepack for `BROADCAST`) on `<key>-request#<nsp>#`,
//!   `{uid, type, requestId?, ...}`; a server's count is the number of
//!   subscribers of that channel (`PUBSUB NUMSUB`).
//! - Responses: JSON (notepack for `BROADCAST_ACK`) on
//!   `<key>-response#<nsp>#`, which every server subscribes to (with
//!   `publishOnSpecificResponseChannel` as well as without).

use serde_json::Value;

use super::notepack::{self, Mp};

/// The channel of broadcasts to several rooms (or to all of a namespace).
pub fn broadcast_channel(key: &str, nsp: &str) -> String {
    format!("{key}#{nsp}#")
}

/// The channel of broadcasts to one room.
pub fn room_channel(key: &str, nsp: &str, room: &str) -> String {
    format!("{key}#{nsp}#{room}#")
}

/// The pattern every server of a namespace subscribes to.
pub fn broadcast_pattern(key: &str, nsp: &str) -> String {
    format!("{key}#{nsp}#*")
}

pub fn request_channel(key: &str, nsp: &str) -> String {
    format!("{key}-request#{nsp}#")
}

pub fn response_channel(key: &str, nsp: &str) -> String {
    format!("{key}-response#{nsp}#")
}

pub use crate::conventions::server_side_room;

/// What a message on a subscribed channel is.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// A broadcast for `nsp`, on the channel of `room` if it names one.
    Broadcast {
        nsp: &'a str,
        room: Option<&'a str>,
    },
    Request {
        nsp: &'a str,
    },
}

/// Which of `namespaces` a channel belongs to, and what it carries (the
/// longest namespace that matches wins).
pub fn classify<'a>(key: &str, channel: &'a str, namespaces: &'a [String]) -> Option<Incoming<'a>> {
    let best = |rest: &'a str| -> Option<(&'a str, &'a str)> {
        namespaces
            .iter()
            .filter_map(|n| {
                Some((
                    n.as_str(),
                    rest.strip_prefix(n.as_str())?.strip_prefix('#')?,
                ))
            })
            .max_by_key(|(n, _)| n.len())
    };
    if let Some(rest) = channel
        .strip_prefix(key)
        .and_then(|r| r.strip_prefix("-request#"))
    {
        let (nsp, tail) = best(rest)?;
        return tail.is_empty().then_some(Incoming::Request { nsp });
    }
    let rest = channel.strip_prefix(key)?.strip_prefix('#')?;
    let (nsp, tail) = best(rest)?;
    if tail.is_empty() {
        return Some(Incoming::Broadcast { nsp, room: None });
    }
    Some(Incoming::Broadcast {
        nsp,
        room: Some(tail.strip_suffix('#')?),
    })
}

/// The adapter's request types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sockets = 0,
    AllRooms = 1,
    RemoteJoin = 2,
    RemoteLeave = 3,
    RemoteDisconnect = 4,
    RemoteFetch = 5,
    ServerSideEmit = 6,
    Broadcast = 7,
    BroadcastClientCount = 8,
    BroadcastAck = 9,
}

impl Kind {
    fn of(n: i64) -> Option<Kind> {
        use Kind::*;
        [
            Sockets,
            AllRooms,
            RemoteJoin,
            RemoteLeave,
            RemoteDisconnect,
            RemoteFetch,
            ServerSideEmit,
            Broadcast,
            BroadcastClientCount,
            BroadcastAck,
        ]
        .into_iter()
        .find(|k| *k as i64 == n)
    }
}

/// Why a message of the adapter's protocol is not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Notepack(#[from] notepack::DecodeError),
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("{0}")]
    Shape(&'static str),
}

/// Which sockets a broadcast or request addresses: those in any of
/// `rooms` (all when empty) and in none of `except`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub rooms: Vec<String>,
    pub except: Vec<String>,
}

/// A broadcast read from Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct Broadcast {
    pub uid: String,
    pub nsp: String,
    pub event: String,
    pub args: Vec<Mp>,
    pub to: Selection,
    pub volatile: bool,
    /// For the publishing server's own sockets only.
    pub local: bool,
}

/// A room name as socket.io has it: strings, and numbers as JavaScript
/// prints them (`io.to(42)`).
fn room(v: &Mp) -> Option<String> {
    match v {
        Mp::Str(s) => Some(s.clone()),
        Mp::Int(i) => Some(i.to_string()),
        Mp::UInt(u) => Some(u.to_string()),
        Mp::Float(f) if f.is_finite() => Some(f.to_string()),
        _ => None,
    }
}

fn rooms(v: Option<&Mp>) -> Vec<String> {
    v.and_then(Mp::as_array)
        .map(|a| a.iter().filter_map(room).collect())
        .unwrap_or_default()
}

fn selection(opts: Option<&Mp>) -> Selection {
    Selection {
        rooms: rooms(opts.and_then(|o| o.get("rooms"))),
        except: rooms(opts.and_then(|o| o.get("except"))),
    }
}

/// Reads `[uid, packet, opts]`.
pub fn parse_broadcast(bytes: &[u8]) -> Result<Broadcast, WireError> {
    let msg = notepack::decode(bytes)?;
    let [uid, packet, opts] = msg
        .as_array()
        .ok_or(WireError::Shape("a broadcast is [uid, packet, opts]"))?
    else {
        return Err(WireError::Shape("a broadcast is [uid, packet, opts]"));
    };
    let uid = uid.as_str().unwrap_or_default().to_owned();
    let nsp = packet
        .get("nsp")
        .and_then(Mp::as_str)
        .unwrap_or("/")
        .to_owned();
    match packet.get("type").and_then(Mp::as_i64) {
        Some(2 | 5) => {}
        _ => return Err(WireError::Shape("only EVENT packets are broadcast")),
    }
    let Some([name, args @ ..]) = packet.get("data").and_then(Mp::as_array) else {
        return Err(WireError::Shape("an EVENT's data is [event, ...args]"));
    };
    let event = name
        .as_str()
        .ok_or(WireError::Shape("an event name is a string"))?
        .to_owned();
    let flags = opts.get("flags");
    Ok(Broadcast {
        uid,
        nsp,
        event,
        args: args.to_vec(),
        to: selection(Some(opts)),
        volatile: flags
            .and_then(|f| f.get("volatile"))
            .is_some_and(Mp::truthy),
        local: flags.and_then(|f| f.get("local")).is_some_and(Mp::truthy),
    })
}

/// Writes `[uid, packet, opts]` as a Node server's adapter does.
pub fn broadcast_message(
    uid: &str,
    nsp: &str,
    event: &str,
    args: Vec<Mp>,
    to: &Selection,
) -> Vec<u8> {
    let strings = |v: &[String]| Mp::Array(v.iter().map(|s| Mp::Str(s.clone())).collect());
    let mut data = Vec::with_capacity(args.len() + 1);
    data.push(Mp::Str(event.to_owned()));
    data.extend(args);
    let msg = Mp::Array(vec![
        Mp::Str(uid.to_owned()),
        Mp::Map(vec![
            ("type".into(), Mp::Int(2)),
            ("data".into(), Mp::Array(data)),
            ("nsp".into(), Mp::Str(nsp.to_owned())),
        ]),
        Mp::Map(vec![
            ("rooms".into(), strings(&to.rooms)),
            ("except".into(), strings(&to.except)),
            ("flags".into(), Mp::Map(Vec::new())),
        ]),
    ]);
    let mut out = Vec::new();
    notepack::encode(&msg, &mut out);
    out
}

/// A request read from the request channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub uid: String,
    pub kind: Kind,
    pub request_id: Option<String>,
    /// `SOCKETS`: the rooms asked about; `REMOTE_JOIN`/`LEAVE` with a
    /// selection: the rooms to join or leave.
    pub rooms: Vec<String>,
    /// The sockets addressed (`opts`), when given.
    pub opts: Option<Selection>,
    /// One socket (`REMOTE_JOIN`/`LEAVE`/`DISCONNECT` from a server's
    /// `socket.join` on a remote socket), with its `room`.
    pub sid: Option<String>,
    pub room: Option<String>,
    /// `REMOTE_DISCONNECT`: close the whole connection too.
    pub close: bool,
    /// `SERVER_SIDE_EMIT`: `[event, ...args]`.
    pub data: Vec<Mp>,
    /// `BROADCAST`: the packet, and how long its acks are awaited
    /// (`opts.flags.timeout`).
    pub packet: Option<Mp>,
    pub ack_timeout_ms: Option<u64>,
}

/// Reads a request: JSON when it starts with `{`, notepack otherwise (as
/// the adapter itself reads them).
pub fn parse_request(bytes: &[u8]) -> Result<Request, WireError> {
    let msg = if bytes.first() == Some(&b'{') {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| WireError::Json(e.to_string()))?;
        notepack::from_json(&v, &[])
    } else {
        notepack::decode(bytes)?
    };
    let kind = msg
        .get("type")
        .and_then(Mp::as_i64)
        .and_then(Kind::of)
        .ok_or(WireError::Shape("a request has a known `type`"))?;
    let text = |k: &str| msg.get(k).and_then(room);
    Ok(Request {
        uid: text("uid").unwrap_or_default(),
        kind,
        request_id: text("requestId"),
        rooms: rooms(msg.get("rooms")),
        opts: msg.get("opts").map(|o| selection(Some(o))),
        sid: text("sid"),
        room: text("room"),
        close: msg.get("close").is_some_and(Mp::truthy),
        data: msg
            .get("data")
            .and_then(Mp::as_array)
            .map(<[Mp]>::to_vec)
            .unwrap_or_default(),
        packet: msg.get("packet").cloned(),
        ack_timeout_ms: msg
            .get("opts")
            .and_then(|o| o.get("flags")?.get("timeout")?.as_i64())
            .map(|ms| ms.max(0) as u64),
    })
}

/// The `BROADCAST_ACK` response: one client's acknowledgement (notepack,
/// as the adapter writes it).
pub fn broadcast_ack(request_id: &str, arg: Mp) -> Vec<u8> {
    let mut out = Vec::new();
    notepack::encode(
        &Mp::Map(vec![
            ("type".into(), Mp::Int(Kind::BroadcastAck as i64)),
            ("requestId".into(), Mp::Str(request_id.to_owned())),
            ("packet".into(), arg),
        ]),
        &mut out,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_are_the_adapters() {
        assert_eq!(broadcast_channel("socket.io", "/"), "socket.io#/#");
        assert_eq!(
            room_channel("socket.io", "/chat", "r1"),
            "socket.io#/chat#r1#"
        );
        assert_eq!(broadcast_pattern("k", "/"), "k#/#*");
        assert_eq!(request_channel("socket.io", "/"), "socket.io-request#/#");
        assert_eq!(response_channel("socket.io", "/"), "socket.io-response#/#");
    }

    #[test]
    fn channels_are_told_apart_by_namespace_and_room() {
        let nsps = vec!["/".to_owned(), "/chat".to_owned()];
        let c = |ch| classify("socket.io", ch, &nsps);
        assert_eq!(
            c("socket.io#/#"),
            Some(Incoming::Broadcast {
                nsp: "/",
                room: None
            })
        );
        assert_eq!(
            c("socket.io#/chat#a#b#"),
            Some(Incoming::Broadcast {
                nsp: "/chat",
                room: Some("a#b")
            })
        );
        assert_eq!(
            c("socket.io-request#/chat#"),
            Some(Incoming::Request { nsp: "/chat" })
        );
        assert_eq!(c("socket.io#/other#"), None);
        assert_eq!(c("other#/#"), None);
        assert_eq!(c("socket.io-response#/#"), None);
    }

    #[test]
    fn a_broadcast_round_trips_and_reads_like_the_emitters() {
        let to = Selection {
            rooms: vec!["r".into()],
            except: vec!["sid1".into()],
        };
        let bytes = broadcast_message(
            "u1",
            "/chat",
            "hello",
            vec![Mp::Int(1), Mp::Bin(vec![9])],
            &to,
        );
        let b = parse_broadcast(&bytes).unwrap();
        assert_eq!(b.uid, "u1");
        assert_eq!(b.nsp, "/chat");
        assert_eq!(b.event, "hello");
        assert_eq!(b.args, vec![Mp::Int(1), Mp::Bin(vec![9])]);
        assert_eq!(b.to, to);
        assert!(!b.volatile && !b.local);
        // An emitter's packet without nsp is for "/"; flags and numeric rooms.
        let msg = Mp::Array(vec![
            Mp::Str("emitter".into()),
            Mp::Map(vec![
                ("type".into(), Mp::Int(2)),
                ("data".into(), Mp::Array(vec![Mp::Str("e".into())])),
            ]),
            Mp::Map(vec![
                ("rooms".into(), Mp::Array(vec![Mp::Int(42)])),
                (
                    "flags".into(),
                    Mp::Map(vec![("volatile".into(), Mp::Bool(true))]),
                ),
            ]),
        ]);
        let mut bytes = Vec::new();
        notepack::encode(&msg, &mut bytes);
        let b = parse_broadcast(&bytes).unwrap();
        assert_eq!(
            (b.nsp.as_str(), b.to.rooms.clone(), b.volatile),
            ("/", vec!["42".to_owned()], true)
        );
    }

    #[test]
    fn malformed_broadcasts_are_refused() {
        let enc = |v: Mp| {
            let mut b = Vec::new();
            notepack::encode(&v, &mut b);
            b
        };
        assert!(parse_broadcast(b"\x01").is_err());
        assert!(parse_broadcast(&enc(Mp::Array(vec![Mp::Nil]))).is_err());
        let no_data = Mp::Array(vec![
            Mp::Str("u".into()),
            Mp::Map(vec![("type".into(), Mp::Int(2))]),
            Mp::Map(vec![]),
        ]);
        assert!(parse_broadcast(&enc(no_data)).is_err());
        let connect = Mp::Array(vec![
            Mp::Str("u".into()),
            Mp::Map(vec![
                ("type".into(), Mp::Int(0)),
                ("data".into(), Mp::Array(vec![])),
            ]),
            Mp::Map(vec![]),
        ]);
        assert!(parse_broadcast(&enc(connect)).is_err());
    }

    #[test]
    fn requests_read_from_json_and_notepack() {
        let r = parse_request(
            br#"{"uid":"abc","requestId":"r1","type":5,"opts":{"rooms":["a"],"except":["b"]}}"#,
        )
        .unwrap();
        assert_eq!(r.kind, Kind::RemoteFetch);
        assert_eq!(r.request_id.as_deref(), Some("r1"));
        assert_eq!(
            r.opts,
            Some(Selection {
                rooms: vec!["a".into()],
                except: vec!["b".into()]
            })
        );
        let r = parse_request(
            br#"{"uid":"emitter","type":2,"opts":{"rooms":[],"except":[]},"rooms":["x"]}"#,
        )
        .unwrap();
        assert_eq!(
            (r.kind, r.rooms.clone(), r.request_id.clone()),
            (Kind::RemoteJoin, vec!["x".to_owned()], None)
        );
        let r = parse_request(br#"{"uid":"u","type":6,"data":["ping",1]}"#).unwrap();
        assert_eq!(r.data, vec![Mp::Str("ping".into()), Mp::Int(1)]);
        let mut bytes = Vec::new();
        notepack::encode(
            &Mp::Map(vec![
                ("uid".into(), Mp::Str("u".into())),
                ("requestId".into(), Mp::Str("q".into())),
                ("type".into(), Mp::Int(7)),
                ("packet".into(), Mp::Map(vec![])),
            ]),
            &mut bytes,
        );
        let r = parse_request(&bytes).unwrap();
        assert_eq!((r.kind, r.packet.is_some()), (Kind::Broadcast, true));
        assert!(parse_request(br#"{"type":99}"#).is_err());
        assert!(parse_request(b"{nope").is_err());
    }

    #[test]
    fn a_broadcast_ack_is_notepack() {
        let b = broadcast_ack("q", Mp::Str("ok".into()));
        let v = notepack::decode(&b).unwrap();
        assert_eq!(v.get("type").and_then(Mp::as_i64), Some(9));
        assert_eq!(v.get("requestId").and_then(Mp::as_str), Some("q"));
        assert_eq!(v.get("packet").and_then(Mp::as_str), Some("ok"));
    }
}
