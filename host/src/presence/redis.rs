//! Presence across a cluster (`[cluster]`), kept in Redis under `prefix`:
//!
//! - `<prefix>:presence` — a hash: user id → on how many nodes the user
//!   has a connection.
//! - `<prefix>:node:<id>:presence` — a hash per node: the users with a
//!   connection on node `<id>`.
//!
//! A user's first connection on a node adds them to the node's hash and,
//! if that is new, counts one more node; their last connection there does
//! the opposite (each step one script, so counts and sets move together).
//! The node that takes a count from 0 to 1 announces `online`, the one that
//! takes it to 0 announces `offline`: once per change for the cluster. A
//! node that dies (no heartbeat for `node_ttl_ms`) is cleaned up by the
//! node whose broker claims it: its hash is read and deleted in one script
//! and its users' counts go down, `offline` announced where they reach 0.
//!
//! Changes are applied in the order they happen, by one task. While Redis
//! cannot be reached a change is announced as one node would announce it,
//! and when Redis is back this node's users are added again (users who
//! left meanwhile stay counted until this node restarts or dies).

use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::{Announce, Presence, OFFLINE, ONLINE};

/// A Redis request taking longer than this counts as failed.
const TIMEOUT: Duration = Duration::from_secs(2);

const ARRIVE: &str = r"
if redis.call('HSETNX', KEYS[2], ARGV[1], 1) == 1 then
  return redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
end
return 0";

const LEAVE: &str = r"
if redis.call('HDEL', KEYS[2], ARGV[1]) == 1 then
  local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
  if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) return 1 end
end
return 0";

const REAP: &str = r"
local users = redis.call('HKEYS', KEYS[2])
redis.call('DEL', KEYS[2])
local off = {}
for _, u in ipairs(users) do
  local n = redis.call('HINCRBY', KEYS[1], u, -1)
  if n <= 0 then redis.call('HDEL', KEYS[1], u) table.insert(off, u) end
end
return off";

enum Change {
    Arrived(String),
    Left(String),
    NodeGone(String),
}

/// What a cluster presence needs.
pub struct RedisPresenceOptions {
    pub url: String,
    pub prefix: String,
    /// This node's id (its broker's).
    pub node: String,
    pub announce: Announce,
    /// Users with a connection on this node (to add again after an outage).
    pub here: Box<dyn Fn() -> Vec<String> + Send + Sync>,
}

/// Presence of a cluster node.
pub struct RedisPresence {
    changes: mpsc::UnboundedSender<Change>,
    client: redis::Client,
    key: String,
    /// A connection for the synchronous reads plugins make.
    reader: Mutex<Option<redis::Connection>>,
}

/// The hash of users online on the cluster.
pub fn presence_key(prefix: &str) -> String {
    format!("{prefix}:presence")
}

/// The hash of users with a connection on one node.
pub fn node_presence_key(prefix: &str, node: &str) -> String {
    format!("{prefix}:node:{node}:presence")
}

impl RedisPresence {
    /// Starts the task that applies changes (in a runtime).
    pub fn start(o: RedisPresenceOptions) -> Result<Self, crate::pubsub::UrlError> {
        let client = redis::Client::open(o.url.as_str()).map_err(crate::pubsub::UrlError)?;
        let (changes, rx) = mpsc::unbounded_channel();
        let key = presence_key(&o.prefix);
        tokio::spawn(apply(client.clone(), o, rx));
        Ok(Self {
            changes,
            client,
            key,
            reader: Mutex::new(None),
        })
    }

    fn read_online(&self) -> redis::RedisResult<Vec<String>> {
        self.read(redis::cmd("HKEYS").arg(&self.key))
    }

    /// One request on the reading connection (made again after a failure).
    fn read<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let mut reader = self.reader.lock();
        if reader.is_none() {
            let c = self.client.get_connection_with_timeout(TIMEOUT)?;
            c.set_read_timeout(Some(TIMEOUT))?;
            c.set_write_timeout(Some(TIMEOUT))?;
            *reader = Some(c);
        }
        let conn = reader.as_mut().expect("set above");
        let r = cmd.query::<T>(conn);
        if r.is_err() {
            *reader = None;
        }
        r
    }
}

impl Presence for RedisPresence {
    fn arrived(&self, user: &str) {
        let _ = self.changes.send(Change::Arrived(user.to_owned()));
    }

    fn left(&self, user: &str) {
        let _ = self.changes.send(Change::Left(user.to_owned()));
    }

    fn node_gone(&self, node: &str) {
        let _ = self.changes.send(Change::NodeGone(node.to_owned()));
    }

    fn online_count(&self, here: usize) -> usize {
        match self.read(redis::cmd("HLEN").arg(&self.key)) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("cluster presence unreadable ({e}); counting this node's users");
                here
            }
        }
    }

    fn online_users(&self, here: Vec<String>) -> Vec<String> {
        match self.read_online() {
            Ok(mut all) => {
                all.sort();
                all
            }
            Err(e) => {
                tracing::debug!("cluster presence unreadable ({e}); listing this node's users");
                here
            }
        }
    }
}

/// Applies the changes in order.
async fn apply(
    client: redis::Client,
    o: RedisPresenceOptions,
    mut rx: mpsc::UnboundedReceiver<Change>,
) {
    let all = presence_key(&o.prefix);
    let mine = node_presence_key(&o.prefix, &o.node);
    // EVAL with two keys (the cluster's hash, a node's) and the user.
    let eval = |script: &str, node_key: &str, user: Option<&str>| {
        let mut c = redis::cmd("EVAL");
        c.arg(script).arg(2).arg(&all).arg(node_key);
        if let Some(u) = user {
            c.arg(u);
        }
        c
    };
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let mut failed = false;
    while let Some(change) = rx.recv().await {
        if conn.is_none() {
            conn = tokio::time::timeout(TIMEOUT, client.get_multiplexed_async_connection())
                .await
                .ok()
                .and_then(Result::ok);
            if let (Some(c), true) = (conn.as_mut(), failed) {
                // Back after an outage: this node's users, again.
                for u in (o.here)() {
                    let _ = eval(ARRIVE, &mine, Some(&u)).query_async::<i64>(c).await;
                }
                failed = false;
                tracing::info!(
                    "cluster presence: Redis reached again; this node's users added back"
                );
            }
        }
        let Some(c) = conn.as_mut() else {
            local(&o, &change, &mut failed);
            continue;
        };
        let r: Result<Vec<String>, String> = async {
            match &change {
                Change::Arrived(u) => {
                    let n: i64 = within(eval(ARRIVE, &mine, Some(u)).query_async(c)).await?;
                    Ok(if n == 1 { vec![u.clone()] } else { vec![] })
                }
                Change::Left(u) => {
                    let off: i64 = within(eval(LEAVE, &mine, Some(u)).query_async(c)).await?;
                    Ok(if off == 1 { vec![u.clone()] } else { vec![] })
                }
                Change::NodeGone(node) => {
                    let key = node_presence_key(&o.prefix, node);
                    within(eval(REAP, &key, None).query_async(c)).await
                }
            }
        }
        .await;
        match (r, &change) {
            (Ok(users), Change::Arrived(_)) => users.iter().for_each(|u| (o.announce)(u, ONLINE)),
            (Ok(users), _) => users.iter().for_each(|u| (o.announce)(u, OFFLINE)),
            (Err(e), _) => {
                tracing::warn!(
                    "cluster presence: Redis failed ({e}); announcing as one node would"
                );
                conn = None;
                local(&o, &change, &mut failed);
            }
        }
    }
}

/// A request within [`TIMEOUT`], its error as text.
async fn within<T>(
    f: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// A change announced without Redis, as one node would.
fn local(o: &RedisPresenceOptions, change: &Change, failed: &mut bool) {
    *failed = true;
    match change {
        Change::Arrived(u) => (o.announce)(u, ONLINE),
        Change::Left(u) => (o.announce)(u, OFFLINE),
        Change::NodeGone(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_live_under_the_prefix() {
        assert_eq!(presence_key("p"), "p:presence");
        assert_eq!(node_presence_key("p", "n1"), "p:node:n1:presence");
    }
}
