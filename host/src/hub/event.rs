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
    /// Bytes one recipient's frame takes, about: reckoned once, read per
    /// queued recipient.
    weight: usize,
    misskey_tail: OnceLock<String>,
    socketio_args: OnceLock<String>,
}

impl SharedEvent {
    pub fn new(event: &str, data: Arc<str>) -> Arc<Self> {
        Self::with_attachments(event, data, Arc::from(Vec::new()))
    }

    pub fn with_attachments(event: &str, data: Arc<str>, attachments: Arc<[Vec<u8>]>) -> Arc<Self> {
        let weight =
            16 + event.len() + data.len() + attachments.iter().map(Vec::len).sum::<usize>();
        Arc::new(Self {
            event: event.into(),
            data,
            attachments,
            weight,
            misskey_tail: OnceLock::new(),
            socketio_args: OnceLock::new(),
        })
    }

    /// An event with several arguments (`args_json`, a JSON array):
    /// Socket.IO spreads them; Misskey gets the single argument, or the
    /// array when there are several or none. None if `args_json` is not an array.
    pub fn spread(event: &str, args_json: &str, attachments: Arc<[Vec<u8>]>) -> Option<Arc<Self>> {
        let serde_json::Value::Array(mut args) = serde_json::from_str(args_json).ok()? else {
            return None;
        };
        let data: Arc<str> = if args.len() == 1 {
            args[0].to_string().into()
        } else {
            args_json.into()
        };
        args.insert(0, serde_json::Value::String(event.to_owned()));
        let ev = Self::with_attachments(event, data, attachments);
        let _ = ev
            .socketio_args
            .set(serde_json::Value::Array(args).to_string());
        Some(ev)
    }

    /// About how many bytes one recipient's frame of this event takes.
    pub fn weight(&self) -> usize {
        self.weight
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
