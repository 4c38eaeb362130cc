//! Misskey streaming sessions on `GET /streaming`: authentication before
//! the upgrade, then one task per connection that reads client frames,
//! flushes what the socket did not take at once, pings every
//! `ping_interval` and drops peers silent for `idle_timeout`. Frames to the
//! client are written directly on the thread that produces them
//! (`MisskeyOut` over the connection's [`Wire`]).
//!
//! The session owns the socket and its note captures ([`captures`]);
//! instances and rooms live in the hub, so a plugin reload does not touch
//! them. [`note_audience`] turns the visibility of a note update published
//! on the bus into the hub's neutral [`Audience`]; [`redis_bus`] reads
//! Misskey's own event bus from Redis; [`stats`] samples the machine for
//! Misskey's `serverStats`.

pub mod captures;
pub mod redis_bus;
pub mod stats;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;

use self::captures::Captures;
use super::ws::{self, Incoming, Socket, Upgrade, Wire, OP_PING, OP_TEXT};
use crate::conventions::{follows_key, RELATIONS_SET};
use crate::hub::{
    Audience, ConnHandle, DirectOut, Gate, Holds, Outbound, Protocol, QueueFull, QueueLimits, Slot,
};
use crate::metrics::Metrics;
use crate::node::{Node, OpenInstance, Opened};
use crate::plugin::{DisconnectReason, InstanceRef, Payload};
use crate::protocol::misskey::bus::BROADCAST;
use crate::protocol::misskey::{self, Addressing, ClientFrame, NoteVisibility};

/// Who may see an update of a non-public note, as Misskey's connection
/// checks it: the author; for a `specified` note, the users it names; for
/// a `followers` note, the author's followers (see [`crate::conventions`]).
pub fn note_audience(v: &NoteVisibility) -> Audience {
    match &v.visible_users {
        Some(users) => Audience {
            users: std::iter::once(v.author.clone())
                .chain(users.iter().cloned())
                .collect(),
            holding: None,
        },
        None => Audience {
            users: vec![v.author.clone()],
            holding: Some((RELATIONS_SET.to_owned(), follows_key(&v.author))),
        },
    }
}

/// The stream's token, as Misskey reads it: `Authorization: Bearer <t>`
/// first, else `?i=<t>`. A token given empty (`?i=`) is a token, refused
/// as unknown (401), not an anonymous stream.
fn token_of(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    bearer.or_else(|| {
        let q = uri.query()?;
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "i")
            .map(|(_, v)| v.into_owned())
    })
}

/// `GET /streaming`.
pub async fn handler(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: Upgrade,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let address = node.admission().client_address(peer, &headers);
    let ticket = match node.admission().admit(address) {
        Ok(t) => t,
        Err(refused) => return refused.into_response(),
    };
    let token = token_of(&uri, &headers);
    let identity = match &token {
        None => None,
        Some(token) => match node.auth().authenticate(token).await {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::debug!("streaming auth refused: {e}");
                return refusal(&e);
            }
        },
    };
    let (headers, query) = super::kept_request(&headers, &uri, &["i"]);
    let credential: Option<Arc<str>> = token.map(Into::into);
    let max = node.config().misskey.max_frame_bytes;
    ws.limits(max, QueueLimits::of(&node.config().limits))
        .on_upgrade(
            move |socket, wire| async move {
                let _ticket = ticket;
                let id = node.next_conn_id();
                let out = Arc::new(MisskeyOut {
                    wire: wire.clone(),
                    metrics: node.metrics().clone(),
                    holds: Holds::default(),
                });
                let conn = ConnHandle::new_direct(id, Protocol::Misskey, identity, out.clone());
                node.open_conn(conn.clone());
                // Misskey's `broadcast` events reach every stream.
                node.hub().join(&conn, Slot::stream(BROADCAST), BROADCAST);
                let session = Session {
                    out,
                    captures: parking_lot::Mutex::new(Captures::new(
                        node.config().misskey.max_captures,
                    )),
                    node: node.clone(),
                    conn,
                    headers,
                    query,
                    credential,
                };
                session.run(socket, &wire).await;
                session.conn.end_direct();
                node.close_conn(id, None);
                let captured = session.captures.lock().len();
                node.metrics().captures.sub(captured as u64);
            },
            || {},
        )
}

/// The `WWW-Authenticate` of a refused credential, as Misskey's
/// `StreamingApiServerService` writes it.
pub const WWW_AUTHENTICATE: &str =
    r#"Bearer realm="Misskey", error="invalid_token", error_description="Failed to authenticate""#;

/// How a stream's credential is refused, as Misskey refuses it: 401 with
/// its `WWW-Authenticate` and no body; 403 with no body for a suspended
/// user. A backend that cannot be asked is a 503 with the JSON reason
/// (Misskey answers 500 there).
fn refusal(e: &crate::auth::AuthError) -> Response {
    use axum::http::{header, StatusCode};
    match e.status() {
        StatusCode::UNAUTHORIZED => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, WWW_AUTHENTICATE)],
        )
            .into_response(),
        StatusCode::FORBIDDEN => StatusCode::FORBIDDEN.into_response(),
        _ => e.clone().into_response(),
    }
}

/// The reason sent with a close for a read error.
fn close_reason(code: u16) -> &'static str {
    match code {
        1009 => "frame too large",
        1007 => "invalid UTF-8",
        _ => "protocol error",
    }
}

/// Frames items for a Misskey connection and writes them to its wire.
struct MisskeyOut {
    wire: Arc<Wire>,
    metrics: Arc<Metrics>,
    /// Events for instances being opened wait for their `connected`.
    holds: Holds,
}

impl DirectOut for MisskeyOut {
    fn send(&self, out: Outbound) -> Result<(), QueueFull> {
        match self.holds.keep(out) {
            Some(out) => self.write(out),
            None => Ok(()),
        }
    }
}

impl MisskeyOut {
    /// Frames an item that is not held and writes it.
    fn write(&self, out: Outbound) -> Result<(), QueueFull> {
        let r = match &out {
            Outbound::Text(t) => self.wire.send(OP_TEXT, &[t.as_bytes()]),
            // The end of an opening: `connected` (if the client asked for
            // it), then what reached the instance meanwhile, or nothing if
            // the plugin refused.
            Outbound::Gate(g) => {
                return self.holds.release_with(&g.slot, g.generation, |held| {
                    if !g.text.is_empty() {
                        self.wire.send(OP_TEXT, &[g.text.as_bytes()])?;
                        self.metrics.frames_sent.inc();
                    }
                    match g.release {
                        true => held.into_iter().try_for_each(|h| self.write(h)),
                        false => Ok(()),
                    }
                });
            }
            // Misskey streams have no binary frames, acks, or frame for an
            // instance the server ended.
            Outbound::Binary(_) | Outbound::Ended(_) => return Ok(()),
            Outbound::Ack(_) => {
                tracing::debug!("ack on a Misskey stream (no acks there); dropped");
                return Ok(());
            }
            Outbound::Event { slot, event } if slot.is_stream() => {
                // `{"type":<event>,"body":<data>}`: the channel tail
                // `,"type":..,"body":..}}` without its first and last byte.
                let tail = event.framed(Protocol::Misskey, |e| {
                    misskey::encode_event_tail(&e.event, &e.data)
                });
                self.wire
                    .send(OP_TEXT, &[b"{", &tail.as_bytes()[1..tail.len() - 1]])
            }
            Outbound::Event { slot, event } => {
                let addressing = if slot.is_capture() {
                    Addressing::NoteUpdated
                } else {
                    // Its instance ended while the event was on its way.
                    if !slot.is_open() {
                        return Ok(());
                    }
                    Addressing::Channel
                };
                self.wire.send(
                    OP_TEXT,
                    &[
                        addressing.head().as_bytes(),
                        slot.quoted().as_bytes(),
                        event
                            .framed(Protocol::Misskey, |e| {
                                misskey::encode_event_tail(&e.event, &e.data)
                            })
                            .as_bytes(),
                    ],
                )
            }
        };
        r?;
        self.metrics.frames_sent.inc();
        Ok(())
    }
}

struct Session {
    node: Arc<Node>,
    out: Arc<MisskeyOut>,
    conn: Arc<ConnHandle>,
    headers: Arc<[(String, String)]>,
    query: Arc<[(String, String)]>,
    /// The token the stream authenticated with, for plugins.
    credential: Option<Arc<str>>,
    captures: parking_lot::Mutex<Captures>,
}

enum End {
    /// The peer is gone or the socket failed: nothing more to send.
    Gone,
    /// Close with a code and reason.
    Close(u16, String),
}

impl Session {
    async fn run(&self, mut socket: Socket, wire: &Arc<Wire>) {
        let cfg = &self.node.config().misskey;
        let mut ping =
            tokio::time::interval_at(Instant::now() + cfg.ping_interval, cfg.ping_interval);
        let mut last_seen = Instant::now();
        // Created once: re-creating these per wake-up costs more than the
        // frame it wakes for.
        let shutdown = self.node.shutdown().cancelled();
        let closed = self.conn.closed();
        tokio::pin!(shutdown, closed);
        let end = loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break End::Close(1001, "server shutting down".into()),
                (code, reason) = &mut closed => {
                    self.count_close(code);
                    break End::Close(code, reason);
                }
                incoming = ws::read(&mut socket) => {
                    last_seen = Instant::now();
                    match incoming {
                        Incoming::Text(t) => self.on_text(&t).await,
                        Incoming::Binary(_) | Incoming::Control => {}
                        Incoming::Gone => break End::Gone,
                        Incoming::Invalid(code) => break End::Close(code, close_reason(code).into()),
                    }
                }
                _ = wire.wants_flush() => {
                    // The socket did not take everything at once. A peer that
                    // takes nothing for the idle timeout is gone; a close
                    // request (its buffer overflowed) or shutdown cuts it short.
                    tokio::select! {
                        r = tokio::time::timeout(cfg.idle_timeout, wire.flush()) => {
                            if !matches!(r, Ok(Ok(()))) { break End::Gone }
                        }
                        (code, _) = &mut closed => {
                            self.count_close(code);
                            break End::Gone;
                        }
                        _ = &mut shutdown => break End::Gone,
                    }
                }
                _ = ping.tick() => {
                    if last_seen.elapsed() >= cfg.idle_timeout {
                        tracing::debug!(conn = self.conn.id, "peer silent too long; dropping");
                        break End::Close(1001, "idle timeout".into());
                    }
                    if wire.send(OP_PING, &[]).is_err() || wire.is_closed() {
                        break End::Gone;
                    }
                }
            }
        };
        if let End::Close(code, reason) = end {
            wire.send_close(Some(code), &reason).await;
        }
    }

    fn count_close(&self, code: u16) {
        if code == crate::hub::SLOW_CONSUMER_CLOSE {
            self.node.metrics().slow_consumer_closes.inc();
        }
    }

    async fn on_text(&self, text: &str) {
        self.node.metrics().messages_received.inc();
        let frame = match misskey::parse(text) {
            Ok(f) => f,
            Err(e) => {
                tracing::trace!(conn = self.conn.id, "ignored client frame: {e}");
                return;
            }
        };
        let node = &self.node;
        match frame {
            ClientFrame::Connect {
                channel,
                id,
                params,
                pong,
            } => self.connect(channel, id, params, pong).await,
            ClientFrame::Disconnect { id } => {
                node.close_instance(&self.conn, &id, DisconnectReason::Client, true);
            }
            ClientFrame::Channel { id, kind, body } => {
                let Some(inst) = self.conn.instance(&id) else {
                    return;
                };
                if let Some(p) = node.plugins().plugin(&inst.plugin) {
                    let target = InstanceRef {
                        connection: self.conn.id,
                        id,
                    };
                    p.message(target, kind, Payload::json(body), None);
                }
            }
            ClientFrame::SubNote { id } => {
                self.captures
                    .lock()
                    .capture(node.hub(), node.metrics(), &self.conn, &id);
            }
            ClientFrame::UnsubNote { id } => {
                self.captures
                    .lock()
                    .release(node.hub(), node.metrics(), &self.conn, &id);
            }
            ClientFrame::Other { kind, body } => {
                for p in node.plugins().frame_handlers(kind) {
                    p.frame(self.conn.id, kind.to_owned(), body.clone());
                }
            }
        }
    }

    async fn connect(&self, channel: String, id: String, params: String, pong: bool) {
        let node = &self.node;
        let conn = &self.conn;
        let Some((plugin, spec)) = node.plugins().channel(&channel) else {
            tracing::debug!(
                conn = conn.id,
                channel,
                "connect to unknown channel ignored"
            );
            return;
        };
        if spec.requires_user && conn.identity().is_none() {
            tracing::debug!(
                conn = conn.id,
                channel,
                "anonymous connect to a channel needing a user ignored"
            );
            return;
        }
        if spec.shared && conn.any_instance(|i| *i.channel == *channel) {
            return;
        }
        let reused = conn.instance(&id).is_some();
        if !reused && conn.instance_count() >= node.config().misskey.max_channels {
            tracing::debug!(
                conn = conn.id,
                channel,
                "channel limit reached; connect ignored"
            );
            return;
        }
        // What reaches the instance waits for its `connected` (Misskey
        // subscribes and answers in one step: no event comes first).
        let slot: Arc<str> = id.as_str().into();
        let generation = self.out.holds.hold(&slot);
        let open = OpenInstance {
            conn,
            id: &id,
            plugin,
            channel: &channel,
            params,
            headers: self.headers.clone(),
            query: self.query.clone(),
            credential: self.credential.clone(),
            socket: None,
        };
        let outcome = node.connect_instance(open).await;
        let accepted = matches!(outcome, Opened::Accepted);
        match outcome {
            Opened::Accepted => {}
            Opened::Refused(rej) => tracing::debug!(
                conn = conn.id,
                channel,
                "connect refused by plugin: {}",
                rej.message
            ),
            Opened::Failed(e) => tracing::debug!(conn = conn.id, channel, "connect failed: {e}"),
        }
        let text = if accepted && pong {
            misskey::encode_connected(&id)
        } else {
            String::new()
        };
        conn.push(Outbound::Gate(Box::new(Gate::reply(
            slot, generation, text, accepted,
        ))));
    }
}
