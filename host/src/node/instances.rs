//! The life cycle of a channel instance, in one place: a client opens one
//! ([`Node::connect_instance`]: a reused id replaces the old instance, whose
//! plugin is told first; the new one is registered before its plugin
//! decides, so the plugin can join rooms from `connect`; a refusal or a
//! failed call rolls it back), the client or the server ends it
//! ([`Node::close_instance`], [`Node::end_instance`]), a plugin's removal
//! ends all of its instances. The protocol sessions only translate: what a
//! frame asks, and how the outcome is told to the client.

use std::sync::Arc;

use super::Node;
use crate::hub::{ConnHandle, InstanceState, Outbound, Slot, SocketInfo};
use crate::plugin::runtime::CallError;
use crate::plugin::{ConnectRequest, DisconnectReason, InstanceRef, PluginSlot, Rejection};
use crate::server::Pairs;

/// A client's request to open a channel instance on its connection.
pub struct OpenInstance<'a> {
    pub conn: &'a ConnHandle,
    /// The instance id (Misskey: the client's; Socket.IO: the namespace).
    pub id: &'a str,
    pub plugin: Arc<PluginSlot>,
    /// The channel name or namespace.
    pub channel: &'a str,
    /// Misskey `params` / the Socket.IO CONNECT auth, as JSON text.
    pub params: String,
    /// What the connection kept of its opening request.
    pub headers: Pairs,
    pub query: Pairs,
    /// The bearer token the connection authenticated with, if any.
    pub credential: Option<Arc<str>>,
    /// A Socket.IO socket's id and handshake.
    pub socket: Option<Arc<SocketInfo>>,
}

/// How an open ended.
#[derive(Debug)]
pub enum Opened {
    /// The plugin accepted: the instance is open.
    Accepted,
    /// The plugin refused: the instance is gone again.
    Refused(Rejection),
    /// The call failed (trap, timeout, plugin gone): the instance is gone.
    Failed(CallError),
}

impl Node {
    /// Ends the instances a plugin serves (all of them, or those of some
    /// channels) on every connection, without calling the plugin.
    pub(super) fn end_plugin_instances(&self, plugin: &str, channels: Option<&[String]>) {
        for conn in self.hub.all_conns() {
            let ended = conn.instances_where(|i| {
                &*i.plugin == plugin && channels.is_none_or(|c| c.iter().any(|c| **c == *i.channel))
            });
            for inst in ended {
                self.end_instance(&conn, inst.slot.id(), false);
            }
        }
    }

    /// Ends an instance from the server side; the connection's writer
    /// tells the client in its protocol ([`Outbound::Ended`]).
    pub fn end_instance(&self, conn: &ConnHandle, id: &str, notify_plugin: bool) {
        if self
            .close_instance(conn, id, DisconnectReason::Server, notify_plugin)
            .is_some()
        {
            conn.push(Outbound::Ended(id.into()));
        }
    }

    /// Ends one instance: leaves its rooms, forgets it, and (if asked)
    /// tells its plugin why.
    pub fn close_instance(
        &self,
        conn: &ConnHandle,
        id: &str,
        reason: DisconnectReason,
        notify_plugin: bool,
    ) -> Option<InstanceState> {
        let inst = self.hub.remove_instance(conn, id)?;
        self.forget_session(conn.id, &inst);
        if notify_plugin {
            if let Some(p) = self.plugins.plugin(&inst.plugin) {
                p.disconnect(
                    InstanceRef {
                        connection: conn.id,
                        id: id.to_owned(),
                    },
                    reason,
                );
            }
        }
        Some(inst)
    }

    /// Opens an instance for a client: replaces one with the same id,
    /// registers the new one, asks its plugin, rolls back unless accepted.
    pub async fn connect_instance(&self, open: OpenInstance<'_>) -> Opened {
        let OpenInstance {
            conn,
            id,
            plugin,
            channel,
            params,
            headers,
            query,
            credential,
            socket,
        } = open;
        self.close_instance(conn, id, DisconnectReason::Replaced, true);
        // A recovered socket's slot is recorded, and it is in its id's
        // room from the start: what its plugin emits to it from `connect`
        // on is numbered like any room event.
        let recorded = socket
            .as_ref()
            .filter(|s| s.pid.is_some())
            .map(|s| s.sid.clone());
        let slot = match recorded {
            Some(_) => Slot::recorded_socket(id),
            None => Slot::instance(id),
        };
        // A connection already forgotten by the hub gets no new instance.
        self.hub.add_instance(
            conn,
            id,
            InstanceState {
                plugin: plugin.name.clone(),
                channel: channel.into(),
                slot: slot.clone(),
                socket,
            },
        );
        if let (Some(sid), Some(conn)) = (recorded, self.hub.conn(conn.id)) {
            self.hub.join(&conn, slot, &sid);
        }
        let req = ConnectRequest {
            target: InstanceRef {
                connection: conn.id,
                id: id.to_owned(),
            },
            protocol: conn.protocol,
            channel: channel.to_owned(),
            params,
            identity: conn.identity().cloned(),
            headers,
            query,
            credential,
        };
        let outcome = match plugin.connect(req).await {
            Ok(Ok(())) => return Opened::Accepted,
            Ok(Err(rejection)) => Opened::Refused(rejection),
            Err(e) => Opened::Failed(e),
        };
        self.close_instance(conn, id, DisconnectReason::Server, false);
        outcome
    }
}
