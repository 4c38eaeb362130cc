//! Giving freed memory back to the system.
//!
//! glibc's allocator keeps what is freed in its arenas for reuse, and by
//! default raises its mmap threshold after large buffers are freed, so later
//! large buffers (a slow consumer's pending bytes, a big frame) come from
//! the arenas too. After a burst of hostile or slow clients, the process
//! would keep their memory long after they are gone. Two settings keep the
//! resident set close to what is in use:
//! - [`tune`]: a fixed mmap threshold of 128 KiB, so every large buffer is
//!   its own mapping and is unmapped when freed;
//! - [`spawn_trimmer`]: `malloc_trim` every 10 s, returning the free pages in
//!   the arenas' middle (a few milliseconds at most, on a runtime thread that
//!   blocks nothing else).
//!
//! Elsewhere than glibc both are no-ops.

use std::time::Duration;

/// Buffers from this size on are mapped on their own.
const MMAP_THRESHOLD: i32 = 128 << 10;

/// How often free memory is handed back.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Sets the allocator up; call once, early in `main`.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Hands free memory back every 10 s until `stop` is cancelled.
pub fn spawn_trimmer(stop: tokio_util::sync::CancellationToken) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TRIM_EVERY);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    // SAFETY: malloc_trim only returns free pages.
                    let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
                }
            }
        }
    });
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = stop;
}
