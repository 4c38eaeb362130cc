//! One plugin at run time: a thread that owns the plugin's long-lived
//! instance and runs its calls one at a time, in order, each under the
//! epoch deadline.
//!
//! A call that traps, times out or exhausts memory fails alone: the error is
//! logged with plugin, hook and cause, the instance is dropped, and the next
//! call rebuilds it from the linked component (its `GuestPre`), running
//! `describe` and `init` again. Repeated failures back off exponentially
//! (100 ms up to 30 s); while backing off, calls fail fast and are counted
//! (`chanhost_plugin_refused_total{reason="backoff"}`, one warning per
//! back-off), and the rebuild is attempted when the back-off ends, whether
//! or not a call comes. A new version (hot reload) is started elsewhere and
//! swapped in between two calls.
//!
//! The queue in front of the thread is bounded in jobs and in the bytes of
//! their payloads (`[plugin_runtime] queue`, `queue_bytes`): past either,
//! client messages, events and frames are dropped and counted
//! (`chanhost_plugin_dropped_total`); lifecycle calls never are.
//!
//! What a 0.2.0 plugin asked to happen later (fetch answers, timers,
//! deferred connects running out of time, see [`super::later`]) comes
//! through the same queue, never dropped, and reaches only the instance
//! that asked: after a rebuild or a swap, what was due to the old one is
//! discarded.
//!
//! A native plugin ([`NativePlugin`]) runs behind the same slot, queue and
//! thread; a panic in one of its hooks fails that call alone.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use tokio::sync::{mpsc, oneshot};

use super::bindings::{Events, Guest, GuestPre, Hook, Messages, StoreState};
use super::engine::{describe_error, PluginEngine, Started};
use super::later::{ConnectReply, Due, Event};
use super::native::{NativeHost, NativePlugin};
use super::{
    ClientMessage, ConnectRequest, DisconnectReason, HostServices, InstanceRef, Manifest, Payload,
    RecoverRequest, Rejection,
};
use crate::hub::{SharedEvent, WriteBatch};

/// Most jobs run as one write batch.
const BATCH: usize = 64;

/// Most messages (or events) given to a 0.4.0 plugin in one call, and
/// their most payload bytes (a larger one goes alone).
pub const CALL_BATCH: usize = 128;
pub const CALL_BATCH_BYTES: usize = 64 * 1024;

/// Why a call did not complete.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CallError {
    #[error("plugin call failed: {0}")]
    Failed(String),
    #[error("plugin is unavailable (restarting after failures)")]
    Unavailable,
    #[error("plugin is gone")]
    Gone,
    #[error("the plugin did not answer the connect within {0} ms")]
    Unanswered(u64),
}

/// Per-plugin counters, by hook.
#[derive(Debug, Default)]
pub struct PluginMetrics {
    calls: [AtomicU64; 10],
    /// What the calls gave: a batched `messages` call of 5 is one call
    /// and 5 items; any other call is one item.
    items: [AtomicU64; 10],
    errors: [AtomicU64; 10],
    /// How long calls took, by hook.
    latency: [crate::metrics::LatencyHistogram; 10],
    /// Calls dropped because the plugin's queue was full.
    pub dropped: AtomicU64,
    /// Calls refused while the plugin backed off after failures.
    pub refused_backoff: AtomicU64,
    /// Instances rebuilt after a failure.
    pub rebuilds: AtomicU64,
    /// Calls of `messages` / `events` with more than one item.
    pub batches: AtomicU64,
    /// Items given again alone after their batch's call failed.
    pub retried: AtomicU64,
    /// Whether calls are refused now, until the instance is rebuilt.
    backing_off: AtomicBool,
    /// The last failure: when (ms since the epoch) and why.
    last_error: parking_lot::Mutex<Option<(u64, String)>>,
}

/// One hook's figures, for operators.
#[derive(Debug, Clone, PartialEq)]
pub struct HookFigures {
    pub hook: &'static str,
    pub calls: u64,
    pub errors: u64,
    /// Median and 99th percentile call time, in nanoseconds (None
    /// without calls).
    pub p50_ns: Option<u64>,
    pub p99_ns: Option<u64>,
}

/// A hook's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HookCounts {
    pub hook: &'static str,
    pub calls: u64,
    pub items: u64,
    pub errors: u64,
}

const HOOKS: [Hook; 10] = [
    Hook::Describe,
    Hook::Init,
    Hook::Connect,
    Hook::Message,
    Hook::Disconnect,
    Hook::Event,
    Hook::Frame,
    Hook::Fetched,
    Hook::Timer,
    Hook::Recover,
];

impl PluginMetrics {
    fn idx(h: Hook) -> usize {
        HOOKS.iter().position(|x| *x == h).unwrap_or(0)
    }
    /// Every hook's calls, errors and call times.
    pub fn hooks(&self) -> Vec<HookFigures> {
        HOOKS
            .iter()
            .enumerate()
            .map(|(i, h)| HookFigures {
                hook: h.name(),
                calls: self.calls[i].load(Ordering::Relaxed),
                errors: self.errors[i].load(Ordering::Relaxed),
                p50_ns: self.latency[i].quantile(0.5),
                p99_ns: self.latency[i].quantile(0.99),
            })
            .collect()
    }

    /// Whether the plugin's calls are refused now (backing off after
    /// repeated failures).
    pub fn backing_off(&self) -> bool {
        self.backing_off.load(Ordering::Relaxed)
    }

    /// The last failure: when (ms since the epoch) and why.
    pub fn last_error(&self) -> Option<(u64, String)> {
        self.last_error.lock().clone()
    }

    fn failed(&self, hook: Hook, cause: &str) {
        self.errors[Self::idx(hook)].fetch_add(1, Ordering::Relaxed);
        // Bounded: a plugin's message may be long.
        let mut text: String = cause.chars().take(2000).collect();
        if text.len() < cause.len() {
            text.push('…');
        }
        *self.last_error.lock() = Some((crate::adapter::now_ms(), text));
    }

    /// A batched call of `n` items is made.
    fn batch(&self, n: usize) {
        if n > 1 {
            self.batches.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Runs a call, counting it and its time under `hook`.
    fn timed<R>(&self, hook: Hook, f: impl FnOnce() -> R) -> R {
        self.timed_items(hook, 1, f)
    }

    /// Runs a call that gives the plugin `items` messages or events.
    fn timed_items<R>(&self, hook: Hook, items: usize, f: impl FnOnce() -> R) -> R {
        let i = Self::idx(hook);
        self.calls[i].fetch_add(1, Ordering::Relaxed);
        self.items[i].fetch_add(items as u64, Ordering::Relaxed);
        let start = Instant::now();
        let r = f();
        self.latency[i].record(start.elapsed());
        r
    }

    /// Calls, items and errors of every hook.
    pub fn by_hook(&self) -> impl Iterator<Item = HookCounts> + '_ {
        HOOKS.iter().enumerate().map(|(i, h)| HookCounts {
            hook: h.name(),
            calls: self.calls[i].load(Ordering::Relaxed),
            items: self.items[i].load(Ordering::Relaxed),
            errors: self.errors[i].load(Ordering::Relaxed),
        })
    }
}

/// A call for the plugin's thread. The rare, large ones are boxed: every
/// job is moved through the queue.
enum Job {
    Connect(Box<ConnectRequest>, ConnectReply),
    Recover(Box<RecoverRequest>, ConnectReply),
    Message(ClientMessage),
    Disconnect(InstanceRef, DisconnectReason),
    Event(Arc<str>, Arc<SharedEvent>),
    Frame(u64, String, String),
    Swap(Box<(Version, Started)>, oneshot::Sender<()>),
    /// Something a plugin instance asked for is due.
    Later(Box<Due>),
    /// The back-off after a failure ended: rebuild the instance now.
    Rebuild,
    Stop,
}

impl Job {
    /// The bytes of payload the job carries, for the queue's byte bound.
    fn weight(&self) -> usize {
        match self {
            Job::Message(m) => message_weight(m),
            Job::Event(room, ev) => room.len() + ev.weight(),
            Job::Frame(_, kind, body) => kind.len() + body.len(),
            Job::Connect(req, _) => req.params.len(),
            Job::Recover(req, _) => req.params.len(),
            _ => 0,
        }
    }

    /// Jobs that may be dropped when the queue is over its bound; lifecycle
    /// jobs never are.
    fn droppable(&self) -> bool {
        matches!(self, Job::Message(..) | Job::Event(..) | Job::Frame(..))
    }
}

/// The bytes of a client's message, for the queue's and a batch's bounds.
fn message_weight(m: &ClientMessage) -> usize {
    m.target.id.len()
        + m.event.len()
        + m.data.json.len()
        + m.data.attachments.iter().map(Vec::len).sum::<usize>()
}

/// A loaded version of a plugin.
pub struct Version {
    pub pre: GuestPre,
    pub manifest: Arc<Manifest>,
    pub config: String,
    /// SHA-256 of the file it came from.
    pub hash: [u8; 32],
}

/// How much may wait in a plugin's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueBound {
    pub jobs: usize,
    pub bytes: usize,
}

impl QueueBound {
    pub fn of(c: &crate::config::PluginRuntimeConfig) -> Self {
        Self {
            jobs: c.queue,
            bytes: c.queue_bytes,
        }
    }
}

/// Jobs and payload bytes waiting in a plugin's queue.
#[derive(Debug, Default)]
struct Depth {
    jobs: AtomicUsize,
    bytes: AtomicUsize,
}

impl Depth {
    /// A job left the queue.
    fn taken(&self, job: &Job) {
        self.jobs.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(job.weight(), Ordering::Relaxed);
    }
}

/// Where a plugin's current version came from, for operators.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// Its file (none for a native plugin).
    pub file: Option<std::path::PathBuf>,
    /// The WIT version it was built against (none for a native plugin).
    pub wit: Option<super::WitVersion>,
    /// When the current version started serving (ms since the epoch).
    pub loaded_at: u64,
    /// Versions loaded under this name since the host started (1, then
    /// one more per replacement).
    pub loads: u64,
}

/// The handle the rest of the host uses to call a plugin.
pub struct PluginSlot {
    origin: RwLock<Origin>,
    pub name: Arc<str>,
    tx: mpsc::UnboundedSender<Job>,
    depth: Arc<Depth>,
    bound: QueueBound,
    manifest: RwLock<Arc<Manifest>>,
    hash: RwLock<[u8; 32]>,
    /// Whether the current version has `recover` (WIT 0.3.0).
    recovers: AtomicBool,
    pub metrics: Arc<PluginMetrics>,
}

impl PluginSlot {
    /// Starts the plugin's thread with a version that already passed `init`.
    pub fn spawn(
        name: Arc<str>,
        engine: Arc<PluginEngine>,
        services: Weak<dyn HostServices>,
        version: Version,
        started: Started,
    ) -> std::io::Result<Arc<Self>> {
        let (slot, rx) = Self::new(
            name.clone(),
            QueueBound::of(engine.limits()),
            version.manifest.clone(),
            version.hash,
        );
        let (depth, metrics) = (slot.depth.clone(), slot.metrics.clone());
        slot.recovers
            .store(version.pre.version().recovers(), Ordering::SeqCst);
        if let Some(s) = services.upgrade() {
            s.set_listens(&name, &started.listens);
        }
        let mut runner = Runner {
            name,
            engine,
            services,
            rebuild: slot.tx.downgrade(),
            refused: 0,
            version,
            live: None,
            failures: 0,
            retry_at: None,
            metrics,
            depth,
        };
        runner.go_live(started.store, started.guest);
        std::thread::Builder::new()
            .name(format!("plugin-{}", runner.name))
            .spawn(move || run_jobs(rx, &mut runner))?;
        Ok(slot)
    }

    /// Starts the thread of a native plugin whose manifest is `manifest`
    /// (its `describe`); `queue` bounds its droppable calls.
    pub fn spawn_native(
        name: Arc<str>,
        services: Weak<dyn HostServices>,
        plugin: Box<dyn NativePlugin>,
        manifest: Arc<Manifest>,
        queue: QueueBound,
    ) -> std::io::Result<Arc<Self>> {
        let (slot, rx) = Self::new(name.clone(), queue, manifest, [0; 32]);
        let mut runner = NativeRunner {
            name,
            plugin,
            services,
            metrics: slot.metrics.clone(),
            depth: slot.depth.clone(),
        };
        std::thread::Builder::new()
            .name(format!("plugin-{}", runner.name))
            .spawn(move || run_jobs(rx, &mut runner))?;
        Ok(slot)
    }

    fn new(
        name: Arc<str>,
        bound: QueueBound,
        manifest: Arc<Manifest>,
        hash: [u8; 32],
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Job>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let slot = Arc::new(PluginSlot {
            origin: RwLock::new(Origin::default()),
            name,
            tx,
            depth: Arc::new(Depth::default()),
            bound,
            manifest: RwLock::new(manifest),
            hash: RwLock::new(hash),
            recovers: AtomicBool::new(false),
            metrics: Arc::new(PluginMetrics::default()),
        });
        (slot, rx)
    }

    /// Calls waiting in the plugin's queue.
    pub fn queue_depth(&self) -> usize {
        self.depth.jobs.load(Ordering::Relaxed)
    }

    /// Where the current version came from.
    pub fn origin(&self) -> Origin {
        self.origin.read().clone()
    }

    /// A version from `file` (built against `wit`) started serving.
    pub fn loaded(&self, file: Option<&std::path::Path>, wit: Option<super::WitVersion>) {
        let mut o = self.origin.write();
        o.file = file.map(std::path::Path::to_path_buf);
        o.wit = wit;
        o.loaded_at = crate::adapter::now_ms();
        o.loads += 1;
    }

    /// What the current version serves.
    pub fn manifest(&self) -> Arc<Manifest> {
        self.manifest.read().clone()
    }

    /// Hash of the file of the current version.
    pub fn hash(&self) -> [u8; 32] {
        *self.hash.read()
    }

    fn submit(&self, job: Job) -> bool {
        let weight = job.weight();
        if job.droppable()
            && (self.depth.jobs.load(Ordering::Relaxed) >= self.bound.jobs
                || self
                    .depth
                    .bytes
                    .load(Ordering::Relaxed)
                    .saturating_add(weight)
                    > self.bound.bytes)
        {
            let n = self.metrics.dropped.fetch_add(1, Ordering::Relaxed);
            // The first drop of a run of them, then one in a thousand.
            if n % 1000 == 0 {
                tracing::warn!(
                    plugin = &*self.name,
                    dropped = n + 1,
                    "plugin queue full; call dropped"
                );
            }
            return false;
        }
        self.depth.jobs.fetch_add(1, Ordering::Relaxed);
        self.depth.bytes.fetch_add(weight, Ordering::Relaxed);
        if let Err(e) = self.tx.send(job) {
            self.depth.taken(&e.0);
            return false;
        }
        true
    }

    /// Asks the plugin whether a client may open an instance.
    pub async fn connect(&self, req: ConnectRequest) -> Result<Result<(), Rejection>, CallError> {
        let (tx, rx) = oneshot::channel();
        if !self.submit(Job::Connect(Box::new(req), tx)) {
            return Err(CallError::Gone);
        }
        rx.await.unwrap_or(Err(CallError::Gone))
    }

    /// Whether the plugin's current version can be told of a recovered
    /// socket (WIT 0.3.0): only then does the host offer recovery on its
    /// namespaces.
    pub fn recovers(&self) -> bool {
        self.recovers.load(Ordering::SeqCst)
    }

    /// Tells the plugin a socket came back; its answer accepts or refuses.
    pub async fn recover(&self, req: RecoverRequest) -> Result<Result<(), Rejection>, CallError> {
        let (tx, rx) = oneshot::channel();
        if !self.submit(Job::Recover(Box::new(req), tx)) {
            return Err(CallError::Gone);
        }
        rx.await.unwrap_or(Err(CallError::Gone))
    }

    /// Hands a client message to the plugin.
    pub fn message(&self, target: InstanceRef, event: String, data: Payload, ack: Option<u64>) {
        self.submit(Job::Message(ClientMessage {
            target,
            event,
            data,
            ack_id: ack,
        }));
    }

    /// Tells the plugin an instance ended.
    pub fn disconnect(&self, target: InstanceRef, reason: DisconnectReason) {
        self.submit(Job::Disconnect(target, reason));
    }

    /// Hands a room event to the plugin.
    pub fn event(&self, room: Arc<str>, event: Arc<SharedEvent>) {
        self.submit(Job::Event(room, event));
    }

    /// Hands a connection-level frame to the plugin.
    pub fn frame(&self, connection: u64, kind: String, body: String) {
        self.submit(Job::Frame(connection, kind, body));
    }

    /// Swaps in a new version between two calls; resolves once it serves.
    pub async fn swap(&self, version: Version, started: Started) -> Result<(), CallError> {
        let manifest = version.manifest.clone();
        let hash = version.hash;
        let recovers = version.pre.version().recovers();
        let (tx, rx) = oneshot::channel();
        if !self.submit(Job::Swap(Box::new((version, started)), tx)) {
            return Err(CallError::Gone);
        }
        rx.await.map_err(|_| CallError::Gone)?;
        *self.manifest.write() = manifest;
        *self.hash.write() = hash;
        self.recovers.store(recovers, Ordering::SeqCst);
        Ok(())
    }

    /// Stops the plugin's thread after the calls already queued.
    pub fn stop(&self) {
        self.submit(Job::Stop);
    }
}

struct Live {
    store: wasmtime::Store<StoreState>,
    guest: Guest,
}

struct Runner {
    name: Arc<str>,
    engine: Arc<PluginEngine>,
    services: Weak<dyn HostServices>,
    version: Version,
    live: Option<Live>,
    failures: u32,
    retry_at: Option<Instant>,
    metrics: Arc<PluginMetrics>,
    depth: Arc<Depth>,
    /// Queues the rebuild when a back-off ends (weak: the thread ends
    /// when the slot is gone).
    rebuild: mpsc::WeakUnboundedSender<Job>,
    /// Calls refused during the current back-off.
    refused: u64,
}

fn backoff(failures: u32) -> Duration {
    let ms = 100u64.saturating_mul(1 << failures.min(10).saturating_sub(1));
    Duration::from_millis(ms.min(30_000))
}

/// Queues a job the host itself makes (a rebuild, something due), if the
/// slot is still there.
fn post(tx: &mpsc::WeakUnboundedSender<Job>, depth: &Depth, job: Job) {
    if let Some(tx) = tx.upgrade() {
        depth.jobs.fetch_add(1, Ordering::Relaxed);
        if tx.send(job).is_err() {
            depth.jobs.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// What a plugin thread runs next: one job, or consecutive messages or
/// events that were waiting, for one call of a plugin that takes batches.
enum Work {
    One(Job),
    Messages(Vec<ClientMessage>),
    Events(Vec<(Arc<str>, Arc<SharedEvent>)>),
}

impl Work {
    /// The jobs it holds.
    fn items(&self) -> usize {
        match self {
            Work::One(_) => 1,
            Work::Messages(b) => b.len(),
            Work::Events(b) => b.len(),
        }
    }
}

/// The side of a plugin thread that runs its work.
trait Runs {
    /// Whether consecutive messages and events go in one call.
    fn batches(&self) -> bool;
    /// Runs one piece of work; false on `Stop`.
    fn run(&mut self, work: Work) -> bool;
    /// What waits in the queue.
    fn depth(&self) -> Arc<Depth>;
}

/// A plugin's queue as its thread reads it: a job taken to end a batch
/// (one of another kind) is the next one read.
struct Queue {
    rx: mpsc::UnboundedReceiver<Job>,
    next: Option<Job>,
    depth: Arc<Depth>,
}

impl Queue {
    fn taken(&self, job: Job) -> Job {
        self.depth.taken(&job);
        job
    }

    fn recv(&mut self) -> Option<Job> {
        match self.next.take() {
            Some(job) => Some(job),
            None => self.rx.blocking_recv().map(|j| self.taken(j)),
        }
    }

    fn try_recv(&mut self) -> Option<Job> {
        match self.next.take() {
            Some(job) => Some(job),
            None => self.rx.try_recv().ok().map(|j| self.taken(j)),
        }
    }

    /// `first`, with the messages or events waiting right behind it when
    /// they go in batches: never more than [`CALL_BATCH`] items or (past
    /// the first) [`CALL_BATCH_BYTES`]; nothing waits for more to come.
    fn gather(&mut self, first: Job, batches: bool) -> Work {
        if !batches {
            return Work::One(first);
        }
        let mut bytes = first.weight();
        let mut fits = |weight: usize| {
            bytes += weight;
            bytes <= CALL_BATCH_BYTES
        };
        match first {
            Job::Message(m) => {
                let mut batch = vec![m];
                while batch.len() < CALL_BATCH {
                    match self.try_recv() {
                        Some(Job::Message(m)) if fits(message_weight(&m)) => batch.push(m),
                        Some(other) => {
                            self.next = Some(other);
                            break;
                        }
                        None => break,
                    }
                }
                Work::Messages(batch)
            }
            Job::Event(room, ev) => {
                let mut batch = vec![(room, ev)];
                while batch.len() < CALL_BATCH {
                    match self.try_recv() {
                        Some(job @ Job::Event(..)) if fits(job.weight()) => {
                            let Job::Event(room, ev) = job else {
                                unreachable!("matched above")
                            };
                            batch.push((room, ev));
                        }
                        Some(other) => {
                            self.next = Some(other);
                            break;
                        }
                        None => break,
                    }
                }
                Work::Events(batch)
            }
            other => Work::One(other),
        }
    }
}

/// A plugin thread's loop: runs jobs until `Stop` (`run` returns false)
/// or until the slot is gone.
fn run_jobs(rx: mpsc::UnboundedReceiver<Job>, runner: &mut impl Runs) {
    let mut queue = Queue {
        rx,
        next: None,
        depth: runner.depth(),
    };
    while let Some(first) = queue.recv() {
        // A busy plugin (a batch, or more jobs waiting): what it sends runs
        // as one write batch, so frames for one connection go out in one
        // write; at most `BATCH` messages' worth, so that no connection
        // gets more than its send queue holds at once. (A lone job writes
        // at once: a fan-out is spread over many connections anyway.)
        let mut batch = None;
        let mut items = 0;
        let mut next = Some(first);
        while let Some(job) = next {
            let work = queue.gather(job, runner.batches());
            let n = work.items();
            if n > 1 || items > 0 {
                batch.get_or_insert_with(WriteBatch::begin);
            }
            items += n;
            if !runner.run(work) {
                return;
            }
            if items >= BATCH {
                break;
            }
            next = queue.try_recv();
        }
    }
}

impl Runner {
    /// Makes a started instance the one that serves; what it asks for
    /// later comes through the queue from now on.
    fn go_live(&mut self, store: wasmtime::Store<StoreState>, guest: Guest) {
        let (tx, depth) = (self.rebuild.clone(), self.depth.clone());
        store
            .data()
            .later
            .mailbox()
            .attach(move |due| post(&tx, &depth, Job::Later(Box::new(due))));
        self.live = Some(Live { store, guest });
        self.metrics.backing_off.store(false, Ordering::Relaxed);
    }

    /// Something due to an instance: given to it if it still serves.
    fn due(&mut self, due: Due) {
        let Some(live) = &mut self.live else { return };
        let later = &mut live.store.data_mut().later;
        if later.id() != due.store {
            return;
        }
        match due.event {
            Event::Fetched { id, response } => {
                let _ = self.call(Hook::Fetched, |g, s| g.fetched(s, id, response));
            }
            Event::Timer { key, seq } => {
                if later.take_timer(&key, seq) {
                    let _ = self.call(Hook::Timer, |g, s| g.timer(s, &key));
                }
            }
            Event::ConnectExpired { target, seq } => {
                if later.expire_connect(&target, seq) {
                    // The plugin learns the instance is gone.
                    let _ = self.call(Hook::Disconnect, |g, s| {
                        g.disconnect(s, target, DisconnectReason::Server)
                    });
                }
            }
        }
    }

    /// Messages in one `messages` call. When it fails (a trap, its time
    /// or memory used up), the instance is rebuilt and each message is
    /// given again alone, so that a bad one fails alone.
    fn messages(&mut self, batch: Vec<ClientMessage>) {
        let batch = Messages::new(batch);
        self.batch(Hook::Message, batch.len(), |g, s, r| {
            g.messages(s, &batch, r)
        });
    }

    /// Events in one `events` call, as [`Runner::messages`].
    fn events(&mut self, batch: Vec<(Arc<str>, Arc<SharedEvent>)>) {
        let batch = Events::new(&batch);
        self.batch(Hook::Event, batch.len(), |g, s, r| g.events(s, &batch, r));
    }

    /// One call with items `0..n` (`call` makes it for a range of them);
    /// after a failure, one call per item.
    fn batch(
        &mut self,
        hook: Hook,
        n: usize,
        call: impl Fn(&Guest, &mut wasmtime::Store<StoreState>, Range<usize>) -> wasmtime::Result<()>,
    ) {
        self.metrics.batch(n);
        let r = self.call_items(hook, n, |g, s| call(g, s, 0..n));
        if n > 1 && matches!(r, Err(CallError::Failed(_))) {
            self.metrics.retried.fetch_add(n as u64, Ordering::Relaxed);
            tracing::warn!(
                plugin = &*self.name,
                hook = hook.name(),
                items = n,
                "a batched call failed; each of its items is given again alone"
            );
            for i in 0..n {
                let _ = self.call(hook, |g, s| call(g, s, i..i + 1));
            }
        }
    }

    /// Runs one job; false on `Stop`.
    fn handle(&mut self, job: Job) -> bool {
        match job {
            Job::Rebuild => {
                let _ = self.ensure_live();
            }
            Job::Connect(req, reply) => {
                let target = req.target.clone();
                let r = self.call(Hook::Connect, |g, s| {
                    s.data_mut().later.begin_connect(target);
                    g.connect(s, *req)
                });
                // Deferred: the store keeps the reply for `settle-connect`.
                let reply = match &mut self.live {
                    Some(live) if r.is_ok() => live.store.data_mut().later.end_connect(reply),
                    _ => Some(reply),
                };
                if let Some(reply) = reply {
                    let _ = reply.send(r);
                }
            }
            Job::Recover(req, reply) => {
                let _ = reply.send(self.call(Hook::Recover, |g, s| g.recover(s, *req)));
            }
            Job::Message(m) => {
                let _ = self.call(Hook::Message, |g, s| g.message(s, m));
            }
            Job::Disconnect(t, reason) => {
                if let Some(live) = &mut self.live {
                    live.store.data_mut().later.forget_connect(&t);
                }
                let _ = self.call(Hook::Disconnect, |g, s| g.disconnect(s, t, reason));
            }
            Job::Later(due) => self.due(*due),
            Job::Event(room, ev) => {
                let _ = self.call(Hook::Event, |g, s| g.event(s, &room, &ev));
            }
            Job::Frame(conn, kind, body) => {
                let _ = self.call(Hook::Frame, |g, s| g.frame(s, conn, &kind, &body));
            }
            Job::Swap(swap, done) => {
                let (version, started) = *swap;
                if let Some(s) = self.services.upgrade() {
                    s.set_listens(&self.name, &started.listens);
                }
                self.version = version;
                self.go_live(started.store, started.guest);
                self.failures = 0;
                self.retry_at = None;
                let _ = done.send(());
            }
            Job::Stop => {
                tracing::debug!(plugin = &*self.name, "plugin thread stopped");
                return false;
            }
        }
        true
    }
}

impl Runs for Runner {
    fn batches(&self) -> bool {
        self.version.pre.version().batches()
    }

    fn run(&mut self, work: Work) -> bool {
        match work {
            Work::One(job) => return self.handle(job),
            Work::Messages(batch) => self.messages(batch),
            Work::Events(batch) => self.events(batch),
        }
        true
    }

    fn depth(&self) -> Arc<Depth> {
        self.depth.clone()
    }
}

impl Runner {
    /// Rebuilds the instance if it was dropped after a failure.
    fn ensure_live(&mut self) -> Result<(), CallError> {
        if self.live.is_some() {
            return Ok(());
        }
        if let Some(at) = self.retry_at {
            if Instant::now() < at {
                self.metrics.refused_backoff.fetch_add(1, Ordering::Relaxed);
                if self.refused == 0 {
                    tracing::warn!(
                        plugin = &*self.name,
                        failures = self.failures,
                        retry_in_ms = at.saturating_duration_since(Instant::now()).as_millis() as u64,
                        "plugin backing off after repeated failures; its calls are refused until it is rebuilt"
                    );
                }
                self.refused += 1;
                return Err(CallError::Unavailable);
            }
        }
        if self.refused > 0 {
            tracing::info!(
                plugin = &*self.name,
                refused = self.refused,
                "plugin back-off over; calls refused meanwhile"
            );
            self.refused = 0;
        }
        match self.engine.start(
            &self.version.pre,
            self.name.clone(),
            self.services.clone(),
            &self.version.config,
        ) {
            Ok(started) => {
                // The rebuilt instance's standing listens replace whatever
                // the failed one listened to.
                if let Some(s) = self.services.upgrade() {
                    s.set_listens(&self.name, &started.listens);
                }
                self.metrics.rebuilds.fetch_add(1, Ordering::Relaxed);
                tracing::info!(plugin = &*self.name, "plugin instance rebuilt");
                self.go_live(started.store, started.guest);
                Ok(())
            }
            Err(e) => {
                self.fail(Hook::Init, e.to_string());
                Err(CallError::Unavailable)
            }
        }
    }

    fn fail(&mut self, hook: Hook, cause: String) {
        self.live = None;
        self.failures += 1;
        let wait = backoff(self.failures);
        self.retry_at = Some(
            Instant::now()
                + if self.failures > 1 {
                    wait
                } else {
                    Duration::ZERO
                },
        );
        self.metrics.failed(hook, &cause);
        if self.failures > 1 {
            self.metrics.backing_off.store(true, Ordering::Relaxed);
            // Rebuild when the back-off ends, not only on the next call.
            let (tx, depth) = (self.rebuild.clone(), self.depth.clone());
            let _ = std::thread::Builder::new()
                .name(format!("plugin-{}-backoff", self.name))
                .spawn(move || {
                    std::thread::sleep(wait);
                    post(&tx, &depth, Job::Rebuild);
                });
        }
        tracing::error!(
            plugin = &*self.name,
            hook = hook.name(),
            failures = self.failures,
            "plugin call failed: {cause}; instance will be rebuilt"
        );
    }

    fn call<R>(
        &mut self,
        hook: Hook,
        f: impl FnOnce(&Guest, &mut wasmtime::Store<StoreState>) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        self.call_items(hook, 1, f)
    }

    /// A call that gives the plugin `items` messages or events (one time
    /// limit for them all).
    fn call_items<R>(
        &mut self,
        hook: Hook,
        items: usize,
        f: impl FnOnce(&Guest, &mut wasmtime::Store<StoreState>) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        if let Err(e) = self.ensure_live() {
            // Refused with the rest of the batch: counted once each.
            if items > 1 && e == CallError::Unavailable {
                self.metrics
                    .refused_backoff
                    .fetch_add(items as u64 - 1, Ordering::Relaxed);
            }
            return Err(e);
        }
        let live = self.live.as_mut().expect("ensured above");
        self.engine.arm_call(&mut live.store);
        let result = self
            .metrics
            .timed_items(hook, items, || f(&live.guest, &mut live.store));
        match result {
            Ok(r) => {
                self.failures = 0;
                self.retry_at = None;
                Ok(r)
            }
            Err(e) => {
                let cause = describe_error(&e);
                self.fail(hook, cause.clone());
                Err(CallError::Failed(cause))
            }
        }
    }
}

/// The thread side of a native plugin.
struct NativeRunner {
    name: Arc<str>,
    plugin: Box<dyn NativePlugin>,
    services: Weak<dyn HostServices>,
    metrics: Arc<PluginMetrics>,
    depth: Arc<Depth>,
}

impl Runs for NativeRunner {
    /// Native plugins take one message per call: the call costs nothing.
    fn batches(&self) -> bool {
        false
    }

    fn run(&mut self, work: Work) -> bool {
        match work {
            Work::One(job) => self.handle(job),
            Work::Messages(batch) => {
                for m in batch {
                    self.handle(Job::Message(m));
                }
                true
            }
            Work::Events(batch) => {
                for (room, ev) in batch {
                    self.handle(Job::Event(room, ev));
                }
                true
            }
        }
    }

    fn depth(&self) -> Arc<Depth> {
        self.depth.clone()
    }
}

impl NativeRunner {
    /// Runs one job; false on `Stop`.
    fn handle(&mut self, job: Job) -> bool {
        match job {
            Job::Rebuild | Job::Later(_) => {}
            Job::Connect(req, reply) => {
                let r = self.call(Hook::Connect, |p, h| p.connect(h, *req));
                let _ = reply.send(r);
            }
            // Native plugins are never offered recovery (`recovers` is
            // false); a stray request is refused.
            Job::Recover(_, reply) => {
                let _ = reply.send(Ok(Err(Rejection {
                    message: "this plugin does not recover sockets".into(),
                    data: None,
                })));
            }
            Job::Message(m) => {
                let _ = self.call(Hook::Message, |p, h| {
                    p.message(h, m.target, &m.event, m.data, m.ack_id)
                });
            }
            Job::Disconnect(t, reason) => {
                let _ = self.call(Hook::Disconnect, |p, h| p.disconnect(h, t, reason));
            }
            Job::Event(room, ev) => {
                let _ = self.call(Hook::Event, |p, h| p.event(h, &room, &ev.event, &ev.data));
            }
            Job::Frame(conn, kind, body) => {
                let _ = self.call(Hook::Frame, |p, h| p.frame(h, conn, &kind, &body));
            }
            // The registry never replaces a native plugin; dropping the
            // reply tells a caller the swap did not happen.
            Job::Swap(..) => {}
            Job::Stop => {
                tracing::debug!(plugin = &*self.name, "plugin thread stopped");
                return false;
            }
        }
        true
    }

    fn call<R>(
        &mut self,
        hook: Hook,
        f: impl FnOnce(&mut dyn NativePlugin, &NativeHost<'_>) -> R,
    ) -> Result<R, CallError> {
        let services = self.services.upgrade().ok_or(CallError::Gone)?;
        let host = NativeHost {
            plugin: &self.name,
            services: &*services,
        };
        let plugin = &mut *self.plugin;
        let metrics = &self.metrics;
        metrics
            .timed(hook, || {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(plugin, &host)))
            })
            .map_err(|panic| {
                let cause = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".to_owned());
                self.metrics.failed(hook, &cause);
                tracing::error!(
                    plugin = &*self.name,
                    hook = hook.name(),
                    "native plugin call panicked: {cause}"
                );
                CallError::Failed(cause)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: usize, bytes: usize) -> Job {
        Job::Message(ClientMessage {
            target: InstanceRef {
                connection: n as u64,
                id: String::new(),
            },
            event: String::new(),
            data: Payload::json("x".repeat(bytes)),
            ack_id: None,
        })
    }

    fn queue(jobs: Vec<Job>) -> Queue {
        let (tx, rx) = mpsc::unbounded_channel();
        let depth = Arc::new(Depth::default());
        for j in jobs {
            depth.jobs.fetch_add(1, Ordering::Relaxed);
            depth.bytes.fetch_add(j.weight(), Ordering::Relaxed);
            tx.send(j).ok();
        }
        Queue {
            rx,
            next: None,
            depth,
        }
    }

    /// The connections of a batch of messages, in order.
    fn batch(work: Work) -> Vec<u64> {
        match work {
            Work::Messages(b) => b.iter().map(|m| m.target.connection).collect(),
            _ => panic!("not a batch of messages"),
        }
    }

    #[test]
    fn consecutive_messages_make_one_batch_in_order_and_another_kind_ends_it() {
        let event = Job::Event("r".into(), SharedEvent::new("e", "1".into()));
        let mut q = queue(vec![
            message(1, 1),
            message(2, 1),
            message(3, 1),
            event,
            message(4, 1),
        ]);
        let first = q.recv().unwrap();
        assert_eq!(batch(q.gather(first, true)), [1, 2, 3]);
        let next = q.recv().unwrap();
        assert!(matches!(q.gather(next, true), Work::Events(e) if e.len() == 1));
        let last = q.recv().unwrap();
        assert_eq!(
            batch(q.gather(last, true)),
            [4],
            "a lone message goes at once"
        );
        assert_eq!(q.depth.jobs.load(Ordering::Relaxed), 0);
        assert_eq!(q.depth.bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_batch_is_bounded_in_count_and_bytes() {
        let mut q = queue((0..CALL_BATCH + 5).map(|n| message(n, 1)).collect());
        let first = q.recv().unwrap();
        assert_eq!(batch(q.gather(first, true)).len(), CALL_BATCH);
        let rest = q.recv().unwrap();
        assert_eq!(batch(q.gather(rest, true)).len(), 5);

        let half = CALL_BATCH_BYTES / 2;
        let mut q = queue(vec![
            message(1, half),
            message(2, half - 100),
            message(3, 200),
        ]);
        let first = q.recv().unwrap();
        assert_eq!(
            batch(q.gather(first, true)),
            [1, 2],
            "the third would pass the byte bound"
        );
        let big = q.recv().unwrap();
        assert_eq!(batch(q.gather(big, true)), [3]);

        // A message larger than the bound goes alone.
        let mut q = queue(vec![message(1, CALL_BATCH_BYTES * 2), message(2, 1)]);
        let first = q.recv().unwrap();
        assert_eq!(batch(q.gather(first, true)), [1]);
    }

    #[test]
    fn plugins_without_batches_get_one_job_at_a_time() {
        let mut q = queue(vec![message(1, 1), message(2, 1)]);
        let first = q.recv().unwrap();
        assert!(matches!(q.gather(first, false), Work::One(Job::Message(_))));
        let next = q.recv().unwrap();
        assert!(
            matches!(q.gather(next, false), Work::One(Job::Message(m)) if m.target.connection == 2)
        );
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(9), Duration::from_millis(25_600));
        assert_eq!(backoff(50), Duration::from_secs(30));
    }
}
