//! An event on its way to many recipients: serialised once, framed once per
//! wire protocol (lazily, by that protocol's writer), shared by every
//! recipient's queue. The hub stores the framings; it does not know them.

use std::sync::{Arc, OnceLock};

use super::Protocol;

/// One event delivered to a room.
#[derive(Debug)]
pub struct SharedEvent {
    /// The event name (Misskey `type`, Socket.IO event name).
    pub event: Arc<str>,
    /// The data as JSON text (with Socket.IO placeholders when there are
    /// attachments).
    pub data: Arc<str>,
    /// The arguments as a JSON array, when the event was emitted with
    /// several (`data` is then the single argument, or this array).
    pub args: Option<Arc<str>>,
    /// Binary attachments (Socket.IO only; Misskey members get the JSON).
    pub attachments: Arc<[Vec<u8>]>,
    /// Bytes one recipient's frame takes, about: reckoned once, read per
    /// queued recipient.
    weight: usize,
    /// Its place in the history of recorded rooms (connection state
    /// recovery): Socket.IO sockets that recover get it as the last
    /// argument.
    pub offset: Option<u64>,
    /// Each protocol's framing, built by its writer on first use (the
    /// third: Socket.IO with the offset).
    framed: [OnceLock<String>; 3],
}

impl SharedEvent {
    pub fn new(event: &str, data: Arc<str>) -> Arc<Self> {
        Self::with_attachments(event, data, Arc::from(Vec::new()))
    }

    pub fn with_attachments(event: &str, data: Arc<str>, attachments: Arc<[Vec<u8>]>) -> Arc<Self> {
        Self::build(event, data, None, attachments, None)
    }

    /// An event with its offset in the history of recorded rooms (and
    /// its arguments, when emitted with several).
    pub fn numbered(
        event: &str,
        data: Arc<str>,
        args: Option<Arc<str>>,
        attachments: Arc<[Vec<u8>]>,
        offset: Option<u64>,
    ) -> Arc<Self> {
        Self::build(event, data, args, attachments, offset)
    }

    fn build(
        event: &str,
        data: Arc<str>,
        args: Option<Arc<str>>,
        attachments: Arc<[Vec<u8>]>,
        offset: Option<u64>,
    ) -> Arc<Self> {
        let weight =
            16 + event.len() + data.len() + attachments.iter().map(Vec::len).sum::<usize>();
        Arc::new(Self {
            event: event.into(),
            data,
            args,
            attachments,
            weight,
            offset,
            framed: [OnceLock::new(), OnceLock::new(), OnceLock::new()],
        })
    }

    /// An event with several arguments (`args_json`, a JSON array): its
    /// data is the single argument, or the array when there are several or
    /// none. None if `args_json` is not an array.
    pub fn spread(event: &str, args_json: &str, attachments: Arc<[Vec<u8>]>) -> Option<Arc<Self>> {
        let serde_json::Value::Array(args) = serde_json::from_str(args_json).ok()? else {
            return None;
        };
        let data: Arc<str> = if args.len() == 1 {
            args[0].to_string().into()
        } else {
            args_json.into()
        };
        Some(Self::build(
            event,
            data,
            Some(args_json.into()),
            attachments,
            None,
        ))
    }

    /// About how many bytes one recipient's frame of this event takes.
    pub fn weight(&self) -> usize {
        self.weight
    }

    /// The recipient-independent part of this event's frame in a
    /// protocol, built by `build` on first use and shared by every
    /// recipient.
    pub fn framed(&self, protocol: Protocol, build: impl FnOnce(&SharedEvent) -> String) -> &str {
        self.framed[protocol as usize].get_or_init(|| build(self))
    }

    /// Like [`SharedEvent::framed`], for the Socket.IO framing that ends
    /// with the offset (recovered sockets).
    pub fn framed_with_offset(&self, build: impl FnOnce(&SharedEvent) -> String) -> &str {
        self.framed[2].get_or_init(|| build(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_protocol_frames_once() {
        let ev = SharedEvent::new("e", "1".into());
        let mut calls = 0;
        for _ in 0..3 {
            ev.framed(Protocol::Misskey, |e| {
                calls += 1;
                format!("{}:{}", e.event, e.data)
            });
        }
        assert_eq!(calls, 1);
        assert_eq!(ev.framed(Protocol::SocketIo, |_| "s".into()), "s");
        assert_eq!(ev.framed(Protocol::Misskey, |_| unreachable!()), "e:1");
    }

    #[test]
    fn spread_keeps_the_arguments() {
        let one = SharedEvent::spread("e", "[{\"a\":1}]", Arc::from(Vec::new())).unwrap();
        assert_eq!(&*one.data, "{\"a\":1}");
        let two = SharedEvent::spread("e", "[1,2]", Arc::from(Vec::new())).unwrap();
        assert_eq!((&*two.data, two.args.as_deref()), ("[1,2]", Some("[1,2]")));
        assert!(SharedEvent::spread("e", "{}", Arc::from(Vec::new())).is_none());
    }
}
