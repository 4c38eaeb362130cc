//! chanhost as one more server of a socket.io cluster on
//! `@socket.io/redis-adapter` 8.x (`[socketio.adapter]`): Node servers,
//! `@socket.io/redis-emitter` and chanhost share one Redis, so a Node
//! backend's `io.to(room).emit(...)` reaches chanhost's Socket.IO
//! clients, and chanhost's publishes reach the Node servers' clients.
//!
//! For every namespace its plugins serve, the node takes part in the
//! adapter's protocol ([`wire`]) for its own sockets:
//!
//! - **Broadcasts in**: it PSUBSCRIBEs `<key>#<nsp>#*` and delivers each
//!   broadcast to its sockets of that namespace in the rooms named (all of
//!   them when none is), less those in an `except` room, with every
//!   argument (binary as binary). A socket's id is a room it is in, as in
//!   socket.io. `volatile` events skip a socket with unsent data. Its own
//!   broadcasts (and, in a chanhost cluster, those of the other chanhost
//!   nodes, which reach it through the cluster broker) are skipped.
//! - **Broadcasts out**: each publish that starts on this node (the API,
//!   the rooms of a plugin broadcast outside `event`) is also published in
//!   the adapter's format for each namespace, so Node servers deliver it
//!   to their sockets in that room. Events filtered by chanhost-only
//!   conditions (attribute filters, note audiences) stay in chanhost:
//!   the Node servers could not apply them (counted as `filtered`).
//! - **Requests**: while its publishing connection is up (it can answer),
//!   it SUBSCRIBEs `<key>-request#<nsp>#` (so it counts in
//!   `serverCount()`) and answers `SOCKETS`, `ALL_ROOMS`, `REMOTE_FETCH`,
//!   acts on `REMOTE_JOIN`, `REMOTE_LEAVE`, `REMOTE_DISCONNECT` (by
//!   selection, as the emitter and `io.in(..).socketsJoin(..)` send them,
//!   or by socket id), hands `SERVER_SIDE_EMIT` to the plugins listening
//!   on [`wire::server_side_room`] (answering an ack with the number of
//!   plugins it reached), and takes part in `BROADCAST` with acks: it
//!   counts its clients, asks each for an acknowledgement and passes each
//!   on as `BROADCAST_ACK`.
//!
//! The sharded and the streams adapters are not spoken; `variants`
//! reports them when they share the Redis.
//!
//! Namespaces are those of the plugins running now, looked at every
//! second (a plugin loaded later joins within a second). Redis outages are
//! survived as elsewhere ([`crate::pubsub`]): the subscription and the
//! publishing connection come back by themselves; what could not be
//! published meanwhile is counted (`not_carried`), never sent late.

pub mod notepack;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use parking_lot::{Mutex, RwLock};
use serde_json::Value;
use tokio::sync::mpsc;

use self::notepack::Mp;
use self::wire::{Incoming, Kind, Request, Selection};
use crate::broker::Publication;
use crate::config::SioAdapterConfig;
use crate::hub::{Ack, ConnHandle, InstanceState, Outbound, SharedEvent};
use crate::node::Node;
use crate::protocol::socketio as sio;
use crate::pubsub::{backoff, redacted, timed, Outage, UrlError};

/// Messages waiting for the publishing connection.
const QUEUE: usize = 65_536;
/// Most messages sent in one pipeline.
const PIPELINE: usize = 512;
/// How often the served namespaces are looked at, and expired acks swept.
const TICK: Duration = Duration::from_secs(1);
/// How often the Redis is looked at for adapter variants chanhost does not
/// speak.
const VARIANT_CHECK: Duration = Duration::from_secs(30);
/// The longest a client's acknowledgement is awaited, whatever the
/// request says.
const MAX_ACK_WAIT: Duration = Duration::from_secs(300);
/// How long a client's acknowledgement is awaited when the request names
/// no timeout.
const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A message for the publishing connection.
struct Outgoing {
    channel: String,
    payload: Vec<u8>,
}

/// A client's acknowledgement another server waits for.
struct PendingAck {
    request_id: String,
    nsp: String,
    until: Instant,
}

/// A client's ACK packet, as its session read it.
pub struct ClientAck<'a> {
    pub conn: u64,
    pub nsp: &'a str,
    pub id: u64,
    /// The ack's arguments (a JSON array, placeholders for attachments).
    pub args: Option<&'a Value>,
    pub attachments: &'a [Vec<u8>],
}

/// This node's part in the adapter's protocol.
pub struct SioAdapter {
    node: Weak<Node>,
    key: String,
    /// This node's `uid` in the protocol.
    uid: String,
    /// What the uids of this node's chanhost cluster begin with.
    family: String,
    client: redis::Client,
    at: String,
    queue: mpsc::Sender<Outgoing>,
    subscribed: AtomicBool,
    publishing: AtomicBool,
    /// The namespaces subscribed to now.
    namespaces: RwLock<Arc<[String]>>,
    /// Broadcast acks asked of this node's clients: (connection, ack id).
    acks: Mutex<HashMap<(u64, u64), PendingAck>>,
    next_ack: AtomicU64,
}

/// The uid prefix shared by the chanhost nodes of one cluster `prefix`
/// (its length keeps two prefixes from reading as one).
fn family(prefix: &str) -> String {
    format!("chanhost:{}:{prefix}:", prefix.len())
}

/// Starts the adapter for a node.
pub fn spawn(node: &Arc<Node>, config: &SioAdapterConfig) -> Result<Arc<SioAdapter>, UrlError> {
    let client = redis::Client::open(config.redis.as_str()).map_err(UrlError)?;
    let (tx, rx) = mpsc::channel(QUEUE);
    let family = match &node.config().cluster {
        Some(c) => family(&c.prefix),
        None => "chanhost::".to_owned(),
    };
    let uid = format!("{family}{}", crate::server::engineio::random_id());
    let adapter = Arc::new(SioAdapter {
        node: Arc::downgrade(node),
        key: config.key.clone(),
        family: if node.config().cluster.is_some() {
            family
        } else {
            uid.clone()
        },
        uid,
        client,
        at: redacted(&config.redis),
        queue: tx,
        subscribed: AtomicBool::new(false),
        publishing: AtomicBool::new(false),
        namespaces: RwLock::new(Arc::from(Vec::new())),
        acks: Mutex::new(HashMap::new()),
        next_ack: AtomicU64::new(1),
    });
    node.set_adapter(adapter.clone());
    tracing::info!(redis = %adapter.at, key = %adapter.key, uid = %adapter.uid, "socket.io adapter protocol");
    let shutdown = node.shutdown().clone();
    let (a, b) = (adapter.clone(), adapter.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = subscriber(a) => {}
            _ = shutdown.cancelled() => {}
        }
    });
    tokio::spawn(publisher(b, rx));
    let c = adapter.clone();
    let shutdown = node.shutdown().clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = variants(c) => {}
            _ = shutdown.cancelled() => {}
        }
    });
    Ok(adapter)
}

/// Looks for the adapter variants chanhost does not speak on its Redis —
/// the sharded adapter (sharded pub/sub channels under the key) and the
/// streams adapter (a stream at the key, its default name) — and says so:
/// a warning the first time each is seen, and
/// `chanhost_socketio_adapter_unsupported{variant}` 1 while it is there.
async fn variants(a: Arc<SioAdapter>) {
    let mut warned = [false; 2];
    loop {
        if let Ok(mut conn) = timed(a.client.get_multiplexed_async_connection()).await {
            loop {
                let sharded = timed(
                    redis::cmd("PUBSUB")
                        .arg("SHARDCHANNELS")
                        .arg(format!("{}#*", a.key))
                        .query_async::<Vec<String>>(&mut conn),
                )
                .await;
                // Each on its own: sharded pub/sub is Redis 7's, streams
                // are older.
                let Ok(stream) = timed(
                    redis::cmd("TYPE")
                        .arg(&a.key)
                        .query_async::<String>(&mut conn),
                )
                .await
                else {
                    break;
                };
                let Some(node) = a.node.upgrade() else { return };
                let seen = [sharded.is_ok_and(|c| !c.is_empty()), stream == "stream"];
                let what = [
                    "the sharded adapter (createShardedAdapter) publishes on this Redis",
                    "a streams adapter (@socket.io/redis-streams-adapter) writes a stream on this Redis",
                ];
                let gauges = node.metrics().adapter_unsupported.iter();
                for ((gauge, warned), (seen, what)) in
                    gauges.zip(&mut warned).zip(seen.into_iter().zip(what))
                {
                    gauge.set(u64::from(seen));
                    if seen && !*warned {
                        *warned = true;
                        tracing::warn!(redis = %a.at, key = %a.key, "socket.io adapter: {what}; chanhost speaks @socket.io/redis-adapter's classic protocol only, so those servers and chanhost do not reach each other's sockets");
                    }
                }
                tokio::time::sleep(VARIANT_CHECK).await;
            }
        }
        tokio::time::sleep(VARIANT_CHECK).await;
    }
}

impl SioAdapter {
    /// Whether both connections are up.
    pub fn is_up(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed) && self.publishing.load(Ordering::Relaxed)
    }

    fn set(&self, flag: &AtomicBool, up: bool) {
        flag.store(up, Ordering::Relaxed);
        if let Some(n) = self.node.upgrade() {
            n.metrics().adapter_up.set(u64::from(self.is_up()));
        }
    }

    fn send(&self, channel: String, payload: Vec<u8>) -> bool {
        let Some(node) = self.node.upgrade() else {
            return false;
        };
        if !self.publishing.load(Ordering::Relaxed) {
            node.metrics().adapter_not_carried.inc();
            return false;
        }
        if self.queue.try_send(Outgoing { channel, payload }).is_err() {
            node.metrics().adapter_not_carried.inc();
            return false;
        }
        true
    }

    fn respond(&self, nsp: &str, response: Value) {
        self.send(
            wire::response_channel(&self.key, nsp),
            response.to_string().into_bytes(),
        );
    }

    /// A publish that started on this node, for the Node servers.
    pub fn forward(&self, p: &Publication) {
        let Some(node) = self.node.upgrade() else {
            return;
        };
        if p.filter.audience.is_some() || !p.filter.conditions.is_empty() {
            node.metrics().adapter_filtered.inc();
            return;
        }
        let namespaces = self.namespaces.read().clone();
        if namespaces.is_empty() {
            return;
        }
        let except: Vec<String> = p
            .filter
            .except
            .as_ref()
            .and_then(|(conn, id)| node.hub().conn(*conn)?.instance(id)?.socket.clone())
            .map(|s| vec![s.sid.to_string()])
            .unwrap_or_default();
        let Ok(data) = serde_json::from_str::<Value>(&p.data) else {
            return;
        };
        let arg = notepack::from_json(&data, &p.attachments);
        let to = Selection {
            rooms: vec![p.room.to_string()],
            except,
        };
        for nsp in namespaces.iter() {
            let msg = wire::broadcast_message(&self.uid, nsp, &p.event, vec![arg.clone()], &to);
            if self.send(wire::room_channel(&self.key, nsp, &p.room), msg) {
                node.metrics().adapter_published.inc();
            }
        }
    }

    /// A client acknowledged an event another server asked an ack for.
    /// False if no such ack is awaited (the host's own events ask none).
    pub fn client_ack(&self, ack: ClientAck<'_>) -> bool {
        let nsp = ack.nsp;
        let pending = {
            let mut acks = self.acks.lock();
            match acks.get(&(ack.conn, ack.id)) {
                Some(p) if p.nsp == nsp => acks.remove(&(ack.conn, ack.id)),
                _ => None,
            }
        };
        let Some(pending) = pending else {
            return false;
        };
        // The adapter passes on the first argument of the ack.
        let first = ack
            .args
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .map_or(Mp::Nil, |v| notepack::from_json(v, ack.attachments));
        self.send(
            wire::response_channel(&self.key, nsp),
            wire::broadcast_ack(&pending.request_id, first),
        );
        true
    }

    fn malformed(&self, node: &Node, what: &str, e: &dyn std::fmt::Display) {
        node.metrics().adapter_malformed.inc();
        tracing::debug!("socket.io adapter: {what} ignored: {e}");
    }

    /// One message from Redis.
    fn receive(&self, channel: &str, payload: &[u8]) {
        let Some(node) = self.node.upgrade() else {
            return;
        };
        let namespaces = self.namespaces.read();
        match wire::classify(&self.key, channel, &namespaces) {
            Some(Incoming::Broadcast { nsp, room }) => {
                // A room nobody is in here: nothing to decode (as the
                // adapter's own `hasRoom`).
                if room.is_some_and(|r| node.hub().room_size(r) == 0) {
                    return;
                }
                let nsp = nsp.to_owned();
                drop(namespaces);
                match wire::parse_broadcast(payload) {
                    // Ours (or our cluster's, delivered through it), for
                    // another namespace, or for its server's own sockets.
                    Ok(b) if b.uid.starts_with(&self.family) || b.nsp != nsp || b.local => {}
                    Ok(b) => {
                        node.metrics().adapter_received.inc();
                        self.deliver(&node, b);
                    }
                    Err(e) => self.malformed(&node, "broadcast", &e),
                }
            }
            Some(Incoming::Request { nsp }) => {
                let nsp = nsp.to_owned();
                drop(namespaces);
                match wire::parse_request(payload) {
                    Ok(r) if r.uid == self.uid => {}
                    Ok(r) => {
                        node.metrics().adapter_requests.inc();
                        self.request(&node, &nsp, r);
                    }
                    Err(e) => self.malformed(&node, "request", &e),
                }
            }
            None => {}
        }
    }

    /// A broadcast from another server, to this node's sockets.
    fn deliver(&self, node: &Node, b: wire::Broadcast) {
        let Some(ev) = event_of(&b.event, b.args) else {
            return;
        };
        for (conn, inst) in node.hub().sockets(&b.nsp, &b.to.rooms, &b.to.except) {
            if b.volatile && !conn.is_idle() {
                continue;
            }
            conn.push(Outbound::Event {
                slot: inst.slot,
                event: ev.clone(),
            });
        }
    }

    /// The sockets a request addresses: by `opts`, or the one socket `sid`.
    fn addressed(node: &Node, nsp: &str, r: &Request) -> Vec<(Arc<ConnHandle>, InstanceState)> {
        match (&r.opts, &r.sid) {
            (Some(o), _) => node.hub().sockets(nsp, &o.rooms, &o.except),
            (None, Some(sid)) => node.hub().sockets(nsp, std::slice::from_ref(sid), &[]),
            (None, None) => Vec::new(),
        }
    }

    fn request(&self, node: &Node, nsp: &str, r: Request) {
        let id = r.request_id.clone().map_or(Value::Null, Value::String);
        match r.kind {
            Kind::Sockets => {
                let sockets: Vec<String> = node
                    .hub()
                    .sockets(nsp, &r.rooms, &[])
                    .iter()
                    .filter_map(|(_, i)| Some(i.socket.as_ref()?.sid.to_string()))
                    .collect();
                self.respond(
                    nsp,
                    serde_json::json!({ "requestId": id, "sockets": sockets }),
                );
            }
            Kind::AllRooms => {
                let rooms: Vec<String> = node
                    .hub()
                    .socket_rooms(nsp)
                    .iter()
                    .map(|r| r.to_string())
                    .collect();
                self.respond(nsp, serde_json::json!({ "requestId": id, "rooms": rooms }));
            }
            Kind::RemoteFetch => {
                let sockets: Vec<Value> = Self::addressed(node, nsp, &r)
                    .iter()
                    .filter_map(|(conn, inst)| socket_json(conn, inst))
                    .collect();
                self.respond(
                    nsp,
                    serde_json::json!({ "requestId": id, "sockets": sockets }),
                );
            }
            Kind::RemoteJoin | Kind::RemoteLeave => {
                let join = r.kind == Kind::RemoteJoin;
                let rooms: Vec<String> = match (&r.opts, &r.room) {
                    (Some(_), _) => r.rooms.clone(),
                    (None, Some(room)) => vec![room.clone()],
                    (None, None) => Vec::new(),
                };
                let sockets = Self::addressed(node, nsp, &r);
                for (conn, inst) in &sockets {
                    for room in &rooms {
                        if join {
                            node.hub().join(conn, inst.slot.clone(), room);
                        } else {
                            node.hub().leave(conn, &inst.slot, room);
                        }
                    }
                }
                // One socket by id: its server answers.
                if r.opts.is_none() && !sockets.is_empty() {
                    self.respond(nsp, serde_json::json!({ "requestId": id }));
                }
            }
            Kind::RemoteDisconnect => {
                let sockets = Self::addressed(node, nsp, &r);
                for (conn, inst) in &sockets {
                    if r.close {
                        conn.request_close(1000, "disconnected by a socket.io server");
                    } else {
                        node.end_instance(conn, inst.slot.id(), true);
                    }
                }
                if r.opts.is_none() && !sockets.is_empty() {
                    self.respond(nsp, serde_json::json!({ "requestId": id }));
                }
            }
            Kind::ServerSideEmit => {
                let room = wire::server_side_room(nsp);
                let reached = node.hub().listeners(&room).len();
                if let Some((Some(event), args)) =
                    r.data.split_first().map(|(e, a)| (e.as_str(), a))
                {
                    if let Some(ev) = event_of(event, args.to_vec()) {
                        node.deliver_event(&room, ev);
                    }
                }
                if r.request_id.is_some() {
                    self.respond(
                        nsp,
                        serde_json::json!({
                            "type": Kind::ServerSideEmit as u8,
                            "requestId": id,
                            "data": reached,
                        }),
                    );
                }
            }
            Kind::Broadcast => self.broadcast_with_ack(node, nsp, r),
            // Answers to other servers' requests: not for this node.
            Kind::BroadcastClientCount | Kind::BroadcastAck => {}
        }
    }

    /// `io.timeout(ms).to(room).emit(ev, cb)` on another server: this
    /// node's clients in the selection get the event with an ack id; the
    /// count goes back at once, each ack as it comes.
    fn broadcast_with_ack(&self, node: &Node, nsp: &str, r: Request) {
        let Some(request_id) = r.request_id.clone() else {
            return;
        };
        let count = |n: usize| {
            serde_json::json!({
                "type": Kind::BroadcastClientCount as u8,
                "requestId": request_id,
                "clientCount": n,
            })
        };
        let data = r
            .packet
            .as_ref()
            .and_then(|p| p.get("data")?.as_array())
            .unwrap_or(&[]);
        let event = data
            .split_first()
            .and_then(|(e, args)| event_of(e.as_str()?, args.to_vec()));
        let Some(event) = event else {
            // Nothing to ask anyone: said at once, so nobody waits for it.
            node.metrics().adapter_malformed.inc();
            self.respond(nsp, count(0));
            return;
        };
        let opts = r.opts.clone().unwrap_or_default();
        let timeout = r
            .ack_timeout_ms
            .map_or(DEFAULT_ACK_TIMEOUT, Duration::from_millis)
            .min(MAX_ACK_WAIT);
        // Framed as the host frames its own events, once for all sockets.
        let args_json = sio::spread_args(&event.event, event.args.as_deref().unwrap_or("[]"));
        let sockets = node.hub().sockets(nsp, &opts.rooms, &opts.except);
        self.respond(nsp, count(sockets.len()));
        let until = Instant::now() + timeout;
        let mut acks = self.acks.lock();
        for (conn, inst) in sockets {
            let ack = self.next_ack.fetch_add(1, Ordering::Relaxed);
            acks.insert(
                (conn.id, ack),
                PendingAck {
                    request_id: request_id.clone(),
                    nsp: nsp.to_owned(),
                    until,
                },
            );
            conn.push(Outbound::Ack(Box::new(Ack {
                instance: inst.slot.id().into(),
                id: ack,
                asks: true,
                args: args_json.clone(),
                attachments: event.attachments.to_vec(),
            })));
        }
    }

    /// Forgets acks no longer awaited, and those of closed connections.
    fn sweep(&self, node: &Node) {
        let now = Instant::now();
        self.acks
            .lock()
            .retain(|(conn, _), a| a.until > now && node.hub().conn(*conn).is_some());
    }

    /// Looks at the namespaces served now (kept for classifying messages
    /// and for what goes out); against those `subscribed` on the current
    /// connection, what to subscribe to and what to drop.
    fn refresh(&self, node: &Node, subscribed: &[String]) -> (Vec<String>, Vec<String>) {
        let now = node.plugins().namespaces();
        let added = now
            .iter()
            .filter(|n| !subscribed.contains(n))
            .cloned()
            .collect();
        let gone = subscribed
            .iter()
            .filter(|n| !now.contains(n))
            .cloned()
            .collect();
        *self.namespaces.write() = now.into();
        (added, gone)
    }
}

/// An event of `name` with `args` as chanhost frames it for its sockets.
fn event_of(name: &str, args: Vec<Mp>) -> Option<Arc<SharedEvent>> {
    let mut attachments = Vec::new();
    let json: Vec<Value> = args
        .into_iter()
        .map(|a| notepack::to_json(a, &mut attachments))
        .collect();
    SharedEvent::spread(name, &Value::Array(json).to_string(), attachments.into())
}

/// A socket as `fetchSockets()` shows it: id, handshake, rooms, data.
fn socket_json(conn: &ConnHandle, inst: &InstanceState) -> Option<Value> {
    let info = inst.socket.as_ref()?;
    let rooms: Vec<String> = conn
        .rooms_of(&inst.slot)
        .iter()
        .map(|r| r.to_string())
        .collect();
    let data = match conn.identity() {
        Some(me) => serde_json::json!({ "user": &*me.user_id }),
        None => serde_json::json!({}),
    };
    Some(serde_json::json!({
        "id": &*info.sid,
        "handshake": info.handshake.to_json(),
        "rooms": rooms,
        "data": data,
    }))
}

/// The publishing connection: what is queued goes out in order, in
/// pipelines of what waits.
async fn publisher(a: Arc<SioAdapter>, mut rx: mpsc::Receiver<Outgoing>) {
    let mut outage = Outage::new("socket.io adapter (publish)", a.at.clone());
    let mut attempt = 0u32;
    loop {
        let mut conn = match timed(a.client.get_multiplexed_async_connection()).await {
            Ok(c) => c,
            Err(e) => {
                outage.down(&e);
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
                continue;
            }
        };
        attempt = 0;
        outage.up();
        a.set(&a.publishing, true);
        loop {
            // Idle, the connection is PINGed each tick, so that its state
            // (and whether this node answers requests) follows Redis.
            let first = tokio::select! {
                m = rx.recv() => m,
                _ = tokio::time::sleep(TICK) => {
                    let ping = timed(redis::cmd("PING").query_async::<()>(&mut conn)).await;
                    if let Err(e) = ping {
                        a.set(&a.publishing, false);
                        outage.down(&e);
                        break;
                    }
                    continue;
                }
            };
            let Some(first) = first else { return };
            let mut batch = vec![first];
            while batch.len() < PIPELINE {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let mut pipe = redis::pipe();
            for m in &batch {
                pipe.cmd("PUBLISH").arg(&m.channel).arg(&m.payload).ignore();
            }
            if let Err(e) = timed(pipe.query_async::<()>(&mut conn)).await {
                a.set(&a.publishing, false);
                let mut lost = batch.len() as u64;
                while rx.try_recv().is_ok() {
                    lost += 1;
                }
                if let Some(n) = a.node.upgrade() {
                    n.metrics().adapter_not_carried.add(lost);
                }
                outage.down(&e);
                break;
            }
        }
    }
}

/// The subscribing connection: every served namespace's broadcast
/// pattern and request channel, kept in step with the plugins.
async fn subscriber(a: Arc<SioAdapter>) {
    let mut outage = Outage::new("socket.io adapter (subscribe)", a.at.clone());
    let mut attempt = 0u32;
    loop {
        let pubsub = match timed(a.client.get_async_pubsub()).await {
            Ok(p) => p,
            Err(e) => {
                outage.down(&e);
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
                continue;
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        // Everything again on a new connection.
        let mut subscribed: Vec<String> = Vec::new();
        let mut answering = false;
        let mut tick = tokio::time::interval(TICK);
        let mut first = true;
        let lost: String = loop {
            tokio::select! {
                m = stream.next(), if !first => match m {
                    Some(m) => a.receive(m.get_channel_name(), m.get_payload_bytes()),
                    None => break "the connection closed".into(),
                },
                _ = tick.tick() => {
                    let Some(node) = a.node.upgrade() else { return };
                    a.sweep(&node);
                    let (added, gone) = a.refresh(&node, &subscribed);
                    // The request channels only while answers can go out:
                    // a server counted in `serverCount()` that cannot
                    // answer would make the others wait for nothing.
                    let answer = a.publishing.load(Ordering::Relaxed);
                    let mut r = Ok(());
                    for nsp in &gone {
                        r = r.and(timed(sink.punsubscribe(wire::broadcast_pattern(&a.key, nsp))).await);
                        if answering {
                            r = r.and(timed(sink.unsubscribe(wire::request_channel(&a.key, nsp))).await);
                        }
                    }
                    subscribed.retain(|n| !gone.contains(n));
                    if answer != answering {
                        for nsp in &subscribed {
                            let channel = wire::request_channel(&a.key, nsp);
                            r = r.and(if answer {
                                timed(sink.subscribe(channel)).await
                            } else {
                                timed(sink.unsubscribe(channel)).await
                            });
                        }
                        answering = answer;
                    }
                    for nsp in &added {
                        r = r.and(timed(sink.psubscribe(wire::broadcast_pattern(&a.key, nsp))).await);
                        if answering {
                            r = r.and(timed(sink.subscribe(wire::request_channel(&a.key, nsp))).await);
                        }
                    }
                    subscribed.extend(added);
                    if let Err(e) = r {
                        break e;
                    }
                    if first {
                        first = false;
                        attempt = 0;
                        outage.up();
                        a.set(&a.subscribed, true);
                    }
                }
            }
        };
        a.set(&a.subscribed, false);
        outage.down(&lost);
        tokio::time::sleep(backoff(attempt)).await;
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_families_do_not_overlap() {
        let a = family("chanhost");
        let b = family("chanhost:8:x");
        assert!(!format!("{b}n1").starts_with(&a));
        assert!(!format!("{a}n1").starts_with(&b));
        assert!(format!("{a}n1").starts_with(&a));
    }

    #[test]
    fn events_from_notepack_keep_their_binary_arguments() {
        let ev = event_of("e", vec![Mp::Str("a".into()), Mp::Bin(vec![1, 2])]).unwrap();
        assert_eq!(
            ev.args.as_deref(),
            Some(r#"["a",{"_placeholder":true,"num":0}]"#)
        );
        assert_eq!(&*ev.attachments, &[vec![1u8, 2]]);
        let one = event_of("e", vec![Mp::Int(5)]).unwrap();
        assert_eq!(&*one.data, "5");
    }
}
