//! Calls to the Misskey API on a user's behalf (`POST /api/<endpoint>`
//! with the user's token as `i`); shared by the Misskey plugins. Two ways:
//! [`Backend::call`] blocks (the host's `wasi:http`: every call queued for
//! the plugin waits), [`Backend::start`] returns at once and the answer
//! comes in the plugin's `fetched`, read with [`Backend::answer`].

use chanhost_plugin::http;
use chanhost_plugin::types::{ChannelSpec, HttpResponse};
use serde_json::{json, Value};

/// Most pages read from a paginated endpoint (100 items each).
const MAX_PAGES: usize = 100;

/// Why a call failed.
#[derive(Debug, Clone)]
pub enum ApiError {
    /// Misskey answered with an error status (unknown object, missing
    /// permission, ...).
    Refused { status: u16, message: String },
    /// No usable answer (unreachable, timeout, not JSON).
    Failed(String),
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiError::Refused { message, .. } | ApiError::Failed(message) => f.write_str(message),
        }
    }
}

impl ApiError {
    /// The token lacks the endpoint's permission.
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, ApiError::Refused { status: 403, .. })
    }
}

/// The Misskey origin the plugin talks to.
#[derive(Debug, Clone)]
pub struct Backend {
    origin: String,
}

impl Backend {
    pub fn new(origin: &str) -> Self {
        Self {
            origin: origin.trim_end_matches('/').to_owned(),
        }
    }

    /// `POST /api/<endpoint>`; the answer's JSON (null for 204), or why not.
    pub fn call(&self, endpoint: &str, token: Option<&str>, body: Value) -> Result<Value, String> {
        self.request(endpoint, token, body)
            .map_err(|e| e.to_string())
    }

    /// Like [`Backend::call`], telling a refusal by status apart.
    pub fn request(
        &self,
        endpoint: &str,
        token: Option<&str>,
        body: Value,
    ) -> Result<Value, ApiError> {
        let r = http::post_json(&self.url(endpoint), &[], &with_token(body, token))
            .map_err(|e| ApiError::Failed(format!("{endpoint}: {e}")))?;
        parse(endpoint, r.status, &r.body)
    }

    fn url(&self, endpoint: &str) -> String {
        format!("{}/api/{endpoint}", self.origin)
    }

    /// Starts `POST /api/<endpoint>` without waiting; the id `fetched`
    /// will carry.
    pub fn start(&self, endpoint: &str, token: Option<&str>, body: Value) -> u64 {
        chanhost_plugin::fetch_json("POST", &self.url(endpoint), &[], &with_token(body, token))
    }

    /// What an answer given to `fetched` says, as [`Backend::request`]
    /// would have returned it.
    pub fn answer(
        endpoint: &str,
        response: &Result<HttpResponse, String>,
    ) -> Result<Value, ApiError> {
        match response {
            Ok(r) => parse(endpoint, r.status, &r.body),
            Err(e) => Err(ApiError::Failed(format!(
                "{endpoint}: HTTP request failed: {e}"
            ))),
        }
    }

    /// Every item of a paginated list endpoint (`limit` 100, `untilId`).
    pub fn all(&self, endpoint: &str, token: &str, params: Value) -> Result<Vec<Value>, ApiError> {
        let mut out = Vec::new();
        let mut until: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut body = params.clone();
            body["limit"] = json!(100);
            if let Some(u) = &until {
                body["untilId"] = json!(u);
            }
            let page = match self.request(endpoint, Some(token), body)? {
                Value::Array(a) => a,
                other => {
                    return Err(ApiError::Failed(format!(
                        "{endpoint}: expected an array, got {other}"
                    )))
                }
            };
            let n = page.len();
            until = page
                .last()
                .and_then(|v| v.get("id"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            out.extend(page);
            if n < 100 || until.is_none() {
                break;
            }
        }
        Ok(out)
    }
}

/// The request body as JSON text, with the token as `i`.
fn with_token(mut body: Value, token: Option<&str>) -> String {
    if let (Some(t), Some(o)) = (token, body.as_object_mut()) {
        o.insert("i".into(), Value::String(t.to_owned()));
    }
    body.to_string()
}

/// An API answer: its JSON (null for an empty body), or why not.
fn parse(endpoint: &str, status: u16, body: &[u8]) -> Result<Value, ApiError> {
    if !(200..300).contains(&status) {
        let text = String::from_utf8_lossy(body);
        return Err(ApiError::Refused {
            status,
            message: format!(
                "{endpoint} answered {status}: {}",
                text.chars().take(200).collect::<String>()
            ),
        });
    }
    if body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::Failed(format!("{endpoint}: the answer is not JSON: {e}")))
}

/// The `backend` origin of a plugin's config table, if set.
pub fn backend_from_config(config: &Value) -> Result<Option<Backend>, String> {
    match config.get("backend") {
        None => Ok(None),
        Some(Value::String(s)) if s.starts_with("http://") || s.starts_with("https://") => {
            Ok(Some(Backend::new(s)))
        }
        Some(other) => Err(format!("`backend` must be an http(s) origin, not {other}")),
    }
}

/// A Misskey channel of a plugin's manifest.
pub fn channel(name: &str, requires_user: bool, shared: bool) -> ChannelSpec {
    ChannelSpec {
        name: name.into(),
        requires_user,
        shared,
    }
}

/// The strings of a JSON array (others skipped; empty when absent).
pub fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect()
}
