//! Per-connection state shared between the connection's session task, the
//! hub and plugin host calls: identity, the bounded outbound queue, open
//! channel instances and room memberships.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{mpsc, Notify};

use super::SharedEvent;
use crate::auth::Identity;
use crate::protocol::json_string;

/// Close code for a connection whose send queue overflowed (policy violation).
pub const SLOW_CONSUMER_CLOSE: u16 = 1008;

/// A connection id, unique for the life of the process.
pub type ConnId = u64;

/// The wire protocol of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Misskey,
    SocketIo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SlotKind {
    Instance,
    Capture,
    Stream,
}

#[derive(Debug)]
struct SlotInner {
    kind: SlotKind,
    id: Arc<str>,
    quoted: Arc<str>,
    /// Cleared when the instance ends: events still on their way to it are
    /// dropped without looking the instance up.
    open: AtomicBool,
    /// A Socket.IO socket with connection state recovery: its events
    /// carry their offset, and the rooms it joins are recorded.
    recorded: bool,
}

/// What receives events on a connection: a channel instance (by its id), a
/// note capture (by the note id) or the connection itself (by a name). Carries the id pre-quoted as JSON so
/// per-recipient framing is a splice.
#[derive(Debug, Clone)]
pub struct Slot(Arc<SlotInner>);

impl Slot {
    fn new(kind: SlotKind, id: &str, recorded: bool) -> Self {
        Slot(Arc::new(SlotInner {
            kind,
            id: id.into(),
            quoted: json_string(id).into(),
            open: AtomicBool::new(true),
            recorded,
        }))
    }
    /// A channel instance slot.
    pub fn instance(id: &str) -> Self {
        Self::new(SlotKind::Instance, id, false)
    }
    /// The slot of a Socket.IO socket whose connection state is recovered
    /// (`[socketio.recovery]`): its events carry offsets, its rooms keep
    /// a history.
    pub fn recorded_socket(nsp: &str) -> Self {
        Self::new(SlotKind::Instance, nsp, true)
    }
    /// Whether events to this slot carry offsets and its rooms are recorded.
    pub fn is_recorded(&self) -> bool {
        self.0.recorded
    }
    /// A note capture slot.
    pub fn capture(note_id: &str) -> Self {
        Self::new(SlotKind::Capture, note_id, false)
    }
    /// The connection itself, for events its protocol frames at the top
    /// level (Misskey's `broadcast`: `{"type":..,"body":..}`).
    pub fn stream(name: &str) -> Self {
        Self::new(SlotKind::Stream, name, false)
    }
    pub fn id(&self) -> &str {
        &self.0.id
    }
    /// The id as a JSON string literal.
    pub fn quoted(&self) -> &str {
        &self.0.quoted
    }
    pub fn is_capture(&self) -> bool {
        self.0.kind == SlotKind::Capture
    }
    pub fn is_stream(&self) -> bool {
        self.0.kind == SlotKind::Stream
    }
    /// Whether the instance (or capture) still receives events.
    pub fn is_open(&self) -> bool {
        self.0.open.load(Ordering::Acquire)
    }
    /// Marks the instance ended.
    pub fn close(&self) {
        self.0.open.store(false, Ordering::Release);
    }
}

impl PartialEq for Slot {
    fn eq(&self, o: &Self) -> bool {
        self.0.kind == o.0.kind && self.0.id == o.0.id
    }
}
impl Eq for Slot {}
impl Hash for Slot {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.kind.hash(h);
        self.0.id.hash(h);
    }
}

/// Something queued for a connection's writer.
#[derive(Debug)]
pub enum Outbound {
    /// A complete text frame, already framed by the protocol side.
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
    /// A room event for one slot; the writer frames it for its protocol.
    Event { slot: Slot, event: Arc<SharedEvent> },
    /// The reply to a client's opening of an instance, for protocols whose
    /// writer holds that instance's events until it (boxed: rare, and the
    /// queue's slots are sized by the largest variant).
    Gate(Box<Gate>),
    /// A plugin's acknowledgement of a client message (boxed: rare).
    Ack(Box<Ack>),
    /// The server ended an instance (its id); the writer tells the client
    /// if its protocol has a frame for it.
    Ended(Arc<str>),
}

/// A plugin's acknowledgement of a client message, or (`asks`) an event
/// asking the client for one: a packet whose attachments must follow it
/// unbroken.
#[derive(Debug)]
pub struct Ack {
    /// The instance the message came to (or goes to).
    pub instance: Arc<str>,
    /// The client's ack id (or the one asked for).
    pub id: u64,
    /// An EVENT asking for ack `id` (its args start with the event name),
    /// not the ACK of the client's message `id`.
    pub asks: bool,
    /// The reply's arguments, a JSON array (with placeholders for
    /// attachments).
    pub args: String,
    pub attachments: Vec<Vec<u8>>,
}

impl Outbound {
    /// About how many bytes this item takes once framed, for the byte bound
    /// of a connection's queue.
    pub fn weight(&self) -> usize {
        match self {
            Outbound::Text(t) => t.len(),
            Outbound::Binary(b) => b.len(),
            Outbound::Event { slot, event } => slot.id().len() + event.weight(),
            Outbound::Gate(g) => g.text.len(),
            Outbound::Ack(a) => {
                a.instance.len() + a.args.len() + a.attachments.iter().map(Vec::len).sum::<usize>()
            }
            Outbound::Ended(id) => id.len(),
        }
    }
}

/// Bounds of what a connection may have waiting for its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Items (frames) waiting.
    pub frames: usize,
    /// Bytes waiting.
    pub bytes: usize,
}

impl QueueLimits {
    /// The `[limits] send_queue` / `send_queue_bytes` of a config.
    pub fn of(limits: &crate::config::LimitsConfig) -> Self {
        Self {
            frames: limits.send_queue,
            bytes: limits.send_queue_bytes,
        }
    }

    /// A frame bound with the default byte bound.
    pub fn frames(frames: usize) -> Self {
        Self {
            frames,
            ..Self::default()
        }
    }
}

impl Default for QueueLimits {
    fn default() -> Self {
        Self::of(&crate::config::LimitsConfig::default())
    }
}

/// The receiving end of a connection's queue (polling transports); gives
/// back the bytes of each item it hands out.
#[derive(Debug)]
pub struct OutboundRx {
    rx: mpsc::Receiver<Outbound>,
    bytes: Arc<AtomicUsize>,
}

impl OutboundRx {
    fn taken(&self, item: Outbound) -> Outbound {
        self.bytes.fetch_sub(item.weight(), Ordering::Relaxed);
        item
    }

    /// The next item, waiting for one; None once the connection is gone.
    pub async fn recv(&mut self) -> Option<Outbound> {
        let item = self.rx.recv().await?;
        Some(self.taken(item))
    }

    /// The next item if one is waiting.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        let item = self.rx.try_recv().ok()?;
        Some(self.taken(item))
    }

    /// Bytes of the items waiting.
    pub fn queued_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// The reply to a client's opening of an instance (Socket.IO: a namespace
/// CONNECT), framed by the protocol side. Events for that slot held while
/// its plugin decided are written after it (`release`) or dropped.
#[derive(Debug)]
pub struct Gate {
    pub slot: Arc<str>,
    /// Which CONNECT of that slot this answers (a later one may follow).
    pub generation: u64,
    pub text: String,
    pub release: bool,
    /// A recovered socket's missed events, written right after the reply
    /// and before what was held.
    pub replay: Vec<Outbound>,
    /// Held events numbered up to this offset were read into `replay`
    /// (or delivered before): they are not written twice.
    pub replayed_upto: u64,
}

impl Gate {
    /// The reply to an opening, releasing (or dropping) what was held.
    pub fn reply(slot: Arc<str>, generation: u64, text: String, release: bool) -> Self {
        Self {
            slot,
            generation,
            text,
            release,
            replay: Vec::new(),
            replayed_upto: 0,
        }
    }
}

/// An open channel instance.
#[derive(Debug, Clone)]
pub struct InstanceState {
    /// The plugin serving it (its file name).
    pub plugin: Arc<str>,
    /// The channel name (Misskey) or namespace (Socket.IO).
    pub channel: Arc<str>,
    pub slot: Slot,
    /// A Socket.IO socket's id and handshake (none for Misskey).
    pub socket: Option<Arc<SocketInfo>>,
}

/// What a Socket.IO socket is known by beyond its connection: the id its
/// CONNECT reply gave it, and its handshake.
#[derive(Debug)]
pub struct SocketInfo {
    pub sid: Arc<str>,
    /// Rendered as socket.io describes one by
    /// [`Handshake::to_json`](super::Handshake::to_json).
    pub handshake: super::Handshake,
    /// The private id of its session, with connection state recovery (the
    /// CONNECT reply's `pid`).
    pub pid: Option<Arc<str>>,
    /// The offset the history had when the socket connected: a client
    /// that got no event yet missed everything after it.
    pub since: u64,
    /// Set once its CONNECT reply is on its way: only connected sockets
    /// count for the socket.io adapter.
    pub connected: AtomicBool,
    /// Taken back from a kept session (its client holds its pid already,
    /// before the CONNECT reply).
    pub recovered: bool,
}

impl SocketInfo {
    /// A socket's description (not connected yet).
    pub fn new(sid: Arc<str>, handshake: super::Handshake) -> Self {
        Self {
            sid,
            handshake,
            pid: None,
            since: 0,
            connected: AtomicBool::new(false),
            recovered: false,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }
}

/// One condition of a filtered delivery, tested against a member's
/// attribute set: does the set contain any of `keys`?
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Condition {
    pub attribute: String,
    pub keys: Vec<String>,
    /// Deliver only if the set contains none of the keys (else: at least one).
    pub exclude: bool,
}

/// Who may receive an event at all, described as data by whoever
/// publishes it: the users it names, and the users whose attribute set
/// `holding.0` (from any plugin) holds the key `holding.1`. A connection
/// that is not identified is never in an audience.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Audience {
    pub users: Vec<String>,
    /// (attribute set, key).
    pub holding: Option<(String, String)>,
}

impl Audience {
    fn admits(&self, conn: &ConnHandle) -> bool {
        let Some(me) = conn.identity() else {
            return false;
        };
        self.users.iter().any(|u| *u == *me.user_id)
            || self
                .holding
                .as_ref()
                .is_some_and(|(set, key)| conn.user_sets_contain(set, key))
    }
}

/// Who among a room's members receives an event.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// A member slot (connection, instance id) to skip.
    pub except: Option<(ConnId, Arc<str>)>,
    /// The plugin whose attributes the conditions read.
    pub owner: Option<Arc<str>>,
    /// All must hold.
    pub conditions: Arc<[Condition]>,
    /// Only members in this audience.
    pub audience: Option<Arc<Audience>>,
    /// Only recorded sockets' slots (true) or only the others (false): a
    /// cluster node delivers its own publication to its other members at
    /// once and to its recorded sockets from Redis, in offset order.
    pub recorded: Option<bool>,
}

impl Filter {
    /// Whether a member passes the audience and the conditions (not `except`).
    pub fn admits(&self, conn: &ConnHandle) -> bool {
        if let Some(a) = &self.audience {
            if !a.admits(conn) {
                return false;
            }
        }
        match &self.owner {
            Some(owner) if !self.conditions.is_empty() => conn.passes(owner, &self.conditions),
            _ => true,
        }
    }
}

/// Attribute sets by plugin, then set name.
pub type AttributeSets = HashMap<Arc<str>, HashMap<String, HashSet<String>>>;

/// A user's attribute sets on this node, shared by all their connections.
pub type UserAttributes = parking_lot::RwLock<AttributeSets>;

/// Replaces (`remove` = None) or updates one named set of one plugin.
pub(super) fn apply_attribute(
    sets: &mut AttributeSets,
    owner: &Arc<str>,
    name: &str,
    add: Vec<String>,
    remove: Option<&[String]>,
) {
    let plugin_sets = sets.entry(owner.clone()).or_default();
    match remove {
        None if add.is_empty() => {
            plugin_sets.remove(name);
        }
        None => {
            plugin_sets.insert(name.to_owned(), add.into_iter().collect());
        }
        Some(remove) => {
            let set = plugin_sets.entry(name.to_owned()).or_default();
            set.extend(add);
            for r in remove {
                set.remove(r);
            }
            if set.is_empty() {
                plugin_sets.remove(name);
            }
        }
    }
    if plugin_sets.is_empty() {
        sets.remove(owner);
    }
}

/// Mutable per-connection state; the hub's alone (others ask the
/// [`ConnHandle`]'s queries, and open or end instances through the hub,
/// which keeps the gauges).
#[derive(Debug, Default)]
pub(super) struct ConnState {
    instances: HashMap<Arc<str>, InstanceState>,
    /// Attribute sets by plugin, then name, for filtered deliveries.
    attributes: AttributeSets,
    memberships: HashSet<(Arc<str>, Slot)>,
}

/// Everything a closed connection held.
pub(super) struct Taken {
    /// (room, slot) memberships.
    pub memberships: Vec<(Arc<str>, Slot)>,
    /// Open instances by id.
    pub instances: Vec<(Arc<str>, InstanceState)>,
}

/// A connection's outbound buffer is over its bound (slow consumer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("send buffer full (slow consumer)")]
pub struct QueueFull;

/// Writes a connection's outbound items straight to its transport, framed
/// for its protocol, on the thread that produces them (the fan-out path
/// of WebSocket connections) instead of through the queue.
pub trait DirectOut: Send + Sync {
    fn send(&self, out: Outbound) -> Result<(), QueueFull>;
}

/// A write deferred to the end of the current [`WriteBatch`].
pub trait Deferred: Send + Sync {
    /// Writes what was kept back.
    fn release(&self);
}

/// The open batch of a thread: its number and the writers to release.
type OpenBatch = (u64, Vec<Arc<dyn Deferred>>);

thread_local! {
    static BATCH: std::cell::RefCell<Option<OpenBatch>> = const { std::cell::RefCell::new(None) };
    static BATCH_SEQ: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// While alive, a connection that is sent a second frame on this thread is
/// kept back and written when the batch drops: a busy subscriber of a
/// plugin handling a queue of messages gets them in one system call
/// instead of one each. A connection's first frame is written at once, so
/// a fan-out (one frame to each of many connections) costs no copy. Nested
/// batches join the outermost.
pub struct WriteBatch {
    outermost: bool,
}

impl WriteBatch {
    pub fn begin() -> Self {
        let outermost = BATCH.with(|b| {
            let mut b = b.borrow_mut();
            if b.is_none() {
                let seq = BATCH_SEQ.with(|s| {
                    s.set(s.get() + 1);
                    s.get()
                });
                *b = Some((seq, Vec::new()));
                true
            } else {
                false
            }
        });
        Self { outermost }
    }

    /// The number of the batch open on this thread (never 0), if any.
    pub fn current() -> Option<u64> {
        BATCH.with(|b| b.borrow().as_ref().map(|(seq, _)| *seq))
    }

    /// Registers a writer to release at the end of the batch; false (and
    /// nothing registered) when no batch is open.
    pub fn defer(w: Arc<dyn Deferred>) -> bool {
        BATCH.with(|b| match b.borrow_mut().as_mut() {
            Some((_, list)) => {
                list.push(w);
                true
            }
            None => false,
        })
    }
}

impl Drop for WriteBatch {
    fn drop(&mut self) {
        if !self.outermost {
            return;
        }
        let list = BATCH
            .with(|b| b.borrow_mut().take())
            .map(|(_, list)| list)
            .unwrap_or_default();
        for w in list {
            w.release();
        }
    }
}

/// A registered connection.
pub struct ConnHandle {
    pub id: ConnId,
    pub protocol: Protocol,
    identity: std::sync::OnceLock<Identity>,
    /// The queue, for transports written by their session task.
    queue: Option<Queue>,
    /// Direct writes, once the transport takes them; checked first.
    direct: parking_lot::RwLock<Option<Arc<dyn DirectOut>>>,
    /// Set when the hub unregisters the connection; late joins undo themselves.
    pub(super) unregistered: AtomicBool,
    close: Mutex<Option<(u16, String)>>,
    close_notify: Notify,
    state: Mutex<ConnState>,
    /// The attribute sets of the connection's user, once identified.
    user_attributes: std::sync::OnceLock<Arc<UserAttributes>>,
}

/// The sending end of a connection's queue: items, and the bytes they
/// hold against their bound (given back by [`OutboundRx`]).
struct Queue {
    tx: mpsc::Sender<Outbound>,
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

impl std::fmt::Debug for ConnHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnHandle")
            .field("id", &self.id)
            .field("protocol", &self.protocol)
            .field("identity", &self.identity.get())
            .finish_non_exhaustive()
    }
}

impl ConnHandle {
    /// A new handle and the receiving end of its outbound queue.
    pub fn new(
        id: ConnId,
        protocol: Protocol,
        identity: Option<Identity>,
        limits: QueueLimits,
    ) -> (Arc<Self>, OutboundRx) {
        let (tx, rx) = mpsc::channel(limits.frames.max(1));
        let bytes = Arc::new(AtomicUsize::new(0));
        let queue = Queue {
            tx,
            bytes: bytes.clone(),
            max_bytes: limits.bytes,
        };
        let conn = Self::build(id, protocol, identity, Some(queue), None);
        (conn, OutboundRx { rx, bytes })
    }

    /// A new handle whose items are written directly by `out`, without a
    /// queue.
    pub fn new_direct(
        id: ConnId,
        protocol: Protocol,
        identity: Option<Identity>,
        out: Arc<dyn DirectOut>,
    ) -> Arc<Self> {
        Self::build(id, protocol, identity, None, Some(out))
    }

    fn build(
        id: ConnId,
        protocol: Protocol,
        identity: Option<Identity>,
        queue: Option<Queue>,
        direct: Option<Arc<dyn DirectOut>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            id,
            protocol,
            identity: identity.map(std::sync::OnceLock::from).unwrap_or_default(),
            queue,
            direct: parking_lot::RwLock::new(direct),
            unregistered: AtomicBool::new(false),
            close: Mutex::new(None),
            close_notify: Notify::new(),
            state: Mutex::new(ConnState::default()),
            user_attributes: std::sync::OnceLock::new(),
        })
    }

    /// Switches a queued connection to direct writes. `drain` gets the
    /// writer first, to write what the queue still holds: pushes wait
    /// meanwhile, so nothing overtakes a queued item.
    pub fn go_direct(&self, out: Arc<dyn DirectOut>, drain: impl FnOnce(&dyn DirectOut)) {
        let mut d = self.direct.write();
        drain(&*out);
        *d = Some(out);
    }

    /// Stops direct writes (the transport ended); later items are dropped.
    pub fn end_direct(&self) {
        self.direct.write().take();
    }

    /// The transport its frames go out on now: `websocket` (written
    /// directly, or a Misskey stream) or `polling` (a queue its session
    /// drains).
    pub fn transport(&self) -> &'static str {
        if self.protocol == Protocol::Misskey || self.direct.read().is_some() {
            "websocket"
        } else {
            "polling"
        }
    }

    /// Bytes waiting in the connection's queue (0 when written directly).
    pub fn queued_bytes(&self) -> usize {
        self.queue
            .as_ref()
            .map_or(0, |q| q.bytes.load(Ordering::Relaxed))
    }

    /// Who the connection belongs to, if known.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.get()
    }

    /// Sets the identity of a connection that has none yet (Socket.IO
    /// plugins identify their sockets). Returns the identity in place
    /// afterwards, which differs from `id` if one was already set.
    pub(super) fn set_identity(&self, id: Identity) -> &Identity {
        self.identity.get_or_init(|| id)
    }

    /// Queues a frame without waiting. A full queue means a slow consumer:
    /// the connection is asked to close and the frame is dropped.
    pub fn push(&self, out: Outbound) -> bool {
        let direct = self.direct.read();
        if let Some(d) = &*direct {
            return match d.send(out) {
                Ok(()) => true,
                Err(QueueFull) => {
                    drop(direct);
                    self.request_close(SLOW_CONSUMER_CLOSE, "send queue full (slow consumer)");
                    false
                }
            };
        }
        // Held across the send: a switch to direct writes drains the queue
        // and must not miss an item pushed meanwhile.
        let Some(q) = &self.queue else { return false };
        let weight = out.weight();
        let before = q.bytes.fetch_add(weight, Ordering::Relaxed);
        // One item over the bound still goes in while the queue is empty.
        if before > 0 && before.saturating_add(weight) > q.max_bytes {
            q.bytes.fetch_sub(weight, Ordering::Relaxed);
            self.request_close(SLOW_CONSUMER_CLOSE, "send queue full (slow consumer)");
            return false;
        }
        let sent = q.tx.try_send(out);
        if sent.is_err() {
            q.bytes.fetch_sub(weight, Ordering::Relaxed);
        }
        match sent {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.request_close(SLOW_CONSUMER_CLOSE, "send queue full (slow consumer)");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Asks the session to close the connection with a close code and reason.
    /// The first request wins.
    pub fn request_close(&self, code: u16, reason: &str) {
        let mut c = self.close.lock();
        if c.is_none() {
            *c = Some((code, reason.to_owned()));
            self.close_notify.notify_one();
        }
    }

    /// The pending close request, if any.
    pub fn close_requested(&self) -> Option<(u16, String)> {
        self.close.lock().clone()
    }

    /// Resolves once a close is requested.
    pub async fn closed(&self) -> (u16, String) {
        loop {
            if let Some(c) = self.close_requested() {
                return c;
            }
            self.close_notify.notified().await;
        }
    }

    /// Runs `f` with the connection's state locked.
    fn with_state<R>(&self, f: impl FnOnce(&mut ConnState) -> R) -> R {
        f(&mut self.state.lock())
    }

    /// The open instances that pass `keep`.
    pub fn instances_where(&self, keep: impl Fn(&InstanceState) -> bool) -> Vec<InstanceState> {
        self.with_state(|s| s.instances.values().filter(|i| keep(i)).cloned().collect())
    }

    /// Whether an open instance passes `f`.
    pub fn any_instance(&self, f: impl Fn(&InstanceState) -> bool) -> bool {
        self.with_state(|s| s.instances.values().any(f))
    }

    /// Open instances.
    pub fn instance_count(&self) -> usize {
        self.with_state(|s| s.instances.len())
    }

    /// Registers an instance under a new id; false if the id is taken.
    pub(super) fn insert_instance(&self, id: &str, state: InstanceState) -> bool {
        self.with_state(|s| {
            if s.instances.contains_key(id) {
                return false;
            }
            s.instances.insert(id.into(), state);
            true
        })
    }

    /// Forgets an instance.
    pub(super) fn remove_instance(&self, id: &str) -> Option<InstanceState> {
        self.with_state(|s| s.instances.remove(id))
    }

    /// Replaces (`remove` = None) or updates a plugin's attribute set on
    /// this connection.
    pub fn set_attribute(
        &self,
        owner: &Arc<str>,
        name: &str,
        add: Vec<String>,
        remove: Option<&[String]>,
    ) {
        apply_attribute(&mut self.state.lock().attributes, owner, name, add, remove);
    }

    /// Links the connection to its user's shared attribute sets.
    pub(super) fn attach_user_attributes(&self, attrs: Arc<UserAttributes>) {
        let _ = self.user_attributes.set(attrs);
    }

    /// Whether the user's set `name` of any plugin contains `key`.
    pub fn user_sets_contain(&self, name: &str, key: &str) -> bool {
        self.user_attributes.get().is_some_and(|u| {
            u.read()
                .values()
                .any(|sets| sets.get(name).is_some_and(|s| s.contains(key)))
        })
    }

    /// Whether this connection passes every condition. A set is looked up
    /// on the connection first, then on its user; a missing set is empty.
    /// Runs once per member in a filtered fan-out: no allocation.
    pub fn passes(&self, owner: &str, conditions: &[Condition]) -> bool {
        let st = self.state.lock();
        let own = st.attributes.get(owner);
        let user = self.user_attributes.get().map(|u| u.read());
        let user_sets = user.as_ref().and_then(|u| u.get(owner));
        conditions.iter().all(|c| {
            let name = c.attribute.as_str();
            let hit = own
                .and_then(|s| s.get(name))
                .or_else(|| user_sets.and_then(|s| s.get(name)))
                .is_some_and(|set| c.keys.iter().any(|k| set.contains(k)));
            hit != c.exclude
        })
    }

    /// The instance with this id, if open.
    pub fn instance(&self, id: &str) -> Option<InstanceState> {
        self.state.lock().instances.get(id).cloned()
    }

    /// Records a membership. An instance slot must still be the open
    /// instance (the very same slot, not a later instance with its id): a
    /// join racing the instance's end is refused.
    pub(super) fn add_membership(&self, room: Arc<str>, slot: Slot) -> bool {
        let mut st = self.state.lock();
        // An instance's slot joins only while it is that instance's.
        if !slot.is_capture()
            && !slot.is_stream()
            && !st
                .instances
                .get(slot.id())
                .is_some_and(|i| Arc::ptr_eq(&i.slot.0, &slot.0))
        {
            return false;
        }
        st.memberships.insert((room, slot))
    }

    /// Whether the hub has forgotten this connection.
    pub fn is_unregistered(&self) -> bool {
        self.unregistered.load(Ordering::SeqCst)
    }

    pub(super) fn remove_membership(&self, room: &Arc<str>, slot: &Slot) -> bool {
        self.state
            .lock()
            .memberships
            .remove(&(room.clone(), slot.clone()))
    }

    /// A plugin's attribute sets on this connection (sorted), as a
    /// recovered socket's session keeps them.
    pub fn attributes_of(&self, owner: &str) -> Vec<(String, Vec<String>)> {
        let st = self.state.lock();
        let mut out: Vec<(String, Vec<String>)> = st
            .attributes
            .get(owner)
            .map(|sets| {
                sets.iter()
                    .map(|(name, set)| {
                        let mut v: Vec<String> = set.iter().cloned().collect();
                        v.sort();
                        (name.clone(), v)
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// The rooms a slot is in.
    pub fn rooms_of(&self, slot: &Slot) -> Vec<Arc<str>> {
        self.state
            .lock()
            .memberships
            .iter()
            .filter(|(_, s)| s == slot)
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// Whether a slot is in `room`.
    pub fn in_room(&self, slot: &Slot, room: &str) -> bool {
        self.state
            .lock()
            .memberships
            .contains(&(Arc::from(room), slot.clone()))
    }

    /// Whether a slot is in any of `rooms`.
    pub fn in_any_room(&self, slot: &Slot, rooms: &[String]) -> bool {
        if rooms.is_empty() {
            return false;
        }
        let st = self.state.lock();
        rooms.iter().any(|r| {
            st.memberships
                .contains(&(Arc::from(r.as_str()), slot.clone()))
        })
    }

    /// Whether nothing waits to be written (a queued connection whose
    /// queue is empty, or one written directly): where a volatile event
    /// may go.
    pub fn is_idle(&self) -> bool {
        self.queue
            .as_ref()
            .is_none_or(|q| q.bytes.load(Ordering::Relaxed) == 0)
    }

    pub(super) fn take_memberships_of(&self, slot: &Slot) -> Vec<Arc<str>> {
        let mut st = self.state.lock();
        let rooms: Vec<Arc<str>> = st
            .memberships
            .iter()
            .filter(|(_, s)| s == slot)
            .map(|(r, _)| r.clone())
            .collect();
        for r in &rooms {
            st.memberships.remove(&(r.clone(), slot.clone()));
        }
        rooms
    }

    /// Empties the state: memberships and instances.
    pub(super) fn take_all(&self) -> Taken {
        let mut st = self.state.lock();
        Taken {
            memberships: st.memberships.drain().collect(),
            instances: st
                .instances
                .drain()
                .inspect(|(_, i)| i.slot.close())
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_items_stay_small() {
        // Every connection's queue allocates slots of this size.
        assert!(
            std::mem::size_of::<Outbound>() <= 32,
            "{}",
            std::mem::size_of::<Outbound>()
        );
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_and_gives_them_back() {
        let limits = QueueLimits {
            frames: 1000,
            bytes: 10_000,
        };
        let (c, mut rx) = ConnHandle::new(1, Protocol::SocketIo, None, limits);
        // One item over the bound goes in while nothing waits.
        assert!(c.push(Outbound::Text("x".repeat(20_000))));
        assert!(!c.push(Outbound::Text("y".into())));
        assert_eq!(
            c.close_requested().map(|(code, _)| code),
            Some(SLOW_CONSUMER_CLOSE)
        );
        assert!(rx.try_recv().is_some());
        assert_eq!(rx.queued_bytes(), 0);

        let (c, mut rx) = ConnHandle::new(2, Protocol::SocketIo, None, limits);
        for _ in 0..9 {
            assert!(c.push(Outbound::Text("z".repeat(1000))));
        }
        assert_eq!(rx.queued_bytes(), 9000);
        assert!(
            !c.push(Outbound::Text("z".repeat(1001))),
            "over 10,000 bytes"
        );
        rx.try_recv().unwrap();
        assert_eq!(rx.queued_bytes(), 8000);
    }
}
