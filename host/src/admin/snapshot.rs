//! What the operator page shows, once a second: the node's figures read
//! from its parts (connections, presence, rooms, plugins, cluster) and
//! the per-second rates of the last minutes, kept by a [`Sampler`] that
//! runs for as long as the node does. The snapshot is built only while
//! someone watches, once for all of them (a `watch` channel).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::hub::Protocol;
use crate::node::Node;

/// Seconds of rates kept (five minutes).
pub const HISTORY_SECS: usize = 300;

/// Rooms in a snapshot (the largest).
pub const TOP_ROOMS: usize = 50;

/// The rates of the last [`HISTORY_SECS`] seconds, and the plugins' calls
/// per second.
#[derive(Default)]
struct Rates {
    /// (messages received, frames sent) in each second, oldest first.
    seconds: VecDeque<(u64, u64)>,
    /// The counters at the last sample.
    last: Option<(u64, u64)>,
    /// Each plugin hook's calls at the last sample, and its calls in the
    /// last second.
    calls: HashMap<(Arc<str>, &'static str), (u64, u64)>,
}

impl Rates {
    /// The counters now: the second since the last sample is kept.
    fn push(&mut self, now: (u64, u64)) {
        if let Some(last) = self.last {
            if self.seconds.len() == HISTORY_SECS {
                self.seconds.pop_front();
            }
            self.seconds
                .push_back((now.0.saturating_sub(last.0), now.1.saturating_sub(last.1)));
        }
        self.last = Some(now);
    }

    fn sample(&mut self, node: &Node) {
        let m = node.metrics();
        self.push((m.messages_received.get(), m.frames_sent.get()));
        let mut calls = HashMap::new();
        for p in node.plugins().all() {
            for h in p.metrics.hooks() {
                let key = (p.name.clone(), h.hook);
                let before = self.calls.get(&key).map_or(h.calls, |c| c.0);
                calls.insert(key, (h.calls, h.calls.saturating_sub(before)));
            }
        }
        self.calls = calls;
    }
}

/// Samples the node's rates each second and publishes a snapshot to the
/// page's watchers.
pub struct Sampler {
    rates: parking_lot::Mutex<Rates>,
    snapshots: watch::Sender<Option<Arc<str>>>,
    started_at: u64,
}

impl Sampler {
    /// Starts sampling `node` (on the current runtime, if any) until it is
    /// gone.
    pub fn start(node: &Arc<Node>) -> Arc<Sampler> {
        let sampler = Arc::new(Sampler {
            rates: Default::default(),
            snapshots: watch::Sender::new(None),
            started_at: crate::adapter::now_ms(),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (weak_node, weak_self) = (Arc::downgrade(node), Arc::downgrade(&sampler));
            rt.spawn(run(weak_node, weak_self));
        }
        sampler
    }

    /// Snapshots as they are made (the current one first, if any).
    pub fn watch(&self) -> watch::Receiver<Option<Arc<str>>> {
        self.snapshots.subscribe()
    }

    /// The snapshot of `node` now.
    pub async fn snapshot(&self, node: &Arc<Node>) -> Value {
        let online = users_online(node).await;
        let rates = self.rates.lock();
        snapshot(node, &rates, self.started_at, online)
    }
}

/// Users online: across the cluster (read from its Redis, off the async
/// runtime), or on this node when that cannot be read.
async fn users_online(node: &Arc<Node>) -> usize {
    let here = node.hub().online_count();
    if node.config().cluster.is_none() {
        return here;
    }
    let n = node.clone();
    tokio::task::spawn_blocking(move || n.online_count())
        .await
        .unwrap_or(here)
}

async fn run(node: Weak<Node>, sampler: Weak<Sampler>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (Some(node), Some(sampler)) = (node.upgrade(), sampler.upgrade()) else {
            return;
        };
        if node.shutdown().is_cancelled() {
            return;
        }
        sampler.rates.lock().sample(&node);
        if sampler.snapshots.receiver_count() > 0 {
            let text: Arc<str> = sampler.snapshot(&node).await.to_string().into();
            sampler.snapshots.send_replace(Some(text));
        }
    }
}

fn state(up: Option<bool>) -> &'static str {
    match up {
        None => "off",
        Some(true) => "up",
        Some(false) => "down",
    }
}

fn snapshot(node: &Node, rates: &Rates, started_at: u64, users_online: usize) -> Value {
    let hub = node.hub();
    let m = node.metrics();
    let (mut misskey, mut sio_ws, mut sio_polling) = (0u64, 0u64, 0u64);
    let conns = hub.all_conns();
    for c in &conns {
        match (c.protocol, c.transport()) {
            (Protocol::Misskey, _) => misskey += 1,
            (Protocol::SocketIo, "websocket") => sio_ws += 1,
            (Protocol::SocketIo, _) => sio_polling += 1,
        }
    }
    let (room_count, top) = hub.rooms_by_size("", TOP_ROOMS);
    let refused: u64 = node.admission().refused().iter().map(|(_, n)| n).sum();
    let (broker, _) = node.cluster();
    let self_id = node.broker_node_id();
    let now = crate::adapter::now_ms();
    let mut nodes: Vec<Value> = node
        .broker_node_list()
        .into_iter()
        .map(|n| {
            json!({
                "id": n.id,
                "self": self_id.as_deref() == Some(n.id.as_str()),
                "heartbeat_ms_ago": now.saturating_sub(n.heartbeat_at),
                "connections": n.connections,
            })
        })
        .collect();
    if node.config().cluster.is_none() {
        nodes.push(json!({
            "id": "this node",
            "self": true,
            "heartbeat_ms_ago": 0,
            "connections": conns.len(),
        }));
    }
    let bus = node
        .config()
        .misskey
        .bus
        .as_ref()
        .map(|_| m.misskey_bus_up.get() == 1);
    let adapter = node.adapter().map(|a| a.is_up());
    let mut plugins: Vec<Value> = node
        .plugins()
        .all()
        .iter()
        .map(|p| plugin(p, rates))
        .collect();
    plugins.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    json!({
        "node": {
            "id": self_id.unwrap_or_else(|| "this node".into()),
            "version": env!("CARGO_PKG_VERSION"),
            "started_at": started_at,
            "now": now,
            "listen": node.bound_addr().to_string(),
        },
        "connections": {
            "total": conns.len(),
            "misskey": misskey,
            "socketio_websocket": sio_ws,
            "socketio_polling": sio_polling,
        },
        "users_online": users_online,
        "instances": m.instances.get(),
        "rates": {
            "every_ms": 1000,
            "messages_in": rates.seconds.iter().map(|s| s.0).collect::<Vec<_>>(),
            "frames_out": rates.seconds.iter().map(|s| s.1).collect::<Vec<_>>(),
        },
        "totals": {
            "messages_in": m.messages_received.get(),
            "frames_out": m.frames_sent.get(),
            "publishes": m.publishes.get(),
            "slow_consumer_closes": m.slow_consumer_closes.get(),
            "refused_connections": refused,
        },
        "rooms": {
            "count": room_count,
            "top": top.iter().map(|(name, n)| json!({"name": &**name, "members": n})).collect::<Vec<_>>(),
        },
        "plugins": plugins,
        "cluster": {
            "redis": broker.as_str(),
            "nodes": nodes,
            "misskey_bus": state(bus),
            "socketio_adapter": state(adapter),
        },
    })
}

fn plugin(p: &crate::plugin::PluginSlot, rates: &Rates) -> Value {
    let origin = p.origin();
    let manifest = p.manifest();
    // Read once: each hook's quantiles walk its histogram.
    let figures = p.metrics.hooks();
    let failures: u64 = figures.iter().map(|h| h.errors).sum();
    let hooks: Vec<Value> = figures
        .into_iter()
        .filter(|h| h.calls > 0)
        .map(|h| {
            let per_sec = rates
                .calls
                .get(&(p.name.clone(), h.hook))
                .map_or(0, |c| c.1);
            json!({
                "hook": h.hook,
                "calls": h.calls,
                "errors": h.errors,
                "per_sec": per_sec as f64,
                "p50_us": h.p50_ns.map(|ns| ns.div_ceil(1000)),
                "p99_us": h.p99_ns.map(|ns| ns.div_ceil(1000)),
            })
        })
        .collect();
    let state = if p.metrics.backing_off() {
        "backing off"
    } else {
        "serving"
    };
    json!({
        "name": &*p.name,
        "file": origin.file.as_ref().map(|f| f.display().to_string()),
        "sha256": if origin.file.is_some() { Some(hex::encode(p.hash())) } else { None },
        "wit": origin.wit.map(|w| w.to_string()),
        "version": manifest.version,
        "channels": manifest.channels.iter().map(|c| &c.name).collect::<Vec<_>>(),
        "namespaces": manifest.namespaces,
        "loaded_at": origin.loaded_at,
        "reloads": origin.loads.saturating_sub(1),
        "failures": failures,
        "rebuilds": p.metrics.rebuilds.load(std::sync::atomic::Ordering::Relaxed),
        "state": state,
        "queue": p.queue_depth(),
        "hooks": hooks,
        "last_error": p.metrics.last_error().map(|(at, text)| json!({"at": at, "text": text})),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_keep_the_last_minutes_per_second() {
        let mut r = Rates::default();
        r.push((10, 100));
        assert!(r.seconds.is_empty(), "the first sample is the baseline");
        for i in 1..=(HISTORY_SECS as u64 + 5) {
            r.push((10 + i, 100 + 2 * i + u64::from(i == 7) * 5));
        }
        assert_eq!(r.seconds.len(), HISTORY_SECS);
        assert!(r.seconds.iter().all(|&(m, _)| m == 1));
        assert_eq!(r.seconds.back(), Some(&(1, 2)));
        // A counter that went back (a restart of it) is no negative rate.
        r.push((0, 0));
        assert_eq!(r.seconds.back(), Some(&(0, 0)));
    }

    #[test]
    fn states_are_named_as_healthz_names_them() {
        assert_eq!(state(None), "off");
        assert_eq!(state(Some(true)), "up");
        assert_eq!(state(Some(false)), "down");
    }
}
