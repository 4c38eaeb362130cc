//! The key-value store of a cluster (`[cluster]`), in Redis: one hash per
//! plugin, `<prefix>:kv:<plugin>` (field: key, value: the string), so every
//! node reads and writes the same values, `kv-incr` is atomic across nodes
//! (a script), and values survive restarts of every node.
//!
//! Private keys (starting with `_`: a plugin's configuration, the tokens it
//! keeps for calls on a user's behalf, its own bookkeeping) stay on the
//! node, in memory: they describe this node's connections, and credentials
//! are never written to Redis.
//!
//! Plugins call the store synchronously from their own thread: each
//! request is bounded ([`TIMEOUT`]) and, once Redis has failed, the store
//! does not try again for [`PAUSE`]. Meanwhile reads answer "absent",
//! writes are lost and `kv-incr` answers `delta` (each outage is logged
//! once), so a plugin never waits on a dead Redis.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{KvStore, MemoryKv};

/// Bound of one request (connect, write, read).
pub const TIMEOUT: Duration = Duration::from_millis(500);
/// After a failure, how long Redis is not asked again.
pub const PAUSE: Duration = Duration::from_secs(1);

const INCR: &str = r"
local n = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
if n == nil or n ~= math.floor(n) then n = 0 end
n = n + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d', n))
return n";

/// The hash of a plugin's store.
pub fn kv_key(prefix: &str, plugin: &str) -> String {
    format!("{prefix}:kv:{plugin}")
}

/// A cluster's store.
pub struct RedisKv {
    client: redis::Client,
    prefix: String,
    state: Mutex<State>,
    /// Private keys, on this node.
    private: MemoryKv,
}

/// Whether a key stays on the node.
fn private(key: &str) -> bool {
    key.starts_with('_')
}

#[derive(Default)]
struct State {
    conn: Option<redis::Connection>,
    /// Redis is not asked before this instant (after a failure).
    paused_until: Option<Instant>,
    /// An outage is going on (logged once).
    down: bool,
}

impl RedisKv {
    pub fn new(url: &str, prefix: &str) -> Result<Self, crate::pubsub::UrlError> {
        Ok(Self {
            client: redis::Client::open(url).map_err(crate::pubsub::UrlError)?,
            prefix: prefix.to_owned(),
            state: Mutex::new(State::default()),
            private: MemoryKv::default(),
        })
    }

    /// Runs one request, or answers `None` when Redis cannot be asked.
    fn ask<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
        let mut st = self.state.lock();
        if st.paused_until.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        let result = (|| {
            if st.conn.is_none() {
                let c = self.client.get_connection_with_timeout(TIMEOUT)?;
                c.set_read_timeout(Some(TIMEOUT))?;
                c.set_write_timeout(Some(TIMEOUT))?;
                st.conn = Some(c);
            }
            cmd.query::<T>(st.conn.as_mut().expect("connected above"))
        })();
        match result {
            Ok(v) => {
                if st.down {
                    tracing::info!("plugin key-value store: Redis reached again");
                }
                st.down = false;
                st.paused_until = None;
                Some(v)
            }
            Err(e) => {
                if !st.down {
                    tracing::warn!("plugin key-value store: Redis failed ({e}); reads answer absent and writes are lost until it is back");
                }
                st.down = true;
                st.conn = None;
                st.paused_until = Some(Instant::now() + PAUSE);
                None
            }
        }
    }
}

impl KvStore for RedisKv {
    fn get(&self, plugin: &str, key: &str) -> Option<String> {
        if private(key) {
            return self.private.get(plugin, key);
        }
        let mut c = redis::cmd("HGET");
        c.arg(kv_key(&self.prefix, plugin)).arg(key);
        self.ask::<Option<String>>(&c).flatten()
    }

    fn set(&self, plugin: &str, key: &str, value: String) {
        if private(key) {
            return self.private.set(plugin, key, value);
        }
        let mut c = redis::cmd("HSET");
        c.arg(kv_key(&self.prefix, plugin)).arg(key).arg(value);
        let _ = self.ask::<redis::Value>(&c);
    }

    fn delete(&self, plugin: &str, key: &str) {
        if private(key) {
            return self.private.delete(plugin, key);
        }
        let mut c = redis::cmd("HDEL");
        c.arg(kv_key(&self.prefix, plugin)).arg(key);
        let _ = self.ask::<redis::Value>(&c);
    }

    fn incr(&self, plugin: &str, key: &str, delta: i64) -> i64 {
        if private(key) {
            return self.private.incr(plugin, key, delta);
        }
        let mut c = redis::cmd("EVAL");
        c.arg(INCR)
            .arg(1)
            .arg(kv_key(&self.prefix, plugin))
            .arg(key)
            .arg(delta);
        self.ask::<i64>(&c).unwrap_or(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_redis_answers_at_once_as_empty_and_pauses() {
        // Nothing listens on port 1.
        let kv = RedisKv::new("redis://127.0.0.1:1", "t").unwrap();
        assert_eq!(kv.get("p", "k"), None);
        assert!(
            kv.state.lock().paused_until.is_some(),
            "not asked again for a while"
        );
        kv.set("p", "k", "v".into());
        assert_eq!(kv.incr("p", "n", 5), 5);
        // Private keys never go to Redis: they work without it.
        kv.set("p", "_token", "secret".into());
        assert_eq!(kv.get("p", "_token").as_deref(), Some("secret"));
        assert_eq!(kv_key("chanhost", "mew-infra"), "chanhost:kv:mew-infra");
    }
}
