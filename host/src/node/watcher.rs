//! Watches the plugins folder (not recursively) and turns bursts of file
//! events into one "something changed" signal after a quiet period, so a
//! file being copied in is read once it is complete. What changed is
//! decided by rescanning the folder, which also covers renames and
//! atomic replaces.

use std::path::Path;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Quiet period before a burst of events counts as settled.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// A running watch; dropping it stops watching.
pub struct FolderWatch {
    _watcher: RecommendedWatcher,
    rx: mpsc::UnboundedReceiver<()>,
}

impl FolderWatch {
    /// Starts watching a folder.
    pub fn new(dir: &Path) -> notify::Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                Ok(ev) if ev.kind.is_access() => {}
                Ok(_) => {
                    let _ = tx.send(());
                }
                Err(e) => tracing::warn!("plugins folder watch error: {e}"),
            })?;
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        Ok(Self {
            _watcher: watcher,
            rx,
        })
    }

    /// Waits for the next settled change. `None` when the watch ended.
    pub async fn changed(&mut self) -> Option<()> {
        self.rx.recv().await?;
        loop {
            match tokio::time::timeout(DEBOUNCE, self.rx.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) => return None,
                Err(_) => return Some(()),
            }
        }
    }
}
