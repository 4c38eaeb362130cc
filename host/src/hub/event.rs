//! An event on its way to many recipients: serialised once, framed once per
//! protocol (lazily), shared by every recipient's queue.

use std::sync::{Arc, OnceLock};

use crate::protocol::misskey;

/// One event delivered to a room.
#[derive(Debug)]
pub struct SharedEvent {
    /// The event name (Misskey `type`, Socket.IO event name).
    pub event: Arc<str>,
    /// The data as JSON text.
    pub data: Arc<str>,
    misskey_tail: OnceLock<String>,
}

impl SharedEvent {
    pub fn new(event: &str, data: Arc<str>) -> Arc<Self> {
        Arc::new(Self {
            event: event.into(),
            data,
            misskey_tail: OnceLock::new(),
        })
    }

    /// The recipient-independent end of a Misskey event frame, built on
    /// first use and shared by every recipient.
    pub fn misskey_tail(&self) -> &str {
        self.misskey_tail
            .get_or_init(|| misskey::encode_event_tail(&self.event, &self.data))
    }
}
