//! Misskey streaming sessions on `GET /streaming`: authentication before
//! the upgrade, then one task per connection that reads client frames,
//! writes queued frames (coalesced into one flush), pings every
//! `ping_interval` and drops peers silent for `idle_timeout`.
//!
//! The session owns the socket only; instances, captures and rooms live in
//! the hub, so a plugin reload does not touch them.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures_util::SinkExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::header_list;
use crate::auth::AuthError;
use crate::hub::{ConnHandle, Outbound, Protocol};
use crate::node::Node;
use crate::plugin::{ConnectRequest, DisconnectReason, InstanceRef, Payload};
use crate::protocol::misskey::{self, Addressing, ClientFrame};

/// Most frames written per flush.
const COALESCE: usize = 64;

/// The credential of a request: `?i=` first, then `Authorization: Bearer`.
fn token_of(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    let from_query = uri.query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "i")
            .map(|(_, v)| v.into_owned())
    });
    from_query.filter(|t| !t.is_empty()).or_else(|| {
        headers
            .get(axum::http::header::AUTHORIZATION)?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
    })
}

/// `GET /streaming`.
pub async fn handler(
    State(node): State<Arc<Node>>,
    ws: WebSocketUpgrade,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let token = token_of(&uri, &headers);
    let identity = match &token {
        None => None,
        Some(token) => match node.auth.authenticate(token).await {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::debug!("streaming auth refused: {e}");
                let status = match e {
                    AuthError::Suspended => StatusCode::FORBIDDEN,
                    AuthError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::UNAUTHORIZED,
                };
                return (
                    status,
                    axum::Json(serde_json::json!({"error": "authentication failed", "reason": e.to_string()})),
                )
                    .into_response();
            }
        },
    };
    let headers = header_list(&headers);
    let query = super::query_list(&uri, &["i"]);
    let credential: Option<Arc<str>> = token.map(Into::into);
    let max = node.config.misskey.max_frame_bytes;
    ws.read_buffer_size(1024)
        .write_buffer_size(0)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            let id = node.next_conn_id();
            let (conn, rx) =
                ConnHandle::new(id, Protocol::Misskey, identity, node.config.send_queue);
            node.open_conn(conn.clone());
            let session = Session {
                node: node.clone(),
                conn,
                headers,
                query,
                credential,
            };
            session.run(socket, rx).await;
            node.close_conn(id);
        })
}

struct Session {
    node: Arc<Node>,
    conn: Arc<ConnHandle>,
    headers: Arc<[(String, String)]>,
    query: Arc<[(String, String)]>,
    /// The token the stream authenticated with, for plugins.
    credential: Option<Arc<str>>,
}

enum End {
    /// The peer is gone or the socket failed: nothing more to send.
    Gone,
    /// Close with a code and reason.
    Close(u16, String),
}

impl Session {
    async fn run(&self, mut socket: WebSocket, mut rx: mpsc::Receiver<Outbound>) {
        let cfg = &self.node.config.misskey;
        let mut ping =
            tokio::time::interval_at(Instant::now() + cfg.ping_interval, cfg.ping_interval);
        let mut last_seen = Instant::now();
        let end = loop {
            tokio::select! {
                biased;
                _ = self.node.shutdown.cancelled() => break End::Close(1001, "server shutting down".into()),
                (code, reason) = self.conn.closed() => {
                    self.count_close(code);
                    break End::Close(code, reason);
                }
                msg = socket.recv() => match msg {
                    None => break End::Gone,
                    Some(Err(e)) => {
                        let e = e.to_string();
                        if e.contains("Message too long") || e.contains("Space limit") {
                            break End::Close(1009, "frame too large".into());
                        }
                        tracing::debug!(conn = self.conn.id, "streaming read error: {e}");
                        break End::Gone;
                    }
                    Some(Ok(m)) => {
                        last_seen = Instant::now();
                        match m {
                            Message::Text(t) => self.on_text(&t).await,
                            Message::Close(_) => break End::Gone,
                            Message::Binary(_) | Message::Ping(_) | Message::Pong(_) => {}
                        }
                    }
                },
                out = rx.recv() => {
                    let Some(out) = out else { break End::Gone };
                    // A peer that stops reading blocks the write; a close
                    // request (its queue overflowed) or shutdown cuts it short.
                    tokio::select! {
                        // A peer that takes no frame for the idle timeout is gone.
                        r = tokio::time::timeout(cfg.idle_timeout, self.write(&mut socket, out, &mut rx)) => {
                            if !matches!(r, Ok(Ok(()))) { break End::Gone }
                        }
                        (code, _) = self.conn.closed() => {
                            self.count_close(code);
                            break End::Gone;
                        }
                        _ = self.node.shutdown.cancelled() => break End::Gone,
                    }
                }
                _ = ping.tick() => {
                    if last_seen.elapsed() >= cfg.idle_timeout {
                        tracing::debug!(conn = self.conn.id, "peer silent too long; dropping");
                        break End::Close(1001, "idle timeout".into());
                    }
                    if socket.send(Message::Ping(Default::default())).await.is_err() {
                        break End::Gone;
                    }
                }
            }
        };
        if let End::Close(code, reason) = end {
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from(reason),
            };
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                socket.send(Message::Close(Some(frame))),
            )
            .await;
        }
    }

    fn count_close(&self, code: u16) {
        if code == crate::hub::SLOW_CONSUMER_CLOSE {
            self.node.metrics.slow_consumer_closes.inc();
        }
    }

    /// Writes one queued frame and whatever else is ready, then flushes once.
    async fn write(
        &self,
        socket: &mut WebSocket,
        first: Outbound,
        rx: &mut mpsc::Receiver<Outbound>,
    ) -> Result<(), axum::Error> {
        let mut n = 0u64;
        let mut next = Some(first);
        while let Some(out) = next.take() {
            if let Some(text) = self.frame(out) {
                socket.feed(Message::Text(text.into())).await?;
                n += 1;
            }
            if n < COALESCE as u64 {
                next = rx.try_recv().ok();
            }
        }
        socket.flush().await?;
        self.node.metrics.frames_sent.add(n);
        Ok(())
    }

    /// Frames a queued item for this connection; `None` if its instance
    /// ended while it was queued.
    fn frame(&self, out: Outbound) -> Option<String> {
        match out {
            Outbound::Text(t) => Some(t),
            Outbound::Binary(_) | Outbound::Gate(_) => None,
            Outbound::Event { slot, event } => {
                let addressing = if slot.is_capture() {
                    Addressing::NoteUpdated
                } else {
                    if !self.conn.has_instance(slot.id()) {
                        return None;
                    }
                    Addressing::Channel
                };
                Some(misskey::splice_event(
                    addressing,
                    slot.quoted(),
                    event.misskey_tail(),
                ))
            }
        }
    }

    async fn on_text(&self, text: &str) {
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
                if let Some(p) = node.plugins.plugin(&inst.plugin) {
                    let target = InstanceRef {
                        connection: self.conn.id,
                        id,
                    };
                    p.message(target, kind, Payload::json(body), None);
                }
            }
            ClientFrame::SubNote { id } => {
                node.hub
                    .capture(&self.conn, &id, node.config.misskey.max_captures);
            }
            ClientFrame::UnsubNote { id } => node.hub.uncapture(&self.conn, &id),
            ClientFrame::Other { kind, body } => {
                for p in node.plugins.frame_handlers(kind) {
                    p.frame(self.conn.id, kind.to_owned(), body.clone());
                }
            }
        }
    }

    async fn connect(&self, channel: String, id: String, params: String, pong: bool) {
        let node = &self.node;
        let conn = &self.conn;
        let Some((plugin, spec)) = node.plugins.channel(&channel) else {
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
        let (shared_open, count) = conn.with_state(|s| {
            (
                spec.shared && s.instances.values().any(|i| *i.channel == *channel),
                s.instances.len(),
            )
        });
        if shared_open {
            return;
        }
        let replaced = node
            .close_instance(conn, &id, DisconnectReason::Replaced, true)
            .is_some();
        if !replaced && count >= node.config.misskey.max_channels {
            tracing::debug!(
                conn = conn.id,
                channel,
                "channel limit reached; connect ignored"
            );
            return;
        }
        node.open_instance(conn, &id, &plugin.name, &channel);
        let req = ConnectRequest {
            target: InstanceRef {
                connection: conn.id,
                id: id.clone(),
            },
            protocol: Protocol::Misskey,
            channel: channel.clone(),
            params,
            identity: conn.identity().cloned(),
            headers: self.headers.clone(),
            query: self.query.clone(),
            credential: self.credential.clone(),
        };
        match plugin.connect(req).await {
            Ok(Ok(())) => {
                if pong {
                    conn.push(Outbound::Text(misskey::encode_connected(&id)));
                }
            }
            Ok(Err(rej)) => {
                tracing::debug!(
                    conn = conn.id,
                    channel,
                    "connect refused by plugin: {}",
                    rej.message
                );
                node.close_instance(conn, &id, DisconnectReason::Server, false);
            }
            Err(e) => {
                tracing::debug!(conn = conn.id, channel, "connect failed: {e}");
                node.close_instance(conn, &id, DisconnectReason::Server, false);
            }
        }
    }
}
