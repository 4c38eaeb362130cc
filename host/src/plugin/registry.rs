//! Which plugin serves what: plugin names (the `.wasm` file's stem) to
//! running plugins, Misskey channel names and frame types to plugins.
//!
//! Loading a file compiles it off the async runtime, starts a fresh
//! instance (`describe` + `init`) beside the running version, checks that
//! it claims nothing another plugin serves, then swaps it in and updates the
//! routes in one step. Any failure leaves the running version serving.
//!
//! Native plugins ([`Registry::add_native`]) are registered once by the
//! program that embeds the host; files neither replace nor remove them.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use parking_lot::RwLock;
use sha2::{Digest, Sha256};

use super::engine::{CodeSource, Conflict, PluginEngine, PluginError, StartStage};
use super::native::NativePlugin;
use super::runtime::{PluginSlot, Version};
use super::{ChannelSpec, HostServices, Manifest};

/// What loading a file did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadOutcome {
    /// A new plugin now serves.
    Added(Arc<Manifest>),
    /// A new version replaced the running one. `dropped_channels` are
    /// channels the old version served and the new one does not.
    Replaced {
        manifest: Arc<Manifest>,
        dropped_channels: Vec<String>,
    },
    /// The file is byte-identical to the running version.
    Unchanged,
}

#[derive(Default)]
struct Routes {
    channels: HashMap<String, (Arc<PluginSlot>, ChannelSpec)>,
    namespaces: HashMap<String, Arc<PluginSlot>>,
    frames: HashMap<String, Vec<Arc<PluginSlot>>>,
}

/// The plugin registry of a host.
pub struct Registry {
    engine: Arc<PluginEngine>,
    services: Weak<dyn HostServices>,
    tables: HashMap<String, String>,
    plugins: RwLock<HashMap<Arc<str>, Arc<PluginSlot>>>,
    /// Names of the native plugins among `plugins`.
    native: RwLock<HashSet<Arc<str>>>,
    routes: RwLock<Routes>,
    /// Serialises loads and removals.
    loading: tokio::sync::Mutex<()>,
    /// Components being compiled and started right now.
    compiling: std::sync::atomic::AtomicU64,
    /// Plugin code loaded: [compiled, from the on-disk cache].
    code_loads: Arc<[std::sync::atomic::AtomicU64; 2]>,
}

/// Decrements a counter when dropped.
struct CountDown<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for CountDown<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The plugin name of a file: its stem (`plugins/misskey.wasm` -> `misskey`).
pub fn plugin_name(path: &Path) -> Option<String> {
    if path.extension()? != "wasm" {
        return None;
    }
    Some(path.file_stem()?.to_str()?.to_owned())
}

impl Registry {
    /// `tables` are the plugins' config tables as JSON text, by name.
    pub fn new(
        engine: Arc<PluginEngine>,
        services: Weak<dyn HostServices>,
        tables: HashMap<String, String>,
    ) -> Self {
        Self {
            engine,
            services,
            tables,
            plugins: RwLock::new(HashMap::new()),
            native: RwLock::new(HashSet::new()),
            routes: RwLock::new(Routes::default()),
            loading: tokio::sync::Mutex::new(()),
            compiling: Default::default(),
            code_loads: Default::default(),
        }
    }

    /// The plugin serving a Misskey channel, and the channel's spec.
    pub fn channel(&self, name: &str) -> Option<(Arc<PluginSlot>, ChannelSpec)> {
        self.routes.read().channels.get(name).cloned()
    }

    /// The plugin serving a Socket.IO namespace.
    pub fn namespace(&self, nsp: &str) -> Option<Arc<PluginSlot>> {
        self.routes.read().namespaces.get(nsp).cloned()
    }

    /// Every Socket.IO namespace a running plugin serves, sorted.
    pub fn namespaces(&self) -> Vec<String> {
        let mut n: Vec<String> = self.routes.read().namespaces.keys().cloned().collect();
        n.sort();
        n
    }

    /// The plugins that declared a top-level Misskey frame type.
    pub fn frame_handlers(&self, kind: &str) -> Vec<Arc<PluginSlot>> {
        self.routes
            .read()
            .frames
            .get(kind)
            .cloned()
            .unwrap_or_default()
    }

    /// A running plugin by name.
    pub fn plugin(&self, name: &str) -> Option<Arc<PluginSlot>> {
        self.plugins.read().get(name).cloned()
    }

    /// Names of the running plugins, sorted.
    pub fn names(&self) -> Vec<Arc<str>> {
        let mut v: Vec<_> = self.plugins.read().keys().cloned().collect();
        v.sort();
        v
    }

    /// How many plugin files are being compiled and started now (off the
    /// async runtime; deliveries go on meanwhile).
    pub fn compiling(&self) -> u64 {
        self.compiling.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Plugin code loaded so far: (compiled, read from the cache).
    pub fn code_loads(&self) -> (u64, u64) {
        let l = self.code_loads.as_ref();
        (
            l[0].load(std::sync::atomic::Ordering::Relaxed),
            l[1].load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Every running plugin.
    pub fn all(&self) -> Vec<Arc<PluginSlot>> {
        self.plugins.read().values().cloned().collect()
    }

    /// Loads or replaces the plugin in `path`.
    pub async fn load_file(&self, path: &Path) -> Result<LoadOutcome, PluginError> {
        let name = plugin_name(path).ok_or_else(|| PluginError::NotWasm(path.to_owned()))?;
        let _guard = self.loading.lock().await;
        if self.is_native(&name) {
            return Err(Conflict::NativeName(name.to_string()).into());
        }
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|source| PluginError::Read {
                path: path.to_owned(),
                source,
            })?;
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        let existing = self.plugin(&name);
        if existing.as_ref().is_some_and(|p| p.hash() == hash) {
            return Ok(LoadOutcome::Unchanged);
        }
        let name: Arc<str> = name.into();
        let config = self
            .tables
            .get(&*name)
            .cloned()
            .unwrap_or_else(|| "{}".to_owned());
        let engine = self.engine.clone();
        let services = self.services.clone();
        let (n, c) = (name.clone(), config.clone());
        let code_loads = self.code_loads.clone();
        self.compiling
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _done = CountDown(&self.compiling);
        let (pre, started) = tokio::task::spawn_blocking(move || {
            let (component, source) = engine.compile_traced(&bytes)?;
            tracing::debug!(plugin = &*n, ?source, "plugin code ready");
            let i = usize::from(source == CodeSource::Cache);
            code_loads[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let pre = engine.link(&component)?;
            let started = engine.start(&pre, n, services, &c)?;
            Ok::<_, PluginError>((pre, started))
        })
        .await
        .map_err(|e| PluginError::start(StartStage::Loader, e))??;
        let manifest = Arc::new(started.manifest.clone());
        self.check_conflicts(&name, &manifest)?;
        let wit = pre.version();
        let version = Version {
            pre,
            manifest: manifest.clone(),
            config,
            hash,
        };
        match existing {
            Some(slot) => {
                let old = slot.manifest();
                slot.swap(version, started)
                    .await
                    .map_err(|e| PluginError::start(StartStage::Swap, e))?;
                slot.loaded(Some(path), Some(wit));
                self.set_routes(&slot, Some(&old), &manifest);
                let mut dropped_channels: Vec<String> = old
                    .channels
                    .iter()
                    .filter(|c| !manifest.channels.iter().any(|n| n.name == c.name))
                    .map(|c| c.name.clone())
                    .collect();
                dropped_channels.extend(
                    old.namespaces
                        .iter()
                        .filter(|n| !manifest.namespaces.contains(n))
                        .cloned(),
                );
                Ok(LoadOutcome::Replaced {
                    manifest,
                    dropped_channels,
                })
            }
            None => {
                let slot = PluginSlot::spawn(
                    name.clone(),
                    self.engine.clone(),
                    self.services.clone(),
                    version,
                    started,
                )
                .map_err(PluginError::Thread)?;
                slot.loaded(Some(path), Some(wit));
                self.plugins.write().insert(name, slot.clone());
                self.set_routes(&slot, None, &manifest);
                Ok(LoadOutcome::Added(manifest))
            }
        }
    }

    fn check_conflicts(&self, name: &str, manifest: &Manifest) -> Result<(), PluginError> {
        let routes = self.routes.read();
        for c in &manifest.channels {
            if let Some((other, _)) = routes.channels.get(&c.name) {
                if &*other.name != name {
                    return Err(Conflict::Channel {
                        channel: c.name.clone(),
                        plugin: other.name.to_string(),
                    }
                    .into());
                }
            }
        }
        for n in &manifest.namespaces {
            if !n.starts_with('/') {
                return Err(Conflict::NamespaceSlash(n.clone()).into());
            }
            if let Some(other) = routes.namespaces.get(n) {
                if &*other.name != name {
                    return Err(Conflict::Namespace {
                        namespace: n.clone(),
                        plugin: other.name.to_string(),
                    }
                    .into());
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for c in &manifest.channels {
            if c.name.is_empty() || !seen.insert(&c.name) {
                return Err(Conflict::ChannelName(c.name.clone()).into());
            }
        }
        Ok(())
    }

    fn set_routes(&self, slot: &Arc<PluginSlot>, old: Option<&Manifest>, new: &Manifest) {
        let mut routes = self.routes.write();
        if let Some(old) = old {
            remove_routes(&mut routes, &slot.name, old);
        }
        for c in &new.channels {
            routes
                .channels
                .insert(c.name.clone(), (slot.clone(), c.clone()));
        }
        for n in &new.namespaces {
            routes.namespaces.insert(n.clone(), slot.clone());
        }
        for f in &new.frames {
            routes
                .frames
                .entry(f.clone())
                .or_default()
                .push(slot.clone());
        }
    }

    /// Registers a native plugin under `name`, with what its `describe`
    /// returns; refused if the name is taken or it claims a channel,
    /// namespace or frame type another plugin serves.
    pub async fn add_native(
        &self,
        name: &str,
        plugin: Box<dyn NativePlugin>,
    ) -> Result<Arc<Manifest>, PluginError> {
        let _guard = self.loading.lock().await;
        if self.plugin(name).is_some() {
            return Err(Conflict::Loaded(name.to_owned()).into());
        }
        let manifest = Arc::new(plugin.describe());
        self.check_conflicts(name, &manifest)?;
        let name: Arc<str> = name.into();
        let slot = PluginSlot::spawn_native(
            name.clone(),
            self.services.clone(),
            plugin,
            manifest.clone(),
            super::runtime::QueueBound::of(self.engine.limits()),
        )
        .map_err(PluginError::Thread)?;
        slot.loaded(None, None);
        self.native.write().insert(name.clone());
        self.plugins.write().insert(name, slot.clone());
        self.set_routes(&slot, None, &manifest);
        Ok(manifest)
    }

    /// Whether `name` is a native plugin.
    pub fn is_native(&self, name: &str) -> bool {
        self.native.read().contains(name)
    }

    /// Removes a plugin: its routes go first, then its thread stops after
    /// the calls already queued. Returns the channels it served. Native
    /// plugins are not removed (None).
    pub async fn remove(&self, name: &str) -> Option<Arc<Manifest>> {
        let _guard = self.loading.lock().await;
        if self.is_native(name) {
            return None;
        }
        let slot = self.plugins.write().remove(name)?;
        let manifest = slot.manifest();
        remove_routes(&mut self.routes.write(), name, &manifest);
        slot.stop();
        Some(manifest)
    }

    /// Stops every plugin thread.
    pub fn stop_all(&self) {
        for p in self.plugins.write().drain() {
            p.1.stop();
        }
    }

    /// The `.wasm` files directly inside a folder, sorted.
    pub fn scan(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file() && plugin_name(p).is_some())
            .collect();
        files.sort();
        Ok(files)
    }
}

fn remove_routes(routes: &mut Routes, name: &str, manifest: &Manifest) {
    for c in &manifest.channels {
        if routes
            .channels
            .get(&c.name)
            .is_some_and(|(s, _)| &*s.name == name)
        {
            routes.channels.remove(&c.name);
        }
    }
    for n in &manifest.namespaces {
        if routes.namespaces.get(n).is_some_and(|s| &*s.name == name) {
            routes.namespaces.remove(n);
        }
    }
    for f in &manifest.frames {
        if let Some(v) = routes.frames.get_mut(f) {
            v.retain(|s| &*s.name != name);
            if v.is_empty() {
                routes.frames.remove(f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::config::Config;
    use crate::plugin::native::{NativeHost, NativePlugin};
    use crate::plugin::{
        ConnectRequest, DetachedServices, InstanceRef, Payload, Protocol, Rejection,
    };

    /// Records the messages it gets; panics on `boom`; refuses `deny`.
    struct Echo {
        channel: &'static str,
        seen: Arc<Mutex<Vec<String>>>,
        done: std::sync::mpsc::Sender<()>,
    }

    impl NativePlugin for Echo {
        fn describe(&self) -> Manifest {
            Manifest {
                version: "echo-1".into(),
                channels: vec![ChannelSpec {
                    name: self.channel.into(),
                    requires_user: false,
                    shared: false,
                }],
                namespaces: vec![format!("/{}", self.channel)],
                frames: vec![],
            }
        }
        fn connect(&mut self, _: &NativeHost<'_>, req: ConnectRequest) -> Result<(), Rejection> {
            match req.params.as_str() {
                "deny" => Err(Rejection {
                    message: "denied".into(),
                    data: None,
                }),
                _ => Ok(()),
            }
        }
        fn message(
            &mut self,
            host: &NativeHost<'_>,
            _: InstanceRef,
            event: &str,
            _: Payload,
            _: Option<u64>,
        ) {
            assert_ne!(event, "boom", "boom");
            self.seen
                .lock()
                .unwrap()
                .push(format!("{}:{event}", host.plugin));
            let _ = self.done.send(());
        }
    }

    fn registry(services: &Arc<dyn HostServices>) -> Registry {
        let limits = Config::for_plugins(".").plugin_runtime;
        let engine = PluginEngine::new(&limits, None).expect("engine");
        Registry::new(engine, Arc::downgrade(services), HashMap::new())
    }

    fn request(params: &str) -> ConnectRequest {
        ConnectRequest {
            target: InstanceRef {
                connection: 1,
                id: "a".into(),
            },
            protocol: Protocol::Misskey,
            channel: "echo".into(),
            params: params.into(),
            identity: None,
            headers: Arc::from([]),
            query: Arc::from([]),
            credential: None,
        }
    }

    #[tokio::test]
    async fn a_native_plugin_serves_its_routes_and_survives_a_panic() {
        let services: Arc<dyn HostServices> = Arc::new(DetachedServices::default());
        let reg = registry(&services);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (done, wait) = std::sync::mpsc::channel();
        let echo = Echo {
            channel: "echo",
            seen: seen.clone(),
            done,
        };
        let manifest = reg.add_native("echo", Box::new(echo)).await.unwrap();
        assert_eq!(manifest.version, "echo-1");
        assert!(reg.is_native("echo"));
        let (slot, spec) = reg.channel("echo").expect("channel routed");
        assert_eq!((&*slot.name, spec.name.as_str()), ("echo", "echo"));
        assert!(reg.namespace("/echo").is_some());

        assert_eq!(slot.connect(request("{}")).await, Ok(Ok(())));
        let refused = slot.connect(request("deny")).await.unwrap().unwrap_err();
        assert_eq!(refused.message, "denied");

        let target = InstanceRef {
            connection: 1,
            id: "a".into(),
        };
        slot.message(target.clone(), "boom".into(), Payload::json("1"), None);
        slot.message(target, "after".into(), Payload::json("1"), None);
        wait.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the call after the panic ran");
        assert_eq!(*seen.lock().unwrap(), vec!["echo:after".to_owned()]);
        let message = slot.metrics.by_hook().find(|h| h.hook == "message");
        assert_eq!(message.map(|h| (h.calls, h.errors)), Some((2, 1)));
        reg.stop_all();
    }

    #[tokio::test]
    async fn native_plugins_keep_their_names_and_routes() {
        let services: Arc<dyn HostServices> = Arc::new(DetachedServices::default());
        let reg = registry(&services);
        let echo = |channel| {
            Box::new(Echo {
                channel,
                seen: Default::default(),
                done: std::sync::mpsc::channel().0,
            })
        };
        reg.add_native("echo", echo("echo")).await.unwrap();
        // Same name, or another name claiming the same channel: refused.
        assert!(matches!(
            reg.add_native("echo", echo("other")).await,
            Err(PluginError::Conflict(_))
        ));
        assert!(matches!(
            reg.add_native("twin", echo("echo")).await,
            Err(PluginError::Conflict(_))
        ));
        assert!(reg.plugin("twin").is_none());
        // A file of the same name is refused before it is read.
        let dir = std::env::temp_dir().join(format!("chanhost-native-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("echo.wasm");
        std::fs::write(&file, b"not read").unwrap();
        let err = reg.load_file(&file).await.unwrap_err();
        assert!(err.to_string().contains("native plugin"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        // The folder does not remove it.
        assert!(reg.remove("echo").await.is_none());
        assert!(reg.channel("echo").is_some());
        reg.stop_all();
    }
}
