//! Connection state recovery (`[socketio.recovery]`, socket.io's
//! `connectionStateRecovery`): the sessions of Socket.IO sockets that lost
//! their connection, and the history of the rooms such sockets are in.
//!
//! A socket of a namespace whose plugin has `recover` (WIT 0.3.0) gets a
//! private id (`pid`, in its CONNECT reply) and a *recorded* slot: every
//! event published to one of its rooms is numbered (its *offset*, the
//! last argument of the EVENT the socket gets), kept in that room's
//! history, and delivered in offset order — numbering, recording and
//! delivery happen under one sequencer, so the offsets a socket receives
//! only grow and "after offset X" means exactly what it did not get. A
//! plugin's `emit`/`send` to a recorded socket is published to the
//! socket's id, a room only it is in, so it is recorded too; acks are not.
//!
//! When such a socket loses its connection (transport closed or failed,
//! ping timeout, host shutting down: socket.io's recoverable reasons; not
//! a client's own DISCONNECT or close), its [`Session`] is kept for
//! `max_disconnection_ms`: pid, socket id, namespace, rooms, identity and
//! the plugin's attribute sets. A CONNECT with `auth: {pid, offset}`
//! within that window takes the session back: the host restores it on
//! the new connection, reads what its rooms got after the offset (after
//! `since`, the offset when the socket first connected, when the client
//! got nothing yet and sends no offset), tells the plugin (`recover`) and
//! replays that before anything newer.
//!
//! Histories are bounded by time (`max_disconnection_ms`) and by
//! `history_per_room`; a room whose history was cut by the cap remembers
//! the last offset it lost, and a session that would need it connects as
//! new (counted) instead of missing events silently.
//!
//! Two sides of one trait, one file each: [`MemoryRecovery`] (one node:
//! the sequencer is a lock on this node) and [`RedisRecovery`]
//! (`[cluster]`: sessions, histories and the offset counter live in Redis;
//! the cluster broker numbers, records and publishes in one script, so
//! every node delivers in offset order and a socket whose node died
//! recovers on another).

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::broker::Publication;

mod memory;
pub mod redis;

pub use self::memory::MemoryRecovery;
pub use self::redis::RedisRecovery;

/// Whether an engine.io session that ended for `reason` (as
/// [`crate::server::engineio`] names it) keeps its sockets' sessions:
/// socket.io's `RECOVERABLE_DISCONNECT_REASONS`. An engine.io close packet
/// from the client counts as a `transport close` there (socket.io-client
/// sends one over polling when its transport fails); a client that leaves
/// on purpose sends a Socket.IO DISCONNECT first, which ends the socket
/// before.
pub fn recoverable(reason: &str) -> bool {
    matches!(
        reason,
        "transport close"
            | "transport error"
            | "ping timeout"
            | "server shutting down"
            | "client closed the session"
    )
}

/// The offset as the client sees it (the last argument of an EVENT).
pub fn offset_text(offset: u64) -> String {
    offset.to_string()
}

/// An offset a client sent back; None if it is not one of ours.
pub fn parse_offset(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// The identity a session keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptIdentity {
    pub user_id: String,
    /// JSON text.
    pub claims: String,
}

/// A disconnected socket, kept for `max_disconnection_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub pid: String,
    pub sid: String,
    pub nsp: String,
    /// The plugin that served it (a session is only taken back by it).
    pub plugin: String,
    /// Its connection id before (the plugin's `previous` instance).
    pub connection: u64,
    /// Its rooms, its own id included.
    pub rooms: Vec<String>,
    pub identity: Option<KeptIdentity>,
    /// The plugin's attribute sets on the connection.
    pub attributes: Vec<(String, Vec<String>)>,
    /// The offset when the socket first connected.
    pub since: u64,
    /// When it lost its connection (ms since the epoch).
    pub disconnected_at: u64,
}

/// How [`Recovery::keep`] writes a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    /// Written whatever is kept; false: it replaces only a session its
    /// own connection wrote, or one that is gone without having been
    /// taken (a Redis that lost it) — a session taken meanwhile by a
    /// recovery elsewhere is not brought back, nor overwritten.
    pub create: bool,
    /// The socket is still connected and its session is written again
    /// every this long: it is kept that much longer than the window, so a
    /// client whose node died between two writes still has the whole
    /// window to come back.
    pub rewritten_every: Option<std::time::Duration>,
}

impl Keep {
    /// A socket that lost its connection just now.
    pub const LOST: Keep = Keep {
        create: true,
        rewritten_every: None,
    };
}

/// An event a session missed.
#[derive(Debug, Clone)]
pub struct Missed {
    pub offset: u64,
    pub publication: Publication,
}

/// What a restored session missed.
#[derive(Debug, Default)]
pub struct History {
    /// In offset order, each once.
    pub missed: Vec<Missed>,
    /// The newest offset when it was read: live events up to it were read
    /// here, and are not delivered twice.
    pub head: u64,
}

/// Why a CONNECT with a pid connects as a new socket; each is counted
/// (`chanhost_socketio_recovery_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no session with this pid (never kept, taken, or expired)")]
    Unknown,
    #[error("the session belongs to another namespace or plugin")]
    Elsewhere,
    #[error("the offset is not one this host gave")]
    Offset,
    #[error("a room's history was cut short after the offset")]
    Cut,
    #[error("the cluster's Redis cannot be reached")]
    Down,
}

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Unknown => "unknown",
            Refusal::Elsewhere => "elsewhere",
            Refusal::Offset => "bad_offset",
            Refusal::Cut => "history_cut",
            Refusal::Down => "redis_down",
        }
    }
}

/// Where sessions and histories live. The futures own what they need
/// (they may outlive the call, e.g. a session kept while its connection
/// is being forgotten).
pub trait Recovery: Send + Sync {
    /// Numbers, records and delivers a publication to a recorded room
    /// while holding the sequencer; false when this side does not number
    /// on this node (the cluster's broker does, in Redis), and `deliver`
    /// was not called.
    fn sequence(&self, p: &Publication, deliver: &mut dyn FnMut(&Publication)) -> bool;
    /// Whether publications to `room` are recorded.
    fn records(&self, room: &str) -> bool;
    /// A recorded socket joined `room`: record it from now on (and for
    /// `max_disconnection_ms` after its last such member left).
    fn mark(&self, room: &str);
    /// The newest offset (None when it cannot be read now).
    fn head(&self) -> BoxFuture<'static, Option<u64>>;
    /// Keeps a session for `max_disconnection_ms` (see [`Keep`]).
    fn keep(&self, s: Session, how: Keep) -> BoxFuture<'static, ()>;
    /// Forgets a session (its socket ended for good) — if it is still
    /// the one `connection` wrote: a session taken back on another
    /// connection (or node) is that one's now.
    fn forget(&self, pid: &str, connection: u64) -> BoxFuture<'static, ()>;
    /// Whether sessions are kept while their sockets are connected too
    /// (and kept current as they join and leave rooms): the cluster's, so
    /// that a node's death loses none. The memory side keeps them from
    /// the disconnection on.
    fn keeps_connected(&self) -> bool {
        false
    }
    /// Takes a session back (it is gone from the store afterwards).
    fn take(&self, pid: &str) -> BoxFuture<'static, Result<Session, Refusal>>;
    /// What `rooms` got after offset `after`, read once the socket is back
    /// in them.
    fn missed(&self, rooms: &[String], after: u64) -> BoxFuture<'static, Result<History, Refusal>>;
    /// Forgets what is past the window; keeps marks of rooms that still
    /// have a recorded member here (`has_member`).
    fn sweep(&self, has_member: &dyn Fn(&str) -> bool);
    /// (sessions kept, history entries kept) on this side, for metrics.
    fn sizes(&self) -> (usize, usize);
}

/// Shared by both sides: the metrics of recovery.
#[derive(Debug, Default)]
pub struct RecoveryCounters {
    /// Entries dropped from a history by its cap while younger than the
    /// window.
    pub cut: std::sync::atomic::AtomicU64,
}

/// A kept history's entries dropped because of the cap are counted here.
pub type Counters = Arc<RecoveryCounters>;
