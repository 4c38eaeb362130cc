//! Wire protocols as pure codecs: parsing and framing without I/O, so they
//! can be unit-tested and fuzzed on their own.

pub mod engineio;
pub mod misskey;
pub mod publish;
pub mod socketio;

/// Writes `s` as a JSON string literal.
pub fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("strings always serialise")
}
