//! `chanhost-bench`: a load generator for chanhost and the servers users
//! compare it with. It opens many WebSocket client connections in one
//! process (small buffers, one task each), speaking the Misskey streaming
//! framing or Socket.IO v5 over an Engine.IO v4 WebSocket, and prints one
//! JSON line of figures per run.
//!
//! The servers under test behave as one "broadcast server":
//! - Socket.IO: namespace `/`; a client whose CONNECT auth has `room` is in
//!   that room; an event `publish {room, data}` is broadcast to the room as
//!   `message data`.
//! - Misskey (chanhost only): channel `bench`, params `{room}`; a channel
//!   message `publish {room, data}` is broadcast to the room as `message`.
//!
//! Scenarios:
//! - `connect`: opens N idle connections (subscribed to a room), reports
//!   connections per second and, given the server's pid, its resident memory
//!   per connection (`/proc/<pid>/smaps_rollup`).
//! - `fanout`: M subscribers in one room, one publisher sending at a fixed
//!   rate (open loop) a payload carrying its send time; reports delivered
//!   frames per second, latency percentiles (HdrHistogram) and drops.
//! - `upstream`: publishers send as fast as the server takes messages; one
//!   subscriber counts what is delivered; reports messages per second.
//! - `attack-ids`, `attack-slow`, `attack-headers`, `soak`: hostile and
//!   mixed loads measured by the server's memory ([`soak`]).
//! - `serve-native`: not a load, a server: chanhost embedded with the
//!   broadcast contract as a native plugin ([`native`]), the baseline the
//!   upstream scenario measures the WebAssembly plugin against.

mod native;
mod soak;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Proto {
    Misskey,
    Socketio,
}

#[derive(Debug, Parser)]
#[command(name = "chanhost-bench")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Args, Clone)]
struct Target {
    /// Server origin, e.g. ws://127.0.0.1:3000
    #[arg(long)]
    url: String,
    #[arg(long, value_enum)]
    proto: Proto,
    /// The server's process id, for its memory figures.
    #[arg(long)]
    pid: Option<u32>,
    /// Connections opened at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Further origins of the same cluster: subscribers are spread over
    /// `--url` and these in turn; publishers connect to `--url`.
    #[arg(long)]
    also: Vec<String>,
    /// The cluster's Redis (`host:port`): what it carries per published
    /// event is read from its `INFO` before and after publishing.
    #[arg(long)]
    redis: Option<String>,
}

impl Target {
    /// Every origin: `--url` first, then `--also`.
    fn origins(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.url.as_str()).chain(self.also.iter().map(String::as_str))
    }
}

/// The server of the memory scenarios.
#[derive(Debug, clap::Args, Clone)]
struct Server {
    /// Server origin, e.g. ws://127.0.0.1:3000
    #[arg(long)]
    url: String,
    /// The server's process id, for its memory figures.
    #[arg(long)]
    pid: u32,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Hold N idle connections.
    Connect {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        n: usize,
        /// Seconds to wait after connecting before measuring memory.
        #[arg(long, default_value_t = 2)]
        settle: u64,
    },
    /// Broadcast to a room of M members.
    Fanout {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        members: usize,
        /// Payload size in bytes (padding included).
        #[arg(long, default_value_t = 100)]
        payload: usize,
        /// Publishes per second.
        #[arg(long)]
        rate: f64,
        /// Seconds of publishing that are measured.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Seconds of publishing before that, delivered (and counted for
        /// drops) but not in the latencies: the first bursts after a
        /// connect storm run slower than those of a room that has been
        /// connected for a while (10,000 members here: ~135–180 ms for the
        /// first 1.5 s, then ~85–130 ms).
        #[arg(long, default_value_t = 2)]
        warmup: u64,
    },
    /// Anonymous Misskey streams filling every instance and capture slot
    /// with ids of `id_bytes`.
    AttackIds {
        #[command(flatten)]
        server: Server,
        #[arg(long, default_value_t = 10)]
        conns: usize,
        #[arg(long, default_value_t = 60_000)]
        id_bytes: usize,
    },
    /// Clients that never read, in a room receiving `events` of `size` bytes.
    AttackSlow {
        #[command(flatten)]
        server: Server,
        #[arg(long, default_value_t = 2)]
        clients: usize,
        #[arg(long, default_value_t = 600)]
        events: usize,
        #[arg(long, default_value_t = 1_000_000)]
        size: usize,
    },
    /// Polling handshakes with `header_bytes` of headers, closed at once.
    AttackHeaders {
        #[command(flatten)]
        server: Server,
        #[arg(long, default_value_t = 2000)]
        n: usize,
        #[arg(long, default_value_t = 361_000)]
        header_bytes: usize,
    },
    /// Socket.IO sockets whose connections are lost, kept by connection
    /// state recovery, and events kept in their rooms' histories (the host
    /// must run with `[socketio.recovery]`).
    RecoveryMemory {
        #[command(flatten)]
        server: Server,
        #[arg(long, default_value_t = 5000)]
        sockets: usize,
        #[arg(long, default_value_t = 20)]
        rooms: usize,
        #[arg(long, default_value_t = 20_000)]
        events: usize,
        #[arg(long, default_value_t = 100)]
        size: usize,
    },
    /// A mixed load for `secs`, then everything closed.
    Soak {
        #[command(flatten)]
        server: Server,
        #[arg(long, default_value_t = 60)]
        secs: u64,
    },
    /// Serve the benchmarks' broadcast contract from a native plugin of an
    /// embedded host (the baseline of the upstream scenario).
    ServeNative {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:3000")]
        listen: String,
    },
    /// Upstream throughput: publishers send as fast as the server takes
    /// messages (a bounded number in flight); one subscriber counts them.
    Upstream {
        #[command(flatten)]
        target: Target,
        /// Publishing connections.
        #[arg(long, default_value_t = 8)]
        senders: usize,
        /// Messages in flight (sent, not yet delivered), all senders together:
        /// enough to keep the servers measured busy.
        #[arg(long, default_value_t = 2048)]
        window: u64,
        /// Payload size in bytes (padding included).
        #[arg(long, default_value_t = 200)]
        payload: usize,
        /// Seconds of measuring (after one of warm-up).
        #[arg(long, default_value_t = 10)]
        secs: u64,
    },
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Resident memory of a process in KiB (`Rss` of `smaps_rollup`).
fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Rss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Small buffers: many connections in one process. A publisher (`room`
/// None) keeps what it feeds until it flushes, so a batch of messages goes
/// out in one write.
fn ws_config(room: Option<&str>) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(if room.is_some() { 0 } else { 16 * 1024 })
}

/// Opens one connection to `--url` and subscribes it to `room` (None: a
/// publisher).
async fn open(t: &Target, room: Option<&str>) -> Result<Ws> {
    open_at(t, &t.url, room).await
}

/// Opens one connection to `origin` and subscribes it to `room`.
async fn open_at(t: &Target, origin: &str, room: Option<&str>) -> Result<Ws> {
    let url = match t.proto {
        Proto::Misskey => format!("{origin}/streaming"),
        Proto::Socketio => format!("{origin}/socket.io/?EIO=4&transport=websocket"),
    };
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(&url, Some(ws_config(room)), true)
            .await
            .with_context(|| format!("connecting to {url}"))?;
    match t.proto {
        Proto::Misskey => {
            let params = match room {
                Some(r) => serde_json::json!({ "room": r }),
                None => serde_json::json!({}),
            };
            let connect = serde_json::json!({"type": "connect", "body": {"channel": "bench", "id": "b", "params": params, "pong": true}});
            ws.send(Message::text(connect.to_string())).await?;
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) if t.contains("\"connected\"") => break,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e.into()),
                    None => bail!("closed before connected"),
                }
            }
        }
        Proto::Socketio => {
            // Engine.IO open packet, then the namespace CONNECT.
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.starts_with('0') => {}
                other => bail!("expected the Engine.IO open packet, got {other:?}"),
            }
            let auth = match room {
                Some(r) => serde_json::json!({ "room": r }),
                None => serde_json::json!({}),
            };
            ws.send(Message::text(format!("40{auth}"))).await?;
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) if t.starts_with("40") => break,
                    Some(Ok(Message::Text(t))) if t.starts_with("44") => bail!("refused: {t}"),
                    Some(Ok(Message::Text(t))) if t.as_str() == "2" => {
                        ws.send(Message::text("3")).await?
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e.into()),
                    None => bail!("closed before CONNECT"),
                }
            }
        }
    }
    Ok(ws)
}

/// Opens `n` connections, `concurrency` at a time, spread over the
/// target's origins in turn (the i-th on origin `i % origins`).
async fn open_many(t: &Target, n: usize, room: &str) -> Result<(Vec<Ws>, Duration)> {
    let sem = Arc::new(Semaphore::new(t.concurrency));
    let origins: Vec<String> = t.origins().map(str::to_owned).collect();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (t, room, sem) = (t.clone(), room.to_owned(), sem.clone());
        let origin = origins[i % origins.len()].clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await?;
            open_at(&t, &origin, Some(&room)).await
        }));
    }
    let mut out = Vec::with_capacity(n);
    for task in tasks {
        out.push(task.await??);
    }
    Ok((out, start.elapsed()))
}

/// Keeps a subscriber alive: answers pings, hands each message's latency to
/// `on_message` (its send time and its latency, in ns), until `stop`.
async fn drive(
    mut ws: Ws,
    proto: Proto,
    stop: CancellationToken,
    mut on_message: impl FnMut(u64, u64) + Send,
) {
    // Waited on once for the whole loop: no timer or waiter per message.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let frame = tokio::select! {
            biased;
            _ = &mut stopped => break,
            next = ws.next() => match next {
                Some(Ok(f)) => f,
                _ => break,
            },
        };
        let Message::Text(text) = frame else { continue };
        if proto == Proto::Socketio && text.as_str() == "2" {
            let _ = ws.send(Message::text("3")).await;
            continue;
        }
        if let Some(i) = text.find("\"t\":") {
            let digits = &text[i + 4..];
            let n = digits.bytes().take_while(u8::is_ascii_digit).count();
            if let Ok(sent) = digits[..n].parse::<u64>() {
                on_message(sent, now_ns().saturating_sub(sent));
            }
        }
    }
    let _ = ws.close(None).await;
}

async fn connect_scenario(t: Target, n: usize, settle: u64) -> Result<serde_json::Value> {
    let before = t.pid.and_then(rss_kib);
    let (conns, took) = open_many(&t, n, "idle").await?;
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for ws in conns {
        tasks.push(tokio::spawn(drive(ws, t.proto, stop.clone(), |_, _| {})));
    }
    tokio::time::sleep(Duration::from_secs(settle)).await;
    let after = t.pid.and_then(rss_kib);
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
    let per_conn = match (before, after) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b) as f64 / n as f64),
        _ => None,
    };
    Ok(serde_json::json!({
        "scenario": "connect",
        "proto": format!("{:?}", t.proto).to_lowercase(),
        "n": n,
        "secs": took.as_secs_f64(),
        "per_sec": n as f64 / took.as_secs_f64(),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_conn": per_conn,
    }))
}

async fn fanout_scenario(
    t: Target,
    members: usize,
    payload: usize,
    rate: f64,
    secs: u64,
    warmup: u64,
) -> Result<serde_json::Value> {
    let room = "fan";
    let (conns, _) = open_many(&t, members, room).await?;
    let stop = CancellationToken::new();
    let received = Arc::new(AtomicU64::new(0));
    let origins = t.origins().count();
    // Latencies per shard, the members on the publisher's origin in the
    // even shards, the others (a cluster's further nodes) in the odd ones.
    let shards: Arc<Vec<std::sync::Mutex<Histogram<u64>>>> = Arc::new(
        (0..16)
            .map(|_| {
                std::sync::Mutex::new(
                    Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds"),
                )
            })
            .collect(),
    );
    // Publishes sent before this time (ns) are delivered but not measured;
    // set when publishing starts.
    let measure_from = Arc::new(AtomicU64::new(u64::MAX));
    let mut tasks = Vec::new();
    for (i, ws) in conns.into_iter().enumerate() {
        let (received, shards) = (received.clone(), shards.clone());
        let measure_from = measure_from.clone();
        tasks.push(tokio::spawn(drive(
            ws,
            t.proto,
            stop.clone(),
            move |sent, ns| {
                received.fetch_add(1, Ordering::Relaxed);
                if sent < measure_from.load(Ordering::Relaxed) {
                    return;
                }
                let us = (ns / 1000).clamp(1, 120_000_000);
                let remote = usize::from(i % origins != 0);
                let shard = (i / origins * 2 + remote) % shards.len();
                if let Ok(mut h) = shards[shard].lock() {
                    let _ = h.record(us);
                }
            },
        )));
    }
    // Let every subscription settle before the first publish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut publisher = open(&t, None).await?;
    let redis_before = match &t.redis {
        Some(addr) => Some(redis_info(addr).await?),
        None => None,
    };
    let pad = "x".repeat(payload.saturating_sub(40));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    measure_from.store(now_ns() + warmup * 1_000_000_000, Ordering::Relaxed);
    let mut sent = 0u64;
    let mut next = start;
    while start.elapsed() < Duration::from_secs(warmup + secs) {
        let data = stamped(&pad);
        publisher
            .send(Message::text(publish_frame(t.proto, room, &data)))
            .await?;
        sent += 1;
        next += interval;
        // Open loop: the schedule does not wait for deliveries.
        tokio::time::sleep_until(next.into()).await;
    }
    let publishing = start.elapsed();
    // Drain: wait until deliveries stop arriving (bounded).
    let expected = sent * members as u64;
    let mut last = received.load(Ordering::Relaxed);
    for _ in 0..50 {
        if last >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = received.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let total = received.load(Ordering::Relaxed);
    let redis = match (&t.redis, redis_before) {
        (Some(addr), Some(before)) => Some(redis_info(addr).await?.per_event(&before, sent)),
        _ => None,
    };
    stop.cancel();
    let _ = publisher.close(None).await;
    for task in tasks {
        let _ = task.await;
    }
    let new_histogram = || Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("bounds");
    let (mut h, mut local, mut remote) = (new_histogram(), new_histogram(), new_histogram());
    for (i, s) in shards.iter().enumerate() {
        if let Ok(s) = s.lock() {
            h.add(&*s).ok();
            if i % 2 == 0 {
                local.add(&*s).ok()
            } else {
                remote.add(&*s).ok()
            };
        }
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let ms_of = |h: &Histogram<u64>, q: f64| {
        (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
    };
    Ok(serde_json::json!({
        "scenario": "fanout",
        "proto": format!("{:?}", t.proto).to_lowercase(),
        "members": members,
        "payload": payload,
        "rate": rate,
        "sent": sent,
        "expected": expected,
        "received": total,
        "drops": expected.saturating_sub(total),
        "frames_per_sec": total as f64 / publishing.as_secs_f64(),
        "warmup_secs": warmup,
        "measured": h.len(),
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "p999_ms": ms(0.999),
        "max_ms": h.max() as f64 / 1000.0,
        "origins": origins,
        "p50_local_ms": ms_of(&local, 0.5),
        "p99_local_ms": ms_of(&local, 0.99),
        "p50_remote_ms": ms_of(&remote, 0.5),
        "p99_remote_ms": ms_of(&remote, 0.99),
        "redis": redis,
        "server_rss_kib": t.pid.and_then(rss_kib),
    }))
}

/// A Redis server's traffic counters (`INFO all`).
#[derive(Debug, Clone, Copy)]
struct RedisInfo {
    /// `total_net_input_bytes`.
    input: u64,
    /// `total_net_output_bytes`.
    output: u64,
    /// `total_commands_processed`.
    commands: u64,
    /// Calls of `PUBLISH` and `SPUBLISH`.
    publishes: u64,
    /// The size of this `INFO` request and of its reply, so that a later
    /// reading can leave them out.
    own: (u64, u64),
}

impl RedisInfo {
    /// What Redis carried per published event between `before` and this
    /// reading, the first `INFO` exchange left out (the second's happens
    /// after the counters were read).
    fn per_event(&self, before: &RedisInfo, events: u64) -> serde_json::Value {
        let per = |a: u64, b: u64, own: u64| {
            a.saturating_sub(b).saturating_sub(own) as f64 / events.max(1) as f64
        };
        serde_json::json!({
            "events": events,
            "in_bytes": per(self.input, before.input, before.own.0),
            "out_bytes": per(self.output, before.output, before.own.1),
            "commands": per(self.commands, before.commands, 1),
            "publishes": per(self.publishes, before.publishes, 0),
        })
    }

    /// The counters in the text of an `INFO all` reply.
    fn parse(text: &str, own: (u64, u64)) -> RedisInfo {
        let field = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let calls = |cmd: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
                .and_then(|v| v.split(',').next()?.parse().ok())
                .unwrap_or(0)
        };
        RedisInfo {
            input: field("total_net_input_bytes"),
            output: field("total_net_output_bytes"),
            commands: field("total_commands_processed"),
            publishes: calls("publish") + calls("spublish"),
            own,
        }
    }
}

/// Reads a Redis server's counters with one inline `INFO all` (RESP: a
/// bulk string reply).
async fn redis_info(addr: &str) -> Result<RedisInfo> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to Redis at {addr}"))?;
    let request = b"INFO all\r\n";
    conn.write_all(request).await?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 8192];
    let text = loop {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            bail!("Redis closed before answering INFO");
        }
        reply.extend_from_slice(&buf[..n]);
        let Some(eol) = reply.windows(2).position(|w| w == b"\r\n") else {
            continue;
        };
        let head = std::str::from_utf8(&reply[..eol])?;
        let len: usize = head
            .strip_prefix('$')
            .and_then(|l| l.parse().ok())
            .with_context(|| format!("unexpected INFO reply {head:?}"))?;
        if reply.len() >= eol + 2 + len + 2 {
            break String::from_utf8_lossy(&reply[eol + 2..eol + 2 + len]).into_owned();
        }
    };
    Ok(RedisInfo::parse(
        &text,
        (request.len() as u64, reply.len() as u64),
    ))
}

/// A payload carrying its send time (`t`, ns) and padding.
fn stamped(pad: &str) -> String {
    format!(r#"{{"t":{},"p":"{pad}"}}"#, now_ns())
}

/// One publish frame of the bench contract.
fn publish_frame(proto: Proto, room: &str, data: &str) -> String {
    match proto {
        Proto::Misskey => format!(
            r#"{{"type":"ch","body":{{"id":"b","type":"publish","body":{{"room":"{room}","data":{data}}}}}}}"#
        ),
        Proto::Socketio => format!(r#"42["publish",{{"room":"{room}","data":{data}}}]"#),
    }
}

async fn upstream_scenario(
    t: Target,
    senders: usize,
    window: u64,
    payload: usize,
    secs: u64,
) -> Result<serde_json::Value> {
    let room = "up";
    let subscriber = open(&t, Some(room)).await?;
    let stop = CancellationToken::new();
    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let sub = {
        let received = received.clone();
        tokio::spawn(drive(subscriber, t.proto, stop.clone(), move |_, _| {
            received.fetch_add(1, Ordering::Relaxed);
        }))
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pad = "x".repeat(payload.saturating_sub(40));
    let mut tasks = Vec::new();
    for _ in 0..senders {
        let mut ws = open(&t, None).await?;
        let (stop, sent, received, pad, proto) = (
            stop.clone(),
            sent.clone(),
            received.clone(),
            pad.clone(),
            t.proto,
        );
        tasks.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                // Closed loop: no more than `window` messages in flight.
                if sent.load(Ordering::Relaxed) >= received.load(Ordering::Relaxed) + window {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                    continue;
                }
                let data = stamped(&pad);
                if ws
                    .feed(Message::text(publish_frame(proto, room, &data)))
                    .await
                    .is_err()
                {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                // Flush in small batches: the server sees several messages
                // per read, as from a busy client.
                if sent.load(Ordering::Relaxed) % 8 == 0 && ws.flush().await.is_err() {
                    break;
                }
            }
            let _ = ws.flush().await;
            let _ = ws.close(None).await;
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (r0, start) = (received.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (r1, took) = (received.load(Ordering::Relaxed), start.elapsed());
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
    let _ = sub.await;
    Ok(serde_json::json!({
        "scenario": "upstream",
        "proto": format!("{:?}", t.proto).to_lowercase(),
        "senders": senders,
        "window": window,
        "payload": payload,
        "messages_per_sec": (r1 - r0) as f64 / took.as_secs_f64(),
        "server_rss_kib": t.pid.and_then(rss_kib),
    }))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(async {
        match cli.cmd {
            Cmd::Connect { target, n, settle } => connect_scenario(target, n, settle).await,
            Cmd::Fanout {
                target,
                members,
                payload,
                rate,
                secs,
                warmup,
            } => fanout_scenario(target, members, payload, rate, secs, warmup).await,
            Cmd::Upstream {
                target,
                senders,
                window,
                payload,
                secs,
            } => upstream_scenario(target, senders, window, payload, secs).await,
            Cmd::AttackIds {
                server,
                conns,
                id_bytes,
            } => soak::attack_ids(&server.url, server.pid, conns, id_bytes).await,
            Cmd::AttackSlow {
                server,
                clients,
                events,
                size,
            } => soak::attack_slow(&server.url, server.pid, clients, events, size).await,
            Cmd::AttackHeaders {
                server,
                n,
                header_bytes,
            } => soak::attack_headers(&server.url, server.pid, n, header_bytes).await,
            Cmd::RecoveryMemory {
                server,
                sockets,
                rooms,
                events,
                size,
            } => {
                let load = soak::RecoveryLoad {
                    sockets,
                    rooms,
                    events,
                    size,
                };
                soak::recovery_memory(&server.url, server.pid, load).await
            }
            Cmd::Soak { server, secs } => soak::soak(&server.url, server.pid, secs).await,
            Cmd::ServeNative { listen } => native::serve(listen)
                .await
                .map(|()| serde_json::Value::Null),
        }
    })?;
    if out.is_null() {
        return Ok(());
    }
    println!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_counters_per_event_leave_out_the_info_exchange() {
        let before = RedisInfo::parse(
            "# Stats\r\ntotal_commands_processed:10\r\ntotal_net_input_bytes:1000\r\n\
             total_net_output_bytes:500\r\n# Commandstats\r\n\
             cmdstat_publish:calls=4,usec=9,usec_per_call=2.25\r\n",
            (10, 300),
        );
        assert_eq!(
            (before.input, before.output, before.commands),
            (1000, 500, 10)
        );
        assert_eq!(before.publishes, 4);
        let after = RedisInfo::parse(
            "total_commands_processed:111\r\ntotal_net_input_bytes:11010\r\n\
             total_net_output_bytes:20800\r\ncmdstat_publish:calls=100,usec=1\r\n\
             cmdstat_spublish:calls=4,usec=1\r\n",
            (10, 300),
        );
        let per = after.per_event(&before, 100);
        assert_eq!(per["in_bytes"], 100.0);
        assert_eq!(per["out_bytes"], 200.0);
        assert_eq!(per["commands"], 1.0);
        assert_eq!(per["publishes"], 1.0);
    }
}
