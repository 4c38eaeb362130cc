//! Recovery in a cluster (`[cluster]` with `[socketio.recovery]`):
//! sessions, room histories and the offset counter live in the cluster's
//! Redis, so a socket whose node died recovers on any other.
//!
//! What is kept, under the cluster's `prefix`:
//!
//! - `<prefix>:rec:offset` — the counter every publication's offset comes
//!   from (cluster-wide, so offsets compare across rooms and nodes).
//! - `<prefix>:rec:history:<room>` — a list, oldest first, of
//!   `<offset>:<ms>:<message>` (the cluster broker's message, attachments
//!   and filter included), for rooms that are marked; at most
//!   `history_per_room` entries and none older than the window, expiring
//!   twice the window after its last write.
//! - `<prefix>:rec:cut:<room>` — the newest offset dropped from that
//!   history (cap or age): a session that would need it connects as new.
//! - `<prefix>:rec:mark:<room>` — present while a recorded socket is in
//!   the room on some node (refreshed by that node) or a kept session
//!   lists it: only marked rooms are recorded. Expires a third of the
//!   window (and a second) after the window, so it outlives every session
//!   that lists the room.
//! - `<prefix>:rec:session:<pid>` — a session (JSON), taken with
//!   `GETDEL`, so it is recovered once. Written while its socket is
//!   connected (at its CONNECT reply, on each join and leave, and again
//!   every third of the window, expiring a third of the window after the
//!   window), so that a socket whose node is killed recovers elsewhere;
//!   written again when it loses its connection (expiring after the
//!   window) and deleted when it ends for good. Every write but the first
//!   of a connection ([`KEEP`]) and every delete ([`FORGET`]) applies only
//!   to the session that connection wrote: a node that has not noticed
//!   its socket is gone cannot overwrite or delete the session another
//!   node took back.
//! - `<prefix>:rec:taken:<pid>` — a session was taken back (for as long as
//!   a mark lives): its old writers do not bring it back.
//!
//! The broker's publishing connection numbers, records and publishes each
//! publication in one script ([`NUMBER`]): pub/sub then carries every
//! room's events to every node in offset order on one connection, and
//! each node delivers to its recorded sockets from that stream (its own
//! publications included), so the offsets a socket gets only grow.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use parking_lot::Mutex;

use super::{History, Keep, Missed, Recovery, Refusal, Session};
use crate::pubsub::{timed, UrlError};

/// The counter of offsets.
pub fn offset_key(prefix: &str) -> String {
    format!("{prefix}:rec:offset")
}

/// A room's history.
pub fn history_key(prefix: &str, room: &str) -> String {
    format!("{prefix}:rec:history:{room}")
}

/// The newest offset a room's history dropped.
pub fn cut_key(prefix: &str, room: &str) -> String {
    format!("{prefix}:rec:cut:{room}")
}

/// Present while a room is recorded.
pub fn mark_key(prefix: &str, room: &str) -> String {
    format!("{prefix}:rec:mark:{room}")
}

/// A kept session.
pub fn session_key(prefix: &str, pid: &str) -> String {
    format!("{prefix}:rec:session:{pid}")
}

/// Left for the window when a session is taken back: its old writers must
/// not bring it back.
pub fn taken_key(prefix: &str, pid: &str) -> String {
    format!("{prefix}:rec:taken:{pid}")
}

/// Writes a session. KEYS: the session, its taken mark. ARGV: the
/// session (JSON), its time to live (ms), create (`1`/`0`), the writing
/// connection's id. Without create, it writes only over a session that
/// connection wrote, or where there is none and none was taken (a Redis
/// that lost it). Returns 1 when written.
pub const KEEP: &str = r#"
if ARGV[3] == '0' then
  local cur = redis.call('GET', KEYS[1])
  if cur then
    if not string.find(cur, '"connection":' .. ARGV[4] .. ',', 1, true) then return 0 end
  elseif redis.call('EXISTS', KEYS[2]) == 1 then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1"#;

/// Deletes a session if the given connection wrote it. KEYS: the session.
/// ARGV: the connection's id. Returns 1 when deleted.
pub const FORGET: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur and string.find(cur, '"connection":' .. ARGV[1] .. ',', 1, true) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0"#;

/// Numbers a publication, records it when its room is marked, and
/// publishes it with its offset (`\xff\xff\xff\xff<offset>:` before the
/// broker's message: a header length no message has). KEYS: offset
/// counter, history, mark, cut. ARGV: channel, message, cap, window (ms).
/// Returns `{offset, entries cut by the cap}`.
pub const NUMBER: &str = r"
local g = redis.call('INCR', KEYS[1])
local cut = 0
if redis.call('EXISTS', KEYS[3]) == 1 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local cap = tonumber(ARGV[3])
  local window = tonumber(ARGV[4])
  local n = redis.call('RPUSH', KEYS[2], g .. ':' .. now .. ':' .. ARGV[2])
  local last = 0
  while n > cap do
    local e = redis.call('LPOP', KEYS[2])
    last = tonumber(string.match(e, '^(%d+):'))
    n = n - 1
    cut = cut + 1
  end
  while n > 1 do
    local e = redis.call('LINDEX', KEYS[2], 0)
    local eg, et = string.match(e, '^(%d+):(%d+):')
    if now - tonumber(et) <= window then break end
    redis.call('LPOP', KEYS[2])
    last = tonumber(eg)
    n = n - 1
  end
  if last > 0 then redis.call('SET', KEYS[4], last, 'PX', window * 2) end
  redis.call('PEXPIRE', KEYS[2], window * 2)
end
redis.call('PUBLISH', ARGV[1], '\255\255\255\255' .. g .. ':' .. ARGV[2])
return {g, cut}";

/// What a numbered message starts with.
pub const NUMBERED: &[u8] = b"\xff\xff\xff\xff";

/// Splits a numbered message into its offset and the broker's message.
pub fn split_numbered(payload: &[u8]) -> Option<(u64, &[u8])> {
    let rest = payload.strip_prefix(NUMBERED)?;
    let colon = rest.iter().take(21).position(|b| *b == b':')?;
    let offset = super::parse_offset(std::str::from_utf8(&rest[..colon]).ok()?)?;
    Some((offset, &rest[colon + 1..]))
}

/// Splits a history entry (`<offset>:<ms>:<message>`).
fn split_entry(entry: &[u8]) -> Option<(u64, &[u8])> {
    let a = entry.iter().take(21).position(|b| *b == b':')?;
    let offset = super::parse_offset(std::str::from_utf8(&entry[..a]).ok()?)?;
    let rest = &entry[a + 1..];
    let b = rest.iter().take(21).position(|b| *b == b':')?;
    Some((offset, &rest[b + 1..]))
}

/// What [`RedisRecovery`] needs.
pub struct RedisRecoveryOptions {
    pub url: String,
    pub prefix: String,
    pub window: Duration,
}

/// Sessions and histories of a cluster node.
pub struct RedisRecovery {
    client: redis::Client,
    prefix: String,
    window: Duration,
    /// The connection requests share (made again after a failure).
    conn: std::sync::Arc<Mutex<Option<redis::aio::MultiplexedConnection>>>,
    /// Rooms this node marked, and when it last wrote their mark.
    marks: Mutex<HashMap<String, Instant>>,
}

impl RedisRecovery {
    pub fn new(o: RedisRecoveryOptions) -> Result<Self, UrlError> {
        Ok(Self {
            client: redis::Client::open(o.url.as_str()).map_err(UrlError)?,
            prefix: o.prefix,
            window: o.window,
            conn: Default::default(),
            marks: Mutex::new(HashMap::new()),
        })
    }

    fn window_ms(&self) -> u64 {
        self.window.as_millis() as u64
    }

    /// How long a mark lives: past the longest a session is kept (the
    /// window and a third: written again every third while connected), so
    /// that a room stays recorded for as long as a session may need it.
    fn mark_ms(&self) -> u64 {
        self.window_ms() + self.window_ms() / 3 + 1000
    }

    /// A pipeline, run on the shared connection (made again after a
    /// failure), within the time limit.
    fn run<T: redis::FromRedisValue + Send + 'static>(
        &self,
        pipe: redis::Pipeline,
    ) -> BoxFuture<'static, Result<T, String>> {
        let client = self.client.clone();
        let shared = self.conn.clone();
        Box::pin(async move {
            let cached = shared.lock().clone();
            let mut conn = match cached {
                Some(c) => c,
                None => {
                    let c = timed(client.get_multiplexed_async_connection()).await?;
                    *shared.lock() = Some(c.clone());
                    c
                }
            };
            let r = timed(pipe.query_async::<T>(&mut conn)).await;
            if r.is_err() {
                shared.lock().take();
            }
            r
        })
    }

    /// Adds the writes of the marks of `rooms` to a pipeline.
    fn add_marks<'r>(
        &self,
        pipe: &mut redis::Pipeline,
        rooms: impl IntoIterator<Item = &'r String>,
    ) {
        for room in rooms {
            pipe.cmd("SET")
                .arg(mark_key(&self.prefix, room))
                .arg(1)
                .arg("PX")
                .arg(self.mark_ms())
                .ignore();
        }
    }

    /// Writes the marks of `rooms`.
    fn write_marks(&self, rooms: &[String]) {
        if rooms.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        self.add_marks(&mut pipe, rooms);
        self.spawn(pipe);
    }

    fn spawn(&self, pipe: redis::Pipeline) {
        let run = self.run::<()>(pipe);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = run.await {
                    tracing::debug!("connection state recovery: Redis write failed: {e}");
                }
            });
        }
    }
}

impl Recovery for RedisRecovery {
    /// The cluster's broker numbers (in Redis): nothing to do here.
    fn sequence(
        &self,
        _p: &crate::broker::Publication,
        _deliver: &mut dyn FnMut(&crate::broker::Publication),
    ) -> bool {
        false
    }

    fn records(&self, room: &str) -> bool {
        self.marks.lock().contains_key(room)
    }

    fn mark(&self, room: &str) {
        let fresh = {
            let mut marks = self.marks.lock();
            let due = marks
                .get(room)
                .is_none_or(|at| at.elapsed() > self.window / 3);
            if due {
                marks.insert(room.to_owned(), Instant::now());
            }
            due
        };
        if fresh {
            self.write_marks(&[room.to_owned()]);
        }
    }

    fn head(&self) -> BoxFuture<'static, Option<u64>> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(offset_key(&self.prefix));
        let run = self.run::<(Option<u64>,)>(pipe);
        Box::pin(async move { run.await.ok().map(|(h,)| h.unwrap_or(0)) })
    }

    fn keeps_connected(&self) -> bool {
        true
    }

    fn forget(&self, pid: &str, connection: u64) -> BoxFuture<'static, ()> {
        let mut pipe = redis::pipe();
        pipe.cmd("EVAL")
            .arg(FORGET)
            .arg(1)
            .arg(session_key(&self.prefix, pid))
            .arg(connection)
            .ignore();
        let run = self.run::<()>(pipe);
        Box::pin(async move {
            if let Err(e) = run.await {
                tracing::warn!(
                    "connection state recovery: a session could not be forgotten in Redis: {e}"
                );
            }
        })
    }

    fn keep(&self, s: Session, how: Keep) -> BoxFuture<'static, ()> {
        let mut pipe = redis::pipe();
        let json = serde_json::to_string(&s).unwrap_or_default();
        let ahead = how.rewritten_every.map_or(0, |d| d.as_millis() as u64);
        pipe.cmd("EVAL")
            .arg(KEEP)
            .arg(2)
            .arg(session_key(&self.prefix, &s.pid))
            .arg(taken_key(&self.prefix, &s.pid))
            .arg(json)
            .arg(self.window_ms() + ahead)
            .arg(if how.create { "1" } else { "0" })
            .arg(s.connection)
            .ignore();
        self.add_marks(&mut pipe, &s.rooms);
        let run = self.run::<()>(pipe);
        Box::pin(async move {
            if let Err(e) = run.await {
                tracing::warn!(
                    "connection state recovery: a session could not be kept in Redis: {e}"
                );
            }
        })
    }

    fn take(&self, pid: &str) -> BoxFuture<'static, Result<Session, Refusal>> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("GETDEL")
            .arg(session_key(&self.prefix, pid))
            .cmd("SET")
            .arg(taken_key(&self.prefix, pid))
            .arg(1)
            .arg("PX")
            .arg(self.mark_ms())
            .ignore();
        let run = self.run::<(Option<String>,)>(pipe);
        Box::pin(async move {
            match run.await {
                Ok((Some(json),)) => serde_json::from_str(&json).map_err(|_| Refusal::Unknown),
                Ok((None,)) => Err(Refusal::Unknown),
                Err(_) => Err(Refusal::Down),
            }
        })
    }

    fn missed(&self, rooms: &[String], after: u64) -> BoxFuture<'static, Result<History, Refusal>> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("GET").arg(offset_key(&self.prefix));
        for room in rooms {
            pipe.cmd("LRANGE")
                .arg(history_key(&self.prefix, room))
                .arg(0)
                .arg(-1);
            pipe.cmd("GET").arg(cut_key(&self.prefix, room));
        }
        let run = self.run::<Vec<redis::Value>>(pipe);
        let rooms = rooms.to_vec();
        Box::pin(async move {
            let replies = run.await.map_err(|_| Refusal::Down)?;
            let mut replies = replies.into_iter();
            let head: u64 = replies
                .next()
                .and_then(|v| redis::from_redis_value::<Option<u64>>(v).ok())
                .flatten()
                .unwrap_or(0);
            if after > head {
                return Err(Refusal::Offset);
            }
            let mut missed = Vec::new();
            for room in &rooms {
                let entries: Vec<Vec<u8>> = replies
                    .next()
                    .and_then(|v| redis::from_redis_value(v).ok())
                    .unwrap_or_default();
                let cut: Option<u64> = replies
                    .next()
                    .and_then(|v| redis::from_redis_value(v).ok())
                    .flatten();
                if cut.is_some_and(|c| c > after) {
                    return Err(Refusal::Cut);
                }
                for e in &entries {
                    let Some((offset, message)) = split_entry(e) else {
                        continue;
                    };
                    if offset <= after {
                        continue;
                    }
                    if let Ok((_, mut p)) = crate::broker::redis::decode(room, message) {
                        p.offset = Some(offset);
                        missed.push(Missed {
                            offset,
                            publication: p,
                        });
                    }
                }
            }
            missed.sort_by_key(|m| m.offset);
            missed.dedup_by_key(|m| m.offset);
            Ok(History { missed, head })
        })
    }

    fn sweep(&self, has_member: &dyn Fn(&str) -> bool) {
        let refresh: Vec<String> = {
            let mut marks = self.marks.lock();
            let mut due = Vec::new();
            marks.retain(|room, at| {
                if at.elapsed() <= self.window / 3 {
                    return true;
                }
                if has_member(room) {
                    *at = Instant::now();
                    due.push(room.clone());
                    true
                } else {
                    false
                }
            });
            due
        };
        self.write_marks(&refresh);
    }

    fn sizes(&self) -> (usize, usize) {
        (0, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_messages_and_entries_split_at_their_offset() {
        let mut m = NUMBERED.to_vec();
        m.extend_from_slice(b"42:\x05\x00rest");
        assert_eq!(split_numbered(&m), Some((42, &b"\x05\x00rest"[..])));
        // The broker's own messages start with a header length.
        assert_eq!(split_numbered(b"\x05\x00\x00\x00{}"), None);
        assert_eq!(split_numbered(b"\xff\xff\xff\xffx:"), None);
        assert_eq!(split_entry(b"7:1700000000000:abc"), Some((7, &b"abc"[..])));
        assert_eq!(split_entry(b"7"), None);
    }
}
