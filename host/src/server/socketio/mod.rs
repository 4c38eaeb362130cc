//! Socket.IO v5 over Engine.IO v4 on `/socket.io/`: long-polling,
//! WebSocket, the upgrade between them, CORS, and the reference server's
//! refusals (socketio/engine.io-protocol, socketio/socket.io-protocol).
//!
//! Sessions live in [`SioServer`]; each is one hub connection whose
//! namespaces are channel instances served by plugins. Polling sessions
//! are written from their queue; once a session is on WebSocket, items are
//! framed and written directly on the thread that produces them
//! ([`SioOut`] over the connection's [`Wire`]).
//!
//! CORS is decided here rather than by `tower-http`'s `CorsLayer`: the
//! same decision also refuses a cross-site WebSocket upgrade (403, which a
//! CORS layer does not do), treats the Host's own origin as allowed, and
//! answers preflights only on this endpoint; one function
//! (`origin_allowed`) serves all three, so they cannot disagree.

mod session;

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use self::session::{EioOut, Opening, Session, Transport};
use super::ws::{close_code_of, Message, Socket, Upgrade, Wire, OP_BINARY, OP_TEXT};
use crate::hub::{DirectOut, Outbound, QueueFull, QueueLimits, SLOW_CONSUMER_CLOSE};
use crate::metrics::Metrics;
use crate::node::Node;
use crate::protocol::engineio::{self, HttpError, Packet};
use crate::protocol::socketio as sio;

/// Most queued items written per poll response or WebSocket flush.
const DRAIN: usize = 256;

/// The Socket.IO endpoint of a node.
pub struct SioServer {
    pub node: Arc<Node>,
    sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
}

/// Routes of the endpoint (`/socket.io/`, with and without the slash).
pub fn router(node: Arc<Node>) -> Router {
    let server = Arc::new(SioServer {
        node,
        sessions: Mutex::new(HashMap::new()),
    });
    Router::new()
        .route("/socket.io/", any(handle))
        .route("/socket.io", any(handle))
        .with_state(server)
}

fn eio_error(e: HttpError, cors: &[(header::HeaderName, HeaderValue)]) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        e.body(),
    )
        .into_response();
    for (k, v) in cors {
        r.headers_mut().insert(k.clone(), v.clone());
    }
    r
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

async fn handle(State(server): State<Arc<SioServer>>, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    let query: HashMap<String, String> = parts
        .uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let cfg = &server.node.config.socketio;
    let origin = parts
        .headers
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_owned);
    let allowed = origin_allowed(origin.as_deref(), &parts.headers, &cfg.cors_origins);
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
            let ws = ws.limits(cfg.max_payload, QueueLimits::of(&server.node.config.limits));
            match sid {
                None => {
                    let opening = match Opening::of(&server, &parts) {
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
                            let open = session.open_packet(&[]);
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
                    let Some(session) = server.sessions.lock().get(sid.as_str()).cloned() else {
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
                    ws.on_upgrade(
                        move |socket, wire| upgrade(session, socket, wire),
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
                    let opening = match Opening::of(&server, &parts) {
                        Ok(o) => o,
                        Err(refused) => return with_headers(refused.into_response(), &cors),
                    };
                    let session = Session::start(&server, opening, Transport::Polling, None);
                    text(
                        StatusCode::OK,
                        "text/plain; charset=UTF-8",
                        session.open_packet(&["websocket"]),
                    )
                }
                None => eio_error(HttpError::BadHandshakeMethod, &cors),
                Some(sid) => {
                    let Some(session) = server.sessions.lock().get(sid.as_str()).cloned() else {
                        return eio_error(HttpError::UnknownSid, &cors);
                    };
                    if session.transport() == Transport::WebSocket {
                        return eio_error(HttpError::BadRequest, &cors);
                    }
                    match parts.method {
                        Method::GET => poll(&session).await,
                        Method::POST => post(&session, body).await,
                        _ => eio_error(HttpError::BadRequest, &cors),
                    }
                }
            };
            with_headers(resp, &cors)
        }
        _ => eio_error(HttpError::UnknownTransport, &cors),
    }
}

/// A long-polling GET: waits for queued packets and returns them.
async fn poll(session: &Arc<Session>) -> Response {
    let Ok(mut queue) = session.rx.try_lock() else {
        // A second concurrent GET: the reference server closes the session.
        session.close("overlapping polling requests");
        return eio_error(HttpError::BadRequest, &[]);
    };
    let Some(rx) = queue.as_mut() else {
        // The session moved to WebSocket.
        return eio_error(HttpError::BadRequest, &[]);
    };
    // A close packet goes out alone, after whatever preceded it: clients
    // process a payload's messages a tick later than its close.
    let mut out = session.take_carry();
    let close = Packet::Close.encode();
    loop {
        if !out.is_empty() {
            break;
        }
        tokio::select! {
            item = rx.recv() => {
                let Some(item) = item else { break };
                session.render(item, &mut out);
                while out.len() < DRAIN {
                    match rx.try_recv() {
                        Some(item) => session.render(item, &mut out),
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
                    out.push(EioOut::Text(close.clone()));
                }
                break;
            }
        }
    }
    // Carried packets are stored before the queue is released, so a
    // WebSocket taking over after an upgrade finds them.
    if let Some(i) = out
        .iter()
        .position(|o| matches!(o, EioOut::Text(t) if *t == close))
    {
        if i > 0 {
            session.carry(out.split_off(i));
        } else {
            out.truncate(1);
        }
    }
    drop(queue);
    let closing = matches!(out.as_slice(), [EioOut::Text(t)] if *t == close);
    session.node.metrics.frames_sent.add(out.len() as u64);
    let body = engineio::encode_payload(out.into_iter().map(EioOut::into_polling));
    if closing {
        session.close("server closed the session");
    }
    text(StatusCode::OK, "text/plain; charset=UTF-8", body)
}

/// A long-polling POST: the packets the client sends.
async fn post(session: &Arc<Session>, body: Body) -> Response {
    let Ok(_posting) = session.posting.try_lock() else {
        // Overlapping data requests: the reference server closes the session.
        session.close("overlapping polling POSTs");
        return eio_error(HttpError::BadRequest, &[]);
    };
    let max = session.node.config.socketio.max_payload;
    let bytes = match crate::server::read_body(&session.node, body, max).await {
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
            Err(session::ProtocolError::ClientClose) => {
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
async fn upgrade(session: Arc<Session>, mut socket: Socket, wire: Arc<Wire>) {
    let timeout = session.node.config.socketio.upgrade_timeout;
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

/// Frames items for a Socket.IO session on WebSocket and writes them to its
/// wire, on the thread that produces them.
pub struct SioOut {
    session: std::sync::Weak<Session>,
    wire: Arc<Wire>,
    metrics: Arc<Metrics>,
    /// Cancelled when the Engine.IO close packet comes through: the
    /// session task ends the session (not here: this runs inside the hub's
    /// fan-out, which must not re-enter the hub).
    ended: CancellationToken,
    /// The Engine.IO close packet's text, to recognise it.
    close_packet: String,
}

impl SioOut {
    fn new(session: std::sync::Weak<Session>, wire: Arc<Wire>, node: &Node) -> Self {
        Self {
            session,
            wire,
            metrics: node.metrics.clone(),
            ended: CancellationToken::new(),
            close_packet: Packet::Close.encode(),
        }
    }

    fn write(&self, o: EioOut) -> Result<(), QueueFull> {
        let r = match &o {
            // The Engine.IO close packet is not written: the WebSocket close
            // frame after what is pending ends the session, so the client
            // handles every DISCONNECT before it.
            EioOut::Text(t) if *t == self.close_packet => {
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
}

impl DirectOut for SioOut {
    fn send(&self, out: Outbound) -> Result<(), QueueFull> {
        let Some(session) = self.session.upgrade() else {
            return Ok(());
        };
        match out {
            // The fan-out path: framed from its shared parts, no copy.
            Outbound::Event { slot, event } if !session.holds_events() => {
                if !slot.is_open() {
                    return Ok(());
                }
                let nsp = slot.id();
                let args = event.socketio_args().as_bytes();
                let sent = match (event.attachments.len(), nsp) {
                    (0, "/") => self.wire.send(OP_TEXT, &[b"42", args]),
                    (0, _) => self
                        .wire
                        .send(OP_TEXT, &[b"42", nsp.as_bytes(), b",", args]),
                    (n, _) => {
                        let head = sio::event_header(nsp, n);
                        self.wire.send(OP_TEXT, &[b"4", head.as_bytes(), args])
                    }
                };
                sent?;
                self.metrics.frames_sent.inc();
                for a in event.attachments.iter() {
                    self.wire.send(OP_BINARY, &[a])?;
                    self.metrics.frames_sent.inc();
                }
                Ok(())
            }
            other => {
                let mut rendered = Vec::new();
                session.render(other, &mut rendered);
                rendered.into_iter().try_for_each(|o| self.write(o))
            }
        }
    }
}

/// Serves a session over a WebSocket until either side ends it.
async fn run_websocket(session: Arc<Session>, mut socket: Socket, wire: Arc<Wire>) {
    let out = match session.ws_out.get() {
        Some(out) => out.clone(),
        None => {
            // Waits for a poll in flight (after an upgrade) to hand the
            // queue over.
            let mut queue = session.rx.lock().await;
            let out = Arc::new(SioOut::new(
                Arc::downgrade(&session),
                wire.clone(),
                &session.node,
            ));
            // What a poll left behind and what is queued goes first, then
            // every item is written directly.
            session.conn.go_direct(out.clone(), |direct| {
                let carried = session.take_carry().into_iter();
                let mut full = carried.map(|o| out.write(o)).any(|r| r.is_err());
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
    let ended = out.ended.clone();
    let close_code = serve_websocket(&session, &mut socket, &wire, &ended).await;
    session.conn.end_direct();
    if let Some(code) = close_code {
        wire.send_close(Some(code), "").await;
    }
}

/// The read loop of a WebSocket session; the close code to send, if any.
async fn serve_websocket(
    session: &Arc<Session>,
    socket: &mut Socket,
    wire: &Arc<Wire>,
    ended: &CancellationToken,
) -> Option<u16> {
    let node = &session.node;
    let closed = session.closed.cancelled();
    let shutdown = node.shutdown.cancelled();
    let ended = ended.cancelled();
    tokio::pin!(closed, shutdown, ended);
    loop {
        tokio::select! {
            biased;
            // Ended by the heartbeat on shutdown, or by a plugin or the hub.
            _ = &mut closed => {
                return Some(if node.shutdown.is_cancelled() { 1001 } else { 1000 });
            }
            _ = &mut shutdown => {
                session.close("server shutting down");
                return Some(1001);
            }
            _ = &mut ended => {
                session.close("server closed the session");
                return Some(1000);
            }
            msg = socket.next() => {
                let packet = match msg {
                    Some(Ok(Message::Text(t))) => Packet::decode_from_client(&t),
                    Some(Ok(Message::Binary(b))) => Ok(Packet::Binary(b.to_vec())),
                    Some(Ok(Message::Close(_))) | None => {
                        session.close("transport close");
                        return None;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        let code = close_code_of(&e);
                        session.close(if code.is_some() { "invalid WebSocket frame" } else { "transport error" });
                        return code;
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
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        h
    }

    #[test]
    fn origins() {
        let h = headers("gw.example:3000");
        let allow = vec!["https://app.example".to_owned()];
        assert!(origin_allowed(None, &h, &allow));
        assert!(origin_allowed(Some("https://app.example"), &h, &allow));
        assert!(origin_allowed(Some("http://gw.example:3000"), &h, &allow));
        assert!(!origin_allowed(Some("https://evil.example"), &h, &allow));
        assert!(origin_allowed(
            Some("https://evil.example"),
            &h,
            &["*".to_owned()]
        ));
        assert!(cors_headers(Some("https://evil.example"), false).is_empty());
        assert_eq!(cors_headers(Some("https://app.example"), true).len(), 3);
    }
}
