//! Rust bindings of the `chanhost:plugin@0.4.0` world, for plugins.
//!
//! ```ignore
//! use chanhost_plugin::{export, Guest, types::*};
//! struct MyPlugin;
//! impl Guest for MyPlugin { /* describe, connect, message, ... */ }
//! export!(MyPlugin);
//! ```
//!
//! [`Guest`] is the plugin's side of the contract with one method per
//! message and per event. The host gives a busy plugin what waited in its
//! queue as one batch ([`Messages`], [`Events`]), in order; by default
//! each message goes to [`Guest::on_message`], borrowed from the batch
//! (no copy), and from there, copied, to [`Guest::message`]: a plugin
//! that reads messages in place overrides `on_message`. While a batch
//! runs, what [`host`] is asked to send, emit, ack, broadcast, join or
//! leave is gathered and given to the host in one `apply` call when the
//! batch ends (or before a host call that answers, such as `kv-get`, so
//! that order holds): a burst crosses the boundary once each way. Hooks
//! without a default are `describe` and `connect`.
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
    export_macro_name: "__export_raw",
    default_bindings_module: "chanhost_plugin",
});

pub use chanhost::plugin::types;

mod batch;
pub mod conventions;
mod effects;
pub mod host;
#[cfg(feature = "http")]
pub mod http;
pub mod packing;

pub use batch::{Event, Events, Message, Messages};

use types::{
    ConnectRequest, DisconnectReason, EventBatch, HttpRequest, HttpResponse, Instance, Manifest,
    MessageBatch, Payload, RecoverRequest, Rejection,
};

/// A channel plugin: what the host calls. Every method but `describe` and
/// `connect` has a default (nothing done, or accepted).
pub trait Guest {
    /// Says what the plugin serves.
    fn describe() -> Manifest;

    /// The plugin's table from the host config, as JSON; an error refuses
    /// to load this version.
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    /// A client opens a channel instance.
    fn connect(request: ConnectRequest) -> Result<(), Rejection>;

    /// A client's message on an open instance, as owned values.
    fn message(_target: Instance, _event: String, _data: Payload, _ack_id: Option<u64>) {}

    /// A client's message, borrowed from its batch: by default copied to
    /// [`Guest::message`].
    fn on_message(m: Message<'_>) {
        Self::message(m.target(), m.event.to_owned(), m.payload(), m.ack_id)
    }

    /// Messages that waited together, in order: by default each goes to
    /// [`Guest::on_message`].
    fn messages(batch: &Messages) {
        for m in batch.iter() {
            Self::on_message(m);
        }
    }

    /// An instance ended.
    fn disconnect(_target: Instance, _reason: DisconnectReason) {}

    /// An event published to a room the plugin listens to, as owned
    /// values.
    fn event(_room: String, _event: String, _data: Payload) {}

    /// A room event, borrowed from its batch: by default copied to
    /// [`Guest::event`].
    fn on_event(e: Event<'_>) {
        Self::event(e.room.to_owned(), e.event.to_owned(), json(e.data))
    }

    /// Events that waited together, in order: by default each goes to
    /// [`Guest::on_event`].
    fn events(batch: &Events) {
        for e in batch.iter() {
            Self::on_event(e);
        }
    }

    /// A connection-level Misskey frame listed in the manifest's `frames`.
    fn frame(_connection: u64, _kind: String, _body: String) {}

    /// The answer to a `fetch`.
    fn fetched(_id: u64, _response: Result<HttpResponse, String>) {}

    /// A timer set with `set-timer` is due.
    fn timer(_key: String) {}

    /// A Socket.IO socket comes back (connection state recovery); accepted
    /// by default (the host restored its rooms and identity).
    fn recover(_request: RecoverRequest) -> Result<(), Rejection> {
        Ok(())
    }
}

/// The generated export trait, implemented for every [`Guest`]: batches
/// run with their effects gathered.
impl<T: Guest> exports::chanhost::plugin::channel::Guest for T {
    fn describe() -> Manifest {
        T::describe()
    }

    fn init(config: String) -> Result<(), String> {
        T::init(config)
    }

    fn connect(request: ConnectRequest) -> Result<(), Rejection> {
        T::connect(request)
    }

    fn messages(batch: MessageBatch) {
        effects::gathered(|| T::messages(&Messages(batch)))
    }

    fn disconnect(target: Instance, reason: DisconnectReason) {
        T::disconnect(target, reason)
    }

    fn events(batch: EventBatch) {
        effects::gathered(|| T::events(&Events(batch)))
    }

    fn frame(connection: u64, kind: String, body: String) {
        T::frame(connection, kind, body)
    }

    fn fetched(id: u64, response: Result<HttpResponse, String>) {
        T::fetched(id, response)
    }

    fn timer(key: String) {
        T::timer(key)
    }

    fn recover(request: RecoverRequest) -> Result<(), Rejection> {
        T::recover(request)
    }
}

/// Exports a [`Guest`] as the plugin's component.
#[macro_export]
macro_rules! export {
    ($ty:ident) => {
        $crate::__export_raw!($ty with_types_in $crate);
    };
}

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
