//! Engine.IO v4 (socketio/engine.io-protocol): request dispatch, CORS,
//! long-polling, WebSocket, the upgrade between them, and the reference
//! server's refusals. What the messages mean belongs to the layer above,
//! joined by one trait, [`Handler`] (Socket.IO is [`crate::server::socketio`]).
//!
//! Sessions live in an [`EngineServer`]; each carries one hub connection.
//! Polling sessions are written from the connection's queue, rendered by
//! the handler; once a session is on WebSocket, items go straight to its
//! [`Wire`] on the thread that produces them ([`WsOut`]), framed by the
//! handler.
//!
//! CORS is decided here rather than by `tower-http`'s `CorsLayer`: the
//! same decision also refuses a cross-site WebSocket upgrade (403, which a
//! CORS layer does not do), treats the Host's own origin as allowed, and
//! answers preflights only on this endpoint; one function
//! (`origin_allowed`) serves all three, so they cannot disagree.

mod session;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

pub use self::session::{random_id, EioOut, Opening, ProtocolError, Session, Transport};
use super::admission::{Admission, Refused};
use super::ws::{self, Incoming, Message, Socket, Upgrade, Wire, OP_BINARY, OP_TEXT};
use super::BodyReader;
use crate::hub::SLOW_CONSUMER_CLOSE;
use crate::hub::{ConnId, DirectOut, Outbound, Protocol, QueueFull, QueueLimits};
use crate::metrics::Metrics;
use crate::protocol::engineio::{self, HttpError, Packet};

/// Most queued items written per poll response or WebSocket flush.
const DRAIN: usize = 256;

/// The layer above Engine.IO: what a session's messages mean and how the
/// hub's items are framed for it. One implementation serves every session
/// of an [`EngineServer`].
pub trait Handler: Sized + Send + Sync + 'static {
    /// The layer's state of one session ([`Session::socket`]).
    type Socket: Send + Sync + 'static;
    /// Why a message ends the session.
    type Error: std::fmt::Display + std::fmt::Debug + Send + 'static;
    /// The protocol tag of the hub connections.
    const PROTOCOL: Protocol;

    /// An id for a new session's hub connection.
    fn connection_id(&self) -> ConnId;
    /// The state of a new session, from what its handshake kept.
    fn socket(&self, opening: &Opening) -> Self::Socket;
    /// The session exists and is about to serve (register its connection).
    fn opened(&self, session: &Arc<Session<Self>>);
    /// A text message (Engine.IO packet `4`).
    fn on_message(
        &self,
        session: &Arc<Session<Self>>,
        text: String,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// A binary message.
    fn on_binary(
        &self,
        session: &Arc<Session<Self>>,
        data: Vec<u8>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Renders a hub item into Engine.IO packets (nothing for an item held
    /// back or addressed to what is gone).
    fn render(&self, session: &Session<Self>, item: Outbound, into: &mut Vec<EioOut>);
    /// Writes a hub item to a WebSocket session, on the producing thread.
    /// The default renders it ([`WsOut::write_all`]); a handler frames its
    /// hot items itself (unless [`WsOut::deferring`]), and paces a reply
    /// and what follows it ([`WsOut::write_paced`]).
    fn write_direct(
        &self,
        session: &Session<Self>,
        item: Outbound,
        ws: &WsOut<Self>,
    ) -> Result<(), QueueFull> {
        let mut rendered = Vec::new();
        self.render(session, item, &mut rendered);
        ws.write_all(rendered)
    }
    /// The server ends the session (a plugin asked): what the client is
    /// told before the Engine.IO close packet.
    fn closing(&self, session: &Session<Self>);
    /// A deadline after the session opens, if the layer wants one.
    fn deadline(&self) -> Option<Duration> {
        None
    }
    /// The deadline passed: why to close the session, if it should be.
    fn deadline_passed(&self, _session: &Session<Self>) -> Option<&'static str> {
        None
    }
    /// The session ended (forget its connection); `why` as the engine.io
    /// reference names it when it can (`transport close`, `transport
    /// error`, `ping timeout`, `server shutting down`, ...).
    fn closed(&self, session: &Session<Self>, why: &str);
}

/// What an [`EngineServer`] is built with.
pub struct EngineOptions {
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub upgrade_timeout: Duration,
    /// On WebSocket, the pause between the packets the handler paces
    /// ([`WsOut::write_paced`]; Socket.IO: a CONNECT reply and the events
    /// held behind it): long enough for a client woken by one frame to
    /// read it before the next arrives. The reference server writes a
    /// packet only once the previous write's callback ran, and a Node
    /// client that attaches one listener per message (`ws` emits all the
    /// messages of one read in one tick; the official test suites read a
    /// handshake this way) depends on it. Everything else is written at
    /// once. Zero writes paced packets back to back too.
    pub packet_gap: Duration,
    /// Largest message and POST body, in bytes.
    pub max_payload: usize,
    /// Allowed cross-site origins (`*` = any).
    pub cors_origins: Vec<String>,
    /// Bounds of each connection's outbound queue.
    pub queue: QueueLimits,
    /// How polling POST bodies are read.
    pub body: BodyReader,
    pub admission: Arc<Admission>,
    pub metrics: Arc<Metrics>,
    /// Cancelled on shutdown: sessions end, WebSockets close with 1001.
    pub shutdown: CancellationToken,
}

/// The Engine.IO endpoint: its sessions by sid.
pub struct EngineServer<H: Handler> {
    handler: Arc<H>,
    options: EngineOptions,
    sessions: Mutex<HashMap<Arc<str>, Arc<Session<H>>>>,
}

impl<H: Handler> EngineServer<H> {
    pub fn new(handler: H, options: EngineOptions) -> Arc<Self> {
        Arc::new(Self {
            handler: Arc::new(handler),
            options,
            sessions: Mutex::new(HashMap::new()),
        })
    }

    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Open sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.lock().len()
    }

    fn session(&self, sid: &str) -> Option<Arc<Session<H>>> {
        self.sessions.lock().get(sid).cloned()
    }

    /// Admits the client (or refuses it) and keeps what the handler is
    /// handed of its request.
    fn opening(&self, parts: &axum::http::request::Parts) -> Result<Opening, Refused> {
        let admission = &self.options.admission;
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0)
            .unwrap_or_else(|| ([127, 0, 0, 1], 0).into());
        let ticket = admission.admit(admission.client_address(peer, &parts.headers))?;
        let (headers, query) = crate::server::kept_request(&parts.headers, &parts.uri, &[]);
        Ok(Opening {
            headers,
            query,
            ticket,
        })
    }
}

fn eio_error(e: HttpError, cors: &[(header::HeaderName, HeaderValue)]) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let r = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        e.body(),
    )
        .into_response();
    with_headers(r, cors)
}

/// Whether a request's Origin may use the endpoint: no Origin (not a
/// browser), same origin as the Host, or on the allow-list (`*` = any).
fn origin_allowed(origin: Option<&str>, headers: &HeaderMap, allow: &[String]) -> bool {
    let Some(origin) = origin else { return true };
    if allow.iter().any(|a| a == "*" || a == origin) {
        return true;
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    matches!((host, origin_host), (Some(h), Some(o)) if h.eq_ignore_ascii_case(o))
}

fn cors_headers(origin: Option<&str>, allowed: bool) -> Vec<(header::HeaderName, HeaderValue)> {
    let (Some(origin), true) = (origin, allowed) else {
        return Vec::new();
    };
    let Ok(v) = HeaderValue::from_str(origin) else {
        return Vec::new();
    };
    vec![
        (header::ACCESS_CONTROL_ALLOW_ORIGIN, v),
        (
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        ),
        (header::VARY, HeaderValue::from_static("Origin")),
    ]
}

fn with_headers(mut r: Response, hs: &[(header::HeaderName, HeaderValue)]) -> Response {
    for (k, v) in hs {
        r.headers_mut().insert(k.clone(), v.clone());
    }
    r
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// Serves one request to the endpoint.
pub async fn handle<H: Handler>(server: Arc<EngineServer<H>>, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    let query: HashMap<String, String> = parts
        .uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let options = &server.options;
    let origin = parts
        .headers
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_owned);
    let allowed = origin_allowed(origin.as_deref(), &parts.headers, &options.cors_origins);
    let cors = cors_headers(origin.as_deref(), allowed);

    if parts.method == Method::OPTIONS {
        let mut r = StatusCode::NO_CONTENT.into_response();
        if allowed && origin.is_some() {
            let h = r.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST"),
            );
            if let Some(req_h) = parts.headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
                h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, req_h.clone());
            }
        }
        return with_headers(r, &cors);
    }
    if query.get("EIO").map(String::as_str) != Some("4") {
        return eio_error(HttpError::UnsupportedProtocolVersion, &cors);
    }
    let sid = query.get("sid").cloned();
    match query.get("transport").map(String::as_str) {
        Some("websocket") => {
            if !allowed {
                return eio_error(HttpError::Forbidden, &cors);
            }
            let ws = match Upgrade::from_parts(&mut parts) {
                Ok(ws) => ws,
                Err(_) => return eio_error(HttpError::BadRequest, &cors),
            };
            let ws = ws.limits(options.max_payload, options.queue);
            match sid {
                None => {
                    let opening = match server.opening(&parts) {
                        Ok(o) => o,
                        Err(refused) => return with_headers(refused.into_response(), &cors),
                    };
                    ws.on_upgrade(
                        move |socket, wire| async move {
                            let session = Session::start(
                                &server,
                                opening,
                                Transport::WebSocket,
                                Some(wire.clone()),
                            );
                            let open = session.open_packet(&server.options, &[]);
                            if wire.send(OP_TEXT, &[open.as_bytes()]).is_err() || wire.is_closed() {
                                session.close("handshake write failed");
                                return;
                            }
                            run_websocket(session, socket, wire).await;
                        },
                        || {},
                    )
                }
                Some(sid) => {
                    let Some(session) = server.session(&sid) else {
                        return eio_error(HttpError::UnknownSid, &cors);
                    };
                    // One upgrade at a time, and only from polling. A second
                    // WebSocket for a session that upgrades or has upgraded
                    // is accepted and closed at once, as the reference server
                    // does; the session itself is untouched.
                    if !session.switch_transport(Transport::Polling, Transport::Upgrading) {
                        return ws.on_upgrade(
                            |_socket, wire| async move { wire.send_close(None, "").await },
                            || {},
                        );
                    }
                    let failed = session.clone();
                    let timeout = options.upgrade_timeout;
                    ws.on_upgrade(
                        move |socket, wire| upgrade(session, socket, wire, timeout),
                        move || {
                            failed.switch_transport(Transport::Upgrading, Transport::Polling);
                        },
                    )
                }
            }
        }
        Some("polling") => {
            let resp = match sid {
                None if parts.method == Method::GET => {
                    let opening = match server.opening(&parts) {
                        Ok(o) => o,
                        Err(refused) => return with_headers(refused.into_response(), &cors),
                    };
                    let session = Session::start(&server, opening, Transport::Polling, None);
                    text(
                        StatusCode::OK,
                        "text/plain; charset=UTF-8",
                        session.open_packet(&server.options, &["websocket"]),
                    )
                }
                None => eio_error(HttpError::BadHandshakeMethod, &cors),
                Some(sid) => {
                    let Some(session) = server.session(&sid) else {
                        return eio_error(HttpError::UnknownSid, &cors);
                    };
                    if session.transport() == Transport::WebSocket {
                        return eio_error(HttpError::BadRequest, &cors);
                    }
                    match parts.method {
                        Method::GET => poll(&server, &session).await,
                        Method::POST => post(&server, &session, body).await,
                        _ => eio_error(HttpError::BadRequest, &cors),
                    }
                }
            };
            with_headers(resp, &cors)
        }
        _ => eio_error(HttpError::UnknownTransport, &cors),
    }
}

/// Splits a poll's packets where its response ends: a close packet goes
/// out alone, after whatever preceded it (clients process a payload's
/// messages a tick later than its close). The packets of one item share a
/// payload (it is read whole; only WebSocket paces them). Returns what
/// waits for the next poll.
fn split_poll(out: &mut Vec<EioOut>, close: &str) -> Vec<EioOut> {
    let Some(i) = out
        .iter()
        .position(|o| matches!(o, EioOut::Text(t) if t == close))
    else {
        return Vec::new();
    };
    if i > 0 {
        return out.split_off(i);
    }
    // Nothing is sent after a close.
    out.truncate(1);
    Vec::new()
}

/// A long-polling GET: waits for queued packets and returns them.
async fn poll<H: Handler>(server: &EngineServer<H>, session: &Arc<Session<H>>) -> Response {
    let Ok(mut queue) = session.rx.try_lock() else {
        // A second concurrent GET: the reference server closes the session.
        session.close("overlapping polling requests");
        return eio_error(HttpError::BadRequest, &[]);
    };
    let Some(rx) = queue.as_mut() else {
        // The session moved to WebSocket.
        return eio_error(HttpError::BadRequest, &[]);
    };
    let handler = &server.handler;
    let mut out = session.take_carry();
    let close = close_packet();
    loop {
        if !out.is_empty() {
            break;
        }
        tokio::select! {
            item = rx.recv() => {
                let Some(item) = item else { break };
                handler.render(session, item, &mut out);
                while out.len() < DRAIN {
                    match rx.try_recv() {
                        Some(item) => handler.render(session, item, &mut out),
                        None => break,
                    }
                }
            }
            _ = session.closed.cancelled() => {
                // The client closed the session itself (a POSTed close
                // packet): the waiting poll gets a noop, and the next one
                // an unknown sid. Otherwise the client is told of the close.
                if session.closed_by_client() {
                    out.push(EioOut::Text(Packet::Noop.encode()));
                } else {
                    out.push(EioOut::Text(close.to_owned()));
                }
                break;
            }
        }
    }
    // Carried packets are stored before the queue is released, so a
    // WebSocket taking over after an upgrade finds them.
    let rest = split_poll(&mut out, close);
    if !rest.is_empty() {
        session.carry(rest);
    }
    drop(queue);
    let closing = matches!(out.as_slice(), [EioOut::Text(t)] if *t == close);
    server.options.metrics.frames_sent.add(out.len() as u64);
    let body = engineio::encode_payload(out.into_iter().map(EioOut::into_polling));
    if closing {
        session.close("server closed the session");
    }
    text(StatusCode::OK, "text/plain; charset=UTF-8", body)
}

/// A long-polling POST: the packets the client sends.
async fn post<H: Handler>(
    server: &EngineServer<H>,
    session: &Arc<Session<H>>,
    body: Body,
) -> Response {
    let Ok(_posting) = session.posting.try_lock() else {
        // Overlapping data requests: the reference server closes the session.
        session.close("overlapping polling POSTs");
        return eio_error(HttpError::BadRequest, &[]);
    };
    let bytes = match server
        .options
        .body
        .read(body, server.options.max_payload)
        .await
    {
        Ok(b) => b,
        Err(crate::server::BodyError::TooLarge) => {
            session.close("payload over maxPayload");
            return (StatusCode::PAYLOAD_TOO_LARGE, "payload too large").into_response();
        }
        Err(e) => {
            session.close(&e.to_string());
            return e.into_response();
        }
    };
    let Ok(text_body) = std::str::from_utf8(&bytes) else {
        session.close("payload is not UTF-8");
        return eio_error(HttpError::BadRequest, &[]);
    };
    let packets = match engineio::decode_payload(text_body) {
        Ok(p) => p,
        Err(e) => {
            session.close(&format!("invalid payload: {e}"));
            return eio_error(HttpError::BadRequest, &[]);
        }
    };
    for p in packets {
        match session.on_packet(p).await {
            Ok(()) => {}
            // A client's close is a normal end: answered `ok`, as the
            // reference server does.
            Err(ProtocolError::ClientClose) => {
                session.client_close();
                break;
            }
            Err(e) => {
                session.close(&e.to_string());
                return eio_error(HttpError::BadRequest, &[]);
            }
        }
    }
    text(StatusCode::OK, "text/html", "ok".into())
}

/// The polling-to-WebSocket upgrade: `2probe` / `3probe`, a noop to the
/// pending poll, then `5`; on any failure the session stays on polling.
async fn upgrade<H: Handler>(
    session: Arc<Session<H>>,
    mut socket: Socket,
    wire: Arc<Wire>,
    timeout: Duration,
) {
    let probed = tokio::time::timeout(timeout, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(t))) => match Packet::decode_from_client(&t) {
                    Ok(Packet::Ping(d)) if d == "probe" => {
                        wire.send(OP_TEXT, &[Packet::Pong(d).encode().as_bytes()])
                            .ok()?;
                        if wire.is_closed() {
                            return None;
                        }
                        session.conn.push(Outbound::Text(Packet::Noop.encode()));
                    }
                    Ok(Packet::Upgrade) => return Some(()),
                    _ => return None,
                },
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                _ => return None,
            }
        }
    })
    .await;
    if !matches!(probed, Ok(Some(()))) || session.closed.is_cancelled() {
        session.switch_transport(Transport::Upgrading, Transport::Polling);
        tracing::debug!(sid = &*session.sid, "websocket upgrade abandoned");
        return;
    }
    if !session.switch_transport(Transport::Upgrading, Transport::WebSocket) {
        return;
    }
    run_websocket(session, socket, wire).await;
}

/// Packets waiting for a later turn, and their bytes.
#[derive(Default)]
struct Later {
    packets: VecDeque<(EioOut, bool)>,
    bytes: usize,
}

impl Later {
    fn size(p: &EioOut) -> usize {
        match p {
            EioOut::Text(t) => t.len(),
            EioOut::Binary(b) => b.len(),
        }
    }

    /// Appends, unless that takes it over `bound` (the client does not
    /// keep up: a slow consumer).
    fn push(&mut self, p: EioOut, own_turn: bool, bound: QueueLimits) -> Result<(), QueueFull> {
        let n = Self::size(&p);
        if self.packets.len() >= bound.frames || self.bytes + n > bound.bytes {
            return Err(QueueFull);
        }
        self.bytes += n;
        self.packets.push_back((p, own_turn));
        Ok(())
    }

    fn pop(&mut self) -> Option<(EioOut, bool)> {
        let (p, own_turn) = self.packets.pop_front()?;
        self.bytes -= Self::size(&p);
        Some((p, own_turn))
    }

    fn unpop(&mut self, p: EioOut, own_turn: bool) {
        self.bytes += Self::size(&p);
        self.packets.push_front((p, own_turn));
    }
}

/// Writes a WebSocket session's items to its wire, on the thread that
/// produces them; the handler frames them ([`Handler::write_direct`]).
/// One per WebSocket session: kept small (what pacing needs is allocated
/// only while packets wait).
pub struct WsOut<H: Handler> {
    session: Weak<Session<H>>,
    wire: Arc<Wire>,
    metrics: Arc<Metrics>,
    /// Cancelled when the Engine.IO close packet comes through: the
    /// session task ends the session (not here: this runs inside the hub's
    /// fan-out, which must not re-enter the hub).
    ended: CancellationToken,
    /// Whether the packets of one item are paced
    /// ([`EngineOptions::packet_gap`] is not zero).
    paced: bool,
    /// Set while packets wait for a later turn: everything rendered
    /// meanwhile joins them, in order.
    deferring: AtomicBool,
    /// The waiting packets, while some wait.
    later: Mutex<Option<Box<Later>>>,
}

/// The Engine.IO close packet's text, to recognise it among rendered
/// packets.
fn close_packet() -> &'static str {
    static CLOSE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CLOSE.get_or_init(|| Packet::Close.encode())
}

impl<H: Handler> WsOut<H> {
    fn new(session: Weak<Session<H>>, wire: Arc<Wire>, options: &EngineOptions) -> Self {
        Self {
            session,
            wire,
            metrics: options.metrics.clone(),
            ended: CancellationToken::new(),
            paced: !options.packet_gap.is_zero(),
            deferring: AtomicBool::new(false),
            later: Mutex::new(None),
        }
    }

    /// The wire, for a handler's own framing of hot items.
    pub fn wire(&self) -> &Arc<Wire> {
        &self.wire
    }

    /// Counts frames a handler wrote to the wire itself.
    pub fn count_frames(&self, n: u64) {
        self.metrics.frames_sent.add(n);
    }

    /// Whether packets wait for a later turn: a handler's own framing must
    /// not overtake them (it renders instead).
    pub fn deferring(&self) -> bool {
        self.deferring.load(Ordering::Acquire)
    }

    fn write(&self, o: EioOut) -> Result<(), QueueFull> {
        let r = match &o {
            // The Engine.IO close packet is not written: the WebSocket close
            // frame after what is pending ends the session, so the client
            // handles everything before it.
            EioOut::Text(t) if t == close_packet() => {
                self.ended.cancel();
                return Ok(());
            }
            EioOut::Text(t) => self.wire.send(OP_TEXT, &[t.as_bytes()]),
            EioOut::Binary(b) => self.wire.send(OP_BINARY, &[b]),
        };
        r?;
        self.metrics.frames_sent.inc();
        Ok(())
    }

    /// Appends packets behind those that wait, when some wait (with
    /// `paced`, each after the first waits for a turn of its own); gives
    /// them back when none wait.
    fn join_waiting(
        &self,
        packets: Vec<EioOut>,
        paced: bool,
    ) -> Result<Result<(), QueueFull>, Vec<EioOut>> {
        if self.deferring() {
            let bound = self.wire.limits();
            let mut later = self.later.lock();
            if let Some(waiting) = later.as_mut() {
                return Ok(packets
                    .into_iter()
                    .enumerate()
                    .try_for_each(|(i, p)| waiting.push(p, paced && i > 0, bound)));
            }
        }
        Err(packets)
    }

    /// Writes packets now, in order (behind those that wait, if any).
    pub fn write_all(&self, packets: Vec<EioOut>) -> Result<(), QueueFull> {
        match self.join_waiting(packets, false) {
            Ok(joined) => joined,
            Err(packets) => packets.into_iter().try_for_each(|p| self.write(p)),
        }
    }

    /// Writes packets one per turn of the session task, the first now
    /// (unless packets wait, which they then join), each further one
    /// [`EngineOptions::packet_gap`] later: for a reply a client must be
    /// able to read before what follows it. What waits is bounded like the
    /// connection's queue.
    pub fn write_paced(&self, packets: Vec<EioOut>) -> Result<(), QueueFull> {
        self.write_turns(packets, true)
    }

    /// Like [`WsOut::write_paced`], but only the first packet after the
    /// reply waits for a turn of its own; the rest goes with it (a
    /// recovered socket's replay, which may be long, is not written one
    /// packet per pause — pings would wait behind it).
    pub fn write_after_reply(&self, packets: Vec<EioOut>) -> Result<(), QueueFull> {
        self.write_turns(packets, false)
    }

    fn write_turns(&self, packets: Vec<EioOut>, each: bool) -> Result<(), QueueFull> {
        let mut packets = match self.join_waiting(packets, true) {
            Ok(joined) => return joined,
            Err(packets) => packets.into_iter(),
        };
        if !self.paced {
            return packets.try_for_each(|p| self.write(p));
        }
        let Some(first) = packets.next() else {
            return Ok(());
        };
        self.write(first)?;
        let rest: Vec<EioOut> = packets.collect();
        if rest.is_empty() {
            return Ok(());
        }
        let bound = self.wire.limits();
        let mut later = self.later.lock();
        // Written before anything else could join: these go first.
        let joined = later.take();
        let waiting = later.insert(Box::default());
        let mut full = Ok(());
        for (i, p) in rest.into_iter().enumerate() {
            full = full.and(waiting.push(p, each || i == 0, bound));
        }
        for (p, own_turn) in joined.into_iter().flat_map(|j| j.packets) {
            full = full.and(waiting.push(p, own_turn, bound));
        }
        self.deferring.store(true, Ordering::Release);
        self.wire.wake();
        full
    }

    /// One turn of what waits: the front packet, and those after it that
    /// need no turn of their own (the session task, after the pause).
    fn release_later(&self) -> Result<(), QueueFull> {
        let mut later = self.later.lock();
        let Some(waiting) = later.as_mut() else {
            return Ok(());
        };
        let mut first = true;
        while let Some((p, own_turn)) = waiting.pop() {
            if own_turn && !first {
                waiting.unpop(p, own_turn);
                self.wire.wake();
                return Ok(());
            }
            first = false;
            // The wire takes the frame at once or keeps it pending; the
            // lock keeps producers from overtaking meanwhile.
            self.write(p)?;
        }
        *later = None;
        self.deferring.store(false, Ordering::Release);
        Ok(())
    }
}

impl<H: Handler> DirectOut for WsOut<H> {
    fn send(&self, out: Outbound) -> Result<(), QueueFull> {
        let Some(session) = self.session.upgrade() else {
            return Ok(());
        };
        session.handler.write_direct(&session, out, self)
    }
}

/// Serves a session over a WebSocket until either side ends it.
async fn run_websocket<H: Handler>(session: Arc<Session<H>>, mut socket: Socket, wire: Arc<Wire>) {
    let out = match session.ws_out.get() {
        Some(out) => out.clone(),
        None => {
            // Waits for a poll in flight (after an upgrade) to hand the
            // queue over.
            let mut queue = session.rx.lock().await;
            let Some(server) = session.server.upgrade() else {
                return;
            };
            let out = Arc::new(WsOut::new(
                Arc::downgrade(&session),
                wire.clone(),
                &server.options,
            ));
            // What a poll left behind and what is queued goes first, then
            // every item is written directly.
            session.conn.go_direct(out.clone(), |direct| {
                let mut full = out.write_all(session.take_carry()).is_err();
                if let Some(rx) = queue.as_mut() {
                    while let Some(item) = rx.try_recv() {
                        full |= direct.send(item).is_err();
                    }
                }
                if full {
                    session
                        .conn
                        .request_close(SLOW_CONSUMER_CLOSE, "send queue full");
                }
            });
            *queue = None;
            let _ = session.ws_out.set(out.clone());
            out
        }
    };
    let close_code = serve_websocket(&session, &mut socket, &out).await;
    session.conn.end_direct();
    if let Some(code) = close_code {
        wire.send_close(Some(code), "").await;
    }
}

/// The read loop of a WebSocket session; the close code to send, if any.
async fn serve_websocket<H: Handler>(
    session: &Arc<Session<H>>,
    socket: &mut Socket,
    out: &Arc<WsOut<H>>,
) -> Option<u16> {
    let wire = &out.wire;
    let Some((shutdown, gap)) = session
        .server
        .upgrade()
        .map(|s| (s.options.shutdown.clone(), s.options.packet_gap))
    else {
        return Some(1001);
    };
    let closed = session.closed.cancelled();
    let shutting_down = shutdown.cancelled();
    let ended = out.ended.cancelled();
    tokio::pin!(closed, shutting_down, ended);
    loop {
        tokio::select! {
            biased;
            // Ended by the heartbeat on shutdown, or by a plugin or the hub.
            _ = &mut closed => {
                return Some(if shutdown.is_cancelled() { 1001 } else { 1000 });
            }
            _ = &mut shutting_down => {
                session.close("server shutting down");
                return Some(1001);
            }
            _ = &mut ended => {
                session.close("server closed the session");
                return Some(1000);
            }
            incoming = ws::read(socket) => {
                let packet = match incoming {
                    Incoming::Text(t) => Packet::decode_from_client(&t),
                    Incoming::Binary(b) => Ok(Packet::Binary(b.to_vec())),
                    Incoming::Control => continue,
                    Incoming::Gone => {
                        session.close("transport close");
                        return None;
                    }
                    Incoming::Invalid(code) => {
                        session.close("invalid WebSocket frame");
                        return Some(code);
                    }
                };
                let result = match packet {
                    Ok(p) => session.on_packet(p).await.map_err(|e| e.to_string()),
                    Err(e) => Err(format!("invalid packet: {e}")),
                };
                if let Err(e) = result {
                    session.close(&e);
                    return Some(1000);
                }
            }
            _ = wire.wants_flush() => {
                tokio::select! {
                    r = wire.flush() => if r.is_err() {
                        session.close("transport error");
                        return None;
                    },
                    _ = &mut closed => return None,
                }
                // What waits for a later turn goes once what came before
                // it has left, after the pause.
                if out.deferring() {
                    // Boxed: a rare wait, kept out of every session's state.
                    tokio::select! {
                        _ = Box::pin(tokio::time::sleep(gap)) => {}
                        _ = &mut closed => return None,
                    }
                    if out.release_later().is_err() {
                        session
                            .conn
                            .request_close(SLOW_CONSUMER_CLOSE, "send queue full");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
