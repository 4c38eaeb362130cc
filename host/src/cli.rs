//! The command line: `chanhost serve`, `chanhost check` and
//! `chanhost new-plugin`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::config::{Config, EnvOverrides, Overrides, RawConfig};
use crate::node::Node;
use crate::plugin::{DetachedServices, HostServices, PluginEngine, WitVersion};

/// A realtime gateway for Misskey streaming and Socket.IO, extended by WebAssembly plugins.
#[derive(Debug, Parser)]
#[command(name = "chanhost", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve {
        /// TOML config file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Address to listen on (default 127.0.0.1:3000).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Folder of plugins (*.wasm), watched for changes (default ./plugins).
        #[arg(long, value_name = "DIR")]
        plugins: Option<PathBuf>,
    },
    /// Validate a plugin and print what it serves.
    Check {
        /// The plugin component.
        plugin: PathBuf,
        /// Config file whose `[plugins.<name>]` table is passed to init.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Write the skeleton of a new plugin (with its build command in a README).
    NewPlugin {
        /// The plugin's language.
        #[arg(long, value_enum)]
        lang: crate::scaffold::Lang,
        /// The plugin's name (also its Misskey channel and Socket.IO namespace).
        name: String,
        /// Where to write it (default: ./NAME).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            config,
            listen,
            plugins,
        } => {
            let flags = Overrides { listen, plugins };
            let config = Config::load(config.as_deref(), &flags, &EnvOverrides::from_env())?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            rt.block_on(serve(config))
        }
        Command::Check { plugin, config } => check(&plugin, config.as_deref()),
        Command::NewPlugin { lang, name, dir } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            crate::scaffold::new_plugin(lang, &name, &dir)?;
            println!("wrote {} ({lang:?} plugin `{name}`)", dir.display());
            println!("build it with, in {}:", dir.display());
            println!("  {}", crate::scaffold::build_command(lang, &name));
            println!("then copy {name}.wasm into the host's plugins folder (see README.md there)");
            Ok(())
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    serve_node(Node::new(config)?).await
}

/// Serves a node until SIGINT or SIGTERM, as `chanhost serve` does: loads
/// the plugins folder and watches it, listens on the configured address.
/// For programs that embed the host (after registering native plugins on
/// `node.plugins()`).
pub async fn serve_node(node: Arc<Node>) -> anyhow::Result<()> {
    let listen = node.config().listen;
    node.join_cluster().await;
    node.load_plugins().await?;
    node.spawn_watcher()?;
    crate::server::misskey::stats::spawn(Arc::downgrade(&node));
    if let Some(bus) = &node.config().misskey.bus {
        crate::server::misskey::redis_bus::spawn(&node, bus)?;
    }
    if let Some(adapter) = &node.config().socketio.adapter {
        crate::adapter::spawn(&node, adapter)?;
    }
    crate::memory::spawn_trimmer(node.shutdown().clone());
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    node.set_bound(addr);
    tracing::info!(
        plugins = ?node.plugins().names(),
        "chanhost listening on http://{addr} (Misskey streaming at ws://{addr}/streaming)"
    );
    // A machine-readable line for scripts and tests.
    println!("listening on {addr}");
    let shutdown = node.shutdown().clone();
    tokio::spawn(async move {
        crate::server::shutdown_signal().await;
        tracing::info!("shutting down: closing connections");
        shutdown.cancel();
    });
    crate::server::serve(node.clone(), listener, Duration::from_secs(5)).await?;
    // The other nodes count this one out at once, not after node_ttl_ms.
    node.leave_cluster().await;
    tracing::info!("stopped");
    Ok(())
}

fn check(path: &Path, config: Option<&Path>) -> anyhow::Result<()> {
    let name = crate::plugin::registry::plugin_name(path)
        .with_context(|| format!("{}: a plugin file must end in .wasm", path.display()))?;
    let table = match config {
        Some(c) => {
            let raw = RawConfig::load(c)?;
            let cfg = Config::from_raw(
                raw,
                &c.display().to_string(),
                &Overrides::default(),
                &EnvOverrides::default(),
            )?;
            cfg.plugin_table_json(&name)
        }
        None => "{}".to_owned(),
    };
    let limits = Config::for_plugins(".").plugin_runtime;
    let engine = PluginEngine::new(&limits, None)?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let invalid = |e: crate::plugin::engine::PluginError| {
        anyhow::anyhow!("{}: invalid plugin: {e}", path.display())
    };
    let component = engine.compile(&bytes).map_err(invalid)?;
    let pre = engine.link(&component).map_err(invalid)?;
    let services: Arc<dyn HostServices> = Arc::new(DetachedServices::default());
    let started = engine
        .start(
            &pre,
            name.as_str().into(),
            Arc::downgrade(&services),
            &table,
        )
        .map_err(invalid)?;
    let m = &started.manifest;
    println!("{}: valid chanhost plugin `{name}`", path.display());
    let wit = pre.version();
    println!("  implements: {}", wit.export_name());
    println!(
        "  WIT: chanhost:plugin@{wit} (world `plugin`){}",
        if wit == WitVersion::CURRENT {
            String::new()
        } else {
            format!(
                "; still linked, the current version is {}",
                WitVersion::CURRENT
            )
        }
    );
    println!(
        "  version: {}",
        if m.version.is_empty() {
            "(unset)"
        } else {
            &m.version
        }
    );
    if m.channels.is_empty() {
        println!("  Misskey channels: none");
    } else {
        println!("  Misskey channels:");
        for c in &m.channels {
            let mut flags = Vec::new();
            if c.requires_user {
                flags.push("requires a user");
            }
            if c.shared {
                flags.push("shared");
            }
            let flags = if flags.is_empty() {
                String::new()
            } else {
                format!(" ({})", flags.join(", "))
            };
            println!("    {}{flags}", c.name);
        }
    }
    if !m.namespaces.is_empty() {
        println!("  Socket.IO namespaces: {}", m.namespaces.join(", "));
    }
    if !m.frames.is_empty() {
        println!("  Misskey frame types: {}", m.frames.join(", "));
    }
    if !started.listens.is_empty() {
        println!("  listens to rooms: {}", started.listens.join(", "));
    }
    Ok(())
}
