//! One Engine.IO session: its sid, the transport that carries it, the
//! connection's outbound queue while it is on long-polling, the packets a
//! poll left for the next one, the heartbeat, and the admission ticket
//! given back when it ends. What the messages mean is the [`Handler`]'s
//! business; its per-session state is [`Session::socket`].
//!
//! Whichever transport is current drains the queue: a pending
//! long-polling GET, or the WebSocket task after an upgrade (or from the
//! start). Inbound packets from either transport go through
//! [`Session::on_packet`], one at a time. A heartbeat task pings every
//! `ping_interval` and closes the session when a pong does not come within
//! `ping_timeout`; the handler may ask for one more deadline (Socket.IO's
//! `connectTimeout`).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::{EngineServer, Handler, WsOut};
use crate::hub::{ConnHandle, Outbound, OutboundRx, SLOW_CONSUMER_CLOSE};
use crate::protocol::engineio::{self, Packet};
use crate::server::admission::Ticket;
use crate::server::Pairs;

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
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// What a session keeps of the handshake request that opened it.
pub struct Opening {
    /// Headers and query kept for the layer above (see
    /// [`crate::server::kept_request`]).
    pub headers: Pairs,
    pub query: Pairs,
    pub(super) ticket: Ticket,
}

impl Opening {
    /// The client's address (behind a trusted proxy, the one it names).
    pub fn address(&self) -> std::net::IpAddr {
        self.ticket.address()
    }
}

/// Why a session ends because of what the client sent.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError<E: std::fmt::Display + std::fmt::Debug> {
    #[error("invalid Engine.IO packet: {0}")]
    Engine(#[from] engineio::DecodeError),
    #[error("client closed the session")]
    ClientClose,
    #[error("{0}")]
    Handler(E),
}

/// A fresh session id: 15 random bytes, URL-safe base64 (20 characters).
pub fn random_id() -> String {
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

/// One Engine.IO session.
pub struct Session<H: Handler> {
    pub sid: Arc<str>,
    pub(super) server: Weak<EngineServer<H>>,
    pub(super) handler: Arc<H>,
    /// The hub connection the session carries.
    pub conn: Arc<ConnHandle>,
    /// The handler's state of this session.
    pub socket: H::Socket,
    /// The outbound queue of a polling session; the current transport holds
    /// the lock while draining. None once the session writes directly.
    pub(super) rx: tokio::sync::Mutex<Option<OutboundRx>>,
    /// The direct writer, once the session is on WebSocket.
    pub(super) ws_out: std::sync::OnceLock<Arc<WsOut<H>>>,
    transport: AtomicU8,
    /// Cancelled when the session ends.
    pub closed: CancellationToken,
    /// Serialises inbound packet handling across transports.
    inbound: tokio::sync::Mutex<()>,
    /// Held by a polling POST in progress (a second one is refused).
    pub(super) posting: tokio::sync::Mutex<()>,
    /// Signalled by each PONG; the heartbeat waits on it.
    pong: tokio::sync::Notify,
    /// Packets rendered for a poll but kept for the next one.
    carried: Mutex<Vec<EioOut>>,
    /// The client ended the session with a close packet (a poll waiting
    /// meanwhile is answered with a noop, as the reference server does).
    client_closed: AtomicBool,
    /// Given back when the session ends.
    ticket: Mutex<Option<Ticket>>,
}

impl<H: Handler> Session<H> {
    /// Creates a session, registers its connection through the handler and
    /// starts its timers. A session opened on WebSocket (`wire`) writes
    /// directly from the start and has no queue.
    pub(super) fn start(
        server: &Arc<EngineServer<H>>,
        opening: Opening,
        transport: Transport,
        wire: Option<Arc<crate::server::ws::Wire>>,
    ) -> Arc<Self> {
        let handler = server.handler.clone();
        let id = handler.connection_id();
        let session = Arc::new_cyclic(|me: &Weak<Self>| {
            let (conn, rx, ws_out) = match wire {
                Some(wire) => {
                    let out = Arc::new(WsOut::new(me.clone(), wire, &server.options));
                    let conn = ConnHandle::new_direct(id, H::PROTOCOL, None, out.clone());
                    (conn, None, std::sync::OnceLock::from(out))
                }
                None => {
                    let (conn, rx) = ConnHandle::new(id, H::PROTOCOL, None, server.options.queue);
                    (conn, Some(rx), std::sync::OnceLock::new())
                }
            };
            Session {
                sid: random_id().into(),
                server: Arc::downgrade(server),
                socket: handler.socket(&opening),
                handler: handler.clone(),
                conn,
                ticket: Mutex::new(Some(opening.ticket)),
                rx: tokio::sync::Mutex::new(rx),
                ws_out,
                transport: AtomicU8::new(transport as u8),
                closed: CancellationToken::new(),
                inbound: tokio::sync::Mutex::new(()),
                posting: tokio::sync::Mutex::new(()),
                pong: tokio::sync::Notify::new(),
                carried: Mutex::new(Vec::new()),
                client_closed: AtomicBool::new(false),
            }
        });
        server
            .sessions
            .lock()
            .insert(session.sid.clone(), session.clone());
        handler.opened(&session);
        tokio::spawn(heartbeat(session.clone(), server.clone()));
        session
    }

    /// The open packet's text.
    pub(super) fn open_packet(&self, options: &super::EngineOptions, upgrades: &[&str]) -> String {
        Packet::Open(engineio::handshake_json(
            &self.sid,
            upgrades,
            options.ping_interval.as_millis() as u64,
            options.ping_timeout.as_millis() as u64,
            options.max_payload,
        ))
        .encode()
    }

    /// Keeps rendered packets for the next poll.
    pub(super) fn carry(&self, packets: Vec<EioOut>) {
        self.carried.lock().extend(packets);
    }

    /// The packets kept for this poll.
    pub(super) fn take_carry(&self) -> Vec<EioOut> {
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
    pub(super) fn switch_transport(&self, from: Transport, to: Transport) -> bool {
        self.transport
            .compare_exchange(from as u8, to as u8, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Ends the session because the client sent a close packet.
    pub(super) fn client_close(&self) {
        self.client_closed.store(true, Ordering::SeqCst);
        self.close("client closed the session");
    }

    /// Whether the client ended the session with a close packet.
    pub(super) fn closed_by_client(&self) -> bool {
        self.client_closed.load(Ordering::SeqCst)
    }

    /// Ends the session: forgets it, tells the handler, wakes whatever
    /// transport is waiting.
    pub fn close(&self, why: &str) {
        if self.closed.is_cancelled() {
            return;
        }
        tracing::debug!(
            sid = &*self.sid,
            conn = self.conn.id,
            "engine.io session closed: {why}"
        );
        self.closed.cancel();
        self.ticket.lock().take();
        if let Some(server) = self.server.upgrade() {
            server.sessions.lock().remove(&self.sid);
        }
        self.handler.closed(self, why);
    }

    /// A close asked by the layer above or by the hub (slow consumer): the
    /// handler says goodbye, then the Engine.IO close packet ends the
    /// session once the transport wrote it. A slow consumer is cut off at
    /// once.
    fn server_close(&self, server: &EngineServer<H>, code: u16, reason: &str) {
        if code == SLOW_CONSUMER_CLOSE {
            server.options.metrics.slow_consumer_closes.inc();
            self.close(reason);
            return;
        }
        self.handler.closing(self);
        if !self.conn.push(Outbound::Text(Packet::Close.encode())) {
            self.close(reason);
        }
    }

    /// Handles one inbound Engine.IO packet. An error closes the session.
    pub(super) async fn on_packet(
        self: &Arc<Self>,
        packet: Packet,
    ) -> Result<(), ProtocolError<H::Error>> {
        let _one_at_a_time = self.inbound.lock().await;
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
                let h = self.handler.clone();
                h.on_message(self, text)
                    .await
                    .map_err(ProtocolError::Handler)?;
            }
            Packet::Binary(bytes) => {
                let h = self.handler.clone();
                h.on_binary(self, bytes)
                    .await
                    .map_err(ProtocolError::Handler)?;
            }
            Packet::Close => return Err(ProtocolError::ClientClose),
            Packet::Upgrade | Packet::Noop | Packet::Open(_) => {}
        }
        Ok(())
    }
}

/// When the heartbeat acts next: it pings `interval` after the last pong
/// (or the start), then waits `timeout` for the pong; a session is closed
/// at most `interval + timeout` after it last answered, as the reference
/// server does. Other timers (the handler's deadline) never move it.
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

/// The session's one timer task: pings, pong deadlines, the handler's
/// deadline, close requests and shutdown.
async fn heartbeat<H: Handler>(session: Arc<Session<H>>, server: Arc<EngineServer<H>>) {
    let options = &server.options;
    let first = session.handler.deadline();
    let handler_deadline = tokio::time::sleep(first.unwrap_or_default());
    tokio::pin!(handler_deadline);
    let mut deadline_pending = first.is_some();
    let mut beat = Heartbeat::new(
        options.ping_interval,
        options.ping_timeout,
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
            _ = &mut handler_deadline, if deadline_pending => {
                deadline_pending = false;
                if let Some(why) = session.handler.deadline_passed(&session) {
                    session.close(why);
                    return;
                }
            }
            (code, reason) = session.conn.closed() => {
                session.server_close(&server, code, &reason);
                // The transport ends the session once the close packet is
                // written; a client that never fetches it is cut off.
                tokio::select! {
                    _ = tokio::time::sleep(options.ping_interval + options.ping_timeout) => {
                        session.close("close packet not fetched");
                    }
                    _ = session.closed.cancelled() => {}
                }
                return;
            }
            _ = options.shutdown.cancelled() => {
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

    #[test]
    fn session_ids_are_twenty_url_safe_characters_and_differ() {
        let (a, b) = (random_id(), random_id());
        assert_eq!(a.len(), 20);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_ne!(a, b);
    }
}
