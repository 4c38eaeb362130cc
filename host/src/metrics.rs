//! Process-wide counters and gauges, rendered in the Prometheus text format
//! by `GET /metrics`. Per-plugin figures live with each plugin and are
//! appended by the renderer.
//!
//! The text is written here rather than by `prometheus-client`: its last
//! release built on `syn` 2 (0.23) writes label values unescaped, and the
//! later ones bring a second major version of `syn` into the build. Label
//! values (plugin names come from file names) are escaped by [`labels`] as
//! the exposition format asks (`\`, `"`, newline).

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

/// Host-wide metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: Gauge,
    pub instances: Gauge,
    pub captures: Gauge,
    pub publishes: Counter,
    pub frames_sent: Counter,
    pub slow_consumer_closes: Counter,
    /// Requests whose body did not arrive within `[limits] body_timeout_ms`.
    pub body_timeouts: Counter,
    pub reloads_ok: Counter,
    pub reloads_failed: Counter,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
