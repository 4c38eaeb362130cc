//! The node owns everything of one host process and ties it together: the
//! validated config, the hub, auth, the broker, the plugin registry, the
//! key-value store and the metrics. Protocol sessions and the HTTP API talk
//! to the node; plugins reach it through [`HostServices`].
//!
//! - [`instances`]: the life cycle of a channel instance (open, replace,
//!   refuse, end), the one sequence both protocol sessions call.
//! - `folder`: the plugins folder kept in line with the registry, and its
//!   [`watcher`].
//! - `services`: the host imports plugins call ([`HostServices`]), and
//!   their ownership checks.
//!
//! Here: building the node, connections and presence, publishing, and the
//! figures of `/metrics`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::broker::{
    Broker, BrokerError, BrokerState, LocalDelivery, MemoryBroker, Publication, RedisBroker,
    RedisBrokerOptions,
};
use crate::config::Config;
use crate::hub::{ConnHandle, ConnId, Filter, Hub, SharedEvent};
use crate::metrics::{Metrics, NodeFigures, PluginFigures};
use crate::plugin::engine::PluginError;
use crate::plugin::kv::{KvStore, MemoryKv, RedisKv};
use crate::plugin::{DisconnectReason, HostServices, InstanceRef, PluginEngine, Registry};
use crate::presence::{MemoryPresence, Presence, RedisPresence};
use crate::protocol::publish::RoomsBody;

mod folder;
pub mod instances;
mod recovery;
mod services;
pub mod watcher;

pub use instances::{OpenInstance, Opened};
pub use recovery::{RecoverInstance, Recovered};

/// The room where the host announces presence changes: event `online`
/// when a user's first connection is identified, `offline` when their last
/// one closes, data `{"userId": ...}`. Plugins listen to it.
pub use crate::presence::PRESENCE_ROOM;

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("[cluster] redis: {0}")]
    Cluster(String),
    #[error("plugins folder {0} does not exist (set `plugins` in the config or pass --plugins)")]
    NoPluginsDir(String),
    #[error("plugins path {0} is not a folder")]
    PluginsNotDir(String),
    #[error("cannot read plugins folder {path}: {source}")]
    ReadPluginsDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot watch plugins folder {path}: {source}")]
    Watch { path: String, source: notify::Error },
    #[error(transparent)]
    Plugin(#[from] PluginError),
}

/// One host process.
pub struct Node {
    config: Config,
    /// Who is online (this node, or the cluster).
    presence: Box<dyn Presence>,
    hub: Hub,
    auth: Authenticator,
    metrics: Arc<Metrics>,
    broker: Arc<dyn Broker>,
    plugins: Registry,
    /// Client connection caps (`[limits] max_connections`, per address).
    admission: Arc<crate::server::admission::Admission>,
    kv: Box<dyn KvStore>,
    /// Cancelled on SIGTERM/SIGINT: sessions close with 1001.
    shutdown: CancellationToken,
    next_conn: AtomicU64,
    /// The socket.io adapter protocol (`[socketio.adapter]`), once started.
    adapter: std::sync::OnceLock<Arc<crate::adapter::SioAdapter>>,
    /// Connection state recovery (`[socketio.recovery]`).
    recovery: Option<Arc<dyn crate::recovery::Recovery>>,
    /// The session writer, where sessions are kept while connected.
    session_ops: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<recovery::SessionOp>>,
    /// The address the node listens on, once bound.
    bound: std::sync::OnceLock<std::net::SocketAddr>,
}

impl Node {
    /// Builds a node. Plugins are not loaded yet (see [`Node::load_plugins`]).
    pub fn new(config: Config) -> Result<Arc<Self>, NodeError> {
        let engine = PluginEngine::new(&config.plugin_runtime, Some(config.cache_dir.clone()))?;
        let metrics = Arc::new(Metrics::default());
        let shutdown = CancellationToken::new();
        let mut redis_broker = None;
        let broker: Arc<dyn Broker> = match &config.cluster {
            None => {
                metrics.broker_up.set(1);
                Arc::new(MemoryBroker::default())
            }
            Some(c) => {
                let b = RedisBroker::start(RedisBrokerOptions {
                    url: c.redis.clone(),
                    prefix: c.prefix.clone(),
                    node_ttl: c.node_ttl,
                    metrics: metrics.clone(),
                    shutdown: shutdown.clone(),
                    recovery: config.socketio.recovery.as_ref().map(|r| {
                        crate::broker::redis::Numbering {
                            cap: r.history_per_room,
                            window: r.max_disconnection,
                        }
                    }),
                })
                .map_err(|e| NodeError::Cluster(e.to_string()))?;
                tracing::info!(node = b.node_id(), redis = %crate::pubsub::redacted(&c.redis), prefix = %c.prefix, "cluster node");
                let b = Arc::new(b);
                redis_broker = Some(b.clone());
                b
            }
        };
        let tables: HashMap<String, String> = config
            .plugin_tables
            .keys()
            .map(|k| (k.clone(), config.plugin_table_json(k)))
            .collect();
        let kv: Box<dyn KvStore> = match &config.cluster {
            Some(c) => Box::new(
                RedisKv::new(&c.redis, &c.prefix).map_err(|e| NodeError::Cluster(e.to_string()))?,
            ),
            None => Box::new(MemoryKv::default()),
        };
        let recovery = recovery::store(&config, &metrics)?;
        let mut presence_error = None;
        let node = Arc::new_cyclic(|weak: &Weak<Node>| {
            let services: Weak<dyn HostServices> = weak.clone();
            let announcer = weak.clone();
            let announce: crate::presence::Announce = Box::new(move |user, event| {
                if let Some(n) = announcer.upgrade() {
                    n.presence_changed(user, event);
                }
            });
            let presence: Box<dyn Presence> = match (&config.cluster, &redis_broker) {
                (Some(c), Some(b)) => {
                    let here = weak.clone();
                    let started =
                        RedisPresence::start(crate::presence::redis::RedisPresenceOptions {
                            url: c.redis.clone(),
                            prefix: c.prefix.clone(),
                            node: b.node_id().to_owned(),
                            announce,
                            here: Box::new(move || {
                                here.upgrade().map_or_else(Vec::new, |n| {
                                    n.hub.online_users().iter().map(|u| u.to_string()).collect()
                                })
                            }),
                        });
                    match started {
                        Ok(p) => Box::new(p),
                        Err(e) => {
                            presence_error = Some(e.to_string());
                            Box::new(MemoryPresence::new(Box::new(|_, _| {})))
                        }
                    }
                }
                _ => Box::new(MemoryPresence::new(announce)),
            };
            Node {
                presence,
                auth: Authenticator::new(&config),
                hub: Hub::new(metrics.clone()),
                metrics,
                broker: broker.clone(),
                plugins: Registry::new(engine, services, tables),
                admission: crate::server::admission::Admission::of(&config.limits),
                kv,
                shutdown,
                next_conn: AtomicU64::new(1),
                adapter: std::sync::OnceLock::new(),
                recovery,
                session_ops: std::sync::OnceLock::new(),
                bound: std::sync::OnceLock::new(),
                config,
            }
        });
        if let Some(e) = presence_error {
            return Err(NodeError::Cluster(e));
        }
        let local: Weak<dyn LocalDelivery> = Arc::downgrade(&node) as Weak<Node>;
        broker.attach(local);
        if let Some(b) = &redis_broker {
            let n = Arc::downgrade(&node);
            b.on_node_gone(move |dead| {
                if let Some(n) = n.upgrade() {
                    n.presence.node_gone(dead);
                }
            });
        }
        if node.config.cluster.is_some() {
            let b = broker.clone();
            node.hub.observe_rooms(move |room| b.interest_changed(room));
        }
        node.start_recovery();
        Ok(node)
    }

    /// The validated config the node was built with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The socket.io adapter protocol, when `[socketio.adapter]` is on.
    pub fn adapter(&self) -> Option<&Arc<crate::adapter::SioAdapter>> {
        self.adapter.get()
    }

    pub(crate) fn set_adapter(&self, a: Arc<crate::adapter::SioAdapter>) {
        let _ = self.adapter.set(a);
    }

    /// A publish that starts here, for the socket.io servers too.
    pub(crate) fn to_adapter(&self, p: &Publication) {
        if let Some(a) = self.adapter.get() {
            a.forward(p);
        }
    }

    /// Connections, instances, rooms and fan-out.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Verifies client credentials.
    pub fn auth(&self) -> &Authenticator {
        &self.auth
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The loaded plugins.
    pub fn plugins(&self) -> &Registry {
        &self.plugins
    }

    /// Client connection caps.
    pub fn admission(&self) -> &Arc<crate::server::admission::Admission> {
        &self.admission
    }

    /// Cancelled when the process shuts down.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// A fresh connection id.
    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a new connection; an identified one may bring its user online.
    pub fn open_conn(&self, conn: Arc<ConnHandle>) {
        let user = conn.identity().map(|i| i.user_id.clone());
        if self.hub.register(conn) == 1 {
            self.presence.arrived(user.as_deref().unwrap_or_default());
        }
    }

    /// Gives a connection its identity (Socket.IO plugins, after checking a
    /// token). Returns the user's number of connections on this node.
    pub fn identify(
        &self,
        id: ConnId,
        identity: crate::auth::Identity,
    ) -> Result<usize, crate::hub::IdentifyError> {
        let user = identity.user_id.clone();
        let n = self.hub.identify(id, identity)?;
        if n == 1 {
            self.presence.arrived(&user);
        }
        Ok(n)
    }

    /// Announces a presence change in `chanhost:presence`.
    fn presence_changed(&self, user: &str, event: &str) {
        let data = serde_json::json!({ "userId": user }).to_string();
        self.publish(PRESENCE_ROOM, event, data.into());
    }

    /// Forgets a closed connection: rooms, captures, instances (each
    /// plugin hears `disconnect` with `connection-closed`); the user goes
    /// offline if it was their last connection.
    ///
    /// `why` is the engine.io reason a Socket.IO session ended for: when
    /// it is recoverable, the sessions of its recorded sockets are kept
    /// and their plugins hear `connection-lost`.
    pub fn close_conn(&self, id: ConnId, why: Option<&str>) {
        let kept = match (why, self.hub.conn(id)) {
            (Some(why), Some(conn)) if crate::recovery::recoverable(why) => {
                self.keep_sessions(&conn)
            }
            _ => Vec::new(),
        };
        let gone = self.hub.unregister(id);
        for (inst_id, inst) in gone.instances {
            let lost = kept.iter().any(|k| **k == *inst_id);
            if !lost {
                self.forget_session(id, &inst);
            }
            if let Some(p) = self.plugins.plugin(&inst.plugin) {
                let reason = if lost {
                    DisconnectReason::ConnectionLost
                } else {
                    DisconnectReason::ConnectionClosed
                };
                p.disconnect(
                    InstanceRef {
                        connection: id,
                        id: inst_id.to_string(),
                    },
                    reason,
                );
            }
        }
        if let Some(user) = gone.went_offline {
            self.presence.left(&user);
        }
    }

    /// Publishes an event to a room on every node it can reach (this one
    /// always). `data` must be JSON.
    pub fn publish(&self, room: &str, event: &str, data: Arc<str>) {
        self.metrics.publishes.inc();
        let p = Publication {
            room: room.into(),
            event: event.into(),
            data,
            attachments: Arc::from(Vec::new()),
            filter: Filter::default(),
            args: None,
            offset: None,
        };
        self.to_adapter(&p);
        self.broker.publish_best_effort(p);
    }

    /// Delivers an event to this node's members and listeners of a room,
    /// without the broker (figures that describe this node only).
    pub fn deliver_local_event(&self, room: &str, event: &str, data: Arc<str>) {
        self.deliver_local_filtered(room, event, data, Filter::default());
    }

    /// Delivers an event to this node's members passing `filter` and to
    /// the room's listeners, without the broker: for what every node reads
    /// itself (Misskey's bus), so nobody gets it twice.
    pub fn deliver_local_filtered(&self, room: &str, event: &str, data: Arc<str>, filter: Filter) {
        self.metrics.publishes.inc();
        self.deliver_local(&Publication {
            room: room.into(),
            event: event.into(),
            data,
            attachments: Arc::from(Vec::new()),
            filter,
            args: None,
            offset: None,
        });
    }

    /// Delivers an event to this node's members and listeners of a room,
    /// without the broker or the socket.io adapter.
    pub fn deliver_event(&self, room: &str, ev: Arc<SharedEvent>) {
        self.deliver_filtered(&room.into(), ev, &Filter::default());
    }

    fn deliver_filtered(&self, room: &Arc<str>, ev: Arc<SharedEvent>, filter: &Filter) {
        self.hub.deliver(room, &ev, filter);
        // Listeners hear a publication once: with the delivery to the
        // members that are not recorded sockets.
        if filter.recorded == Some(true) {
            return;
        }
        for name in self.hub.listeners(room) {
            if let Some(plugin) = self.plugins.plugin(&name) {
                plugin.event(room.clone(), ev.clone());
            }
        }
    }

    /// Publishes events to every node: all of them, or none anywhere when
    /// they cannot be carried now (the API answers 503 and the publisher
    /// may retry). What it hands back resolves once the cluster's Redis
    /// took them.
    pub fn publish_batch(
        &self,
        batch: Vec<Publication>,
    ) -> Result<crate::broker::Carried, BrokerError> {
        let n = batch.len() as u64;
        let carried = if self.adapter.get().is_some() {
            let carried = self.broker.publish(batch.clone())?;
            for p in &batch {
                self.to_adapter(p);
            }
            carried
        } else {
            self.broker.publish(batch)?
        };
        self.metrics.publishes.add(n);
        Ok(carried)
    }

    /// The whole `/metrics` text.
    pub fn render_metrics(&self) -> String {
        let plugins = self
            .plugins
            .all()
            .iter()
            .map(|p| PluginFigures {
                name: p.name.to_string(),
                hooks: p.metrics.by_hook().collect(),
                dropped: p.metrics.dropped.load(Ordering::Relaxed),
                refused_backoff: p.metrics.refused_backoff.load(Ordering::Relaxed),
                rebuilds: p.metrics.rebuilds.load(Ordering::Relaxed),
                batches: p.metrics.batches.load(Ordering::Relaxed),
                retried: p.metrics.retried.load(Ordering::Relaxed),
            })
            .collect();
        let figures = NodeFigures {
            rooms: self.hub.room_count(),
            connections_max: self.admission.max(),
            refused: self.admission.refused().to_vec(),
            code_loads: self.plugins.code_loads(),
            compiling: self.plugins.compiling(),
            plugins,
        };
        crate::metrics::render(&self.metrics, &figures)
    }

    /// In a cluster: takes a node number from Redis, so this node's
    /// connection ids (`number << 32 | n`, below 2^53 for JavaScript
    /// plugins) are unique across the cluster. Called before the node
    /// serves; without Redis a random number is taken (and said).
    pub async fn join_cluster(&self) {
        if self.config.cluster.is_none() {
            return;
        }
        let number = match self.broker.node_number().await {
            Some(n) => n,
            None => {
                let mut b = [0u8; 8];
                let _ = getrandom::fill(&mut b);
                tracing::warn!("cluster: Redis cannot be reached for a node number; connection ids use a random one (unique with high probability)");
                u64::from_le_bytes(b)
            }
        };
        let number = (number % ((1 << 21) - 1)) + 1;
        self.next_conn.store((number << 32) | 1, Ordering::Relaxed);
        tracing::info!(
            number,
            "cluster node number (connection ids start at number << 32)"
        );
    }

    /// Takes this node out of the cluster's count (on shutdown).
    pub async fn leave_cluster(&self) {
        self.broker.leave().await;
    }

    /// Applies a rooms API request to this node's connections: joins (or
    /// leaves) the rooms with the instances of the user's connections, or of
    /// the one connection, here. Returns (connections, instances) touched.
    pub fn apply_rooms(&self, b: &RoomsBody, join: bool) -> (usize, usize) {
        let conns = match (&b.user, b.connection) {
            (Some(u), _) => self.hub.user_conns(u),
            (None, Some(c)) => self.hub.conn(c).into_iter().collect(),
            (None, None) => Vec::new(),
        };
        let mut instances = 0;
        for conn in &conns {
            let slots: Vec<_> = conn
                .instances_where(|i| b.channel.as_deref().is_none_or(|c| *i.channel == *c))
                .into_iter()
                .map(|i| i.slot)
                .collect();
            instances += slots.len();
            for slot in slots {
                for room in &b.rooms {
                    if join {
                        self.hub.join(conn, slot.clone(), room);
                    } else {
                        self.hub.leave(conn, &slot, room);
                    }
                }
            }
        }
        (conns.len(), instances)
    }

    /// Applies a rooms API request on every other node of the cluster;
    /// what they touched. Refused when the cluster cannot be reached.
    pub async fn rooms_elsewhere(
        &self,
        b: &RoomsBody,
        join: bool,
    ) -> Result<(usize, usize), BrokerError> {
        let ask = serde_json::json!({ "rooms": { "join": join, "body": b } });
        let answers = self.broker.ask_all(ask).await?;
        let field = |a: &serde_json::Value, k: &str| {
            a.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0) as usize
        };
        Ok(answers.iter().fold((0, 0), |(c, i), a| {
            (c + field(a, "connections"), i + field(a, "instances"))
        }))
    }

    /// Users online (on this node, or across the cluster).
    pub fn online_users(&self) -> Vec<String> {
        let here = self
            .hub
            .online_users()
            .iter()
            .map(|u| u.to_string())
            .collect();
        self.presence.online_users(here)
    }

    /// Records the address the node listens on (port 0 configured: the
    /// one the system chose).
    pub fn set_bound(&self, addr: std::net::SocketAddr) {
        let _ = self.bound.set(addr);
    }

    /// The address the node listens on (the configured one until bound).
    pub fn bound_addr(&self) -> std::net::SocketAddr {
        self.bound.get().copied().unwrap_or(self.config.listen)
    }

    /// How many users are online (on this node, or across the cluster).
    /// With `[cluster]` it asks Redis and waits for the answer: call it
    /// off the async runtime.
    pub fn online_count(&self) -> usize {
        self.presence.online_count(self.hub.online_count())
    }

    /// The cluster broker's state and the number of live nodes.
    pub fn cluster(&self) -> (BrokerState, u64) {
        (self.broker.state(), self.broker.nodes())
    }

    /// This node's id in the cluster (none without `[cluster]`).
    pub fn broker_node_id(&self) -> Option<String> {
        self.broker.node_id().map(str::to_owned)
    }

    /// The cluster's live nodes at the last heartbeat (none without
    /// `[cluster]`).
    pub fn broker_node_list(&self) -> Vec<crate::broker::NodeInfo> {
        self.broker.node_list()
    }

    /// Closes every connection of `user` on this node; how many.
    fn disconnect_user_here(&self, user: &str) -> usize {
        let conns = self.hub.user_conns(user);
        for c in &conns {
            c.request_close(1000, "disconnected by an operator");
        }
        conns.len()
    }

    /// Closes every connection of `user` on every node (the other nodes
    /// first: when the cluster cannot be reached, nothing is done); how
    /// many.
    pub async fn disconnect_user(&self, user: &str) -> Result<usize, BrokerError> {
        let answers = self
            .broker
            .ask_all(serde_json::json!({ "disconnect_user": user }))
            .await?;
        let elsewhere: u64 = answers
            .iter()
            .filter_map(|a| a.get("connections").and_then(serde_json::Value::as_u64))
            .sum();
        Ok(self.disconnect_user_here(user) + elsewhere as usize)
    }
}

impl LocalDelivery for Node {
    fn has_audience(&self, room: &str) -> bool {
        self.hub.has_audience(room)
    }

    fn connections(&self) -> u64 {
        self.hub.conn_count() as u64
    }

    /// Another node's rooms API request or operator action, applied
    /// here.
    fn answer(&self, ask: &serde_json::Value) -> serde_json::Value {
        if let Some(user) = ask
            .get("disconnect_user")
            .and_then(serde_json::Value::as_str)
        {
            let n = self.disconnect_user_here(user);
            return serde_json::json!({ "connections": n });
        }
        let Some(r) = ask.get("rooms") else {
            return serde_json::Value::Null;
        };
        let join = r.get("join").and_then(serde_json::Value::as_bool);
        let body = r
            .get("body")
            .and_then(|b| serde_json::from_value::<RoomsBody>(b.clone()).ok());
        let (Some(join), Some(body)) = (join, body) else {
            return serde_json::Value::Null;
        };
        let (connections, instances) = self.apply_rooms(&body, join);
        serde_json::json!({ "connections": connections, "instances": instances })
    }

    fn deliver_local(&self, p: &Publication) {
        let deliver = &mut |p: &Publication| {
            let ev = SharedEvent::numbered(
                &p.event,
                p.data.clone(),
                p.args.clone(),
                p.attachments.clone(),
                p.offset,
            );
            self.deliver_filtered(&p.room, ev, &p.filter);
        };
        // Publications to recorded rooms are numbered on their way here
        // (by this node's sequencer, or in Redis by the cluster's broker).
        if let Some(r) = &self.recovery {
            if p.offset.is_none() && r.records(&p.room) && r.sequence(p, deliver) {
                return;
            }
        }
        deliver(p)
    }
}
