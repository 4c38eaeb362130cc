//! The compiled-code cache: a second compile of the same bytes is read back
//! from disk; a damaged entry is recompiled and replaced.

use std::path::PathBuf;
use std::sync::Arc;

use chanhost::config::Config;
use chanhost::plugin::engine::CodeSource;
use chanhost::plugin::{DetachedServices, HostServices, PluginEngine};

fn probe_wasm() -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-plugins/probe.wasm");
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (build the test plugins with `cargo xtask plugins`)",
            path.display()
        )
    })
}

#[test]
fn second_compile_comes_from_the_cache_and_damage_is_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let limits = Config::for_plugins(dir.path()).plugin_runtime;
    let engine = PluginEngine::new(&limits, Some(cache.clone())).unwrap();
    let bytes = probe_wasm();

    let (_, first) = engine.compile_traced(&bytes).unwrap();
    assert_eq!(first, CodeSource::Compiled);
    let entries: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "one cache entry: {entries:?}");

    let (component, second) = engine.compile_traced(&bytes).unwrap();
    assert_eq!(second, CodeSource::Cache);
    // The cached code is usable: link and start it.
    let pre = engine.link(&component).unwrap();
    let services: Arc<dyn HostServices> = Arc::new(DetachedServices::default());
    let started = engine
        .start(&pre, "probe".into(), Arc::downgrade(&services), "{}")
        .unwrap();
    assert!(started.manifest.channels.iter().any(|c| c.name == "probe"));

    std::fs::write(&entries[0], b"damaged").unwrap();
    let (_, third) = engine.compile_traced(&bytes).unwrap();
    assert_eq!(third, CodeSource::Compiled);
    let (_, fourth) = engine.compile_traced(&bytes).unwrap();
    assert_eq!(fourth, CodeSource::Cache);

    // Different bytes get their own entry.
    let other =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-plugins/faulty.wasm");
    let (_, src) = engine
        .compile_traced(&std::fs::read(other).unwrap())
        .unwrap();
    assert_eq!(src, CodeSource::Compiled);
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2);
}

#[test]
fn without_a_cache_everything_compiles() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Config::for_plugins(dir.path()).plugin_runtime;
    let engine = PluginEngine::new(&limits, None).unwrap();
    let bytes = probe_wasm();
    assert_eq!(
        engine.compile_traced(&bytes).unwrap().1,
        CodeSource::Compiled
    );
    assert_eq!(
        engine.compile_traced(&bytes).unwrap().1,
        CodeSource::Compiled
    );
}
