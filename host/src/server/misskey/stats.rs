//! Machine figures in the shape of Misskey's `serverStats` events, read
//! from `/proc` every two seconds and published to room
//! [`STATS_ROOM`] (event `stats`) while a plugin listens there or someone
//! is a member. This module only samples and publishes; what a channel
//! makes of the figures (Misskey's `serverStats` log, ...) is a plugin's.
//!
//! The figures follow Misskey's `ServerStatsService`: `cpu` is the busy
//! fraction of all CPUs since the previous sample (0..1, three decimals),
//! `mem.used` is total minus available memory and `mem.active` the active
//! memory (bytes), `net.rx`/`net.tx` are bytes per second over every
//! interface but loopback, `fs.r`/`fs.w` are read and write operations per
//! second over whole disks. Off Linux, or where `/proc` is unreadable, the
//! missing figures are 0.

use std::sync::Weak;
use std::time::{Duration, Instant};

use crate::node::Node;

/// The room the samples are published to.
pub const STATS_ROOM: &str = "chanhost:stats";

/// Time between two samples (Misskey's interval).
pub const INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counters {
    cpu_busy: u64,
    cpu_total: u64,
    rx: u64,
    tx: u64,
    reads: u64,
    writes: u64,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Busy and total jiffies from the `cpu` line of `/proc/stat`.
fn parse_cpu(stat: &str) -> (u64, u64) {
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// (used, active) bytes from `/proc/meminfo`.
fn parse_mem(meminfo: &str) -> (u64, u64) {
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.trim_start_matches(':').split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    };
    let total = field("MemTotal");
    let available = field("MemAvailable");
    (total.saturating_sub(available), field("Active"))
}

/// The interface of the default route (`/proc/net/route`), as Misskey
/// measures its default interface.
fn default_interface(route: &str) -> Option<&str> {
    route.lines().skip(1).find_map(|l| {
        let mut f = l.split_whitespace();
        let (iface, dest) = (f.next()?, f.next()?);
        (dest == "00000000").then_some(iface)
    })
}

/// Received and sent bytes of the default interface, or of every interface
/// but loopback when there is no default route.
fn parse_net(dev: &str, default: Option<&str>) -> (u64, u64) {
    dev.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| match default {
            Some(d) => name.trim() == d,
            None => name.trim() != "lo",
        })
        .map(|(_, rest)| {
            let v: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            (
                v.first().copied().unwrap_or(0),
                v.get(8).copied().unwrap_or(0),
            )
        })
        .fold((0, 0), |(r, t), (a, b)| (r + a, t + b))
}

/// Completed reads and writes over whole disks (not partitions, loop or
/// ram devices).
fn parse_disks(stats: &str) -> (u64, u64) {
    stats
        .lines()
        .filter_map(|l| {
            let v: Vec<&str> = l.split_whitespace().collect();
            let name = *v.get(2)?;
            let scsi_like = ["sd", "vd", "xvd", "hd"]
                .iter()
                .any(|p| name.starts_with(p));
            let partition = (scsi_like && name.ends_with(|c: char| c.is_ascii_digit()))
                || ((name.starts_with("nvme") || name.starts_with("mmcblk")) && name.contains('p'));
            // Virtual devices (device mapper, RAID, loop, RAM, optical)
            // would count the same I/O twice or none at all.
            let virtual_dev = ["loop", "ram", "zram", "dm-", "md", "sr"]
                .iter()
                .any(|p| name.starts_with(p));
            let whole = !virtual_dev && !partition;
            whole.then(|| {
                (
                    v.get(3).and_then(|x| x.parse().ok()).unwrap_or(0u64),
                    v.get(7).and_then(|x| x.parse().ok()).unwrap_or(0u64),
                )
            })
        })
        .fold((0, 0), |(r, w), (a, b)| (r + a, w + b))
}

fn sample() -> (Counters, (u64, u64)) {
    let (cpu_busy, cpu_total) = parse_cpu(&read("/proc/stat"));
    let route = read("/proc/net/route");
    let (rx, tx) = parse_net(&read("/proc/net/dev"), default_interface(&route));
    let (reads, writes) = parse_disks(&read("/proc/diskstats"));
    let c = Counters {
        cpu_busy,
        cpu_total,
        rx,
        tx,
        reads,
        writes,
    };
    (c, parse_mem(&read("/proc/meminfo")))
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// One `serverStats` body from two counter samples `secs` apart.
fn stats_json(prev: &Counters, now: &Counters, mem: (u64, u64), secs: f64) -> serde_json::Value {
    let rate = |a: u64, b: u64| round1(b.saturating_sub(a) as f64 / secs.max(0.001));
    let total = now.cpu_total.saturating_sub(prev.cpu_total);
    let cpu = if total == 0 {
        0.0
    } else {
        let f = now.cpu_busy.saturating_sub(prev.cpu_busy) as f64 / total as f64;
        (f.clamp(0.0, 1.0) * 1000.0).round() / 1000.0
    };
    serde_json::json!({
        "cpu": cpu,
        "mem": { "used": mem.0, "active": mem.1 },
        "net": { "rx": rate(prev.rx, now.rx), "tx": rate(prev.tx, now.tx) },
        "fs": { "r": rate(prev.reads, now.reads), "w": rate(prev.writes, now.writes) },
    })
}

/// Samples and publishes until the node is dropped or shut down.
pub fn spawn(node: Weak<Node>) {
    tokio::spawn(async move {
        let (mut prev, _) = sample();
        let mut at = Instant::now();
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let Some(n) = node.upgrade() else { break };
            let stop = n.shutdown().clone();
            drop(n);
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => break,
            }
            let Some(n) = node.upgrade() else { break };
            let Ok((now, mem)) = tokio::task::spawn_blocking(sample).await else {
                continue;
            };
            let secs = at.elapsed().as_secs_f64();
            at = Instant::now();
            let body = stats_json(&prev, &now, mem, secs);
            prev = now;
            // This machine's figures go to this node's audience only.
            if n.hub().has_audience(STATS_ROOM) {
                n.deliver_local_event(STATS_ROOM, "stats", body.to_string().into());
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        assert_eq!(
            parse_cpu("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n"),
            (150, 1000)
        );
        assert_eq!(
            parse_mem("MemTotal:       1000 kB\nMemFree: 1 kB\nMemAvailable:    400 kB\nActive:  300 kB\n"),
            (600 * 1024, 300 * 1024)
        );
        let dev = "Inter-|   Receive\n face |bytes\n    lo: 999 1 0 0 0 0 0 0 999 1 0 0 0 0 0 0\n  eth0: 100 1 0 0 0 0 0 0 200 2 0 0 0 0 0 0\n  br0: 5 1 0 0 0 0 0 0 7 2 0 0 0 0 0 0\n";
        assert_eq!(parse_net(dev, None), (105, 207));
        let route =
            "Iface\tDestination\tGateway\nbr0\t0000A8C0\t00000000\neth0\t00000000\t0100A8C0\n";
        assert_eq!(default_interface(route), Some("eth0"));
        assert_eq!(parse_net(dev, default_interface(route)), (100, 200));
        let disks = "   8       0 sda 10 0 0 0 20 0 0 0 0 0 0\n   8       1 sda1 5 0 0 0 5 0 0 0 0 0 0\n   7       0 loop0 9 0 0 0 9 0 0 0 0 0 0\n 259 0 nvme0n1 1 0 0 0 2 0 0 0 0 0 0\n 259 1 nvme0n1p1 1 0 0 0 2 0 0 0 0 0 0\n 253 0 dm-0 4 0 0 0 4 0 0 0 0 0 0\n";
        assert_eq!(parse_disks(disks), (11, 22));
    }

    #[test]
    fn rates_and_shape() {
        let a = Counters {
            cpu_busy: 100,
            cpu_total: 1000,
            rx: 0,
            tx: 0,
            reads: 0,
            writes: 0,
        };
        let b = Counters {
            cpu_busy: 350,
            cpu_total: 2000,
            rx: 4000,
            tx: 2000,
            reads: 10,
            writes: 3,
        };
        let s = stats_json(&a, &b, (5, 6), 2.0);
        assert_eq!(
            s,
            serde_json::json!({"cpu": 0.25, "mem": {"used": 5, "active": 6}, "net": {"rx": 2000.0, "tx": 1000.0}, "fs": {"r": 5.0, "w": 1.5}})
        );
        // Where /proc is readable the live sample is sane.
        let (c, (used, _)) = sample();
        if std::path::Path::new("/proc/stat").exists() {
            assert!(c.cpu_total > 0 && used > 0);
        }
    }
}
