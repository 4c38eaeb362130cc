//! The layouts of packed batches (WIT `message-batch`, `event-batch`,
//! `effect-batch`): UTF-8 text in one buffer, and 32-bit words that name
//! its parts by start and length. Plain Rust with no WIT types, compiled
//! by the SDK and by the host (which includes this file), so both sides
//! read and write one definition.
//!
//! Reading never trusts the other side: a word or a range missing makes
//! the reader return `None`, never panic.

/// Words per message in a `message-batch`.
pub const MESSAGE_WORDS: usize = 12;
/// Words per event in an `event-batch`.
pub const EVENT_WORDS: usize = 6;

/// How many messages the words of a `message-batch` name.
pub fn message_count(words: &[u32]) -> usize {
    words.len() / MESSAGE_WORDS
}

/// How many events the words of an `event-batch` name.
pub fn event_count(words: &[u32]) -> usize {
    words.len() / EVENT_WORDS
}

/// The words of messages `range` of a `message-batch`.
pub fn message_words(range: core::ops::Range<usize>) -> core::ops::Range<usize> {
    range.start * MESSAGE_WORDS..range.end * MESSAGE_WORDS
}

/// The words of events `range` of an `event-batch`.
pub fn event_words(range: core::ops::Range<usize>) -> core::ops::Range<usize> {
    range.start * EVENT_WORDS..range.end * EVENT_WORDS
}

/// How many of a `message-batch`'s attachments message `i` has (0 when
/// `words` holds no such message).
pub fn attachments_of(words: &[u32], i: usize) -> usize {
    words.get(i * MESSAGE_WORDS + 8).map_or(0, |&n| n as usize)
}

/// Effect kinds, as the first word of each effect.
pub const SEND: u32 = 0;
pub const EMIT: u32 = 1;
pub const ACK: u32 = 2;
pub const BROADCAST: u32 = 3;
pub const JOIN: u32 = 4;
pub const LEAVE: u32 = 5;

/// A batch being written: its text and its words.
#[derive(Debug, Default, Clone)]
pub struct Packer {
    pub text: Vec<u8>,
    pub words: Vec<u32>,
}

impl Packer {
    /// A packer with room for `text` bytes and `words` words.
    pub fn with_capacity(text: usize, words: usize) -> Self {
        Self {
            text: Vec::with_capacity(text),
            words: Vec::with_capacity(words),
        }
    }

    pub fn word(&mut self, w: u32) {
        self.words.push(w);
    }

    pub fn u64(&mut self, v: u64) {
        self.words.push(v as u32);
        self.words.push((v >> 32) as u32);
    }

    /// Appends `s` to the text; its start and length as two words.
    pub fn text(&mut self, s: &str) {
        self.words.push(self.text.len() as u32);
        self.words.push(s.len() as u32);
        self.text.extend_from_slice(s.as_bytes());
    }

    pub fn instance(&mut self, connection: u64, id: &str) {
        self.u64(connection);
        self.text(id);
    }

    pub fn clear(&mut self) {
        self.text.clear();
        self.words.clear();
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }
}

/// Reads a batch's words in order, its texts borrowed from its text.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    text: &'a str,
    words: &'a [u32],
    at: usize,
}

impl<'a> Reader<'a> {
    /// None when the text is not UTF-8.
    pub fn new(text: &'a [u8], words: &'a [u32]) -> Option<Self> {
        Some(Self {
            text: std::str::from_utf8(text).ok()?,
            words,
            at: 0,
        })
    }

    /// Whether every word was read.
    pub fn done(&self) -> bool {
        self.at >= self.words.len()
    }

    pub fn word(&mut self) -> Option<u32> {
        let w = *self.words.get(self.at)?;
        self.at += 1;
        Some(w)
    }

    pub fn u64(&mut self) -> Option<u64> {
        let low = self.word()?;
        let high = self.word()?;
        Some(u64::from(low) | u64::from(high) << 32)
    }

    pub fn flag(&mut self) -> Option<bool> {
        self.word().map(|w| w != 0)
    }

    pub fn text(&mut self) -> Option<&'a str> {
        let start = self.word()? as usize;
        let len = self.word()? as usize;
        self.text.get(start..start.checked_add(len)?)
    }

    pub fn instance(&mut self) -> Option<(u64, &'a str)> {
        Some((self.u64()?, self.text()?))
    }
}

/// One message of a `message-batch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedMessage<'a> {
    pub connection: u64,
    pub id: &'a str,
    pub event: &'a str,
    pub data: &'a str,
    /// How many of the batch's attachments are this message's (in order).
    pub attachments: usize,
    pub ack_id: Option<u64>,
}

impl PackedMessage<'_> {
    pub fn write(&self, p: &mut Packer) {
        p.instance(self.connection, self.id);
        p.text(self.event);
        p.text(self.data);
        p.word(self.attachments as u32);
        p.word(u32::from(self.ack_id.is_some()));
        p.u64(self.ack_id.unwrap_or(0));
    }
}

impl<'a> PackedMessage<'a> {
    pub fn read(r: &mut Reader<'a>) -> Option<Self> {
        let (connection, id) = r.instance()?;
        let (event, data) = (r.text()?, r.text()?);
        let attachments = r.word()? as usize;
        let acked = r.flag()?;
        let ack_id = r.u64()?;
        Some(Self {
            connection,
            id,
            event,
            data,
            attachments,
            ack_id: acked.then_some(ack_id),
        })
    }
}

/// One event of an `event-batch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedEvent<'a> {
    pub room: &'a str,
    pub event: &'a str,
    pub data: &'a str,
}

impl PackedEvent<'_> {
    pub fn write(&self, p: &mut Packer) {
        p.text(self.room);
        p.text(self.event);
        p.text(self.data);
    }
}

impl<'a> PackedEvent<'a> {
    pub fn read(r: &mut Reader<'a>) -> Option<Self> {
        Some(Self {
            room: r.text()?,
            event: r.text()?,
            data: r.text()?,
        })
    }
}

/// A condition of a packed broadcast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedCondition<'a> {
    pub attribute: &'a str,
    pub exclude: bool,
    pub keys: Vec<&'a str>,
}

/// One effect of an `effect-batch`. `attachments` counts the batch's
/// attachments that are the effect's (in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackedEffect<'a> {
    Send {
        target: (u64, &'a str),
        event: &'a str,
        data: &'a str,
        attachments: usize,
    },
    Emit {
        target: (u64, &'a str),
        event: &'a str,
        data: &'a str,
        attachments: usize,
    },
    Ack {
        target: (u64, &'a str),
        ack_id: u64,
        data: &'a str,
        attachments: usize,
    },
    Broadcast {
        room: &'a str,
        event: &'a str,
        data: &'a str,
        attachments: usize,
        except: Option<(u64, &'a str)>,
        conditions: Vec<PackedCondition<'a>>,
    },
    Join {
        target: (u64, &'a str),
        room: &'a str,
    },
    Leave {
        target: (u64, &'a str),
        room: &'a str,
    },
}

/// Writes a broadcast without building a [`PackedEffect`]: `conditions`
/// as (attribute, exclude, keys).
pub fn write_broadcast<'c, K: AsRef<str> + 'c>(
    p: &mut Packer,
    (room, event, data, attachments): (&str, &str, &str, usize),
    except: Option<(u64, &str)>,
    conditions: impl ExactSizeIterator<Item = (&'c str, bool, &'c [K])>,
) {
    p.word(BROADCAST);
    p.text(room);
    p.text(event);
    p.text(data);
    p.word(attachments as u32);
    match except {
        Some((connection, id)) => {
            p.word(1);
            p.instance(connection, id);
        }
        None => p.word(0),
    }
    p.word(conditions.len() as u32);
    for (attribute, exclude, keys) in conditions {
        p.text(attribute);
        p.word(u32::from(exclude));
        p.word(keys.len() as u32);
        for k in keys {
            p.text(k.as_ref());
        }
    }
}

impl PackedEffect<'_> {
    pub fn write(&self, p: &mut Packer) {
        match self {
            PackedEffect::Send {
                target,
                event,
                data,
                attachments,
            }
            | PackedEffect::Emit {
                target,
                event,
                data,
                attachments,
            } => {
                p.word(match self {
                    PackedEffect::Send { .. } => SEND,
                    _ => EMIT,
                });
                p.instance(target.0, target.1);
                p.text(event);
                p.text(data);
                p.word(*attachments as u32);
            }
            PackedEffect::Ack {
                target,
                ack_id,
                data,
                attachments,
            } => {
                p.word(ACK);
                p.instance(target.0, target.1);
                p.u64(*ack_id);
                p.text(data);
                p.word(*attachments as u32);
            }
            PackedEffect::Broadcast {
                room,
                event,
                data,
                attachments,
                except,
                conditions,
            } => write_broadcast(
                p,
                (room, event, data, *attachments),
                *except,
                conditions
                    .iter()
                    .map(|c| (c.attribute, c.exclude, c.keys.as_slice())),
            ),
            PackedEffect::Join { target, room } | PackedEffect::Leave { target, room } => {
                p.word(match self {
                    PackedEffect::Join { .. } => JOIN,
                    _ => LEAVE,
                });
                p.instance(target.0, target.1);
                p.text(room);
            }
        }
    }
}

impl<'a> PackedEffect<'a> {
    /// The next effect; None at the end or where the words are malformed
    /// (the rest of the batch cannot be read then).
    pub fn read(r: &mut Reader<'a>) -> Option<Self> {
        Some(match r.word()? {
            kind @ (SEND | EMIT) => {
                let (target, event, data) = (r.instance()?, r.text()?, r.text()?);
                let attachments = r.word()? as usize;
                match kind {
                    SEND => PackedEffect::Send {
                        target,
                        event,
                        data,
                        attachments,
                    },
                    _ => PackedEffect::Emit {
                        target,
                        event,
                        data,
                        attachments,
                    },
                }
            }
            ACK => PackedEffect::Ack {
                target: r.instance()?,
                ack_id: r.u64()?,
                data: r.text()?,
                attachments: r.word()? as usize,
            },
            BROADCAST => {
                let (room, event, data) = (r.text()?, r.text()?, r.text()?);
                let attachments = r.word()? as usize;
                let except = match r.flag()? {
                    true => Some(r.instance()?),
                    false => None,
                };
                let n = r.word()? as usize;
                let mut conditions = Vec::new();
                for _ in 0..n {
                    let attribute = r.text()?;
                    let exclude = r.flag()?;
                    let k = r.word()? as usize;
                    let keys = (0..k).map(|_| r.text()).collect::<Option<Vec<_>>>()?;
                    conditions.push(PackedCondition {
                        attribute,
                        exclude,
                        keys,
                    });
                }
                PackedEffect::Broadcast {
                    room,
                    event,
                    data,
                    attachments,
                    except,
                    conditions,
                }
            }
            kind @ (JOIN | LEAVE) => {
                let (target, room) = (r.instance()?, r.text()?);
                match kind {
                    JOIN => PackedEffect::Join { target, room },
                    _ => PackedEffect::Leave { target, room },
                }
            }
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_events_read_back_as_written() {
        let mut p = Packer::default();
        let m = PackedMessage {
            connection: (7 << 32) | 9,
            id: "/chat",
            event: "say",
            data: r#"["héllo"]"#,
            attachments: 2,
            ack_id: Some(u64::MAX - 1),
        };
        m.write(&mut p);
        let n = PackedMessage {
            ack_id: None,
            attachments: 0,
            ..m
        };
        n.write(&mut p);
        assert_eq!(p.words.len(), 2 * MESSAGE_WORDS);
        assert_eq!(message_count(&p.words), 2);
        // The second message alone, as a part of the batch given again.
        let mut r = Reader::new(&p.text, &p.words[message_words(1..2)]).unwrap();
        assert_eq!(PackedMessage::read(&mut r), Some(n));
        assert!(r.done());
        assert_eq!(
            (attachments_of(&p.words, 0), attachments_of(&p.words, 1)),
            (2, 0)
        );
        assert_eq!(attachments_of(&p.words, 2), 0, "past the last message");
        let mut r = Reader::new(&p.text, &p.words).unwrap();
        assert_eq!(PackedMessage::read(&mut r), Some(m));
        assert_eq!(PackedMessage::read(&mut r), Some(n));
        assert!(r.done());

        let mut p = Packer::default();
        let e = PackedEvent {
            room: "r",
            event: "e",
            data: "{}",
        };
        e.write(&mut p);
        assert_eq!(p.words.len(), EVENT_WORDS);
        assert_eq!(event_count(&p.words), 1);
        assert_eq!(p.words[event_words(0..1)], p.words[..]);
        let mut r = Reader::new(&p.text, &p.words).unwrap();
        assert_eq!(PackedEvent::read(&mut r), Some(e));
    }

    #[test]
    fn effects_read_back_as_written() {
        let effects = [
            PackedEffect::Send {
                target: (1, "a"),
                event: "e",
                data: "1",
                attachments: 0,
            },
            PackedEffect::Emit {
                target: (2, "/"),
                event: "e",
                data: "[1]",
                attachments: 1,
            },
            PackedEffect::Ack {
                target: (3, "/"),
                ack_id: 1 << 40,
                data: "[]",
                attachments: 0,
            },
            PackedEffect::Broadcast {
                room: "room",
                event: "note",
                data: "{}",
                attachments: 0,
                except: Some((4, "/")),
                conditions: vec![
                    PackedCondition {
                        attribute: "muting",
                        exclude: true,
                        keys: vec!["u1", "u2"],
                    },
                    PackedCondition {
                        attribute: "following",
                        exclude: false,
                        keys: vec![],
                    },
                ],
            },
            PackedEffect::Broadcast {
                room: "room",
                event: "note",
                data: "{}",
                attachments: 0,
                except: None,
                conditions: vec![],
            },
            PackedEffect::Join {
                target: (5, "x"),
                room: "r",
            },
            PackedEffect::Leave {
                target: (5, "x"),
                room: "r",
            },
        ];
        let mut p = Packer::default();
        for e in &effects {
            e.write(&mut p);
        }
        let mut r = Reader::new(&p.text, &p.words).unwrap();
        for e in &effects {
            assert_eq!(PackedEffect::read(&mut r).as_ref(), Some(e));
        }
        assert!(r.done());
    }

    #[test]
    fn malformed_words_read_as_none_never_panic() {
        let mut p = Packer::default();
        PackedEffect::Join {
            target: (5, "x"),
            room: "r",
        }
        .write(&mut p);
        // Cut short, out of range, an unknown kind, a huge count.
        for words in [
            &p.words[..3],
            &[JOIN, 0, 0, 0, 99, 0, 0][..],
            &[42][..],
            &[BROADCAST, 0, 0, 0, 0, 0, 0, 0, 0, u32::MAX][..],
        ] {
            let mut r = Reader::new(&p.text, words).unwrap();
            assert_eq!(PackedEffect::read(&mut r), None);
        }
        assert!(Reader::new(&[0xff], &[]).is_none(), "text must be UTF-8");
        let mut r = Reader::new(b"ab", &[1, u32::MAX]).unwrap();
        assert_eq!(r.text(), None, "a range past the end");
    }
}
