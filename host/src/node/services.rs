//! The host imports plugins call ([`HostServices`]), with the checks that
//! keep each plugin to what it owns: a plugin addresses only its own
//! instances, and closes, identifies or tags only connections it serves;
//! payloads must be JSON, their placeholders matching their attachments.

use std::sync::Arc;

use serde::de::IgnoredAny;

use super::Node;
use crate::broker::{LocalDelivery, Publication};
use crate::hub::{Ack, Condition, ConnHandle, Filter, InstanceState, Outbound, SharedEvent};
use crate::plugin::kv::KvStore;
use crate::plugin::{HostServices, IdentityError, InstanceRef, Payload};
use crate::protocol::socketio;

pub(super) fn is_json(s: &str) -> bool {
    serde_json::from_str::<IgnoredAny>(s).is_ok()
}

/// Checks a payload a plugin hands over: JSON, and (with attachments)
/// exactly one placeholder per attachment. Logs and returns false if not.
fn valid_payload(plugin: &str, what: &str, data: &Payload) -> bool {
    if data.attachments.is_empty() {
        if is_json(&data.json) {
            return true;
        }
    } else if let Ok(v) = serde_json::from_str::<serde_json::Value>(&data.json) {
        if socketio::count_placeholders(&v) == data.attachments.len() {
            return true;
        }
        tracing::warn!(
            plugin,
            "{what} whose placeholders do not match its attachments; dropped"
        );
        return false;
    }
    tracing::warn!(plugin, "{what} with invalid JSON data; dropped");
    false
}

impl Node {
    /// A connection on which the plugin serves at least one instance: the
    /// only connections it may close, identify or tag.
    fn served(&self, plugin: &str, connection: u64) -> Result<Arc<ConnHandle>, IdentityError> {
        let conn = self
            .hub
            .conn(connection)
            .ok_or(IdentityError::NoConnection)?;
        if !conn.any_instance(|i| &*i.plugin == plugin) {
            tracing::warn!(
                plugin,
                connection,
                "plugin addressed a connection it does not serve; ignored"
            );
            return Err(IdentityError::NotServed);
        }
        Ok(conn)
    }

    /// The instance a plugin addresses, if it exists and belongs to it.
    fn owned(
        &self,
        plugin: &str,
        target: &InstanceRef,
    ) -> Option<(Arc<ConnHandle>, InstanceState)> {
        let conn = self.hub.conn(target.connection)?;
        let inst = conn.instance(&target.id)?;
        if &*inst.plugin != plugin {
            tracing::warn!(
                plugin,
                owner = &*inst.plugin,
                "plugin addressed an instance of another plugin; ignored"
            );
            return None;
        }
        Some((conn, inst))
    }
}

impl HostServices for Node {
    fn send(&self, plugin: &str, target: InstanceRef, event: &str, data: Payload) {
        if !valid_payload(plugin, "send", &data) {
            return;
        }
        if let Some((conn, inst)) = self.owned(plugin, &target) {
            let (data, attachments): (Arc<str>, Arc<[Vec<u8>]>) =
                (data.json.into(), data.attachments.into());
            if self.to_recorded_socket(&inst, event, &data, None, &attachments) {
                return;
            }
            conn.push(Outbound::Event {
                slot: inst.slot,
                event: SharedEvent::with_attachments(event, data, attachments),
            });
        }
    }

    fn emit(&self, plugin: &str, target: InstanceRef, event: &str, args: Payload) {
        if !valid_payload(plugin, "emit", &args) {
            return;
        }
        let Some(ev) = SharedEvent::spread(event, &args.json, args.attachments.into()) else {
            tracing::warn!(
                plugin,
                event,
                "emit arguments must be a JSON array; dropped"
            );
            return;
        };
        if let Some((conn, inst)) = self.owned(plugin, &target) {
            if self.to_recorded_socket(&inst, event, &ev.data, ev.args.clone(), &ev.attachments) {
                return;
            }
            conn.push(Outbound::Event {
                slot: inst.slot,
                event: ev,
            });
        }
    }

    fn ack(&self, plugin: &str, target: InstanceRef, ack_id: u64, args: Payload) {
        if !valid_payload(plugin, "ack", &args) {
            return;
        }
        if !args.json.trim_start().starts_with('[') {
            tracing::warn!(plugin, "ack arguments must be a JSON array; dropped");
            return;
        }
        let Some((conn, _)) = self.owned(plugin, &target) else {
            return;
        };
        // Misskey streams have no acks: their writer drops it.
        conn.push(Outbound::Ack(Box::new(Ack {
            asks: false,
            instance: target.id.into(),
            id: ack_id,
            args: args.json,
            attachments: args.attachments,
        })));
    }

    fn join(&self, plugin: &str, target: InstanceRef, room: &str) {
        if let Some((conn, inst)) = self.owned(plugin, &target) {
            self.hub.join(&conn, inst.slot, room);
        }
    }

    fn leave(&self, plugin: &str, target: InstanceRef, room: &str) {
        if let Some((conn, inst)) = self.owned(plugin, &target) {
            self.hub.leave(&conn, &inst.slot, room);
        }
    }

    fn broadcast(
        &self,
        plugin: &str,
        room: &str,
        event: &str,
        data: Payload,
        except: Option<InstanceRef>,
        conditions: Vec<Condition>,
        local_only: bool,
    ) {
        if !valid_payload(plugin, "broadcast", &data) {
            return;
        }
        let p = Publication {
            room: room.into(),
            event: event.into(),
            data: data.json.into(),
            attachments: data.attachments.into(),
            filter: Filter {
                audience: None,
                except: except.map(|e| (e.connection, e.id.into())),
                owner: Some(plugin.into()),
                conditions: conditions.into(),
                recorded: None,
            },
            args: None,
            offset: None,
        };
        self.metrics.publishes.inc();
        if local_only {
            self.deliver_local(&p);
        } else {
            self.to_adapter(&p);
            self.broker.publish_best_effort(p);
        }
    }

    fn set_attribute(
        &self,
        plugin: &str,
        connection: u64,
        name: &str,
        add: Vec<String>,
        remove: Option<Vec<String>>,
    ) {
        let Ok(conn) = self.served(plugin, connection) else {
            return;
        };
        conn.set_attribute(&plugin.into(), name, add, remove.as_deref());
    }

    fn set_user_attribute(
        &self,
        plugin: &str,
        user: &str,
        name: &str,
        add: Vec<String>,
        remove: Option<Vec<String>>,
    ) {
        self.hub
            .set_user_attribute(user, &plugin.into(), name, add, remove.as_deref());
    }

    fn has_user_attribute(&self, plugin: &str, user: &str, name: &str) -> bool {
        self.hub.has_user_attribute(user, plugin, name)
    }

    fn room_size(&self, room: &str) -> u32 {
        u32::try_from(self.hub.room_size(room)).unwrap_or(u32::MAX)
    }

    fn listen(&self, plugin: &Arc<str>, room: &str) {
        self.hub.listen(plugin, room);
    }

    fn unlisten(&self, plugin: &str, room: &str) {
        self.hub.unlisten(plugin, room);
    }

    fn set_listens(&self, plugin: &Arc<str>, rooms: &[String]) {
        self.hub.set_listens(plugin, rooms);
    }

    fn end_instance(&self, plugin: &str, target: InstanceRef) {
        if let Some((conn, _)) = self.owned(plugin, &target) {
            self.end_instance(&conn, &target.id, true);
        }
    }

    fn close_connection(&self, plugin: &str, connection: u64, reason: &str) {
        let Ok(conn) = self.served(plugin, connection) else {
            return;
        };
        tracing::info!(plugin, connection, reason, "plugin closed a connection");
        conn.request_close(1000, reason);
    }

    fn identity(&self, connection: u64) -> Option<crate::auth::Identity> {
        self.hub.conn(connection)?.identity().cloned()
    }

    fn set_identity(
        &self,
        plugin: &str,
        connection: u64,
        identity: crate::auth::Identity,
    ) -> Result<u32, IdentityError> {
        self.served(plugin, connection)?;
        if !is_json(&identity.claims) {
            return Err(IdentityError::ClaimsNotJson);
        }
        Ok(self.identify(connection, identity)? as u32)
    }

    fn online_users(&self) -> Vec<String> {
        Node::online_users(self)
    }

    fn verify_token(&self, token: &str) -> Result<crate::auth::Identity, crate::auth::AuthError> {
        self.auth.verify(token)
    }

    fn kv(&self) -> &dyn KvStore {
        &*self.kv
    }
}
