//! Recovery on one node: the sequencer is a lock of this node, histories
//! and sessions are kept in its memory (and lost with it).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use parking_lot::{Mutex, ReentrantMutex};

use super::{Counters, History, Keep, Missed, Recovery, Refusal, Session};
use crate::broker::Publication;

/// Sessions and histories of a node without `[cluster]`.
pub struct MemoryRecovery {
    window: Duration,
    cap: usize,
    /// Numbering, recording and delivering a recorded publication happen
    /// under this lock (re-entrant: a delivery that publishes again on the
    /// same thread is numbered after it rather than deadlocking).
    sequencer: ReentrantMutex<RefCell<Histories>>,
    sessions: Mutex<HashMap<String, (Session, Instant)>>,
    /// Recorded rooms, until when.
    marks: Mutex<HashMap<Arc<str>, Instant>>,
    counters: Counters,
}

#[derive(Default)]
struct Histories {
    head: u64,
    rooms: HashMap<Arc<str>, RoomHistory>,
}

#[derive(Default)]
struct RoomHistory {
    entries: VecDeque<Entry>,
    /// The newest offset dropped from this history (0: none).
    cut: u64,
}

struct Entry {
    offset: u64,
    at: Instant,
    publication: Publication,
}

impl MemoryRecovery {
    pub fn new(window: Duration, cap: usize, counters: Counters) -> Self {
        Self {
            window,
            cap: cap.max(1),
            sequencer: ReentrantMutex::new(RefCell::new(Histories::default())),
            sessions: Mutex::new(HashMap::new()),
            marks: Mutex::new(HashMap::new()),
            counters,
        }
    }
}

impl Recovery for MemoryRecovery {
    fn sequence(&self, p: &Publication, deliver: &mut dyn FnMut(&Publication)) -> bool {
        let guard = self.sequencer.lock();
        let numbered = {
            let mut h = guard.borrow_mut();
            h.head += 1;
            let offset = h.head;
            let numbered = Publication {
                offset: Some(offset),
                ..p.clone()
            };
            let room = h.rooms.entry(p.room.clone()).or_default();
            room.entries.push_back(Entry {
                offset,
                at: Instant::now(),
                publication: numbered.clone(),
            });
            if room.entries.len() > self.cap {
                if let Some(old) = room.entries.pop_front() {
                    room.cut = old.offset;
                    self.counters.cut.fetch_add(1, Ordering::Relaxed);
                }
            }
            numbered
        };
        deliver(&numbered);
        drop(guard);
        true
    }

    fn records(&self, room: &str) -> bool {
        self.marks.lock().contains_key(room)
    }

    fn mark(&self, room: &str) {
        self.marks
            .lock()
            .insert(room.into(), Instant::now() + self.window);
    }

    fn head(&self) -> BoxFuture<'static, Option<u64>> {
        let head = self.sequencer.lock().borrow().head;
        Box::pin(async move { Some(head) })
    }

    fn forget(&self, pid: &str, connection: u64) -> BoxFuture<'static, ()> {
        let mut sessions = self.sessions.lock();
        if sessions
            .get(pid)
            .is_some_and(|(s, _)| s.connection == connection)
        {
            sessions.remove(pid);
        }
        Box::pin(async {})
    }

    fn keep(&self, s: Session, how: Keep) -> BoxFuture<'static, ()> {
        let owned = |kept: Option<&(Session, Instant)>| {
            kept.is_some_and(|(k, _)| k.connection == s.connection)
        };
        if !how.create && !owned(self.sessions.lock().get(&s.pid)) {
            return Box::pin(async {});
        }
        let until = Instant::now() + self.window + how.rewritten_every.unwrap_or_default();
        for room in &s.rooms {
            let mut marks = self.marks.lock();
            let m = marks.entry(room.as_str().into()).or_insert(until);
            *m = (*m).max(until);
        }
        self.sessions.lock().insert(s.pid.clone(), (s, until));
        Box::pin(async {})
    }

    fn take(&self, pid: &str) -> BoxFuture<'static, Result<Session, Refusal>> {
        let r = match self.sessions.lock().remove(pid) {
            Some((s, until)) if until > Instant::now() => Ok(s),
            _ => Err(Refusal::Unknown),
        };
        Box::pin(async move { r })
    }

    fn missed(&self, rooms: &[String], after: u64) -> BoxFuture<'static, Result<History, Refusal>> {
        let guard = self.sequencer.lock();
        let h = guard.borrow();
        let r = (|| {
            if after > h.head {
                return Err(Refusal::Offset);
            }
            let mut missed: Vec<Missed> = Vec::new();
            for room in rooms {
                let Some(r) = h.rooms.get(room.as_str()) else {
                    continue;
                };
                if r.cut > after {
                    return Err(Refusal::Cut);
                }
                // Entries are in offset order: start after `after`.
                let from = r.entries.partition_point(|e| e.offset <= after);
                missed.extend(r.entries.range(from..).map(|e| Missed {
                    offset: e.offset,
                    publication: e.publication.clone(),
                }));
            }
            missed.sort_by_key(|m| m.offset);
            missed.dedup_by_key(|m| m.offset);
            Ok(History {
                missed,
                head: h.head,
            })
        })();
        drop(h);
        drop(guard);
        Box::pin(async move { r })
    }

    fn sweep(&self, has_member: &dyn Fn(&str) -> bool) {
        let now = Instant::now();
        self.sessions.lock().retain(|_, (_, until)| *until > now);
        let gone: Vec<Arc<str>> = {
            let mut marks = self.marks.lock();
            let mut gone = Vec::new();
            marks.retain(|room, until| {
                if has_member(room) {
                    *until = now + self.window;
                    true
                } else if *until > now {
                    true
                } else {
                    gone.push(room.clone());
                    false
                }
            });
            gone
        };
        let guard = self.sequencer.lock();
        let mut h = guard.borrow_mut();
        for r in h.rooms.values_mut() {
            while r
                .entries
                .front()
                .is_some_and(|e| now.duration_since(e.at) > self.window)
            {
                if let Some(old) = r.entries.pop_front() {
                    r.cut = old.offset;
                }
            }
        }
        for room in gone {
            if h.rooms.get(&room).is_some_and(|r| r.entries.is_empty()) {
                h.rooms.remove(&room);
            }
        }
    }

    fn sizes(&self) -> (usize, usize) {
        let sessions = self.sessions.lock().len();
        let guard = self.sequencer.lock();
        let entries = guard.borrow().rooms.values().map(|r| r.entries.len()).sum();
        (sessions, entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Filter;

    fn p(room: &str, event: &str) -> Publication {
        Publication {
            room: room.into(),
            event: event.into(),
            data: "1".into(),
            args: None,
            attachments: Arc::from(Vec::new()),
            filter: Filter::default(),
            offset: None,
        }
    }

    fn store(cap: usize) -> MemoryRecovery {
        MemoryRecovery::new(Duration::from_secs(60), cap, Default::default())
    }

    fn events(h: &History) -> Vec<(u64, String)> {
        h.missed
            .iter()
            .map(|m| (m.offset, m.publication.event.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn offsets_grow_and_what_came_after_is_read_in_order_once() {
        let r = store(10);
        let mut seen = Vec::new();
        for (room, ev) in [("a", "1"), ("b", "2"), ("a", "3"), ("c", "4"), ("b", "5")] {
            r.sequence(&p(room, ev), &mut |p| seen.push(p.offset.unwrap()));
        }
        assert_eq!(seen, [1, 2, 3, 4, 5]);
        let rooms = ["a".to_owned(), "b".to_owned()];
        let h = r.missed(&rooms, 1).await.unwrap();
        assert_eq!(
            events(&h),
            [(2, "2".into()), (3, "3".into()), (5, "5".into())]
        );
        assert_eq!(h.head, 5);
        assert!(r.missed(&rooms, 5).await.unwrap().missed.is_empty());
        // An offset never given is refused.
        assert_eq!(r.missed(&rooms, 6).await.unwrap_err(), Refusal::Offset);
    }

    #[tokio::test]
    async fn a_history_cut_by_its_cap_refuses_what_it_lost() {
        let r = store(2);
        for ev in ["1", "2", "3"] {
            r.sequence(&p("a", ev), &mut |_| {});
        }
        let rooms = ["a".to_owned()];
        assert_eq!(r.missed(&rooms, 0).await.unwrap_err(), Refusal::Cut);
        assert_eq!(events(&r.missed(&rooms, 1).await.unwrap()).len(), 2);
        assert_eq!(r.counters.cut.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_session_is_taken_once_and_marks_its_rooms() {
        let r = store(2);
        let s = Session {
            pid: "p".into(),
            sid: "s".into(),
            nsp: "/".into(),
            plugin: "x".into(),
            connection: 1,
            rooms: vec!["s".into(), "r".into()],
            identity: None,
            attributes: vec![],
            since: 0,
            disconnected_at: 0,
        };
        r.keep(s.clone(), Keep::LOST).await;
        assert!(r.records("r") && r.records("s") && !r.records("q"));
        assert_eq!(r.take("p").await.unwrap(), s);
        assert_eq!(r.take("p").await.unwrap_err(), Refusal::Unknown);
        // Marks outlive the session for the window, then go with the
        // last member.
        r.sweep(&|_| false);
        assert!(r.records("r"));
    }
}
