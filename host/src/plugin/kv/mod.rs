//! The per-plugin key-value store. Keyed by plugin name, owned by the host,
//! so it survives hot reloads and instance rebuilds (guest memory does not).
//! Two sides of one trait: [`MemoryKv`] (one node: lost on restart) and
//! [`RedisKv`] (`[cluster]`: one store for every node, kept in Redis).

mod memory;
pub mod redis;

pub use self::memory::MemoryKv;
pub use self::redis::RedisKv;

/// A store of string values per plugin.
pub trait KvStore: Send + Sync {
    fn get(&self, plugin: &str, key: &str) -> Option<String>;
    fn set(&self, plugin: &str, key: &str, value: String);
    fn delete(&self, plugin: &str, key: &str);
    /// Adds `delta` to an integer value (missing or non-integer counts as
    /// 0), atomically; the new value.
    fn incr(&self, plugin: &str, key: &str, delta: i64) -> i64;
}
