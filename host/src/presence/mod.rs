//! Who is online, and the `online` / `offline` announcements in room
//! `chanhost:presence`. The hub counts a user's connections on this node;
//! a [`Presence`] hears when a user's first connection here opens and
//! their last one here closes, and decides when the user comes online or
//! goes offline — on this node ([`MemoryPresence`]) or across the cluster
//! ([`RedisPresence`], `[cluster]`: a user with a connection on any node
//! is online; each change is announced once, by the node that saw it).

mod memory;
pub mod redis;

pub use self::memory::MemoryPresence;
pub use self::redis::RedisPresence;

/// The room presence changes are announced in.
pub const PRESENCE_ROOM: &str = "chanhost:presence";
pub const ONLINE: &str = "online";
pub const OFFLINE: &str = "offline";

/// Announces a change (`ONLINE` or `OFFLINE`) of a user.
pub type Announce = Box<dyn Fn(&str, &'static str) + Send + Sync>;

/// Decides who is online.
pub trait Presence: Send + Sync {
    /// The user's first connection on this node opened.
    fn arrived(&self, user: &str);
    /// The user's last connection on this node closed.
    fn left(&self, user: &str);
    /// Users online; `here` lists those with a connection on this node.
    fn online_users(&self, here: Vec<String>) -> Vec<String>;
    /// How many users are online; `here` counts those with a connection
    /// on this node.
    fn online_count(&self, here: usize) -> usize {
        here
    }
    /// Another node died: its users' connections are gone.
    fn node_gone(&self, _node: &str) {}
}
