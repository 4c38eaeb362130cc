//! The node owns everything of one host process and ties it together: the
//! validated config, the hub, auth, the broker, the plugin registry, the
//! key-value store and the metrics. Protocol sessions and the HTTP API talk
//! to the node; plugins reach it through [`HostServices`].
//!
//! - [`instances`]: the life cycle of a channel instance (open, replace,
//!   refuse, end), the one sequence both protocol sessions call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use serde::de::IgnoredAny;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::broker::{Broker, LocalDelivery, MemoryBroker, Publication};
use crate::config::Config;
use crate::hub::{
    Condition, ConnHandle, ConnId, Filter, Hub, InstanceState, Outbound, Protocol, SharedEvent,
};
use crate::metrics::{labels, write_family, write_metric, Metrics};
use crate::plugin::engine::PluginError;
use crate::plugin::kv::KvStore;
use crate::plugin::registry::LoadOutcome;
use crate::plugin::watcher::FolderWatch;
use crate::plugin::{
    DisconnectReason, HostServices, IdentityError, InstanceRef, Payload, PluginEngine, PluginSlot,
    Registry,
};
use crate::protocol::socketio;

pub mod instances;
pub use instances::{OpenInstance, Opened};

/// The room where the host announces presence changes: event `online`
/// when a user's first connection is identified, `offline` when their last
/// one closes, data `{"userId": ...}`. Plugins listen to it.
pub const PRESENCE_ROOM: &str = "chanhost:presence";
const PRESENCE_ONLINE: &str = "online";
const PRESENCE_OFFLINE: &str = "offline";

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
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
    pub config: Config,
    pub hub: Hub,
    pub auth: Authenticator,
    pub metrics: Arc<Metrics>,
    pub broker: Arc<dyn Broker>,
    pub plugins: Registry,
    /// Client connection caps (`[limits] max_connections`, per address).
    pub admission: Arc<crate::server::admission::Admission>,
    kv: KvStore,
    /// Cancelled on SIGTERM/SIGINT: sessions close with 1001.
    pub shutdown: CancellationToken,
    next_conn: AtomicU64,
}

fn is_json(s: &str) -> bool {
    serde_json::from_str::<IgnoredAny>(s).is_ok()
}

/// Checks a payload a plugin hands over: JSON, and (with attachments)
/// exactly one placeholder per attachment. Logs and returns false if not.
fn valid_payload(plugin: &str, what: &str, data: &Payload) -> bool {
    if data.attachments.is_empty() {
        if is_json(&data.json) {
            return true;
        }
    } else if let Ok(v) = serde_json::from_str::<serde_json::Value>(&data.json) {
        if socketio::count_placeholders(&v) == data.attachments.len() {
            return true;
        }
        tracing::warn!(
            plugin,
            "{what} whose placeholders do not match its attachments; dropped"
        );
        return false;
    }
    tracing::warn!(plugin, "{what} with invalid JSON data; dropped");
    false
}

impl Node {
    /// Builds a node. Plugins are not loaded yet (see [`Node::load_plugins`]).
    pub fn new(config: Config) -> Result<Arc<Self>, NodeError> {
        let engine = PluginEngine::new(&config.plugin_runtime, Some(config.cache_dir.clone()))?;
        let metrics = Arc::new(Metrics::default());
        let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::default());
        let tables: HashMap<String, String> = config
            .plugin_tables
            .keys()
            .map(|k| (k.clone(), config.plugin_table_json(k)))
            .collect();
        let node = Arc::new_cyclic(|weak: &Weak<Node>| {
            let services: Weak<dyn HostServices> = weak.clone();
            Node {
                auth: Authenticator::new(&config),
                hub: Hub::new(metrics.clone()),
                metrics,
                broker: broker.clone(),
                plugins: Registry::new(engine, services, tables),
                admission: crate::server::admission::Admission::of(&config.limits),
                kv: KvStore::default(),
                shutdown: CancellationToken::new(),
                next_conn: AtomicU64::new(1),
                config,
            }
        });
        let local: Weak<dyn LocalDelivery> = Arc::downgrade(&node) as Weak<Node>;
        broker.attach(local);
        Ok(node)
    }

    /// A fresh connection id.
    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    fn dir_label(&self) -> String {
        self.config.plugins_dir.display().to_string()
    }

    /// Checks the plugins folder and loads every plugin in it. A plugin
    /// that fails to load is reported and skipped; the others serve.
    pub async fn load_plugins(&self) -> Result<(), NodeError> {
        let dir = &self.config.plugins_dir;
        if !dir.exists() {
            return Err(NodeError::NoPluginsDir(self.dir_label()));
        }
        if !dir.is_dir() {
            return Err(NodeError::PluginsNotDir(self.dir_label()));
        }
        self.reconcile_plugins().await
    }

    /// Brings the registry in line with the folder: loads new and changed
    /// files, removes plugins whose file is gone.
    pub async fn reconcile_plugins(&self) -> Result<(), NodeError> {
        let files = Registry::scan(&self.config.plugins_dir).map_err(|source| {
            NodeError::ReadPluginsDir {
                path: self.dir_label(),
                source,
            }
        })?;
        let mut present = Vec::new();
        for path in &files {
            let Some(name) = crate::plugin::registry::plugin_name(path) else {
                continue;
            };
            present.push(name.clone());
            match self.plugins.load_file(path).await {
                Ok(LoadOutcome::Unchanged) => {}
                Ok(LoadOutcome::Added(m)) => {
                    self.metrics.reloads_ok.inc();
                    tracing::info!(
                        plugin = name,
                        file = %path.display(),
                        version = m.version,
                        channels = ?m.channels.iter().map(|c| &c.name).collect::<Vec<_>>(),
                        namespaces = ?m.namespaces,
                        "plugin loaded"
                    );
                }
                Ok(LoadOutcome::Replaced {
                    manifest,
                    dropped_channels,
                }) => {
                    self.metrics.reloads_ok.inc();
                    tracing::info!(
                        plugin = name,
                        file = %path.display(),
                        version = manifest.version,
                        "plugin replaced; connections keep their channels"
                    );
                    if !dropped_channels.is_empty() {
                        self.end_plugin_instances(&name, Some(&dropped_channels));
                    }
                }
                Err(e) => {
                    self.metrics.reloads_failed.inc();
                    let serving = if self.plugins.plugin(&name).is_some() {
                        "; the previous version keeps serving"
                    } else {
                        ""
                    };
                    tracing::error!(
                        plugin = name,
                        file = %path.display(),
                        "plugin not loaded: {e}{serving}"
                    );
                }
            }
        }
        for name in self.plugins.names() {
            if !present.iter().any(|p| **p == *name) && self.plugins.remove(&name).await.is_some() {
                self.hub.unlisten_all(&name);
                tracing::info!(plugin = &*name, "plugin removed; its channel instances end");
                self.end_plugin_instances(&name, None);
            }
        }
        Ok(())
    }

    /// Watches the plugins folder and reconciles on every settled change.
    pub fn spawn_watcher(self: &Arc<Self>) -> Result<(), NodeError> {
        let mut watch =
            FolderWatch::new(&self.config.plugins_dir).map_err(|source| NodeError::Watch {
                path: self.dir_label(),
                source,
            })?;
        let node = Arc::downgrade(self);
        tokio::spawn(async move {
            while watch.changed().await.is_some() {
                let Some(node) = node.upgrade() else { break };
                if let Err(e) = node.reconcile_plugins().await {
                    tracing::error!("{e}");
                }
            }
        });
        Ok(())
    }

    /// Registers a new connection; an identified one may bring its user online.
    pub fn open_conn(&self, conn: Arc<ConnHandle>) {
        let user = conn.identity().map(|i| i.user_id.clone());
        if self.hub.register(conn) == 1 {
            self.presence_changed(user.as_deref().unwrap_or_default(), PRESENCE_ONLINE);
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
            self.presence_changed(&user, PRESENCE_ONLINE);
        }
        Ok(n)
    }

    fn presence_changed(&self, user: &str, event: &str) {
        let data = serde_json::json!({ "userId": user }).to_string();
        self.publish(PRESENCE_ROOM, event, data.into());
    }

    /// Forgets a closed connection: rooms, captures, instances (each
    /// plugin hears `disconnect` with `connection-closed`); the user goes
    /// offline if it was their last connection.
    pub fn close_conn(&self, id: ConnId) {
        let gone = self.hub.unregister(id);
        for (inst_id, inst) in gone.instances {
            if let Some(p) = self.plugins.plugin(&inst.plugin) {
                p.disconnect(
                    InstanceRef {
                        connection: id,
                        id: inst_id.to_string(),
                    },
                    DisconnectReason::ConnectionClosed,
                );
            }
        }
        if let Some(user) = gone.went_offline {
            self.presence_changed(&user, PRESENCE_OFFLINE);
        }
    }

    /// Publishes an event to a room on every node. `data` must be JSON.
    pub fn publish(&self, room: &str, event: &str, data: Arc<str>) {
        self.publish_filtered(room, event, data, Filter::default())
    }

    /// Delivers an event to this node's members and listeners of a room,
    /// without the broker (figures that describe this node only).
    pub fn deliver_local_event(&self, room: &str, event: &str, data: Arc<str>) {
        self.metrics.publishes.inc();
        self.deliver_local(&Publication {
            room: room.into(),
            event: event.into(),
            data,
            attachments: Arc::from(Vec::new()),
            filter: Filter::default(),
        });
    }

    /// Publishes an event that only the members passing `filter` receive.
    pub fn publish_filtered(&self, room: &str, event: &str, data: Arc<str>, filter: Filter) {
        self.metrics.publishes.inc();
        let p = Publication {
            room: room.into(),
            event: event.into(),
            data,
            attachments: Arc::from(Vec::new()),
            filter,
        };
        if let Err(e) = self.broker.publish(p) {
            tracing::error!("publish to {room} failed: {e}");
        }
    }

    /// A connection on which the plugin serves at least one instance: the
    /// only connections it may close, identify or tag.
    fn served(&self, plugin: &str, connection: u64) -> Result<Arc<ConnHandle>, IdentityError> {
        let conn = self
            .hub
            .conn(connection)
            .ok_or(IdentityError::NoConnection)?;
        if !conn.any_instance(|i| &*i.plugin == plugin) {
            tracing::warn!(
                plugin,
                connection,
                "plugin addressed a connection it does not serve; ignored"
            );
            return Err(IdentityError::NotServed);
        }
        Ok(conn)
    }

    /// The instance a plugin addresses, if it exists and belongs to it.
    fn owned(
        &self,
        plugin: &str,
        target: &InstanceRef,
    ) -> Option<(Arc<ConnHandle>, InstanceState)> {
        let conn = self.hub.conn(target.connection)?;
        let inst = conn.instance(&target.id)?;
        if &*inst.plugin != plugin {
            tracing::warn!(
                plugin,
                owner = &*inst.plugin,
                "plugin addressed an instance of another plugin; ignored"
            );
            return None;
        }
        Some((conn, inst))
    }

    /// The whole `/metrics` text.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        self.metrics.render(self.hub.room_count(), &mut out);
        write_metric(
            &mut out,
            "chanhost_connections_max",
            "gauge",
            "Client connections the node accepts at once ([limits] max_connections).",
            self.admission.max() as u64,
        );
        let refused: Vec<(String, u64)> = self
            .admission
            .refused()
            .iter()
            .map(|(reason, n)| (labels(&[("reason", reason)]), *n))
            .collect();
        write_family(
            &mut out,
            "chanhost_connections_refused_total",
            "counter",
            "Client connections refused before they were set up, by reason (capacity: max_connections; per_address: per_ip_connections).",
            &refused,
        );
        let plugins = self.plugins.all();
        write_metric(
            &mut out,
            "chanhost_plugins",
            "gauge",
            "Plugins loaded.",
            plugins.len() as u64,
        );
        let (compiled, cached) = self.plugins.code_loads();
        write_family(
            &mut out,
            "chanhost_plugin_code_loads_total",
            "counter",
            "Plugin code made ready, compiled or read from the on-disk cache.",
            &[
                (labels(&[("source", "compiled")]), compiled),
                (labels(&[("source", "cache")]), cached),
            ],
        );
        write_metric(
            &mut out,
            "chanhost_plugin_loads_in_progress",
            "gauge",
            "Plugin files being compiled and started (off the event loop).",
            self.plugins.compiling(),
        );
        let by_hook = |errors: bool| -> Vec<(String, u64)> {
            plugins
                .iter()
                .flat_map(|p| {
                    p.metrics.by_hook().map(move |(hook, calls, errs)| {
                        (
                            labels(&[("plugin", &p.name), ("hook", hook)]),
                            if errors { errs } else { calls },
                        )
                    })
                })
                .collect()
        };
        let per_plugin = |get: fn(&PluginSlot) -> u64| -> Vec<(String, u64)> {
            plugins
                .iter()
                .map(|p| (labels(&[("plugin", &p.name)]), get(p)))
                .collect()
        };
        write_family(
            &mut out,
            "chanhost_plugin_calls_total",
            "counter",
            "Calls into plugins by hook.",
            &by_hook(false),
        );
        write_family(
            &mut out,
            "chanhost_plugin_errors_total",
            "counter",
            "Failed plugin calls (trap, timeout, out of memory) by hook.",
            &by_hook(true),
        );
        write_family(
            &mut out,
            "chanhost_plugin_dropped_total",
            "counter",
            "Plugin calls dropped because the plugin's queue was full.",
            &per_plugin(|p| p.metrics.dropped.load(Ordering::Relaxed)),
        );
        let refused: Vec<(String, u64)> = plugins
            .iter()
            .map(|p| {
                (
                    labels(&[("plugin", &p.name), ("reason", "backoff")]),
                    p.metrics.refused_backoff.load(Ordering::Relaxed),
                )
            })
            .collect();
        write_family(
            &mut out,
            "chanhost_plugin_refused_total",
            "counter",
            "Plugin calls refused without running, by reason (backoff: the plugin is backing off after repeated failures).",
            &refused,
        );
        write_family(
            &mut out,
            "chanhost_plugin_rebuilds_total",
            "counter",
            "Plugin instances rebuilt after a failure.",
            &per_plugin(|p| p.metrics.rebuilds.load(Ordering::Relaxed)),
        );
        out
    }
}

impl LocalDelivery for Node {
    fn deliver_local(&self, p: &Publication) {
        let ev = SharedEvent::with_attachments(&p.event, p.data.clone(), p.attachments.clone());
        self.hub.deliver(&p.room, &ev, &p.filter);
        for name in self.hub.listeners(&p.room) {
            if let Some(plugin) = self.plugins.plugin(&name) {
                plugin.event(p.room.clone(), ev.clone());
            }
        }
    }
}

impl HostServices for Node {
    fn send(&self, plugin: &str, target: InstanceRef, event: &str, data: Payload) {
        if !valid_payload(plugin, "send", &data) {
            return;
        }
        if let Some((conn, inst)) = self.owned(plugin, &target) {
            conn.push(Outbound::Event {
                slot: inst.slot,
                event: SharedEvent::with_attachments(
                    event,
                    data.json.into(),
                    data.attachments.into(),
                ),
            });
        }
    }

    fn emit(&self, plugin: &str, target: InstanceRef, event: &str, args: Payload) {
        if !valid_payload(plugin, "emit", &args) {
            return;
        }
        let Some(ev) = SharedEvent::spread(event, &args.json, args.attachments.into()) else {
            tracing::warn!(
                plugin,
                event,
                "emit arguments must be a JSON array; dropped"
            );
            return;
        };
        if let Some((conn, inst)) = self.owned(plugin, &target) {
            conn.push(Outbound::Event {
                slot: inst.slot,
                event: ev,
            });
        }
    }

    fn ack(&self, plugin: &str, target: InstanceRef, ack_id: u64, args: Payload) {
        if !valid_payload(plugin, "ack", &args) {
            return;
        }
        if !args.json.trim_start().starts_with('[') {
            tracing::warn!(plugin, "ack arguments must be a JSON array; dropped");
            return;
        }
        let Some((conn, _)) = self.owned(plugin, &target) else {
            return;
        };
        if conn.protocol != Protocol::SocketIo {
            tracing::debug!(plugin, "ack on a Misskey stream (no acks there); ignored");
            return;
        }
        let n = args.attachments.len();
        conn.push(Outbound::Text(format!(
            "4{}",
            socketio::encode_ack(&target.id, ack_id, &args.json, n)
        )));
        for a in args.attachments {
            conn.push(Outbound::Binary(a));
        }
    }

    fn join(&self, plugin: &str, target: InstanceRef, room: &str) {
        if let Some((conn, inst)) = self.owned(plugin, &target) {
            self.hub.join(&conn, inst.slot, room);
        }
    }

    fn leave(&self, plugin: &str, target: InstanceRef, room: &str) {
        if let Some((conn, inst)) = self.owned(plugin, &target) {
            self.hub.leave(&conn, &inst.slot, room);
        }
    }

    fn broadcast(
        &self,
        plugin: &str,
        room: &str,
        event: &str,
        data: Payload,
        except: Option<InstanceRef>,
        conditions: Vec<Condition>,
        local_only: bool,
    ) {
        if !valid_payload(plugin, "broadcast", &data) {
            return;
        }
        let p = Publication {
            room: room.into(),
            event: event.into(),
            data: data.json.into(),
            attachments: data.attachments.into(),
            filter: Filter {
                audience: None,
                except: except.map(|e| (e.connection, e.id.into())),
                owner: Some(plugin.into()),
                conditions: conditions.into(),
            },
        };
        self.metrics.publishes.inc();
        if local_only {
            self.deliver_local(&p);
        } else if let Err(e) = self.broker.publish(p) {
            tracing::error!(plugin, room, "broadcast failed: {e}");
        }
    }

    fn set_attribute(
        &self,
        plugin: &str,
        connection: u64,
        name: &str,
        add: Vec<String>,
        remove: Option<Vec<String>>,
    ) {
        let Ok(conn) = self.served(plugin, connection) else {
            return;
        };
        conn.set_attribute(&plugin.into(), name, add, remove.as_deref());
    }

    fn set_user_attribute(
        &self,
        plugin: &str,
        user: &str,
        name: &str,
        add: Vec<String>,
        remove: Option<Vec<String>>,
    ) {
        self.hub
            .set_user_attribute(user, &plugin.into(), name, add, remove.as_deref());
    }

    fn has_user_attribute(&self, plugin: &str, user: &str, name: &str) -> bool {
        self.hub.has_user_attribute(user, plugin, name)
    }

    fn room_size(&self, room: &str) -> u32 {
        u32::try_from(self.hub.room_size(room)).unwrap_or(u32::MAX)
    }

    fn listen(&self, plugin: &Arc<str>, room: &str) {
        self.hub.listen(plugin, room);
    }

    fn unlisten(&self, plugin: &str, room: &str) {
        self.hub.unlisten(plugin, room);
    }

    fn set_listens(&self, plugin: &Arc<str>, rooms: &[String]) {
        self.hub.set_listens(plugin, rooms);
    }

    fn end_instance(&self, plugin: &str, target: InstanceRef) {
        if let Some((conn, _)) = self.owned(plugin, &target) {
            self.end_instance(&conn, &target.id, true);
        }
    }

    fn close_connection(&self, plugin: &str, connection: u64, reason: &str) {
        let Ok(conn) = self.served(plugin, connection) else {
            return;
        };
        tracing::info!(plugin, connection, reason, "plugin closed a connection");
        conn.request_close(1000, reason);
    }

    fn identity(&self, connection: u64) -> Option<crate::auth::Identity> {
        self.hub.conn(connection)?.identity().cloned()
    }

    fn set_identity(
        &self,
        plugin: &str,
        connection: u64,
        identity: crate::auth::Identity,
    ) -> Result<u32, IdentityError> {
        self.served(plugin, connection)?;
        if !is_json(&identity.claims) {
            return Err(IdentityError::ClaimsNotJson);
        }
        Ok(self.identify(connection, identity)? as u32)
    }

    fn online_users(&self) -> Vec<String> {
        self.hub
            .online_users()
            .iter()
            .map(|u| u.to_string())
            .collect()
    }

    fn verify_token(&self, token: &str) -> Result<crate::auth::Identity, crate::auth::AuthError> {
        self.auth.verify(token)
    }

    fn kv(&self) -> &KvStore {
        &self.kv
    }
}
