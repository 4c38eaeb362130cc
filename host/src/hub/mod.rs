//! The hub: connections, channel instances, rooms, attributes, filters and
//! fan-out on this node, independent of any wire protocol: members are
//! slots (a channel instance, or another subscription a protocol keeps,
//! such as a Misskey note capture), events carry their data and the wire
//! sides frame them, filters are data (attribute conditions and an
//! [`Audience`]) that whoever publishes describes.
//!
//! A connection registers a [`ConnHandle`]: its identity, its bounded
//! outbound queue and its per-connection state (open instances, attribute
//! sets, room memberships). Rooms are sharded maps from a room name to its
//! members; delivering an event to a room pushes one [`Outbound::Event`]
//! sharing the same [`SharedEvent`] into each member's queue, so the event
//! is serialised once and each session only splices its own address in.
//! A full queue marks that connection as a slow consumer and closes it;
//! nobody else waits. The hub never calls plugins and never touches sockets.

mod conn;
mod event;
mod handshake;
mod hold;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::RwLock;

pub use conn::{
    Ack, Audience, Condition, ConnHandle, ConnId, Deferred, DirectOut, Filter, Gate, InstanceState,
    Outbound, OutboundRx, Protocol, QueueFull, QueueLimits, Slot, SocketInfo, UserAttributes,
    WriteBatch, SLOW_CONSUMER_CLOSE,
};
pub use event::SharedEvent;
pub use handshake::{Handshake, KeptRequest, Pairs};
pub use hold::Holds;

use crate::auth::Identity;
use crate::metrics::Metrics;

const SHARDS: usize = 32;

/// A member of a room: one slot (instance or capture) on one connection.
#[derive(Clone)]
struct Member {
    conn: Arc<ConnHandle>,
    slot: Slot,
}

type MemberKey = (ConnId, Slot);

/// A user with identified connections on this node.
#[derive(Default)]
struct UserEntry {
    conns: Vec<ConnId>,
    /// Attribute sets shared by all of the user's connections; dropped
    /// with the last of them.
    attributes: Arc<UserAttributes>,
}
type RoomMap = HashMap<Arc<str>, HashMap<MemberKey, Member>>;

/// What unregistering a connection left to do.
#[derive(Debug, Default)]
pub struct Unregistered {
    /// Instances that were open, by id.
    pub instances: Vec<(Arc<str>, InstanceState)>,
    /// The user, if this was their last connection on this node.
    pub went_offline: Option<Arc<str>>,
}

/// Why a connection could not be identified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentifyError {
    #[error("no such connection")]
    NoConnection,
    #[error("connection already belongs to user {0}")]
    AlreadyIdentified(String),
}

/// Connections and rooms of this node.
pub struct Hub {
    conns: RwLock<HashMap<ConnId, Arc<ConnHandle>>>,
    rooms: Box<[RwLock<RoomMap>]>,
    hasher: std::collections::hash_map::RandomState,
    /// Identified connections by user id (presence on this node).
    users: RwLock<HashMap<Arc<str>, UserEntry>>,
    /// Plugins listening to a room: room -> plugin names.
    listeners: RwLock<HashMap<Arc<str>, Vec<Arc<str>>>>,
    metrics: Arc<Metrics>,
    /// Told when a room may have gained its first or lost its last member
    /// or listener (the cluster broker subscribes to what this node serves).
    observer: std::sync::OnceLock<RoomObserver>,
    /// Told when a recorded socket ([`Slot::is_recorded`]) joins or leaves
    /// a room (connection state recovery keeps that room's history, and
    /// the socket's session).
    recorded: std::sync::OnceLock<RecordedObserver>,
}

/// A recorded socket joined (true) or left a room: (connection, the
/// socket's namespace, room, joined).
pub type RecordedObserver = Box<dyn Fn(ConnId, &str, &str, bool) + Send + Sync>;

/// What [`Hub::observe_rooms`] calls.
pub type RoomObserver = Box<dyn Fn(&str) + Send + Sync>;

impl Hub {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            conns: RwLock::new(HashMap::new()),
            rooms: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: Default::default(),
            users: RwLock::new(HashMap::new()),
            listeners: RwLock::new(HashMap::new()),
            metrics,
            observer: std::sync::OnceLock::new(),
            recorded: std::sync::OnceLock::new(),
        }
    }

    /// Calls `f` whenever a recorded socket joins or leaves a room. Set
    /// once.
    pub fn observe_recorded(&self, f: impl Fn(ConnId, &str, &str, bool) + Send + Sync + 'static) {
        let _ = self.recorded.set(Box::new(f));
    }

    /// Whether a recorded socket is a member of the room here.
    pub fn has_recorded_member(&self, room: &str) -> bool {
        self.shard(room)
            .read()
            .get(room)
            .is_some_and(|m| m.values().any(|m| m.slot.is_recorded()))
    }

    /// Calls `f` with a room's name whenever it may have gained its first
    /// or lost its last member or listener here (a hint: `f` checks
    /// [`Hub::has_audience`]). Set once.
    pub fn observe_rooms(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        let _ = self.observer.set(Box::new(f));
    }

    fn room_changed(&self, room: &str) {
        if let Some(f) = self.observer.get() {
            f(room);
        }
    }

    fn shard(&self, room: &str) -> &RwLock<RoomMap> {
        &self.rooms[(self.hasher.hash_one(room) as usize) % SHARDS]
    }

    /// Registers a new connection. Returns the number of connections of
    /// its user afterwards (0 for an anonymous connection).
    pub fn register(&self, conn: Arc<ConnHandle>) -> usize {
        let user = conn.identity().map(|i| i.user_id.clone());
        self.conns.write().insert(conn.id, conn.clone());
        self.metrics.connections.inc();
        match user {
            Some(u) => Self::add_user_conn(&mut self.users.write(), u, &conn),
            None => 0,
        }
    }

    fn add_user_conn(
        users: &mut HashMap<Arc<str>, UserEntry>,
        user: Arc<str>,
        conn: &ConnHandle,
    ) -> usize {
        let e = users.entry(user).or_default();
        if !e.conns.contains(&conn.id) {
            e.conns.push(conn.id);
        }
        conn.attach_user_attributes(e.attributes.clone());
        e.conns.len()
    }

    /// Gives an anonymous connection its identity. Returns the number of
    /// connections of the user afterwards, or an error if the connection is
    /// gone or already belongs to another user.
    pub fn identify(&self, id: ConnId, identity: Identity) -> Result<usize, IdentifyError> {
        let conn = self.conn(id).ok_or(IdentifyError::NoConnection)?;
        let wanted = identity.user_id.clone();
        let now = conn.set_identity(identity);
        if now.user_id != wanted {
            return Err(IdentifyError::AlreadyIdentified(now.user_id.to_string()));
        }
        // Checked under the users lock: `unregister` sets the flag before
        // it removes the connection from that map.
        let mut users = self.users.write();
        if conn.unregistered.load(Ordering::SeqCst) {
            return Err(IdentifyError::NoConnection);
        }
        Ok(Self::add_user_conn(&mut users, wanted, &conn))
    }

    /// Removes a connection of a user; the number left, or None if it was
    /// not listed.
    fn remove_user_conn(&self, user: &str, id: ConnId) -> Option<usize> {
        let mut users = self.users.write();
        let v = &mut users.get_mut(user)?.conns;
        let before = v.len();
        v.retain(|c| *c != id);
        if v.len() == before {
            return None;
        }
        let n = v.len();
        if n == 0 {
            users.remove(user);
        }
        Some(n)
    }

    /// The open connections of a user on this node.
    pub fn user_conns(&self, user: &str) -> Vec<Arc<ConnHandle>> {
        let ids = self
            .users
            .read()
            .get(user)
            .map(|e| e.conns.clone())
            .unwrap_or_default();
        ids.into_iter().filter_map(|id| self.conn(id)).collect()
    }

    /// Replaces (`remove` = None) or updates an attribute set of `owner`
    /// shared by every connection of `user` on this node. False if the user
    /// has no connection here (there is nothing to attach the set to).
    pub fn set_user_attribute(
        &self,
        user: &str,
        owner: &Arc<str>,
        name: &str,
        add: Vec<String>,
        remove: Option<&[String]>,
    ) -> bool {
        let Some(attrs) = self.users.read().get(user).map(|e| e.attributes.clone()) else {
            return false;
        };
        conn::apply_attribute(&mut attrs.write(), owner, name, add, remove);
        true
    }

    /// Whether `user` has a non-empty attribute set `name` of `owner` here.
    pub fn has_user_attribute(&self, user: &str, owner: &str, name: &str) -> bool {
        self.users.read().get(user).is_some_and(|e| {
            e.attributes
                .read()
                .get(owner)
                .is_some_and(|s| s.contains_key(name))
        })
    }

    /// Users with at least one identified connection on this node.
    pub fn online_users(&self) -> Vec<Arc<str>> {
        let mut v: Vec<_> = self.users.read().keys().cloned().collect();
        v.sort();
        v
    }

    /// Removes a connection and all its room memberships. Returns the
    /// instances that were open on it (for the caller to tell plugins) and,
    /// if the connection was the last of its user here, that user.
    /// Registers an instance on a connection the hub still knows, under an
    /// id not in use; counts it. False if it was not registered.
    pub fn add_instance(&self, conn: &ConnHandle, id: &str, state: InstanceState) -> bool {
        let fresh = !conn.is_unregistered() && conn.insert_instance(id, state);
        if fresh {
            self.metrics.instances.inc();
        }
        fresh
    }

    /// Forgets an instance: no more events reach it, its rooms are left,
    /// the gauge goes down.
    pub fn remove_instance(&self, conn: &ConnHandle, id: &str) -> Option<InstanceState> {
        let inst = conn.remove_instance(id)?;
        inst.slot.close();
        self.metrics.instances.dec();
        self.leave_all(conn, &inst.slot);
        Some(inst)
    }

    pub fn unregister(&self, id: ConnId) -> Unregistered {
        let Some(conn) = self.conns.write().remove(&id) else {
            return Unregistered::default();
        };
        conn.unregistered.store(true, Ordering::SeqCst);
        let went_offline = conn
            .identity()
            .filter(|i| self.remove_user_conn(&i.user_id, id) == Some(0))
            .map(|i| i.user_id.clone());
        self.metrics.connections.dec();
        let taken = conn.take_all();
        for (room, slot) in taken.memberships {
            self.remove_member(&room, &(id, slot));
        }
        self.metrics.instances.sub(taken.instances.len() as u64);
        Unregistered {
            instances: taken.instances,
            went_offline,
        }
    }

    /// The connection with this id, if it is open.
    pub fn conn(&self, id: ConnId) -> Option<Arc<ConnHandle>> {
        self.conns.read().get(&id).cloned()
    }

    /// Every open connection (for rare whole-node operations).
    pub fn all_conns(&self) -> Vec<Arc<ConnHandle>> {
        self.conns.read().values().cloned().collect()
    }

    /// Number of open connections.
    pub fn conn_count(&self) -> usize {
        self.conns.read().len()
    }

    /// Members of a room on this node (every slot).
    pub fn room_size(&self, room: &str) -> usize {
        self.shard(room).read().get(room).map_or(0, HashMap::len)
    }

    /// Whether a publish to `room` would reach anyone here: a member or a
    /// listening plugin.
    pub fn has_audience(&self, room: &str) -> bool {
        self.room_size(room) > 0 || self.listeners.read().contains_key(room)
    }

    /// The largest rooms whose names contain `query` (every room for an
    /// empty one), largest first and then by name, at most `limit`; and
    /// how many rooms matched. One pass over the rooms (for operators).
    pub fn rooms_by_size(&self, query: &str, limit: usize) -> (usize, Vec<(Arc<str>, usize)>) {
        let mut matched = 0;
        let mut all: Vec<(Arc<str>, usize)> = Vec::new();
        for shard in self.rooms.iter() {
            for (name, members) in shard.read().iter() {
                if name.contains(query) {
                    matched += 1;
                    all.push((name.clone(), members.len()));
                }
            }
        }
        let by_size =
            |a: &(Arc<str>, usize), b: &(Arc<str>, usize)| b.1.cmp(&a.1).then(a.0.cmp(&b.0));
        if all.len() > limit && limit > 0 {
            all.select_nth_unstable_by(limit - 1, by_size);
        }
        all.truncate(limit);
        all.sort_by(by_size);
        (matched, all)
    }

    /// Number of users with identified connections here.
    pub fn online_count(&self) -> usize {
        self.users.read().len()
    }

    /// Number of non-empty rooms.
    pub fn room_count(&self) -> usize {
        self.rooms.iter().map(|s| s.read().len()).sum()
    }

    /// Adds a slot of a connection to a room. Returns false if it was
    /// already a member (or the connection is gone).
    pub fn join(&self, conn: &Arc<ConnHandle>, slot: Slot, room: &str) -> bool {
        let room: Arc<str> = room.into();
        if !conn.add_membership(room.clone(), slot.clone()) {
            return false;
        }
        let member = Member {
            conn: conn.clone(),
            slot: slot.clone(),
        };
        let first = {
            let mut shard = self.shard(&room).write();
            // A slot hashes by its kind and id, never by its open flag.
            #[allow(clippy::mutable_key_type)]
            let members = shard.entry(room.clone()).or_default();
            members.insert((conn.id, slot.clone()), member);
            members.len() == 1
        };
        if slot.is_recorded() {
            if let Some(f) = self.recorded.get() {
                f(conn.id, slot.id(), &room, true);
            }
        }
        if first {
            self.room_changed(&room);
        }
        // A plugin may join a connection that is closing on another thread;
        // whatever `unregister` could not see yet is undone here.
        if conn.unregistered.load(Ordering::SeqCst) {
            conn.remove_membership(&room, &slot);
            self.remove_member(&room, &(conn.id, slot));
            return false;
        }
        true
    }

    /// Removes a slot of a connection from a room.
    pub fn leave(&self, conn: &ConnHandle, slot: &Slot, room: &str) -> bool {
        let room: Arc<str> = room.into();
        if !conn.remove_membership(&room, slot) {
            return false;
        }
        self.remove_member(&room, &(conn.id, slot.clone()));
        if slot.is_recorded() {
            if let Some(f) = self.recorded.get() {
                f(conn.id, slot.id(), &room, false);
            }
        }
        true
    }

    /// Removes a slot from every room it is in.
    pub fn leave_all(&self, conn: &ConnHandle, slot: &Slot) {
        for room in conn.take_memberships_of(slot) {
            self.remove_member(&room, &(conn.id, slot.clone()));
        }
    }

    fn remove_member(&self, room: &Arc<str>, key: &MemberKey) {
        let emptied = {
            let mut shard = self.shard(room).write();
            match shard.get_mut(room) {
                Some(members) => {
                    members.remove(key);
                    members.is_empty() && shard.remove(room).is_some()
                }
                None => false,
            }
        };
        if emptied {
            self.room_changed(room);
        }
    }

    /// Delivers an event to every member of a room (except one slot).
    /// Returns how many members it was written or queued for.
    ///
    /// The recipients are picked under the shard's lock and written to
    /// after it is released: writes are system calls, and joins and leaves
    /// on the shard must not wait for a large room's fan-out.
    pub fn deliver(&self, room: &str, event: &Arc<SharedEvent>, filter: &Filter) -> usize {
        let recipients: Vec<(Arc<ConnHandle>, Slot)> = {
            let shard = self.shard(room).read();
            let Some(members) = shard.get(room) else {
                return 0;
            };
            members
                .iter()
                .filter(|((conn_id, slot), m)| {
                    let excepted = filter.except.as_ref().is_some_and(|(ex_conn, ex_id)| {
                        conn_id == ex_conn && slot.id() == &**ex_id
                    });
                    !excepted
                        && filter.recorded.is_none_or(|r| slot.is_recorded() == r)
                        && filter.admits(&m.conn)
                })
                .map(|(_, m)| (m.conn.clone(), m.slot.clone()))
                .collect()
        };
        recipients
            .into_iter()
            .filter(|(conn, slot)| {
                conn.push(Outbound::Event {
                    slot: slot.clone(),
                    event: event.clone(),
                })
            })
            .count()
    }

    /// The connected Socket.IO sockets of namespace `nsp` on this node
    /// that are in any of `rooms` (every socket of the namespace when
    /// `rooms` is empty) and in none of `except` — socket.io's own
    /// selection — with their instance. A socket is connected once its
    /// CONNECT reply is on its way ([`SocketInfo::is_connected`]): one
    /// whose plugin is still deciding is not.
    pub fn sockets(
        &self,
        nsp: &str,
        rooms: &[String],
        except: &[String],
    ) -> Vec<(Arc<ConnHandle>, InstanceState)> {
        let mut picked: Vec<(Arc<ConnHandle>, InstanceState)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut consider = |conn: &Arc<ConnHandle>| {
            if conn.protocol != Protocol::SocketIo || !seen.insert(conn.id) {
                return;
            }
            let Some(inst) = conn.instance(nsp) else {
                return;
            };
            let connected = inst.socket.as_ref().is_some_and(|s| s.is_connected());
            if connected && !conn.in_any_room(&inst.slot, except) {
                picked.push((conn.clone(), inst));
            }
        };
        if rooms.is_empty() {
            // A snapshot: connections come and go meanwhile.
            for conn in self.all_conns() {
                consider(&conn);
            }
            return picked;
        }
        for room in rooms {
            let conns: Vec<Arc<ConnHandle>> = {
                let shard = self.shard(room).read();
                let Some(members) = shard.get(room.as_str()) else {
                    continue;
                };
                members
                    .values()
                    .filter(|m| m.slot.id() == nsp && !m.slot.is_capture() && !m.slot.is_stream())
                    .map(|m| m.conn.clone())
                    .collect()
            };
            for conn in &conns {
                consider(conn);
            }
        }
        picked
    }

    /// Every room a socket of namespace `nsp` is in on this node.
    pub fn socket_rooms(&self, nsp: &str) -> Vec<Arc<str>> {
        let mut rooms = std::collections::BTreeSet::new();
        for (conn, inst) in self.sockets(nsp, &[], &[]) {
            rooms.extend(conn.rooms_of(&inst.slot));
        }
        rooms.into_iter().collect()
    }

    /// Registers a plugin's interest in a room.
    pub fn listen(&self, plugin: &Arc<str>, room: &str) {
        let first = {
            let mut l = self.listeners.write();
            let v = l.entry(room.into()).or_default();
            let new = !v.iter().any(|p| p == plugin);
            if new {
                v.push(plugin.clone());
            }
            new && v.len() == 1
        };
        if first {
            self.room_changed(room);
        }
    }

    /// Drops a plugin's interest in a room.
    pub fn unlisten(&self, plugin: &str, room: &str) {
        let emptied = {
            let mut l = self.listeners.write();
            match l.get_mut(room) {
                Some(v) => {
                    v.retain(|p| &**p != plugin);
                    v.is_empty() && l.remove(room).is_some()
                }
                None => false,
            }
        };
        if emptied {
            self.room_changed(room);
        }
    }

    /// Replaces every listen of a plugin with `rooms`.
    pub fn set_listens(&self, plugin: &Arc<str>, rooms: &[String]) {
        self.unlisten_all(plugin);
        for r in rooms {
            self.listen(plugin, r);
        }
    }

    /// Drops every listen of a plugin.
    pub fn unlisten_all(&self, plugin: &str) {
        let mut emptied = Vec::new();
        self.listeners.write().retain(|room, v| {
            v.retain(|p| &**p != plugin);
            if v.is_empty() {
                emptied.push(room.clone());
            }
            !v.is_empty()
        });
        for room in emptied {
            self.room_changed(&room);
        }
    }

    /// The plugins listening to a room.
    pub fn listeners(&self, room: &str) -> Vec<Arc<str>> {
        self.listeners.read().get(room).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Hub {
        Hub::new(Arc::new(Metrics::default()))
    }

    fn conn(id: ConnId, queue: usize) -> (Arc<ConnHandle>, OutboundRx) {
        ConnHandle::new(id, Protocol::Misskey, None, QueueLimits::frames(queue))
    }

    /// Opens an instance on a connection and returns its slot.
    fn inst(c: &ConnHandle, id: &str) -> Slot {
        let slot = Slot::instance(id);
        let state = InstanceState {
            plugin: "p".into(),
            channel: "c".into(),
            slot: slot.clone(),
            socket: None,
        };
        c.insert_instance(id, state);
        slot
    }

    #[test]
    fn rooms_come_largest_first_and_are_searched_by_name() {
        let hub = hub();
        let (a, _ra) = conn(1, 8);
        let (b, _rb) = conn(2, 8);
        hub.register(a.clone());
        hub.register(b.clone());
        let (sa, sb) = (inst(&a, "1"), inst(&b, "1"));
        for room in ["chat:big", "chat:small", "notes"] {
            hub.join(&a, sa.clone(), room);
        }
        hub.join(&b, sb.clone(), "chat:big");
        hub.join(&b, sb, "notes");
        let (n, rooms) = hub.rooms_by_size("", 2);
        assert_eq!(n, 3);
        let names: Vec<(&str, usize)> = rooms.iter().map(|(r, m)| (&**r, *m)).collect();
        assert_eq!(names, [("chat:big", 2), ("notes", 2)]);
        let (n, rooms) = hub.rooms_by_size("chat:", 10);
        assert_eq!(n, 2);
        assert_eq!(rooms.len(), 2);
        assert_eq!(&*rooms[1].0, "chat:small");
        assert_eq!(hub.rooms_by_size("nothing", 10), (0, Vec::new()));
        assert_eq!(a.transport(), "websocket");
    }

    #[test]
    fn sockets_are_picked_as_socketio_picks_them() {
        let hub = hub();
        let sio = |id| ConnHandle::new(id, Protocol::SocketIo, None, QueueLimits::frames(8));
        let (a, _ra) = sio(1);
        let (b, _rb) = sio(2);
        let (m, _rm) = conn(3, 8);
        for c in [&a, &b, &m] {
            hub.register(c.clone());
        }
        // A socket: an instance with an id, connected once in that id's room.
        let sock = |c: &Arc<ConnHandle>, nsp: &str, sid: &str, connected: bool| {
            let slot = Slot::instance(nsp);
            c.insert_instance(
                nsp,
                InstanceState {
                    plugin: "p".into(),
                    channel: nsp.into(),
                    slot: slot.clone(),
                    socket: Some(Arc::new({
                        let info = SocketInfo::new(sid.into(), Handshake::default());
                        info.connected.store(connected, Ordering::SeqCst);
                        info
                    })),
                },
            );
            hub.join(c, slot.clone(), sid);
            slot
        };
        let sa = sock(&a, "/", "sa", true);
        let sb = sock(&b, "/", "sb", true);
        let other = sock(&b, "/other", "so", true);
        let sm = inst(&m, "/");
        let (d, _rd) = sio(4);
        hub.register(d.clone());
        // Its plugin still deciding: not yet a socket of the namespace.
        let sd = sock(&d, "/", "sd", false);
        hub.join(&d, sd, "r");
        hub.join(&a, sa.clone(), "r");
        hub.join(&a, sa.clone(), "x");
        hub.join(&b, sb.clone(), "r");
        hub.join(&b, other, "only-other");
        // A Misskey instance whose id happens to be "/" is no socket.
        hub.join(&m, sm, "r");
        let ids = |v: Vec<(Arc<ConnHandle>, InstanceState)>| {
            let mut ids: Vec<ConnId> = v.iter().map(|(c, _)| c.id).collect();
            ids.sort_unstable();
            ids
        };
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(ids(hub.sockets("/", &s(&["r"]), &[])), vec![1, 2]);
        assert_eq!(
            ids(hub.sockets("/", &s(&["r", "x"]), &[])),
            vec![1, 2],
            "each once"
        );
        assert_eq!(ids(hub.sockets("/", &s(&["r"]), &s(&["x"]))), vec![2]);
        assert_eq!(
            ids(hub.sockets("/", &[], &[])),
            vec![1, 2],
            "the whole namespace"
        );
        assert_eq!(
            ids(hub.sockets("/", &s(&["only-other"]), &[])),
            Vec::<ConnId>::new()
        );
        assert_eq!(ids(hub.sockets("/other", &[], &[])), vec![2]);
        let rooms: Vec<String> = hub
            .socket_rooms("/")
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(rooms, ["r", "sa", "sb", "x"].map(String::from).to_vec());
        assert_eq!(
            ids(hub.sockets("/", &s(&["sb"]), &[])),
            vec![2],
            "a socket's id is a room"
        );
        assert!(a.in_any_room(&sa, &s(&["nope", "x"])));
        assert!(!a.in_any_room(&sa, &[]));
    }

    #[test]
    fn deliver_reaches_members_once_and_skips_except() {
        let hub = hub();
        let (a, mut ra) = conn(1, 8);
        let (b, mut rb) = conn(2, 8);
        hub.register(a.clone());
        hub.register(b.clone());
        let x = inst(&a, "x");
        assert!(hub.join(&a, x.clone(), "r"));
        assert!(!hub.join(&a, x, "r"));
        hub.join(&b, inst(&b, "y"), "r");
        let ev = SharedEvent::new("e", "1".into());
        let except = Filter {
            except: Some((2, "y".into())),
            ..Filter::default()
        };
        assert_eq!(hub.deliver("r", &ev, &except), 1);
        assert!(ra.try_recv().is_some());
        assert!(ra.try_recv().is_none());
        assert!(rb.try_recv().is_none());
        assert_eq!(hub.deliver("r", &ev, &Filter::default()), 2);
    }

    #[test]
    fn the_observer_hears_of_rooms_gaining_their_first_and_losing_their_last_member_or_listener() {
        let hub = hub();
        let heard = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
        let h = heard.clone();
        hub.observe_rooms(move |room| h.lock().push(room.to_owned()));
        let (a, _ra) = conn(1, 8);
        let (b, _rb) = conn(2, 8);
        hub.register(a.clone());
        hub.register(b.clone());
        hub.join(&a, inst(&a, "x"), "r");
        hub.join(&b, inst(&b, "x"), "r");
        hub.leave(&a, &a.instance("x").unwrap().slot, "r");
        assert_eq!(*heard.lock(), ["r"], "only the first member");
        hub.unregister(2);
        assert_eq!(*heard.lock(), ["r", "r"], "and the last");
        let plugin: Arc<str> = "p".into();
        hub.listen(&plugin, "l");
        hub.listen(&plugin, "l");
        hub.unlisten_all("p");
        assert_eq!(*heard.lock(), ["r", "r", "l", "l"]);
        assert!(!hub.has_audience("r") && !hub.has_audience("l"));
    }

    #[test]
    fn unregister_leaves_every_room() {
        let hub = hub();
        let (a, _ra) = conn(1, 8);
        hub.register(a.clone());
        hub.join(&a, inst(&a, "x"), "r1");
        hub.join(&a, Slot::capture("n"), "noteStream:n");
        assert_eq!(hub.room_count(), 2);
        hub.unregister(1);
        assert_eq!(hub.room_count(), 0);
        assert_eq!(hub.conn_count(), 0);
    }

    #[test]
    fn full_queue_closes_only_that_connection() {
        let hub = hub();
        let (slow, _rs) = conn(1, 1);
        let (fast, mut rf) = conn(2, 8);
        hub.register(slow.clone());
        hub.register(fast.clone());
        hub.join(&slow, inst(&slow, "a"), "r");
        hub.join(&fast, inst(&fast, "b"), "r");
        let ev = SharedEvent::new("e", "1".into());
        hub.deliver("r", &ev, &Filter::default());
        hub.deliver("r", &ev, &Filter::default());
        assert!(slow.close_requested().is_some());
        assert!(fast.close_requested().is_none());
        assert!(rf.try_recv().is_some() && rf.try_recv().is_some());
    }

    #[test]
    fn a_join_after_unregister_leaves_no_member_behind() {
        let hub = hub();
        let (a, _ra) = conn(1, 8);
        hub.register(a.clone());
        hub.unregister(1);
        assert!(!hub.join(&a, Slot::capture("x"), "late"));
        assert_eq!(hub.room_count(), 0);
    }

    #[test]
    fn a_join_racing_the_end_of_its_instance_is_refused() {
        let hub = hub();
        let (a, _ra) = conn(1, 8);
        hub.register(a.clone());
        let old = inst(&a, "/");
        a.remove_instance("/");
        let _new = inst(&a, "/"); // a later instance under the same id
        assert!(!hub.join(&a, old, "stale"));
        assert!(!hub.join(&a, Slot::instance("never-opened"), "stale"));
        assert_eq!(hub.room_count(), 0);
    }

    #[test]
    fn presence_counts_connections_per_user() {
        let hub = hub();
        let id = |u: &str| Identity {
            user_id: u.into(),
            claims: "{}".into(),
        };
        let (a, _ra) = ConnHandle::new(
            1,
            Protocol::Misskey,
            Some(id("alice")),
            QueueLimits::frames(8),
        );
        let (b, _rb) = conn(2, 8);
        assert_eq!(hub.register(a), 1);
        assert_eq!(hub.register(b), 0);
        assert_eq!(hub.identify(2, id("alice")), Ok(2));
        assert_eq!(
            hub.identify(2, id("bob")),
            Err(IdentifyError::AlreadyIdentified("alice".into()))
        );
        assert_eq!(hub.identify(9, id("bob")), Err(IdentifyError::NoConnection));
        assert_eq!(hub.user_conns("alice").len(), 2);
        assert_eq!(hub.unregister(1).went_offline, None);
        assert_eq!(hub.online_users(), vec![Arc::<str>::from("alice")]);
        assert_eq!(hub.unregister(2).went_offline.as_deref(), Some("alice"));
        assert!(hub.online_users().is_empty());
    }

    #[test]
    fn filtered_delivery_tests_attribute_sets_natively() {
        let hub = hub();
        let p: Arc<str> = "p".into();
        let other: Arc<str> = "q".into();
        let mut rxs = Vec::new();
        for id in 1..=3 {
            let (c, rx) = conn(id, 8);
            hub.register(c.clone());
            hub.join(&c, inst(&c, "x"), "tl");
            rxs.push((c, rx));
        }
        rxs[0]
            .0
            .set_attribute(&p, "muting", vec!["u9".into()], None);
        rxs[1]
            .0
            .set_attribute(&p, "following", vec!["u9".into(), "u2".into()], None);
        rxs[2]
            .0
            .set_attribute(&other, "following", vec!["u9".into()], None);
        let ev = SharedEvent::new("note", "{}".into());
        let f = |conditions: Vec<Condition>| Filter {
            except: None,
            owner: Some(p.clone()),
            conditions: conditions.into(),
            audience: None,
            recorded: None,
        };
        let muted = Condition {
            attribute: "muting".into(),
            keys: vec!["u9".into()],
            exclude: true,
        };
        let followed = Condition {
            attribute: "following".into(),
            keys: vec!["u9".into()],
            exclude: false,
        };
        assert_eq!(hub.deliver("tl", &ev, &f(vec![muted.clone()])), 2);
        assert_eq!(
            hub.deliver("tl", &ev, &f(vec![followed.clone()])),
            1,
            "another plugin's set does not count"
        );
        assert_eq!(hub.deliver("tl", &ev, &f(vec![muted, followed])), 1);
        let counts: Vec<usize> = rxs
            .iter_mut()
            .map(|(_, rx)| std::iter::from_fn(|| rx.try_recv()).count())
            .collect();
        assert_eq!(counts, vec![0, 3, 1]);
        rxs[1]
            .0
            .set_attribute(&p, "following", vec![], Some(&["u9".into()]));
        assert!(!rxs[1].0.passes(
            &p,
            &[Condition {
                attribute: "following".into(),
                keys: vec!["u9".into()],
                exclude: false
            }]
        ));
    }

    #[test]
    fn user_attribute_sets_are_shared_by_the_users_connections() {
        let hub = hub();
        let p: Arc<str> = "p".into();
        let who = |u: &str| Identity {
            user_id: u.into(),
            claims: "{}".into(),
        };
        let mut conns = Vec::new();
        for (id, user) in [(1, Some("alice")), (2, Some("alice")), (3, None)] {
            let (c, rx) =
                ConnHandle::new(id, Protocol::Misskey, user.map(who), QueueLimits::frames(8));
            hub.register(c.clone());
            conns.push((c, rx));
        }
        assert!(!hub.set_user_attribute("bob", &p, "muting", vec!["u9".into()], None));
        assert!(hub.set_user_attribute("alice", &p, "muting", vec!["u9".into()], None));
        assert!(hub.has_user_attribute("alice", "p", "muting"));
        assert!(!hub.has_user_attribute("alice", "q", "muting"));
        let muted = [Condition {
            attribute: "muting".into(),
            keys: vec!["u9".into()],
            exclude: true,
        }];
        let pass: Vec<bool> = conns.iter().map(|(c, _)| c.passes("p", &muted)).collect();
        assert_eq!(pass, vec![false, false, true]);
        // A connection identified later shares the same sets.
        hub.identify(3, who("alice")).unwrap();
        assert!(!conns[2].0.passes("p", &muted));
        // A connection's own set of the same name takes precedence.
        conns[0]
            .0
            .set_attribute(&p, "muting", vec!["u8".into()], None);
        assert!(conns[0].0.passes("p", &muted));
        hub.set_user_attribute("alice", &p, "muting", vec![], Some(&["u9".into()]));
        assert!(conns[1].0.passes("p", &muted));
        assert!(!hub.has_user_attribute("alice", "p", "muting"));
        for id in 1..=3 {
            hub.unregister(id);
        }
        assert!(!hub.set_user_attribute("alice", &p, "muting", vec!["u9".into()], None));
    }

    #[test]
    fn listens_are_a_set() {
        let hub = hub();
        let p: Arc<str> = "p".into();
        hub.listen(&p, "r");
        hub.listen(&p, "r");
        assert_eq!(hub.listeners("r").len(), 1);
        hub.set_listens(&p, &["s".into()]);
        assert!(hub.listeners("r").is_empty());
        assert_eq!(hub.listeners("s").len(), 1);
    }
}
