//! Hostile and mixed loads, measured by the server's resident memory.
//!
//! Each scenario reports the server's RSS before, at its peak during and
//! after the load (once its connections are closed), so a bound shows as
//! growth per attacking connection and a leak as memory that does not come
//! back:
//! - `attack-ids`: anonymous Misskey streams each open 32 channel
//!   instances and capture 1,536 notes with ids of a given length (60 KB:
//!   far past the bound, ignored; 128 bytes: the longest kept).
//! - `attack-slow`: clients that never read, in a room that receives many
//!   large events through `/api/publish`.
//! - `attack-headers`: polling handshakes carrying large headers, closed at
//!   once (past `max_header_bytes`: refused; under it: the sessions keep
//!   only a bounded part).
//! - `soak`: for a bounded time, idle connections of both protocols, a
//!   fan-out room with a publisher, slow consumers coming and going,
//!   reconnect churn and malformed clients; RSS sampled every second.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::{open, rss_kib, Proto, Target, Ws};

/// `host:port` of a `ws://` origin.
fn authority(url: &str) -> &str {
    url.trim_start_matches("ws://").trim_end_matches('/')
}

/// RSS in KiB, or 0 when it cannot be read.
fn rss(pid: u32) -> u64 {
    rss_kib(pid).unwrap_or(0)
}

/// Samples a process's RSS every `every` until cancelled; the highest.
fn peak_sampler(
    pid: u32,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut peak = rss(pid);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return peak.max(rss(pid)),
                _ = tokio::time::sleep(every) => peak = peak.max(rss(pid)),
            }
        }
    })
}

/// One HTTP/1.1 request on its own connection; the status code.
async fn http(url: &str, request: &[u8]) -> Result<u16> {
    let mut s = TcpStream::connect(authority(url)).await?;
    s.write_all(request).await?;
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if got.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&got);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {:?}", &head[..head.len().min(80)]))
}

/// `POST /api/publish` (the loopback needs no key without `[api] key`).
async fn publish(url: &str, body: &str) -> Result<()> {
    let req = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    match http(url, req.as_bytes()).await? {
        200 => Ok(()),
        s => bail!("publish answered {s}"),
    }
}

/// Publishes `count` events of `size` bytes to `room`, as few requests as
/// the API's 2 MB body bound allows.
async fn publish_many(url: &str, room: &str, count: usize, size: usize) -> Result<()> {
    let blob = "x".repeat(size);
    let per_request = ((1_900_000 / (size + 64)).max(1)).min(count.max(1));
    let mut sent = 0;
    while sent < count {
        let n = per_request.min(count - sent);
        let items: Vec<String> = (0..n)
            .map(|_| format!(r#"{{"room":"{room}","event":"message","data":"{blob}"}}"#))
            .collect();
        publish(url, &format!("[{}]", items.join(","))).await?;
        sent += n;
    }
    Ok(())
}

/// Sends a Misskey `connect` with `pong` and waits for its `connected`.
async fn connected(ws: &mut Ws, id: &str) -> Result<()> {
    let f = serde_json::json!({"type": "connect", "body": {"channel": "bench", "id": id, "params": {"room": "x"}, "pong": true}});
    ws.send(Message::text(f.to_string())).await?;
    let quoted = format!("\"id\":\"{id}\"");
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains("\"connected\"") && t.contains(&quoted) => {
                return Ok(())
            }
            Some(Ok(_)) => continue,
            other => bail!("stream ended before connected: {other:?}"),
        }
    }
}

fn misskey(url: &str) -> Target {
    Target {
        url: url.to_owned(),
        proto: Proto::Misskey,
        pid: None,
        concurrency: 64,
        also: Vec::new(),
        redis: None,
    }
}

async fn raw_stream(url: &str) -> Result<Ws> {
    let (ws, _) = tokio_tungstenite::connect_async(format!("{url}/streaming")).await?;
    Ok(ws)
}

pub async fn attack_ids(
    url: &str,
    pid: u32,
    conns: usize,
    id_bytes: usize,
) -> Result<serde_json::Value> {
    let before = rss(pid);
    let stop = CancellationToken::new();
    let peak = peak_sampler(pid, Duration::from_millis(100), stop.clone());
    let mut tasks = Vec::new();
    for c in 0..conns {
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut ws = raw_stream(&url).await?;
            let id = |kind: char, i: usize| {
                let head = format!("{kind}{c}-{i}-");
                format!("{head}{}", "i".repeat(id_bytes.saturating_sub(head.len())))
            };
            for i in 0..32 {
                let f = serde_json::json!({"type": "connect", "body": {"channel": "bench", "id": id('c', i), "params": {"room": "r"}}});
                ws.feed(Message::text(f.to_string())).await?;
            }
            for i in 0..1536 {
                let f = serde_json::json!({"type": "subNote", "body": {"id": id('n', i)}});
                ws.feed(Message::text(f.to_string())).await?;
            }
            ws.flush().await?;
            // Frames are handled in order: once this is answered, all were.
            // Ids the host keeps fill all 32 instances: replace one; with
            // ids past the bound none was opened: a new short one.
            let barrier = if id_bytes <= 128 { id('c', 0) } else { "done".into() };
            connected(&mut ws, &barrier).await?;
            anyhow::Ok(ws)
        }));
    }
    let mut held = Vec::new();
    for t in tasks {
        held.push(t.await??);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let attacked = rss(pid);
    for mut ws in held {
        let _ = ws.close(None).await;
    }
    // Past the host's trim period (10 s).
    tokio::time::sleep(Duration::from_secs(12)).await;
    stop.cancel();
    let peak = peak.await?;
    let closed = rss(pid);
    Ok(serde_json::json!({
        "scenario": "attack-ids",
        "conns": conns,
        "id_bytes": id_bytes,
        "rss_before_kib": before,
        "rss_attacked_kib": attacked,
        "rss_peak_kib": peak,
        "rss_closed_kib": closed,
        "kib_per_conn": attacked.saturating_sub(before) as f64 / conns as f64,
    }))
}

pub async fn attack_slow(
    url: &str,
    pid: u32,
    clients: usize,
    events: usize,
    size: usize,
) -> Result<serde_json::Value> {
    let before = rss(pid);
    let stop = CancellationToken::new();
    let peak = peak_sampler(pid, Duration::from_millis(50), stop.clone());
    let target = misskey(url);
    let mut idle = Vec::new();
    for _ in 0..clients {
        // Connected to the room, then never read again.
        idle.push(open(&target, Some("slow")).await?);
    }
    let start = Instant::now();
    publish_many(url, "slow", events, size).await?;
    let took = start.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loaded = rss(pid);
    drop(idle);
    // Past the host's trim period (10 s).
    tokio::time::sleep(Duration::from_secs(12)).await;
    stop.cancel();
    let peak = peak.await?;
    Ok(serde_json::json!({
        "scenario": "attack-slow",
        "clients": clients,
        "events": events,
        "event_bytes": size,
        "publish_secs": took.as_secs_f64(),
        "rss_before_kib": before,
        "rss_peak_kib": peak,
        "rss_loaded_kib": loaded,
        "rss_closed_kib": rss(pid),
        "growth_peak_kib": peak.saturating_sub(before),
    }))
}

pub async fn attack_headers(
    url: &str,
    pid: u32,
    n: usize,
    header_bytes: usize,
) -> Result<serde_json::Value> {
    let before = rss(pid);
    let stop = CancellationToken::new();
    let peak = peak_sampler(pid, Duration::from_millis(50), stop.clone());
    // Split over headers of at most 8,000 bytes, as a browser's cookies might be.
    let mut headers = String::new();
    let mut left = header_bytes;
    let mut i = 0;
    while left > 0 {
        let v = left.min(8000);
        headers.push_str(&format!("X-Pad-{i}: {}\r\n", "h".repeat(v)));
        left -= v;
        i += 1;
    }
    let req = Arc::new(format!(
        "GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n"
    ));
    let ok = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(200));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (url, req, ok, refused, sem) = (
            url.to_owned(),
            req.clone(),
            ok.clone(),
            refused.clone(),
            sem.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await?;
            match http(&url, req.as_bytes()).await {
                Ok(200) => ok.fetch_add(1, Ordering::Relaxed),
                _ => refused.fetch_add(1, Ordering::Relaxed),
            };
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss(pid);
    stop.cancel();
    let peak = peak.await?;
    Ok(serde_json::json!({
        "scenario": "attack-headers",
        "handshakes": n,
        "header_bytes": header_bytes,
        "accepted": ok.load(Ordering::Relaxed),
        "refused": refused.load(Ordering::Relaxed),
        "rss_before_kib": before,
        "rss_peak_kib": peak,
        "rss_after_kib": after,
        "kib_kept_per_session": after.saturating_sub(before) as f64 / (ok.load(Ordering::Relaxed).max(1)) as f64,
    }))
}

/// Holds a connection, answering Socket.IO pings, until `stop`.
async fn hold(mut ws: Ws, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) if t.as_str() == "2" => { let _ = ws.send(Message::text("3")).await; }
                Some(Ok(_)) => {}
                _ => break,
            },
        }
    }
    let _ = ws.close(None).await;
}

pub async fn soak(url: &str, pid: u32, secs: u64) -> Result<serde_json::Value> {
    let baseline = rss(pid);
    let stop = CancellationToken::new();
    let mut tasks: Vec<tokio::task::JoinHandle<Result<()>>> = Vec::new();
    let counters: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    // Idle connections of both protocols, and a fan-out room that reads.
    for (proto, n, room) in [
        (Proto::Misskey, 1500, "idle"),
        (Proto::Socketio, 500, "idle"),
        (Proto::Misskey, 200, "fan"),
    ] {
        let t = Target {
            url: url.to_owned(),
            proto,
            pid: None,
            concurrency: 64,
            also: Vec::new(),
            redis: None,
        };
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n {
                let ws = open(&t, Some(room)).await?;
                tokio::spawn(hold(ws, stop.clone()));
            }
            Ok(())
        }));
    }
    // The publisher: 20 events of 2 KB a second to the fan-out room.
    {
        let (url, stop) = (url.to_owned(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while !stop.is_cancelled() {
                tick.tick().await;
                publish_many(&url, "fan", 1, 2000).await?;
            }
            Ok(())
        }));
    }
    // Slow consumers: 5 at a time join the room, never read, go after 5 s.
    {
        let (url, stop, c) = (url.to_owned(), stop.clone(), counters.clone());
        tasks.push(tokio::spawn(async move {
            let t = misskey(&url);
            while !stop.is_cancelled() {
                let mut idle = Vec::new();
                for _ in 0..5 {
                    idle.push(open(&t, Some("fan")).await?);
                }
                c[0].fetch_add(5, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Ok(())
        }));
    }
    // Reconnect churn: connect, open a channel, leave; both protocols.
    for proto in [Proto::Misskey, Proto::Socketio] {
        let (url, stop, c) = (url.to_owned(), stop.clone(), counters.clone());
        tasks.push(tokio::spawn(async move {
            let t = Target {
                url,
                proto,
                pid: None,
                concurrency: 1,
                also: Vec::new(),
                redis: None,
            };
            while !stop.is_cancelled() {
                let mut ws = open(&t, Some("churn")).await?;
                let _ = ws.close(None).await;
                c[1].fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(())
        }));
    }
    // Malformed clients: junk, ids past the bound, a frame over the size
    // limit, a bad Engine.IO packet.
    {
        let (url, stop, c) = (url.to_owned(), stop.clone(), counters.clone());
        tasks.push(tokio::spawn(async move {
            let long = "l".repeat(60_000);
            while !stop.is_cancelled() {
                let mut ws = raw_stream(&url).await?;
                ws.send(Message::text("not json")).await?;
                ws.send(Message::text(format!(
                    r#"{{"type":"subNote","body":{{"id":"{long}"}}}}"#
                )))
                .await?;
                let _ = ws.send(Message::text("x".repeat(70_000))).await;
                drop(ws);
                let (mut sio, _) = tokio_tungstenite::connect_async(format!(
                    "{url}/socket.io/?EIO=4&transport=websocket"
                ))
                .await?;
                let _ = sio.send(Message::text("4garbage")).await;
                drop(sio);
                c[2].fetch_add(2, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(())
        }));
    }
    let mut series = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        series.push(rss(pid));
    }
    stop.cancel();
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("a soak load failed: {e:#}"),
            Err(e) => bail!("a soak load panicked: {e}"),
        }
    }
    // Everything closed: what is left over the baseline did not come back.
    let mut settled = Vec::new();
    // Longer than the host's trim period (10 s).
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        settled.push(rss(pid));
    }
    let peak = series.iter().copied().max().unwrap_or(0);
    let end = *settled.last().unwrap_or(&0);
    Ok(serde_json::json!({
        "scenario": "soak",
        "secs": secs,
        "rss_baseline_kib": baseline,
        "rss_peak_kib": peak,
        "rss_end_kib": end,
        "rss_series_kib": series,
        "rss_settle_kib": settled,
        "slow_consumers": counters[0].load(Ordering::Relaxed),
        "reconnects": counters[1].load(Ordering::Relaxed),
        "malformed_clients": counters[2].load(Ordering::Relaxed),
    }))
}

/// `GET <path>` on its own connection; the body.
async fn get(url: &str, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(authority(url)).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).await?;
    let text = String::from_utf8_lossy(&got);
    Ok(text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned()))
}

/// A metric of `/metrics` without labels.
async fn metric(url: &str, name: &str) -> Result<f64> {
    let body = get(url, "/metrics").await?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("no {name} in /metrics"))
}

/// Polls a metric until it reaches `at_least` (bounded); its last value.
async fn metric_reaches(url: &str, name: &str, at_least: f64) -> Result<f64> {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let v = metric(url, name).await?;
        if v >= at_least {
            return Ok(v);
        }
        if Instant::now() > end {
            bail!("{name} stayed at {v}, under {at_least}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The load of [`recovery_memory`].
pub struct RecoveryLoad {
    pub sockets: usize,
    pub rooms: usize,
    pub events: usize,
    pub size: usize,
}

/// Connection state recovery (the host runs with `[socketio.recovery]`):
/// twice, `sockets` Socket.IO sockets spread over `rooms` rooms lose their
/// connections (TCP closed without a close frame, so their sessions are
/// kept), then `events` of `size` bytes are published over the rooms and
/// kept in their histories. What the host holds per kept session (the
/// second round's growth) and per history entry, from its RSS.
pub async fn recovery_memory(url: &str, pid: u32, load: RecoveryLoad) -> Result<serde_json::Value> {
    let RecoveryLoad {
        sockets,
        rooms,
        events,
        size,
    } = load;
    let rooms = rooms.max(1);
    let t = Target {
        proto: Proto::Socketio,
        ..misskey(url)
    };
    let before = rss(pid);
    // Two rounds of sockets lost: the first round's connections leave
    // memory the allocator keeps and the second round's reuse, so the
    // second round's growth is what its sessions hold.
    let mut after_round = Vec::new();
    let mut connected = 0;
    for round in 1..=2 {
        let mut conns = Vec::with_capacity(sockets);
        for i in 0..sockets {
            conns.push(open(&t, Some(&format!("kept-{}", i % rooms))).await?);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        connected = connected.max(rss(pid));
        // Lost, not closed: the TCP connections end without a close frame.
        drop(conns);
        metric_reaches(
            url,
            "chanhost_socketio_recovery_kept",
            (round * sockets) as f64,
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        after_round.push(rss(pid));
    }
    let kept = after_round[1];
    for r in 0..rooms {
        let share = events / rooms + usize::from(r < events % rooms);
        publish_many(url, &format!("kept-{r}"), share, size).await?;
    }
    let entries = metric_reaches(
        url,
        "chanhost_socketio_recovery_history_entries",
        events as f64,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let history = rss(pid);
    Ok(serde_json::json!({
        "scenario": "recovery-memory",
        "sockets": sockets,
        "events": events,
        "entries": entries,
        "size": size,
        "rss_before_kib": before,
        "rss_peak_kib": connected.max(kept).max(history),
        "rss_connected_kib": connected,
        "rss_first_round_kib": after_round[0],
        "rss_kept_kib": kept,
        "rss_history_kib": history,
        "bytes_per_session": kept.saturating_sub(after_round[0]) as f64 * 1024.0 / sockets.max(1) as f64,
        "bytes_per_entry": history.saturating_sub(kept) as f64 * 1024.0 / entries.max(1.0),
    }))
}
