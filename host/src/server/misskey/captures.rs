//! A Misskey stream's note captures (`subNote` / `unsubNote`): ref-counted
//! per note, at most `max_captures` notes, the least recently subscribed
//! evicted first (a note subscribed again becomes the newest, as Misskey's
//! `Connection` keeps its map in access order). A
//! captured note is a member of the note's room ([`note_room`]) through a
//! capture slot, so its updates reach the stream as `noteUpdated`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::hub::{ConnHandle, Hub, Slot};
use crate::metrics::Metrics;
use crate::protocol::misskey::note_room;

/// What one capture request changed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Change {
    /// The note became captured (join its room).
    joined: bool,
    /// A note evicted to stay within the limit (leave its room).
    evicted: Option<Arc<str>>,
}

/// The captured notes of one stream.
#[derive(Debug)]
pub struct Captures {
    counts: HashMap<Arc<str>, u32>,
    order: VecDeque<Arc<str>>,
    max: usize,
}

impl Captures {
    pub fn new(max: usize) -> Self {
        Self {
            counts: HashMap::new(),
            order: VecDeque::new(),
            max,
        }
    }

    /// Notes captured.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    fn add(&mut self, note: &str) -> Change {
        if let Some(n) = self.counts.get_mut(note) {
            *n += 1;
            if let Some(pos) = self.order.iter().position(|x| &**x == note) {
                if let Some(k) = self.order.remove(pos) {
                    self.order.push_back(k);
                }
            }
            return Change::default();
        }
        let mut change = Change {
            joined: true,
            evicted: None,
        };
        if self.counts.len() >= self.max {
            if let Some(old) = self.order.pop_front() {
                self.counts.remove(&old);
                change.evicted = Some(old);
            }
        }
        let note: Arc<str> = note.into();
        self.counts.insert(note.clone(), 1);
        self.order.push_back(note);
        change
    }

    /// One capture less; true when the note is no longer captured.
    fn remove(&mut self, note: &str) -> bool {
        let Some(n) = self.counts.get_mut(note) else {
            return false;
        };
        *n -= 1;
        if *n > 0 {
            return false;
        }
        self.counts.remove(note);
        if let Some(pos) = self.order.iter().position(|x| &**x == note) {
            self.order.remove(pos);
        }
        true
    }

    /// Captures a note on a stream: the first capture joins the note's
    /// room; past the limit the oldest note is released.
    pub fn capture(&mut self, hub: &Hub, metrics: &Metrics, conn: &Arc<ConnHandle>, note: &str) {
        let change = self.add(note);
        if let Some(old) = change.evicted {
            hub.leave(conn, &Slot::capture(&old), &note_room(&old));
            metrics.captures.dec();
        }
        if change.joined && hub.join(conn, Slot::capture(note), &note_room(note)) {
            metrics.captures.inc();
        }
    }

    /// Releases one capture of a note.
    pub fn release(&mut self, hub: &Hub, metrics: &Metrics, conn: &ConnHandle, note: &str) {
        if self.remove(note) && hub.leave(conn, &Slot::capture(note), &note_room(note)) {
            metrics.captures.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_are_ref_counted_and_evict_the_oldest() {
        let mut c = Captures::new(2);
        assert!(c.add("a").joined);
        assert!(!c.add("a").joined);
        assert!(c.add("b").joined);
        let ch = c.add("c");
        assert!(ch.joined);
        assert_eq!(ch.evicted.as_deref(), Some("a"));
        assert!(!c.remove("a"), "evicted already");
        assert!(c.remove("b"));
        assert!(c.remove("c"));
        assert!(!c.remove("c"));
        assert!(c.is_empty());
    }

    #[test]
    fn a_note_subscribed_again_becomes_the_newest() {
        let mut c = Captures::new(2);
        c.add("a");
        c.add("b");
        c.add("a");
        assert_eq!(c.add("c").evicted.as_deref(), Some("b"), "a was used last");
    }

    #[test]
    fn a_stream_is_a_member_of_its_captured_notes_rooms_while_they_are_captured() {
        let metrics = Arc::new(Metrics::default());
        let hub = Hub::new(metrics.clone());
        let (conn, _rx) = ConnHandle::new(
            1,
            crate::hub::Protocol::Misskey,
            None,
            crate::hub::QueueLimits::default(),
        );
        hub.register(conn.clone());
        let mut c = Captures::new(1);
        c.capture(&hub, &metrics, &conn, "n1");
        c.capture(&hub, &metrics, &conn, "n1");
        assert_eq!(hub.room_size(&note_room("n1")), 1);
        c.capture(&hub, &metrics, &conn, "n2");
        assert_eq!(hub.room_size(&note_room("n1")), 0, "evicted");
        assert_eq!(metrics.captures.get(), 1);
        c.release(&hub, &metrics, &conn, "n2");
        assert_eq!(hub.room_size(&note_room("n2")), 0);
        assert_eq!(metrics.captures.get(), 0);
    }
}
