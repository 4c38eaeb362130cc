//! Events held back for instances being opened: while a plugin decides a
//! client's opening of an instance, what reaches that instance waits; the
//! reply to the client is written first, then what waited (the plugin
//! accepted) or nothing (it refused). A later opening of the same id holds
//! on its own (its generation), so an earlier reply releases only its own.
//!
//! Connections are written from whichever thread produces an item, so the
//! end of a hold is one step with its writing: a writer that finds the
//! hold ending waits until what it released is written (it would overtake
//! the reply or the held events otherwise).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::Outbound;

/// An opening's generation, and what waits for its reply.
type Held = (u64, Vec<Outbound>);

/// The holds of one connection.
#[derive(Debug, Default)]
pub struct Holds {
    /// By instance id: the generation of the opening that holds, and what
    /// waits.
    held: Mutex<HashMap<Arc<str>, Held>>,
    /// Entries in `held`: writers skip the lock while it is 0.
    count: AtomicUsize,
    generation: AtomicU64,
}

impl Holds {
    /// Starts holding what reaches instance `id`; the generation of this
    /// opening.
    pub fn hold(&self, id: &Arc<str>) -> u64 {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        if self
            .held
            .lock()
            .insert(id.clone(), (generation, Vec::new()))
            .is_none()
        {
            self.count.fetch_add(1, Ordering::SeqCst);
        }
        generation
    }

    /// Whether anything is held.
    pub fn any(&self) -> bool {
        self.count.load(Ordering::SeqCst) > 0
    }

    /// Keeps a room event if the instance it is for is held; gives it
    /// back otherwise (and any other item, captures' events included).
    pub fn keep(&self, out: Outbound) -> Option<Outbound> {
        if !self.any() {
            return Some(out);
        }
        let Outbound::Event { slot, .. } = &out else {
            return Some(out);
        };
        if slot.is_capture() || slot.is_stream() {
            return Some(out);
        }
        let mut held = self.held.lock();
        match held.get_mut(slot.id()) {
            Some((_, waiting)) => {
                waiting.push(out);
                None
            }
            None => {
                drop(held);
                Some(out)
            }
        }
    }

    /// Ends the hold of this opening of `id` and gives what waited
    /// (nothing when a later opening of the same id holds now: that one
    /// keeps it) to `write`, with the reply. Until `write` returns, an item
    /// for a held instance that another thread writes waits in
    /// [`Holds::keep`], so nothing overtakes what `write` writes; `write`
    /// must not call `keep` itself.
    pub fn release_with<R>(
        &self,
        id: &str,
        generation: u64,
        write: impl FnOnce(Vec<Outbound>) -> R,
    ) -> R {
        let mut held = self.held.lock();
        let released = match held.get(id) {
            Some((g, _)) if *g == generation => held.remove(id).map(|(_, w)| w),
            _ => None,
        };
        let ended = released.is_some();
        let r = write(released.unwrap_or_default());
        if ended {
            // Writers that skip the lock see the hold end only now.
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> Outbound {
        Outbound::Event {
            slot: crate::hub::Slot::instance(id),
            event: crate::hub::SharedEvent::new("e", "1".into()),
        }
    }

    #[test]
    fn what_reaches_a_held_instance_waits_for_its_own_release() {
        let h = Holds::default();
        assert!(h.keep(event("a")).is_some(), "nothing held");
        let first = h.hold(&"a".into());
        let second = h.hold(&"a".into());
        assert!(h.keep(event("a")).is_none());
        assert!(h.keep(event("b")).is_some());
        assert!(
            h.keep(Outbound::Text("t".into())).is_some(),
            "only events wait"
        );
        assert!(
            h.release_with("a", first, |w| w.is_empty()),
            "a later opening holds now"
        );
        assert!(h.any());
        assert_eq!(h.release_with("a", second, |w| w.len()), 1);
        assert!(!h.any());
    }

    #[test]
    fn an_item_written_while_a_hold_ends_waits_for_the_release() {
        use std::sync::mpsc;
        use std::time::Duration;
        let h = Arc::new(Holds::default());
        let g = h.hold(&"a".into());
        let (tx, rx) = mpsc::channel();
        h.release_with("a", g, |_| {
            let (h, tx) = (h.clone(), tx.clone());
            std::thread::spawn(move || tx.send(h.keep(event("a")).is_some()));
            assert!(
                rx.recv_timeout(Duration::from_millis(50)).is_err(),
                "a live item must not be written before what was released"
            );
        });
        assert_eq!(rx.recv().ok(), Some(true), "then it is written");
        assert!(!h.any());
    }
}
