//! Events that wait for a note packed through the API before they are
//! delivered, without holding up the plugin: an antenna's bare note
//! record (packed for the antenna's owner) and a hidden note in a user's
//! main stream (packed for that user), as Misskey's channels pack them.
//! The request is started with `fetch`; the event waits in its stream's
//! queue, and every later event of that stream waits behind it, so each
//! stream keeps Misskey's order. An event that needs nothing and finds its
//! stream's queue empty is delivered at once.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};

use chanhost_plugin::types::HttpResponse;
use serde_json::Value;

use misskey_api::Backend;

/// What to do with an event once its note is packed (or was not needed).
pub enum Event {
    /// An antenna's note: `note` is the packed note.
    Antenna { antenna: String, note: Value },
    /// A main-stream event of `user`: `body` with the packed note put at
    /// `at` (`Some("note")` for a notification, `None` for a mention: the
    /// body is the note).
    Main {
        user: String,
        kind: String,
        body: Value,
        at: Option<&'static str>,
    },
}

/// Events ready to deliver, in order, each with its packed note (`None`
/// when it needed none, or why packing failed).
pub type Ready = Vec<(Event, Option<Result<Value, String>>)>;

struct Waiting {
    /// The fetch it waits for; none once answered (or when none was needed).
    fetch: Option<u64>,
    /// The answer, when it came.
    packed: Option<Result<Value, String>>,
    event: Event,
}

#[derive(Default)]
struct Queues {
    by_stream: HashMap<String, VecDeque<Waiting>>,
    /// Which stream each fetch belongs to.
    streams: HashMap<u64, String>,
}

thread_local! {
    static QUEUES: RefCell<Queues> = RefCell::new(Queues::default());
}

/// An event of `stream`: `pack` is the fetch of its packed note, if it
/// needs one. Returns the events ready to deliver now, in order (the event
/// itself when nothing waits).
pub fn push(stream: &str, pack: Option<u64>, event: Event) -> Ready {
    QUEUES.with(|q| {
        let mut q = q.borrow_mut();
        let queue = q.by_stream.entry(stream.to_owned()).or_default();
        if pack.is_none() && queue.is_empty() {
            q.by_stream.remove(stream);
            return vec![(event, None)];
        }
        queue.push_back(Waiting {
            fetch: pack,
            packed: None,
            event,
        });
        if let Some(id) = pack {
            q.streams.insert(id, stream.to_owned());
        }
        Vec::new()
    })
}

/// A fetch came back: `None` when it was not one of these; else the
/// events now ready, in order, each with its packed note (or why not).
pub fn answered(id: u64, response: &Result<HttpResponse, String>) -> Option<Ready> {
    QUEUES.with(|q| {
        let mut q = q.borrow_mut();
        let stream = q.streams.remove(&id)?;
        let queue = q.by_stream.get_mut(&stream)?;
        if let Some(w) = queue.iter_mut().find(|w| w.fetch == Some(id)) {
            w.fetch = None;
            w.packed = Some(Backend::answer("notes/show", response).map_err(|e| e.to_string()));
        }
        let mut ready = Vec::new();
        while queue.front().is_some_and(|w| w.fetch.is_none()) {
            let w = queue.pop_front().expect("front checked");
            ready.push((w.event, w.packed));
        }
        if queue.is_empty() {
            q.by_stream.remove(&stream);
        }
        Some(ready)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn main(n: u64) -> Event {
        Event::Main {
            user: "u".into(),
            kind: format!("e{n}"),
            body: json!(n),
            at: None,
        }
    }

    fn kinds(ready: &Ready) -> Vec<String> {
        ready
            .iter()
            .map(|(e, _)| match e {
                Event::Main { kind, .. } => kind.clone(),
                Event::Antenna { antenna, .. } => antenna.clone(),
            })
            .collect()
    }

    fn ok(body: &str) -> Result<HttpResponse, String> {
        Ok(HttpResponse {
            status: 200,
            headers: vec![],
            body: body.as_bytes().to_vec(),
        })
    }

    #[test]
    fn events_wait_behind_a_pack_in_their_stream_only() {
        assert_eq!(kinds(&push("a", None, main(1))), ["e1"]);
        assert!(push("a", Some(7), main(2)).is_empty());
        assert!(push("a", None, main(3)).is_empty(), "behind the pack");
        assert_eq!(kinds(&push("b", None, main(4))), ["e4"], "another stream");
        assert!(push("a", Some(8), main(5)).is_empty());
        // The second pack answers first: nothing is ready yet.
        assert_eq!(
            kinds(&answered(8, &ok("{}")).unwrap()),
            Vec::<String>::new()
        );
        let ready = answered(7, &ok(r#"{"id":"n"}"#)).unwrap();
        assert_eq!(kinds(&ready), ["e2", "e3", "e5"]);
        assert_eq!(ready[0].1.as_ref().unwrap().as_ref().unwrap()["id"], "n");
        assert!(ready[1].1.is_none());
        assert!(answered(7, &ok("{}")).is_none(), "answered once");
        assert_eq!(
            kinds(&push("a", None, main(6))),
            ["e6"],
            "the queue is empty again"
        );
    }
}
