//! The per-plugin key-value store. Keyed by plugin name, owned by the host,
//! so it survives hot reloads and instance rebuilds (guest memory does not).

use std::collections::HashMap;

use parking_lot::Mutex;

/// In-memory store: plugin -> key -> value.
#[derive(Debug, Default)]
pub struct KvStore {
    inner: Mutex<HashMap<String, HashMap<String, String>>>,
}

impl KvStore {
    pub fn get(&self, plugin: &str, key: &str) -> Option<String> {
        self.inner.lock().get(plugin)?.get(key).cloned()
    }

    pub fn set(&self, plugin: &str, key: &str, value: String) {
        self.inner
            .lock()
            .entry(plugin.to_owned())
            .or_default()
            .insert(key.to_owned(), value);
    }

    pub fn delete(&self, plugin: &str, key: &str) {
        if let Some(m) = self.inner.lock().get_mut(plugin) {
            m.remove(key);
        }
    }

    /// Adds `delta` to an integer value (missing or non-integer counts as 0).
    pub fn incr(&self, plugin: &str, key: &str, delta: i64) -> i64 {
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
        let kv = KvStore::default();
        kv.set("a", "k", "1".into());
        assert_eq!(kv.get("a", "k").as_deref(), Some("1"));
        assert_eq!(kv.get("b", "k"), None);
        assert_eq!(kv.incr("a", "k", 2), 3);
        assert_eq!(kv.incr("a", "n", -1), -1);
        kv.delete("a", "k");
        assert_eq!(kv.get("a", "k"), None);
    }
}
