//! Socket.IO v5 packets as a codec, without I/O (socketio/socket.io-protocol).
//!
//! Encoding: `<type>[<attachments>-][<namespace>,][<ack id>][<JSON>]`, types
//! `0 CONNECT`, `1 DISCONNECT`, `2 EVENT`, `3 ACK`, `4 CONNECT_ERROR`,
//! `5 BINARY_EVENT`, `6 BINARY_ACK`. The namespace is omitted for `/`.
//! Decoding validates what the reference parser validates (payload shape per
//! type, reserved event names) and, for binary packets, that placeholders
//! `{"_placeholder":true,"num":N}` name exactly the attachments announced
//! (see CVE-2022-2421 and CVE-2023-32695 for what goes wrong otherwise).
//!
//! An `EVENT` is decoded into its name and the rest of its argument array as
//! JSON text ([`Event`]), the form a plugin receives. Plain events are
//! validated and split without building a JSON tree; events with
//! attachments, or whose text could hold a placeholder, take the tree path
//! so their placeholders are checked.

use serde_json::value::RawValue;
use serde_json::Value;

/// Most binary attachments accepted in one packet.
pub const MAX_ATTACHMENTS: usize = 64;

/// Longest namespace name accepted (bytes); a longer one is a malformed
/// packet (the session ends), so an unknown namespace's CONNECT_ERROR
/// never echoes more than this.
pub const MAX_NAMESPACE_BYTES: usize = 256;

/// Event names a client may not use.
pub const RESERVED_EVENTS: [&str; 6] = [
    "connect",
    "connect_error",
    "disconnect",
    "disconnecting",
    "newListener",
    "removeListener",
];

/// The packet types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketType {
    Connect = 0,
    Disconnect = 1,
    Event = 2,
    Ack = 3,
    ConnectError = 4,
    BinaryEvent = 5,
    BinaryAck = 6,
}

impl PacketType {
    fn from_char(c: u8) -> Option<Self> {
        Some(match c {
            b'0' => PacketType::Connect,
            b'1' => PacketType::Disconnect,
            b'2' => PacketType::Event,
            b'3' => PacketType::Ack,
            b'4' => PacketType::ConnectError,
            b'5' => PacketType::BinaryEvent,
            b'6' => PacketType::BinaryAck,
            _ => return None,
        })
    }

    pub fn is_binary(self) -> bool {
        matches!(self, PacketType::BinaryEvent | PacketType::BinaryAck)
    }
}

/// A decoded packet (attachments, if any, follow as binary messages).
#[derive(Debug, Clone, PartialEq)]
pub struct Packet {
    pub kind: PacketType,
    pub nsp: String,
    pub id: Option<u64>,
    /// The JSON of packets other than events (`CONNECT` auth, acks, ...).
    pub data: Option<Value>,
    /// What an `EVENT` or `BINARY_EVENT` carries.
    pub event: Option<Event>,
    /// Binary attachments announced by the header.
    pub attachments: usize,
}

/// An event's name and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The first element of the argument array (a number becomes its text).
    pub name: String,
    /// The elements after the name, as a JSON array (`[]` when none).
    pub args: String,
}

/// Why a string is not a valid Socket.IO packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty packet")]
    Empty,
    #[error("unknown packet type")]
    UnknownType,
    #[error("invalid attachment count")]
    Attachments,
    #[error("invalid ack id")]
    AckId,
    #[error("invalid JSON payload")]
    Json,
    #[error("invalid payload for this packet type")]
    Payload,
    #[error("reserved event name")]
    Reserved,
    #[error("placeholders do not match the attachments")]
    Placeholders,
    #[error("namespace longer than {MAX_NAMESPACE_BYTES} bytes")]
    NamespaceTooLong,
}

/// Decodes a packet's text.
pub fn decode(s: &str) -> Result<Packet, DecodeError> {
    let b = s.as_bytes();
    let kind = PacketType::from_char(*b.first().ok_or(DecodeError::Empty)?)
        .ok_or(DecodeError::UnknownType)?;
    let mut i = 1;
    let mut attachments = 0;
    if kind.is_binary() {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start || i >= b.len() || b[i] != b'-' {
            return Err(DecodeError::Attachments);
        }
        attachments = s[start..i]
            .parse::<usize>()
            .ok()
            .filter(|n| *n <= MAX_ATTACHMENTS)
            .ok_or(DecodeError::Attachments)?;
        i += 1;
    }
    let mut nsp = "/".to_owned();
    if i < b.len() && b[i] == b'/' {
        let start = i;
        while i < b.len() && b[i] != b',' {
            i += 1;
        }
        if i - start > MAX_NAMESPACE_BYTES {
            return Err(DecodeError::NamespaceTooLong);
        }
        nsp = s[start..i].to_owned();
        if i < b.len() {
            i += 1; // the comma
        }
    }
    let mut id = None;
    let start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    if i > start {
        id = Some(s[start..i].parse::<u64>().map_err(|_| DecodeError::AckId)?);
    }
    let rest = &s[i..];
    if kind == PacketType::Event && !rest.contains("placeholder") && !rest.contains("\\u") {
        return Ok(Packet {
            kind,
            nsp,
            id,
            data: None,
            event: Some(split_event(rest)?),
            attachments,
        });
    }
    let data = if rest.is_empty() {
        None
    } else {
        Some(serde_json::from_str::<Value>(rest).map_err(|_| DecodeError::Json)?)
    };
    let mut packet = Packet {
        kind,
        nsp,
        id,
        data,
        event: None,
        attachments,
    };
    validate(&packet)?;
    if matches!(kind, PacketType::Event | PacketType::BinaryEvent) {
        if let Some(Value::Array(mut args)) = packet.data.take() {
            let name = event_name(args.remove(0))?;
            packet.event = Some(Event {
                name,
                args: Value::Array(args).to_string(),
            });
        }
    }
    Ok(packet)
}

/// The name of an event from the first element of its array.
fn event_name(v: Value) -> Result<String, DecodeError> {
    let name = match v {
        Value::String(s) => s,
        Value::Number(n) => n.to_string(),
        _ => return Err(DecodeError::Payload),
    };
    if RESERVED_EVENTS.contains(&name.as_str()) {
        return Err(DecodeError::Reserved);
    }
    Ok(name)
}

/// Splits a plain event's argument array (`rest`, which must hold no
/// placeholder) into its name and the JSON text of the other elements,
/// validating the JSON without building a tree.
fn split_event(rest: &str) -> Result<Event, DecodeError> {
    if rest.is_empty() {
        return Err(DecodeError::Payload);
    }
    let items: Vec<&RawValue> = match serde_json::from_str(rest) {
        Ok(items) => items,
        // Valid JSON of another shape is the wrong payload, not bad JSON.
        Err(e) if e.is_data() => return Err(DecodeError::Payload),
        Err(_) => return Err(DecodeError::Json),
    };
    let (first, others) = items.split_first().ok_or(DecodeError::Payload)?;
    let name = event_name(serde_json::from_str(first.get()).map_err(|_| DecodeError::Json)?)?;
    let args = match (others.first(), others.last()) {
        (Some(a), Some(b)) => {
            // The elements are slices of `rest`: keep the text between the
            // second element's start and the last one's end as it is.
            let start = a.get().as_ptr() as usize - rest.as_ptr() as usize;
            let end = b.get().as_ptr() as usize - rest.as_ptr() as usize + b.get().len();
            let mut args = String::with_capacity(end - start + 2);
            args.push('[');
            args.push_str(&rest[start..end]);
            args.push(']');
            args
        }
        _ => "[]".to_owned(),
    };
    Ok(Event { name, args })
}

fn validate(p: &Packet) -> Result<(), DecodeError> {
    match (p.kind, &p.data) {
        (PacketType::Connect, None) => {}
        (PacketType::Connect, Some(Value::Object(_))) => {}
        (PacketType::Disconnect, None) => {}
        (PacketType::ConnectError, Some(Value::String(_) | Value::Object(_))) => {}
        (PacketType::Event | PacketType::BinaryEvent, Some(Value::Array(a))) if !a.is_empty() => {}
        (PacketType::Ack | PacketType::BinaryAck, Some(Value::Array(_))) => {}
        _ => return Err(DecodeError::Payload),
    }
    if matches!(
        p.kind,
        PacketType::Connect | PacketType::Disconnect | PacketType::ConnectError
    ) && p.id.is_some()
    {
        return Err(DecodeError::Payload);
    }
    if matches!(p.kind, PacketType::Ack | PacketType::BinaryAck) && p.id.is_none() {
        return Err(DecodeError::AckId);
    }
    if let Some(data) = &p.data {
        let mut seen = vec![false; p.attachments];
        check_placeholders(data, &mut seen)?;
        if seen.iter().any(|s| !s) {
            return Err(DecodeError::Placeholders);
        }
    }
    Ok(())
}

/// Marks the placeholders of `v` in `seen`; any placeholder out of range,
/// malformed or repeated is an error.
fn check_placeholders(v: &Value, seen: &mut [bool]) -> Result<(), DecodeError> {
    match v {
        Value::Array(a) => a.iter().try_for_each(|x| check_placeholders(x, seen)),
        Value::Object(o) => {
            if o.get("_placeholder") == Some(&Value::Bool(true)) {
                let n = o
                    .get("num")
                    .and_then(Value::as_u64)
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or(DecodeError::Placeholders)?;
                match seen.get_mut(n) {
                    Some(s) if !*s => *s = true,
                    _ => return Err(DecodeError::Placeholders),
                }
                Ok(())
            } else {
                o.values().try_for_each(|x| check_placeholders(x, seen))
            }
        }
        _ => Ok(()),
    }
}

/// Counts the placeholders in JSON (for packets the host encodes).
pub fn count_placeholders(v: &Value) -> usize {
    match v {
        Value::Array(a) => a.iter().map(count_placeholders).sum(),
        Value::Object(o) if o.get("_placeholder") == Some(&Value::Bool(true)) => 1,
        Value::Object(o) => o.values().map(count_placeholders).sum(),
        _ => 0,
    }
}

/// `<nsp>,` for namespaces other than `/`, else nothing.
pub fn nsp_prefix(nsp: &str) -> String {
    if nsp == "/" {
        String::new()
    } else {
        format!("{nsp},")
    }
}

fn header(kind: PacketType, attachments: usize, nsp: &str) -> String {
    let mut s = String::with_capacity(nsp.len() + 8);
    let (kind, attachments) = match (kind, attachments) {
        (PacketType::Event, n) if n > 0 => (PacketType::BinaryEvent, n),
        (PacketType::Ack, n) if n > 0 => (PacketType::BinaryAck, n),
        other => other,
    };
    s.push(char::from(b'0' + kind as u8));
    if kind.is_binary() {
        s.push_str(&attachments.to_string());
        s.push('-');
    }
    s.push_str(&nsp_prefix(nsp));
    s
}

/// `CONNECT` reply: `0[<nsp>,]{"sid":"..."}`.
pub fn encode_connect(nsp: &str, sid: &str) -> String {
    encode_connect_with(nsp, sid, None)
}

/// `CONNECT` reply with the session's private id when the socket's state
/// is recovered (`{"sid":..,"pid":..}`).
pub fn encode_connect_with(nsp: &str, sid: &str, pid: Option<&str>) -> String {
    let body = match pid {
        Some(pid) => serde_json::json!({ "sid": sid, "pid": pid }),
        None => serde_json::json!({ "sid": sid }),
    };
    format!("{}{}", header(PacketType::Connect, 0, nsp), body)
}

/// An event's argument array with its offset as a last argument (what
/// socket.io's connection state recovery adds): `["e",1]` -> `["e",1,"7"]`.
pub fn args_with_offset(args: &str, offset: &str) -> String {
    let body = args.strip_suffix(']').unwrap_or(args);
    let mut out = String::with_capacity(body.len() + offset.len() + 4);
    out.push_str(body);
    out.push_str(",\"");
    out.push_str(offset);
    out.push_str("\"]");
    out
}

/// `CONNECT_ERROR`: `4[<nsp>,]{"message":..,"data":..}`.
pub fn encode_connect_error(nsp: &str, message: &str, data: Option<&Value>) -> String {
    let mut body = serde_json::json!({ "message": message });
    if let Some(d) = data {
        body["data"] = d.clone();
    }
    format!("{}{}", header(PacketType::ConnectError, 0, nsp), body)
}

/// `DISCONNECT`: `1[<nsp>,]`.
pub fn encode_disconnect(nsp: &str) -> String {
    header(PacketType::Disconnect, 0, nsp)
}

/// The argument array `["<event>",<arg>,...]` of an event emitted with
/// several arguments (`args_json`, a JSON array).
pub fn spread_args(event: &str, args_json: &str) -> String {
    let ev = serde_json::to_string(event).expect("strings serialise");
    let rest = args_json
        .trim()
        .strip_prefix('[')
        .unwrap_or("]")
        .trim_start();
    let mut s = String::with_capacity(ev.len() + rest.len() + 2);
    s.push('[');
    s.push_str(&ev);
    if !rest.starts_with(']') {
        s.push(',');
    }
    s.push_str(rest);
    s
}

/// The argument array `["<event>",<data>]` of an event with one argument.
pub fn event_args(event: &str, data_json: &str) -> String {
    let ev = serde_json::to_string(event).expect("strings serialise");
    let mut s = String::with_capacity(ev.len() + data_json.len() + 3);
    s.push('[');
    s.push_str(&ev);
    s.push(',');
    s.push_str(data_json);
    s.push(']');
    s
}

/// `EVENT` (or `BINARY_EVENT` with attachments) from a prebuilt argument array.
pub fn encode_event(nsp: &str, args_json: &str, attachments: usize) -> String {
    let mut s = header(PacketType::Event, attachments, nsp);
    s.push_str(args_json);
    s
}

/// `EVENT` (or `BINARY_EVENT`) asking for an acknowledgement `id`:
/// `2[<nsp>,]<id>[...]`.
pub fn encode_event_with_id(nsp: &str, id: u64, args_json: &str, attachments: usize) -> String {
    let mut s = header(PacketType::Event, attachments, nsp);
    s.push_str(&id.to_string());
    s.push_str(args_json);
    s
}

/// `ACK` (or `BINARY_ACK`): `3[<nsp>,]<id>[...]`.
pub fn encode_ack(nsp: &str, id: u64, args_json: &str, attachments: usize) -> String {
    let mut s = header(PacketType::Ack, attachments, nsp);
    s.push_str(&id.to_string());
    s.push_str(args_json);
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn spread_arguments_follow_the_event_name() {
        assert_eq!(super::spread_args("e", "[1, \"2\"]"), "[\"e\",1, \"2\"]");
        assert_eq!(super::spread_args("e", " [ ] "), "[\"e\"]");
    }

    use super::*;

    #[test]
    fn a_recovered_sockets_reply_and_events_carry_pid_and_offset() {
        assert_eq!(
            encode_connect_with("/", "s1", Some("p1")),
            r#"0{"pid":"p1","sid":"s1"}"#
        );
        assert_eq!(
            args_with_offset(r#"["e",{"a":[1]}]"#, "7"),
            r#"["e",{"a":[1]},"7"]"#
        );
    }

    #[test]
    fn decodes_the_protocol_examples() {
        let p = decode("0").unwrap();
        assert_eq!(
            (p.kind, p.nsp.as_str(), p.data),
            (PacketType::Connect, "/", None)
        );
        let p = decode(r#"0/admin,{"token":"123"}"#).unwrap();
        assert_eq!(p.nsp, "/admin");
        assert_eq!(p.data.unwrap()["token"], "123");
        let p = decode(r#"2["foo","bar"]"#).unwrap();
        assert_eq!(p.kind, PacketType::Event);
        let p = decode(r#"2/admin,12["bar"]"#).unwrap();
        assert_eq!((p.nsp.as_str(), p.id), ("/admin", Some(12)));
        let p = decode(r#"3/admin,13["bar"]"#).unwrap();
        assert_eq!((p.kind, p.id), (PacketType::Ack, Some(13)));
        let p = decode(r#"51-["baz",{"_placeholder":true,"num":0}]"#).unwrap();
        assert_eq!((p.kind, p.attachments), (PacketType::BinaryEvent, 1));
        let p = decode(r#"61-/admin,15[{"_placeholder":true,"num":0}]"#).unwrap();
        assert_eq!(
            (p.kind, p.id, p.attachments),
            (PacketType::BinaryAck, Some(15), 1)
        );
        assert_eq!(decode("1/admin,").unwrap().kind, PacketType::Disconnect);
    }

    #[test]
    fn numbers_past_f64_pass_a_plain_event_as_text() {
        // Valid JSON (JavaScript reads Infinity, as the reference server
        // does); handed to the plugin as it came.
        let p = decode("2[2,[2,2e2622],2]").unwrap();
        let ev = p.event.unwrap();
        assert_eq!(
            (ev.name.as_str(), ev.args.as_str()),
            ("2", "[[2,2e2622],2]")
        );
    }

    #[test]
    fn namespaces_are_bounded() {
        let ok = format!("/{}", "n".repeat(MAX_NAMESPACE_BYTES - 1));
        assert_eq!(decode(&format!("0{ok},")).unwrap().nsp, ok);
        let long = format!("/{}", "n".repeat(MAX_NAMESPACE_BYTES));
        assert_eq!(
            decode(&format!("0{long},")).err(),
            Some(DecodeError::NamespaceTooLong)
        );
        assert_eq!(
            decode(&format!("2{long},[\"e\"]")).err(),
            Some(DecodeError::NamespaceTooLong)
        );
    }

    #[test]
    fn events_split_into_name_and_arguments() {
        let ev = |s: &str| decode(s).unwrap().event.unwrap();
        assert_eq!(
            ev(r#"2["foo","bar",{"a":[1,2]}]"#),
            Event {
                name: "foo".into(),
                args: r#"["bar",{"a":[1,2]}]"#.into()
            }
        );
        assert_eq!(ev(r#"2/c,7[ "x" , 1 ,  null ]"#).args, "[1 ,  null]");
        assert_eq!(ev(r#"2["only"]"#).args, "[]");
        assert_eq!(ev(r#"2[42,true]"#).name, "42");
        // The tree path (an escape in the text) gives the same split.
        let e = ev(r#"2["caf\u00e9",{"k":"\u0041"}]"#);
        assert_eq!(
            (e.name.as_str(), e.args.as_str()),
            ("café", r#"[{"k":"A"}]"#)
        );
        let e = ev(r#"51-["up",{"_placeholder":true,"num":0}]"#);
        assert_eq!(
            (e.name.as_str(), e.args.as_str()),
            ("up", r#"[{"_placeholder":true,"num":0}]"#)
        );
        // Either path refuses the same packets with the same error (an
        // escaped argument sends the text down the tree path).
        for (plain, why) in [
            (r#"2["connect"]"#, DecodeError::Reserved),
            (r#"2[null]"#, DecodeError::Payload),
            ("2[[1]]", DecodeError::Payload),
            (r#"2[{"a":1},2]"#, DecodeError::Payload),
        ] {
            assert_eq!(decode(plain), Err(why.clone()), "{plain}");
            let tree = format!("{},\"\\u0041\"]", plain.strip_suffix(']').unwrap());
            assert_eq!(decode(&tree), Err(why), "{tree}");
        }
        assert_eq!(decode(r#"2["\u0063onnect"]"#), Err(DecodeError::Reserved));
        assert_eq!(decode(r#"2["a",]"#), Err(DecodeError::Json));
        assert_eq!(decode(r#"2{"a":1}"#), Err(DecodeError::Payload));
    }

    #[test]
    fn refuses_malformed_packets() {
        for bad in [
            "",
            "7",
            "abc",
            "4abc",
            "42{}",
            "2{}",
            "2[]",
            "2[{}]",
            "2abc[\"a\"]",
            "2[\"a\"",
            "0\"str\"",
            "0[]",
            "1{}",
            "3[1]",
            "2[\"connect\"]",
            "2[\"disconnect\",1]",
            "5[\"a\"]",
            "5-[\"a\"]",
            "51[\"a\"]",
            "5999-[\"a\"]",
            "3/x,1{}",
            "099999999999999999999999[\"a\"]",
        ] {
            assert!(decode(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn placeholders_must_match_attachments() {
        // Out of range.
        assert_eq!(
            decode(r#"51-["a",{"_placeholder":true,"num":1}]"#),
            Err(DecodeError::Placeholders)
        );
        // Announced two, used one.
        assert_eq!(
            decode(r#"52-["a",{"_placeholder":true,"num":0}]"#),
            Err(DecodeError::Placeholders)
        );
        // Used twice.
        assert_eq!(
            decode(r#"52-["a",{"_placeholder":true,"num":0},{"_placeholder":true,"num":0}]"#),
            Err(DecodeError::Placeholders)
        );
        // Not an integer (CVE-2023-32695 used strings and objects here).
        for num in ["\"0\"", "{}", "-1", "0.5", "null", "\"toString\""] {
            let s = format!(r#"51-["a",{{"_placeholder":true,"num":{num}}}]"#);
            assert_eq!(decode(&s), Err(DecodeError::Placeholders), "{s}");
        }
        // A placeholder in a non-binary packet.
        assert_eq!(
            decode(r#"2["a",{"_placeholder":true,"num":0}]"#),
            Err(DecodeError::Placeholders)
        );
        assert!(decode(
            r#"52-["a",{"x":[{"_placeholder":true,"num":1}]},{"_placeholder":true,"num":0}]"#
        )
        .is_ok());
    }

    #[test]
    fn encodes() {
        assert_eq!(encode_connect("/", "abc"), r#"0{"sid":"abc"}"#);
        assert_eq!(encode_connect("/admin", "abc"), r#"0/admin,{"sid":"abc"}"#);
        assert_eq!(
            encode_connect_error("/x", "Invalid namespace", None),
            r#"4/x,{"message":"Invalid namespace"}"#
        );
        assert_eq!(encode_disconnect("/"), "1");
        assert_eq!(encode_event("/", &event_args("hi", "1"), 0), r#"2["hi",1]"#);
        assert_eq!(
            encode_event("/c", "[\"b\",{\"_placeholder\":true,\"num\":0}]", 1),
            r#"51-/c,["b",{"_placeholder":true,"num":0}]"#
        );
        assert_eq!(encode_ack("/", 7, "[1,2]", 0), "37[1,2]");
        assert_eq!(
            encode_ack("/c", 7, "[{\"_placeholder\":true,\"num\":0}]", 1),
            r#"61-/c,7[{"_placeholder":true,"num":0}]"#
        );
        assert_eq!(encode_event_with_id("/", 12, r#"["e"]"#, 0), r#"212["e"]"#);
        assert_eq!(
            encode_event_with_id("/c", 3, r#"["e",{"_placeholder":true,"num":0}]"#, 1),
            r#"51-/c,3["e",{"_placeholder":true,"num":0}]"#
        );
    }
}
