//! What a Socket.IO socket keeps of its handshake: what its session kept
//! of the opening request ([`KeptRequest`], one per session, shared by every
//! socket of it) and its CONNECT's auth as JSON text. The
//! description socket.io gives of a handshake (`socket.handshake`, what
//! `fetchSockets()` shows) is built from them only when it is asked for,
//! so an idle socket holds no JSON tree of it.

use std::net::IpAddr;
use std::sync::Arc;

use serde_json::{Map, Value};

/// Name/value pairs of a request, in order (headers or query).
pub type Pairs = Arc<[(String, String)]>;

/// What a session kept of the request that opened it.
#[derive(Debug)]
pub struct KeptRequest {
    /// The headers kept for plugins.
    pub headers: Pairs,
    /// The query, without what the transport itself needs.
    pub query: Pairs,
    /// The client's address.
    pub address: IpAddr,
    /// When the session opened (ms since the epoch).
    pub issued: u64,
}

/// A socket's handshake, kept small.
#[derive(Debug, Clone)]
pub struct Handshake {
    /// Its session's, shared.
    pub request: Arc<KeptRequest>,
    /// The CONNECT's auth, JSON text (`{}` without one).
    pub auth: Box<str>,
}

#[cfg(test)]
impl Default for KeptRequest {
    /// No request: no headers, an unspecified address.
    fn default() -> Self {
        Self {
            headers: Arc::new([]),
            query: Arc::new([]),
            address: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            issued: 0,
        }
    }
}

#[cfg(test)]
impl Default for Handshake {
    /// A handshake of no request, without auth.
    fn default() -> Self {
        Self {
            request: Arc::default(),
            auth: "{}".into(),
        }
    }
}

impl Handshake {
    /// `{headers, time, address, xdomain, secure, issued, url, query,
    /// auth}`, as socket.io describes a handshake: `xdomain` when the
    /// request named an origin, `url` the path with the query kept.
    pub fn to_json(&self) -> Value {
        let pairs = |p: &Pairs| -> Map<String, Value> {
            p.iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect()
        };
        let r = &*self.request;
        let headers = pairs(&r.headers);
        let xdomain = headers.contains_key("origin");
        let query: Vec<String> = r
            .query
            .iter()
            .map(|(k, v)| format!("{}={}", urlencoding(k), urlencoding(v)))
            .collect();
        let url = if query.is_empty() {
            "/socket.io/".to_owned()
        } else {
            format!("/socket.io/?{}", query.join("&"))
        };
        let auth = serde_json::from_str(&self.auth).unwrap_or_else(|_| Value::Object(Map::new()));
        serde_json::json!({
            "headers": headers,
            "time": crate::adapter::notepack::js_date_string(r.issued as f64),
            "address": r.address.to_string(),
            "xdomain": xdomain,
            "secure": false,
            "issued": r.issued,
            "url": url,
            "query": pairs(&r.query),
            "auth": auth,
        })
    }
}

/// Percent-encodes all but the unreserved characters of RFC 3986.
fn urlencoding(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b))
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Pairs {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn renders_what_socket_io_shows_of_a_handshake() {
        let h = Handshake {
            request: Arc::new(KeptRequest {
                headers: pairs(&[("host", "example.com"), ("origin", "https://a.example")]),
                query: pairs(&[("token", "a b&c")]),
                address: "10.0.0.7".parse().unwrap(),
                issued: 0,
            }),
            auth: r#"{"room":"r1"}"#.into(),
        };
        let j = h.to_json();
        assert_eq!(j["headers"]["host"], "example.com");
        assert_eq!(j["xdomain"], true);
        assert_eq!(j["secure"], false);
        assert_eq!(j["address"], "10.0.0.7");
        assert_eq!(j["issued"], 0);
        assert_eq!(
            j["time"],
            "Thu Jan 01 1970 00:00:00 GMT+0000 (Coordinated Universal Time)"
        );
        assert_eq!(j["url"], "/socket.io/?token=a%20b%26c");
        assert_eq!(j["query"]["token"], "a b&c");
        assert_eq!(j["auth"], serde_json::json!({"room": "r1"}));
    }

    #[test]
    fn without_origin_query_or_auth() {
        let j = Handshake::default().to_json();
        assert_eq!(j["xdomain"], false);
        assert_eq!(j["url"], "/socket.io/");
        assert_eq!(j["query"], serde_json::json!({}));
        assert_eq!(j["auth"], serde_json::json!({}));
    }
}
