//! Brokers carry every publish (API and plugin broadcasts outside `event`)
//! to every node that has members or listeners of the room. Each node
//! attaches its [`LocalDelivery`] and delivers to its own members.
//!
//! Two sides of one trait, one file each: [`MemoryBroker`] (one node, the
//! default) delivers on this node directly; [`RedisBroker`] (`[cluster]`)
//! delivers here at once and carries the event through Redis pub/sub to
//! the other nodes interested in the room (see its module for the layout).

use std::sync::{Arc, Weak};

use futures_util::future::BoxFuture;

use crate::hub::Filter;

mod memory;
pub mod redis;

pub use self::memory::MemoryBroker;
pub use self::redis::{RedisBroker, RedisBrokerOptions};

/// One event on its way to a room.
#[derive(Debug, Clone)]
pub struct Publication {
    pub room: Arc<str>,
    pub event: Arc<str>,
    /// JSON text.
    pub data: Arc<str>,
    /// The arguments as a JSON array, for an event emitted with several
    /// (a plugin's `emit` to a recorded socket); `data` is then the first.
    pub args: Option<Arc<str>>,
    /// Binary attachments (Socket.IO placeholders in `data` refer to them).
    pub attachments: Arc<[Vec<u8>]>,
    /// Which members receive it.
    pub filter: Filter,
    /// Its offset in the history of recorded rooms (connection state
    /// recovery), once numbered.
    pub offset: Option<u64>,
}

/// Why a publish was not carried (and, for [`Broker::publish`], not
/// delivered anywhere either).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    #[error("broker is not attached to a node")]
    Detached,
    #[error("the cluster's Redis cannot be reached: nothing was published; try again")]
    Down,
    #[error("the queue to the cluster's Redis is full: nothing was published; try again")]
    Full,
    /// Accepted, delivered on this node, then Redis failed before it took
    /// the publications: the other nodes did not get them.
    #[error("the cluster's Redis failed while taking it: delivered on this node; the other nodes may not have it")]
    Interrupted,
}

impl BrokerError {
    /// The HTTP status an API answer carries for it.
    pub fn status(&self) -> http::StatusCode {
        match self {
            BrokerError::Detached => http::StatusCode::INTERNAL_SERVER_ERROR,
            BrokerError::Down | BrokerError::Full => http::StatusCode::SERVICE_UNAVAILABLE,
            // Not "try again": this node's members got it already.
            BrokerError::Interrupted => http::StatusCode::BAD_GATEWAY,
        }
    }
}

/// Whether publishes travel between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerState {
    /// One node: nothing to carry.
    Off,
    /// Connected to the cluster's Redis.
    Up,
    /// The cluster's Redis cannot be reached (retrying).
    Down,
}

impl BrokerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerState::Off => "off",
            BrokerState::Up => "up",
            BrokerState::Down => "down",
        }
    }
}

/// A live node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    /// Its last heartbeat (ms since the epoch).
    pub heartbeat_at: u64,
    /// Its client connections at that heartbeat (None if it did not say).
    pub connections: Option<u64>,
}

/// This node, as a broker sees it.
pub trait LocalDelivery: Send + Sync {
    /// Client connections open on this node (told to the other nodes with
    /// each heartbeat).
    fn connections(&self) -> u64 {
        0
    }
    /// Delivers to this node's members and listeners of the room.
    fn deliver_local(&self, p: &Publication);
    /// Whether the room has members or listeners on this node.
    fn has_audience(&self, room: &str) -> bool;
    /// This node's answer to another node's [`Broker::ask_all`].
    fn answer(&self, _ask: &serde_json::Value) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// Resolves once a published batch is in the cluster's Redis, or with
/// [`BrokerError::Interrupted`] when Redis failed before it took it.
pub type Carried = BoxFuture<'static, Result<(), BrokerError>>;

/// Carries publications between nodes.
pub trait Broker: Send + Sync {
    /// Attaches this node's delivery; called once at start.
    fn attach(&self, local: Weak<dyn LocalDelivery>);
    /// Delivers every publication here and carries them to the other
    /// nodes, in order — all of them, or, when they cannot be carried
    /// now, none of them anywhere (so the publisher may retry without
    /// duplicates). The [`Carried`] it hands back resolves once the
    /// cluster's Redis took them all (at once for one node): a publisher
    /// that waits for it knows they survive this node's death.
    fn publish(&self, batch: Vec<Publication>) -> Result<Carried, BrokerError>;
    /// Delivers here at once and carries it if it can; what cannot be
    /// carried is counted and logged (a plugin's broadcast reaches this
    /// node's members whatever happens to Redis).
    fn publish_best_effort(&self, p: Publication);
    /// A room may have gained its first or lost its last member or
    /// listener on this node.
    fn interest_changed(&self, _room: &str) {}
    /// Resolves once this node's subscriptions for the rooms its members
    /// joined so far are in place (at once for one node; at most a second
    /// in a cluster), so what is published from then on reaches them.
    fn settled(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    fn state(&self) -> BrokerState;
    /// Nodes alive in the cluster (1 for a single node).
    fn nodes(&self) -> u64 {
        1
    }
    /// This node's id in the cluster (none for a single node).
    fn node_id(&self) -> Option<&str> {
        None
    }
    /// The cluster's live nodes as the last heartbeat read them (none for
    /// a single node).
    fn node_list(&self) -> Vec<NodeInfo> {
        Vec::new()
    }
    /// Asks every other node of the cluster (`ask` is a JSON value the
    /// nodes' [`LocalDelivery::answer`] reads) and gathers their answers,
    /// waiting at most a second; none for one node. Refused when the
    /// cluster cannot be reached.
    fn ask_all(
        &self,
        _ask: serde_json::Value,
    ) -> BoxFuture<'_, Result<Vec<serde_json::Value>, BrokerError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    /// A number no other node of the cluster was given (from Redis), for
    /// connection ids unique across the cluster; none for one node (or
    /// when Redis cannot be reached).
    fn node_number(&self) -> BoxFuture<'_, Option<u64>> {
        Box::pin(async { None })
    }
    /// Takes this node out of the cluster (on shutdown).
    fn leave(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
