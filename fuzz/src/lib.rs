//! The host's wire codecs, compiled from their sources: they are pure
//! (no I/O, no host types), which is what makes them fuzzable on their own.

#[path = "../../host/src/protocol/mod.rs"]
mod protocol;

pub use protocol::*;
