//! Rust bindings of the `chanhost:plugin@0.3.0` world, for plugins.
//!
//! ```ignore
//! use chanhost_plugin::{export, Guest, types::*};
//! struct MyPlugin;
//! impl Guest for MyPlugin { /* describe, init, connect, ... */ }
//! export!(MyPlugin);
//! ```
//!
//! The host imports are in [`host`]; [`instance`] and [`json`] build the
//! values plugins pass most often; [`conventions`] names the attribute keys
//! the host itself reads; [`fetch_json`] starts a request whose answer
//! comes in `fetched` (the plugin's other calls go on meanwhile). With the
//! `http` feature, `http` is a blocking client for the backend origins the
//! host allows (every call queued for the plugin waits while it runs).

wit_bindgen::generate!({
    world: "plugin",
    path: "../../wit",
    pub_export_macro: true,
    default_bindings_module: "chanhost_plugin",
});

pub use chanhost::plugin::{host, types};

pub mod conventions;
#[cfg(feature = "http")]
pub mod http;
pub use exports::chanhost::plugin::channel::Guest;

use types::{HttpRequest, Instance, Payload};

/// Starts `method url` with a JSON body (none when `body` is empty) and
/// the given headers; returns the id that `fetched` will carry.
pub fn fetch_json(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> u64 {
    let mut h: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    if !body.is_empty() {
        h.push(("content-type".into(), "application/json".into()));
    }
    host::fetch(&HttpRequest {
        method: method.into(),
        url: url.into(),
        headers: h,
        body: body.as_bytes().to_vec(),
    })
}

/// A payload of JSON text without attachments.
pub fn json(text: impl Into<String>) -> Payload {
    Payload {
        json: text.into(),
        attachments: Vec::new(),
    }
}

/// The instance (connection, id) as an owned value.
pub fn instance(connection: u64, id: &str) -> Instance {
    Instance {
        connection,
        id: id.to_owned(),
    }
}

/// Writes a log line at info level.
pub fn log_info(message: &str) {
    host::log(types::LogLevel::Info, message);
}

/// Writes a log line at warn level.
pub fn log_warn(message: &str) {
    host::log(types::LogLevel::Warn, message);
}
