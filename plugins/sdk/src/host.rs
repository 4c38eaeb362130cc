//! The host's functions, as plugins call them. Those that change what
//! clients receive (`send`, `emit`, `ack`, `broadcast`,
//! `broadcast-filtered`, `join`, `leave`) are gathered while a batch runs
//! (see the crate docs); every other call first applies what was gathered,
//! so the host sees every call in the order the plugin made it.

use crate::chanhost::plugin::host as raw;
use crate::effects::{flush, gather};
use crate::packing::{write_broadcast, PackedEffect};
use crate::types::{
    Condition, ConnectionId, HttpRequest, Identity, Instance, LogLevel, Payload, Rejection,
};

pub use raw::{apply, apply_packed};

/// Sends one event to one channel instance.
pub fn send(target: &Instance, event: &str, data: &Payload) {
    let packed = gather(&data.attachments, |p| {
        PackedEffect::Send {
            target: (target.connection, &target.id),
            event,
            data: &data.json,
            attachments: data.attachments.len(),
        }
        .write(p)
    });
    if !packed {
        raw::send(target, event, data)
    }
}

/// Sends one event with any number of arguments (a JSON array) to one
/// instance.
pub fn emit(target: &Instance, event: &str, args: &Payload) {
    let packed = gather(&args.attachments, |p| {
        PackedEffect::Emit {
            target: (target.connection, &target.id),
            event,
            data: &args.json,
            attachments: args.attachments.len(),
        }
        .write(p)
    });
    if !packed {
        raw::emit(target, event, args)
    }
}

/// Answers a client's acknowledgement request (Socket.IO).
pub fn ack(target: &Instance, ack_id: u64, args: &Payload) {
    let packed = gather(&args.attachments, |p| {
        PackedEffect::Ack {
            target: (target.connection, &target.id),
            ack_id,
            data: &args.json,
            attachments: args.attachments.len(),
        }
        .write(p)
    });
    if !packed {
        raw::ack(target, ack_id, args)
    }
}

/// Adds an instance to a room.
pub fn join(target: &Instance, room: &str) {
    let packed = gather(&[], |p| {
        PackedEffect::Join {
            target: (target.connection, &target.id),
            room,
        }
        .write(p)
    });
    if !packed {
        raw::join(target, room)
    }
}

/// Removes an instance from a room.
pub fn leave(target: &Instance, room: &str) {
    let packed = gather(&[], |p| {
        PackedEffect::Leave {
            target: (target.connection, &target.id),
            room,
        }
        .write(p)
    });
    if !packed {
        raw::leave(target, room)
    }
}

/// Delivers an event to every instance in a room (optionally all but one).
pub fn broadcast(room: &str, event: &str, data: &Payload, except: Option<&Instance>) {
    broadcast_filtered(room, event, data, except, &[])
}

/// [`broadcast`] of JSON text without attachments (no [`Payload`] to
/// make).
pub fn broadcast_json(room: &str, event: &str, json: &str, except: Option<&Instance>) {
    let packed = gather(&[], |p| {
        write_broadcast(
            p,
            (room, event, json, 0),
            except.map(|e| (e.connection, e.id.as_str())),
            std::iter::empty::<(&str, bool, &[String])>(),
        )
    });
    if !packed {
        raw::broadcast(room, event, &crate::json(json), except)
    }
}

/// Like [`broadcast`], but each member receives the event only if its
/// connection passes every condition.
pub fn broadcast_filtered(
    room: &str,
    event: &str,
    data: &Payload,
    except: Option<&Instance>,
    conditions: &[Condition],
) {
    let packed = gather(&data.attachments, |p| {
        write_broadcast(
            p,
            (room, event, &data.json, data.attachments.len()),
            except.map(|e| (e.connection, e.id.as_str())),
            conditions
                .iter()
                .map(|c| (c.attribute.as_str(), c.exclude, c.keys.as_slice())),
        )
    });
    if !packed {
        match conditions {
            [] => raw::broadcast(room, event, data, except),
            _ => raw::broadcast_filtered(room, event, data, except, conditions),
        }
    }
}

/// Host calls that are not effects: what was gathered goes first.
macro_rules! after_effects {
    ($($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?;)*) => {
        $(
            $(#[$doc])*
            pub fn $name($($arg: $ty),*) $(-> $ret)? {
                flush();
                raw::$name($($arg),*)
            }
        )*
    };
}

after_effects! {
    /// Replaces one of this plugin's attribute sets on a connection.
    fn set_attribute(connection: ConnectionId, name: &str, values: &[String]);
    /// Adds and removes values of one of this plugin's attribute sets.
    fn update_attribute(connection: ConnectionId, name: &str, add: &[String], remove: &[String]);
    /// Replaces one of this plugin's attribute sets of a user.
    fn set_user_attribute(user_id: &str, name: &str, values: &[String]);
    /// Adds and removes values of one of this plugin's user attribute sets.
    fn update_user_attribute(user_id: &str, name: &str, add: &[String], remove: &[String]);
    /// Whether the user has a non-empty attribute set of that name here.
    fn has_user_attribute(user_id: &str, name: &str) -> bool;
    /// How many members a room has on this node.
    fn room_size(room: &str) -> u32;
    /// Asks for `events` calls with every event published to a room.
    fn listen(room: &str);
    /// Stops `events` calls for a room.
    fn unlisten(room: &str);
    /// Ends one channel instance from the server side.
    fn end_instance(target: &Instance);
    /// Closes a whole client connection with a reason.
    fn close_connection(connection: ConnectionId, reason: &str);
    /// The authenticated identity of a connection.
    fn connection_identity(connection: ConnectionId) -> Option<Identity>;
    /// Sets the identity of a connection this plugin serves.
    fn set_identity(connection: ConnectionId, identity: &Identity) -> Result<u32, String>;
    /// User ids with at least one identified connection on this node.
    fn online_users() -> Vec<String>;
    /// Verifies a credential with the host's auth providers.
    fn verify_token(token: &str) -> Result<Identity, String>;
    /// Reads a value from the plugin's key-value store.
    fn kv_get(key: &str) -> Option<String>;
    /// Writes a value to the plugin's key-value store.
    fn kv_set(key: &str, value: &str);
    /// Deletes a key from the plugin's key-value store.
    fn kv_delete(key: &str);
    /// Adds `delta` to the integer stored at `key`.
    fn kv_incr(key: &str, delta: i64) -> i64;
    /// Starts an HTTP request; `fetched` brings the answer.
    fn fetch(request: &HttpRequest) -> u64;
    /// Answers this connect later, with `settle-connect`.
    fn defer_connect(target: &Instance);
    /// Answers a deferred connect.
    fn settle_connect(target: &Instance, answer: Result<(), &Rejection>);
    /// Asks for a `timer` call with `key` after `delay_ms`.
    fn set_timer(key: &str, delay_ms: u32);
    /// Cancels the timer set with `key`.
    fn cancel_timer(key: &str);
}

/// Writes a log line tagged with the plugin's name (at once: a log line
/// changes nothing clients receive).
pub fn log(level: LogLevel, message: &str) {
    raw::log(level, message)
}
