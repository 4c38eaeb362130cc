//! The node's part of connection state recovery (see [`crate::recovery`]):
//! which store it uses, what a recorded socket leaves behind when its
//! connection is lost, and how a CONNECT with a pid takes it back.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::Node;
use crate::auth::Identity;
use crate::broker::Publication;
use crate::hub::{
    ConnHandle, ConnId, Filter, InstanceState, Outbound, SharedEvent, Slot, SocketInfo,
};
use crate::plugin::runtime::CallError;
use crate::plugin::{DisconnectReason, InstanceRef, PluginSlot, RecoverRequest, Rejection};
use crate::recovery::{Keep, KeptIdentity, MemoryRecovery, Recovery, Refusal, Session};

/// The store `[socketio.recovery]` asks for: this node's memory, or the
/// cluster's Redis with `[cluster]`.
pub(super) fn store(
    config: &crate::config::Config,
    metrics: &Arc<crate::metrics::Metrics>,
) -> Result<Option<Arc<dyn Recovery>>, super::NodeError> {
    let Some(r) = &config.socketio.recovery else {
        return Ok(None);
    };
    let counters = metrics.recovery_cut.clone();
    Ok(Some(match &config.cluster {
        None => Arc::new(MemoryRecovery::new(
            r.max_disconnection,
            r.history_per_room,
            counters,
        )),
        Some(c) => Arc::new(
            crate::recovery::RedisRecovery::new(crate::recovery::redis::RedisRecoveryOptions {
                url: c.redis.clone(),
                prefix: c.prefix.clone(),
                window: r.max_disconnection,
            })
            .map_err(|e| super::NodeError::Cluster(e.to_string()))?,
        ),
    }))
}

/// A CONNECT that carries a session's pid.
pub struct RecoverInstance<'a> {
    pub conn: &'a Arc<ConnHandle>,
    pub nsp: &'a str,
    pub plugin: Arc<PluginSlot>,
    pub pid: &'a str,
    /// The last offset the client got (none: it got no event yet).
    pub offset: Option<u64>,
    /// The CONNECT auth as JSON text.
    pub params: String,
    /// The socket's handshake on its new connection (with what it kept of
    /// its opening request).
    pub handshake: crate::hub::Handshake,
}

/// How a recovery ended.
pub enum Recovered {
    /// The socket is back: its events to write after the reply.
    Yes {
        info: Arc<SocketInfo>,
        replay: Vec<Outbound>,
        replayed_upto: u64,
    },
    /// Connect it as a new socket.
    No(Refusal),
    /// Not recovered, and not connected as new: the CONNECT is refused.
    Refused(Refused),
}

/// A recovery that ended in a refused CONNECT.
pub struct Refused {
    /// The plugin's refusal, or why its call failed.
    pub why: Result<Rejection, CallError>,
    /// The connection took the session's identity, which cannot be taken
    /// back from it: its transport is closed once the refusal is written
    /// (the client connects again, and presents its credentials).
    pub end_transport: bool,
}

fn now_ms() -> u64 {
    crate::adapter::now_ms()
}

fn spawn(f: futures_util::future::BoxFuture<'static, ()>) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(f);
    }
}

/// What the node's session writer does, in order (a session is never
/// written after it was forgotten or kept after a later change).
pub(super) enum SessionOp {
    /// A recorded socket connected (`create`), joined or left a room: its
    /// session as it is now.
    Changed {
        conn: ConnId,
        nsp: Arc<str>,
        create: bool,
    },
    /// It lost its connection: kept from now on.
    Keep(Session),
    /// It ended for good: (pid, its connection).
    Forget(String, ConnId),
}

/// `first` and the ops waiting behind it, in order, less each `Changed`
/// that a later one of the same socket repeats (a socket joining ten
/// rooms at its connect is written once, with all of them). A `Changed`
/// reads the socket as it is when it is handled, so handling only the
/// last is the same; it carries `create` if any of them did.
fn coalesce(first: SessionOp, ops: &mut mpsc::UnboundedReceiver<SessionOp>) -> Vec<SessionOp> {
    let mut batch = vec![first];
    while batch.len() < 4096 {
        match ops.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
    let mut out: Vec<SessionOp> = Vec::with_capacity(batch.len());
    // The last Changed of each socket, by its place in `out`.
    let mut last: std::collections::HashMap<(ConnId, Arc<str>), usize> = Default::default();
    for op in batch.into_iter().rev() {
        if let SessionOp::Changed { conn, nsp, create } = &op {
            match last.get(&(*conn, nsp.clone())) {
                Some(&i) => {
                    if let SessionOp::Changed { create: later, .. } = &mut out[i] {
                        *later |= *create;
                    }
                    continue;
                }
                None => {
                    last.insert((*conn, nsp.clone()), out.len());
                }
            }
        }
        out.push(op);
    }
    out.reverse();
    out
}

/// Writes the sessions of this node's recorded sockets to a store that
/// keeps them while they are connected: as they change, and again every
/// third of the window (so a dead node's last word is at most that old).
async fn session_writer(
    node: std::sync::Weak<Node>,
    store: Arc<dyn Recovery>,
    mut ops: mpsc::UnboundedReceiver<SessionOp>,
) {
    let window = node
        .upgrade()
        .and_then(|n| {
            n.config
                .socketio
                .recovery
                .as_ref()
                .map(|r| r.max_disconnection)
        })
        .unwrap_or(Duration::from_secs(120));
    let every = (window / 3).max(Duration::from_millis(100));
    let ahead = |create| Keep {
        create,
        rewritten_every: Some(every),
    };
    let mut refresh = tokio::time::interval(every);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Sessions this writer put in the store: a disconnection replaces
    // those only (one taken meanwhile by a recovery elsewhere stays gone).
    let mut written: std::collections::HashSet<String> = Default::default();
    loop {
        tokio::select! {
            op = ops.recv() => {
                let Some(op) = op else { return };
                let Some(n) = node.upgrade() else { return };
                for op in coalesce(op, &mut ops) {
                match op {
                    SessionOp::Changed { conn, nsp, create } => {
                        let session = n.hub.conn(conn).and_then(|c| {
                            let inst = c.instance(&nsp)?;
                            n.session_of(&c, &inst, now_ms())
                        });
                        if let Some(s) = session {
                            if create || written.contains(&s.pid) {
                                written.insert(s.pid.clone());
                                store.keep(s, ahead(create)).await;
                            }
                        }
                    }
                    SessionOp::Keep(s) => {
                        let create = !written.remove(&s.pid);
                        store.keep(s, Keep { create, rewritten_every: None }).await;
                    }
                    SessionOp::Forget(pid, conn) => {
                        written.remove(&pid);
                        store.forget(&pid, conn).await;
                    }
                }
                }
            }
            _ = refresh.tick() => {
                let Some(n) = node.upgrade() else { return };
                for conn in n.hub.all_conns() {
                    for inst in conn.instances_where(|i| i.slot.is_recorded()) {
                        if let Some(s) = n.session_of(&conn, &inst, now_ms()) {
                            if written.contains(&s.pid) {
                                store.keep(s, ahead(false)).await;
                            }
                        }
                    }
                }
            }
        }
    }
}

impl Node {
    /// The recovery store, when `[socketio.recovery]` is on.
    pub fn recovery(&self) -> Option<&Arc<dyn Recovery>> {
        self.recovery.as_ref()
    }

    /// Resolves once this node's subscriptions for the rooms joined so far
    /// are in place (a recorded socket's CONNECT reply waits for it, so
    /// that what is published to its rooms from then on reaches it).
    pub async fn settled(&self) {
        self.broker.settled().await
    }

    /// Whether the sockets of a plugin's namespaces are recovered: the
    /// host is configured to, and the plugin can be told (WIT 0.3.0).
    pub fn recovers(&self, plugin: &PluginSlot) -> bool {
        self.recovery.is_some() && plugin.recovers()
    }

    /// Marks the rooms recorded sockets join, keeps the sessions of
    /// connected sockets current where the store asks for it (the
    /// cluster's), and forgets what is past the window once a second.
    pub(super) fn start_recovery(self: &Arc<Self>) {
        let Some(r) = &self.recovery else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            let rec = r.clone();
            self.hub.observe_recorded(move |_, _, room, joined| {
                if joined {
                    rec.mark(room)
                }
            });
            return;
        };
        let ops = if r.keeps_connected() {
            let (tx, rx) = mpsc::unbounded_channel();
            rt.spawn(session_writer(Arc::downgrade(self), r.clone(), rx));
            let _ = self.session_ops.set(tx.clone());
            Some(tx)
        } else {
            None
        };
        let rec = r.clone();
        self.hub.observe_recorded(move |conn, nsp, room, joined| {
            if joined {
                rec.mark(room);
            }
            if let Some(ops) = &ops {
                let _ = ops.send(SessionOp::Changed {
                    conn,
                    nsp: nsp.into(),
                    create: false,
                });
            }
        });
        let node = Arc::downgrade(self);
        rt.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(n) = node.upgrade() else { return };
                if n.shutdown.is_cancelled() {
                    return;
                }
                let Some(r) = &n.recovery else { return };
                r.sweep(&|room| n.hub.has_recorded_member(room));
                let (sessions, entries) = r.sizes();
                n.metrics.recovery_sessions.set(sessions as u64);
                n.metrics.recovery_entries.set(entries as u64);
            }
        });
    }

    /// A recorded socket's session as it is now: once its client holds
    /// the pid (connected, or being recovered).
    fn session_of(&self, conn: &ConnHandle, inst: &InstanceState, at: u64) -> Option<Session> {
        let info = inst.socket.as_ref()?;
        let pid = info.pid.as_ref()?;
        if !inst.slot.is_recorded() || !(info.is_connected() || info.recovered) {
            return None;
        }
        let mut rooms: Vec<String> = conn
            .rooms_of(&inst.slot)
            .iter()
            .map(|r| r.to_string())
            .collect();
        rooms.sort();
        Some(Session {
            pid: pid.to_string(),
            sid: info.sid.to_string(),
            nsp: inst.slot.id().to_owned(),
            plugin: inst.plugin.to_string(),
            connection: conn.id,
            rooms,
            identity: conn.identity().map(|i| KeptIdentity {
                user_id: i.user_id.to_string(),
                claims: i.claims.to_string(),
            }),
            attributes: conn.attributes_of(&inst.plugin),
            since: info.since,
            disconnected_at: at,
        })
    }

    /// A recorded socket connected (`create`) or changed: its session is
    /// written where sessions are kept while connected.
    pub fn session_changed(&self, conn: ConnId, nsp: &str, create: bool) {
        if let Some(ops) = self.session_ops.get() {
            let _ = ops.send(SessionOp::Changed {
                conn,
                nsp: nsp.into(),
                create,
            });
        }
    }

    /// A recorded socket ended for good (its client left, the host or its
    /// plugin ended it): its session is not kept.
    pub(super) fn forget_session(&self, conn: ConnId, inst: &InstanceState) {
        let (Some(r), Some(pid)) = (
            &self.recovery,
            inst.socket.as_ref().and_then(|s| s.pid.clone()),
        ) else {
            return;
        };
        if !inst.slot.is_recorded() {
            return;
        }
        match self.session_ops.get() {
            Some(ops) => {
                let _ = ops.send(SessionOp::Forget(pid.to_string(), conn));
            }
            None => spawn(r.forget(&pid, conn)),
        }
    }

    /// Keeps the sessions of a connection's recorded sockets (called
    /// before the hub forgets it); the ids of the instances kept.
    pub(super) fn keep_sessions(&self, conn: &ConnHandle) -> Vec<Arc<str>> {
        let Some(r) = &self.recovery else {
            return Vec::new();
        };
        let mut kept = Vec::new();
        for inst in conn.instances_where(|i| i.slot.is_recorded()) {
            let Some(session) = self.session_of(conn, &inst, now_ms()) else {
                continue;
            };
            kept.push(inst.slot.id().into());
            self.metrics.recovery_kept.inc();
            match self.session_ops.get() {
                Some(ops) => {
                    let _ = ops.send(SessionOp::Keep(session));
                }
                // The memory side keeps it before this returns.
                None => spawn(r.keep(session, Keep::LOST)),
            }
        }
        kept
    }

    /// A CONNECT with a pid: takes the session back on this connection
    /// (same socket id, its rooms, identity and attribute sets), reads
    /// what it missed and asks its plugin (`recover`). Anything but
    /// [`Recovered::Yes`] leaves no instance behind.
    pub async fn recover_instance(&self, r: RecoverInstance<'_>) -> Recovered {
        let Some(store) = self.recovery.clone() else {
            return Recovered::No(Refusal::Unknown);
        };
        let session = match store.take(r.pid).await {
            Ok(s) => s,
            Err(e) => return Recovered::No(e),
        };
        // Taken from the store: put back wherever this CONNECT cannot use
        // it (the socket may still come back), but not when its plugin
        // refused it.
        let put_back = |s: &Session| spawn(store.keep(s.clone(), Keep::LOST));
        if session.nsp != r.nsp || session.plugin != *r.plugin.name {
            put_back(&session);
            return Recovered::No(Refusal::Elsewhere);
        }
        // An anonymous transport takes the kept identity (the pid proves
        // the client was that socket); it cannot be taken back, so a
        // recovery that fails from here on ends the transport.
        let (identity, user_connections, adopted) = match (&session.identity, r.conn.identity()) {
            (Some(kept), Some(now)) if *now.user_id != *kept.user_id => {
                put_back(&session);
                return Recovered::No(Refusal::Elsewhere);
            }
            (Some(kept), None) => {
                let identity = Identity {
                    user_id: kept.user_id.as_str().into(),
                    claims: kept.claims.as_str().into(),
                };
                match self.identify(r.conn.id, identity.clone()) {
                    Ok(n) => (Some(identity), n as u32, true),
                    Err(_) => {
                        put_back(&session);
                        return Recovered::No(Refusal::Elsewhere);
                    }
                }
            }
            (_, Some(now)) => (
                Some(now.clone()),
                self.hub.user_conns(&now.user_id).len() as u32,
                false,
            ),
            (None, None) => (None, 0, false),
        };
        let conn = r.conn;
        self.close_instance(conn, r.nsp, DisconnectReason::Replaced, true);
        let info = Arc::new(SocketInfo {
            pid: Some(session.pid.as_str().into()),
            since: session.since,
            recovered: true,
            ..SocketInfo::new(session.sid.as_str().into(), r.handshake)
        });
        let slot = Slot::recorded_socket(r.nsp);
        self.hub.add_instance(
            conn,
            r.nsp,
            InstanceState {
                plugin: r.plugin.name.clone(),
                channel: r.nsp.into(),
                slot: slot.clone(),
                socket: Some(info.clone()),
            },
        );
        for (name, values) in &session.attributes {
            conn.set_attribute(&r.plugin.name, name, values.clone(), None);
        }
        for room in &session.rooms {
            self.hub.join(conn, slot.clone(), room);
        }
        // Read once the socket is back in its rooms: what is published
        // from now on is held for it, what came before is in the history.
        let after = r.offset.unwrap_or(session.since).max(session.since);
        let history = match store.missed(&session.rooms, after).await {
            Ok(h) => h,
            Err(e) => {
                self.close_instance(conn, r.nsp, DisconnectReason::Server, false);
                put_back(&session);
                if adopted {
                    tracing::warn!(nsp = r.nsp, "connection state not recovered: {e}");
                    self.metrics.recovery_refused(e);
                    return Recovered::Refused(Refused {
                        why: Ok(Rejection {
                            message: "Connection state could not be read".into(),
                            data: None,
                        }),
                        end_transport: true,
                    });
                }
                return Recovered::No(e);
            }
        };
        let replay: Vec<Outbound> = history
            .missed
            .into_iter()
            .filter(|m| admits(&m.publication.filter, conn, session.connection, r.nsp))
            .map(|m| {
                let p = m.publication;
                Outbound::Event {
                    slot: slot.clone(),
                    event: SharedEvent::numbered(
                        &p.event,
                        p.data,
                        p.args,
                        p.attachments,
                        Some(m.offset),
                    ),
                }
            })
            .collect();
        let req = RecoverRequest {
            target: InstanceRef {
                connection: conn.id,
                id: r.nsp.to_owned(),
            },
            previous: InstanceRef {
                connection: session.connection,
                id: r.nsp.to_owned(),
            },
            socket_id: session.sid.clone(),
            away_ms: now_ms().saturating_sub(session.disconnected_at),
            params: r.params,
            headers: info.handshake.request.headers.clone(),
            query: info.handshake.request.query.clone(),
            identity,
            user_connections,
            rooms: session.rooms.clone(),
            missed: replay.len() as u32,
        };
        let outcome = match r.plugin.recover(req).await {
            Ok(Ok(())) => {
                self.metrics.recovered.inc();
                self.metrics.recovery_replayed.add(replay.len() as u64);
                return Recovered::Yes {
                    info,
                    replay,
                    replayed_upto: history.head,
                };
            }
            Ok(Err(rej)) => Recovered::Refused(Refused {
                why: Ok(rej),
                end_transport: adopted,
            }),
            Err(e) => {
                put_back(&session);
                Recovered::Refused(Refused {
                    why: Err(e),
                    end_transport: adopted,
                })
            }
        };
        self.close_instance(conn, r.nsp, DisconnectReason::Server, false);
        outcome
    }

    /// A plugin's `emit`/`send` to a recorded socket goes through its id's
    /// room, so it is numbered and kept like any room event. False (and
    /// nothing done) for other instances.
    pub(super) fn to_recorded_socket(
        &self,
        inst: &InstanceState,
        event: &str,
        data: &Arc<str>,
        args: Option<Arc<str>>,
        attachments: &Arc<[Vec<u8>]>,
    ) -> bool {
        let Some(info) = inst.socket.as_ref().filter(|_| inst.slot.is_recorded()) else {
            return false;
        };
        let p = Publication {
            room: info.sid.clone(),
            event: event.into(),
            data: data.clone(),
            args,
            attachments: attachments.clone(),
            filter: Filter::default(),
            offset: None,
        };
        self.broker.publish_best_effort(p);
        true
    }
}

/// Whether a missed publication is for this socket: its filter, with the
/// socket's previous instance as the one `except` may name.
fn admits(filter: &Filter, conn: &ConnHandle, previous: u64, nsp: &str) -> bool {
    let excepted = filter
        .except
        .as_ref()
        .is_some_and(|(c, id)| (*c == previous || *c == conn.id) && &**id == nsp);
    !excepted && filter.admits(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed(conn: ConnId, nsp: &str, create: bool) -> SessionOp {
        SessionOp::Changed {
            conn,
            nsp: nsp.into(),
            create,
        }
    }

    fn shape(ops: &[SessionOp]) -> Vec<String> {
        ops.iter()
            .map(|o| match o {
                SessionOp::Changed { conn, nsp, create } => format!("changed {conn}{nsp} {create}"),
                SessionOp::Keep(s) => format!("keep {}", s.pid),
                SessionOp::Forget(pid, _) => format!("forget {pid}"),
            })
            .collect()
    }

    #[test]
    fn a_sockets_changes_waiting_together_are_written_once_in_the_last_place() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        for op in [
            changed(2, "/", false),
            changed(1, "/", false),
            SessionOp::Forget("p".into(), 3),
            changed(1, "/", false),
            changed(1, "/x", false),
        ] {
            tx.send(op).unwrap();
        }
        let out = coalesce(changed(1, "/", true), &mut rx);
        assert_eq!(
            shape(&out),
            [
                "changed 2/ false",
                "forget p",
                "changed 1/ true",
                "changed 1/x false"
            ]
        );
        // Nothing waits: the one op alone.
        let out = coalesce(changed(5, "/", false), &mut rx);
        assert_eq!(shape(&out), ["changed 5/ false"]);
    }
}
