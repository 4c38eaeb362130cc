//! The key-value store of a single node, in memory.

use std::collections::HashMap;

use parking_lot::Mutex;

use super::KvStore;

/// In-memory store: plugin -> key -> value.
#[derive(Debug, Default)]
pub struct MemoryKv {
    inner: Mutex<HashMap<String, HashMap<String, String>>>,
}

impl KvStore for MemoryKv {
    fn get(&self, plugin: &str, key: &str) -> Option<String> {
        self.inner.lock().get(plugin)?.get(key).cloned()
    }

    fn set(&self, plugin: &str, key: &str, value: String) {
        self.inner
            .lock()
            .entry(plugin.to_owned())
            .or_default()
            .insert(key.to_owned(), value);
    }

    fn delete(&self, plugin: &str, key: &str) {
        if let Some(m) = self.inner.lock().get_mut(plugin) {
            m.remove(key);
        }
    }

    fn incr(&self, plugin: &str, key: &str, delta: i64) -> i64 {
        let mut g = self.inner.lock();
        let m = g.entry(plugin.to_owned()).or_default();
        let cur = m.get(key).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        let next = cur.saturating_add(delta);
        m.insert(key.to_owned(), next.to_string());
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_per_plugin() {
        let kv = MemoryKv::default();
        kv.set("a", "k", "1".into());
        assert_eq!(kv.get("a", "k").as_deref(), Some("1"));
        assert_eq!(kv.get("b", "k"), None);
        assert_eq!(kv.incr("a", "k", 2), 3);
        assert_eq!(kv.incr("a", "n", -1), -1);
        kv.delete("a", "k");
        assert_eq!(kv.get("a", "k"), None);
    }
}
