//! The one `bindgen!` of the host, and the only module that touches
//! generated names. It implements the `host` imports on [`StoreState`] by
//! forwarding to [`HostServices`], and wraps the `channel` exports in
//! [`Guest`] / [`GuestPre`] speaking the plain types of [`super`].

use std::sync::{Arc, Weak};

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Store, StoreLimits};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::http::HttpPolicy;

use super::{
    ChannelSpec, ConnectRequest, DisconnectReason, HostServices, InstanceRef, LogLevel, Manifest,
    Payload, Rejection,
};
use crate::auth::Identity;
use crate::hub::{Condition, Protocol};

wasmtime::component::bindgen!({
    path: "../wit",
    world: "plugin",
});

use self::chanhost::plugin::types as wit;

/// The hook a store is currently running, for host calls that behave
/// differently per hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Describe,
    Init,
    Connect,
    Message,
    Disconnect,
    Event,
    Frame,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::Describe => "describe",
            Hook::Init => "init",
            Hook::Connect => "connect",
            Hook::Message => "message",
            Hook::Disconnect => "disconnect",
            Hook::Event => "event",
            Hook::Frame => "frame",
        }
    }
}

/// The data of one plugin store.
pub struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    http: WasiHttpCtx,
    http_policy: HttpPolicy,
    pub(super) limits: StoreLimits,
    name: Arc<str>,
    services: Weak<dyn HostServices>,
    /// The hook being run.
    pub(super) hook: Hook,
    /// Listens recorded during `init`; applied when the instance goes live.
    pub(super) init_listens: Vec<String>,
    /// The current call's CPU-time budget.
    pub(super) budget: super::engine::CallBudget,
}

impl StoreState {
    pub(super) fn new(
        name: Arc<str>,
        services: Weak<dyn HostServices>,
        limits: StoreLimits,
        http_policy: HttpPolicy,
    ) -> Self {
        // Deny by default: no preopened directories, no environment, no
        // arguments, no network, stdio discarded.
        let wasi = WasiCtx::builder().build();
        Self {
            wasi,
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
            http_policy,
            limits,
            name,
            services,
            hook: Hook::Describe,
            init_listens: Vec::new(),
            budget: Default::default(),
        }
    }

    /// HTTP requests sent during the current call, and the time one may take.
    pub(super) fn http_requests(&self) -> (u32, std::time::Duration) {
        (
            self.http_policy.requests,
            self.http_policy.request_allowance(),
        )
    }

    pub(super) fn reset_http_requests(&mut self) {
        self.http_policy.requests = 0;
    }

    fn with<R: Default>(&self, f: impl FnOnce(&dyn HostServices) -> R) -> R {
        match self.services.upgrade() {
            Some(s) => f(&*s),
            None => R::default(),
        }
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for StoreState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_policy,
        }
    }
}

/// Adds the `host` imports, WASI 0.2 and `wasi:http` (gated by each
/// plugin's `allow_http`) to a linker.
pub fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_sync(linker)?;
    Plugin::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |s| s)?;
    Ok(())
}

impl From<wit::Instance> for InstanceRef {
    fn from(i: wit::Instance) -> Self {
        InstanceRef {
            connection: i.connection,
            id: i.id,
        }
    }
}

impl From<InstanceRef> for wit::Instance {
    fn from(i: InstanceRef) -> Self {
        wit::Instance {
            connection: i.connection,
            id: i.id,
        }
    }
}

impl From<wit::Payload> for Payload {
    fn from(p: wit::Payload) -> Self {
        Payload {
            json: p.json,
            attachments: p.attachments,
        }
    }
}

impl From<Payload> for wit::Payload {
    fn from(p: Payload) -> Self {
        wit::Payload {
            json: p.json,
            attachments: p.attachments,
        }
    }
}

fn wit_identity(i: Identity) -> wit::Identity {
    wit::Identity {
        user_id: i.user_id.to_string(),
        claims: i.claims.to_string(),
    }
}

impl self::chanhost::plugin::types::Host for StoreState {}

impl self::chanhost::plugin::host::Host for StoreState {
    fn send(&mut self, target: wit::Instance, event: String, data: wit::Payload) {
        self.with(|s| s.send(&self.name, target.into(), &event, data.into()))
    }

    fn emit(&mut self, target: wit::Instance, event: String, args: wit::Payload) {
        self.with(|s| s.emit(&self.name, target.into(), &event, args.into()))
    }

    fn ack(&mut self, target: wit::Instance, ack_id: u64, args: wit::Payload) {
        self.with(|s| s.ack(&self.name, target.into(), ack_id, args.into()))
    }

    fn join(&mut self, target: wit::Instance, room: String) {
        self.with(|s| s.join(&self.name, target.into(), &room))
    }

    fn leave(&mut self, target: wit::Instance, room: String) {
        self.with(|s| s.leave(&self.name, target.into(), &room))
    }

    fn broadcast(
        &mut self,
        room: String,
        event: String,
        data: wit::Payload,
        except: Option<wit::Instance>,
    ) {
        self.broadcast_filtered(room, event, data, except, Vec::new())
    }

    fn broadcast_filtered(
        &mut self,
        room: String,
        event: String,
        data: wit::Payload,
        except: Option<wit::Instance>,
        conditions: Vec<wit::Condition>,
    ) {
        let local_only = self.hook == Hook::Event;
        let conditions = conditions
            .into_iter()
            .map(|c| Condition {
                attribute: c.attribute,
                keys: c.keys,
                exclude: c.exclude,
            })
            .collect();
        self.with(|s| {
            s.broadcast(
                &self.name,
                &room,
                &event,
                data.into(),
                except.map(Into::into),
                conditions,
                local_only,
            )
        })
    }

    fn set_attribute(&mut self, connection: u64, name: String, values: Vec<String>) {
        self.with(|s| s.set_attribute(&self.name, connection, &name, values, None))
    }

    fn update_attribute(
        &mut self,
        connection: u64,
        name: String,
        add: Vec<String>,
        remove: Vec<String>,
    ) {
        self.with(|s| s.set_attribute(&self.name, connection, &name, add, Some(remove)))
    }

    fn set_user_attribute(&mut self, user_id: String, name: String, values: Vec<String>) {
        self.with(|s| s.set_user_attribute(&self.name, &user_id, &name, values, None))
    }

    fn update_user_attribute(
        &mut self,
        user_id: String,
        name: String,
        add: Vec<String>,
        remove: Vec<String>,
    ) {
        self.with(|s| s.set_user_attribute(&self.name, &user_id, &name, add, Some(remove)))
    }

    fn has_user_attribute(&mut self, user_id: String, name: String) -> bool {
        self.with(|s| s.has_user_attribute(&self.name, &user_id, &name))
    }

    fn room_size(&mut self, room: String) -> u32 {
        self.with(|s| s.room_size(&room))
    }

    fn listen(&mut self, room: String) {
        if self.hook == Hook::Init {
            if !self.init_listens.contains(&room) {
                self.init_listens.push(room);
            }
        } else {
            self.with(|s| s.listen(&self.name, &room))
        }
    }

    fn unlisten(&mut self, room: String) {
        if self.hook == Hook::Init {
            self.init_listens.retain(|r| r != &room);
        } else {
            self.with(|s| s.unlisten(&self.name, &room))
        }
    }

    fn end_instance(&mut self, target: wit::Instance) {
        self.with(|s| s.end_instance(&self.name, target.into()))
    }

    fn close_connection(&mut self, connection: u64, reason: String) {
        self.with(|s| s.close_connection(&self.name, connection, &reason))
    }

    fn connection_identity(&mut self, connection: u64) -> Option<wit::Identity> {
        self.with(|s| s.identity(connection)).map(wit_identity)
    }

    fn set_identity(&mut self, connection: u64, identity: wit::Identity) -> Result<u32, String> {
        let identity = Identity {
            user_id: identity.user_id.into(),
            claims: identity.claims.into(),
        };
        // The WIT's error is the refusal's text.
        match self.services.upgrade() {
            Some(s) => s
                .set_identity(&self.name, connection, identity)
                .map_err(|e| e.to_string()),
            None => Err("host is shutting down".into()),
        }
    }

    fn online_users(&mut self) -> Vec<String> {
        self.with(|s| s.online_users())
    }

    fn verify_token(&mut self, token: String) -> Result<wit::Identity, String> {
        match self.services.upgrade() {
            Some(s) => s
                .verify_token(&token)
                .map(wit_identity)
                .map_err(|e| e.to_string()),
            None => Err("host is shutting down".into()),
        }
    }

    fn log(&mut self, level: wit::LogLevel, message: String) {
        let level = match level {
            wit::LogLevel::Debug => LogLevel::Debug,
            wit::LogLevel::Info => LogLevel::Info,
            wit::LogLevel::Warn => LogLevel::Warn,
            wit::LogLevel::Error => LogLevel::Error,
        };
        let plugin = &*self.name;
        match level {
            LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            LogLevel::Info => tracing::info!(plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
    }

    fn kv_get(&mut self, key: String) -> Option<String> {
        self.with(|s| s.kv().get(&self.name, &key))
    }

    fn kv_set(&mut self, key: String, value: String) {
        self.with(|s| s.kv().set(&self.name, &key, value))
    }

    fn kv_delete(&mut self, key: String) {
        self.with(|s| s.kv().delete(&self.name, &key))
    }

    fn kv_incr(&mut self, key: String, delta: i64) -> i64 {
        self.with(|s| s.kv().incr(&self.name, &key, delta))
    }
}

/// A component linked and ready to instantiate cheaply, many times.
#[derive(Clone)]
pub struct GuestPre(PluginPre<StoreState>);

impl GuestPre {
    /// Links a component: fails if it does not export the `channel`
    /// interface or imports something the host does not provide.
    pub fn new(
        linker: &Linker<StoreState>,
        component: &wasmtime::component::Component,
    ) -> wasmtime::Result<Self> {
        let pre = linker.instantiate_pre(component)?;
        Ok(GuestPre(PluginPre::new(pre)?))
    }

    pub fn instantiate(&self, store: &mut Store<StoreState>) -> wasmtime::Result<Guest> {
        Ok(Guest(self.0.instantiate(store)?))
    }
}

/// A live plugin instance.
pub struct Guest(Plugin);

fn set_hook(store: &mut Store<StoreState>, hook: Hook) {
    store.data_mut().hook = hook;
}

impl Guest {
    pub fn describe(&self, store: &mut Store<StoreState>) -> wasmtime::Result<Manifest> {
        set_hook(store, Hook::Describe);
        let m = self.0.chanhost_plugin_channel().call_describe(store)?;
        Ok(Manifest {
            version: m.version,
            channels: m
                .channels
                .into_iter()
                .map(|c| ChannelSpec {
                    name: c.name,
                    requires_user: c.requires_user,
                    shared: c.shared,
                })
                .collect(),
            namespaces: m.namespaces.into_iter().map(|n| n.name).collect(),
            frames: m.frames,
        })
    }

    pub fn init(
        &self,
        store: &mut Store<StoreState>,
        config: &str,
    ) -> wasmtime::Result<Result<(), String>> {
        set_hook(store, Hook::Init);
        self.0.chanhost_plugin_channel().call_init(store, config)
    }

    pub fn connect(
        &self,
        store: &mut Store<StoreState>,
        req: ConnectRequest,
    ) -> wasmtime::Result<Result<(), Rejection>> {
        set_hook(store, Hook::Connect);
        let req = wit::ConnectRequest {
            target: req.target.into(),
            protocol: match req.protocol {
                Protocol::Misskey => wit::Protocol::Misskey,
                Protocol::SocketIo => wit::Protocol::Socketio,
            },
            channel: req.channel,
            params: req.params,
            identity: req.identity.map(wit_identity),
            headers: req.headers.to_vec(),
            query: req.query.to_vec(),
            credential: req.credential.map(|c| c.to_string()),
        };
        Ok(self
            .0
            .chanhost_plugin_channel()
            .call_connect(store, &req)?
            .map_err(|r| Rejection {
                message: r.message,
                data: r.data,
            }))
    }

    pub fn message(
        &self,
        store: &mut Store<StoreState>,
        target: InstanceRef,
        event: &str,
        data: Payload,
        ack_id: Option<u64>,
    ) -> wasmtime::Result<()> {
        set_hook(store, Hook::Message);
        self.0.chanhost_plugin_channel().call_message(
            store,
            &target.into(),
            event,
            &data.into(),
            ack_id,
        )
    }

    pub fn disconnect(
        &self,
        store: &mut Store<StoreState>,
        target: InstanceRef,
        reason: DisconnectReason,
    ) -> wasmtime::Result<()> {
        set_hook(store, Hook::Disconnect);
        let reason = match reason {
            DisconnectReason::Client => wit::DisconnectReason::Client,
            DisconnectReason::ConnectionClosed => wit::DisconnectReason::ConnectionClosed,
            DisconnectReason::Replaced => wit::DisconnectReason::Replaced,
            DisconnectReason::Server => wit::DisconnectReason::Server,
        };
        self.0
            .chanhost_plugin_channel()
            .call_disconnect(store, &target.into(), reason)
    }

    pub fn event(
        &self,
        store: &mut Store<StoreState>,
        room: &str,
        event: &str,
        data: Payload,
    ) -> wasmtime::Result<()> {
        set_hook(store, Hook::Event);
        self.0
            .chanhost_plugin_channel()
            .call_event(store, room, event, &data.into())
    }

    pub fn frame(
        &self,
        store: &mut Store<StoreState>,
        connection: u64,
        kind: &str,
        body: &str,
    ) -> wasmtime::Result<()> {
        set_hook(store, Hook::Frame);
        self.0
            .chanhost_plugin_channel()
            .call_frame(store, connection, kind, body)
    }
}
