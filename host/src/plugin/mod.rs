//! The plugin runtime: everything between the host and WebAssembly channel
//! plugins.
//!
//! - `bindings` holds the `bindgen!`s of the `chanhost:plugin` WIT (each
//!   version the host links, [`WitVersion`]) and converts generated types
//!   to the plain types of this module; no other module touches generated
//!   names.
//! - [`later`]: what 0.2.0 plugins ask to happen later: fetches, deferred
//!   connects, timers.
//! - [`engine`] configures wasmtime (pooling allocator, epoch deadlines,
//!   memory and stack limits, deny-by-default WASI) and caches compiled code.
//! - [`runtime`] runs each plugin on its own thread: one long-lived instance,
//!   calls one at a time from a queue bounded in calls and bytes, a failed
//!   call rebuilds the instance with backoff.
//! - [`native`]: plugins compiled into a program that embeds the host,
//!   behind the same slot and thread.
//! - [`kv`]: each plugin's key-value store.
//! - [`registry`] maps channel names and frame types to plugins, and loads,
//!   replaces and removes plugin files (the folder itself is the node's).
//! - [`http`] gates outbound `wasi:http` requests by each plugin's `allow_http`.
//!
//! Plugins reach the rest of the host only through [`HostServices`].

mod bindings;
pub mod engine;
pub mod http;
pub mod kv;
pub mod later;
pub mod native;
/// The word layouts of packed batches, shared with the Rust SDK.
#[path = "../../../plugins/sdk/src/packing.rs"]
pub mod packing;
pub mod registry;
pub mod runtime;

use std::sync::Arc;

use crate::auth::Identity;
use crate::hub::Protocol;

pub use bindings::{Events, Messages};
pub use engine::PluginEngine;
pub use registry::Registry;
pub use runtime::{CallError, HookCounts, HookFigures, Origin, PluginSlot};

/// A version of the `chanhost:plugin` WIT package the host links.
/// Components built against any of them load side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WitVersion {
    /// `0.1.0`, frozen in `wit/0.1.0/`.
    V0_1,
    /// `0.2.0`, frozen in `wit/0.2.0/`: 0.1.0 plus `fetch`, deferred
    /// connects and timers.
    V0_2,
    /// `0.3.0`, frozen in `wit/0.3.0/`: 0.2.0 plus `recover` (connection
    /// state recovery) and `connection-lost`.
    V0_3,
    /// `0.4.0`, the current version (`wit/plugin.wit`): 0.3.0 with
    /// `messages` / `events` (batches) in place of `message` / `event`,
    /// and `apply` (effects in one call).
    V0_4,
}

impl WitVersion {
    /// Every version the host links, newest first.
    pub const ALL: [WitVersion; 4] = [
        WitVersion::V0_4,
        WitVersion::V0_3,
        WitVersion::V0_2,
        WitVersion::V0_1,
    ];
    /// The version `chanhost new-plugin` and the SDK build against.
    pub const CURRENT: WitVersion = WitVersion::V0_4;

    pub fn as_str(self) -> &'static str {
        match self {
            WitVersion::V0_1 => "0.1.0",
            WitVersion::V0_2 => "0.2.0",
            WitVersion::V0_3 => "0.3.0",
            WitVersion::V0_4 => "0.4.0",
        }
    }

    /// Whether the host may recover this version's sockets (it has
    /// `recover`).
    pub fn recovers(self) -> bool {
        matches!(self, WitVersion::V0_3 | WitVersion::V0_4)
    }

    /// Whether this version takes messages and events in batches.
    pub fn batches(self) -> bool {
        self == WitVersion::V0_4
    }

    /// The interface a component of this version exports.
    pub fn export_name(self) -> String {
        format!("chanhost:plugin/channel@{}", self.as_str())
    }

    pub fn parse(v: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.as_str() == v)
    }
}

impl std::fmt::Display for WitVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One channel instance, as plugins address it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InstanceRef {
    pub connection: u64,
    pub id: String,
}

/// A message a client sent on an open instance, for the plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientMessage {
    pub target: InstanceRef,
    pub event: String,
    pub data: Payload,
    pub ack_id: Option<u64>,
}

/// A message body: JSON text and binary attachments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Payload {
    pub json: String,
    pub attachments: Vec<Vec<u8>>,
}

impl Payload {
    pub fn json(json: impl Into<String>) -> Self {
        Self {
            json: json.into(),
            attachments: Vec::new(),
        }
    }
}

/// Log severity of a plugin's log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

/// One Misskey channel a plugin serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelSpec {
    pub name: String,
    pub requires_user: bool,
    pub shared: bool,
}

/// What a plugin serves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    pub version: String,
    pub channels: Vec<ChannelSpec>,
    pub namespaces: Vec<String>,
    pub frames: Vec<String>,
}

/// A client's request to open a channel instance.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub target: InstanceRef,
    pub protocol: Protocol,
    pub channel: String,
    pub params: String,
    pub identity: Option<Identity>,
    pub headers: Arc<[(String, String)]>,
    pub query: Arc<[(String, String)]>,
    pub credential: Option<Arc<str>>,
}

/// A plugin's refusal of a connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub message: String,
    pub data: Option<String>,
}

/// Why an instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    Client,
    ConnectionClosed,
    Replaced,
    Server,
    /// The connection was lost and the socket's session is kept for
    /// recovery (0.3.0; older guests hear `connection-closed`).
    ConnectionLost,
}

/// A socket back after losing its connection (WIT `recover-request`).
#[derive(Debug, Clone)]
pub struct RecoverRequest {
    pub target: InstanceRef,
    pub previous: InstanceRef,
    pub socket_id: String,
    pub away_ms: u64,
    pub params: String,
    pub headers: crate::server::Pairs,
    pub query: crate::server::Pairs,
    pub identity: Option<crate::auth::Identity>,
    pub user_connections: u32,
    pub rooms: Vec<String>,
    pub missed: u32,
}

/// What plugins may do to the host. Implemented by the node; every call
/// names the calling plugin so the host can check ownership of instances.
pub trait HostServices: Send + Sync {
    fn send(&self, plugin: &str, target: InstanceRef, event: &str, data: Payload);
    fn emit(&self, plugin: &str, target: InstanceRef, event: &str, args: Payload);
    fn ack(&self, plugin: &str, target: InstanceRef, ack_id: u64, args: Payload);
    fn join(&self, plugin: &str, target: InstanceRef, room: &str);
    fn leave(&self, plugin: &str, target: InstanceRef, room: &str);
    /// `local_only` is set when called from an `event` hook (every node
    /// runs the same hook, so the delivery must not cross nodes).
    /// `conditions` (with `plugin`'s attribute sets) narrow the members.
    #[allow(clippy::too_many_arguments)]
    fn broadcast(
        &self,
        plugin: &str,
        room: &str,
        event: &str,
        data: Payload,
        except: Option<InstanceRef>,
        conditions: Vec<crate::hub::Condition>,
        local_only: bool,
    );
    /// Replaces (`remove` = None) or updates an attribute set of `plugin`
    /// on a connection it serves.
    fn set_attribute(
        &self,
        plugin: &str,
        connection: u64,
        name: &str,
        add: Vec<String>,
        remove: Option<Vec<String>>,
    );
    /// Replaces (`remove` = None) or updates an attribute set of `plugin`
    /// shared by every connection of `user` on this node.
    fn set_user_attribute(
        &self,
        plugin: &str,
        user: &str,
        name: &str,
        add: Vec<String>,
        remove: Option<Vec<String>>,
    );
    /// Whether `user` has a non-empty attribute set `name` of `plugin` here.
    fn has_user_attribute(&self, plugin: &str, user: &str, name: &str) -> bool;
    /// Members of a room on this node.
    fn room_size(&self, room: &str) -> u32;
    fn listen(&self, plugin: &Arc<str>, room: &str);
    fn unlisten(&self, plugin: &str, room: &str);
    /// Replaces a plugin's listens (a new version's standing listens).
    fn set_listens(&self, plugin: &Arc<str>, rooms: &[String]);
    fn end_instance(&self, plugin: &str, target: InstanceRef);
    fn close_connection(&self, plugin: &str, connection: u64, reason: &str);
    fn identity(&self, connection: u64) -> Option<Identity>;
    /// Identifies a connection the plugin serves; returns the user's number
    /// of connections on this node.
    fn set_identity(
        &self,
        plugin: &str,
        connection: u64,
        identity: Identity,
    ) -> Result<u32, IdentityError>;
    /// Users with at least one identified connection.
    fn online_users(&self) -> Vec<String>;
    /// Checks a token with the configured auth providers.
    fn verify_token(&self, token: &str) -> Result<Identity, crate::auth::AuthError>;
    fn kv(&self) -> &dyn kv::KvStore;
}

/// Why a plugin could not identify a connection (the WIT's `set-identity`
/// error text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("no such connection")]
    NoConnection,
    #[error("the plugin serves no instance on this connection")]
    NotServed,
    #[error("claims must be a JSON object")]
    ClaimsNotJson,
    #[error(transparent)]
    Hub(#[from] crate::hub::IdentifyError),
    #[error("no connections outside a running host")]
    Detached,
}

/// Services for a plugin that runs outside a live host (`chanhost check`):
/// every effect is dropped, the key-value store is private.
#[derive(Default)]
pub struct DetachedServices {
    kv: kv::MemoryKv,
}

impl HostServices for DetachedServices {
    fn send(&self, _: &str, _: InstanceRef, _: &str, _: Payload) {}
    fn emit(&self, _: &str, _: InstanceRef, _: &str, _: Payload) {}
    fn ack(&self, _: &str, _: InstanceRef, _: u64, _: Payload) {}
    fn join(&self, _: &str, _: InstanceRef, _: &str) {}
    fn leave(&self, _: &str, _: InstanceRef, _: &str) {}
    fn broadcast(
        &self,
        _: &str,
        _: &str,
        _: &str,
        _: Payload,
        _: Option<InstanceRef>,
        _: Vec<crate::hub::Condition>,
        _: bool,
    ) {
    }
    fn set_attribute(&self, _: &str, _: u64, _: &str, _: Vec<String>, _: Option<Vec<String>>) {}
    fn set_user_attribute(
        &self,
        _: &str,
        _: &str,
        _: &str,
        _: Vec<String>,
        _: Option<Vec<String>>,
    ) {
    }
    fn has_user_attribute(&self, _: &str, _: &str, _: &str) -> bool {
        false
    }
    fn room_size(&self, _: &str) -> u32 {
        0
    }
    fn listen(&self, _: &Arc<str>, _: &str) {}
    fn unlisten(&self, _: &str, _: &str) {}
    fn set_listens(&self, _: &Arc<str>, _: &[String]) {}
    fn end_instance(&self, _: &str, _: InstanceRef) {}
    fn close_connection(&self, _: &str, _: u64, _: &str) {}
    fn identity(&self, _: u64) -> Option<Identity> {
        None
    }
    fn set_identity(&self, _: &str, _: u64, _: Identity) -> Result<u32, IdentityError> {
        Err(IdentityError::Detached)
    }
    fn online_users(&self) -> Vec<String> {
        Vec::new()
    }
    fn verify_token(&self, _: &str) -> Result<Identity, crate::auth::AuthError> {
        Err(crate::auth::AuthError::Unavailable(
            "no auth providers outside a running host".into(),
        ))
    }
    fn kv(&self) -> &dyn kv::KvStore {
        &self.kv
    }
}
