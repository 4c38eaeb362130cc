//! The host's `bindgen!`s, one per WIT version it links (`v1`:
//! `chanhost:plugin@0.1.0` from `wit/0.1.0/`, `v2`: `0.2.0` from
//! `wit/0.2.0/`, `v3`: `0.3.0` from `wit/0.3.0/`, `v4`: `0.4.0` from
//! `wit/`),
//! and the only module that touches generated names. Both implement the
//! `host` imports on [`StoreState`] by forwarding to [`HostServices`] (one
//! body, written once in the `version!` macro; 0.2.0 adds its own
//! imports), and [`Guest`] / [`GuestPre`] wrap either version's `channel`
//! exports in the plain types of [`super`].

use std::borrow::Cow;
use std::ops::Range;
use std::sync::{Arc, Weak};

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Store, StoreLimits};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::http::HttpPolicy;
use super::later::Later;
use super::packing;

use super::{
    ConnectRequest, DisconnectReason, HostServices, InstanceRef, Manifest, Payload, Rejection,
    WitVersion,
};

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
    Fetched,
    Timer,
    Recover,
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
            Hook::Fetched => "fetched",
            Hook::Timer => "timer",
            Hook::Recover => "recover",
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
    /// Fetches, deferred connects and timers (WIT 0.2.0).
    pub(super) later: Later,
}

/// What a new store is made of.
pub(super) struct StoreOptions {
    pub name: Arc<str>,
    pub services: Weak<dyn HostServices>,
    pub limits: StoreLimits,
    pub http_policy: HttpPolicy,
    pub later: Later,
}

impl StoreState {
    pub(super) fn new(o: StoreOptions) -> Self {
        // Deny by default: no preopened directories, no environment, no
        // arguments, no network, stdio discarded.
        let wasi = WasiCtx::builder().build();
        Self {
            wasi,
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
            http_policy: o.http_policy,
            limits: o.limits,
            name: o.name,
            services: o.services,
            hook: Hook::Describe,
            init_listens: Vec::new(),
            budget: Default::default(),
            later: o.later,
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
    v1::Plugin::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |s| s)?;
    v2::Plugin::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |s| s)?;
    v3::Plugin::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |s| s)?;
    v4::Plugin::add_to_linker::<StoreState, HasSelf<StoreState>>(linker, |s| s)?;
    Ok(())
}

/// What both versions share: conversions, the `host` imports (0.2.0
/// passes its added imports as `$extra`) and calls of the `channel`
/// exports, expanded inside each version's module.
macro_rules! version {
    ($($extra:tt)*) => {
        use wasmtime::Store;

        use super::StoreState;
        use crate::auth::Identity;
        use crate::hub::{Condition, Protocol};
        use crate::plugin::{
            ChannelSpec, ConnectRequest, DisconnectReason, InstanceRef, LogLevel, Manifest, Payload,
            Rejection,
        };
        use self::chanhost::plugin::types as wit;

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

        pub(super) fn wit_identity(i: Identity) -> wit::Identity {
            wit::Identity {
                user_id: i.user_id.to_string(),
                claims: i.claims.to_string(),
            }
        }

        impl self::chanhost::plugin::types::Host for StoreState {}

        impl self::chanhost::plugin::host::Host for StoreState {
                $($extra)*

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
                let local_only = self.hook == super::Hook::Event;
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
                if self.hook == super::Hook::Init {
                    if !self.init_listens.contains(&room) {
                        self.init_listens.push(room);
                    }
                } else {
                    self.with(|s| s.listen(&self.name, &room))
                }
            }

            fn unlisten(&mut self, room: String) {
                if self.hook == super::Hook::Init {
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


        /// Calls an export of this version with the host's plain types.
        pub(super) fn describe(p: &Plugin, store: &mut Store<StoreState>) -> wasmtime::Result<Manifest> {
            let m = p.chanhost_plugin_channel().call_describe(store)?;
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

        pub(super) fn init(
            p: &Plugin,
            store: &mut Store<StoreState>,
            config: &str,
        ) -> wasmtime::Result<Result<(), String>> {
            p.chanhost_plugin_channel().call_init(store, config)
        }

        pub(super) fn connect(
            p: &Plugin,
            store: &mut Store<StoreState>,
            req: ConnectRequest,
        ) -> wasmtime::Result<Result<(), Rejection>> {
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
            Ok(p
                .chanhost_plugin_channel()
                .call_connect(store, &req)?
                .map_err(|r| Rejection {
                    message: r.message,
                    data: r.data,
                }))
        }


        pub(super) fn disconnect(
            p: &Plugin,
            store: &mut Store<StoreState>,
            target: InstanceRef,
            reason: DisconnectReason,
        ) -> wasmtime::Result<()> {
            let reason = match reason {
                DisconnectReason::Client => wit::DisconnectReason::Client,
                DisconnectReason::ConnectionClosed => wit::DisconnectReason::ConnectionClosed,
                DisconnectReason::Replaced => wit::DisconnectReason::Replaced,
                DisconnectReason::Server => wit::DisconnectReason::Server,
                DisconnectReason::ConnectionLost => lost(),
            };
            p.chanhost_plugin_channel()
                .call_disconnect(store, &target.into(), reason)
        }


        pub(super) fn frame(
            p: &Plugin,
            store: &mut Store<StoreState>,
            connection: u64,
            kind: &str,
            body: &str,
        ) -> wasmtime::Result<()> {
            p.chanhost_plugin_channel()
                .call_frame(store, connection, kind, body)
        }

    };
}

/// The one-at-a-time `message` and `event` exports of 0.1.0 to 0.3.0
/// (0.4.0 has `messages` and `events`).
macro_rules! single_exports {
    () => {
        pub(super) fn message(
            p: &Plugin,
            store: &mut Store<StoreState>,
            target: InstanceRef,
            event: &str,
            data: Payload,
            ack_id: Option<u64>,
        ) -> wasmtime::Result<()> {
            p.chanhost_plugin_channel().call_message(
                store,
                &target.into(),
                event,
                &data.into(),
                ack_id,
            )
        }

        pub(super) fn event(
            p: &Plugin,
            store: &mut Store<StoreState>,
            room: &str,
            event: &str,
            data: Payload,
        ) -> wasmtime::Result<()> {
            p.chanhost_plugin_channel()
                .call_event(store, room, event, &data.into())
        }
    };
}

/// The `host` imports 0.2.0 added (fetch, deferred connects, timers),
/// expanded inside the `host` impl of 0.2.0 and later.
macro_rules! later_imports {
    () => {
        fn fetch(&mut self, request: wit::HttpRequest) -> u64 {
            let request = crate::plugin::later::FetchRequest {
                method: request.method,
                url: request.url,
                headers: request.headers,
                body: request.body,
            };
            let policy = self.http_policy.clone();
            self.later.fetch(&policy, request)
        }

        fn defer_connect(&mut self, target: wit::Instance) {
            self.later.defer_connect(target.into())
        }

        fn settle_connect(&mut self, target: wit::Instance, answer: Result<(), wit::Rejection>) {
            let answer = answer.map_err(|r| Rejection {
                message: r.message,
                data: r.data,
            });
            self.later.settle_connect(&target.into(), answer)
        }

        fn set_timer(&mut self, key: String, delay_ms: u32) {
            self.later
                .set_timer(key, std::time::Duration::from_millis(delay_ms.into()))
        }

        fn cancel_timer(&mut self, key: String) {
            self.later.cancel_timer(&key)
        }
    };
}

/// The `channel` exports 0.2.0 added (`fetched`, `timer`), for 0.2.0 and
/// later.
macro_rules! later_exports {
    () => {
        pub(super) fn fetched(
            p: &Plugin,
            store: &mut Store<StoreState>,
            id: u64,
            response: Result<crate::plugin::later::FetchResponse, String>,
        ) -> wasmtime::Result<()> {
            let response = response.map(|r| wit::HttpResponse {
                status: r.status,
                headers: r.headers,
                body: r.body,
            });
            p.chanhost_plugin_channel().call_fetched(
                store,
                id,
                response.as_ref().map_err(String::as_str),
            )
        }

        pub(super) fn timer(
            p: &Plugin,
            store: &mut Store<StoreState>,
            key: &str,
        ) -> wasmtime::Result<()> {
            p.chanhost_plugin_channel().call_timer(store, key)
        }
    };
}

/// The `recover` export of 0.3.0 and later.
macro_rules! recover_export {
    () => {
        pub(super) fn recover(
            p: &Plugin,
            store: &mut Store<StoreState>,
            req: crate::plugin::RecoverRequest,
        ) -> wasmtime::Result<Result<(), Rejection>> {
            let req = wit::RecoverRequest {
                target: req.target.into(),
                previous: req.previous.into(),
                socket_id: req.socket_id,
                away_ms: req.away_ms,
                params: req.params,
                headers: req.headers.to_vec(),
                query: req.query.to_vec(),
                identity: req.identity.map(wit_identity),
                user_connections: req.user_connections,
                rooms: req.rooms,
                missed: req.missed,
            };
            Ok(p.chanhost_plugin_channel()
                .call_recover(store, &req)?
                .map_err(|r| Rejection {
                    message: r.message,
                    data: r.data,
                }))
        }
    };
}

/// `chanhost:plugin@0.1.0`, as frozen in `wit/0.1.0/`.
mod v1 {
    wasmtime::component::bindgen!({
        path: "../wit/0.1.0",
        world: "plugin",
    });
    version!();
    single_exports!();

    /// 0.1.0 has no `connection-lost`: a lost connection is closed.
    fn lost() -> wit::DisconnectReason {
        wit::DisconnectReason::ConnectionClosed
    }
}

/// `chanhost:plugin@0.2.0`, as frozen in `wit/0.2.0/`.
mod v2 {
    wasmtime::component::bindgen!({
        path: "../wit/0.2.0",
        world: "plugin",
    });
    version!(later_imports!(););
    later_exports!();
    single_exports!();

    /// 0.2.0 has no `connection-lost`: a lost connection is closed.
    fn lost() -> wit::DisconnectReason {
        wit::DisconnectReason::ConnectionClosed
    }
}

/// `chanhost:plugin@0.3.0`, as frozen in `wit/0.3.0/`.
mod v3 {
    wasmtime::component::bindgen!({
        path: "../wit/0.3.0",
        world: "plugin",
    });
    version!(later_imports!(););
    later_exports!();
    single_exports!();
    recover_export!();

    fn lost() -> wit::DisconnectReason {
        wit::DisconnectReason::ConnectionLost
    }
}

/// `chanhost:plugin@0.4.0`, the current version (`wit/`): batches both
/// ways.
mod v4 {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "plugin",
    });
    use super::packing::{self, PackedEffect, PackedEvent, PackedMessage, Packer, Reader};
    version!(
        later_imports!();

        fn apply(&mut self, effects: Vec<wit::Effect>) {
            use self::chanhost::plugin::host::Host as H;
            for effect in effects {
                match effect {
                    wit::Effect::Send(d) => H::send(self, d.target, d.event, d.data),
                    wit::Effect::Emit(d) => H::emit(self, d.target, d.event, d.data),
                    wit::Effect::Ack(a) => H::ack(self, a.target, a.ack_id, a.args),
                    wit::Effect::Broadcast(b) => {
                        H::broadcast_filtered(self, b.room, b.event, b.data, b.except, b.conditions)
                    }
                    wit::Effect::Join(m) => H::join(self, m.target, m.room),
                    wit::Effect::Leave(m) => H::leave(self, m.target, m.room),
                }
            }
        }

        fn apply_packed(&mut self, batch: wit::EffectBatch) {
            apply_packed(self, batch)
        }
    );

    /// The effects of a packed batch, in order: each read in place from
    /// the batch's text (checked once), its owned parts made once. Words
    /// that cannot be read end the batch there (logged): a plugin's own
    /// packing is wrong, not a client's input.
    fn apply_packed(state: &mut StoreState, mut batch: wit::EffectBatch) {
        let Some(mut r) = Reader::new(&batch.text, &batch.words) else {
            tracing::warn!(
                plugin = &*state.name,
                "packed effects whose text is not UTF-8; skipped"
            );
            return;
        };
        let Some(services) = state.services.upgrade() else {
            return;
        };
        let (s, name) = (&*services, &*state.name);
        let local_only = state.hook == super::Hook::Event;
        let mut attachments = batch.attachments.iter_mut();
        let mut take = |n: usize| -> Vec<Vec<u8>> {
            attachments.by_ref().take(n).map(std::mem::take).collect()
        };
        let instance = |(connection, id): (u64, &str)| InstanceRef {
            connection,
            id: id.to_owned(),
        };
        let payload = |json: &str, attachments| Payload {
            json: json.to_owned(),
            attachments,
        };
        while !r.done() {
            let Some(effect) = PackedEffect::read(&mut r) else {
                tracing::warn!(
                    plugin = name,
                    "packed effects that cannot be read; the rest of the batch is skipped"
                );
                return;
            };
            match effect {
                PackedEffect::Send {
                    target,
                    event,
                    data,
                    attachments,
                } => s.send(
                    name,
                    instance(target),
                    event,
                    payload(data, take(attachments)),
                ),
                PackedEffect::Emit {
                    target,
                    event,
                    data,
                    attachments,
                } => s.emit(
                    name,
                    instance(target),
                    event,
                    payload(data, take(attachments)),
                ),
                PackedEffect::Ack {
                    target,
                    ack_id,
                    data,
                    attachments,
                } => s.ack(
                    name,
                    instance(target),
                    ack_id,
                    payload(data, take(attachments)),
                ),
                PackedEffect::Broadcast {
                    room,
                    event,
                    data,
                    attachments,
                    except,
                    conditions,
                } => {
                    let conditions = conditions
                        .into_iter()
                        .map(|c| Condition {
                            attribute: c.attribute.to_owned(),
                            keys: c.keys.into_iter().map(str::to_owned).collect(),
                            exclude: c.exclude,
                        })
                        .collect();
                    s.broadcast(
                        name,
                        room,
                        event,
                        payload(data, take(attachments)),
                        except.map(instance),
                        conditions,
                        local_only,
                    )
                }
                PackedEffect::Join { target, room } => s.join(name, instance(target), room),
                PackedEffect::Leave { target, room } => s.leave(name, instance(target), room),
            }
        }
    }

    later_exports!();
    recover_export!();

    fn lost() -> wit::DisconnectReason {
        wit::DisconnectReason::ConnectionLost
    }

    pub(super) fn message_batch(batch: Vec<crate::plugin::ClientMessage>) -> wit::MessageBatch {
        let bytes = batch
            .iter()
            .map(|m| m.target.id.len() + m.event.len() + m.data.json.len())
            .sum();
        let mut p = Packer::with_capacity(bytes, batch.len() * packing::MESSAGE_WORDS);
        let mut attachments = Vec::new();
        for m in batch {
            PackedMessage {
                connection: m.target.connection,
                id: &m.target.id,
                event: &m.event,
                data: &m.data.json,
                attachments: m.data.attachments.len(),
                ack_id: m.ack_id,
            }
            .write(&mut p);
            attachments.extend(m.data.attachments);
        }
        wit::MessageBatch {
            text: p.text,
            words: p.words,
            attachments,
        }
    }

    pub(super) fn event_batch<'a>(
        batch: impl Iterator<Item = (&'a str, &'a crate::hub::SharedEvent)> + Clone,
    ) -> wit::EventBatch {
        let (bytes, n) = batch.clone().fold((0, 0), |(b, n), (room, ev)| {
            (b + room.len() + ev.event.len() + ev.data.len(), n + 1)
        });
        let mut p = Packer::with_capacity(bytes, n * packing::EVENT_WORDS);
        for (room, ev) in batch {
            PackedEvent {
                room,
                event: &ev.event,
                data: &ev.data,
            }
            .write(&mut p);
        }
        wit::EventBatch {
            text: p.text,
            words: p.words,
        }
    }
}

/// Clients' messages for one `messages` call (0.4.0), packed once (see
/// [`super::packing`]). A batch given again item by item after a trap is
/// not packed again.
pub struct Messages {
    batch: v4::chanhost::plugin::types::MessageBatch,
}

impl Messages {
    pub fn new(batch: Vec<super::ClientMessage>) -> Self {
        Self {
            batch: v4::message_batch(batch),
        }
    }

    pub fn len(&self) -> usize {
        packing::message_count(&self.batch.words)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The messages of `range`: the whole batch, or a copy with only them
    /// (and their attachments).
    fn part(&self, range: Range<usize>) -> Cow<'_, v4::chanhost::plugin::types::MessageBatch> {
        if range == (0..self.len()) {
            return Cow::Borrowed(&self.batch);
        }
        let b = &self.batch;
        // The attachments before and in `range`, counted from the words.
        let count =
            |r: Range<usize>| -> usize { r.map(|i| packing::attachments_of(&b.words, i)).sum() };
        let first = count(0..range.start);
        let n = count(range.clone());
        Cow::Owned(v4::chanhost::plugin::types::MessageBatch {
            text: b.text.clone(),
            words: b
                .words
                .get(packing::message_words(range))
                .unwrap_or_default()
                .to_vec(),
            attachments: b
                .attachments
                .get(first..first + n)
                .unwrap_or_default()
                .to_vec(),
        })
    }
}

/// Room events for one `events` call (0.4.0), packed as [`Messages`].
pub struct Events {
    batch: v4::chanhost::plugin::types::EventBatch,
}

impl Events {
    pub fn new(batch: &[(Arc<str>, Arc<crate::hub::SharedEvent>)]) -> Self {
        Self {
            batch: v4::event_batch(batch.iter().map(|(r, e)| (&**r, &**e))),
        }
    }

    pub fn len(&self) -> usize {
        packing::event_count(&self.batch.words)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn part(&self, range: Range<usize>) -> Cow<'_, v4::chanhost::plugin::types::EventBatch> {
        if range == (0..self.len()) {
            return Cow::Borrowed(&self.batch);
        }
        Cow::Owned(v4::chanhost::plugin::types::EventBatch {
            text: self.batch.text.clone(),
            words: self
                .batch
                .words
                .get(packing::event_words(range))
                .unwrap_or_default()
                .to_vec(),
        })
    }
}

/// A component linked and ready to instantiate cheaply, many times.
#[derive(Clone)]
pub struct GuestPre(Pre);

#[derive(Clone)]
enum Pre {
    V1(v1::PluginPre<StoreState>),
    V2(v2::PluginPre<StoreState>),
    V3(v3::PluginPre<StoreState>),
    V4(v4::PluginPre<StoreState>),
}

impl GuestPre {
    /// Links a component built against `version`: fails if it imports
    /// something the host does not provide.
    pub fn new(
        linker: &Linker<StoreState>,
        component: &wasmtime::component::Component,
        version: WitVersion,
    ) -> wasmtime::Result<Self> {
        let pre = linker.instantiate_pre(component)?;
        Ok(GuestPre(match version {
            WitVersion::V0_1 => Pre::V1(v1::PluginPre::new(pre)?),
            WitVersion::V0_2 => Pre::V2(v2::PluginPre::new(pre)?),
            WitVersion::V0_3 => Pre::V3(v3::PluginPre::new(pre)?),
            WitVersion::V0_4 => Pre::V4(v4::PluginPre::new(pre)?),
        }))
    }

    /// The WIT version the component was built against.
    pub fn version(&self) -> WitVersion {
        match self.0 {
            Pre::V1(_) => WitVersion::V0_1,
            Pre::V2(_) => WitVersion::V0_2,
            Pre::V3(_) => WitVersion::V0_3,
            Pre::V4(_) => WitVersion::V0_4,
        }
    }

    pub fn instantiate(&self, store: &mut Store<StoreState>) -> wasmtime::Result<Guest> {
        Ok(Guest(match &self.0 {
            Pre::V1(p) => Live::V1(p.instantiate(store)?),
            Pre::V2(p) => Live::V2(p.instantiate(store)?),
            Pre::V3(p) => Live::V3(p.instantiate(store)?),
            Pre::V4(p) => Live::V4(p.instantiate(store)?),
        }))
    }
}

/// A live plugin instance.
pub struct Guest(Live);

enum Live {
    V1(v1::Plugin),
    V2(v2::Plugin),
    V3(v3::Plugin),
    V4(v4::Plugin),
}

fn set_hook(store: &mut Store<StoreState>, hook: Hook) {
    store.data_mut().hook = hook;
}

/// Calls the same export of whichever version the guest is.
macro_rules! call {
    ($guest:expr, $f:ident($($arg:expr),*)) => {
        match &$guest.0 {
            Live::V1(p) => v1::$f(p, $($arg),*),
            Live::V2(p) => v2::$f(p, $($arg),*),
            Live::V3(p) => v3::$f(p, $($arg),*),
            Live::V4(p) => v4::$f(p, $($arg),*),
        }
    };
}

impl Guest {
    pub fn describe(&self, store: &mut Store<StoreState>) -> wasmtime::Result<Manifest> {
        set_hook(store, Hook::Describe);
        call!(self, describe(store))
    }

    pub fn init(
        &self,
        store: &mut Store<StoreState>,
        config: &str,
    ) -> wasmtime::Result<Result<(), String>> {
        set_hook(store, Hook::Init);
        call!(self, init(store, config))
    }

    pub fn connect(
        &self,
        store: &mut Store<StoreState>,
        req: ConnectRequest,
    ) -> wasmtime::Result<Result<(), Rejection>> {
        set_hook(store, Hook::Connect);
        call!(self, connect(store, req))
    }

    /// Whether the guest takes messages and events in batches (0.4.0);
    /// an older one is given batches of one.
    pub fn batches(&self) -> bool {
        matches!(self.0, Live::V4(_))
    }

    /// One client's message: a `message` call (before 0.4.0), or a
    /// `messages` call with it alone.
    pub fn message(
        &self,
        store: &mut Store<StoreState>,
        m: super::ClientMessage,
    ) -> wasmtime::Result<()> {
        set_hook(store, Hook::Message);
        let (t, e, d, a) = (m.target, &*m.event, m.data, m.ack_id);
        match &self.0 {
            Live::V1(p) => v1::message(p, store, t, e, d, a),
            Live::V2(p) => v2::message(p, store, t, e, d, a),
            Live::V3(p) => v3::message(p, store, t, e, d, a),
            Live::V4(p) => {
                let batch = v4::message_batch(vec![super::ClientMessage {
                    target: t,
                    event: m.event,
                    data: d,
                    ack_id: a,
                }]);
                p.chanhost_plugin_channel().call_messages(store, &batch)
            }
        }
    }

    /// Messages `range` of a batch in one `messages` call (0.4.0 guests:
    /// the runtime batches no others).
    pub fn messages(
        &self,
        store: &mut Store<StoreState>,
        batch: &Messages,
        range: std::ops::Range<usize>,
    ) -> wasmtime::Result<()> {
        set_hook(store, Hook::Message);
        match &self.0 {
            Live::V4(p) => p
                .chanhost_plugin_channel()
                .call_messages(store, &batch.part(range)),
            _ => Err(wasmtime::format_err!(
                "a batch for a guest without `messages`"
            )),
        }
    }

    pub fn disconnect(
        &self,
        store: &mut Store<StoreState>,
        target: InstanceRef,
        reason: DisconnectReason,
    ) -> wasmtime::Result<()> {
        set_hook(store, Hook::Disconnect);
        call!(self, disconnect(store, target, reason))
    }

    /// One room event: an `event` call (before 0.4.0), or an `events`
    /// call with it alone.
    pub fn event(
        &self,
        store: &mut Store<StoreState>,
        room: &str,
        ev: &crate::hub::SharedEvent,
    ) -> wasmtime::Result<()> {
        set_hook(store, Hook::Event);
        let (e, d) = (&*ev.event, || Payload::json(&*ev.data));
        match &self.0 {
            Live::V1(p) => v1::event(p, store, room, e, d()),
            Live::V2(p) => v2::event(p, store, room, e, d()),
            Live::V3(p) => v3::event(p, store, room, e, d()),
            Live::V4(p) => p
                .chanhost_plugin_channel()
                .call_events(store, &v4::event_batch(std::iter::once((room, ev)))),
        }
    }

    /// Events `range` of a batch in one `events` call, as
    /// [`Guest::messages`].
    pub fn events(
        &self,
        store: &mut Store<StoreState>,
        batch: &Events,
        range: std::ops::Range<usize>,
    ) -> wasmtime::Result<()> {
        set_hook(store, Hook::Event);
        match &self.0 {
            Live::V4(p) => p
                .chanhost_plugin_channel()
                .call_events(store, &batch.part(range)),
            _ => Err(wasmtime::format_err!(
                "a batch for a guest without `events`"
            )),
        }
    }

    pub fn frame(
        &self,
        store: &mut Store<StoreState>,
        connection: u64,
        kind: &str,
        body: &str,
    ) -> wasmtime::Result<()> {
        set_hook(store, Hook::Frame);
        call!(self, frame(store, connection, kind, body))
    }

    /// The answer to a `fetch` (0.2.0 guests only: a 0.1.0 guest cannot
    /// have started one).
    pub fn fetched(
        &self,
        store: &mut Store<StoreState>,
        id: u64,
        response: Result<super::later::FetchResponse, String>,
    ) -> wasmtime::Result<()> {
        set_hook(store, Hook::Fetched);
        match &self.0 {
            Live::V1(_) => Ok(()),
            Live::V2(p) => v2::fetched(p, store, id, response),
            Live::V3(p) => v3::fetched(p, store, id, response),
            Live::V4(p) => v4::fetched(p, store, id, response),
        }
    }

    /// A due timer (0.2.0 guests only).
    pub fn timer(&self, store: &mut Store<StoreState>, key: &str) -> wasmtime::Result<()> {
        set_hook(store, Hook::Timer);
        match &self.0 {
            Live::V1(_) => Ok(()),
            Live::V2(p) => v2::timer(p, store, key),
            Live::V3(p) => v3::timer(p, store, key),
            Live::V4(p) => v4::timer(p, store, key),
        }
    }

    /// A socket back after losing its connection (0.3.0 guests only; the
    /// host does not offer recovery on older guests' namespaces).
    pub fn recover(
        &self,
        store: &mut Store<StoreState>,
        req: super::RecoverRequest,
    ) -> wasmtime::Result<Result<(), Rejection>> {
        set_hook(store, Hook::Recover);
        match &self.0 {
            Live::V1(_) | Live::V2(_) => Ok(Err(Rejection {
                message: "recovery needs chanhost:plugin@0.3.0".into(),
                data: None,
            })),
            Live::V3(p) => v3::recover(p, store, req),
            Live::V4(p) => v4::recover(p, store, req),
        }
    }
}
