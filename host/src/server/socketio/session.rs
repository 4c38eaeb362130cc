//! One Engine.IO session and the Socket.IO sockets multiplexed on it.
//!
//! The session owns the connection's outbound queue. Whichever transport is
//! current drains it: a pending long-polling GET, or the WebSocket task
//! after an upgrade (or from the start). Inbound packets from either
//! transport go through [`Session::on_packet`], one at a time. A heartbeat
//! task pings every `ping_interval` and closes the session when a pong does
//! not come within `ping_timeout`; a session that connects no namespace
//! within `connect_timeout` is closed too.
//!
//! Events for a namespace whose CONNECT is still being decided by its
//! plugin are held back by the writer and released right after the CONNECT
//! reply (or dropped with a CONNECT_ERROR), so a client never sees events
//! before the socket it belongs to.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::SioServer;
use crate::hub::{ConnHandle, Gate, Outbound, OutboundRx};
use crate::node::{Node, OpenInstance, Opened};
use crate::plugin::{DisconnectReason, InstanceRef, Payload};
use crate::protocol::engineio::{self, Packet};
use crate::protocol::socketio::{self as sio, PacketType};

/// Which transport carries the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Transport {
    Polling = 0,
    /// A WebSocket is probing; polling still works.
    Upgrading = 1,
    WebSocket = 2,
}

/// One outbound Engine.IO packet, ready for a transport.
#[derive(Debug)]
pub enum EioOut {
    Text(String),
    Binary(Vec<u8>),
}

impl EioOut {
    /// As a polling record (`b<base64>` for binary).
    pub fn into_polling(self) -> String {
        match self {
            EioOut::Text(t) => t,
            EioOut::Binary(b) => Packet::Binary(b).encode(),
        }
    }
}

/// Events held for a namespace while its CONNECT is decided: the CONNECT's
/// generation and the events.
type Held = (u64, Vec<Outbound>);

/// A binary packet waiting for its attachments.
struct PendingBinary {
    packet: sio::Packet,
    attachments: Vec<Vec<u8>>,
    /// Bytes of the attachments so far: at most `max_payload` in all, as
    /// one message may not be larger.
    bytes: usize,
}

/// What a session keeps of the handshake request that opened it.
pub struct Opening {
    headers: Arc<[(String, String)]>,
    query: Arc<[(String, String)]>,
    ticket: crate::server::admission::Ticket,
}

impl Opening {
    /// Admits the client (or refuses it) and keeps what plugins are handed.
    pub fn of(
        server: &SioServer,
        parts: &axum::http::request::Parts,
    ) -> Result<Self, crate::server::admission::Refused> {
        let admission = &server.node.admission;
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0)
            .unwrap_or_else(|| ([127, 0, 0, 1], 0).into());
        let ticket = admission.admit(admission.client_address(peer, &parts.headers))?;
        let (headers, query) = crate::server::kept_request(&parts.headers, &parts.uri, &[]);
        Ok(Self {
            headers,
            query,
            ticket,
        })
    }
}

/// One Engine.IO session.
pub struct Session {
    pub sid: Arc<str>,
    pub node: Arc<Node>,
    server: Weak<SioServer>,
    pub conn: Arc<ConnHandle>,
    headers: Arc<[(String, String)]>,
    query: Arc<[(String, String)]>,
    /// The outbound queue of a polling session; the current transport holds
    /// the lock while draining. None once the session writes directly.
    pub rx: tokio::sync::Mutex<Option<OutboundRx>>,
    /// The direct writer, once the session is on WebSocket.
    pub ws_out: std::sync::OnceLock<Arc<super::SioOut>>,
    transport: AtomicU8,
    /// Cancelled when the session ends.
    pub closed: CancellationToken,
    /// Serialises inbound packet handling across transports.
    inbound: tokio::sync::Mutex<Option<PendingBinary>>,
    /// Held by a polling POST in progress (a second one is refused).
    pub posting: tokio::sync::Mutex<()>,
    /// Signalled by each PONG; the heartbeat waits on it.
    pong: tokio::sync::Notify,
    /// Namespaces whose CONNECT is being decided: their events are held,
    /// tagged with the generation of that CONNECT.
    held: Mutex<HashMap<Arc<str>, Held>>,
    /// Entries in `held`: the writer skips the lock while it is 0.
    holding: std::sync::atomic::AtomicUsize,
    generation: std::sync::atomic::AtomicU64,
    /// Packets rendered for a poll but kept for the next one.
    carried: Mutex<Vec<EioOut>>,
    connected_once: AtomicBool,
    /// The client ended the session with a close packet (a poll waiting
    /// meanwhile is answered with a noop, as the reference server does).
    client_closed: AtomicBool,
    /// Given back when the session ends.
    ticket: Mutex<Option<crate::server::admission::Ticket>>,
}

/// Why a session ends because of what the client sent.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid Engine.IO packet: {0}")]
    Engine(#[from] engineio::DecodeError),
    #[error("invalid Socket.IO packet: {0}")]
    Socket(#[from] sio::DecodeError),
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
    #[error("client closed the session")]
    ClientClose,
}

fn random_id() -> String {
    use base64::Engine as _;
    let mut b = [0u8; 15];
    if getrandom::fill(&mut b).is_err() {
        // The OS RNG is unavailable: fall back to a time-and-counter mix,
        // still unique per process.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b[..8].copy_from_slice(&(t as u64).to_le_bytes());
        b[8..15].copy_from_slice(&N.fetch_add(1, Ordering::Relaxed).to_le_bytes()[..7]);
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

impl Session {
    /// Creates a session, registers its connection and starts its timers.
    /// A session opened on WebSocket (`wire`) writes directly from the
    /// start and has no queue.
    pub fn start(
        server: &Arc<SioServer>,
        opening: Opening,
        transport: Transport,
        wire: Option<Arc<super::Wire>>,
    ) -> Arc<Session> {
        let node = server.node.clone();
        let id = node.next_conn_id();
        let session = Arc::new_cyclic(|me| {
            let (conn, rx, ws_out) = match wire {
                Some(wire) => {
                    let out = Arc::new(super::SioOut::new(me.clone(), wire, &node));
                    let conn = ConnHandle::new_direct(
                        id,
                        crate::hub::Protocol::SocketIo,
                        None,
                        out.clone(),
                    );
                    (conn, None, std::sync::OnceLock::from(out))
                }
                None => {
                    let (conn, rx) = ConnHandle::new(
                        id,
                        crate::hub::Protocol::SocketIo,
                        None,
                        crate::hub::QueueLimits::of(&node.config.limits),
                    );
                    (conn, Some(rx), std::sync::OnceLock::new())
                }
            };
            Self::new(server, node.clone(), conn, opening, rx, ws_out, transport)
        });
        node.open_conn(session.conn.clone());
        server
            .sessions
            .lock()
            .insert(session.sid.clone(), session.clone());
        tokio::spawn(heartbeat(session.clone()));
        session
    }

    fn new(
        server: &Arc<SioServer>,
        node: Arc<Node>,
        conn: Arc<ConnHandle>,
        opening: Opening,
        rx: Option<OutboundRx>,
        ws_out: std::sync::OnceLock<Arc<super::SioOut>>,
        transport: Transport,
    ) -> Session {
        Session {
            sid: random_id().into(),
            node,
            server: Arc::downgrade(server),
            conn,
            headers: opening.headers,
            query: opening.query,
            ticket: Mutex::new(Some(opening.ticket)),
            rx: tokio::sync::Mutex::new(rx),
            ws_out,
            transport: AtomicU8::new(transport as u8),
            closed: CancellationToken::new(),
            inbound: tokio::sync::Mutex::new(None),
            posting: tokio::sync::Mutex::new(()),
            pong: tokio::sync::Notify::new(),
            held: Mutex::new(HashMap::new()),
            holding: std::sync::atomic::AtomicUsize::new(0),
            generation: std::sync::atomic::AtomicU64::new(0),
            carried: Mutex::new(Vec::new()),
            connected_once: AtomicBool::new(false),
            client_closed: AtomicBool::new(false),
        }
    }

    /// The open packet's text.
    pub fn open_packet(&self, upgrades: &[&str]) -> String {
        let c = &self.node.config.socketio;
        Packet::Open(engineio::handshake_json(
            &self.sid,
            upgrades,
            c.ping_interval.as_millis() as u64,
            c.ping_timeout.as_millis() as u64,
            c.max_payload,
        ))
        .encode()
    }

    /// Keeps rendered packets for the next poll.
    pub fn carry(&self, packets: Vec<EioOut>) {
        self.carried.lock().extend(packets);
    }

    /// The packets kept for this poll.
    pub fn take_carry(&self) -> Vec<EioOut> {
        std::mem::take(&mut *self.carried.lock())
    }

    pub fn transport(&self) -> Transport {
        match self.transport.load(Ordering::SeqCst) {
            0 => Transport::Polling,
            1 => Transport::Upgrading,
            _ => Transport::WebSocket,
        }
    }

    /// Switches the transport from `from` to `to` if it still is `from`.
    pub fn switch_transport(&self, from: Transport, to: Transport) -> bool {
        self.transport
            .compare_exchange(from as u8, to as u8, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Ends the session because the client sent a close packet.
    pub fn client_close(&self) {
        self.client_closed.store(true, Ordering::SeqCst);
        self.close("client closed the session");
    }

    /// Whether the client ended the session with a close packet.
    pub fn closed_by_client(&self) -> bool {
        self.client_closed.load(Ordering::SeqCst)
    }

    /// Ends the session: forgets it, ends its sockets (plugins hear
    /// `disconnect`), wakes whatever transport is waiting.
    pub fn close(&self, why: &str) {
        if self.closed.is_cancelled() {
            return;
        }
        tracing::debug!(
            sid = &*self.sid,
            conn = self.conn.id,
            "socket.io session closed: {why}"
        );
        self.closed.cancel();
        self.ticket.lock().take();
        if let Some(server) = self.server.upgrade() {
            server.sessions.lock().remove(&self.sid);
        }
        self.node.close_conn(self.conn.id);
    }

    /// A close asked by a plugin or by the hub (slow consumer): sockets get
    /// a DISCONNECT, then the Engine.IO close packet ends the session once
    /// the transport wrote it. A slow consumer is cut off at once.
    fn server_close(&self, code: u16, reason: &str) {
        if code == crate::hub::SLOW_CONSUMER_CLOSE {
            self.node.metrics.slow_consumer_closes.inc();
            self.close(reason);
            return;
        }
        for inst in self.conn.instances_where(|_| true) {
            self.conn.push(Outbound::Text(format!(
                "4{}",
                sio::encode_disconnect(inst.slot.id())
            )));
        }
        if !self.conn.push(Outbound::Text(Packet::Close.encode())) {
            self.close(reason);
        }
    }

    /// Handles one inbound Engine.IO packet. An error closes the session.
    pub async fn on_packet(&self, packet: Packet) -> Result<(), ProtocolError> {
        let mut pending = self.inbound.lock().await;
        if self.closed.is_cancelled() {
            return Ok(());
        }
        match packet {
            Packet::Pong(_) => {
                self.pong.notify_one();
            }
            Packet::Ping(data) => {
                self.conn.push(Outbound::Text(Packet::Pong(data).encode()));
            }
            Packet::Message(text) => {
                if pending.is_some() {
                    return Err(ProtocolError::ExpectedBinary);
                }
                let p = sio::decode(&text)?;
                if p.kind.is_binary() && p.attachments > 0 {
                    *pending = Some(PendingBinary {
                        packet: p,
                        attachments: Vec::new(),
                        bytes: 0,
                    });
                } else {
                    self.on_sio(p, Vec::new()).await?;
                }
            }
            Packet::Binary(bytes) => {
                let Some(mut p) = pending.take() else {
                    return Err(ProtocolError::UnexpectedBinary);
                };
                p.bytes += bytes.len();
                if p.bytes > self.node.config.socketio.max_payload {
                    return Err(ProtocolError::AttachmentsTooLarge);
                }
                p.attachments.push(bytes);
                if p.attachments.len() == p.packet.attachments {
                    self.on_sio(p.packet, p.attachments).await?;
                } else {
                    *pending = Some(p);
                }
            }
            Packet::Close => return Err(ProtocolError::ClientClose),
            Packet::Upgrade | Packet::Noop | Packet::Open(_) => {}
        }
        Ok(())
    }

    async fn on_sio(&self, p: sio::Packet, attachments: Vec<Vec<u8>>) -> Result<(), ProtocolError> {
        match p.kind {
            PacketType::Connect => {
                self.connect(p.nsp, p.data).await;
                Ok(())
            }
            PacketType::Disconnect => {
                self.node
                    .close_instance(&self.conn, &p.nsp, DisconnectReason::Client, true);
                Ok(())
            }
            PacketType::Event | PacketType::BinaryEvent => {
                let inst = self
                    .conn
                    .instance(&p.nsp)
                    .ok_or_else(|| ProtocolError::NotConnected(p.nsp.clone()))?;
                let Some(event) = p.event else {
                    return Ok(()); // the decoder fills it for events
                };
                if let Some(plugin) = self.node.plugins.plugin(&inst.plugin) {
                    let payload = Payload {
                        json: event.args,
                        attachments,
                    };
                    let target = InstanceRef {
                        connection: self.conn.id,
                        id: p.nsp,
                    };
                    plugin.message(target, event.name, payload, p.id);
                }
                Ok(())
            }
            // The host does not ask clients for acknowledgements; a stray
            // ack for a connected namespace is ignored.
            PacketType::Ack | PacketType::BinaryAck => {
                if self.conn.instance(&p.nsp).is_none() {
                    return Err(ProtocolError::NotConnected(p.nsp));
                }
                Ok(())
            }
            PacketType::ConnectError => Err(ProtocolError::ClientConnectError),
        }
    }

    async fn connect(&self, nsp: String, auth: Option<Value>) {
        let node = &self.node;
        let Some(plugin) = node.plugins.namespace(&nsp) else {
            self.conn.push(Outbound::Text(format!(
                "4{}",
                sio::encode_connect_error(&nsp, "Invalid namespace", None)
            )));
            return;
        };
        // Events for the namespace are held until the reply is written.
        let key: Arc<str> = nsp.as_str().into();
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        if self
            .held
            .lock()
            .insert(key.clone(), (generation, Vec::new()))
            .is_none()
        {
            self.holding.fetch_add(1, Ordering::SeqCst);
        }
        // A second CONNECT to the same namespace replaces the socket.
        let open = OpenInstance {
            conn: &self.conn,
            id: &nsp,
            plugin,
            channel: &nsp,
            params: auth.map(|a| a.to_string()).unwrap_or_else(|| "{}".into()),
            headers: self.headers.clone(),
            query: self.query.clone(),
            credential: None,
        };
        let (text, accepted) = match node.connect_instance(open).await {
            Opened::Accepted => {
                self.connected_once.store(true, Ordering::SeqCst);
                (sio::encode_connect(&nsp, &random_id()), true)
            }
            Opened::Refused(rej) => {
                let data = rej
                    .data
                    .as_deref()
                    .and_then(|d| serde_json::from_str::<Value>(d).ok());
                (
                    sio::encode_connect_error(&nsp, &rej.message, data.as_ref()),
                    false,
                )
            }
            Opened::Failed(e) => {
                tracing::warn!(nsp, "namespace connect failed: {e}");
                (
                    sio::encode_connect_error(&nsp, "Internal server error", None),
                    false,
                )
            }
        };
        self.conn.push(Outbound::Gate(Box::new(Gate {
            slot: key,
            generation,
            text: format!("4{text}"),
            release: accepted,
        })));
    }

    /// Whether events of some namespace are held (its CONNECT is being
    /// decided): events then go through [`Session::render`].
    pub fn holds_events(&self) -> bool {
        self.holding.load(Ordering::SeqCst) > 0
    }

    /// Renders a queued item into Engine.IO packets, holding back events of
    /// namespaces still connecting. Returns nothing for an item held or
    /// addressed to a socket that is gone.
    pub fn render(&self, out: Outbound, into: &mut Vec<EioOut>) {
        match out {
            Outbound::Text(t) => into.push(EioOut::Text(t)),
            Outbound::Binary(b) => into.push(EioOut::Binary(b)),
            Outbound::Event { slot, event } => {
                let nsp = slot.id();
                if self.holding.load(Ordering::SeqCst) > 0 {
                    let mut held = self.held.lock();
                    if let Some((_, h)) = held.get_mut(nsp) {
                        h.push(Outbound::Event { slot, event });
                        return;
                    }
                }
                if !slot.is_open() {
                    return;
                }
                into.push(EioOut::Text(format!(
                    "4{}",
                    sio::encode_event(nsp, event.socketio_args(), event.attachments.len())
                )));
                for a in event.attachments.iter() {
                    into.push(EioOut::Binary(a.clone()));
                }
            }
            Outbound::Gate(gate) => {
                let Gate {
                    slot,
                    generation,
                    text,
                    release,
                } = *gate;
                into.push(EioOut::Text(text));
                // Only this CONNECT's hold: a later CONNECT to the same
                // namespace keeps its own until its own reply.
                let held = {
                    let mut map = self.held.lock();
                    match map.get(&slot) {
                        Some((g, _)) if *g == generation => {
                            self.holding.fetch_sub(1, Ordering::SeqCst);
                            map.remove(&slot).map(|(_, h)| h)
                        }
                        _ => None,
                    }
                }
                .unwrap_or_default();
                if release {
                    for h in held {
                        self.render(h, into);
                    }
                }
            }
        }
    }
}

/// When the heartbeat acts next: it pings `interval` after the last pong
/// (or the start), then waits `timeout` for the pong; a session is closed
/// at most `interval + timeout` after it last answered, as the reference
/// server does. Other timers (the connect deadline) never move it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Heartbeat {
    interval: std::time::Duration,
    timeout: std::time::Duration,
    /// When the next ping is due, or, while a pong is awaited, when the
    /// session is closed.
    deadline: tokio::time::Instant,
    waiting_pong: bool,
}

/// What the heartbeat does when its deadline passes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Beat {
    Ping,
    TimedOut,
}

impl Heartbeat {
    pub(super) fn new(
        interval: std::time::Duration,
        timeout: std::time::Duration,
        now: tokio::time::Instant,
    ) -> Self {
        Self {
            interval,
            timeout,
            deadline: now + interval,
            waiting_pong: false,
        }
    }

    pub(super) fn deadline(&self) -> tokio::time::Instant {
        self.deadline
    }

    pub(super) fn waiting_pong(&self) -> bool {
        self.waiting_pong
    }

    /// The deadline passed at `now`.
    pub(super) fn fire(&mut self, now: tokio::time::Instant) -> Beat {
        if self.waiting_pong {
            return Beat::TimedOut;
        }
        self.waiting_pong = true;
        self.deadline = now + self.timeout;
        Beat::Ping
    }

    /// A pong arrived at `now` (ignored unless one was asked for).
    pub(super) fn pong(&mut self, now: tokio::time::Instant) {
        if self.waiting_pong {
            self.waiting_pong = false;
            self.deadline = now + self.interval;
        }
    }
}

/// The session's one timer task: pings, pong deadlines, the connect
/// timeout, close requests and shutdown.
async fn heartbeat(session: Arc<Session>) {
    let node = session.node.clone();
    let cfg = &node.config.socketio;
    let connect_deadline = tokio::time::sleep(cfg.connect_timeout);
    tokio::pin!(connect_deadline);
    let mut connect_pending = true;
    let mut beat = Heartbeat::new(
        cfg.ping_interval,
        cfg.ping_timeout,
        tokio::time::Instant::now(),
    );
    let timer = tokio::time::sleep_until(beat.deadline());
    tokio::pin!(timer);
    loop {
        tokio::select! {
            _ = &mut timer => {
                match beat.fire(tokio::time::Instant::now()) {
                    Beat::TimedOut => {
                        session.close("ping timeout");
                        return;
                    }
                    Beat::Ping => {
                        // A PONG nobody asked for does not answer this ping.
                        let _ = futures_util::FutureExt::now_or_never(session.pong.notified());
                        session.conn.push(Outbound::Text(Packet::Ping(String::new()).encode()));
                    }
                }
                timer.as_mut().reset(beat.deadline());
            }
            _ = session.pong.notified(), if beat.waiting_pong() => {
                beat.pong(tokio::time::Instant::now());
                timer.as_mut().reset(beat.deadline());
            }
            _ = &mut connect_deadline, if connect_pending => {
                connect_pending = false;
                if !session.connected_once.load(Ordering::SeqCst) {
                    session.close("no namespace connected in time");
                    return;
                }
            }
            (code, reason) = session.conn.closed() => {
                session.server_close(code, &reason);
                // The transport ends the session once the close packet is
                // written; a client that never fetches it is cut off.
                tokio::select! {
                    _ = tokio::time::sleep(cfg.ping_interval + cfg.ping_timeout) => {
                        session.close("close packet not fetched");
                    }
                    _ = session.closed.cancelled() => {}
                }
                return;
            }
            _ = node.shutdown.cancelled() => {
                session.close("server shutting down");
                return;
            }
            _ = session.closed.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    #[test]
    fn a_silent_session_ends_interval_plus_timeout_after_its_last_pong() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut hb = Heartbeat::new(s(25), s(20), t0);
        assert_eq!(hb.deadline(), t0 + s(25));
        assert_eq!(hb.fire(t0 + s(25)), Beat::Ping);
        assert_eq!(hb.deadline(), t0 + s(45), "45 s, not 65");
        assert_eq!(hb.fire(t0 + s(45)), Beat::TimedOut);
    }

    #[test]
    fn a_pong_schedules_the_next_ping_and_stray_pongs_change_nothing() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut hb = Heartbeat::new(s(25), s(20), t0);
        hb.pong(t0 + s(3));
        assert_eq!(hb.deadline(), t0 + s(25), "a pong nobody asked for");
        assert_eq!(hb.fire(t0 + s(25)), Beat::Ping);
        hb.pong(t0 + s(26));
        assert!(!hb.waiting_pong());
        assert_eq!(hb.deadline(), t0 + s(51));
        assert_eq!(hb.fire(t0 + s(51)), Beat::Ping);
    }
}
