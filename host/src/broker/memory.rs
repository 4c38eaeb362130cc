//! The in-process broker of a single node: a publish is delivered here.

use std::sync::{OnceLock, Weak};

use super::{Broker, BrokerError, BrokerState, Carried, LocalDelivery, Publication};

/// The broker of a node without `[cluster]`.
#[derive(Default)]
pub struct MemoryBroker {
    local: OnceLock<Weak<dyn LocalDelivery>>,
}

impl Broker for MemoryBroker {
    fn attach(&self, local: Weak<dyn LocalDelivery>) {
        let _ = self.local.set(local);
    }

    fn publish(&self, batch: Vec<Publication>) -> Result<Carried, BrokerError> {
        let local = self
            .local
            .get()
            .and_then(|w| w.upgrade())
            .ok_or(BrokerError::Detached)?;
        for p in &batch {
            local.deliver_local(p);
        }
        Ok(Box::pin(std::future::ready(Ok(()))))
    }

    fn publish_best_effort(&self, p: Publication) {
        if let Some(local) = self.local.get().and_then(|w| w.upgrade()) {
            local.deliver_local(&p);
        }
    }

    fn state(&self) -> BrokerState {
        BrokerState::Off
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parking_lot::Mutex;

    use super::*;

    #[derive(Default)]
    struct Seen(Mutex<Vec<String>>);

    impl LocalDelivery for Seen {
        fn deliver_local(&self, p: &Publication) {
            self.0.lock().push(p.event.to_string());
        }
        fn has_audience(&self, _room: &str) -> bool {
            true
        }
    }

    fn p(event: &str) -> Publication {
        Publication {
            room: "r".into(),
            event: event.into(),
            data: "null".into(),
            attachments: Arc::from(Vec::new()),
            filter: Default::default(),
            args: None,
            offset: None,
        }
    }

    #[test]
    fn delivers_here_in_order_and_refuses_when_detached() {
        let b = MemoryBroker::default();
        assert!(matches!(
            b.publish(vec![p("a")]),
            Err(BrokerError::Detached)
        ));
        let seen = Arc::new(Seen::default());
        let local: Arc<dyn LocalDelivery> = seen.clone();
        b.attach(Arc::downgrade(&local));
        // Carried as soon as it is delivered: there is no other node.
        let carried = b.publish(vec![p("a"), p("b")]).unwrap();
        assert_eq!(futures_util::FutureExt::now_or_never(carried), Some(Ok(())));
        b.publish_best_effort(p("c"));
        assert_eq!(*seen.0.lock(), ["a", "b", "c"]);
        assert_eq!(b.state(), BrokerState::Off);
    }
}
