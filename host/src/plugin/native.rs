//! Channel plugins compiled into the host: Rust code behind the same hooks
//! as the WIT `channel` interface, for programs that embed chanhost as a
//! library (and for the benchmarks' native baseline, `chanhost-bench
//! serve-native`).
//!
//! A native plugin gets what a WebAssembly one gets: its own thread, its
//! calls one at a time and in order from the same bounded queue, the same
//! routes (Misskey channels, Socket.IO namespaces, frame types) and the
//! same host services. What it does not get is isolation: it runs in the
//! host's address space without a deadline or a memory limit. A panic in a
//! hook is caught and logged as that call's failure; the plugin keeps
//! serving. It is registered once ([`Registry::add_native`]) and is neither
//! replaced nor removed by the plugins folder; a `.wasm` file of the same
//! name is refused.
//!
//! [`Registry::add_native`]: super::registry::Registry::add_native

use std::sync::Arc;

use super::{
    ConnectRequest, DisconnectReason, HostServices, InstanceRef, Manifest, Payload, Rejection,
};

/// The host as a native plugin sees it: its services, and its own name
/// (every service call names the calling plugin).
pub struct NativeHost<'a> {
    pub plugin: &'a Arc<str>,
    pub services: &'a dyn HostServices,
}

/// A channel plugin written in Rust. The hooks mirror the WIT `channel`
/// interface; those with a default do nothing.
pub trait NativePlugin: Send + 'static {
    /// What the plugin serves; asked once, when it is registered.
    fn describe(&self) -> Manifest;
    /// Whether a client may open an instance (`join` rooms here).
    fn connect(&mut self, host: &NativeHost<'_>, req: ConnectRequest) -> Result<(), Rejection>;
    /// A client message to an instance.
    fn message(
        &mut self,
        host: &NativeHost<'_>,
        target: InstanceRef,
        event: &str,
        data: Payload,
        ack: Option<u64>,
    );
    /// An instance ended.
    fn disconnect(
        &mut self,
        _host: &NativeHost<'_>,
        _target: InstanceRef,
        _reason: DisconnectReason,
    ) {
    }
    /// An event published to a room the plugin listens to.
    fn event(&mut self, _host: &NativeHost<'_>, _room: &str, _event: &str, _data: &str) {}
    /// A top-level Misskey frame of a type the plugin declared.
    fn frame(&mut self, _host: &NativeHost<'_>, _connection: u64, _kind: &str, _body: &str) {}
}
