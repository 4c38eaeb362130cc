//! Process-wide counters and gauges, and the whole `GET /metrics` text in
//! the Prometheus text format: [`Metrics`] holds the host-wide figures,
//! [`NodeFigures`] what the node reads from its other parts when asked
//! (rooms, admission, plugins), and [`render`] writes both.
//!
//! The text is written here rather than by `prometheus-client`: that crate
//! encodes the OpenMetrics text format only (a `# EOF` line, counter
//! families named without their `_total`, its own content type), while
//! `/metrics` serves the Prometheus text format 0.0.4 that operators'
//! scrapers and this project's tests read (its 0.23 release also wrote
//! label values unescaped). The text is small (a few families, one
//! function each), and label values (plugin names come from file names)
//! are escaped by [`labels`] as the exposition format asks (`\`, `"`,
//! newline).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.sub(1);
    }
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn sub(&self, n: u64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Durations, in buckets of a quarter of a power of two of nanoseconds
/// (from 128 ns to ~8.6 s; longer ones go in the last): quantiles within
/// 19 % at a fixed cost of a few atomic adds per value and 864 bytes.
pub struct LatencyHistogram([AtomicU64; LatencyHistogram::BUCKETS]);

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.count())
            .finish()
    }
}

impl LatencyHistogram {
    /// The first bucket's octave (2^7 ns).
    const FIRST_OCTAVE: u32 = 7;
    const BUCKETS: usize = 27 * 4;

    /// The bucket of a duration in nanoseconds.
    fn bucket(ns: u64) -> usize {
        let ns = ns.max(1 << Self::FIRST_OCTAVE);
        let octave = 63 - ns.leading_zeros();
        // The two bits after the leading one: which quarter of the octave.
        let quarter = ((ns >> (octave - 2)) & 3) as u32;
        (((octave - Self::FIRST_OCTAVE) * 4 + quarter) as usize).min(Self::BUCKETS - 1)
    }

    /// The upper bound of a bucket, in nanoseconds.
    fn upper(i: usize) -> u64 {
        let octave = i as u32 / 4 + Self::FIRST_OCTAVE;
        let quarter = i as u64 % 4;
        (1u64 << octave) + (quarter + 1) * (1u64 << (octave - 2))
    }

    pub fn record(&self, d: std::time::Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0[Self::bucket(ns)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.0.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The `q` quantile (0..=1) in nanoseconds, as its bucket's upper
    /// bound; None without values.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self.0.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Self::upper(i));
            }
        }
        Some(Self::upper(Self::BUCKETS - 1))
    }
}

/// Host-wide metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: Gauge,
    pub instances: Gauge,
    pub captures: Gauge,
    pub publishes: Counter,
    /// Messages received from clients (Misskey frames, Socket.IO packets).
    pub messages_received: Counter,
    pub frames_sent: Counter,
    pub slow_consumer_closes: Counter,
    /// Requests whose body did not arrive within `[limits] body_timeout_ms`.
    pub body_timeouts: Counter,
    pub reloads_ok: Counter,
    pub reloads_failed: Counter,
    /// 1 while Misskey's bus is subscribed (`[misskey.bus]`).
    pub misskey_bus_up: Gauge,
    /// Bus messages delivered, and those ignored as malformed.
    pub misskey_bus_delivered: Counter,
    pub misskey_bus_malformed: Counter,
    /// The cluster broker (`[cluster]`).
    pub broker_up: Gauge,
    pub broker_carried: Counter,
    pub broker_not_carried: Counter,
    pub broker_received: Counter,
    pub broker_malformed: Counter,
    pub broker_subscriptions: Gauge,
    pub cluster_nodes: Gauge,
    /// The socket.io adapter protocol (`[socketio.adapter]`).
    pub adapter_up: Gauge,
    pub adapter_published: Counter,
    pub adapter_not_carried: Counter,
    /// Filtered events kept in chanhost (the adapter cannot carry filters).
    pub adapter_filtered: Counter,
    pub adapter_received: Counter,
    pub adapter_requests: Counter,
    pub adapter_malformed: Counter,
    /// 1 while a sharded (0) or streams (1) socket.io adapter is seen on
    /// the adapter's Redis.
    pub adapter_unsupported: [Gauge; 2],
    /// Connection state recovery (`[socketio.recovery]`): sockets recovered,
    /// sessions kept, and CONNECTs with a pid that connected as new, by
    /// [`crate::recovery::Refusal`] (same order as `RECOVERY_REFUSALS`).
    pub recovered: Counter,
    pub recovery_kept: Counter,
    pub recovery_refused: [Counter; 5],
    /// Events replayed to recovered sockets.
    pub recovery_replayed: Counter,
    /// History entries cut by `history_per_room` while younger than the
    /// window.
    pub recovery_cut: std::sync::Arc<crate::recovery::RecoveryCounters>,
    /// Sessions and history entries kept on this node (memory side).
    pub recovery_sessions: Gauge,
    pub recovery_entries: Gauge,
}

/// The refusals in the order of [`Metrics::recovery_refused`].
pub const RECOVERY_REFUSALS: [crate::recovery::Refusal; 5] = [
    crate::recovery::Refusal::Unknown,
    crate::recovery::Refusal::Elsewhere,
    crate::recovery::Refusal::Offset,
    crate::recovery::Refusal::Cut,
    crate::recovery::Refusal::Down,
];

impl Metrics {
    /// Counts a CONNECT with a pid that connected as new.
    pub fn recovery_refused(&self, r: crate::recovery::Refusal) {
        if let Some(i) = RECOVERY_REFUSALS.iter().position(|x| *x == r) {
            self.recovery_refused[i].inc();
        }
    }
}

/// A label set, `a="x",b="y"`, its values escaped.
pub fn labels(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out
}

/// Writes one metric with its help and type lines.
pub fn write_metric(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// Writes a metric family with one sample per label set (`a="x",b="y"`).
pub fn write_family(out: &mut String, name: &str, kind: &str, help: &str, rows: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in rows {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

impl Metrics {
    /// Renders the host-wide part; `rooms` is read from the hub.
    pub fn render(&self, rooms: usize, out: &mut String) {
        write_metric(
            out,
            "chanhost_connections",
            "gauge",
            "Open client connections.",
            self.connections.get(),
        );
        write_metric(
            out,
            "chanhost_channel_instances",
            "gauge",
            "Open channel instances.",
            self.instances.get(),
        );
        write_metric(
            out,
            "chanhost_rooms",
            "gauge",
            "Rooms with at least one member on this node.",
            rooms as u64,
        );
        write_metric(
            out,
            "chanhost_captures",
            "gauge",
            "Captured notes (Misskey subNote) across connections.",
            self.captures.get(),
        );
        write_metric(
            out,
            "chanhost_publishes_total",
            "counter",
            "Events published (API and plugin broadcasts).",
            self.publishes.get(),
        );
        write_metric(
            out,
            "chanhost_messages_received_total",
            "counter",
            "Messages received from clients (Misskey frames, Socket.IO packets).",
            self.messages_received.get(),
        );
        write_metric(
            out,
            "chanhost_frames_sent_total",
            "counter",
            "Frames written to clients.",
            self.frames_sent.get(),
        );
        write_metric(
            out,
            "chanhost_slow_consumer_closes_total",
            "counter",
            "Connections closed because their send queue was full.",
            self.slow_consumer_closes.get(),
        );
        write_metric(
            out,
            "chanhost_request_body_timeouts_total",
            "counter",
            "Requests answered 408 because their body did not arrive in time.",
            self.body_timeouts.get(),
        );
        write_metric(
            out,
            "chanhost_misskey_bus_up",
            "gauge",
            "1 while Misskey's event bus is subscribed on Redis ([misskey.bus]); 0 while it is not, or not configured.",
            self.misskey_bus_up.get(),
        );
        write_family(
            out,
            "chanhost_misskey_bus_messages_total",
            "counter",
            "Messages read from Misskey's event bus, by result (delivered; malformed: ignored).",
            &[
                (
                    labels(&[("result", "delivered")]),
                    self.misskey_bus_delivered.get(),
                ),
                (
                    labels(&[("result", "malformed")]),
                    self.misskey_bus_malformed.get(),
                ),
            ],
        );
        write_metric(
            out,
            "chanhost_broker_up",
            "gauge",
            "1 while publishes are carried between nodes (always, for one node without [cluster]); 0 while the cluster's Redis cannot be reached.",
            self.broker_up.get(),
        );
        write_family(
            out,
            "chanhost_broker_events_total",
            "counter",
            "Events through the cluster broker ([cluster]): carried to Redis, not carried (Redis down or the queue full; delivered on this node only), received from other nodes, malformed (ignored).",
            &[
                (labels(&[("result", "carried")]), self.broker_carried.get()),
                (
                    labels(&[("result", "not_carried")]),
                    self.broker_not_carried.get(),
                ),
                (labels(&[("result", "received")]), self.broker_received.get()),
                (
                    labels(&[("result", "malformed")]),
                    self.broker_malformed.get(),
                ),
            ],
        );
        write_metric(
            out,
            "chanhost_socketio_adapter_up",
            "gauge",
            "1 while the socket.io adapter protocol ([socketio.adapter]) is subscribed and can publish; 0 while its Redis cannot be reached, or not configured.",
            self.adapter_up.get(),
        );
        write_family(
            out,
            "chanhost_socketio_adapter_messages_total",
            "counter",
            "Messages of the socket.io adapter protocol: broadcasts published for the socket.io servers, not carried (Redis down or the queue full), filtered (carrying chanhost-only filters: kept in chanhost), broadcasts received, requests answered, malformed (ignored).",
            &[
                (labels(&[("result", "published")]), self.adapter_published.get()),
                (
                    labels(&[("result", "not_carried")]),
                    self.adapter_not_carried.get(),
                ),
                (labels(&[("result", "filtered")]), self.adapter_filtered.get()),
                (labels(&[("result", "received")]), self.adapter_received.get()),
                (labels(&[("result", "request")]), self.adapter_requests.get()),
                (
                    labels(&[("result", "malformed")]),
                    self.adapter_malformed.get(),
                ),
            ],
        );
        write_family(
            out,
            "chanhost_socketio_adapter_unsupported",
            "gauge",
            "1 while a socket.io adapter variant chanhost does not speak is seen on the adapter's Redis (sharded: createShardedAdapter; streams: @socket.io/redis-streams-adapter).",
            &[
                (
                    labels(&[("variant", "sharded")]),
                    self.adapter_unsupported[0].get(),
                ),
                (
                    labels(&[("variant", "streams")]),
                    self.adapter_unsupported[1].get(),
                ),
            ],
        );
        let mut rows = vec![(labels(&[("result", "recovered")]), self.recovered.get())];
        for (i, r) in RECOVERY_REFUSALS.iter().enumerate() {
            rows.push((
                labels(&[("result", r.as_str())]),
                self.recovery_refused[i].get(),
            ));
        }
        write_family(
            out,
            "chanhost_socketio_recovery_total",
            "counter",
            "CONNECTs carrying a session's pid ([socketio.recovery]): recovered, or connected as new because the session is unknown or expired, belongs elsewhere, the offset is not ours, a room's history was cut short (history_per_room), or Redis is down.",
            &rows,
        );
        write_metric(
            out,
            "chanhost_socketio_recovery_sessions_kept_total",
            "counter",
            "Sessions of sockets that lost their connection, kept for [socketio.recovery] max_disconnection_ms.",
            self.recovery_kept.get(),
        );
        write_metric(
            out,
            "chanhost_socketio_recovery_replayed_total",
            "counter",
            "Missed events replayed to recovered sockets.",
            self.recovery_replayed.get(),
        );
        write_metric(
            out,
            "chanhost_socketio_recovery_history_cut_total",
            "counter",
            "Events dropped from a room's history by [socketio.recovery] history_per_room before the window passed: a session that needs them connects as new.",
            self.recovery_cut.cut.load(Ordering::Relaxed),
        );
        write_metric(
            out,
            "chanhost_socketio_recovery_kept",
            "gauge",
            "Sessions kept on this node's memory (without [cluster]; with it they are in Redis).",
            self.recovery_sessions.get(),
        );
        write_metric(
            out,
            "chanhost_socketio_recovery_history_entries",
            "gauge",
            "Events kept in room histories on this node's memory (without [cluster]).",
            self.recovery_entries.get(),
        );
        write_metric(
            out,
            "chanhost_broker_subscriptions",
            "gauge",
            "Rooms this node is subscribed to on the cluster's Redis (those it has members or listeners of).",
            self.broker_subscriptions.get(),
        );
        write_metric(
            out,
            "chanhost_cluster_nodes",
            "gauge",
            "Nodes whose heartbeat is recent ([cluster]; 0 without).",
            self.cluster_nodes.get(),
        );
        write_family(
            out,
            "chanhost_plugin_reloads_total",
            "counter",
            "Plugin loads and reloads by result.",
            &[
                (labels(&[("result", "ok")]), self.reloads_ok.get()),
                (labels(&[("result", "error")]), self.reloads_failed.get()),
            ],
        );
    }
}

/// One plugin's figures, read when `/metrics` is asked for.
#[derive(Debug, Clone, Default)]
pub struct PluginFigures {
    pub name: String,
    /// Calls, items and failed calls by hook.
    pub hooks: Vec<crate::plugin::HookCounts>,
    pub dropped: u64,
    pub refused_backoff: u64,
    pub rebuilds: u64,
    /// Calls of `messages` / `events` with more than one item.
    pub batches: u64,
    /// Items given again alone after their batch's call failed.
    pub retried: u64,
}

/// What `/metrics` shows beyond [`Metrics`], read from the node's parts.
#[derive(Debug, Clone, Default)]
pub struct NodeFigures {
    /// Rooms with a member on this node.
    pub rooms: usize,
    /// `[limits] max_connections`.
    pub connections_max: usize,
    /// Refused client connections by reason.
    pub refused: Vec<(&'static str, u64)>,
    /// Plugin code made ready: (compiled, read from the cache).
    pub code_loads: (u64, u64),
    /// Plugin files being compiled.
    pub compiling: u64,
    pub plugins: Vec<PluginFigures>,
}

/// The whole `/metrics` text.
pub fn render(metrics: &Metrics, node: &NodeFigures) -> String {
    let mut out = String::new();
    metrics.render(node.rooms, &mut out);
    write_metric(
        &mut out,
        "chanhost_connections_max",
        "gauge",
        "Client connections the node accepts at once ([limits] max_connections).",
        node.connections_max as u64,
    );
    let refused: Vec<(String, u64)> = node
        .refused
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
    let plugins = &node.plugins;
    write_metric(
        &mut out,
        "chanhost_plugins",
        "gauge",
        "Plugins loaded.",
        plugins.len() as u64,
    );
    let (compiled, cached) = node.code_loads;
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
        node.compiling,
    );
    let by_hook = |get: fn(&crate::plugin::HookCounts) -> u64| -> Vec<(String, u64)> {
        plugins
            .iter()
            .flat_map(|p| {
                p.hooks
                    .iter()
                    .map(move |h| (labels(&[("plugin", &p.name), ("hook", h.hook)]), get(h)))
            })
            .collect()
    };
    let per_plugin = |get: fn(&PluginFigures) -> u64| -> Vec<(String, u64)> {
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
        &by_hook(|h| h.calls),
    );
    write_family(
        &mut out,
        "chanhost_plugin_items_total",
        "counter",
        "What calls into plugins gave them by hook: a batched `messages` or `events` call gives several messages or events, any other call one.",
        &by_hook(|h| h.items),
    );
    write_family(
        &mut out,
        "chanhost_plugin_errors_total",
        "counter",
        "Failed plugin calls (trap, timeout, out of memory) by hook.",
        &by_hook(|h| h.errors),
    );
    write_family(
        &mut out,
        "chanhost_plugin_dropped_total",
        "counter",
        "Plugin calls dropped because the plugin's queue was full.",
        &per_plugin(|p| p.dropped),
    );
    let refused: Vec<(String, u64)> = plugins
        .iter()
        .map(|p| {
            (
                labels(&[("plugin", &p.name), ("reason", "backoff")]),
                p.refused_backoff,
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
        &per_plugin(|p| p.rebuilds),
    );
    write_family(
        &mut out,
        "chanhost_plugin_batches_total",
        "counter",
        "Calls of `messages` or `events` (WIT 0.4.0) that gave a plugin more than one item.",
        &per_plugin(|p| p.batches),
    );
    write_family(
        &mut out,
        "chanhost_plugin_retried_total",
        "counter",
        "Messages and events given to a plugin again, one per call, after the batched call that carried them failed.",
        &per_plugin(|p| p.retried),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_quantiles_fall_within_a_quarter_octave() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile(0.5), None);
        for us in 1..=100u64 {
            h.record(std::time::Duration::from_micros(us));
        }
        let p50 = h.quantile(0.5).unwrap();
        assert!((50_000..=50_000 * 5 / 4).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!((99_000..=99_000 * 5 / 4).contains(&p99), "{p99}");
        assert_eq!(h.count(), 100);
        // Below the first bucket and past the last.
        h.record(std::time::Duration::from_nanos(3));
        h.record(std::time::Duration::from_secs(3600));
        assert_eq!(h.quantile(0.0), Some(LatencyHistogram::upper(0)));
        assert_eq!(
            h.quantile(1.0),
            Some(LatencyHistogram::upper(LatencyHistogram::BUCKETS - 1))
        );
        // Every bucket's bound is above the values it holds.
        for ns in [128u64, 129, 160, 255, 256, 1000, 123_456_789] {
            assert!(
                LatencyHistogram::upper(LatencyHistogram::bucket(ns)) > ns,
                "{ns}"
            );
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            labels(&[("plugin", "a"), ("hook", "b")]),
            r#"plugin="a",hook="b""#
        );
        assert_eq!(
            labels(&[("plugin", "we\"ird\\\nname")]),
            r#"plugin="we\"ird\\\nname""#
        );
    }

    #[test]
    fn the_text_has_every_family_once_with_its_labels() {
        let m = Metrics::default();
        m.connections.inc();
        let node = NodeFigures {
            rooms: 3,
            connections_max: 100,
            refused: vec![("capacity", 2), ("per_address", 0)],
            code_loads: (1, 4),
            compiling: 0,
            plugins: vec![PluginFigures {
                name: "chat".into(),
                hooks: vec![crate::plugin::HookCounts {
                    hook: "connect",
                    calls: 5,
                    items: 5,
                    errors: 1,
                }],
                dropped: 7,
                refused_backoff: 0,
                rebuilds: 1,
                batches: 2,
                retried: 3,
            }],
        };
        let text = render(&m, &node);
        for line in [
            "chanhost_connections 1",
            "chanhost_rooms 3",
            "chanhost_connections_max 100",
            "chanhost_connections_refused_total{reason=\"capacity\"} 2",
            "chanhost_plugins 1",
            "chanhost_plugin_code_loads_total{source=\"cache\"} 4",
            "chanhost_plugin_calls_total{plugin=\"chat\",hook=\"connect\"} 5",
            "chanhost_plugin_errors_total{plugin=\"chat\",hook=\"connect\"} 1",
            "chanhost_plugin_dropped_total{plugin=\"chat\"} 7",
            "chanhost_plugin_rebuilds_total{plugin=\"chat\"} 1",
            "chanhost_plugin_items_total{plugin=\"chat\",hook=\"connect\"} 5",
            "chanhost_plugin_batches_total{plugin=\"chat\"} 2",
            "chanhost_plugin_retried_total{plugin=\"chat\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}");
        }
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let names: std::collections::HashSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(names.len(), types, "a family written twice");
    }
}
