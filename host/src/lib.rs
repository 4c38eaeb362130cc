//! chanhost: a realtime gateway for the Misskey streaming protocol and
//! Socket.IO (Engine.IO v4 / Socket.IO v5) whose channels are WebAssembly
//! component plugins.
//!
//! Module map (the tree reads as the architecture):
//! - [`protocol`]: wire codecs without I/O (Misskey, Engine.IO, Socket.IO,
//!   the API bodies).
//! - [`hub`]: connections, instances, rooms, attributes, filters, fan-out
//!   (protocol-neutral).
//! - [`plugin`]: the wasmtime runtime, registry, hot reload.
//! - [`broker`]: how publishes reach every node (in-memory by default);
//!   [`presence`]: who is online, on one node or across the cluster.
//! - [`node`]: owns all of the above for one process.
//! - [`server`]: the HTTP server, admission of clients, the WebSocket wire,
//!   Misskey and Socket.IO sessions; [`api`]: publish and operations.
//! - [`auth`], [`config`], [`metrics`], [`cli`]; [`scaffold`] writes new plugins.
//! - [`conventions`]: the attribute names the host reads from what plugins
//!   write, the very file the Rust plugin SDK compiles.
//! - [`logging`]: one-line log records; [`memory`]: freed memory given back.
//! - [`pubsub`]: Redis subscriptions that outlive Redis outages;
//!   [`outbound`]: the HTTP requests the host sends.
//! - [`adapter`]: the node as a server of a socket.io cluster on
//!   `@socket.io/redis-adapter` (`[socketio.adapter]`).

pub mod adapter;
pub mod admin;
pub mod api;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod config;
#[path = "../../plugins/sdk/src/conventions.rs"]
pub mod conventions;
pub mod hub;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod outbound;
pub mod plugin;
pub mod presence;
pub mod protocol;
pub mod pubsub;
pub mod recovery;
pub mod scaffold;
pub mod server;
