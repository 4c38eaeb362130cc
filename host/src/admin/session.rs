//! Who may see the operator page: the sessions of operators who logged in
//! with the API key (an HttpOnly, SameSite=Strict cookie naming a random
//! token, expiring after [`SESSION_TTL`]), the CSRF token each action must
//! carry, and a bound on failed logins.
//!
//! Without `[api] key` the page is served to loopback clients only, with
//! no login; its actions then carry this node's own CSRF token.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The cookie that names an operator's session.
pub const COOKIE: &str = "chanhost_admin";

/// How long a session lasts after its login.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

/// Sessions kept at most; the oldest goes first.
const MAX_SESSIONS: usize = 256;

/// Failed logins (or bearer keys) allowed per address per
/// [`FAILURE_WINDOW`].
const MAX_FAILURES: u32 = 20;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Addresses whose failures are remembered at most (beyond, the oldest
/// windows go first).
const MAX_ADDRESSES: usize = 4096;

/// 32 random bytes, hex.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    // getrandom fails only where the OS has no randomness at all.
    getrandom::fill(&mut b).expect("the OS random source");
    hex::encode(b)
}

#[derive(Debug, Clone)]
struct Entry {
    csrf: String,
    until: Instant,
    created: Instant,
}

/// The operator sessions of this node.
pub struct Sessions {
    by_token: Mutex<HashMap<String, Entry>>,
    /// Failed attempts by address: (window start, count).
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    /// The CSRF token of the sessionless (loopback, no key) page.
    node_csrf: String,
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            by_token: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            node_csrf: random_token(),
        }
    }
}

impl Sessions {
    /// Opens a session: (its cookie token, its CSRF token).
    pub fn open(&self) -> (String, String) {
        let now = Instant::now();
        let (token, csrf) = (random_token(), random_token());
        let mut m = self.by_token.lock();
        m.retain(|_, e| e.until > now);
        if m.len() >= MAX_SESSIONS {
            if let Some(oldest) = m
                .iter()
                .min_by_key(|(_, e)| e.created)
                .map(|(k, _)| k.clone())
            {
                m.remove(&oldest);
            }
        }
        m.insert(
            token.clone(),
            Entry {
                csrf: csrf.clone(),
                until: now + SESSION_TTL,
                created: now,
            },
        );
        (token, csrf)
    }

    /// The CSRF token of a live session.
    pub fn csrf(&self, token: &str) -> Option<String> {
        let mut m = self.by_token.lock();
        match m.get(token) {
            Some(e) if e.until > Instant::now() => Some(e.csrf.clone()),
            Some(_) => {
                m.remove(token);
                None
            }
            None => None,
        }
    }

    pub fn close(&self, token: &str) {
        self.by_token.lock().remove(token);
    }

    /// The CSRF token of the page served without a key.
    pub fn node_csrf(&self) -> &str {
        &self.node_csrf
    }

    /// Counts a failed login from `ip`; false once it failed too often
    /// recently.
    pub fn failed_login(&self, ip: IpAddr) -> bool {
        let mut f = self.failures.lock();
        if f.len() >= MAX_ADDRESSES && !f.contains_key(&ip) {
            f.retain(|_, (at, _)| at.elapsed() <= FAILURE_WINDOW);
            if f.len() >= MAX_ADDRESSES {
                if let Some(oldest) = f.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| *k) {
                    f.remove(&oldest);
                }
            }
        }
        let e = f.entry(ip).or_insert((Instant::now(), 0));
        if e.0.elapsed() > FAILURE_WINDOW {
            *e = (Instant::now(), 0);
        }
        e.1 += 1;
        e.1 <= MAX_FAILURES
    }

    /// Whether `ip`'s logins are refused for now (too many failed).
    pub fn throttled(&self, ip: IpAddr) -> bool {
        self.failures
            .lock()
            .get(&ip)
            .is_some_and(|(at, n)| at.elapsed() <= FAILURE_WINDOW && *n >= MAX_FAILURES)
    }
}

/// The session token in a `Cookie` header, if any.
pub fn cookie_token(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The `Set-Cookie` value of a new session (or, for `None`, of a logout).
pub fn set_cookie(token: Option<&str>) -> String {
    match token {
        Some(t) => format!(
            "{COOKIE}={t}; Path=/admin; HttpOnly; SameSite=Strict; Max-Age={}",
            SESSION_TTL.as_secs()
        ),
        None => format!("{COOKIE}=; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=0"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_has_its_own_csrf_token_until_it_is_closed() {
        let s = Sessions::default();
        let (token, csrf) = s.open();
        assert_eq!(s.csrf(&token).as_deref(), Some(csrf.as_str()));
        assert_ne!(csrf, s.node_csrf());
        assert_eq!(s.csrf(&random_token()), None);
        s.close(&token);
        assert_eq!(s.csrf(&token), None);
    }

    #[test]
    fn sessions_are_bounded() {
        let s = Sessions::default();
        let first = s.open().0;
        for _ in 0..MAX_SESSIONS {
            s.open();
        }
        assert_eq!(s.by_token.lock().len(), MAX_SESSIONS);
        assert_eq!(s.csrf(&first), None, "the oldest went first");
    }

    #[test]
    fn the_cookie_is_read_back_and_odd_values_are_ignored() {
        let (token, _) = Sessions::default().open();
        let mut h = http::HeaderMap::new();
        let set = set_cookie(Some(&token));
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"));
        let pair = set.split(';').next().unwrap();
        h.insert(
            http::header::COOKIE,
            format!("a=b; {pair}").parse().unwrap(),
        );
        assert_eq!(cookie_token(&h), Some(token));
        h.insert(
            http::header::COOKIE,
            format!("{COOKIE}=../x").parse().unwrap(),
        );
        assert_eq!(cookie_token(&h), None);
    }

    #[test]
    fn failed_logins_are_throttled_by_address() {
        let s = Sessions::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..MAX_FAILURES {
            assert!(s.failed_login(a));
        }
        assert!(s.throttled(a));
        assert!(!s.failed_login(a));
        assert!(!s.throttled(b), "another address is not locked out");
        assert!(s.failed_login(b));
    }
}
