//! The `/infra` namespace of a Mew-like chat app
//! (U1805/mew, `server/src/infra/infraSocket.ts`): backend services
//! (bots, workers) connect with the admin secret and their service type.
//!
//! - The admin secret comes from the header `X-Mew-Admin-Secret` or
//!   `auth.adminSecret`, never from the query string, and is compared in
//!   constant time with `[plugins.mew-infra] admin_secret`.
//! - `serviceType` comes from `auth.serviceType`, else the query, trimmed;
//!   `sdk` is reserved.
//! - Refusals: `Authentication error: Admin secret not configured`,
//!   `... Invalid admin secret`, `... Missing serviceType`,
//!   `... Reserved serviceType: <x>`.
//! - Each socket joins the room named by its service type, so
//!   `SYSTEM_BOT_CONFIG_UPDATE {serviceType, botId}` published there reaches
//!   the service.
//! - Online services (first connection to last disconnect of a type) are
//!   kept in the key-value store under `online-services` (a JSON array),
//!   readable at `GET /api/plugins/mew-infra/kv/online-services`; each
//!   type's connection count is `count:<type>` (`kv-incr`, atomic across
//!   the nodes of a cluster).

use chanhost_plugin::types::{
    ConnectRequest, DisconnectReason, Instance, Manifest, NamespaceSpec, Payload, Rejection,
};
use chanhost_plugin::{export, host, log_info, Guest};
use serde_json::Value;

const RESERVED: [&str; 1] = ["sdk"];
const ONLINE: &str = "online-services";

struct Infra;

fn refuse(message: String) -> Rejection {
    Rejection {
        message: format!("Authentication error: {message}"),
        data: None,
    }
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

/// Which service a connection is: this node's bookkeeping, a private key
/// (with `[cluster]` it stays on the node; the counts are shared).
fn conn_key(connection: u64) -> String {
    format!("_conn:{connection}")
}

fn set_online(service: &str, online: bool) {
    let mut list: Vec<String> = host::kv_get(ONLINE)
        .and_then(|v| serde_json::from_str(&v).ok())
        .unwrap_or_default();
    list.retain(|s| s != service);
    if online {
        list.push(service.to_owned());
        list.sort();
    }
    host::kv_set(ONLINE, &Value::from(list).to_string());
}

impl Guest for Infra {
    fn fetched(_id: u64, _response: Result<chanhost_plugin::types::HttpResponse, String>) {}

    fn timer(_key: String) {}

    /// Recovered sockets need nothing more here: the host restored their
    /// rooms and identity.
    fn recover(
        _req: chanhost_plugin::types::RecoverRequest,
    ) -> Result<(), chanhost_plugin::types::Rejection> {
        Ok(())
    }

    fn describe() -> Manifest {
        Manifest {
            version: env!("CARGO_PKG_VERSION").into(),
            channels: vec![],
            namespaces: vec![NamespaceSpec {
                name: "/infra".into(),
            }],
            frames: vec![],
        }
    }

    fn init(config: String) -> Result<(), String> {
        let cfg: Value = serde_json::from_str(&config).map_err(|e| e.to_string())?;
        match cfg.get("admin_secret") {
            None | Some(Value::String(_)) => {}
            Some(_) => return Err("admin_secret must be a string".into()),
        }
        host::kv_set("_config", &config);
        if host::kv_get(ONLINE).is_none() {
            host::kv_set(ONLINE, "[]");
        }
        Ok(())
    }

    fn connect(req: ConnectRequest) -> Result<(), Rejection> {
        let cfg: Value = host::kv_get("_config")
            .and_then(|c| serde_json::from_str(&c).ok())
            .unwrap_or(Value::Null);
        let secret = cfg
            .get("admin_secret")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| refuse("Admin secret not configured".into()))?;
        let auth: Value = serde_json::from_str(&req.params).unwrap_or(Value::Null);
        let provided = req
            .headers
            .iter()
            .find(|(k, _)| k == "x-mew-admin-secret")
            .map(|(_, v)| v.as_str())
            .or_else(|| auth.get("adminSecret").and_then(Value::as_str));
        if !provided.is_some_and(|p| constant_time_eq(p.as_bytes(), secret.as_bytes())) {
            return Err(refuse("Invalid admin secret".into()));
        }
        let raw = auth
            .get("serviceType")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| {
                req.query
                    .iter()
                    .find(|(k, _)| k == "serviceType")
                    .map(|(_, v)| v.clone())
            })
            .unwrap_or_default();
        let service = raw.trim();
        if service.is_empty() {
            return Err(refuse("Missing serviceType".into()));
        }
        if RESERVED.contains(&service) {
            return Err(refuse(format!("Reserved serviceType: {service}")));
        }
        host::join(&req.target, service);
        host::kv_set(&conn_key(req.target.connection), service);
        if host::kv_incr(&format!("count:{service}"), 1) == 1 {
            set_online(service, true);
            log_info(&format!("service {service} online"));
        }
        Ok(())
    }

    fn message(_target: Instance, _event: String, _data: Payload, _ack: Option<u64>) {}

    fn disconnect(target: Instance, _reason: DisconnectReason) {
        let key = conn_key(target.connection);
        let Some(service) = host::kv_get(&key) else {
            return;
        };
        host::kv_delete(&key);
        if host::kv_incr(&format!("count:{service}"), -1) <= 0 {
            host::kv_delete(&format!("count:{service}"));
            set_online(&service, false);
            log_info(&format!("service {service} offline"));
        }
    }

    fn event(_room: String, _event: String, _data: Payload) {}

    fn frame(_connection: u64, _kind: String, _body: String) {}
}

export!(Infra);

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn secret_comparison() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
        assert!(!constant_time_eq(b"s3cret", b"s3cre"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
