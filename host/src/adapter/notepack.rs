//! MessagePack as `notepack.io` writes and reads it — the codec of
//! `@socket.io/redis-adapter` and `@socket.io/redis-emitter` — and the
//! step between its values and Socket.IO's JSON arguments with binary
//! placeholders.
//!
//! notepack's own conventions, kept both ways: integral numbers as the
//! smallest integer type, others as float 64; `Buffer`s as `bin`; map keys
//! are strings; `undefined` is the fixext 1 of type 0 (`d4 00 00`); a
//! `Date` is the timestamp extension (type -1). Read as JSON arguments,
//! `undefined` and non-finite numbers become `null` (in an object, an
//! `undefined` member is left out) and a date its ISO 8601 text — what
//! `JSON.stringify` makes of them on a Node server.
//!
//! Hostile input gets an error, never a panic or a large allocation: every
//! length is checked against the bytes left before anything is reserved,
//! and nesting is bounded ([`MAX_DEPTH`]).

use serde_json::{Map, Number, Value};

/// Deepest nesting read or converted.
pub const MAX_DEPTH: usize = 64;

/// One MessagePack value.
#[derive(Debug, Clone, PartialEq)]
pub enum Mp {
    Nil,
    /// JavaScript's `undefined` (notepack's fixext 0).
    Undefined,
    Bool(bool),
    Int(i64),
    /// Above `i64::MAX`.
    UInt(u64),
    Float(f64),
    Str(String),
    Bin(Vec<u8>),
    Array(Vec<Mp>),
    /// In order; keys are strings, as notepack writes them.
    Map(Vec<(String, Mp)>),
    /// A `Date`: milliseconds since the epoch.
    Date(f64),
    /// Any other extension, kept as it came.
    Ext(i8, Vec<u8>),
}

/// Why bytes are not one notepack value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("MessagePack cut short")]
    Short,
    #[error("{0} bytes after the MessagePack value")]
    Trailing(usize),
    #[error("MessagePack type byte 0x{0:02x} is not used")]
    Reserved(u8),
    #[error("a map key is not a string")]
    Key,
    #[error("MessagePack nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("a string is not UTF-8")]
    Utf8,
}

impl Mp {
    /// The member `key` of a map.
    pub fn get(&self, key: &str) -> Option<&Mp> {
        match self {
            Mp::Map(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Mp::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Mp]> {
        match self {
            Mp::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A whole number, from any numeric type that holds one.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Mp::Int(i) => Some(i),
            Mp::UInt(u) => i64::try_from(u).ok(),
            Mp::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(f as i64),
            _ => None,
        }
    }

    /// Truthy as JavaScript reads a flag.
    pub fn truthy(&self) -> bool {
        match self {
            Mp::Nil | Mp::Undefined => false,
            Mp::Bool(b) => *b,
            Mp::Int(i) => *i != 0,
            Mp::UInt(u) => *u != 0,
            Mp::Float(f) => *f != 0.0 && !f.is_nan(),
            Mp::Str(s) => !s.is_empty(),
            _ => true,
        }
    }
}

/// Reads exactly one value.
pub fn decode(bytes: &[u8]) -> Result<Mp, DecodeError> {
    let mut r = Reader { b: bytes, at: 0 };
    let v = r.value(0)?;
    match bytes.len() - r.at {
        0 => Ok(v),
        n => Err(DecodeError::Trailing(n)),
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).ok_or(DecodeError::Short)?;
        let s = self.b.get(self.at..end).ok_or(DecodeError::Short)?;
        self.at = end;
        Ok(s)
    }

    fn uint(&mut self, n: usize) -> Result<u64, DecodeError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    /// A length that must fit in what is left, each item taking at least
    /// `min` bytes.
    fn len(&mut self, n: usize, min: usize) -> Result<usize, DecodeError> {
        let len = self.uint(n)? as usize;
        if len.saturating_mul(min) > self.b.len() - self.at {
            return Err(DecodeError::Short);
        }
        Ok(len)
    }

    fn str(&mut self, len: usize) -> Result<String, DecodeError> {
        let s = self.take(len)?;
        std::str::from_utf8(s)
            .map(str::to_owned)
            .map_err(|_| DecodeError::Utf8)
    }

    fn array(&mut self, len: usize, depth: usize) -> Result<Mp, DecodeError> {
        // Reserved against what is left, not what is claimed: an item is
        // one byte on the wire but a whole `Mp` here.
        let mut a = Vec::with_capacity(len.min(1024));
        for _ in 0..len {
            a.push(self.value(depth + 1)?);
        }
        Ok(Mp::Array(a))
    }

    fn map(&mut self, len: usize, depth: usize) -> Result<Mp, DecodeError> {
        let mut m = Vec::with_capacity(len.min(1024));
        for _ in 0..len {
            let Mp::Str(k) = self.value(depth + 1)? else {
                return Err(DecodeError::Key);
            };
            m.push((k, self.value(depth + 1)?));
        }
        Ok(Mp::Map(m))
    }

    fn ext(&mut self, len: usize) -> Result<Mp, DecodeError> {
        let kind = self.take(1)?[0] as i8;
        let data = self.take(len)?;
        Ok(match (kind, len) {
            (0, 1) if data == [0] => Mp::Undefined,
            (-1, 4) => Mp::Date(be(data) as f64 * 1e3),
            (-1, 8) => {
                let v = be(data);
                let ns = v >> 34;
                let s = v & 0x3_ffff_ffff;
                Mp::Date(s as f64 * 1e3 + ns as f64 / 1e6)
            }
            (-1, 12) => {
                let ns = be(&data[..4]);
                let s = be(&data[4..]) as i64;
                Mp::Date(s as f64 * 1e3 + ns as f64 / 1e6)
            }
            _ => Mp::Ext(kind, data.to_vec()),
        })
    }

    fn value(&mut self, depth: usize) -> Result<Mp, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        let t = self.take(1)?[0];
        Ok(match t {
            0x00..=0x7f => Mp::Int(i64::from(t)),
            0x80..=0x8f => self.map(usize::from(t & 0x0f), depth)?,
            0x90..=0x9f => self.array(usize::from(t & 0x0f), depth)?,
            0xa0..=0xbf => Mp::Str(self.str(usize::from(t & 0x1f))?),
            0xc0 => Mp::Nil,
            0xc1 => return Err(DecodeError::Reserved(t)),
            0xc2 => Mp::Bool(false),
            0xc3 => Mp::Bool(true),
            0xc4..=0xc6 => {
                let n = self.len(1 << (t - 0xc4), 1)?;
                Mp::Bin(self.take(n)?.to_vec())
            }
            0xc7..=0xc9 => {
                let n = self.len(1 << (t - 0xc7), 1)?;
                self.ext(n)?
            }
            0xca => Mp::Float(f64::from(f32::from_bits(self.uint(4)? as u32))),
            0xcb => Mp::Float(f64::from_bits(self.uint(8)?)),
            0xcc..=0xcf => {
                let u = self.uint(1 << (t - 0xcc))?;
                i64::try_from(u).map_or(Mp::UInt(u), Mp::Int)
            }
            0xd0 => Mp::Int(i64::from(self.take(1)?[0] as i8)),
            0xd1 => Mp::Int(i64::from(self.uint(2)? as u16 as i16)),
            0xd2 => Mp::Int(i64::from(self.uint(4)? as u32 as i32)),
            0xd3 => Mp::Int(self.uint(8)? as i64),
            0xd4..=0xd8 => self.ext(1 << (t - 0xd4))?,
            0xd9..=0xdb => {
                let n = self.len(1 << (t - 0xd9), 1)?;
                Mp::Str(self.str(n)?)
            }
            0xdc | 0xdd => {
                let n = self.len(if t == 0xdc { 2 } else { 4 }, 1)?;
                self.array(n, depth)?
            }
            0xde | 0xdf => {
                let n = self.len(if t == 0xde { 2 } else { 4 }, 2)?;
                self.map(n, depth)?
            }
            0xe0..=0xff => Mp::Int(i64::from(t as i8)),
        })
    }
}

fn be(b: &[u8]) -> u64 {
    b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
}

/// Writes one value as notepack does.
pub fn encode(v: &Mp, out: &mut Vec<u8>) {
    match v {
        Mp::Nil => out.push(0xc0),
        Mp::Undefined => out.extend_from_slice(&[0xd4, 0x00, 0x00]),
        Mp::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
        Mp::Int(i) => int(*i, out),
        Mp::UInt(u) => {
            out.push(0xcf);
            out.extend_from_slice(&u.to_be_bytes());
        }
        Mp::Float(f) => {
            // notepack writes whole numbers as integers.
            if f.fract() == 0.0 && f.abs() < 9.0e15 {
                int(*f as i64, out);
            } else {
                out.push(0xcb);
                out.extend_from_slice(&f.to_bits().to_be_bytes());
            }
        }
        Mp::Str(s) => {
            head(s.len(), [0xa0, 0xd9, 0xda, 0xdb], 0x20, out);
            out.extend_from_slice(s.as_bytes());
        }
        Mp::Bin(b) => {
            sized(b.len(), [0xc4, 0xc5, 0xc6], out);
            out.extend_from_slice(b);
        }
        Mp::Array(a) => {
            collection(a.len(), [0x90, 0xdc, 0xdd], out);
            for x in a {
                encode(x, out);
            }
        }
        Mp::Map(m) => {
            collection(m.len(), [0x80, 0xde, 0xdf], out);
            for (k, x) in m {
                encode(&Mp::Str(k.clone()), out);
                encode(x, out);
            }
        }
        Mp::Date(ms) => {
            let s = (ms / 1e3).floor();
            let ns = ((ms - s * 1e3) * 1e6).round() as u64;
            if (0.0..4_294_967_296.0).contains(&s) && ns == 0 {
                out.extend_from_slice(&[0xd6, 0xff]);
                out.extend_from_slice(&(s as u32).to_be_bytes());
            } else {
                out.extend_from_slice(&[0xc7, 0x0c, 0xff]);
                out.extend_from_slice(&(ns as u32).to_be_bytes());
                out.extend_from_slice(&(s as i64).to_be_bytes());
            }
        }
        Mp::Ext(kind, data) => {
            match data.len() {
                1 => out.push(0xd4),
                2 => out.push(0xd5),
                4 => out.push(0xd6),
                8 => out.push(0xd7),
                16 => out.push(0xd8),
                n => sized(n, [0xc7, 0xc8, 0xc9], out),
            }
            out.push(*kind as u8);
            out.extend_from_slice(data);
        }
    }
}

fn int(i: i64, out: &mut Vec<u8>) {
    match i {
        0..=0x7f => out.push(i as u8),
        -0x20..=-1 => out.push(i as i8 as u8),
        0x80..=0xff => out.extend_from_slice(&[0xcc, i as u8]),
        0x100..=0xffff => {
            out.push(0xcd);
            out.extend_from_slice(&(i as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(0xce);
            out.extend_from_slice(&(i as u32).to_be_bytes());
        }
        -0x80..=-0x21 => out.extend_from_slice(&[0xd0, i as i8 as u8]),
        -0x8000..=-0x81 => {
            out.push(0xd1);
            out.extend_from_slice(&(i as i16).to_be_bytes());
        }
        -0x8000_0000..=-0x8001 => {
            out.push(0xd2);
            out.extend_from_slice(&(i as i32).to_be_bytes());
        }
        _ if i > 0 => {
            out.push(0xcf);
            out.extend_from_slice(&(i as u64).to_be_bytes());
        }
        _ => {
            out.push(0xd3);
            out.extend_from_slice(&i.to_be_bytes());
        }
    }
}

/// A string head: fix form below `fix_max`, then 8/16/32-bit lengths.
fn head(len: usize, tags: [u8; 4], fix_max: usize, out: &mut Vec<u8>) {
    if len < fix_max {
        out.push(tags[0] | len as u8);
    } else {
        sized(len, [tags[1], tags[2], tags[3]], out);
    }
}

/// A head with an 8, 16 or 32-bit length.
fn sized(len: usize, tags: [u8; 3], out: &mut Vec<u8>) {
    if len < 0x100 {
        out.extend_from_slice(&[tags[0], len as u8]);
    } else if len < 0x1_0000 {
        out.push(tags[1]);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(tags[2]);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

/// An array or map head: fix form below 16, then 16/32-bit lengths.
fn collection(len: usize, tags: [u8; 3], out: &mut Vec<u8>) {
    if len < 0x10 {
        out.push(tags[0] | len as u8);
    } else if len < 0x1_0000 {
        out.push(tags[1]);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(tags[2]);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

/// A value as Socket.IO JSON: binary parts become placeholders
/// (`{"_placeholder":true,"num":N}`) and are moved to `attachments`.
pub fn to_json(v: Mp, attachments: &mut Vec<Vec<u8>>) -> Value {
    match v {
        Mp::Nil | Mp::Undefined | Mp::Ext(..) => Value::Null,
        Mp::Bool(b) => Value::Bool(b),
        Mp::Int(i) => Value::Number(i.into()),
        Mp::UInt(u) => Value::Number(u.into()),
        Mp::Float(f) => Number::from_f64(f).map_or(Value::Null, Value::Number),
        Mp::Str(s) => Value::String(s),
        Mp::Bin(b) => {
            let num = attachments.len();
            attachments.push(b);
            serde_json::json!({ "_placeholder": true, "num": num })
        }
        Mp::Array(a) => Value::Array(a.into_iter().map(|x| to_json(x, attachments)).collect()),
        Mp::Map(m) => Value::Object(
            m.into_iter()
                .filter(|(_, x)| *x != Mp::Undefined)
                .map(|(k, x)| (k, to_json(x, attachments)))
                .collect::<Map<_, _>>(),
        ),
        Mp::Date(ms) => Value::String(iso8601(ms)),
    }
}

/// Socket.IO JSON as a value: placeholders become the attachments they
/// name (a placeholder naming none stays an object).
pub fn from_json(v: &Value, attachments: &[Vec<u8>]) -> Mp {
    match v {
        Value::Null => Mp::Nil,
        Value::Bool(b) => Mp::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Mp::Int(i),
            (None, Some(u)) => Mp::UInt(u),
            _ => Mp::Float(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => Mp::Str(s.clone()),
        Value::Array(a) => Mp::Array(a.iter().map(|x| from_json(x, attachments)).collect()),
        Value::Object(o) => {
            if o.len() == 2 && o.get("_placeholder") == Some(&Value::Bool(true)) {
                if let Some(b) = o
                    .get("num")
                    .and_then(Value::as_u64)
                    .and_then(|n| attachments.get(n as usize))
                {
                    return Mp::Bin(b.clone());
                }
            }
            Mp::Map(
                o.iter()
                    .map(|(k, x)| (k.clone(), from_json(x, attachments)))
                    .collect(),
            )
        }
    }
}

/// The civil date, time of day (ms) and weekday (0 = Sunday) of a time in
/// ms since the epoch, in UTC.
fn civil(ms: f64) -> ((i64, i64, i64), i64, i64) {
    let total = ms.floor() as i64;
    let (days, rest) = (total.div_euclid(86_400_000), total.rem_euclid(86_400_000));
    // Civil from days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    ((y, m, d), rest, (days + 4).rem_euclid(7))
}

/// `Date.prototype.toISOString` of a time in ms since the epoch.
pub fn iso8601(ms: f64) -> String {
    if !ms.is_finite() {
        return String::new();
    }
    let ((y, m, d), rest, _) = civil(ms);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3_600_000,
        rest / 60_000 % 60,
        rest / 1000 % 60,
        rest % 1000
    )
}

/// A time as `String(new Date(ms))` prints it on a server in UTC
/// (socket.io's `handshake.time`).
pub fn js_date_string(ms: f64) -> String {
    if !ms.is_finite() {
        return "Invalid Date".into();
    }
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let ((y, m, d), rest, wd) = civil(ms);
    format!(
        "{} {} {d:02} {y:04} {:02}:{:02}:{:02} GMT+0000 (Coordinated Universal Time)",
        DAYS[wd as usize],
        MONTHS[(m - 1) as usize],
        rest / 3_600_000,
        rest / 60_000 % 60,
        rest / 1000 % 60,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(v: &Mp) -> Mp {
        let mut out = Vec::new();
        encode(v, &mut out);
        decode(&out).unwrap()
    }

    #[test]
    fn integers_take_notepacks_smallest_form() {
        for (i, bytes) in [
            (0i64, vec![0x00]),
            (127, vec![0x7f]),
            (128, vec![0xcc, 0x80]),
            (256, vec![0xcd, 0x01, 0x00]),
            (65_536, vec![0xce, 0, 1, 0, 0]),
            (-1, vec![0xff]),
            (-32, vec![0xe0]),
            (-33, vec![0xd0, 0xdf]),
            (-129, vec![0xd1, 0xff, 0x7f]),
        ] {
            let mut out = Vec::new();
            encode(&Mp::Int(i), &mut out);
            assert_eq!(out, bytes, "{i}");
            assert_eq!(decode(&bytes).unwrap(), Mp::Int(i));
        }
        assert_eq!(round(&Mp::Int(i64::MIN)), Mp::Int(i64::MIN));
        assert_eq!(round(&Mp::UInt(u64::MAX)), Mp::UInt(u64::MAX));
        // A whole float is written as an integer, as notepack does.
        assert_eq!(round(&Mp::Float(3.0)), Mp::Int(3));
        assert_eq!(round(&Mp::Float(0.5)), Mp::Float(0.5));
    }

    #[test]
    fn an_emitter_message_reads_as_written() {
        // [uid, {type: 2, data: ["hi", Buffer[1,2]], nsp: "/"}, {rooms: ["r"], except: [], flags: {}}]
        let msg = Mp::Array(vec![
            Mp::Str("emitter".into()),
            Mp::Map(vec![
                ("type".into(), Mp::Int(2)),
                (
                    "data".into(),
                    Mp::Array(vec![Mp::Str("hi".into()), Mp::Bin(vec![1, 2])]),
                ),
                ("nsp".into(), Mp::Str("/".into())),
            ]),
            Mp::Map(vec![
                ("rooms".into(), Mp::Array(vec![Mp::Str("r".into())])),
                ("except".into(), Mp::Array(vec![])),
                ("flags".into(), Mp::Map(vec![])),
            ]),
        ]);
        let back = round(&msg);
        assert_eq!(back, msg);
        assert_eq!(back.as_array().unwrap()[0].as_str(), Some("emitter"));
        let packet = &back.as_array().unwrap()[1];
        assert_eq!(packet.get("type").and_then(Mp::as_i64), Some(2));
    }

    #[test]
    fn long_strings_and_collections_use_wider_heads() {
        let s = "x".repeat(70_000);
        assert_eq!(round(&Mp::Str(s.clone())), Mp::Str(s));
        let a = Mp::Array((0..300).map(Mp::Int).collect());
        assert_eq!(round(&a), a);
        let m = Mp::Map((0..20).map(|i| (format!("k{i}"), Mp::Nil)).collect());
        assert_eq!(round(&m), m);
        let b = Mp::Bin(vec![7; 300]);
        assert_eq!(round(&b), b);
    }

    #[test]
    fn undefined_and_dates_are_notepacks_extensions() {
        let mut out = Vec::new();
        encode(&Mp::Undefined, &mut out);
        assert_eq!(out, [0xd4, 0x00, 0x00]);
        assert_eq!(decode(&out).unwrap(), Mp::Undefined);
        // timestamp 32, as notepack writes a Date of whole seconds.
        let d = decode(&[0xd6, 0xff, 0x65, 0x53, 0xf1, 0x00]).unwrap();
        assert_eq!(d, Mp::Date(1_700_000_000_000.0));
        assert_eq!(
            round(&Mp::Date(1_700_000_000_123.0)),
            Mp::Date(1_700_000_000_123.0)
        );
        let mut none = Vec::new();
        assert_eq!(
            to_json(Mp::Date(1_700_000_000_123.0), &mut none),
            Value::String("2023-11-14T22:13:20.123Z".into())
        );
        assert_eq!(
            js_date_string(1_700_000_000_123.0),
            "Tue Nov 14 2023 22:13:20 GMT+0000 (Coordinated Universal Time)"
        );
    }

    #[test]
    fn binary_becomes_placeholders_and_back() {
        let v = Mp::Array(vec![
            Mp::Str("file".into()),
            Mp::Map(vec![
                ("name".into(), Mp::Str("a".into())),
                ("gone".into(), Mp::Undefined),
                ("body".into(), Mp::Bin(vec![1, 2, 3])),
            ]),
            Mp::Bin(vec![4]),
            Mp::Float(f64::NAN),
        ]);
        let mut att = Vec::new();
        let json = to_json(v, &mut att);
        assert_eq!(
            json,
            serde_json::json!(["file", {"name": "a", "body": {"_placeholder": true, "num": 0}},
                {"_placeholder": true, "num": 1}, null])
        );
        assert_eq!(att, vec![vec![1, 2, 3], vec![4]]);
        let back = from_json(&json, &att);
        assert_eq!(
            back,
            Mp::Array(vec![
                Mp::Str("file".into()),
                // Members in serde_json's order (sorted).
                Mp::Map(vec![
                    ("body".into(), Mp::Bin(vec![1, 2, 3])),
                    ("name".into(), Mp::Str("a".into())),
                ]),
                Mp::Bin(vec![4]),
                Mp::Nil,
            ])
        );
    }

    #[test]
    fn hostile_bytes_are_refused_without_panic_or_allocation() {
        assert_eq!(decode(&[]), Err(DecodeError::Short));
        assert_eq!(decode(&[0xc1]), Err(DecodeError::Reserved(0xc1)));
        assert_eq!(decode(&[0x01, 0x02]), Err(DecodeError::Trailing(1)));
        // An array claiming 2^32-1 items in five bytes.
        assert_eq!(
            decode(&[0xdd, 0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::Short)
        );
        assert_eq!(
            decode(&[0xc6, 0xff, 0xff, 0xff, 0xff, 1]),
            Err(DecodeError::Short)
        );
        assert_eq!(decode(&[0x81, 0x01, 0x01]), Err(DecodeError::Key));
        assert_eq!(decode(&[0xa2, 0xff, 0xfe]), Err(DecodeError::Utf8));
        let deep = vec![0x91; MAX_DEPTH + 2];
        assert_eq!(decode(&deep), Err(DecodeError::TooDeep));
        // Every prefix of a valid message fails cleanly.
        let mut out = Vec::new();
        encode(
            &Mp::Array(vec![
                Mp::Str("e".into()),
                Mp::Bin(vec![1; 40]),
                Mp::Date(5.5),
            ]),
            &mut out,
        );
        for n in 0..out.len() {
            assert!(decode(&out[..n]).is_err(), "prefix {n}");
        }
    }
}
