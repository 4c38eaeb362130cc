//! The batches the host gives a busy plugin (`messages`, `events`), read in
//! place: every id, event name and JSON text of a batch is in one buffer,
//! and [`Message`] / [`Event`] borrow from it, so reading a batch copies
//! nothing (`serde_json::from_str` on [`Message::data`] borrows from it
//! too).

use crate::packing::{self, PackedEvent, PackedMessage, Reader};
use crate::types::{EventBatch, Instance, MessageBatch, Payload};

/// Clients' messages, in the order they came.
pub struct Messages(pub(crate) MessageBatch);

impl Messages {
    /// How many messages the batch holds.
    pub fn len(&self) -> usize {
        packing::message_count(&self.0.words)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The messages, in order, borrowed from the batch.
    pub fn iter(&self) -> impl Iterator<Item = Message<'_>> {
        // The text is checked once for the batch.
        let mut reader = Reader::new(&self.0.text, &self.0.words);
        let mut attachments = self.0.attachments.as_slice();
        std::iter::from_fn(move || {
            let m = PackedMessage::read(reader.as_mut()?)?;
            let (mine, rest) = attachments.split_at(m.attachments.min(attachments.len()));
            attachments = rest;
            Some(Message {
                connection: m.connection,
                id: m.id,
                event: m.event,
                data: m.data,
                attachments: mine,
                ack_id: m.ack_id,
            })
        })
    }
}

/// One client's message, borrowed from its batch.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// The connection of the instance it was sent on.
    pub connection: u64,
    /// The instance's id (Misskey: the client's id; Socket.IO: the
    /// namespace).
    pub id: &'a str,
    /// The event (Misskey: the `type` of a channel message).
    pub event: &'a str,
    /// JSON text: Misskey, the body; Socket.IO, the array of arguments.
    pub data: &'a str,
    /// Binary attachments (Socket.IO).
    pub attachments: &'a [Vec<u8>],
    /// Set when the client waits for an acknowledgement (Socket.IO).
    pub ack_id: Option<u64>,
}

impl Message<'_> {
    /// The instance it was sent on, as an owned value.
    pub fn target(&self) -> Instance {
        crate::instance(self.connection, self.id)
    }

    /// Its data and attachments, as an owned payload.
    pub fn payload(&self) -> Payload {
        Payload {
            json: self.data.to_owned(),
            attachments: self.attachments.to_vec(),
        }
    }
}

/// Room events, in the order they came.
pub struct Events(pub(crate) EventBatch);

impl Events {
    /// How many events the batch holds.
    pub fn len(&self) -> usize {
        packing::event_count(&self.0.words)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The events, in order, borrowed from the batch.
    pub fn iter(&self) -> impl Iterator<Item = Event<'_>> {
        let mut reader = Reader::new(&self.0.text, &self.0.words);
        std::iter::from_fn(move || {
            let e = PackedEvent::read(reader.as_mut()?)?;
            Some(Event {
                room: e.room,
                event: e.event,
                data: e.data,
            })
        })
    }
}

/// One room event, borrowed from its batch.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    /// The room it was published to.
    pub room: &'a str,
    pub event: &'a str,
    /// JSON text.
    pub data: &'a str,
}
