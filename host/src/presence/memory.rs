//! Presence of a single node: online while the user has a connection here.

use super::{Announce, Presence, OFFLINE, ONLINE};

/// Presence without `[cluster]`.
pub struct MemoryPresence {
    announce: Announce,
}

impl MemoryPresence {
    pub fn new(announce: Announce) -> Self {
        Self { announce }
    }
}

impl Presence for MemoryPresence {
    fn arrived(&self, user: &str) {
        (self.announce)(user, ONLINE);
    }

    fn left(&self, user: &str) {
        (self.announce)(user, OFFLINE);
    }

    fn online_users(&self, here: Vec<String>) -> Vec<String> {
        here
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parking_lot::Mutex;

    use super::*;

    #[test]
    fn one_node_announces_each_arrival_and_departure_and_lists_who_is_here() {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h = heard.clone();
        let p = MemoryPresence::new(Box::new(move |u, e| h.lock().push(format!("{e} {u}"))));
        p.arrived("a");
        p.left("a");
        assert_eq!(*heard.lock(), ["online a", "offline a"]);
        assert_eq!(p.online_users(vec!["b".into()]), ["b"]);
    }
}
