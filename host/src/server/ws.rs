//! The WebSocket transport of both protocols: the HTTP/1.1 upgrade
//! ([`Upgrade`]) and a socket whose frames to the client can be written
//! from any thread ([`Wire`]) while the session task reads.
//!
//! Fan-out is the hot path: a room event reaches each member by framing it
//! and writing it to that member's socket right away, on the thread that
//! delivers the event — no queue, no task wake-up, one system call per
//! frame. Only what the kernel does not take at once is kept, in the
//! wire's pending buffer, and written by the session task when the socket
//! becomes writable; frames arriving meanwhile are appended behind it, so
//! order is kept. The pending buffer is bounded in frames and in bytes
//! (`[limits] send_queue`, `send_queue_bytes`): a peer that stops reading
//! overflows it and is closed as a slow consumer. One frame larger than the
//! byte bound is still taken while nothing else is pending.
//!
//! Reading (frame parsing, unmasking, fragments, control frames, size
//! limits) is tungstenite's, over [`WireIo`]; what tungstenite writes itself
//! (pongs, the close frame) goes through the same pending buffer, in order.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use crate::hub::{Deferred, QueueFull, QueueLimits, WriteBatch};

pub use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
pub use tokio_tungstenite::tungstenite::protocol::CloseFrame;
pub use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// The read side of an upgraded connection (tungstenite over the wire).
pub type Socket = WebSocketStream<WireIo>;

/// WebSocket opcodes the host writes itself.
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;

/// The close code RFC 6455 §7.4.1 gives a read error, if the peer is to be
/// told: 1009 for a message over the size limit, 1007 for a text message
/// that is not UTF-8, 1002 for a protocol violation (reserved bits set
/// without an extension, a reserved opcode, a bad fragment, an unmasked
/// frame). None when the connection itself failed.
pub fn close_code_of(e: &WsError) -> Option<u16> {
    match e {
        WsError::Capacity(_) => Some(1009),
        WsError::Utf8(_) => Some(1007),
        // The TCP connection ended without a close frame: the network or
        // the peer went away (socket.io's "transport close"), not a
        // forbidden frame.
        WsError::Protocol(
            tokio_tungstenite::tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => None,
        WsError::Protocol(_) => Some(1002),
        _ => None,
    }
}

/// What a read from a client's socket brought, as both protocols' read
/// loops take it.
#[derive(Debug)]
pub enum Incoming {
    Text(tokio_tungstenite::tungstenite::Utf8Bytes),
    Binary(axum::body::Bytes),
    /// A ping or a pong (tungstenite answers pings): the peer is alive.
    Control,
    /// The peer closed, or the connection failed: nothing more is sent.
    Gone,
    /// A frame RFC 6455 forbids: close with this code ([`close_code_of`]).
    Invalid(u16),
}

/// Reads the next message.
pub async fn read(socket: &mut Socket) -> Incoming {
    use futures_util::StreamExt;
    match socket.next().await {
        Some(Ok(Message::Text(t))) => Incoming::Text(t),
        Some(Ok(Message::Binary(b))) => Incoming::Binary(b),
        Some(Ok(Message::Close(_))) | None => Incoming::Gone,
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Incoming::Control,
        Some(Err(e)) => {
            tracing::trace!("websocket read error: {e}");
            close_code_of(&e).map_or(Incoming::Gone, Incoming::Invalid)
        }
    }
}

/// Why a request could not be upgraded (the status of each refusal is the
/// one the WebSocket RFC suggests).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UpgradeError {
    #[error("WebSocket upgrades must use GET")]
    MethodNotGet,
    #[error("the Connection header does not include `upgrade`")]
    ConnectionHeader,
    #[error("the Upgrade header is not `websocket`")]
    UpgradeHeader,
    #[error("Sec-WebSocket-Version must be 13")]
    Version,
    #[error("Sec-WebSocket-Key is missing")]
    KeyMissing,
    #[error("this connection cannot be upgraded")]
    NotUpgradable,
}

impl UpgradeError {
    pub fn status(&self) -> StatusCode {
        match self {
            UpgradeError::MethodNotGet => StatusCode::METHOD_NOT_ALLOWED,
            UpgradeError::NotUpgradable => StatusCode::UPGRADE_REQUIRED,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

impl IntoResponse for UpgradeError {
    fn into_response(self) -> Response {
        (self.status(), self.to_string()).into_response()
    }
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Upgraded connections open in this process: each holds its socket after
/// the HTTP connection it came from has ended, so the accept loop counts
/// them against the open-file limit besides the HTTP connections.
static UPGRADED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Sockets held by upgraded (WebSocket) connections of this process.
pub fn upgraded_sockets() -> usize {
    UPGRADED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Counts one upgraded socket until dropped.
struct UpgradedSocket;

impl UpgradedSocket {
    fn new() -> Self {
        UPGRADED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        UpgradedSocket
    }
}

impl Drop for UpgradedSocket {
    fn drop(&mut self) {
        UPGRADED.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The `Sec-WebSocket-Accept` value for a key (RFC 6455 §4.2.2), as
/// tungstenite derives it.
pub fn accept_key(key: &[u8]) -> String {
    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key)
}

/// A validated upgrade request.
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: hyper::upgrade::OnUpgrade,
    config: WebSocketConfig,
    /// What is kept for a peer that does not read fast enough.
    pending: QueueLimits,
}

impl Upgrade {
    /// Checks the handshake headers and takes the connection's upgrade.
    pub fn from_parts(parts: &mut Parts) -> Result<Self, UpgradeError> {
        if parts.method != Method::GET {
            return Err(UpgradeError::MethodNotGet);
        }
        if !header_has_token(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(UpgradeError::ConnectionHeader);
        }
        if !header_has_token(&parts.headers, header::UPGRADE, "websocket") {
            return Err(UpgradeError::UpgradeHeader);
        }
        if parts
            .headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(UpgradeError::Version);
        }
        let key = parts
            .headers
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or(UpgradeError::KeyMissing)?
            .clone();
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or(UpgradeError::NotUpgradable)?;
        Ok(Self {
            key,
            on_upgrade,
            config: WebSocketConfig::default(),
            pending: QueueLimits::default(),
        })
    }

    /// Small read buffer (it grows for larger frames), no write buffer (the
    /// wire keeps what the kernel does not take), frame and message limits.
    pub fn limits(mut self, max_message: usize, pending: QueueLimits) -> Self {
        self.config = WebSocketConfig::default()
            .read_buffer_size(1024)
            .write_buffer_size(0)
            .max_write_buffer_size(usize::MAX)
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        self.pending = pending;
        self
    }

    /// The `101 Switching Protocols` response; once the client has it,
    /// `callback` runs with the socket and its wire. `failed` runs instead
    /// if the connection never upgrades.
    pub fn on_upgrade<C, Fut>(self, callback: C, failed: impl FnOnce() + Send + 'static) -> Response
    where
        C: FnOnce(Socket, Arc<Wire>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let Upgrade {
            key,
            on_upgrade,
            config,
            pending,
        } = self;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!("websocket upgrade failed: {e}");
                    failed();
                    return;
                }
            };
            let _counted = UpgradedSocket::new();
            let parts = match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(p) => p,
                Err(_) => {
                    tracing::error!("websocket upgrade: not a TCP connection");
                    failed();
                    return;
                }
            };
            // Bytes the client sent after its request, copied: the buffer
            // they sit in is hyper's whole read buffer, not kept per session.
            let hyper::upgrade::Parts { io, read_buf, .. } = parts;
            let early = read_buf.to_vec();
            drop(read_buf);
            let wire = Arc::new(Wire::new(io.into_inner(), pending));
            let socket = WebSocketStream::from_partially_read(
                WireIo(wire.clone()),
                early,
                Role::Server,
                Some(config),
            )
            .await;
            callback(socket, wire.clone()).await;
            wire.close();
        });
        let mut r = StatusCode::SWITCHING_PROTOCOLS.into_response();
        let h = r.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(v) = HeaderValue::from_str(&accept_key(key.as_bytes())) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        r
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Upgrade {
    type Rejection = UpgradeError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Upgrade::from_parts(parts)
    }
}

#[derive(Default)]
struct Pending {
    /// Bytes the kernel did not take yet, in order.
    buf: Vec<u8>,
    /// Frames appended since the buffer was last empty.
    frames: usize,
    /// The socket failed or the session ended: writes are dropped.
    closed: bool,
    /// Registered with the thread's write batch, to be written at its end.
    deferred: bool,
    /// The last write batch that wrote to this wire.
    batch: u64,
}

/// The write side of a WebSocket connection, shareable across threads.
pub struct Wire {
    stream: TcpStream,
    pending: Mutex<Pending>,
    /// Tells the session task there is something to flush (or the wire
    /// closed).
    flush_wanted: Notify,
    limits: QueueLimits,
}

/// The frame's pieces as slices for one vectored write (empty parts
/// skipped); None if there are more than `slices` holds.
fn gather<'a>(
    head: &'a [u8],
    parts: &[&'a [u8]],
    slices: &'a mut [IoSlice<'a>; 6],
) -> Option<&'a [IoSlice<'a>]> {
    slices[0] = IoSlice::new(head);
    let mut n = 1;
    for part in parts.iter().filter(|p| !p.is_empty()) {
        *slices.get_mut(n)? = IoSlice::new(part);
        n += 1;
    }
    Some(&slices[..n])
}

/// Appends the pieces to `buf`, less their first `skip` bytes (written).
fn keep(buf: &mut Vec<u8>, pieces: &[IoSlice<'_>], mut skip: usize) {
    for s in pieces {
        if skip >= s.len() {
            skip -= s.len();
            continue;
        }
        buf.extend_from_slice(&s[skip..]);
        skip = 0;
    }
}

/// Encodes a server frame header (final fragment, unmasked).
fn frame_header(opcode: u8, len: usize, out: &mut [u8; 10]) -> usize {
    out[0] = 0x80 | opcode;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= 0xFFFF {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

impl Wire {
    pub fn new(stream: TcpStream, limits: QueueLimits) -> Self {
        let _ = stream.set_nodelay(true);
        Self {
            stream,
            pending: Mutex::new(Pending::default()),
            flush_wanted: Notify::new(),
            limits: QueueLimits {
                frames: limits.frames.max(1),
                bytes: limits.bytes.max(1),
            },
        }
    }

    /// Whether `more` bytes may join what is pending.
    fn over(&self, p: &Pending, more: usize) -> bool {
        p.frames >= self.limits.frames || p.buf.len().saturating_add(more) > self.limits.bytes
    }

    /// Writes one frame whose payload is the concatenation of `parts`: now
    /// if the socket takes it, else behind what is pending. Writes to a
    /// closed wire are dropped silently (the session is ending).
    pub fn send(self: &Arc<Self>, opcode: u8, parts: &[&[u8]]) -> Result<(), QueueFull> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut head = [0u8; 10];
        let hl = frame_header(opcode, len, &mut head);
        let mut slices = [IoSlice::new(&[]); 6];
        let Some(pieces) = gather(&head[..hl], parts, &mut slices) else {
            // More parts than slices (not done by the host): kept whole.
            return self.keep_all(&head[..hl], parts);
        };
        let mut p = self.pending.lock();
        if p.closed {
            return Ok(());
        }
        if !p.buf.is_empty() {
            if self.over(&p, hl + len) {
                return Err(QueueFull);
            }
            p.frames += 1;
            keep(&mut p.buf, pieces, 0);
            return Ok(());
        }
        if let Some(batch) = WriteBatch::current() {
            if p.batch == batch {
                // A second frame in this batch: kept, with whatever follows,
                // for one write at the end of the batch.
                keep(&mut p.buf, pieces, 0);
                p.frames = 1;
                p.deferred = true;
                drop(p);
                WriteBatch::defer(self.clone());
                return Ok(());
            }
            p.batch = batch;
        }
        let skip = match self.send_now(pieces) {
            Ok(w) if w == hl + len => return Ok(()),
            Ok(w) => w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => {
                tracing::trace!("websocket write failed: {e}");
                p.closed = true;
                drop(p);
                self.flush_wanted.notify_one();
                return Ok(());
            }
        };
        keep(&mut p.buf, pieces, skip);
        p.frames = 1;
        drop(p);
        self.flush_wanted.notify_one();
        Ok(())
    }

    /// The slow path of a frame with too many parts for one vectored write.
    fn keep_all(self: &Arc<Self>, head: &[u8], parts: &[&[u8]]) -> Result<(), QueueFull> {
        let mut whole = head.to_vec();
        parts.iter().for_each(|p| whole.extend_from_slice(p));
        self.send_raw(&whole).map_err(|_| QueueFull)
    }

    /// One non-blocking `sendmsg` (cheaper than `writev`, which takes the
    /// file position lock), straight to the socket: for writes while nothing
    /// is pending, when the socket is almost always writable. A `WouldBlock`
    /// here leaves tokio's readiness as it was; the flush that follows
    /// clears it through [`Wire::try_send`] before it waits.
    fn send_now(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        socket2::SockRef::from(&self.stream).send_vectored(slices)
    }

    /// [`Wire::send_now`] through tokio's readiness: `WouldBlock` clears it,
    /// so waiting for `writable` waits for the kernel.
    fn try_send(&self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        self.stream.try_io(tokio::io::Interest::WRITABLE, || {
            socket2::SockRef::from(&self.stream).send_vectored(slices)
        })
    }

    /// Appends bytes already framed (tungstenite's own writes).
    fn send_raw(&self, data: &[u8]) -> io::Result<()> {
        let mut p = self.pending.lock();
        if p.closed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if p.buf.is_empty() {
            match self.send_now(&[IoSlice::new(data)]) {
                Ok(n) if n == data.len() => return Ok(()),
                Ok(n) => p.buf.extend_from_slice(&data[n..]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => p.buf.extend_from_slice(data),
                Err(e) => {
                    p.closed = true;
                    return Err(e);
                }
            }
        } else {
            if self.over(&p, data.len()) {
                // The peer reads nothing of what it asks for (pongs).
                return Err(io::ErrorKind::WouldBlock.into());
            }
            p.buf.extend_from_slice(data);
        }
        p.frames += 1;
        drop(p);
        self.flush_wanted.notify_one();
        Ok(())
    }

    /// Bounds of what may be pending.
    pub fn limits(&self) -> QueueLimits {
        self.limits
    }

    /// Wakes the session task as if something were pending (it flushes,
    /// then looks at what else waits).
    pub fn wake(&self) {
        self.flush_wanted.notify_one();
    }

    /// Resolves when there is something to flush, or the wire closed.
    pub async fn wants_flush(&self) {
        self.flush_wanted.notified().await
    }

    /// Writes what is pending, waiting for the socket as needed. Fails once
    /// the socket does.
    pub async fn flush(&self) -> io::Result<()> {
        loop {
            {
                let mut p = self.pending.lock();
                if p.closed {
                    return Err(io::ErrorKind::BrokenPipe.into());
                }
                if p.buf.is_empty() {
                    return Ok(());
                }
                match self.try_send(&[IoSlice::new(&p.buf)]) {
                    Ok(n) => {
                        p.buf.drain(..n);
                        if p.buf.is_empty() {
                            // Freed: most connections never pend again.
                            p.frames = 0;
                            p.buf = Vec::new();
                            return Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        p.closed = true;
                        return Err(e);
                    }
                }
            }
            self.stream.writable().await?;
        }
    }

    /// Sends a close frame after what is pending and waits (up to a
    /// second) for it to leave. Written here rather than through
    /// tungstenite, whose state may be failed after a protocol error.
    /// Without a code the frame is empty (the peer sees 1005).
    pub async fn send_close(self: &Arc<Self>, code: Option<u16>, reason: &str) {
        let sent = match code {
            Some(code) => {
                // A control frame's payload is at most 125 bytes.
                let reason = &reason.as_bytes()[..reason.len().min(123)];
                self.send(OP_CLOSE, &[&code.to_be_bytes(), reason])
            }
            None => self.send(OP_CLOSE, &[]),
        };
        if sent.is_err() {
            return;
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.flush()).await;
    }

    /// Whether the socket failed or the session ended.
    pub fn is_closed(&self) -> bool {
        self.pending.lock().closed
    }

    /// Ends the wire: later writes are dropped, the pending bytes freed and
    /// the connection shut down.
    pub fn close(&self) {
        let mut p = self.pending.lock();
        p.closed = true;
        p.buf = Vec::new();
        drop(p);
        let _ = socket2::SockRef::from(&self.stream).shutdown(std::net::Shutdown::Both);
        self.flush_wanted.notify_one();
    }
}

impl Deferred for Wire {
    fn release(&self) {
        let mut p = self.pending.lock();
        p.deferred = false;
        if p.closed || p.buf.is_empty() {
            return;
        }
        match self.send_now(&[IoSlice::new(&p.buf)]) {
            Ok(n) if n == p.buf.len() => {
                p.frames = 0;
                p.buf = Vec::new();
                return;
            }
            Ok(n) => {
                p.buf.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => p.closed = true,
        }
        // The rest (or the failure) is the session's.
        drop(p);
        self.flush_wanted.notify_one();
    }
}

/// The wire as tungstenite's byte stream: reads from the socket, writes
/// through the pending buffer.
pub struct WireIo(Arc<Wire>);

impl AsyncRead for WireIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            std::task::ready!(self.0.stream.poll_read_ready(cx))?;
            let dst = buf.initialize_unfilled();
            match self.0.stream.try_read(dst) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for WireIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(self.0.send_raw(data).map(|()| data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // What the kernel did not take is the session's to flush.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_of_the_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn frame_headers_by_length() {
        let mut h = [0u8; 10];
        assert_eq!(frame_header(OP_TEXT, 5, &mut h), 2);
        assert_eq!(&h[..2], &[0x81, 5]);
        assert_eq!(frame_header(OP_BINARY, 300, &mut h), 4);
        assert_eq!(&h[..4], &[0x82, 126, 1, 44]);
        assert_eq!(frame_header(OP_TEXT, 70_000, &mut h), 10);
        assert_eq!(&h[..10], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
    }

    /// A client socket and the server's wire to it.
    async fn pair(frames: usize, bytes: usize) -> (TcpStream, Arc<Wire>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (
            client,
            Arc::new(Wire::new(server, QueueLimits { frames, bytes })),
        )
    }

    #[tokio::test]
    async fn a_batch_writes_a_connection_s_first_frame_at_once_and_the_rest_at_its_end() {
        let (client, wire) = pair(16, 1 << 20).await;
        {
            let _batch = WriteBatch::begin();
            wire.send(OP_TEXT, &[b"a"]).unwrap();
            wire.send(OP_TEXT, &[b"b"]).unwrap();
            wire.send(OP_TEXT, &[b"c"]).unwrap();
            // Only the first went out; the others wait for the batch.
            assert_eq!(wire.pending.lock().buf, b"\x81\x01b\x81\x01c");
        }
        assert!(wire.pending.lock().buf.is_empty());
        let mut got = [0u8; 9];
        tokio::io::AsyncReadExt::read_exact(&mut { client }, &mut got)
            .await
            .unwrap();
        assert_eq!(&got, b"\x81\x01a\x81\x01b\x81\x01c");
    }

    #[tokio::test]
    async fn frames_wait_behind_pending_bytes_and_overflow_past_the_limit() {
        let (client, wire) = pair(4, 64 << 20).await;
        // The client does not read: fill the socket buffers until frames pend.
        let big = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        while wire.pending.lock().buf.is_empty() {
            wire.send(OP_BINARY, &[&big]).unwrap();
            sent += 1;
        }
        for _ in 0..3 {
            wire.send(OP_TEXT, &[b"later"]).unwrap();
        }
        assert_eq!(wire.send(OP_TEXT, &[b"too many"]), Err(QueueFull));
        // The client reads everything: every frame arrives whole, in order.
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut client = client;
            let mut all = Vec::new();
            let want = sent * (big.len() + 10) + 3 * 7;
            while all.len() < want {
                let mut chunk = vec![0u8; 65536];
                let n = client.read(&mut chunk).await.unwrap();
                assert!(n > 0);
                all.extend_from_slice(&chunk[..n]);
            }
            all
        });
        wire.flush().await.unwrap();
        // Lost bytes would leave the reader waiting: a bounded wait fails instead.
        let all = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .expect("every byte arrives")
            .unwrap();
        assert!(all.ends_with(b"\x81\x05later\x81\x05later\x81\x05later"));
        assert_eq!(&all[..2], &[0x82, 127]);
        wire.close();
        assert!(wire.is_closed());
        assert_eq!(wire.send(OP_TEXT, &[b"dropped"]), Ok(()));
    }

    #[tokio::test]
    async fn pending_bytes_are_bounded_whatever_the_frame_count() {
        let (_client, wire) = pair(1024, 256 << 10).await;
        let big = vec![b'x'; 64 * 1024];
        // Until the socket buffers are full, the kernel takes every frame.
        while wire.pending.lock().buf.is_empty() {
            wire.send(OP_BINARY, &[&big]).unwrap();
        }
        let mut queued = 0;
        let refused = loop {
            match wire.send(OP_BINARY, &[&big]) {
                Ok(()) => queued += 1,
                Err(e) => break e,
            }
            assert!(queued < 100, "never refused");
        };
        assert_eq!(refused, QueueFull);
        let held = wire.pending.lock().buf.len();
        assert!(held <= 256 << 10, "{held} bytes pending");
        // Frames far below the frame bound: it was the bytes that counted.
        assert!(queued < 8, "{queued}");
    }

    #[tokio::test]
    async fn one_frame_larger_than_the_byte_bound_still_goes_out_alone() {
        let (client, wire) = pair(1024, 64 << 10).await;
        let huge = vec![b'y'; 1 << 20];
        wire.send(OP_BINARY, &[&huge]).unwrap();
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut client = client;
            let mut all = vec![0u8; huge.len() + 10];
            client.read_exact(&mut all).await.unwrap();
            all
        });
        wire.flush().await.unwrap();
        let all = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .expect("the frame arrives")
            .unwrap();
        assert!(all[10..].iter().all(|b| *b == b'y'));
    }
}
