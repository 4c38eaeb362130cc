//! Misskey's own event bus, read from Redis (`[misskey.bus]`): every
//! message Misskey's `GlobalEventService` publishes on its channel (the
//! instance's `config.host`) is delivered to this node's members as
//! `/api/publish` delivers the bus shape ([`crate::protocol::misskey::bus`]).
//! Each node reads the bus itself and delivers locally only, so with
//! several nodes every client gets every event once and each plugin's
//! `event` hook runs once per event per node.
//!
//! The subscription survives Redis outages ([`crate::pubsub`]); events
//! published while it is down are gone (pub/sub has no history). Figures:
//! `chanhost_misskey_bus_up`, `chanhost_misskey_bus_messages_total{result}`;
//! a malformed message is counted and logged at most every 10 s. The
//! `internal` events that change who a token belongs to (token
//! regenerated, user suspended, deleted or updated) also drop the host's
//! cached answers for that user.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::MisskeyBusConfig;
use crate::hub::Filter;
use crate::node::Node;
use crate::protocol::misskey::bus;
use crate::pubsub::{self, Subscriber, Subscription, UrlError};

/// Logs of malformed messages at most this often.
const MALFORMED_LOG_EVERY: Duration = Duration::from_secs(10);

struct BusReader {
    node: Weak<Node>,
    /// Malformed messages not yet logged, and when the last log was.
    unlogged: AtomicU64,
    last_log: Mutex<Option<Instant>>,
}

impl BusReader {
    fn malformed(&self, node: &Node, e: &bus::BusError) {
        node.metrics().misskey_bus_malformed.inc();
        let n = self.unlogged.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_log.lock();
        if last.is_some_and(|t| t.elapsed() < MALFORMED_LOG_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        self.unlogged.store(0, Ordering::Relaxed);
        tracing::warn!(
            malformed = n,
            "misskey bus: message ignored: {e} (malformed messages are counted in chanhost_misskey_bus_messages_total{{result=\"malformed\"}})"
        );
    }
}

impl Subscriber for BusReader {
    fn message(&self, _channel: &str, payload: &[u8]) {
        let Some(node) = self.node.upgrade() else {
            return;
        };
        match bus::parse(payload) {
            Ok(ev) => {
                node.metrics().misskey_bus_delivered.inc();
                if ev.room == "internal" {
                    on_internal(&node, &ev.event, ev.data);
                }
                let filter = Filter {
                    audience: ev
                        .audience
                        .as_ref()
                        .map(|v| Arc::new(super::note_audience(v))),
                    ..Filter::default()
                };
                node.deliver_local_filtered(&ev.room, &ev.event, ev.data.into(), filter);
            }
            Err(e) => self.malformed(&node, &e),
        }
    }

    fn up(&self, up: bool) {
        if let Some(node) = self.node.upgrade() {
            node.metrics().misskey_bus_up.set(u64::from(up));
        }
    }
}

/// Misskey's `internal` events about a user the host itself acts on: its
/// cached token answers go (Misskey's `CacheService` drops its own on the
/// same events), so the next stream of that user is checked again — a
/// suspended user's is refused with 403, a regenerated token's old value
/// with 401. Open streams stay, as in Misskey.
fn on_internal(node: &Node, event: &str, data: &str) {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct About {
        id: Option<String>,
        old_token: Option<String>,
    }
    let relevant = matches!(
        event,
        "userTokenRegenerated"
            | "userChangeSuspendedState"
            | "userChangeDeletedState"
            | "localUserUpdated"
    );
    if !relevant {
        return;
    }
    let Ok(About {
        id: Some(user),
        old_token,
    }) = serde_json::from_str::<About>(data)
    else {
        return;
    };
    let dropped = node.auth().forget(&user, old_token.as_deref());
    tracing::debug!(user, event, dropped, "cached token answers dropped");
}

/// Starts reading the bus for a node.
pub fn spawn(node: &Arc<Node>, config: &MisskeyBusConfig) -> Result<(), UrlError> {
    let reader = Arc::new(BusReader {
        node: Arc::downgrade(node),
        unlogged: AtomicU64::new(0),
        last_log: Mutex::new(None),
    });
    pubsub::spawn(
        Subscription {
            url: config.redis.clone(),
            channels: vec![config.channel.clone()],
            patterns: Vec::new(),
            what: "misskey bus",
            ca: config.ca.clone(),
        },
        reader,
        node.shutdown().clone(),
    )
}
