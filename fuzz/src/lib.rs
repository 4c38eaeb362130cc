//! The host's wire codecs, compiled from their sources: they are pure
//! (no I/O, no host types), which is what makes them fuzzable on their own.

#[path = "../../host/src/protocol/engineio.rs"]
pub mod engineio;
#[path = "../../host/src/protocol/misskey.rs"]
pub mod misskey;
#[path = "../../host/src/protocol/publish.rs"]
pub mod publish;
#[path = "../../host/src/protocol/socketio.rs"]
pub mod socketio;
