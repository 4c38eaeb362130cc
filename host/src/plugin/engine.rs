//! The wasmtime engine shared by every plugin: configuration and limits,
//! the epoch ticker that enforces per-call deadlines, the linker with the
//! host imports and WASI, and the on-disk cache of compiled components.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

use super::bindings::{self, Guest, GuestPre, StoreOptions, StoreState};
use super::http::HttpPolicy;
use super::later::Later;
use super::{HostServices, Manifest, WitVersion};
use crate::config::PluginRuntimeConfig;

/// One epoch tick. Deadlines are whole ticks.
pub const TICK: Duration = Duration::from_millis(5);

/// Why a plugin could not be compiled, linked or started. Causes that
/// come from wasmtime are kept as their one-line text (see
/// [`describe_error`]).
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a .wasm file", .0.display())]
    NotWasm(PathBuf),
    #[error("not a valid WebAssembly component: {0}")]
    Compile(String),
    #[error("built against chanhost:plugin@{found}, but this host implements chanhost:plugin@{} (and links 0.1.0, 0.2.0 and 0.3.0 beside it); rebuild it against this host's wit/plugin.wit (`chanhost new-plugin` writes a copy)", WitVersion::CURRENT)]
    WitVersion { found: String },
    #[error("does not export `{}` (it exports {found}); build it against the `plugin` world of wit/plugin.wit", WitVersion::CURRENT.export_name())]
    NoExport { found: String },
    #[error("cannot be linked: {0}")]
    Link(String),
    #[error("failed to start: {stage}{cause}")]
    Start { stage: StartStage, cause: String },
    #[error("failed to start: cannot start plugin thread: {0}")]
    Thread(std::io::Error),
    #[error("init refused the configuration: {0}")]
    Init(String),
    #[error(transparent)]
    Conflict(#[from] Conflict),
    #[error("wasmtime engine: {0:#}")]
    Engine(wasmtime::Error),
}

/// Which step of starting a plugin failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartStage {
    Instantiate,
    Describe,
    Init,
    /// The compile-and-start task itself.
    Loader,
    /// Handing the new version to the running plugin.
    Swap,
}

impl std::fmt::Display for StartStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StartStage::Instantiate | StartStage::Swap => "",
            StartStage::Describe => "describe: ",
            StartStage::Init => "init: ",
            StartStage::Loader => "loader task failed: ",
        })
    }
}

impl PluginError {
    /// A start that failed at `stage`.
    pub fn start(stage: StartStage, cause: impl std::fmt::Display) -> Self {
        PluginError::Start {
            stage,
            cause: cause.to_string(),
        }
    }
}

/// A plugin that would serve what another serves, or declares it wrongly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    #[error("`{0}` is the name of a native plugin of this host")]
    NativeName(String),
    #[error("a plugin named `{0}` is already loaded")]
    Loaded(String),
    #[error("channel `{channel}` is already served by plugin `{plugin}`")]
    Channel { channel: String, plugin: String },
    #[error("namespace `{0}` must start with `/`")]
    NamespaceSlash(String),
    #[error("namespace `{namespace}` is already served by plugin `{plugin}`")]
    Namespace { namespace: String, plugin: String },
    #[error("channel name `{0}` is empty or declared twice")]
    ChannelName(String),
}

/// Where compiled code came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeSource {
    /// Deserialized from the on-disk cache.
    Cache,
    /// Compiled now (and written to the cache, if there is one).
    Compiled,
}

/// The engine, its linker and limits.
pub struct PluginEngine {
    engine: Engine,
    linker: Linker<StoreState>,
    limits: PluginRuntimeConfig,
    cache_dir: Option<PathBuf>,
    /// Where plugins' fetches and timers run (none outside a runtime, as
    /// in `chanhost check`).
    runtime: Option<tokio::runtime::Handle>,
}

fn engine_config(limits: &PluginRuntimeConfig, pooling: bool) -> Config {
    let mut c = Config::new();
    c.wasm_component_model(true)
        .epoch_interruption(true)
        .max_wasm_stack(limits.stack_bytes)
        .parallel_compilation(true);
    if pooling {
        let mut p = PoolingAllocationConfig::new();
        // Sized for a few dozen plugins, including JavaScript and Python
        // components with many core instances each.
        p.total_component_instances(256)
            .total_core_instances(2048)
            .total_memories(1024)
            .total_tables(1024)
            .max_core_instances_per_component(64)
            .max_memories_per_component(32)
            .max_tables_per_component(32)
            .max_component_instance_size(1 << 20)
            .max_core_instance_size(1 << 20)
            .table_elements(100_000)
            .max_memory_size(limits.memory_bytes)
            .max_unused_warm_slots(16);
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(p));
    }
    c
}

impl PluginEngine {
    /// Builds the engine. Falls back to on-demand allocation if the pooling
    /// allocator cannot reserve its address space here.
    pub fn new(
        limits: &PluginRuntimeConfig,
        cache_dir: Option<PathBuf>,
    ) -> Result<Arc<Self>, PluginError> {
        let engine = match Engine::new(&engine_config(limits, true)) {
            Ok(e) => e,
            Err(err) => {
                tracing::warn!(
                    "pooling allocator unavailable ({err:#}); using on-demand allocation"
                );
                Engine::new(&engine_config(limits, false)).map_err(PluginError::Engine)?
            }
        };
        let mut linker = Linker::new(&engine);
        bindings::add_to_linker(&mut linker).map_err(PluginError::Engine)?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                match weak.upgrade() {
                    Some(e) => e.increment_epoch(),
                    None => break,
                }
            })
            .map_err(|e| PluginError::Engine(e.into()))?;
        Ok(Arc::new(Self {
            engine,
            linker,
            limits: limits.clone(),
            cache_dir,
            runtime: tokio::runtime::Handle::try_current().ok(),
        }))
    }

    pub fn limits(&self) -> &PluginRuntimeConfig {
        &self.limits
    }

    /// Deadline of a normal call, in ticks.
    /// Arms a store for one call within the call time limit.
    pub fn arm_call(&self, store: &mut Store<StoreState>) {
        arm(store, self.limits.call_timeout)
    }

    fn cache_path(&self, bytes: &[u8]) -> Option<PathBuf> {
        let dir = self.cache_dir.as_ref()?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        let file = hex::encode(Sha256::digest(bytes));
        Some(dir.join(format!("{file}-{:016x}.cwasm", h.finish())))
    }

    /// Compiles a component, reusing the on-disk cache when the same bytes
    /// were compiled by a compatible engine before. Blocking: call it off
    /// the async runtime.
    pub fn compile(&self, bytes: &[u8]) -> Result<Component, PluginError> {
        self.compile_traced(bytes).map(|(c, _)| c)
    }

    /// [`PluginEngine::compile`], also telling where the code came from.
    pub fn compile_traced(&self, bytes: &[u8]) -> Result<(Component, CodeSource), PluginError> {
        let cached = self.cache_path(bytes);
        if let Some(path) = &cached {
            // Read into memory rather than map the file: a mapped file that
            // someone truncates later would fault the whole process.
            if let Ok(artifact) = std::fs::read(path) {
                // SAFETY: the cache folder holds only artifacts this host
                // wrote with `Component::serialize` (whole files, renamed
                // into place), named by the source's hash and the engine's
                // compatibility hash; wasmtime checks the header and version.
                match unsafe { Component::deserialize(&self.engine, &artifact) } {
                    Ok(c) => return Ok((c, CodeSource::Cache)),
                    Err(e) => tracing::warn!(
                        "ignoring unreadable cache entry {}: {}",
                        path.display(),
                        one_line(&format!("{e:#}"))
                    ),
                }
            }
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| PluginError::Compile(one_line(&format!("{e:#}"))))?;
        if let Some(path) = &cached {
            if let Err(e) = write_cache(&component, path) {
                tracing::warn!("cannot write cache entry {}: {e:#}", path.display());
            }
        }
        Ok((component, CodeSource::Compiled))
    }

    /// Links a compiled component against the host imports.
    pub fn link(&self, component: &Component) -> Result<GuestPre, PluginError> {
        let ty = component.component_type();
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_owned())
            .collect();
        let imports: Vec<String> = ty
            .imports(&self.engine)
            .map(|(n, _)| n.to_owned())
            .collect();
        // Built against a version of the contract this host does not link?
        let versions: Vec<&str> = exports
            .iter()
            .chain(&imports)
            .filter_map(|n| n.strip_prefix("chanhost:plugin/"))
            .filter_map(|n| n.split_once('@').map(|(_, v)| v))
            .collect();
        if let Some(v) = versions.iter().find(|v| WitVersion::parse(v).is_none()) {
            return Err(PluginError::WitVersion {
                found: (*v).to_owned(),
            });
        }
        let version = WitVersion::ALL
            .into_iter()
            .find(|v| exports.iter().any(|e| *e == v.export_name()));
        let Some(version) = version else {
            let found = if exports.is_empty() {
                "nothing".to_owned()
            } else {
                exports.join(", ")
            };
            return Err(PluginError::NoExport { found });
        };
        if let Some(v) = versions.iter().find(|v| **v != version.as_str()) {
            return Err(PluginError::Link(format!(
                "mixes chanhost:plugin@{v} with @{version}; build it against one version"
            )));
        }
        GuestPre::new(&self.linker, component, version)
            .map_err(|e| PluginError::Link(one_line(&format!("{e:#}"))))
    }

    /// A fresh store for one plugin instance, with its memory limit and the
    /// HTTP origins its config allows.
    pub fn new_store(
        &self,
        name: Arc<str>,
        services: Weak<dyn HostServices>,
        config: &str,
    ) -> Store<StoreState> {
        let limits = wasmtime::StoreLimitsBuilder::new()
            .memory_size(self.limits.memory_bytes)
            .trap_on_grow_failure(true)
            .build();
        let policy = HttpPolicy::from_config(config, self.limits.http_timeout);
        let later = Later::new(self.runtime.clone(), self.limits.pending_connect);
        let mut store = Store::new(
            &self.engine,
            StoreState::new(StoreOptions {
                name,
                services,
                limits,
                http_policy: policy,
                later,
            }),
        );
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_callback(|mut ctx| {
            let data = ctx.data_mut();
            let (requests, allowance) = data.http_requests();
            if requests > data.budget.extended {
                data.budget.extended += 1;
                Ok(wasmtime::UpdateDeadline::Continue(ticks(allowance)))
            } else {
                Err(wasmtime::Trap::Interrupt.into())
            }
        });
        store
    }

    /// Instantiates a linked component and runs `describe` and `init`.
    pub fn start(
        &self,
        pre: &GuestPre,
        name: Arc<str>,
        services: Weak<dyn HostServices>,
        config: &str,
    ) -> Result<Started, PluginError> {
        let mut store = self.new_store(name, services, config);
        arm(&mut store, self.limits.init_timeout);
        let guest = pre
            .instantiate(&mut store)
            .map_err(|e| PluginError::start(StartStage::Instantiate, describe_error(&e)))?;
        let manifest = guest
            .describe(&mut store)
            .map_err(|e| PluginError::start(StartStage::Describe, describe_error(&e)))?;
        guest
            .init(&mut store, config)
            .map_err(|e| PluginError::start(StartStage::Init, describe_error(&e)))?
            .map_err(PluginError::Init)?;
        let listens = std::mem::take(&mut store.data_mut().init_listens);
        Ok(Started {
            store,
            guest,
            manifest,
            listens,
        })
    }
}

/// A plugin instance that passed `describe` and `init`.
pub struct Started {
    pub store: Store<StoreState>,
    pub guest: Guest,
    pub manifest: Manifest,
    /// Rooms the instance listened to during `init`.
    pub listens: Vec<String>,
}

/// A call's time limit: `limit` of wall-clock time, extended once for each
/// HTTP request the plugin sends during the call by that request's own
/// limit, so waiting for a backend is not counted as the plugin's computing.
#[derive(Debug, Default, Clone, Copy)]
pub struct CallBudget {
    /// Requests already granted an extension.
    extended: u32,
}

/// Starts a call's budget.
pub(super) fn arm(store: &mut Store<StoreState>, limit: Duration) {
    let data = store.data_mut();
    data.budget = CallBudget::default();
    data.reset_http_requests();
    store.set_epoch_deadline(ticks(limit));
}

fn ticks(d: Duration) -> u64 {
    (d.as_millis() / TICK.as_millis()).max(1) as u64
}

fn write_cache(component: &Component, path: &Path) -> wasmtime::Result<()> {
    let bytes = component.serialize()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Collapses whitespace runs (wasmtime messages span lines) into one space.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A one-line cause for a failed call: timeouts, stack overflows and
/// memory exhaustion by name, other traps by their code, else the root
/// cause. The wasm backtrace is left out.
pub fn describe_error(e: &wasmtime::Error) -> String {
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        return match trap {
            wasmtime::Trap::Interrupt => "timed out (call deadline exceeded)".into(),
            wasmtime::Trap::StackOverflow => "stack overflow".into(),
            other => format!("trap: {other}"),
        };
    }
    let root = one_line(&e.root_cause().to_string());
    if root.contains("forcing trap when growing memory") {
        return format!("out of memory (plugin memory limit reached: {root})");
    }
    root
}
