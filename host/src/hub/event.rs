//! An event on its way to many recipients: serialised once, framed once per
//! protocol (lazily), shared by every recipient's queue.

use std::sync::{Arc, OnceLock};

use crate::protocol::{misskey, socketio};

/// One event delivered to a room.
#[derive(Debug)]
pub struct SharedEvent {
    /// The event name (Misskey `type`, Socket.IO event name).
    pub event: Arc<str>,
    /// The data as JSON text (with Socket.IO placeholders when there are
    /// attachments).
    pub data: Arc<str>,
    /// Binary attachments (Socket.IO only; Misskey members get the JSON).
    pub attachments: Arc<[Vec<u8>]>,
    misskey_tail: OnceLock<String>,
    socketio_args: OnceLock<String>,
}

impl SharedEvent {
    pub fn new(event: &str, data: Arc<str>) -> Arc<Self> {
        Self::with_attachments(event, data, Arc::from(Vec::new()))
    }

    pub fn with_attachments(event: &str, data: Arc<str>, attachments: Arc<[Vec<u8>]>) -> Arc<Self> {
        Arc::new(Self {
            event: event.into(),
            data,
            attachments,
            misskey_tail: OnceLock::new(),
            socketio_args: OnceLock::new(),
        })
    }

    /// The recipient-independent end of a Misskey event frame, built on
    /// first use and shared by every recipient.
    pub fn misskey_tail(&self) -> &str {
        self.misskey_tail
            .get_or_init(|| misskey::encode_event_tail(&self.event, &self.data))
    }

    /// The Socket.IO argument array `["<event>",<data>]`, built on first use.
    pub fn socketio_args(&self) -> &str {
        self.socketio_args
            .get_or_init(|| socketio::event_args(&self.event, &self.data))
    }
}
