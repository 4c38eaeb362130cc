//! The operator page, `GET /admin`: what the node is doing now, live, in a
//! browser, and a few actions.
//!
//! - Access as `/api/*`: with `[api] key`, the page asks for the key and
//!   keeps a session ([`session`]: an HttpOnly, SameSite=Strict cookie,
//!   eight hours, logout); `Authorization: Bearer <key>` works too (for
//!   scripts). Without a key it is served to loopback clients only. Before
//!   that, nothing but the login form and the page's static files answers.
//! - Data: `GET /admin/api/stream` (Server-Sent Events, one snapshot a
//!   second, see [`snapshot`]), `GET /admin/api/rooms?q=&limit=`,
//!   `GET /admin/api/connections?user=`, `GET /admin/api/connections/{id}`.
//! - Actions: `POST /admin/api/disconnect` `{"user"}` closes the user's
//!   connections on every node; it carries the page's CSRF token in
//!   `X-CSRF-Token` (a cookie alone never suffices).
//! - The page is static HTML, CSS and JavaScript embedded in the binary
//!   (`page.html`, `login.html`, `admin.css`, `admin.js`), served with a
//!   Content-Security-Policy that allows nothing else.
//!
//! Figures are this node's, except the cluster's node list and the
//! disconnect action, which span the cluster.

pub mod session;
pub mod snapshot;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt as _;
use serde::Deserialize;
use serde_json::json;

use crate::node::Node;
use session::Sessions;
use snapshot::Sampler;

/// Compares secrets in time independent of where they differ.
fn same(a: &str, b: &str) -> bool {
    crate::api::constant_time_eq(a.as_bytes(), b.as_bytes())
}

const PAGE: &str = include_str!("page.html");
const LOGIN: &str = include_str!("login.html");
const CSS: &str = include_str!("admin.css");
const JS: &str = include_str!("admin.js");

/// The page's Content-Security-Policy: its own files, nothing else.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Largest login or action body.
const MAX_BODY: usize = 4096;

/// The page's state: the node, its operator sessions and its sampler.
pub struct Admin {
    node: Arc<Node>,
    sessions: Sessions,
    sampler: Arc<Sampler>,
}

/// The routes of the operator page.
pub fn router(node: Arc<Node>) -> Router {
    let sampler = Sampler::start(&node);
    let admin = Arc::new(Admin {
        node,
        sessions: Sessions::default(),
        sampler,
    });
    Router::new()
        .route("/admin", get(page))
        .route("/admin/", get(page))
        .route(
            "/admin/admin.css",
            get(|| asset("text/css; charset=utf-8", CSS)),
        )
        .route(
            "/admin/admin.js",
            get(|| asset("text/javascript; charset=utf-8", JS)),
        )
        .route("/admin/login", post(login))
        .route("/admin/logout", post(logout))
        .route("/admin/api/stream", get(stream))
        .route("/admin/api/rooms", get(rooms))
        .route("/admin/api/connections", get(connections))
        .route("/admin/api/connections/{id}", get(connection))
        .route("/admin/api/disconnect", post(disconnect))
        .with_state(admin)
}

/// Why a request to the page is refused; JSON `{"error"}` with its status
/// for the data endpoints.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("log in first: GET /admin")]
    LoginNeeded,
    #[error("no API key is configured ([api] key or CHANHOST_API_KEY); /admin answers loopback clients only")]
    NotLoopback,
    #[error("missing or wrong X-CSRF-Token")]
    Csrf,
    #[error("too many failed logins; wait a minute")]
    Throttled,
    #[error("without an API key /admin answers requests made to a loopback address only, not through a proxy")]
    NotLocalRequest,
    #[error("the request comes from another site (its Origin is not this page's)")]
    CrossOrigin,
    #[error("bad request: {0}")]
    Bad(String),
    #[error("no such connection on this node")]
    NoConnection,
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
}

impl AdminError {
    pub fn status(&self) -> StatusCode {
        match self {
            AdminError::LoginNeeded => StatusCode::UNAUTHORIZED,
            AdminError::NotLoopback
            | AdminError::Csrf
            | AdminError::NotLocalRequest
            | AdminError::CrossOrigin => StatusCode::FORBIDDEN,
            AdminError::Throttled => StatusCode::TOO_MANY_REQUESTS,
            AdminError::Bad(_) => StatusCode::BAD_REQUEST,
            AdminError::NoConnection => StatusCode::NOT_FOUND,
            AdminError::Broker(e) => e.status(),
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        secured((self.status(), Json(json!({ "error": self.to_string() }))).into_response())
    }
}

/// Who is asking, once let in.
struct Granted {
    /// The token an action must carry (None: authorized by the bearer
    /// key, which a browser never sends by itself).
    csrf: Option<String>,
    /// Logged in with a cookie (the page offers to log out).
    session: bool,
}

impl Admin {
    fn access(&self, peer: SocketAddr, headers: &HeaderMap) -> Result<Granted, AdminError> {
        let Some(key) = &self.node.config().api_key else {
            if !peer.ip().is_loopback() {
                return Err(AdminError::NotLoopback);
            }
            // A loopback peer may still be a proxy for anyone, or a
            // browser sent here by a name rebound to 127.0.0.1.
            if forwarded(headers) || !loopback_host(headers) {
                return Err(AdminError::NotLocalRequest);
            }
            return Ok(Granted {
                csrf: Some(self.sessions.node_csrf().to_owned()),
                session: false,
            });
        };
        if let Some(b) = crate::api::bearer(headers) {
            if self.sessions.throttled(peer.ip()) {
                return Err(AdminError::Throttled);
            }
            if same(b, key) {
                return Ok(Granted {
                    csrf: None,
                    session: false,
                });
            }
            self.sessions.failed_login(peer.ip());
        }
        session::cookie_token(headers)
            .and_then(|t| self.sessions.csrf(&t))
            .map(|csrf| Granted {
                csrf: Some(csrf),
                session: true,
            })
            .ok_or(AdminError::LoginNeeded)
    }

    /// Lets an action through: access, from this page's origin, with its
    /// CSRF token.
    fn act(
        &self,
        peer: SocketAddr,
        headers: &HeaderMap,
        given: Option<&str>,
    ) -> Result<(), AdminError> {
        let granted = self.access(peer, headers)?;
        if !same_origin(headers) {
            return Err(AdminError::CrossOrigin);
        }
        match granted.csrf {
            None => Ok(()),
            Some(want) if given.is_some_and(|g| same(g, &want)) => Ok(()),
            Some(_) => Err(AdminError::Csrf),
        }
    }
}

/// Whether a proxy passed the request on (it names a client).
fn forwarded(headers: &HeaderMap) -> bool {
    ["forwarded", "x-forwarded-for", "x-real-ip"]
        .iter()
        .any(|h| headers.contains_key(*h))
}

/// Whether the request was made to a loopback name (`localhost`,
/// `127.0.0.1`, `[::1]`, with any port).
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether a state-changing request comes from this page: no `Origin`
/// (not sent by a browser), or one naming the host it was sent to.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    !host.is_empty()
        && origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|o| o.eq_ignore_ascii_case(host))
}

/// Headers every answer of the page carries.
fn secured(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    // Not `no-referrer`: with it browsers send `Origin: null` on the
    // page's own form posts, which the origin check refuses.
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn html(status: StatusCode, body: String) -> Response {
    secured(
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            body,
        )
            .into_response(),
    )
}

async fn asset(kind: &'static str, text: &'static str) -> Response {
    secured(([(header::CONTENT_TYPE, kind)], text).into_response())
}

/// Escapes text for HTML (element content and quoted attributes).
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn login_page(status: StatusCode, error: &str) -> Response {
    html(status, LOGIN.replace("{{error}}", &escape_html(error)))
}

fn see_other(to: &str) -> Response {
    secured((StatusCode::SEE_OTHER, [(header::LOCATION, to.to_owned())]).into_response())
}

async fn page(
    State(a): State<Arc<Admin>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    match a.access(peer, &headers) {
        Ok(g) => html(
            StatusCode::OK,
            PAGE.replace("{{csrf}}", &escape_html(g.csrf.as_deref().unwrap_or("")))
                .replace("{{logout}}", if g.session { "yes" } else { "" }),
        ),
        Err(AdminError::LoginNeeded) => login_page(StatusCode::OK, ""),
        Err(e) => html(
            e.status(),
            format!(
                "<!doctype html><html lang=\"en\"><meta charset=\"utf-8\"><title>chanhost</title><p>{}</p></html>",
                escape_html(&e.to_string())
            ),
        ),
    }
}

/// The fields of a form body.
async fn form(node: &Node, body: Body) -> Result<Vec<(String, String)>, AdminError> {
    let bytes = crate::server::read_body(node, body, MAX_BODY)
        .await
        .map_err(|e| AdminError::Bad(e.to_string()))?;
    Ok(form_urlencoded::parse(&bytes)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect())
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

async fn login(
    State(a): State<Arc<Admin>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(key) = a.node.config().api_key.clone() else {
        // Nothing to log in to: the page is the loopback's.
        return see_other("/admin");
    };
    if a.access(peer, &headers).is_ok() {
        return see_other("/admin");
    }
    if !same_origin(&headers) {
        return login_page(StatusCode::FORBIDDEN, &AdminError::CrossOrigin.to_string());
    }
    if a.sessions.throttled(peer.ip()) {
        return login_page(
            StatusCode::TOO_MANY_REQUESTS,
            &AdminError::Throttled.to_string(),
        );
    }
    let fields = match form(&a.node, body).await {
        Ok(f) => f,
        Err(e) => return login_page(e.status(), &e.to_string()),
    };
    match field(&fields, "key") {
        Some(given) if same(given.trim(), &key) => {
            let (token, _) = a.sessions.open();
            tracing::info!(peer = %peer.ip(), "operator logged in to /admin");
            let mut r = see_other("/admin");
            if let Ok(v) = HeaderValue::from_str(&session::set_cookie(Some(&token))) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        _ => {
            tracing::warn!(peer = %peer.ip(), "failed login to /admin");
            if a.sessions.failed_login(peer.ip()) {
                login_page(StatusCode::UNAUTHORIZED, "Wrong API key.")
            } else {
                login_page(
                    StatusCode::TOO_MANY_REQUESTS,
                    &AdminError::Throttled.to_string(),
                )
            }
        }
    }
}

async fn logout(
    State(a): State<Arc<Admin>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let fields = match form(&a.node, body).await {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = a.act(peer, &headers, field(&fields, "csrf")) {
        return e.into_response();
    }
    if let Some(t) = session::cookie_token(&headers) {
        a.sessions.close(&t);
    }
    let mut r = see_other("/admin");
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(None)) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn stream(
    State(a): State<Arc<Admin>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, AdminError> {
    let granted = a.access(peer, &headers)?;
    // A stream opened by a session ends with it (logout, expiry), and
    // every stream with the host.
    let token = granted
        .session
        .then(|| session::cookie_token(&headers))
        .flatten();
    let first = a.sampler.snapshot(&a.node).await.to_string();
    let shutdown = a.node.shutdown().clone();
    let watching = (a.sampler.watch(), a.clone(), token, shutdown);
    let updates =
        futures_util::stream::unfold(watching, |(mut rx, a, token, shutdown)| async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    changed = rx.changed() => changed.ok()?,
                }
                if token.as_ref().is_some_and(|t| a.sessions.csrf(t).is_none()) {
                    return None;
                }
                let text = rx.borrow_and_update().clone();
                if let Some(text) = text {
                    return Some((text, (rx, a, token, shutdown)));
                }
            }
        });
    let events = futures_util::stream::once(async move { Arc::<str>::from(first) })
        .chain(updates)
        .map(|text| Ok::<_, Infallible>(Event::default().event("snapshot").data(&*text)));
    Ok(secured(
        Sse::new(events)
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response(),
    ))
}

#[derive(Deserialize)]
struct RoomsQuery {
    #[serde(default)]
    q: String,
    limit: Option<usize>,
}

async fn rooms(
    State(a): State<Arc<Admin>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<RoomsQuery>,
) -> Result<Response, AdminError> {
    a.access(peer, &headers)?;
    let limit = q.limit.unwrap_or(snapshot::TOP_ROOMS).clamp(1, 1000);
    let (count, rooms) = a.node.hub().rooms_by_size(&q.q, limit);
    let rooms: Vec<_> = rooms
        .iter()
        .map(|(name, n)| json!({"name": &**name, "members": n}))
        .collect();
    Ok(secured(
        Json(json!({ "count": count, "rooms": rooms })).into_response(),
    ))
}

#[derive(Deserialize)]
struct ConnectionsQuery {
    user: String,
}

fn protocol(c: &crate::hub::ConnHandle) -> &'static str {
    match c.protocol {
        crate::hub::Protocol::Misskey => "misskey",
        crate::hub::Protocol::SocketIo => "socketio",
    }
}

async fn connections(
    State(a): State<Arc<Admin>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<ConnectionsQuery>,
) -> Result<Response, AdminError> {
    a.access(peer, &headers)?;
    let mut list: Vec<_> = a.node.hub().user_conns(&q.user);
    list.sort_by_key(|c| c.id);
    let list: Vec<_> = list
        .iter()
        .map(|c| {
            json!({
                "id": c.id,
                "protocol": protocol(c),
                "transport": c.transport(),
                "user": c.identity().map(|i| &*i.user_id),
            })
        })
        .collect();
    Ok(secured(
        Json(json!({ "connections": list })).into_response(),
    ))
}

async fn connection(
    State(a): State<Arc<Admin>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    a.access(peer, &headers)?;
    let id: u64 = id
        .parse()
        .map_err(|_| AdminError::Bad("a connection id is a number".into()))?;
    let c = a.node.hub().conn(id).ok_or(AdminError::NoConnection)?;
    let mut rooms: Vec<String> = Vec::new();
    let instances: Vec<_> = c
        .instances_where(|_| true)
        .iter()
        .map(|i| {
            rooms.extend(c.rooms_of(&i.slot).iter().map(|r| r.to_string()));
            json!({
                "id": i.slot.id(),
                "plugin": &*i.plugin,
                "channel": &*i.channel,
                "socket_id": i.socket.as_ref().map(|s| &*s.sid),
            })
        })
        .collect();
    rooms.sort();
    rooms.dedup();
    let identity = c.identity().map(|i| {
        json!({
            "user": &*i.user_id,
            "claims": serde_json::from_str::<serde_json::Value>(&i.claims).unwrap_or(serde_json::Value::Null),
        })
    });
    Ok(secured(
        Json(json!({
            "id": c.id,
            "protocol": protocol(&c),
            "transport": c.transport(),
            "address": null,
            "identity": identity,
            "instances": instances,
            "rooms": rooms,
            "queue": { "bytes": c.queued_bytes() },
        }))
        .into_response(),
    ))
}

#[derive(Deserialize)]
struct DisconnectBody {
    user: String,
}

async fn disconnect(
    State(a): State<Arc<Admin>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AdminError> {
    let token = headers.get("x-csrf-token").and_then(|v| v.to_str().ok());
    a.act(peer, &headers, token)?;
    let bytes = crate::server::read_body(&a.node, body, MAX_BODY)
        .await
        .map_err(|e| AdminError::Bad(e.to_string()))?;
    let b: DisconnectBody = serde_json::from_slice(&bytes)
        .map_err(|e| AdminError::Bad(format!("expected {{\"user\": <id>}}: {e}")))?;
    if b.user.is_empty() {
        return Err(AdminError::Bad("the user id is empty".into()));
    }
    let n = a.node.disconnect_user(&b.user).await?;
    tracing::info!(peer = %peer.ip(), user = b.user, connections = n, "operator disconnected a user");
    Ok(secured(Json(json!({ "connections": n })).into_response()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            escape_html(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn only_requests_to_a_loopback_name_are_local() {
        for host in [
            "127.0.0.1:3000",
            "localhost",
            "LOCALHOST:80",
            "[::1]:3000",
            "127.1.2.3",
        ] {
            assert!(loopback_host(&headers(&[("host", host)])), "{host}");
        }
        for host in [
            "evil.example:3000",
            "10.0.0.1",
            "localhost.evil.example",
            "",
        ] {
            assert!(!loopback_host(&headers(&[("host", host)])), "{host}");
        }
        assert!(!loopback_host(&HeaderMap::new()));
        assert!(forwarded(&headers(&[("x-forwarded-for", "1.2.3.4")])));
        assert!(!forwarded(&headers(&[("host", "localhost")])));
    }

    #[test]
    fn an_action_from_another_site_is_told_apart() {
        let host = ("host", "127.0.0.1:3000");
        assert!(
            same_origin(&headers(&[host])),
            "no Origin: not a browser's cross-site request"
        );
        assert!(same_origin(&headers(&[
            host,
            ("origin", "http://127.0.0.1:3000")
        ])));
        assert!(!same_origin(&headers(&[
            host,
            ("origin", "http://evil.example")
        ])));
        assert!(!same_origin(&headers(&[host, ("origin", "null")])));
        assert!(!same_origin(&headers(&[(
            "origin",
            "http://127.0.0.1:3000"
        )])));
    }

    #[test]
    fn errors_carry_their_status() {
        assert_eq!(AdminError::LoginNeeded.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(AdminError::Csrf.status(), StatusCode::FORBIDDEN);
        assert_eq!(AdminError::NotLoopback.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            AdminError::Throttled.status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(AdminError::NoConnection.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn the_page_templates_have_their_placeholders() {
        assert!(PAGE.contains("{{csrf}}") && PAGE.contains("{{logout}}"));
        assert!(LOGIN.contains("{{error}}"));
        // Nothing the CSP would refuse: no inline script or handler.
        for doc in [PAGE, LOGIN] {
            assert!(!doc.contains("<script>"), "inline script");
            assert!(!doc.contains(" onclick="), "inline handler");
        }
    }
}
