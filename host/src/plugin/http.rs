//! Outbound HTTP for plugins (`wasi:http`), deny by default: a plugin may
//! reach only the origins listed in its `[plugins.<name>] allow_http`.
//! Every other request fails with `HTTP-request-denied` before any
//! connection is made. Requests are bounded by `[plugin_runtime]
//! http_timeout_ms` (connect, first byte, and between bytes).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

/// The origins one plugin may reach, and its request timeout.
#[derive(Debug, Clone, Default)]
pub struct HttpPolicy {
    origins: Arc<[String]>,
    timeout: Duration,
    /// Requests sent during the current plugin call (the call's time limit
    /// is extended once per request: waiting for a response is not the
    /// plugin's computing).
    pub(super) requests: u32,
}

/// `scheme://host[:port]` of a URI, lower-cased, default ports dropped.
pub fn origin_of(uri: &http::Uri) -> Option<String> {
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let host = uri.host()?.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    Some(match uri.port_u16() {
        Some(p) if p != default_port => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    })
}

impl HttpPolicy {
    /// Reads `allow_http` from a plugin's config table (JSON); entries that
    /// are not origins are ignored (the config loader already refused them).
    pub fn from_config(config_json: &str, timeout: Duration) -> Self {
        let origins = serde_json::from_str::<serde_json::Value>(config_json)
            .ok()
            .and_then(|v| v.get("allow_http").cloned())
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|o| o.as_str()?.parse::<http::Uri>().ok())
            .filter_map(|u| origin_of(&u))
            .collect::<Vec<_>>();
        Self {
            origins: origins.into(),
            timeout,
            requests: 0,
        }
    }

    /// The bound on each phase of a request.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The longest a request may take (connect, first byte, then the body).
    pub fn request_allowance(&self) -> Duration {
        self.timeout * 3
    }

    /// Whether a request URI may be sent.
    pub fn allows(&self, uri: &http::Uri) -> bool {
        origin_of(uri).is_some_and(|o| self.origins.contains(&o))
    }
}

type Sent = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), Error>> + Send>,
                ),
                Error,
            >,
        > + Send,
>;

impl WasiHttpHooks for HttpPolicy {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Sent {
        let _ = fut;
        if !self.allows(request.uri()) {
            tracing::warn!(uri = %request.uri(), "plugin HTTP request to an origin not in allow_http; denied");
            return Box::new(async { Err(Error::HttpRequestDenied) });
        }
        self.requests += 1;
        let cap = |d: Option<Duration>| Some(d.map_or(self.timeout, |d| d.min(self.timeout)));
        let options = RequestOptions {
            connect_timeout: cap(options.and_then(|o| o.connect_timeout)),
            first_byte_timeout: cap(options.and_then(|o| o.first_byte_timeout)),
            between_bytes_timeout: cap(options.and_then(|o| o.between_bytes_timeout)),
        };
        Box::new(async move {
            use http_body_util::BodyExt;
            let (res, io) =
                wasmtime_wasi_http::default_send_request(request, Some(options)).await?;
            Ok((
                res.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = Result<(), Error>> + Send>,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_normalised_and_matched_exactly() {
        let p = HttpPolicy::from_config(
            r#"{"allow_http":["http://Backend:8080","https://api.example:443/"]}"#,
            Duration::from_secs(1),
        );
        let ok = |u: &str| p.allows(&u.parse().unwrap());
        assert!(ok("http://backend:8080/rooms?x=1"));
        assert!(ok("https://api.example/v1"));
        assert!(!ok("http://backend:8081/"));
        assert!(!ok("https://backend:8080/"));
        assert!(!ok("http://evil.example/"));
        assert!(!HttpPolicy::from_config("{}", Duration::from_secs(1))
            .allows(&"http://backend:8080/".parse().unwrap()));
    }
}
