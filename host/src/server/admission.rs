//! Admission of client connections: how many the process holds, how many
//! one address holds, and which address a request comes from.
//!
//! A client connection (a Misskey stream, a Socket.IO session) takes a
//! [`Ticket`] before it is set up and gives it back when it ends. Past
//! `[limits] max_connections` new ones are refused with 503, past
//! `per_ip_connections` for one address with 429, before any state is
//! created. The default `max_connections` leaves a reserve of file
//! descriptors below the process's open-file limit ([`default_max`]), so
//! however many sockets clients hold, `/healthz`, `/metrics` and the API
//! still accept connections.
//!
//! The client address is the TCP peer's, unless the peer is a trusted proxy
//! (`[limits] trusted_proxies`): then it is the right-most address of
//! `X-Forwarded-For` that is not itself a trusted proxy.
//!
//! ```
//! use chanhost::server::admission::{Admission, Refused};
//! let a = Admission::new(2, 1, Vec::new());
//! let ip = "10.0.0.1".parse().unwrap();
//! let first = a.admit(ip).unwrap();
//! assert_eq!(a.admit(ip).err(), Some(Refused::PerAddress));
//! drop(first);
//! assert!(a.admit(ip).is_ok());
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use ipnet::IpNet;
use parking_lot::Mutex;

/// Why a client connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the server holds as many connections as it may")]
    Capacity,
    #[error("too many connections from this address")]
    PerAddress,
}

impl Refused {
    pub fn status(self) -> StatusCode {
        match self {
            Refused::Capacity => StatusCode::SERVICE_UNAVAILABLE,
            Refused::PerAddress => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The `reason` label of `chanhost_connections_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refused::Capacity => "capacity",
            Refused::PerAddress => "per_address",
        }
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let mut r = (
            self.status(),
            axum::Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response();
        r.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
        r
    }
}

/// File descriptors kept free for everything but client connections: the
/// operational endpoints, the API, plugin files, the runtime's own.
pub fn fd_reserve(limit: usize) -> usize {
    (limit / 10).clamp(64, 512)
}

/// The soft open-file limit of the process, if it can be read.
pub fn open_file_limit() -> Option<usize> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0;
    (ok && r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur as usize)
}

/// The default `max_connections`: the open-file limit less its reserve
/// (19,488 with this machine's 20,000), or a million when unlimited.
pub fn default_max() -> usize {
    match open_file_limit() {
        Some(limit) => limit.saturating_sub(fd_reserve(limit)).max(1),
        None => 1_000_000,
    }
}

/// Counts of client connections, and their bounds.
#[derive(Debug)]
pub struct Admission {
    max: usize,
    per_address: usize,
    trusted: Vec<IpNet>,
    open: AtomicUsize,
    by_address: Mutex<HashMap<IpAddr, usize>>,
    refused: [AtomicU64; 2],
}

/// One admitted client connection; given back when dropped.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    address: IpAddr,
}

impl Ticket {
    /// The client address the connection was admitted for.
    pub fn address(&self) -> IpAddr {
        self.address
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.open.fetch_sub(1, Ordering::Relaxed);
        if self.admission.per_address > 0 {
            let mut m = self.admission.by_address.lock();
            if let Some(n) = m.get_mut(&self.address) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.address);
                }
            }
        }
    }
}

impl Admission {
    /// `per_address` 0: no cap per address.
    pub fn new(max: usize, per_address: usize, trusted: Vec<IpNet>) -> Arc<Self> {
        Arc::new(Self {
            max,
            per_address,
            trusted,
            open: AtomicUsize::new(0),
            by_address: Mutex::new(HashMap::new()),
            refused: Default::default(),
        })
    }

    /// From `[limits]`.
    pub fn of(limits: &crate::config::LimitsConfig) -> Arc<Self> {
        Self::new(
            limits.max_connections.unwrap_or_else(default_max),
            limits.per_ip_connections,
            limits.trusted_proxies.clone(),
        )
    }

    /// Client connections held now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The bound on client connections.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Refusals so far, by [`Refused::label`].
    pub fn refused(&self) -> [(&'static str, u64); 2] {
        [Refused::Capacity, Refused::PerAddress]
            .map(|r| (r.label(), self.refused[r as usize].load(Ordering::Relaxed)))
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted.iter().any(|n| n.contains(&ip))
    }

    /// The client's address: the peer's, or what trusted proxies say.
    pub fn client_address(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        let mut ip = canonical(peer.ip());
        if !self.trusts(ip) {
            return ip;
        }
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        for hop in hops.iter().rev() {
            let Ok(addr) = hop.parse::<IpAddr>() else {
                // Not an address: nothing left of it can be trusted.
                break;
            };
            ip = canonical(addr);
            if !self.trusts(ip) {
                break;
            }
        }
        ip
    }

    /// Takes a ticket for a connection from `address`, or says why not.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Result<Ticket, Refused> {
        let refuse = |r: Refused| {
            let n = self.refused[r as usize].fetch_add(1, Ordering::Relaxed);
            // The first refusal, then one in a thousand.
            if n % 1000 == 0 {
                tracing::warn!(
                    reason = r.label(),
                    refused = n + 1,
                    "client connection refused: {r}"
                );
            }
            Err(r)
        };
        if self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_err()
        {
            return refuse(Refused::Capacity);
        }
        if self.per_address > 0 {
            let mut m = self.by_address.lock();
            let n = m.entry(address).or_insert(0);
            if *n >= self.per_address {
                drop(m);
                self.open.fetch_sub(1, Ordering::Relaxed);
                return refuse(Refused::PerAddress);
            }
            *n += 1;
        }
        Ok(Ticket {
            admission: self.clone(),
            address,
        })
    }
}

/// IPv4-mapped IPv6 addresses as IPv4, so both spellings count as one.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_process_cap_and_the_address_cap() {
        let a = Admission::new(3, 2, Vec::new());
        let t1 = a.admit(ip("10.0.0.1")).unwrap();
        let _t2 = a.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.1")).err(), Some(Refused::PerAddress));
        let _t3 = a.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.3")).err(), Some(Refused::Capacity));
        assert_eq!(a.open(), 3);
        drop(t1);
        assert_eq!(a.open(), 2);
        assert!(a.admit(ip("10.0.0.3")).is_ok());
        assert_eq!(a.refused(), [("capacity", 1), ("per_address", 1)]);
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let a = Admission::new(10, 0, vec!["10.0.0.0/8".parse().unwrap()]);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.2.3.4, 10.1.1.1".parse().unwrap());
        let proxy: SocketAddr = "10.9.9.9:5000".parse().unwrap();
        let stranger: SocketAddr = "5.6.7.8:5000".parse().unwrap();
        // The right-most hop that is not a proxy.
        assert_eq!(a.client_address(proxy, &h), ip("1.2.3.4"));
        // A client's own header is ignored.
        assert_eq!(a.client_address(stranger, &h), ip("5.6.7.8"));
        // A forged left-most entry does not win over the real client.
        h.insert("x-forwarded-for", "9.9.9.9, 1.2.3.4".parse().unwrap());
        assert_eq!(a.client_address(proxy, &h), ip("1.2.3.4"));
        h.insert("x-forwarded-for", "garbage".parse().unwrap());
        assert_eq!(a.client_address(proxy, &h), ip("10.9.9.9"));
        let mapped: SocketAddr = "[::ffff:10.0.0.7]:1".parse().unwrap();
        assert_eq!(a.client_address(mapped, &HeaderMap::new()), ip("10.0.0.7"));
    }

    #[test]
    fn the_reserve_scales_with_the_limit() {
        assert_eq!(fd_reserve(20_000), 512);
        assert_eq!(fd_reserve(1024), 102);
        assert_eq!(fd_reserve(300), 64);
    }
}
