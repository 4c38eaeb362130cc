//! A small blocking HTTP client over `wasi:http` (feature `http`).
//!
//! The host lets a plugin reach only the origins in its `[plugins.<name>]
//! allow_http`; anything else fails with `HTTP-request-denied`. The plugin's
//! queue waits while a request is in flight, bounded by the host's
//! `[plugin_runtime] http_timeout_ms`.

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, Scheme,
};
use wasip2::io::streams::StreamError;

/// A response: status and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    /// Whether the status is 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Why a request failed.
#[derive(Debug, Clone)]
pub enum Error {
    /// The URL is not `http(s)://host[:port]/path`.
    Url(String),
    /// The host refused or the request failed (denied origin, connection
    /// refused, timeout, ...).
    Http(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Url(u) => write!(f, "invalid URL {u}"),
            Error::Http(e) => write!(f, "HTTP request failed: {e}"),
        }
    }
}

fn code(e: ErrorCode) -> Error {
    Error::Http(format!("{e:?}"))
}

/// `GET url` with extra headers.
pub fn get(url: &str, headers: &[(&str, &str)]) -> Result<Response, Error> {
    request(Method::Get, url, headers, None)
}

/// `POST url` with a JSON body and extra headers.
pub fn post_json(url: &str, headers: &[(&str, &str)], body: &str) -> Result<Response, Error> {
    let mut h: Vec<(&str, &str)> = headers.to_vec();
    h.push(("content-type", "application/json"));
    request(Method::Post, url, &h, Some(body.as_bytes()))
}

fn split_url(url: &str) -> Result<(Scheme, &str, &str), Error> {
    let (scheme, rest) = if let Some(r) = url.strip_prefix("http://") {
        (Scheme::Http, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (Scheme::Https, r)
    } else {
        return Err(Error::Url(url.to_owned()));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(Error::Url(url.to_owned()));
    }
    Ok((scheme, authority, path))
}

/// Sends a request and reads the whole response body.
pub fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Response, Error> {
    let (scheme, authority, path) = split_url(url)?;
    let fields: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec()))
        .collect();
    let fields = Fields::from_list(&fields).map_err(|e| Error::Http(format!("{e:?}")))?;
    let req = OutgoingRequest::new(fields);
    let bad = |_| Error::Url(url.to_owned());
    req.set_method(&method).map_err(bad)?;
    req.set_scheme(Some(&scheme)).map_err(bad)?;
    req.set_authority(Some(authority)).map_err(bad)?;
    req.set_path_with_query(Some(path)).map_err(bad)?;
    let out_body = req
        .body()
        .map_err(|_| Error::Http("request body taken".into()))?;
    let pending = outgoing_handler::handle(req, None).map_err(code)?;
    {
        let stream = out_body
            .write()
            .map_err(|_| Error::Http("request body stream".into()))?;
        if let Some(bytes) = body {
            for chunk in bytes.chunks(4096) {
                stream
                    .blocking_write_and_flush(chunk)
                    .map_err(|e| Error::Http(format!("writing the body: {e:?}")))?;
            }
        }
    }
    OutgoingBody::finish(out_body, None).map_err(code)?;
    pending.subscribe().block();
    let resp = pending
        .get()
        .ok_or_else(|| Error::Http("no response".into()))?
        .map_err(|_| Error::Http("response taken twice".into()))?
        .map_err(code)?;
    let status = resp.status();
    let incoming = resp
        .consume()
        .map_err(|_| Error::Http("response body taken".into()))?;
    let mut body = Vec::new();
    {
        let stream = incoming
            .stream()
            .map_err(|_| Error::Http("response body stream".into()))?;
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => body.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    return Err(Error::Http(format!(
                        "reading the body: {}",
                        e.to_debug_string()
                    )))
                }
            }
        }
    }
    let _ = IncomingBody::finish(incoming);
    Ok(Response { status, body })
}
