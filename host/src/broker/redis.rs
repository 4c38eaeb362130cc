//! The cluster broker (`[cluster]`): publishes travel between nodes on
//! Redis pub/sub, and each node reads only the rooms it serves.
//!
//! What chanhost keeps in Redis, under `prefix` (default `chanhost`):
//!
//! - `<prefix>:room:<room>` — a pub/sub channel per room. A node
//!   SUBSCRIBEs to it while the room has members or listeners there and
//!   UNSUBSCRIBEs when the last one leaves, so a room's events reach only
//!   the nodes that deliver them. Nothing is stored.
//! - `<prefix>:control` and `<prefix>:node:<id>:answers` — pub/sub
//!   channels every node subscribes to: a question to all nodes (the rooms
//!   API acting on every node's connections) and the answers to node
//!   `<id>`. Nothing stored.
//! - `<prefix>:node-seq` — a counter: each node takes a number from it at
//!   start, the upper bits of its connection ids, so that ids are unique
//!   across the cluster (plugins key shared state by them).
//! - `<prefix>:nodes` — a sorted set: node id → the time (ms since the
//!   epoch) of its last heartbeat, written every `node_ttl_ms / 3`.
//!   An entry older than `node_ttl_ms` is removed by the first node to see
//!   it (`ZREM` answers 1 to one of them), which then cleans up after the
//!   dead node (its presence); `/healthz` counts the rest. One entry per
//!   node: a few dozen bytes.
//! - `<prefix>:node-connections` — a hash: node id → its client
//!   connections at its last heartbeat (the operator page's cluster view);
//!   removed with the node's entry above.
//!
//! A message is `[u32 header length][header JSON][u32 count]([u32
//! length][bytes])*` (lengths little-endian): the header names the
//! publishing node and carries the event, its JSON data and its filter
//! (the conditions a member must pass, the audience of a note), evaluated
//! by each receiving node against its own members; the binary attachments
//! follow. A node hands what it publishes to Redis, then delivers it to
//! its own members at once, and skips its own messages when Redis sends
//! them back, so each member gets an event once.
//! One connection publishes, in order, pipelining what is queued: the
//! order of a room's events from one publisher holds on every node.
//!
//! Faults: while either connection is down the broker is `down` —
//! [`Broker::publish`] refuses (the API answers 503, nothing delivered
//! anywhere), plugin broadcasts reach this node's members and are counted
//! as not carried. Both connections come back by themselves (100 ms
//! doubling to 5 s; one log line when an outage starts and one when it
//! ends) and the subscriber subscribes again to every room this node
//! serves. The publishing queue is bounded ([`QUEUE`]) and every Redis
//! request has a time limit, so a stuck Redis never holds up local
//! delivery.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Broker, BrokerError, BrokerState, Carried, LocalDelivery, Publication};
use crate::hub::{Audience, Condition, Filter};
use crate::metrics::Metrics;
use crate::pubsub::{backoff, redacted, timed, Outage, UrlError};

/// Events waiting for the publishing connection.
pub const QUEUE: usize = 65_536;
/// Most events sent in one pipeline.
const PIPELINE: usize = 512;
/// Channels named in one SUBSCRIBE after a reconnect.
const SUBSCRIBE_CHUNK: usize = 1_000;

/// What a cluster broker needs.
pub struct RedisBrokerOptions {
    pub url: String,
    pub prefix: String,
    pub node_ttl: Duration,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    /// Connection state recovery (`[socketio.recovery]`): every
    /// publication is numbered in Redis, and recorded rooms keep a history
    /// (see [`crate::recovery::redis`]).
    pub recovery: Option<Numbering>,
}

/// How the broker numbers and records publications.
#[derive(Debug, Clone, Copy)]
pub struct Numbering {
    /// `history_per_room`.
    pub cap: usize,
    /// `max_disconnection_ms`.
    pub window: Duration,
}

/// The broker of a node in a cluster.
pub struct RedisBroker {
    shared: Arc<Shared>,
}

/// What [`RedisBroker::on_node_gone`] calls, with a dead node's id.
pub type NodeGone = Box<dyn Fn(&str) + Send + Sync>;

struct Outgoing {
    channel: String,
    payload: Vec<u8>,
    /// The room of a publication to number (with recovery on).
    numbered: Option<Arc<str>>,
    /// Its share of a published batch: told once Redis took it; dropped
    /// untold when it is lost, which fails the whole batch.
    taken: Option<Taken>,
}

/// A batch's publications waiting for Redis: the batch is carried once
/// every one was taken, and fails as soon as one is lost.
struct BatchWait {
    left: std::sync::atomic::AtomicUsize,
    done: parking_lot::Mutex<Option<tokio::sync::oneshot::Sender<Result<(), BrokerError>>>>,
}

impl BatchWait {
    fn finish(&self, r: Result<(), BrokerError>) {
        if let Some(tx) = self.done.lock().take() {
            let _ = tx.send(r);
        }
    }
}

/// One publication's share of a [`BatchWait`].
struct Taken(Option<Arc<BatchWait>>);

impl Taken {
    /// One share per publication of a batch of `n`, and what resolves
    /// when they are all taken (or one is lost).
    fn batch(n: usize) -> (Vec<Taken>, Carried) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let wait = Arc::new(BatchWait {
            left: std::sync::atomic::AtomicUsize::new(n),
            done: parking_lot::Mutex::new(Some(tx)),
        });
        let shares = (0..n).map(|_| Taken(Some(wait.clone()))).collect();
        let carried: Carried =
            Box::pin(async move { rx.await.unwrap_or(Err(BrokerError::Interrupted)) });
        (shares, carried)
    }

    /// Redis took this publication.
    fn done(mut self) {
        if let Some(w) = self.0.take() {
            if w.left.fetch_sub(1, Ordering::AcqRel) == 1 {
                w.finish(Ok(()));
            }
        }
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if let Some(w) = self.0.take() {
            w.finish(Err(BrokerError::Interrupted));
        }
    }
}

/// What the subscribing connection is told.
enum Interest {
    /// A room may have gained its first or lost its last member here.
    Room(Arc<str>),
    /// Answered once every hint before it is in place on Redis.
    Settled(tokio::sync::oneshot::Sender<()>),
    /// A numbered publication of this node, queued for Redis once the
    /// subscriptions hinted before it are in place: its echo then reaches
    /// this node's recorded sockets.
    Publish(Outgoing),
}

struct Shared {
    /// This node's id in the cluster (random per process).
    node: String,
    prefix: String,
    node_ttl: Duration,
    client: redis::Client,
    /// For log lines: the URL without its password.
    at: String,
    local: OnceLock<Weak<dyn LocalDelivery>>,
    queue: mpsc::Sender<Outgoing>,
    interest: mpsc::UnboundedSender<Interest>,
    /// Hints and publications sent to the subscribing connection and not
    /// handled yet: while there are some, numbered publications go that
    /// way too (in order).
    unsettled: AtomicU64,
    numbering: Option<Numbering>,
    publishing: AtomicBool,
    subscribed: AtomicBool,
    /// The live nodes at the last heartbeat.
    node_list: parking_lot::Mutex<Vec<super::NodeInfo>>,
    metrics: Arc<Metrics>,
    /// Told of each dead node this node claimed (to clean up after it):
    /// called with the node's id.
    gone: OnceLock<NodeGone>,
    /// `ask_all` requests waiting for answers, by id.
    asks: parking_lot::Mutex<HashMap<u64, Ask>>,
    next_ask: AtomicU64,
}

/// An `ask_all` waiting for the other nodes.
struct Ask {
    want: usize,
    got: Vec<serde_json::Value>,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

/// How long `ask_all` waits for the other nodes.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

impl Shared {
    fn local(&self) -> Option<Arc<dyn LocalDelivery>> {
        self.local.get().and_then(Weak::upgrade)
    }

    fn room_channel(&self, room: &str) -> String {
        room_channel(&self.prefix, room)
    }

    fn is_up(&self) -> bool {
        self.publishing.load(Ordering::SeqCst) && self.subscribed.load(Ordering::SeqCst)
    }

    fn set(&self, flag: &AtomicBool, up: bool) {
        flag.store(up, Ordering::SeqCst);
        self.metrics.broker_up.set(u64::from(self.is_up()));
    }

    /// One request on a connection of its own, within the time limit.
    async fn once<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, String> {
        timed(async {
            let mut conn = self.client.get_multiplexed_async_connection().await?;
            cmd.query_async::<T>(&mut conn).await
        })
        .await
    }

    fn outgoing(&self, p: &Publication) -> Outgoing {
        Outgoing {
            channel: self.room_channel(&p.room),
            payload: encode(&self.node, p),
            numbered: self.numbering.map(|_| p.room.clone()),
            taken: None,
        }
    }

    /// Hands an outgoing message to Redis: to the publishing queue, or,
    /// numbered while subscriptions are being put in place, through the
    /// subscribing connection after them. False if the queue is full.
    fn send_out(&self, out: Outgoing) -> bool {
        if out.numbered.is_some() && self.unsettled.load(Ordering::SeqCst) > 0 {
            self.unsettled.fetch_add(1, Ordering::SeqCst);
            if self.interest.send(Interest::Publish(out)).is_ok() {
                return true;
            }
            self.unsettled.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        self.queue.try_send(out).is_ok()
    }

    /// The subscribing connection handled a hint or a publication.
    fn handled(&self, hint: Interest) {
        if let Interest::Publish(out) = hint {
            if self.queue.try_send(out).is_err() {
                self.not_carried(1, "the queue to Redis is full");
            }
        }
        self.unsettled.fetch_sub(1, Ordering::SeqCst);
    }

    /// Delivers a publication of this node to its own members at once:
    /// all of them, or, when it is numbered in Redis, those that are not
    /// recorded sockets (those get it from Redis, in offset order).
    fn deliver_here(&self, local: &dyn LocalDelivery, p: &Publication, carried: bool) {
        if self.numbering.is_some() && carried {
            let mut p = p.clone();
            p.filter.recorded = Some(false);
            local.deliver_local(&p);
        } else {
            local.deliver_local(p);
        }
    }

    fn not_carried(&self, n: usize, why: &str) {
        let before = self.metrics.broker_not_carried.get();
        self.metrics.broker_not_carried.add(n as u64);
        // The first of a run, then one in a thousand.
        if before % 1000 == 0 {
            tracing::warn!(
                events = n,
                "cluster broker: events not carried to other nodes: {why}"
            );
        }
    }

    fn control_channel(&self) -> String {
        control_channel(&self.prefix)
    }

    fn answers_channel(&self, node: &str) -> String {
        answers_channel(&self.prefix, node)
    }

    /// Another node asks: this node answers it.
    fn asked(&self, payload: &[u8]) {
        #[derive(Deserialize)]
        struct Question {
            from: String,
            id: u64,
            ask: serde_json::Value,
        }
        let Ok(q) = serde_json::from_slice::<Question>(payload) else {
            self.metrics.broker_malformed.inc();
            return;
        };
        if q.from == self.node {
            return;
        }
        let answer = self
            .local()
            .map_or(serde_json::Value::Null, |l| l.answer(&q.ask));
        let payload = serde_json::json!({ "id": q.id, "answer": answer }).to_string();
        let out = Outgoing {
            channel: self.answers_channel(&q.from),
            payload: payload.into_bytes(),
            numbered: None,
            taken: None,
        };
        if self.queue.try_send(out).is_err() {
            self.not_carried(1, "the queue to Redis is full (an answer to another node)");
        }
    }

    /// Another node answered this node's question.
    fn answered(&self, payload: &[u8]) {
        #[derive(Deserialize)]
        struct Answer {
            id: u64,
            answer: serde_json::Value,
        }
        let Ok(a) = serde_json::from_slice::<Answer>(payload) else {
            self.metrics.broker_malformed.inc();
            return;
        };
        let mut asks = self.asks.lock();
        if let Some(ask) = asks.get_mut(&a.id) {
            ask.got.push(a.answer);
            if ask.got.len() >= ask.want {
                if let Some(done) = ask.done.take() {
                    let _ = done.send(());
                }
            }
        }
    }

    /// A message from Redis: delivered here unless this node sent it.
    fn receive(&self, channel: &str, payload: &[u8]) {
        let Some(rest) = channel
            .strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix(':'))
        else {
            return;
        };
        let Some(room) = rest.strip_prefix("room:") else {
            // The two other channels a node subscribes to (no allocation
            // per message to tell them apart).
            if rest == "control" {
                self.asked(payload);
            } else if rest
                .strip_prefix("node:")
                .and_then(|r| r.strip_suffix(":answers"))
                == Some(self.node.as_str())
            {
                self.answered(payload);
            }
            return;
        };
        let (offset, payload) = match crate::recovery::redis::split_numbered(payload) {
            Some((offset, rest)) => (Some(offset), rest),
            None => (None, payload),
        };
        match decode(room, payload) {
            Ok((node, mut p)) => {
                let mine = node == self.node;
                // This node's own publication reached its other members
                // at once; numbered, it reaches its recorded sockets now.
                if mine && offset.is_none() {
                    return;
                }
                if mine {
                    p.filter.recorded = Some(true);
                } else {
                    self.metrics.broker_received.inc();
                }
                p.offset = offset;
                if let Some(local) = self.local() {
                    local.deliver_local(&p);
                }
            }
            Err(e) => {
                let n = self.metrics.broker_malformed.get();
                self.metrics.broker_malformed.inc();
                if n % 1000 == 0 {
                    tracing::warn!(channel, "cluster broker: malformed message ignored: {e}");
                }
            }
        }
    }
}

/// The pub/sub channel of a room.
pub fn room_channel(prefix: &str, room: &str) -> String {
    format!("{prefix}:room:{room}")
}

/// The channel of questions to every node.
pub fn control_channel(prefix: &str) -> String {
    format!("{prefix}:control")
}

/// The channel of answers to one node.
pub fn answers_channel(prefix: &str, node: &str) -> String {
    format!("{prefix}:node:{node}:answers")
}

/// The sorted set of live nodes.
pub fn nodes_key(prefix: &str) -> String {
    format!("{prefix}:nodes")
}

/// A hash: node id → its client connections at its last heartbeat.
pub fn node_connections_key(prefix: &str) -> String {
    format!("{prefix}:node-connections")
}

impl RedisBroker {
    /// Starts the broker's connections (they come up in the background).
    pub fn start(o: RedisBrokerOptions) -> Result<Self, UrlError> {
        let client = redis::Client::open(o.url.as_str()).map_err(UrlError)?;
        let (queue, rx) = mpsc::channel(QUEUE);
        let (interest, interest_rx) = mpsc::unbounded_channel();
        let numbering = o.recovery;
        let shared = Arc::new(Shared {
            node: crate::server::engineio::random_id(),
            prefix: o.prefix,
            node_ttl: o.node_ttl,
            client,
            at: redacted(&o.url),
            local: OnceLock::new(),
            queue,
            interest,
            unsettled: AtomicU64::new(0),
            numbering,
            publishing: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            node_list: parking_lot::Mutex::new(Vec::new()),
            metrics: o.metrics,
            gone: OnceLock::new(),
            asks: parking_lot::Mutex::new(HashMap::new()),
            next_ask: AtomicU64::new(1),
        });
        shared.metrics.broker_up.set(0);
        let spawn = |f: BoxFuture<'static, ()>| {
            let stop = o.shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = f => {}
                    _ = stop.cancelled() => {}
                }
            });
        };
        spawn(Box::pin(publisher(shared.clone(), rx)));
        spawn(Box::pin(subscriber(shared.clone(), interest_rx)));
        spawn(Box::pin(heartbeat(shared.clone())));
        Ok(Self { shared })
    }

    /// This node's id in the cluster.
    pub fn node_id(&self) -> &str {
        &self.shared.node
    }

    /// Calls `f` with the id of each dead node (no heartbeat for
    /// `node_ttl_ms`) this node takes out of the cluster: one node claims
    /// each. Set once.
    pub fn on_node_gone(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        let _ = self.shared.gone.set(Box::new(f));
    }
}

impl Broker for RedisBroker {
    fn attach(&self, local: Weak<dyn LocalDelivery>) {
        let _ = self.shared.local.set(local);
    }

    fn publish(&self, batch: Vec<Publication>) -> Result<Carried, BrokerError> {
        let local = self.shared.local().ok_or(BrokerError::Detached)?;
        if batch.is_empty() {
            return Ok(Box::pin(std::future::ready(Ok(()))));
        }
        if !self.shared.is_up() {
            return Err(BrokerError::Down);
        }
        // Every publication is told when Redis took it; the batch is
        // carried when all were, and fails as soon as one is lost.
        let (shares, carried) = Taken::batch(batch.len());
        let mut shares = shares.into_iter();
        let mut outgoing = |p: &Publication| Outgoing {
            taken: shares.next(),
            ..self.shared.outgoing(p)
        };
        if self.shared.numbering.is_some() && self.shared.unsettled.load(Ordering::SeqCst) > 0 {
            // Behind subscriptions being put in place (in order; the
            // channel to the subscribing connection is not bounded).
            for p in &batch {
                if !self.shared.send_out(outgoing(p)) {
                    return Err(BrokerError::Down);
                }
                self.shared.deliver_here(&*local, p, true);
            }
            return Ok(carried);
        }
        let permits = self
            .shared
            .queue
            .try_reserve_many(batch.len())
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(()) => BrokerError::Full,
                mpsc::error::TrySendError::Closed(()) => BrokerError::Down,
            })?;
        // Redis first: the other nodes' members then wait for the hop,
        // not for this node's own fan-out as well.
        for (p, permit) in batch.iter().zip(permits) {
            permit.send(outgoing(p));
            self.shared.deliver_here(&*local, p, true);
        }
        Ok(carried)
    }

    fn publish_best_effort(&self, p: Publication) {
        let carried = if !self.shared.is_up() {
            self.shared.not_carried(1, "Redis cannot be reached");
            false
        } else if !self.shared.send_out(self.shared.outgoing(&p)) {
            self.shared.not_carried(1, "the queue to Redis is full");
            false
        } else {
            true
        };
        if let Some(local) = self.shared.local() {
            self.shared.deliver_here(&*local, &p, carried);
        }
    }

    fn interest_changed(&self, room: &str) {
        self.shared.unsettled.fetch_add(1, Ordering::SeqCst);
        if self
            .shared
            .interest
            .send(Interest::Room(room.into()))
            .is_err()
        {
            self.shared.unsettled.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn settled(&self) -> BoxFuture<'_, ()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = self.shared.interest.send(Interest::Settled(tx)).is_ok();
        Box::pin(async move {
            if sent {
                let _ = tokio::time::timeout(Duration::from_secs(1), rx).await;
            }
        })
    }

    fn state(&self) -> BrokerState {
        if self.shared.is_up() {
            BrokerState::Up
        } else {
            BrokerState::Down
        }
    }

    fn nodes(&self) -> u64 {
        self.shared.node_list.lock().len() as u64
    }

    fn node_id(&self) -> Option<&str> {
        Some(&self.shared.node)
    }

    fn node_list(&self) -> Vec<super::NodeInfo> {
        self.shared.node_list.lock().clone()
    }

    fn ask_all(
        &self,
        ask: serde_json::Value,
    ) -> BoxFuture<'_, Result<Vec<serde_json::Value>, BrokerError>> {
        Box::pin(async move {
            let shared = &self.shared;
            if !shared.is_up() {
                return Err(BrokerError::Down);
            }
            let want = shared.node_list.lock().len().saturating_sub(1);
            if want == 0 {
                return Ok(Vec::new());
            }
            let id = shared.next_ask.fetch_add(1, Ordering::Relaxed);
            let (done, wait) = tokio::sync::oneshot::channel();
            shared.asks.lock().insert(
                id,
                Ask {
                    want,
                    got: Vec::new(),
                    done: Some(done),
                },
            );
            let question = serde_json::json!({ "from": shared.node, "id": id, "ask": ask });
            let out = Outgoing {
                channel: shared.control_channel(),
                payload: question.to_string().into_bytes(),
                numbered: None,
                taken: None,
            };
            if shared.queue.try_send(out).is_err() {
                shared.asks.lock().remove(&id);
                return Err(BrokerError::Full);
            }
            // Whatever came within the time: a node that died meanwhile
            // does not hold the answer up.
            let _ = tokio::time::timeout(ASK_TIMEOUT, wait).await;
            Ok(shared
                .asks
                .lock()
                .remove(&id)
                .map(|a| a.got)
                .unwrap_or_default())
        })
    }

    fn node_number(&self) -> BoxFuture<'_, Option<u64>> {
        Box::pin(async move {
            let mut incr = redis::cmd("INCR");
            incr.arg(format!("{}:node-seq", self.shared.prefix));
            self.shared.once::<u64>(&incr).await.ok()
        })
    }

    fn leave(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut zrem = redis::cmd("ZREM");
            zrem.arg(nodes_key(&self.shared.prefix))
                .arg(&self.shared.node);
            // Best effort: a node that cannot say so is counted out after
            // node_ttl_ms.
            let _ = self.shared.once::<()>(&zrem).await;
            let mut hdel = redis::cmd("HDEL");
            hdel.arg(node_connections_key(&self.shared.prefix))
                .arg(&self.shared.node);
            let _ = self.shared.once::<()>(&hdel).await;
        })
    }
}

/// What waits for a publishing connection that could not be made is not
/// sent late: it is counted (and its publishers told).
fn drop_queued(shared: &Shared, rx: &mut mpsc::Receiver<Outgoing>) {
    let mut lost = 0;
    while rx.try_recv().is_ok() {
        lost += 1;
    }
    if lost > 0 {
        shared.not_carried(lost, "Redis cannot be reached");
    }
}

/// The publishing connection: what is queued goes out in order, in
/// pipelines of what waits.
async fn publisher(shared: Arc<Shared>, mut rx: mpsc::Receiver<Outgoing>) {
    let mut outage = Outage::new("cluster broker (publish)", shared.at.clone());
    let mut attempt = 0u32;
    loop {
        let mut conn = match timed(shared.client.get_multiplexed_async_connection()).await {
            Ok(c) => c,
            Err(e) => {
                outage.down(&e);
                drop_queued(&shared, &mut rx);
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
                continue;
            }
        };
        // The numbering script, loaded on each connection (EVALSHA then
        // finds it after a Redis restart too).
        let script = redis::Script::new(crate::recovery::redis::NUMBER);
        if shared.numbering.is_some() {
            let load = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(crate::recovery::redis::NUMBER)
                .to_owned();
            if let Err(e) = timed(load.query_async::<String>(&mut conn)).await {
                outage.down(&e);
                drop_queued(&shared, &mut rx);
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
                continue;
            }
        }
        attempt = 0;
        outage.up();
        shared.set(&shared.publishing, true);
        loop {
            let Some(first) = rx.recv().await else { return };
            let mut batch = vec![first];
            while batch.len() < PIPELINE {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let mut pipe = redis::pipe();
            for m in &batch {
                match (&m.numbered, shared.numbering) {
                    (Some(room), Some(n)) => {
                        let prefix = &shared.prefix;
                        pipe.cmd("EVALSHA")
                            .arg(script.get_hash())
                            .arg(4)
                            .arg(crate::recovery::redis::offset_key(prefix))
                            .arg(crate::recovery::redis::history_key(prefix, room))
                            .arg(crate::recovery::redis::mark_key(prefix, room))
                            .arg(crate::recovery::redis::cut_key(prefix, room))
                            .arg(&m.channel)
                            .arg(&m.payload)
                            .arg(n.cap)
                            .arg(n.window.as_millis() as u64);
                    }
                    _ => {
                        pipe.cmd("PUBLISH").arg(&m.channel).arg(&m.payload);
                    }
                }
            }
            match timed(pipe.query_async::<Vec<redis::Value>>(&mut conn)).await {
                Ok(replies) => {
                    shared.metrics.broker_carried.add(batch.len() as u64);
                    for m in &mut batch {
                        if let Some(taken) = m.taken.take() {
                            taken.done();
                        }
                    }
                    // A numbered publication answers {offset, entries cut}.
                    let cut: u64 = replies
                        .into_iter()
                        .filter_map(|v| redis::from_redis_value::<(u64, u64)>(v).ok())
                        .map(|(_, cut)| cut)
                        .sum();
                    if cut > 0 {
                        shared
                            .metrics
                            .recovery_cut
                            .cut
                            .fetch_add(cut, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    shared.set(&shared.publishing, false);
                    // What was on its way is not sent late: it is counted.
                    let mut lost = batch.len();
                    while rx.try_recv().is_ok() {
                        lost += 1;
                    }
                    shared.not_carried(lost, "Redis failed while publishing");
                    outage.down(&e);
                    break;
                }
            }
        }
    }
}

/// The subscribing connection: the rooms this node serves, kept in step
/// with the hub's hints, and every message delivered here.
async fn subscriber(shared: Arc<Shared>, mut interest: mpsc::UnboundedReceiver<Interest>) {
    let mut outage = Outage::new("cluster broker (subscribe)", shared.at.clone());
    let mut wanted: HashSet<Arc<str>> = HashSet::new();
    let mut attempt = 0u32;
    // Whether this node serves a room now.
    let wants = |room: &str| shared.local().is_some_and(|l| l.has_audience(room));
    loop {
        let pubsub = match timed(shared.client.get_async_pubsub()).await {
            Ok(p) => p,
            Err(e) => {
                outage.down(&e);
                // Keep up with the hints meanwhile.
                let pause = tokio::time::sleep(backoff(attempt));
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        _ = &mut pause => break,
                        hint = interest.recv() => match hint {
                            None => return,
                            // Nothing can be in place: nobody waits for it.
                            Some(Interest::Settled(done)) => { let _ = done.send(()); }
                            Some(Interest::Room(room)) => {
                                if wants(&room) { wanted.insert(room.clone()); } else { wanted.remove(&room); }
                                shared.handled(Interest::Room(room));
                            }
                            Some(p @ Interest::Publish(_)) => shared.handled(p),
                        }
                    }
                }
                attempt += 1;
                continue;
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        let mut settled = Vec::new();
        // Publications wait for the subscriptions below.
        let mut held = Vec::new();
        while let Ok(hint) = interest.try_recv() {
            match hint {
                Interest::Settled(done) => settled.push(done),
                Interest::Room(room) => {
                    if wants(&room) {
                        wanted.insert(room.clone());
                    } else {
                        wanted.remove(&room);
                    }
                    shared.handled(Interest::Room(room));
                }
                p @ Interest::Publish(_) => held.push(p),
            }
        }
        let mut channels: Vec<String> = wanted.iter().map(|r| shared.room_channel(r)).collect();
        // Questions from other nodes, and their answers to this one.
        channels.push(shared.control_channel());
        channels.push(shared.answers_channel(&shared.node));
        let mut ok = true;
        for chunk in channels.chunks(SUBSCRIBE_CHUNK) {
            if let Err(e) = timed(sink.subscribe(chunk)).await {
                outage.down(&e);
                ok = false;
                break;
            }
        }
        if !ok {
            // Held publications cannot go out in order now: lost, and
            // counted (their publishers are told).
            let lost = held.len();
            held.clear();
            if lost > 0 {
                shared.unsettled.fetch_sub(lost as u64, Ordering::SeqCst);
                shared.not_carried(lost, "Redis failed while subscribing");
            }
            tokio::time::sleep(backoff(attempt)).await;
            attempt += 1;
            continue;
        }
        attempt = 0;
        outage.up();
        for done in settled.drain(..) {
            let _ = done.send(());
        }
        for p in held.drain(..) {
            shared.handled(p);
        }
        shared.metrics.broker_subscriptions.set(wanted.len() as u64);
        shared.set(&shared.subscribed, true);
        let lost = loop {
            tokio::select! {
                m = stream.next() => match m {
                    Some(m) => shared.receive(m.get_channel_name(), m.get_payload_bytes()),
                    None => break "the connection closed".to_owned(),
                },
                hint = interest.recv() => {
                    let room = match hint {
                        None => return,
                        Some(Interest::Settled(done)) => {
                            let _ = done.send(());
                            continue;
                        }
                        Some(p @ Interest::Publish(_)) => {
                            shared.handled(p);
                            continue;
                        }
                        Some(Interest::Room(room)) => room,
                    };
                    let channel = shared.room_channel(&room);
                    let r = if wants(&room) {
                        if wanted.insert(room) { timed(sink.subscribe(&channel)).await } else { Ok(()) }
                    } else if wanted.remove(&room) {
                        timed(sink.unsubscribe(&channel)).await
                    } else {
                        Ok(())
                    };
                    shared.unsettled.fetch_sub(1, Ordering::SeqCst);
                    shared.metrics.broker_subscriptions.set(wanted.len() as u64);
                    if let Err(e) = r {
                        break e;
                    }
                }
            }
        };
        shared.set(&shared.subscribed, false);
        outage.down(&lost);
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// This node's heartbeat in `<prefix>:nodes`, and the count of live nodes.
async fn heartbeat(shared: Arc<Shared>) {
    let key = nodes_key(&shared.prefix);
    let counts_key = node_connections_key(&shared.prefix);
    let ttl = shared.node_ttl.as_millis() as u64;
    let every = (shared.node_ttl / 3).max(Duration::from_millis(100));
    let mut attempt = 0u32;
    loop {
        let mut conn = match timed(shared.client.get_multiplexed_async_connection()).await {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
                continue;
            }
        };
        attempt = 0;
        loop {
            let now = now_ms();
            let stale = now.saturating_sub(ttl) as f64;
            let connections = shared.local().map_or(0, |l| l.connections());
            let mut pipe = redis::pipe();
            pipe.zadd(&key, &shared.node, now)
                .ignore()
                .hset(&counts_key, &shared.node, connections)
                .ignore()
                .zrangebyscore(&key, "-inf", stale);
            let dead = match timed(pipe.query_async::<(Vec<String>,)>(&mut conn)).await {
                Ok((dead,)) => dead,
                Err(_) => break,
            };
            for d in dead {
                let claimed = timed(
                    redis::cmd("ZREM")
                        .arg(&key)
                        .arg(&d)
                        .query_async::<u64>(&mut conn),
                )
                .await;
                if claimed == Ok(1) {
                    let _ = timed(
                        redis::cmd("HDEL")
                            .arg(&counts_key)
                            .arg(&d)
                            .query_async::<u64>(&mut conn),
                    )
                    .await;
                    tracing::info!(node = %d, "cluster node gone (no heartbeat); cleaning up after it");
                    if let Some(f) = shared.gone.get() {
                        f(&d);
                    }
                }
            }
            let mut pipe = redis::pipe();
            pipe.cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .hgetall(&counts_key);
            type Live = (Vec<(String, f64)>, HashMap<String, u64>);
            match timed(pipe.query_async::<Live>(&mut conn)).await {
                Ok((live, counts)) => {
                    let n = live.len() as u64;
                    shared.metrics.cluster_nodes.set(n);
                    *shared.node_list.lock() = live
                        .into_iter()
                        .map(|(id, at)| super::NodeInfo {
                            connections: counts.get(&id).copied(),
                            heartbeat_at: at as u64,
                            id,
                        })
                        .collect();
                }
                Err(_) => break,
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// The header of a message on the wire.
#[derive(Debug, Serialize, Deserialize)]
struct Header<'a> {
    /// The publishing node.
    #[serde(borrow)]
    node: Cow<'a, str>,
    #[serde(borrow)]
    event: Cow<'a, str>,
    /// The event's JSON data, as text.
    #[serde(borrow)]
    data: Cow<'a, str>,
    /// The plugin whose attribute sets the conditions read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    audience: Option<Audience>,
    /// The arguments, for an event emitted with several.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    args: Option<Cow<'a, str>>,
    /// The instance (connection, id) the event skips: carried for the
    /// history of recorded rooms, where its sender may come back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    except: Option<(u64, String)>,
}

/// Why a message from Redis was not understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("the message is cut short")]
    Short,
    #[error("bad header: {0}")]
    Header(String),
}

/// A publication as its message on the wire. The `except` of its filter
/// stays behind: it names a connection of the publishing node, which never
/// delivers its own messages again.
pub fn encode(node: &str, p: &Publication) -> Vec<u8> {
    let header = Header {
        node: node.into(),
        event: (*p.event).into(),
        data: (*p.data).into(),
        owner: p.filter.owner.as_deref().map(str::to_owned),
        conditions: p.filter.conditions.to_vec(),
        audience: p.filter.audience.as_deref().cloned(),
        args: p.args.as_deref().map(Cow::Borrowed),
        except: p.filter.except.as_ref().map(|(c, id)| (*c, id.to_string())),
    };
    let header = serde_json::to_vec(&header).unwrap_or_default();
    let size = 8 + header.len() + p.attachments.iter().map(|a| 4 + a.len()).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&(p.attachments.len() as u32).to_le_bytes());
    for a in p.attachments.iter() {
        out.extend_from_slice(&(a.len() as u32).to_le_bytes());
        out.extend_from_slice(a);
    }
    out
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], DecodeError> {
    if buf.len() < n {
        return Err(DecodeError::Short);
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

fn take_u32(buf: &mut &[u8]) -> Result<usize, DecodeError> {
    let b = take(buf, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// A message of room `room`: the publishing node and the publication.
pub fn decode(room: &str, payload: &[u8]) -> Result<(String, Publication), DecodeError> {
    let mut buf = payload;
    let n = take_u32(&mut buf)?;
    let header: Header<'_> = serde_json::from_slice(take(&mut buf, n)?)
        .map_err(|e| DecodeError::Header(e.to_string()))?;
    let count = take_u32(&mut buf)?;
    // Each attachment takes at least its length's four bytes.
    if count > buf.len() / 4 {
        return Err(DecodeError::Short);
    }
    let mut attachments = Vec::with_capacity(count);
    for _ in 0..count {
        let len = take_u32(&mut buf)?;
        attachments.push(take(&mut buf, len)?.to_vec());
    }
    let p = Publication {
        room: room.into(),
        event: header.event.as_ref().into(),
        data: header.data.as_ref().into(),
        attachments: attachments.into(),
        filter: Filter {
            except: header.except.map(|(c, id)| (c, id.into())),
            owner: header.owner.map(Into::into),
            conditions: header.conditions.into(),
            audience: header.audience.map(Arc::new),
            recorded: None,
        },
        args: header.args.map(|a| a.as_ref().into()),
        offset: None,
    };
    Ok((header.node.into_owned(), p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publication() -> Publication {
        Publication {
            room: "chat:1".into(),
            event: "message".into(),
            data: r#"{"text":"hé \"quoted\""}"#.into(),
            attachments: vec![vec![1, 2, 3], vec![], vec![0xff; 300]].into(),
            filter: Filter {
                except: Some((7, "/chat".into())),
                owner: Some("mew".into()),
                conditions: vec![Condition {
                    attribute: "rel".into(),
                    keys: vec!["m:u1".into()],
                    exclude: true,
                }]
                .into(),
                audience: Some(Arc::new(Audience {
                    users: vec!["u2".into()],
                    holding: Some(("rel".into(), "f:u3".into())),
                })),
                recorded: None,
            },
            args: None,
            offset: None,
        }
    }

    #[test]
    fn a_publication_crosses_the_wire_whole_but_its_except() {
        let p = publication();
        let bytes = encode("node-a", &p);
        let (node, q) = decode("chat:1", &bytes).unwrap();
        assert_eq!(node, "node-a");
        assert_eq!(
            (&*q.room, &*q.event, &*q.data),
            ("chat:1", "message", &*p.data)
        );
        assert_eq!(q.attachments, p.attachments);
        assert_eq!(q.filter.owner.as_deref(), Some("mew"));
        assert_eq!(q.filter.conditions, p.filter.conditions);
        assert_eq!(q.filter.audience.as_deref(), p.filter.audience.as_deref());
        // Carried: a recorded room's history keeps it, for a sender that
        // comes back on another node.
        assert_eq!(q.filter.except, p.filter.except);
    }

    #[test]
    fn a_damaged_message_is_an_error_not_a_panic() {
        let bytes = encode("n", &publication());
        for cut in [0, 3, 4, 10, bytes.len() - 1] {
            assert!(decode("r", &bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut lying = bytes.clone();
        lying[0] = 0xff;
        assert!(decode("r", &lying).is_err());
        // A count of attachments larger than what follows.
        let mut many = encode(
            "n",
            &Publication {
                attachments: Arc::from(Vec::new()),
                ..publication()
            },
        );
        let at = many.len() - 4;
        many[at..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode("r", &many).unwrap_err(), DecodeError::Short);
    }

    #[test]
    fn names_live_under_the_prefix() {
        assert_eq!(
            room_channel("chanhost", "mk:main:u1"),
            "chanhost:room:mk:main:u1"
        );
        assert_eq!(nodes_key("prod"), "prod:nodes");
        assert_eq!(control_channel("p"), "p:control");
        assert_eq!(answers_channel("p", "n1"), "p:node:n1:answers");
    }
}
