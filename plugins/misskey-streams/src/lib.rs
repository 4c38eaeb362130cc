//! Misskey's other channels: `drive`, `admin`, `serverStats`,
//! `queueStats`, `reversi`, `reversiGame`, `chatUser` and `chatRoom`.
//!
//! Most relay one of Misskey's event-bus streams unchanged: the instance
//! joins the bus room (`driveStream:<me>`, `reversiGameStream:<game>`,
//! `chatUserStream:<me>-<other>`, ...) and the host frames what the backend
//! publishes there. The rest is done here:
//!
//! - `serverStats`: the host's machine figures (room `chanhost:stats`, every
//!   2 s, Misskey's shape) go out as `stats`; the last 200 are kept, newest
//!   first, to answer `requestLog {id, length}` with `statsLog`.
//! - `queueStats`: what the backend publishes to room `queueStats` (event
//!   `stats`, Misskey's `{deliver, inbox}` shape) goes out likewise, with the
//!   same log; Misskey's job queues are not the host's to measure.
//! - `admin` opens for moderators and administrators only (the `isModerator`
//!   / `isAdmin` claims of Misskey's `i` answer).
//! - `chatUser`/`chatRoom`: opening checks the token's `read:chat`
//!   permission and, for a room, that the user may read it, through the
//!   Misskey API; `read` marks the conversation read through the API
//!   (`chat/messages/user-timeline` / `room-timeline`, which do it).
//! - `reversiGame`: Misskey takes game moves (`ready`, `updateSettings`,
//!   `putStone`, `cancel`, `claimTimeIsUp`) only over its own stream, so
//!   they are validated as Misskey does and forwarded to the endpoint named
//!   by `reversi_endpoint` (`POST /api/<endpoint>` with `{i, gameId, type,
//!   body}`); without it they are dropped.
//!
//! Configuration (`[plugins.misskey-streams]`): `backend` (the Misskey
//! origin, also in `allow_http`) and `reversi_endpoint`.

use std::cell::RefCell;
use std::collections::VecDeque;

use chanhost_plugin::types::{
    ConnectRequest, DisconnectReason, Instance, Manifest, Payload, Rejection,
};
use chanhost_plugin::{export, host, json, log_warn, Guest};
use serde_json::{json, Value};

use misskey_api::{channel, Backend};

const HOST_STATS: &str = "chanhost:stats";
const QUEUE_STATS: &str = "queueStats";
const LOG_LEN: usize = 200;
const REVERSI_KEYS: [&str; 6] = [
    "map",
    "bw",
    "isLlotheo",
    "canPutEverywhere",
    "loopedBoard",
    "timeLimitForEachTurn",
];

/// What an open instance needs to answer its messages; kept in the store
/// (`_open:<connection>:<id>`) so it outlives a reload or a rebuild.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
enum Open {
    ServerStats,
    QueueStats,
    ReversiGame { game: String },
    ChatUser { other: String },
    ChatRoom { room: String },
    Other,
}

#[derive(Default)]
struct State {
    backend: Option<Backend>,
    reversi_endpoint: Option<String>,
    server_log: VecDeque<String>,
    queue_log: VecDeque<String>,
}

fn open_key(target: &Instance) -> String {
    format!("_open:{}:{}", target.connection, target.id)
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

fn with<R>(f: impl FnOnce(&mut State) -> R) -> R {
    STATE.with(|s| f(&mut s.borrow_mut()))
}

fn reject(message: impl Into<String>) -> Rejection {
    Rejection {
        message: message.into(),
        data: None,
    }
}

/// The connection's Misskey token, kept for calls made later on the
/// user's behalf (private key, removed when the instance ends).
fn token_key(target: &Instance) -> String {
    format!("_token:{}:{}", target.connection, target.id)
}

fn push_log(log: &mut VecDeque<String>, sample: String) {
    log.push_front(sample);
    log.truncate(LOG_LEN);
}

/// `statsLog`: the newest `length` samples (all when absent), newest first.
fn log_reply(log: &VecDeque<String>, length: Option<f64>) -> String {
    // JavaScript's `log.slice(0, length)`: truncated, negative counts from
    // the end, absent or NaN-free infinity means all.
    let len = log.len() as f64;
    let end = match length {
        None => len,
        Some(l) if l.is_nan() => 0.0,
        Some(l) if l < 0.0 => (len + l.trunc()).max(0.0),
        Some(l) => l.trunc().min(len),
    };
    format!(
        "[{}]",
        log.iter()
            .take(end as usize)
            .cloned()
            .collect::<Vec<_>>()
            .join(",")
    )
}

/// Misskey's checks of a reversi game message.
fn valid_reversi(kind: &str, body: &Value) -> bool {
    match kind {
        "ready" => body.is_boolean(),
        "updateSettings" => {
            let (Some(k), Some(v)) = (body.get("key").and_then(Value::as_str), body.get("value"))
            else {
                return false;
            };
            REVERSI_KEYS.contains(&k)
                && match k {
                    "map" => v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
                    "bw" => matches!(v.as_str(), Some("random" | "1" | "2")),
                    "timeLimitForEachTurn" => v.as_f64().is_some_and(|n| n >= 0.0),
                    _ => v.is_boolean(),
                }
        }
        "putStone" => {
            body.get("pos").is_some_and(Value::is_number)
                && body.get("id").is_some_and(Value::is_string)
        }
        "cancel" | "claimTimeIsUp" => true,
        _ => false,
    }
}

/// Whether the connection's claims (Misskey's `i` answer) say moderator.
fn moderator(req: &ConnectRequest) -> bool {
    let claims: Value = req
        .identity
        .as_ref()
        .and_then(|i| serde_json::from_str(&i.claims).ok())
        .unwrap_or(Value::Null);
    let flag = |k: &str| claims.get(k).and_then(Value::as_bool).unwrap_or(false);
    flag("isModerator") || flag("isAdmin")
}

/// Misskey's `hasPermissionToViewRoomTimeline`, without side effects: the
/// room exists (`chat/rooms/show`, which needs `read:chat`) and the user
/// owns it, is a member (`chat/rooms/members`) or is a moderator.
fn chat_room_member(
    b: &Backend,
    token: &str,
    room: &str,
    me: &str,
    moderator: bool,
) -> Result<(), Rejection> {
    let shown = b
        .call("chat/rooms/show", Some(token), json!({ "roomId": room }))
        .map_err(reject)?;
    if moderator || shown.get("ownerId").and_then(Value::as_str) == Some(me) {
        return Ok(());
    }
    let members = b
        .all("chat/rooms/members", token, json!({ "roomId": room }))
        .map_err(|e| reject(e.to_string()))?;
    let member = members.iter().any(|m| {
        m.get("userId").and_then(Value::as_str) == Some(me)
            || m.get("user")
                .and_then(|u| u.get("id"))
                .and_then(Value::as_str)
                == Some(me)
    });
    if member {
        Ok(())
    } else {
        Err(reject("not a member of this chat room"))
    }
}

struct Streams;

impl Streams {
    fn open(req: &ConnectRequest) -> Result<Open, Rejection> {
        let params: Value = serde_json::from_str(&req.params).unwrap_or(Value::Null);
        let me = req.identity.as_ref().map(|i| i.user_id.clone());
        let user = || {
            me.clone()
                .ok_or_else(|| reject("this channel needs a signed-in user"))
        };
        let param = |name: &str| {
            params
                .get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| reject(format!("param `{name}` must be a string")))
        };
        let join = |room: String| host::join(&req.target, &room);
        let backend = with(|s| s.backend.clone());
        let credential = req.credential.as_deref();
        // The token's `read:chat` permission, where the backend can tell.
        let chat_check = |endpoint: &str, body: Value| -> Result<(), Rejection> {
            match (&backend, credential) {
                (Some(b), Some(t)) => b.call(endpoint, Some(t), body).map(|_| ()).map_err(reject),
                _ => Ok(()),
            }
        };
        let open = match req.channel.as_str() {
            "drive" => {
                join(format!("driveStream:{}", user()?));
                Open::Other
            }
            "admin" => {
                let u = user()?;
                if !moderator(req) {
                    return Err(reject("the admin channel is for moderators"));
                }
                join(format!("adminStream:{u}"));
                Open::Other
            }
            "serverStats" => {
                join("mk:serverStats".into());
                Open::ServerStats
            }
            "queueStats" => {
                join("mk:queueStats".into());
                Open::QueueStats
            }
            "reversi" => {
                join(format!("reversiStream:{}", user()?));
                Open::Other
            }
            "reversiGame" => {
                let game = param("gameId")?;
                join(format!("reversiGameStream:{game}"));
                Open::ReversiGame { game }
            }
            "chatUser" => {
                let u = user()?;
                let other = param("otherId")?;
                if other == u {
                    return Err(reject("cannot chat with yourself"));
                }
                chat_check("chat/history", json!({ "limit": 1 }))?;
                join(format!("chatUserStream:{u}-{other}"));
                Open::ChatUser { other }
            }
            "chatRoom" => {
                let u = user()?;
                let room = param("roomId")?;
                let (Some(b), Some(token)) = (&backend, credential) else {
                    return Err(reject(
                        "chatRoom needs the Misskey backend to check membership",
                    ));
                };
                chat_room_member(b, token, &room, &u, moderator(req))?;
                join(format!("chatRoomStream:{room}"));
                Open::ChatRoom { room }
            }
            other => return Err(reject(format!("unknown channel {other}"))),
        };
        if let (Some(t), Open::ReversiGame { .. } | Open::ChatUser { .. } | Open::ChatRoom { .. }) =
            (credential, &open)
        {
            host::kv_set(&token_key(&req.target), t);
        }
        Ok(open)
    }

    fn forward(target: &Instance, endpoint: &str, body: Value) {
        let Some(b) = with(|s| s.backend.clone()) else {
            return;
        };
        let Some(token) = host::kv_get(&token_key(target)) else {
            return;
        };
        if let Err(e) = b.call(endpoint, Some(&token), body) {
            log_warn(&format!("{endpoint}: {e}"));
        }
    }
}

impl Guest for Streams {
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
            version: env!("CARGO_PKG_VERSION").into(),
            channels: vec![
                channel("drive", true, true),
                channel("admin", true, true),
                channel("serverStats", false, true),
                channel("queueStats", false, true),
                channel("reversi", true, true),
                channel("reversiGame", false, false),
                channel("chatUser", true, false),
                channel("chatRoom", true, false),
            ],
            namespaces: vec![],
            frames: vec![],
        }
    }

    fn init(config: String) -> Result<(), String> {
        let config: Value = serde_json::from_str(&config).map_err(|e| e.to_string())?;
        let backend = misskey_api::backend_from_config(&config)?;
        let reversi_endpoint = match config.get("reversi_endpoint") {
            None => None,
            Some(Value::String(s)) if !s.is_empty() => Some(s.trim_start_matches('/').to_owned()),
            Some(other) => {
                return Err(format!(
                    "`reversi_endpoint` must be an API endpoint name, not {other}"
                ))
            }
        };
        with(|s| {
            s.backend = backend;
            s.reversi_endpoint = reversi_endpoint;
        });
        host::listen(HOST_STATS);
        host::listen(QUEUE_STATS);
        Ok(())
    }

    fn connect(req: ConnectRequest) -> Result<(), Rejection> {
        let open = Self::open(&req)?;
        if !matches!(open, Open::Other) {
            let text = serde_json::to_string(&open).unwrap_or_default();
            host::kv_set(&open_key(&req.target), &text);
        }
        Ok(())
    }

    fn message(target: Instance, event: String, data: Payload, _ack: Option<u64>) {
        let Some(open) =
            host::kv_get(&open_key(&target)).and_then(|t| serde_json::from_str::<Open>(&t).ok())
        else {
            return;
        };
        let body: Value = serde_json::from_str(&data.json).unwrap_or(Value::Null);
        match (open, event.as_str()) {
            (Open::ServerStats, "requestLog") if body.is_object() => {
                let length = body.get("length").and_then(Value::as_f64);
                let log = with(|s| log_reply(&s.server_log, length));
                host::send(&target, "statsLog", &json(log));
            }
            (Open::QueueStats, "requestLog") => {
                let (true, Some(length)) = (
                    body.get("id").is_some_and(Value::is_string),
                    body.get("length").and_then(Value::as_f64),
                ) else {
                    return;
                };
                let log = with(|s| log_reply(&s.queue_log, Some(length)));
                host::send(&target, "statsLog", &json(log));
            }
            (Open::ReversiGame { game }, kind) => {
                if host::connection_identity(target.connection).is_none()
                    || !valid_reversi(kind, &body)
                {
                    return;
                }
                let Some(endpoint) = with(|s| s.reversi_endpoint.clone()) else {
                    return;
                };
                Self::forward(
                    &target,
                    &endpoint,
                    json!({ "gameId": game, "type": kind, "body": body }),
                );
            }
            (Open::ChatUser { other }, "read") => {
                Self::forward(
                    &target,
                    "chat/messages/user-timeline",
                    json!({ "userId": other, "limit": 1 }),
                );
            }
            (Open::ChatRoom { room }, "read") => {
                Self::forward(
                    &target,
                    "chat/messages/room-timeline",
                    json!({ "roomId": room, "limit": 1 }),
                );
            }
            _ => {}
        }
    }

    fn disconnect(target: Instance, _reason: DisconnectReason) {
        host::kv_delete(&token_key(&target));
        host::kv_delete(&open_key(&target));
    }

    fn event(room: String, event: String, data: Payload) {
        if event != "stats"
            || serde_json::from_str::<Value>(&data.json).map_or(true, |v| !v.is_object())
        {
            return;
        }
        let (target, log) = match room.as_str() {
            HOST_STATS => ("mk:serverStats", true),
            QUEUE_STATS => ("mk:queueStats", false),
            _ => return,
        };
        with(|s| {
            push_log(
                if log {
                    &mut s.server_log
                } else {
                    &mut s.queue_log
                },
                data.json.clone(),
            )
        });
        if host::room_size(target) > 0 {
            host::broadcast(target, "stats", &data, None);
        }
    }

    fn frame(_connection: u64, _kind: String, _body: String) {}
}

export!(Streams);
