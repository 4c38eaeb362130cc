//! Socket.IO v5 (socketio/socket.io-protocol) on `/socket.io/`, above
//! [`crate::server::engineio`]: namespaces are channel instances served by
//! plugins; this layer gates them, reassembles binary packets, holds the
//! events of a namespace whose CONNECT its plugin is still deciding, and
//! frames the hub's items as Socket.IO packets.
//!
//! Held events are released right after the CONNECT reply (or dropped with
//! a CONNECT_ERROR), so a client never sees events before the socket they
//! belong to. On WebSocket the reply and the events held behind it are
//! written one per turn ([`WsOut::write_paced`]), so a client that takes
//! one message per read finds the reply alone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::routing::any;
use axum::Router;
use parking_lot::Mutex;
use serde_json::Value;

use super::engineio::{
    self, random_id, EioOut, EngineOptions, EngineServer, Handler, Opening, Session, WsOut,
};
use super::ws::OP_TEXT;
use crate::hub::{
    ConnId, Gate, Handshake, Holds, KeptRequest, Outbound, Protocol, QueueFull, QueueLimits,
    SharedEvent, Slot, SocketInfo,
};
use crate::node::{Node, OpenInstance, Opened, RecoverInstance, Recovered};
use crate::plugin::{DisconnectReason, InstanceRef, Payload};
use crate::protocol::socketio::{self as sio, PacketType};

#[cfg(test)]
mod tests;

/// Routes of the endpoint (`/socket.io/`, with and without the slash).
pub fn router(node: Arc<Node>) -> Router {
    let c = &node.config().socketio;
    let options = EngineOptions {
        ping_interval: c.ping_interval,
        ping_timeout: c.ping_timeout,
        upgrade_timeout: c.upgrade_timeout,
        packet_gap: c.packet_gap,
        max_payload: c.max_payload,
        cors_origins: c.cors_origins.clone(),
        queue: QueueLimits::of(&node.config().limits),
        body: super::BodyReader::of(&node),
        admission: node.admission().clone(),
        metrics: node.metrics().clone(),
        shutdown: node.shutdown().clone(),
    };
    let server = EngineServer::new(SioHandler { node }, options);
    let serve = move |req: Request| engineio::handle(server.clone(), req);
    Router::new()
        .route("/socket.io/", any(serve.clone()))
        .route("/socket.io", any(serve))
}

/// An event's Socket.IO argument array, framed once for every recipient.
fn args_of(event: &SharedEvent) -> &str {
    event.framed(Protocol::SocketIo, |e| match &e.args {
        Some(args) => sio::spread_args(&e.event, args),
        None => sio::event_args(&e.event, &e.data),
    })
}

/// The argument array a slot gets: with the event's offset last for a
/// recovered socket (connection state recovery), framed once too.
fn args_for<'a>(slot: &Slot, event: &'a SharedEvent) -> &'a str {
    match event.offset {
        Some(offset) if slot.is_recorded() => event.framed_with_offset(|e| {
            sio::args_with_offset(args_of(e), &crate::recovery::offset_text(offset))
        }),
        _ => args_of(event),
    }
}

/// The Socket.IO layer of the node's Engine.IO endpoint.
pub struct SioHandler {
    node: Arc<Node>,
}

/// A binary packet waiting for its attachments.
struct PendingBinary {
    packet: sio::Packet,
    attachments: Vec<Vec<u8>>,
    /// Bytes of the attachments so far: at most `max_payload` in all, as
    /// one message may not be larger.
    bytes: usize,
}

/// The Socket.IO state of one Engine.IO session.
pub struct SioSocket {
    /// What the opening request kept: handed to plugins at each CONNECT,
    /// shared by the handshakes of its sockets.
    request: Arc<KeptRequest>,
    /// Namespaces whose CONNECT is being decided: their events are held.
    holds: Holds,
    connected_once: AtomicBool,
    /// The binary packet being reassembled (messages come one at a time).
    pending: Mutex<Option<PendingBinary>>,
}

/// Why a session ends because of a Socket.IO packet.
#[derive(Debug, thiserror::Error)]
pub enum SioError {
    #[error("invalid Socket.IO packet: {0}")]
    Decode(#[from] sio::DecodeError),
    #[error("unexpected binary message")]
    UnexpectedBinary,
    #[error("attachments of one packet larger than maxPayload")]
    AttachmentsTooLarge,
    #[error("text packet while attachments were expected")]
    ExpectedBinary,
    #[error("packet for namespace {0} which is not connected")]
    NotConnected(String),
    #[error("client sent a CONNECT_ERROR")]
    ClientConnectError,
}

impl SioSocket {
    fn new(request: KeptRequest) -> Self {
        Self {
            request: Arc::new(request),
            holds: Holds::default(),
            connected_once: AtomicBool::new(false),
            pending: Mutex::new(None),
        }
    }

    /// The handshake of a socket of this session, with its CONNECT's
    /// auth (JSON text).
    fn handshake(&self, auth: &str) -> Handshake {
        Handshake {
            request: self.request.clone(),
            auth: auth.into(),
        }
    }

    /// Starts holding a namespace's events; the generation of this CONNECT.
    fn hold(&self, nsp: &Arc<str>) -> u64 {
        self.holds.hold(nsp)
    }

    /// Whether events of some namespace are held (its CONNECT is being
    /// decided): events then go through [`SioSocket::render`].
    fn holds_events(&self) -> bool {
        self.holds.any()
    }

    /// Renders a queued item into Engine.IO packets, holding back events of
    /// namespaces still connecting. Nothing for an item held or addressed
    /// to a socket that is gone.
    fn render(&self, out: Outbound, into: &mut Vec<EioOut>) {
        if let Some(out) = self.holds.keep(out) {
            self.render_unheld(out, into);
        }
    }

    /// Renders an item that is not held.
    fn render_unheld(&self, out: Outbound, into: &mut Vec<EioOut>) {
        match out {
            Outbound::Text(t) => into.push(EioOut::Text(t)),
            Outbound::Binary(b) => into.push(EioOut::Binary(b)),
            Outbound::Event { slot, event } => {
                let nsp = slot.id();
                if !slot.is_open() {
                    return;
                }
                into.push(EioOut::Text(format!(
                    "4{}",
                    sio::encode_event(nsp, args_for(&slot, &event), event.attachments.len())
                )));
                for a in event.attachments.iter() {
                    into.push(EioOut::Binary(a.clone()));
                }
            }
            Outbound::Ack(ack) => {
                let n = ack.attachments.len();
                let encode = if ack.asks {
                    sio::encode_event_with_id
                } else {
                    sio::encode_ack
                };
                into.push(EioOut::Text(format!(
                    "4{}",
                    encode(&ack.instance, ack.id, &ack.args, n)
                )));
                into.extend(ack.attachments.into_iter().map(EioOut::Binary));
            }
            Outbound::Ended(nsp) => {
                into.push(EioOut::Text(format!("4{}", sio::encode_disconnect(&nsp))));
            }
            Outbound::Gate(gate) => self.gate(*gate, |packets| into.extend(packets)),
        }
    }

    /// A CONNECT's reply and, accepted, a recovered socket's missed events
    /// and what was held, handed to `write` in one step with the end of
    /// this CONNECT's hold (a later CONNECT to the same namespace keeps its
    /// own): an event another thread writes meanwhile waits, so it follows
    /// them (see [`Holds::release_with`]).
    fn gate<R>(&self, gate: Gate, write: impl FnOnce(Vec<EioOut>) -> R) -> R {
        let Gate {
            slot,
            generation,
            text,
            release,
            replay,
            replayed_upto,
        } = gate;
        self.holds.release_with(&slot, generation, |held| {
            let mut packets = vec![EioOut::Text(text)];
            if release {
                // A recovered socket's missed events, then what came after
                // them (what the history already held is not written
                // twice).
                for r in replay {
                    self.render_unheld(r, &mut packets);
                }
                for h in held {
                    let replayed = matches!(&h, Outbound::Event { event, .. }
                        if event.offset.is_some_and(|o| o <= replayed_upto));
                    if !replayed {
                        self.render_unheld(h, &mut packets);
                    }
                }
            }
            write(packets)
        })
    }
}

impl SioHandler {
    async fn on_packet(
        &self,
        session: &Session<Self>,
        p: sio::Packet,
        attachments: Vec<Vec<u8>>,
    ) -> Result<(), SioError> {
        let conn = &session.conn;
        match p.kind {
            PacketType::Connect => {
                // Boxed: a CONNECT is rare, and its future (the plugin's
                // decision) would otherwise enlarge every session's task.
                Box::pin(self.connect(session, p.nsp, p.data)).await;
                Ok(())
            }
            PacketType::Disconnect => {
                self.node
                    .close_instance(conn, &p.nsp, DisconnectReason::Client, true);
                Ok(())
            }
            PacketType::Event | PacketType::BinaryEvent => {
                let inst = conn
                    .instance(&p.nsp)
                    .ok_or_else(|| SioError::NotConnected(p.nsp.clone()))?;
                let Some(event) = p.event else {
                    return Ok(()); // the decoder fills it for events
                };
                if let Some(plugin) = self.node.plugins().plugin(&inst.plugin) {
                    let payload = Payload {
                        json: event.args,
                        attachments,
                    };
                    let target = InstanceRef {
                        connection: conn.id,
                        id: p.nsp,
                    };
                    plugin.message(target, event.name, payload, p.id);
                }
                Ok(())
            }
            // Acks the host asked for on another socket.io server's
            // behalf (a broadcast with acks through the adapter); a stray
            // ack for a connected namespace is ignored.
            PacketType::Ack | PacketType::BinaryAck => {
                if conn.instance(&p.nsp).is_none() {
                    return Err(SioError::NotConnected(p.nsp));
                }
                if let (Some(a), Some(id)) = (self.node.adapter(), p.id) {
                    a.client_ack(crate::adapter::ClientAck {
                        conn: conn.id,
                        nsp: &p.nsp,
                        id,
                        args: p.data.as_ref(),
                        attachments: &attachments,
                    });
                }
                Ok(())
            }
            PacketType::ConnectError => Err(SioError::ClientConnectError),
        }
    }

    async fn connect(&self, session: &Session<Self>, nsp: String, auth: Option<Value>) {
        let (node, socket, conn) = (&self.node, &session.socket, &session.conn);
        let Some(plugin) = node.plugins().namespace(&nsp) else {
            conn.push(Outbound::Text(format!(
                "4{}",
                sio::encode_connect_error(&nsp, "Invalid namespace", None)
            )));
            return;
        };
        // Events for the namespace are held until the reply is written.
        let key: Arc<str> = nsp.as_str().into();
        let generation = socket.hold(&key);
        let recovers = node.recovers(&plugin);
        let params = auth
            .as_ref()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "{}".into());
        let handshake = socket.handshake(&params);
        if let Some(pid) = recovers.then(|| pid_of(auth.as_ref())).flatten() {
            let offset = auth.as_ref().and_then(|a| a.get("offset"));
            let offset = match offset {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(o)) => crate::recovery::parse_offset(o)
                    .map(Some)
                    .ok_or(crate::recovery::Refusal::Offset),
                Some(_) => Err(crate::recovery::Refusal::Offset),
            };
            let outcome = match offset {
                Ok(offset) => {
                    let Some(conn) = node.hub().conn(conn.id) else {
                        return;
                    };
                    node.recover_instance(RecoverInstance {
                        conn: &conn,
                        nsp: &nsp,
                        plugin: plugin.clone(),
                        pid,
                        offset,
                        params: params.clone(),
                        handshake: handshake.clone(),
                    })
                    .await
                }
                Err(e) => Recovered::No(e),
            };
            let (text, info, replay, replayed_upto) = match outcome {
                Recovered::Yes {
                    info,
                    replay,
                    replayed_upto,
                } => {
                    node.settled().await;
                    let text = sio::encode_connect_with(&nsp, &info.sid, info.pid.as_deref());
                    (text, Some(info), replay, replayed_upto)
                }
                Recovered::No(refusal) => {
                    tracing::debug!(nsp, "connection state not recovered: {refusal}");
                    node.metrics().recovery_refused(refusal);
                    return self
                        .connect_new(session, nsp, key, generation, params, handshake)
                        .await;
                }
                Recovered::Refused(refused) => {
                    let text = match &refused.why {
                        Ok(rej) => refusal_text(&nsp, rej),
                        Err(e) => {
                            tracing::warn!(nsp, "namespace recovery failed: {e}");
                            sio::encode_connect_error(&nsp, "Internal server error", None)
                        }
                    };
                    self.reply(session, key, generation, text, None, Vec::new(), 0);
                    if refused.end_transport {
                        // After the refusal, which is queued before it.
                        session
                            .conn
                            .request_close(1000, "connection state recovery refused");
                    }
                    return;
                }
            };
            self.reply(session, key, generation, text, info, replay, replayed_upto);
            return;
        }
        self.connect_new(session, nsp, key, generation, params, handshake)
            .await
    }

    /// A CONNECT that opens a new socket (a new id; a new pid when its
    /// state may be recovered later).
    async fn connect_new(
        &self,
        session: &Session<Self>,
        nsp: String,
        key: Arc<str>,
        generation: u64,
        params: String,
        handshake: Handshake,
    ) {
        let (node, socket, conn) = (&self.node, &session.socket, &session.conn);
        let Some(plugin) = node.plugins().namespace(&nsp) else {
            self.reply(
                session,
                key,
                generation,
                sio::encode_connect_error(&nsp, "Invalid namespace", None),
                None,
                Vec::new(),
                0,
            );
            return;
        };
        let mut info = SocketInfo::new(random_id().into(), handshake);
        if node.recovers(&plugin) {
            // Without the newest offset (Redis down) the socket is not
            // offered recovery.
            if let Some(since) = node.recovery().map(|r| r.head()) {
                if let Some(since) = since.await {
                    info.pid = Some(random_id().into());
                    info.since = since;
                }
            }
        }
        let info = Arc::new(info);
        // A second CONNECT to the same namespace replaces the socket.
        let open = OpenInstance {
            conn,
            id: &nsp,
            plugin,
            channel: &nsp,
            params,
            headers: socket.request.headers.clone(),
            query: socket.request.query.clone(),
            credential: None,
            socket: Some(info.clone()),
        };
        let (text, accepted) = match node.connect_instance(open).await {
            Opened::Accepted => {
                if info.pid.is_some() {
                    node.settled().await;
                }
                (
                    sio::encode_connect_with(&nsp, &info.sid, info.pid.as_deref()),
                    true,
                )
            }
            Opened::Refused(rej) => (refusal_text(&nsp, &rej), false),
            Opened::Failed(e) => {
                tracing::warn!(nsp, "namespace connect failed: {e}");
                (
                    sio::encode_connect_error(&nsp, "Internal server error", None),
                    false,
                )
            }
        };
        let info = accepted.then_some(info);
        self.reply(session, key, generation, text, info, Vec::new(), 0);
    }

    /// Writes a CONNECT's reply (and, accepted, what follows it); the
    /// socket then counts as connected.
    #[allow(clippy::too_many_arguments)]
    fn reply(
        &self,
        session: &Session<Self>,
        key: Arc<str>,
        generation: u64,
        text: String,
        accepted: Option<Arc<SocketInfo>>,
        replay: Vec<Outbound>,
        replayed_upto: u64,
    ) {
        let conn = &session.conn;
        let nsp = key.clone();
        conn.push(Outbound::Gate(Box::new(Gate {
            replay,
            replayed_upto,
            ..Gate::reply(key, generation, format!("4{text}"), accepted.is_some())
        })));
        let Some(info) = accepted else {
            return;
        };
        session.socket.connected_once.store(true, Ordering::SeqCst);
        info.connected.store(true, Ordering::SeqCst);
        if info.pid.is_some() {
            self.node.session_changed(conn.id, &nsp, true);
        }
        // As in socket.io, a connected socket's id is a room it is in (the
        // adapter's `io.to(socketId)`), joined once its CONNECT reply is
        // on its way (a recovered socket is in it already).
        if self.node.adapter().is_some() {
            if let (Some(inst), Some(conn)) = (conn.instance(&nsp), self.node.hub().conn(conn.id)) {
                self.node.hub().join(&conn, inst.slot, &info.sid);
            }
        }
    }
}

/// The pid of a CONNECT's auth (socket.io-client adds it by itself once
/// it was given one).
fn pid_of(auth: Option<&Value>) -> Option<&str> {
    auth?
        .get("pid")?
        .as_str()
        .filter(|p| !p.is_empty() && p.len() <= 64)
}

/// A plugin's refusal as a CONNECT_ERROR.
fn refusal_text(nsp: &str, rej: &crate::plugin::Rejection) -> String {
    let data = rej
        .data
        .as_deref()
        .and_then(|d| serde_json::from_str::<Value>(d).ok());
    sio::encode_connect_error(nsp, &rej.message, data.as_ref())
}

impl Handler for SioHandler {
    type Socket = SioSocket;
    type Error = SioError;
    const PROTOCOL: Protocol = Protocol::SocketIo;

    fn connection_id(&self) -> ConnId {
        self.node.next_conn_id()
    }

    fn socket(&self, opening: &Opening) -> SioSocket {
        SioSocket::new(KeptRequest {
            headers: opening.headers.clone(),
            query: opening.query.clone(),
            address: opening.address(),
            issued: crate::adapter::now_ms(),
        })
    }

    fn opened(&self, session: &Arc<Session<Self>>) {
        self.node.open_conn(session.conn.clone());
    }

    async fn on_message(&self, session: &Arc<Session<Self>>, text: String) -> Result<(), SioError> {
        self.node.metrics().messages_received.inc();
        if session.socket.pending.lock().is_some() {
            return Err(SioError::ExpectedBinary);
        }
        let p = sio::decode(&text)?;
        if p.kind.is_binary() && p.attachments > 0 {
            *session.socket.pending.lock() = Some(PendingBinary {
                packet: p,
                attachments: Vec::new(),
                bytes: 0,
            });
            return Ok(());
        }
        self.on_packet(session, p, Vec::new()).await
    }

    async fn on_binary(&self, session: &Arc<Session<Self>>, data: Vec<u8>) -> Result<(), SioError> {
        let complete = {
            let mut pending = session.socket.pending.lock();
            let Some(p) = pending.as_mut() else {
                return Err(SioError::UnexpectedBinary);
            };
            p.bytes += data.len();
            if p.bytes > self.node.config().socketio.max_payload {
                return Err(SioError::AttachmentsTooLarge);
            }
            p.attachments.push(data);
            if p.attachments.len() == p.packet.attachments {
                pending.take()
            } else {
                None
            }
        };
        match complete {
            Some(p) => self.on_packet(session, p.packet, p.attachments).await,
            None => Ok(()),
        }
    }

    fn render(&self, session: &Session<Self>, item: Outbound, into: &mut Vec<EioOut>) {
        session.socket.render(item, into);
    }

    fn write_direct(
        &self,
        session: &Session<Self>,
        item: Outbound,
        ws: &WsOut<Self>,
    ) -> Result<(), QueueFull> {
        match item {
            // The fan-out path: framed from its shared parts, no copy.
            Outbound::Event { slot, event }
                if event.attachments.is_empty()
                    && !session.socket.holds_events()
                    && !ws.deferring() =>
            {
                if !slot.is_open() {
                    return Ok(());
                }
                let nsp = slot.id();
                let args = args_for(&slot, &event).as_bytes();
                match nsp {
                    "/" => ws.wire().send(OP_TEXT, &[b"42", args]),
                    _ => ws
                        .wire()
                        .send(OP_TEXT, &[b"42", nsp.as_bytes(), b",", args]),
                }?;
                ws.count_frames(1);
                Ok(())
            }
            // A CONNECT reply, then what was held behind it, a turn later.
            Outbound::Gate(gate) => {
                let recovered = !gate.replay.is_empty();
                // Written before the hold ends, so that events other
                // threads write now join what waits behind the reply.
                session.socket.gate(*gate, |rendered| match recovered {
                    true => ws.write_after_reply(rendered),
                    false => ws.write_paced(rendered),
                })
            }
            other => {
                let mut rendered = Vec::new();
                session.socket.render(other, &mut rendered);
                ws.write_all(rendered)
            }
        }
    }

    /// Each socket gets a DISCONNECT before the session's close packet.
    fn closing(&self, session: &Session<Self>) {
        for inst in session.conn.instances_where(|_| true) {
            session.conn.push(Outbound::Text(format!(
                "4{}",
                sio::encode_disconnect(inst.slot.id())
            )));
        }
    }

    fn deadline(&self) -> Option<Duration> {
        Some(self.node.config().socketio.connect_timeout)
    }

    fn deadline_passed(&self, session: &Session<Self>) -> Option<&'static str> {
        (!session.socket.connected_once.load(Ordering::SeqCst))
            .then_some("no namespace connected in time")
    }

    fn closed(&self, session: &Session<Self>, why: &str) {
        self.node.close_conn(session.conn.id, Some(why));
    }
}
