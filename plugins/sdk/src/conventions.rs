//! Names the host reads from what plugins write: one definition, compiled
//! into the SDK and into the host (which includes this file), so the two
//! sides cannot drift apart. Plain Rust, no dependencies.
//!
//! The host reads one convention itself: who follows a user, to decide who
//! may see an update of a followers-only Misskey note published through
//! the API (Misskey's `noteUpdated` to note captures). A member follows
//! user `u` when its user attribute set [`RELATIONS_SET`] (of any plugin)
//! holds [`follows_key`]`(u)`. The Misskey plugins keep a user's relations
//! there.

/// The room whose listening plugins receive what a socket.io server of
/// the same Redis sends with `io.of(nsp).serverSideEmit(event, ...args)`
/// (`[socketio.adapter]`): `event` is its event, the data its argument
/// (or the array of them when there are several or none).
pub fn server_side_room(nsp: &str) -> String {
    format!("socket.io:server-side:{nsp}")
}

/// The user attribute set holding a user's relations.
pub const RELATIONS_SET: &str = "rel";

/// The key in [`RELATIONS_SET`] of a user who follows `user`.
pub fn follows_key(user: &str) -> String {
    format!("f:{user}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_follower_holds_f_and_the_followed_id() {
        assert_eq!(super::follows_key("9abc"), "f:9abc");
    }

    #[test]
    fn a_namespaces_server_side_room_names_it() {
        assert_eq!(
            super::server_side_room("/chat"),
            "socket.io:server-side:/chat"
        );
    }
}
