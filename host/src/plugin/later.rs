//! What a plugin asks to happen later (WIT 0.2.0): HTTP requests that do
//! not hold up its other calls (`fetch`, answered by `fetched`), connects
//! answered after `connect` returned (`defer-connect`, `settle-connect`),
//! and timers (`set-timer`, answered by `timer`).
//!
//! Each store owns a [`Later`] with a process-unique id. Answers travel
//! through the plugin's queue like every other call ([`Due`], tagged with
//! that id), so the plugin gets them one at a time, in the order they came
//! back, and a rebuilt or replaced instance never gets its predecessor's:
//! the runtime drops what is due to a store that no longer serves. Before
//! a store serves (during `init`), answers wait in its [`Mailbox`].
//! Dropping a store cancels its timers and refuses its deferred connects.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::http::HttpPolicy;
use super::runtime::CallError;
use super::{InstanceRef, Rejection};

/// Most `fetch` requests of one instance in flight at once.
pub const MAX_IN_FLIGHT: usize = 256;
/// Largest response body a `fetch` reads.
pub const MAX_BODY: usize = 16 << 20;

/// How a connect call is answered.
pub type ConnectReply = oneshot::Sender<Result<Result<(), Rejection>, CallError>>;

/// An HTTP request of `fetch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRequest {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The answer to a `fetch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Something due to a plugin instance.
#[derive(Debug)]
pub enum Event {
    Fetched {
        id: u64,
        response: Result<FetchResponse, String>,
    },
    Timer {
        key: String,
        seq: u64,
    },
    /// A deferred connect's time is up.
    ConnectExpired {
        target: InstanceRef,
        seq: u64,
    },
}

/// An [`Event`] and the store it is for.
#[derive(Debug)]
pub struct Due {
    pub store: u64,
    pub event: Event,
}

type Sink = Box<dyn Fn(Due) + Send>;

/// Where a store's answers go: the plugin's queue once the store serves,
/// a backlog until then.
#[derive(Clone, Default)]
pub struct Mailbox(Arc<Mutex<MailboxInner>>);

#[derive(Default)]
struct MailboxInner {
    sink: Option<Sink>,
    backlog: Vec<Due>,
}

impl Mailbox {
    fn post(&self, due: Due) {
        let mut m = self.0.lock();
        match &m.sink {
            Some(sink) => sink(due),
            None => m.backlog.push(due),
        }
    }

    /// From now on answers go to `sink`, the backlog first.
    pub fn attach(&self, sink: impl Fn(Due) + Send + 'static) {
        let mut m = self.0.lock();
        for due in m.backlog.drain(..) {
            sink(due);
        }
        m.sink = Some(Box::new(sink));
    }
}

/// A spawned task that is aborted when this is dropped.
struct Task(tokio::task::AbortHandle);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One store's deferred work.
pub struct Later {
    id: u64,
    mailbox: Mailbox,
    runtime: Option<tokio::runtime::Handle>,
    pending_connect: Duration,
    next_fetch: u64,
    in_flight: Arc<AtomicUsize>,
    seq: u64,
    /// The connect the current `connect` call answers, and whether the
    /// plugin deferred it.
    connecting: Option<(InstanceRef, bool)>,
    deferred: HashMap<InstanceRef, (ConnectReply, u64, Task)>,
    timers: HashMap<String, (u64, Task)>,
}

static STORES: AtomicU64 = AtomicU64::new(1);

impl Later {
    pub fn new(runtime: Option<tokio::runtime::Handle>, pending_connect: Duration) -> Self {
        Self {
            id: STORES.fetch_add(1, Ordering::Relaxed),
            mailbox: Mailbox::default(),
            runtime,
            pending_connect,
            next_fetch: 0,
            in_flight: Arc::default(),
            seq: 0,
            connecting: None,
            deferred: HashMap::new(),
            timers: HashMap::new(),
        }
    }

    /// The store's process-unique id, which its [`Due`]s carry.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn mailbox(&self) -> &Mailbox {
        &self.mailbox
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn due(&self, event: Event) -> Due {
        Due {
            store: self.id,
            event,
        }
    }

    /// Runs `f` after `delay` on the runtime, posting what it returns.
    fn after(&self, delay: Duration, event: Event) -> Option<Task> {
        let rt = self.runtime.as_ref()?;
        let (mailbox, due) = (self.mailbox.clone(), self.due(event));
        Some(Task(
            rt.spawn(async move {
                tokio::time::sleep(delay).await;
                mailbox.post(due);
            })
            .abort_handle(),
        ))
    }

    /// `fetch`: starts the request and returns its id; the answer is posted.
    pub fn fetch(&mut self, policy: &HttpPolicy, request: FetchRequest) -> u64 {
        self.next_fetch += 1;
        let id = self.next_fetch;
        let refuse = |this: &Self, why: String| {
            this.mailbox.post(this.due(Event::Fetched {
                id,
                response: Err(why),
            }))
        };
        let built = build(policy, &request);
        let req = match built {
            Ok(r) => r,
            Err(why) => {
                refuse(self, why);
                return id;
            }
        };
        let Some(rt) = self.runtime.clone() else {
            refuse(self, "HTTP is not available here".into());
            return id;
        };
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= MAX_IN_FLIGHT {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            refuse(
                self,
                format!("too many requests in flight (at most {MAX_IN_FLIGHT})"),
            );
            return id;
        }
        let (mailbox, in_flight, store) = (self.mailbox.clone(), self.in_flight.clone(), self.id);
        let timeout = policy.timeout();
        rt.spawn(async move {
            let response = crate::outbound::send(req, timeout, MAX_BODY)
                .await
                .map(|a| FetchResponse {
                    status: a.status.as_u16(),
                    headers: a
                        .headers
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().to_owned(),
                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                            )
                        })
                        .collect(),
                    body: a.body.to_vec(),
                })
                .map_err(|e| e.to_string());
            in_flight.fetch_sub(1, Ordering::Relaxed);
            mailbox.post(Due {
                store,
                event: Event::Fetched { id, response },
            });
        });
        id
    }

    /// Before a `connect` call: the connect it answers.
    pub fn begin_connect(&mut self, target: InstanceRef) {
        self.connecting = Some((target, false));
    }

    /// `defer-connect`; ignored for any instance but the one being connected.
    pub fn defer_connect(&mut self, target: InstanceRef) {
        if let Some((t, deferred)) = &mut self.connecting {
            if *t == target {
                *deferred = true;
            }
        }
    }

    /// After a `connect` call: `Some(reply)` back when the connect is to be
    /// answered now, `None` when the plugin deferred it (the reply is kept).
    pub fn end_connect(&mut self, reply: ConnectReply) -> Option<ConnectReply> {
        match self.connecting.take() {
            Some((target, true)) => {
                let seq = self.next_seq();
                let expiry = Event::ConnectExpired {
                    target: target.clone(),
                    seq,
                };
                let Some(task) = self.after(self.pending_connect, expiry) else {
                    return Some(reply);
                };
                // A connect deferred again replaces the earlier one, which
                // is refused (the instance was replaced).
                if let Some((old, ..)) = self.deferred.insert(target, (reply, seq, task)) {
                    let _ = old.send(Err(CallError::Gone));
                }
                None
            }
            _ => Some(reply),
        }
    }

    /// `settle-connect`: answers a deferred connect, if it still waits.
    pub fn settle_connect(&mut self, target: &InstanceRef, answer: Result<(), Rejection>) {
        if let Some((reply, ..)) = self.deferred.remove(target) {
            let _ = reply.send(Ok(answer));
        }
    }

    /// The client of a deferred connect left: nobody waits for it now.
    pub fn forget_connect(&mut self, target: &InstanceRef) {
        if let Some((reply, ..)) = self.deferred.remove(target) {
            let _ = reply.send(Err(CallError::Gone));
        }
    }

    /// A deferred connect's time is up: refuses it if it still waits
    /// (true: the plugin is to be told the instance is gone).
    pub fn expire_connect(&mut self, target: &InstanceRef, seq: u64) -> bool {
        if self.deferred.get(target).is_none_or(|(_, s, _)| *s != seq) {
            return false;
        }
        if let Some((reply, ..)) = self.deferred.remove(target) {
            let ms = self.pending_connect.as_millis() as u64;
            let _ = reply.send(Err(CallError::Unanswered(ms)));
        }
        true
    }

    /// `set-timer`.
    pub fn set_timer(&mut self, key: String, delay: Duration) {
        let seq = self.next_seq();
        let event = Event::Timer {
            key: key.clone(),
            seq,
        };
        match self.after(delay, event) {
            Some(task) => {
                self.timers.insert(key, (seq, task));
            }
            None => {
                self.timers.remove(&key);
            }
        }
    }

    /// `cancel-timer`.
    pub fn cancel_timer(&mut self, key: &str) {
        self.timers.remove(key);
    }

    /// A timer fired: whether it is still the one set under its key (it is
    /// then forgotten, and the plugin is called).
    pub fn take_timer(&mut self, key: &str, seq: u64) -> bool {
        if self.timers.get(key).is_some_and(|(s, _)| *s == seq) {
            self.timers.remove(key);
            return true;
        }
        false
    }
}

/// The `http::Request` of a `fetch`, or why it cannot be sent.
fn build(
    policy: &HttpPolicy,
    r: &FetchRequest,
) -> Result<http::Request<crate::outbound::Body>, String> {
    let uri: http::Uri = r
        .url
        .parse()
        .map_err(|e| format!("invalid URL {}: {e}", r.url))?;
    if !policy.allows(&uri) {
        tracing::warn!(uri = %uri, "plugin fetch to an origin not in allow_http; denied");
        return Err(format!(
            "HTTP-request-denied: {} is not in allow_http",
            super::http::origin_of(&uri).unwrap_or_else(|| r.url.clone())
        ));
    }
    let method = match r.method.to_ascii_uppercase().as_str() {
        m @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD") => {
            http::Method::from_bytes(m.as_bytes()).map_err(|e| e.to_string())?
        }
        other => return Err(format!("unsupported method {other}")),
    };
    let mut b = http::Request::builder().method(method).uri(uri);
    for (k, v) in &r.headers {
        b = b.header(k.as_str(), v.as_str());
    }
    b.body(crate::outbound::body(r.body.clone()))
        .map_err(|e| format!("invalid request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(id: &str) -> InstanceRef {
        InstanceRef {
            connection: 1,
            id: id.into(),
        }
    }

    fn collect(later: &Later) -> Arc<Mutex<Vec<Due>>> {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        later.mailbox().attach(move |d| g.lock().push(d));
        got
    }

    #[test]
    fn a_denied_fetch_is_answered_through_the_mailbox_with_its_id() {
        let mut later = Later::new(None, Duration::from_secs(1));
        let policy = HttpPolicy::from_config(
            r#"{"allow_http":["http://backend:8080"]}"#,
            Duration::from_secs(1),
        );
        let req = |url: &str, method: &str| FetchRequest {
            method: method.into(),
            url: url.into(),
            headers: vec![],
            body: vec![],
        };
        let a = later.fetch(&policy, req("http://evil.example/", "GET"));
        let b = later.fetch(&policy, req("http://backend:8080/x", "BREW"));
        // Answers posted before the store serves wait in the backlog.
        let got = collect(&later);
        let got = got.lock();
        assert_eq!(got.len(), 2);
        let Event::Fetched { id, response } = &got[0].event else {
            panic!("{:?}", got[0])
        };
        assert_eq!((*id, got[0].store), (a, later.id()));
        assert!(response.as_ref().unwrap_err().contains("not in allow_http"));
        let Event::Fetched { id, response } = &got[1].event else {
            panic!()
        };
        assert_eq!(*id, b);
        assert!(response
            .as_ref()
            .unwrap_err()
            .contains("unsupported method"));
    }

    #[tokio::test]
    async fn a_deferred_connect_waits_for_its_settlement_and_expires_alone() {
        let mut later = Later::new(
            Some(tokio::runtime::Handle::current()),
            Duration::from_millis(20),
        );
        let got = collect(&later);
        // Not deferred: answered at once.
        later.begin_connect(target("a"));
        let (tx, _rx) = oneshot::channel();
        assert!(later.end_connect(tx).is_some());
        // Deferred, then settled.
        later.begin_connect(target("b"));
        later.defer_connect(target("other"));
        later.defer_connect(target("b"));
        let (tx, rx_b) = oneshot::channel();
        assert!(later.end_connect(tx).is_none());
        later.settle_connect(&target("b"), Ok(()));
        assert_eq!(rx_b.await.unwrap(), Ok(Ok(())));
        // Deferred and never settled: the expiry comes through the mailbox.
        later.begin_connect(target("c"));
        later.defer_connect(target("c"));
        let (tx, rx_c) = oneshot::channel();
        assert!(later.end_connect(tx).is_none());
        let due = loop {
            if let Some(d) = got.lock().pop() {
                break d;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let Event::ConnectExpired { target: t, seq } = due.event else {
            panic!()
        };
        assert!(later.expire_connect(&t, seq));
        assert!(!later.expire_connect(&t, seq));
        assert_eq!(rx_c.await.unwrap(), Err(CallError::Unanswered(20)));
        // Settling it afterwards does nothing.
        later.settle_connect(&target("c"), Ok(()));
    }

    #[tokio::test]
    async fn a_timer_set_again_replaces_the_first_and_cancel_stops_it() {
        let mut later = Later::new(
            Some(tokio::runtime::Handle::current()),
            Duration::from_secs(1),
        );
        let got = collect(&later);
        later.set_timer("k".into(), Duration::from_millis(5));
        later.set_timer("k".into(), Duration::from_millis(10));
        later.set_timer("gone".into(), Duration::from_millis(5));
        later.cancel_timer("gone");
        let due = loop {
            if let Some(d) = got.lock().pop() {
                break d;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let Event::Timer { key, seq } = due.event else {
            panic!()
        };
        assert_eq!(key, "k");
        assert!(later.take_timer(&key, seq));
        assert!(!later.take_timer(&key, seq), "a timer fires once");
        // The replaced timer's task was aborted: nothing else arrives.
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(got.lock().is_empty());
    }
}
