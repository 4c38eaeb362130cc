//! The Socket.IO gateway of a Mew-like chat app, namespace `/`
//! (U1805/mew, `server/src/gateway/`).
//!
//! - Auth: the token from the handshake's `auth.token`, else the cookie
//!   `mew_access_token`, verified by the host's `[auth]` providers (JWT HS256
//!   as Mew issues them). Refusals: `Authentication error: No token provided`,
//!   `Authentication error: Invalid token` (expired included).
//! - On connect, in order: join the user's room (the user id), room `mew:all`
//!   (Mew's `io.emit`) and the rooms the backend lists (`GET <rooms_url>` with
//!   the user's token, answering a JSON array of ids); identify the connection
//!   and, on the user's first connection, broadcast
//!   `PRESENCE_UPDATE {userId, status:"online"}`; emit `PRESENCE_INITIAL_STATE`
//!   (online user ids); emit `ready`.
//! - Presence is counted by the host across connections: `PRESENCE_UPDATE
//!   {status:"offline"}` goes out when the user's last connection closes.
//! - `message/create {channelId, ...}` becomes `POST
//!   <api_base>/channels/<channelId>/messages` with the user's token and the
//!   other fields as body; a failure emits `error {message: "Failed to create
//!   message"}` to that socket. The created message comes back through the
//!   publish API like every backend event.
//!
//! Config `[plugins.mew]`: `rooms_url`, `api_base`, `allow_http` (origins of both).

use chanhost_plugin::http;
use chanhost_plugin::types::{
    ConnectRequest, DisconnectReason, Instance, Manifest, NamespaceSpec, Rejection,
};
use chanhost_plugin::{export, host, json, log_warn, Event, Guest, Message};
use serde_json::{json as j, Value};

const EVERYONE: &str = "mew:all";
const PRESENCE: &str = "chanhost:presence";

struct Mew;

fn refuse(message: &str) -> Rejection {
    Rejection {
        message: message.into(),
        data: None,
    }
}

fn config_str(key: &str) -> Option<String> {
    let cfg: Value = serde_json::from_str(&host::kv_get("_config")?).ok()?;
    cfg.get(key)?.as_str().map(str::to_owned)
}

/// `mew_access_token` from a Cookie header.
fn cookie_token(headers: &[(String, String)]) -> Option<String> {
    headers
        .iter()
        .filter(|(k, _)| k == "cookie")
        .flat_map(|(_, v)| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == "mew_access_token")
        .map(|(_, v)| v.to_owned())
        .filter(|v| !v.is_empty())
}

fn token_key(connection: u64) -> String {
    format!("_token:{connection}")
}

fn backend_rooms(token: &str) -> Vec<String> {
    let Some(url) = config_str("rooms_url") else {
        return Vec::new();
    };
    let auth = format!("Bearer {token}");
    match http::get(&url, &[("authorization", &auth)]) {
        Ok(r) if r.ok() => serde_json::from_slice::<Vec<Value>>(&r.body)
            .map(|ids| {
                ids.iter()
                    .filter_map(|v| match v {
                        Value::String(s) => Some(s.clone()),
                        Value::Number(n) => Some(n.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        Ok(r) => {
            log_warn(&format!("rooms_url answered {}", r.status));
            Vec::new()
        }
        Err(e) => {
            log_warn(&format!("rooms_url: {e}"));
            Vec::new()
        }
    }
}

fn create_message(target: &Instance, data: &Value) -> Result<(), String> {
    let base = config_str("api_base").ok_or("api_base is not configured")?;
    let token = host::kv_get(&token_key(target.connection)).ok_or("no token for connection")?;
    let channel = match data.get("channelId") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err("missing channelId".into()),
    };
    let mut body = data.as_object().cloned().unwrap_or_default();
    body.remove("channelId");
    let url = format!("{}/channels/{channel}/messages", base.trim_end_matches('/'));
    let auth = format!("Bearer {token}");
    let r = http::post_json(
        &url,
        &[("authorization", &auth)],
        &Value::Object(body).to_string(),
    )
    .map_err(|e| e.to_string())?;
    if r.ok() {
        Ok(())
    } else {
        Err(format!("backend answered {}", r.status))
    }
}

/// The token of a CONNECT (its auth's `token`, else the `mew_access_token`
/// cookie) and who it names, or the refusal Mew's gateway answers.
fn authenticate(
    params: &str,
    headers: &[(String, String)],
) -> Result<(String, chanhost_plugin::types::Identity), Rejection> {
    let auth: Value = serde_json::from_str(params).unwrap_or(Value::Null);
    let token = auth
        .get("token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .or_else(|| cookie_token(headers))
        .ok_or_else(|| refuse("Authentication error: No token provided"))?;
    let identity =
        host::verify_token(&token).map_err(|_| refuse("Authentication error: Invalid token"))?;
    Ok((token, identity))
}

impl Guest for Mew {
    fn fetched(_id: u64, _response: Result<chanhost_plugin::types::HttpResponse, String>) {}

    fn timer(_key: String) {}

    /// A socket back after losing its connection: the host restored its
    /// rooms and identity and replays what it missed, so there is no
    /// second `PRESENCE_INITIAL_STATE` or `ready`. Its token is checked
    /// again (an expired one refuses the recovery as `connect` would), and
    /// the user is announced online again if this is their only
    /// connection.
    fn recover(req: chanhost_plugin::types::RecoverRequest) -> Result<(), Rejection> {
        let (token, identity) = authenticate(&req.params, &req.headers)?;
        if req.identity.as_ref().map(|i| &i.user_id) != Some(&identity.user_id) {
            return Err(refuse("Authentication error: Invalid token"));
        }
        host::kv_set(&token_key(req.target.connection), &token);
        if req.user_connections == 1 {
            let update = j!({"userId": identity.user_id, "status": "online"}).to_string();
            host::broadcast(EVERYONE, "PRESENCE_UPDATE", &json(update), None);
        }
        Ok(())
    }

    fn describe() -> Manifest {
        Manifest {
            version: env!("CARGO_PKG_VERSION").into(),
            channels: vec![],
            namespaces: vec![NamespaceSpec { name: "/".into() }],
            frames: vec![],
        }
    }

    fn init(config: String) -> Result<(), String> {
        host::kv_set("_config", &config);
        host::listen(PRESENCE);
        Ok(())
    }

    fn connect(req: ConnectRequest) -> Result<(), Rejection> {
        let (token, identity) = authenticate(&req.params, &req.headers)?;
        let user = identity.user_id.clone();
        host::kv_set(&token_key(req.target.connection), &token);

        host::join(&req.target, &user);
        host::join(&req.target, EVERYONE);
        for room in backend_rooms(&token) {
            host::join(&req.target, &room);
        }
        let first = host::set_identity(req.target.connection, &identity)
            .map_err(|e| refuse(&format!("Authentication error: {e}")))?
            == 1;
        if first {
            let update = j!({"userId": user, "status": "online"}).to_string();
            host::broadcast(EVERYONE, "PRESENCE_UPDATE", &json(update), None);
        }
        let online = Value::from(host::online_users()).to_string();
        host::send(&req.target, "PRESENCE_INITIAL_STATE", &json(online));
        host::emit(&req.target, "ready", &json("[]"));
        Ok(())
    }

    /// Read in place from the batch the host gives.
    fn on_message(m: Message<'_>) {
        if m.event != "message/create" {
            return;
        }
        let args: Value = serde_json::from_str(m.data).unwrap_or(Value::Null);
        let payload = args.get(0).cloned().unwrap_or(Value::Null);
        let target = m.target();
        if let Err(e) = create_message(&target, &payload) {
            log_warn(&format!("message/create failed: {e}"));
            let err = j!({"message": "Failed to create message"}).to_string();
            host::send(&target, "error", &json(err));
        }
    }

    fn disconnect(target: Instance, _reason: DisconnectReason) {
        host::kv_delete(&token_key(target.connection));
    }

    fn on_event(e: Event<'_>) {
        if e.room != PRESENCE || e.event != "offline" {
            return;
        }
        let change: Value = serde_json::from_str(e.data).unwrap_or(Value::Null);
        if let Some(user) = change.get("userId").and_then(Value::as_str) {
            let update = j!({"userId": user, "status": "offline"}).to_string();
            host::broadcast(EVERYONE, "PRESENCE_UPDATE", &json(update), None);
        }
    }

    fn frame(_connection: u64, _kind: String, _body: String) {}
}

export!(Mew);
