//! Brokers carry every publish (API and plugin broadcasts) to every node
//! that has members or listeners of the room. Each node subscribes with a
//! [`LocalDelivery`] and delivers to its own members.
//!
//! [`MemoryBroker`] is the single-node default: a publish is delivered to
//! this node directly. A Redis pub/sub broker fits the same trait.

use std::sync::{Arc, OnceLock, Weak};

use crate::hub::Filter;

/// One event on its way to a room.
#[derive(Debug, Clone)]
pub struct Publication {
    pub room: Arc<str>,
    pub event: Arc<str>,
    /// JSON text.
    pub data: Arc<str>,
    /// Binary attachments (Socket.IO placeholders in `data` refer to them).
    pub attachments: Arc<[Vec<u8>]>,
    /// Which members receive it.
    pub filter: Filter,
}

/// Why a publish could not be carried.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker is not attached to a node")]
    Detached,
}

/// Delivers publications to this node's members and listeners.
pub trait LocalDelivery: Send + Sync {
    fn deliver_local(&self, p: &Publication);
}

/// Carries publications between nodes.
pub trait Broker: Send + Sync {
    /// Attaches this node's delivery; called once at start.
    fn attach(&self, local: Weak<dyn LocalDelivery>);
    /// Publishes to every node (this one included).
    fn publish(&self, p: Publication) -> Result<(), BrokerError>;
}

/// The in-process broker of a single node.
#[derive(Default)]
pub struct MemoryBroker {
    local: OnceLock<Weak<dyn LocalDelivery>>,
}

impl Broker for MemoryBroker {
    fn attach(&self, local: Weak<dyn LocalDelivery>) {
        let _ = self.local.set(local);
    }

    fn publish(&self, p: Publication) -> Result<(), BrokerError> {
        let local = self
            .local
            .get()
            .and_then(|w| w.upgrade())
            .ok_or(BrokerError::Detached)?;
        local.deliver_local(&p);
        Ok(())
    }
}
