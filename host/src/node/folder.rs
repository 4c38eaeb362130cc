//! The plugins folder, kept in line with the registry: the first load
//! (the folder must exist), reconciliation (new and changed files load,
//! plugins whose file is gone are removed and their instances end) and the
//! [`super::watcher`] that triggers it on every settled change.

use std::sync::Arc;

use super::watcher::FolderWatch;
use super::{Node, NodeError};
use crate::plugin::registry::LoadOutcome;
use crate::plugin::Registry;

impl Node {
    fn dir_label(&self) -> String {
        self.config.plugins_dir.display().to_string()
    }

    /// Checks the plugins folder and loads every plugin in it. A plugin
    /// that fails to load is reported and skipped; the others serve.
    pub async fn load_plugins(&self) -> Result<(), NodeError> {
        let dir = &self.config.plugins_dir;
        if !dir.exists() {
            return Err(NodeError::NoPluginsDir(self.dir_label()));
        }
        if !dir.is_dir() {
            return Err(NodeError::PluginsNotDir(self.dir_label()));
        }
        self.reconcile_plugins().await
    }

    /// Brings the registry in line with the folder: loads new and changed
    /// files, removes plugins whose file is gone.
    pub async fn reconcile_plugins(&self) -> Result<(), NodeError> {
        let files = Registry::scan(&self.config.plugins_dir).map_err(|source| {
            NodeError::ReadPluginsDir {
                path: self.dir_label(),
                source,
            }
        })?;
        let mut present = Vec::new();
        for path in &files {
            let Some(name) = crate::plugin::registry::plugin_name(path) else {
                continue;
            };
            present.push(name.clone());
            match self.plugins.load_file(path).await {
                Ok(LoadOutcome::Unchanged) => {}
                Ok(LoadOutcome::Added(m)) => {
                    self.metrics.reloads_ok.inc();
                    tracing::info!(
                        plugin = name,
                        file = %path.display(),
                        version = m.version,
                        channels = ?m.channels.iter().map(|c| &c.name).collect::<Vec<_>>(),
                        namespaces = ?m.namespaces,
                        "plugin loaded"
                    );
                }
                Ok(LoadOutcome::Replaced {
                    manifest,
                    dropped_channels,
                }) => {
                    self.metrics.reloads_ok.inc();
                    tracing::info!(
                        plugin = name,
                        file = %path.display(),
                        version = manifest.version,
                        "plugin replaced; connections keep their channels"
                    );
                    if !dropped_channels.is_empty() {
                        self.end_plugin_instances(&name, Some(&dropped_channels));
                    }
                }
                Err(e) => {
                    self.metrics.reloads_failed.inc();
                    let serving = if self.plugins.plugin(&name).is_some() {
                        "; the previous version keeps serving"
                    } else {
                        ""
                    };
                    tracing::error!(
                        plugin = name,
                        file = %path.display(),
                        "plugin not loaded: {e}{serving}"
                    );
                }
            }
        }
        for name in self.plugins.names() {
            if !present.iter().any(|p| **p == *name) && self.plugins.remove(&name).await.is_some() {
                self.hub.unlisten_all(&name);
                tracing::info!(plugin = &*name, "plugin removed; its channel instances end");
                self.end_plugin_instances(&name, None);
            }
        }
        Ok(())
    }

    /// Watches the plugins folder and reconciles on every settled change.
    pub fn spawn_watcher(self: &Arc<Self>) -> Result<(), NodeError> {
        let mut watch =
            FolderWatch::new(&self.config.plugins_dir).map_err(|source| NodeError::Watch {
                path: self.dir_label(),
                source,
            })?;
        let node = Arc::downgrade(self);
        tokio::spawn(async move {
            while watch.changed().await.is_some() {
                let Some(node) = node.upgrade() else { break };
                if let Err(e) = node.reconcile_plugins().await {
                    tracing::error!("{e}");
                }
            }
        });
        Ok(())
    }
}
