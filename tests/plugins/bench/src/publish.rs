//! How the benchmarks' broadcast server reads a `publish`: one source for
//! the `bench` WebAssembly plugin and its native twins (the Criterion handler
//! of `host/benches/dispatch.rs` and the native plugin of
//! `tests/bench/src/native.rs`, which include this file), so every side of a
//! comparison runs the same code.
//!
//! One pass over the text, as a plugin author would write it: a borrowed
//! struct for `{room, data}`, and for the Socket.IO form the first element
//! of the argument array (further arguments are skipped).

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `{room, data}` of a `publish`.
#[derive(Deserialize)]
struct Publish<'a> {
    #[serde(borrow)]
    room: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// A Socket.IO argument array whose first element is a [`Publish`].
struct FirstArg<'a>(Publish<'a>);

impl<'de> Deserialize<'de> for FirstArg<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct First;
        impl<'de> Visitor<'de> for First {
            type Value = FirstArg<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an argument array starting with {room, data}")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let first = seq
                    .next_element()?
                    .ok_or_else(|| serde::de::Error::invalid_length(0, &self))?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(FirstArg(first))
            }
        }
        d.deserialize_seq(First)
    }
}

/// `{room, data}` of a `publish`: the payload itself (Misskey) or its first
/// argument (Socket.IO). `data` stays JSON text, passed on as it came.
pub fn publish(payload: &str) -> Option<(Cow<'_, str>, &str)> {
    let p = if payload.trim_start().starts_with('[') {
        serde_json::from_str::<FirstArg>(payload).ok()?.0
    } else {
        serde_json::from_str::<Publish>(payload).ok()?
    };
    Some((p.room, p.data.get()))
}
