//! Engine.IO v4 packets as a codec, without I/O (socketio/engine.io-protocol).
//!
//! A packet is a type digit (`0 open`, `1 close`, `2 ping`, `3 pong`,
//! `4 message`, `5 upgrade`, `6 noop`) followed by its data. Over WebSocket
//! a text frame is one packet and a binary frame is a binary message. Over
//! HTTP long-polling, packets are joined by the record separator `\x1e` and
//! binary messages are written `b<base64>`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// The record separator between packets of a polling payload.
pub const SEPARATOR: char = '\u{1e}';

/// One Engine.IO packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// The handshake, JSON `{sid, upgrades, pingInterval, pingTimeout, maxPayload}`.
    Open(String),
    Close,
    Ping(String),
    Pong(String),
    /// A text message (carries a Socket.IO packet).
    Message(String),
    /// A binary message (a Socket.IO attachment).
    Binary(Vec<u8>),
    Upgrade,
    Noop,
}

/// Why bytes are not an Engine.IO packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty packet")]
    Empty,
    #[error("unknown packet type {0:?}")]
    UnknownType(char),
    #[error("invalid base64 in a binary packet")]
    Base64,
    #[error("a server-only packet type was sent by a client")]
    ServerOnly,
}

impl Packet {
    /// Decodes one text packet (a WebSocket text frame, or one record of a
    /// polling payload; `b<base64>` is a binary message there).
    pub fn decode_text(s: &str) -> Result<Packet, DecodeError> {
        let mut chars = s.chars();
        let t = chars.next().ok_or(DecodeError::Empty)?;
        let rest = chars.as_str();
        Ok(match t {
            '0' => Packet::Open(rest.to_owned()),
            '1' => Packet::Close,
            '2' => Packet::Ping(rest.to_owned()),
            '3' => Packet::Pong(rest.to_owned()),
            '4' => Packet::Message(rest.to_owned()),
            '5' => Packet::Upgrade,
            '6' => Packet::Noop,
            'b' => Packet::Binary(STANDARD.decode(rest).map_err(|_| DecodeError::Base64)?),
            other => return Err(DecodeError::UnknownType(other)),
        })
    }

    /// Decodes a packet a client sent: the handshake is server-only.
    pub fn decode_from_client(s: &str) -> Result<Packet, DecodeError> {
        match Packet::decode_text(s)? {
            Packet::Open(_) => Err(DecodeError::ServerOnly),
            p => Ok(p),
        }
    }

    /// Encodes a text packet (binary messages as `b<base64>`, as polling does).
    pub fn encode(&self) -> String {
        match self {
            Packet::Open(d) => format!("0{d}"),
            Packet::Close => "1".into(),
            Packet::Ping(d) => format!("2{d}"),
            Packet::Pong(d) => format!("3{d}"),
            Packet::Message(d) => format!("4{d}"),
            Packet::Binary(b) => format!("b{}", STANDARD.encode(b)),
            Packet::Upgrade => "5".into(),
            Packet::Noop => "6".into(),
        }
    }
}

/// Splits a polling payload into packets.
pub fn decode_payload(body: &str) -> Result<Vec<Packet>, DecodeError> {
    body.split(SEPARATOR)
        .map(Packet::decode_from_client)
        .collect()
}

/// Joins encoded packets into a polling payload.
pub fn encode_payload<I, S>(packets: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out = String::new();
    for (i, p) in packets.into_iter().enumerate() {
        if i > 0 {
            out.push(SEPARATOR);
        }
        out.push_str(p.as_ref());
    }
    out
}

/// The handshake data of the open packet.
pub fn handshake_json(
    sid: &str,
    upgrades: &[&str],
    ping_interval_ms: u64,
    ping_timeout_ms: u64,
    max_payload: usize,
) -> String {
    serde_json::json!({
        "sid": sid,
        "upgrades": upgrades,
        "pingInterval": ping_interval_ms,
        "pingTimeout": ping_timeout_ms,
        "maxPayload": max_payload,
    })
    .to_string()
}

/// Engine.IO HTTP error codes (the reference server's `Server.errors`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    UnknownTransport = 0,
    UnknownSid = 1,
    BadHandshakeMethod = 2,
    BadRequest = 3,
    Forbidden = 4,
    UnsupportedProtocolVersion = 5,
}

impl HttpError {
    /// The message the reference server sends.
    pub fn message(self) -> &'static str {
        match self {
            HttpError::UnknownTransport => "Transport unknown",
            HttpError::UnknownSid => "Session ID unknown",
            HttpError::BadHandshakeMethod => "Bad handshake method",
            HttpError::BadRequest => "Bad request",
            HttpError::Forbidden => "Forbidden",
            HttpError::UnsupportedProtocolVersion => "Unsupported protocol version",
        }
    }

    /// The JSON body `{"code":N,"message":"..."}`.
    pub fn body(self) -> String {
        serde_json::json!({"code": self as u8, "message": self.message()}).to_string()
    }

    /// HTTP status: 403 for Forbidden, else 400.
    pub fn status(self) -> u16 {
        if self == HttpError::Forbidden {
            403
        } else {
            400
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for p in [
            Packet::Close,
            Packet::Ping("probe".into()),
            Packet::Pong(String::new()),
            Packet::Message("2[\"a\"]".into()),
            Packet::Binary(vec![0, 1, 255]),
            Packet::Upgrade,
            Packet::Noop,
        ] {
            assert_eq!(Packet::decode_text(&p.encode()).unwrap(), p);
        }
    }

    #[test]
    fn payloads() {
        let body = encode_payload(["4hello", "2", "bAQI="]);
        assert_eq!(body, "4hello\u{1e}2\u{1e}bAQI=");
        assert_eq!(
            decode_payload(&body).unwrap(),
            vec![
                Packet::Message("hello".into()),
                Packet::Ping(String::new()),
                Packet::Binary(vec![1, 2])
            ]
        );
    }

    #[test]
    fn bad_packets() {
        assert_eq!(Packet::decode_text(""), Err(DecodeError::Empty));
        assert_eq!(Packet::decode_text("9"), Err(DecodeError::UnknownType('9')));
        assert_eq!(Packet::decode_text("b%%%"), Err(DecodeError::Base64));
        assert_eq!(
            Packet::decode_from_client("0{}"),
            Err(DecodeError::ServerOnly)
        );
        assert!(decode_payload("4a\u{1e}").is_err());
    }

    #[test]
    fn errors_match_the_reference() {
        assert_eq!(
            HttpError::UnknownSid.body(),
            r#"{"code":1,"message":"Session ID unknown"}"#
        );
        assert_eq!(HttpError::Forbidden.status(), 403);
    }
}
