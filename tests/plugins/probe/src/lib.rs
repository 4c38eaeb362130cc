//! A plugin that exposes the host imports to tests, driven by client
//! messages. Channels: `probe` (anyone), `probeUser` (needs a user),
//! `probeShared` (shared). Declares the frame type `readNotification`.
//!
//! Init fails when its config has `fail_init = true`.
//!
//! Connect params: `{"reject": true}` refuses; `{"room": R}` joins room R
//! (with `"announce": X`, then broadcasts `announce X` to R before the
//! connect returns); `{"echoCredential": true}` sends back `credential`
//! (the stream's token).
//! Messages (`ch` type, body):
//! - `echo X` -> `echo X`
//! - `join {room}` / `leave {room}` -> `joined`/`left {room}` once done
//! - `broadcast {room, event, data, exceptSelf}` -> host broadcast
//! - `whoami` -> `whoami {connection, userId, claims}` (`userId` null when anonymous)
//! - `config` -> `config <the init config>`
//! - `end` -> ends this instance from the server side
//! - `close {reason}` -> closes the whole connection
//! - `badjson` -> sends invalid JSON (the host must drop it), then `after-badjson`
//! - `poke {connection, id}` -> tries to send to an instance it may not own
//! - `attr {name, values}` / `attr-update {name, add, remove}` -> sets this
//!   connection's attribute set, then `attr-set`
//! - `fbroadcast {room, event, data, conditions}` -> a filtered broadcast
//! - `online` -> `online [user ids]` (`host::online_users`)
//! - `kv-incr {key, delta}` -> `kv-incr <new value>`
//!
//! - `fetch {url}` -> `host::fetch` (GET); the answer comes back as
//!   `fetched {status, body}` or `fetched {error}`
//! - `timer {key, ms}` -> `host::set_timer`; `cancel-timer {key}`; a due
//!   timer is reported as `timer {key}` to the instance that set it
//!
//! Deferred connects (WIT 0.2.0): with params `{"deferFetch": URL}` the
//! connect is deferred, URL fetched, and the connect settled when the
//! answer comes: accepted on a 2xx (then `fetched {status, body}` is sent to
//! the new instance first), refused with the status otherwise. With
//! `{"defer": true}` it is deferred and never settled.
//!
//! Every `disconnect` and `frame` call is reported as event
//! `disconnected`/`frame` to room `probe-log`.

use std::cell::RefCell;
use std::collections::HashMap;

use chanhost_plugin::types::{
    ChannelSpec, Condition, ConnectRequest, DisconnectReason, HttpResponse, Instance, Manifest,
    Payload, Rejection,
};
use chanhost_plugin::{export, host, instance, json, Guest};
use serde_json::{json as j, Value};

/// Who waits for a fetch: a deferred connect, or an instance that asked.
enum Waiter {
    Connect(Instance),
    Message(Instance),
}

thread_local! {
    static CONFIG: RefCell<String> = const { RefCell::new(String::new()) };
    static FETCHES: RefCell<HashMap<u64, Waiter>> = RefCell::new(HashMap::new());
    static TIMERS: RefCell<HashMap<String, Instance>> = RefCell::new(HashMap::new());
}

fn get(url: &str) -> u64 {
    chanhost_plugin::fetch_json("GET", url, &[], "")
}

fn answer(response: &Result<HttpResponse, String>) -> Value {
    match response {
        Ok(r) => j!({"status": r.status, "body": String::from_utf8_lossy(&r.body)}),
        Err(e) => j!({"error": e}),
    }
}

struct Probe;

fn spec(name: &str, requires_user: bool, shared: bool) -> ChannelSpec {
    ChannelSpec {
        name: name.into(),
        requires_user,
        shared,
    }
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn str_of<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

impl Guest for Probe {
    fn describe() -> Manifest {
        Manifest {
            version: "probe-1".into(),
            channels: vec![
                spec("probe", false, false),
                spec("probeUser", true, false),
                spec("probeShared", false, true),
            ],
            namespaces: vec![],
            frames: vec!["readNotification".into()],
        }
    }

    fn init(config: String) -> Result<(), String> {
        let parsed: Value = serde_json::from_str(&config).map_err(|e| e.to_string())?;
        if parsed.get("fail_init") == Some(&Value::Bool(true)) {
            return Err("fail_init is set".into());
        }
        CONFIG.with(|c| *c.borrow_mut() = config);
        Ok(())
    }

    fn connect(req: ConnectRequest) -> Result<(), Rejection> {
        let params: Value = serde_json::from_str(&req.params).unwrap_or(Value::Null);
        if params.get("reject").and_then(Value::as_bool) == Some(true) {
            return Err(Rejection {
                message: "rejected by request".into(),
                data: None,
            });
        }
        let room = str_of(&params, "room");
        if !room.is_empty() {
            host::join(&req.target, room);
            // An event in the room while this connect is still being
            // decided, as a busy publisher would cause.
            if let Some(v) = params.get("announce") {
                host::broadcast(room, "announce", &json(v.to_string()), None);
            }
        }
        if params.get("echoRequest") == Some(&Value::Bool(true)) {
            let pairs = |l: &[(String, String)]| {
                Value::Array(
                    l.iter()
                        .map(|(k, v)| Value::Array(vec![k.clone().into(), v.clone().into()]))
                        .collect(),
                )
            };
            let body =
                serde_json::json!({"headers": pairs(&req.headers), "query": pairs(&req.query)});
            host::send(&req.target, "request", &json(body.to_string()));
        }
        if params.get("echoCredential") == Some(&Value::Bool(true)) {
            let cred = req.credential.clone().map_or(Value::Null, Value::String);
            host::send(&req.target, "credential", &json(cred.to_string()));
        }
        if let Some(url) = params.get("deferFetch").and_then(Value::as_str) {
            host::defer_connect(&req.target);
            let id = get(url);
            FETCHES.with(|f| {
                f.borrow_mut()
                    .insert(id, Waiter::Connect(req.target.clone()))
            });
        } else if params.get("defer") == Some(&Value::Bool(true)) {
            host::defer_connect(&req.target);
        }
        Ok(())
    }

    fn fetched(id: u64, response: Result<HttpResponse, String>) {
        let Some(waiter) = FETCHES.with(|f| f.borrow_mut().remove(&id)) else {
            return;
        };
        let data = json(answer(&response).to_string());
        match waiter {
            Waiter::Message(target) => host::send(&target, "fetched", &data),
            Waiter::Connect(target) => match &response {
                Ok(r) if (200..300).contains(&r.status) => {
                    host::send(&target, "fetched", &data);
                    host::settle_connect(&target, Ok(()));
                }
                other => {
                    let message = match other {
                        Ok(r) => format!("backend answered {}", r.status),
                        Err(e) => e.clone(),
                    };
                    host::settle_connect(
                        &target,
                        Err(&Rejection {
                            message,
                            data: None,
                        }),
                    );
                }
            },
        }
    }

    fn timer(key: String) {
        if let Some(target) = TIMERS.with(|t| t.borrow_mut().remove(&key)) {
            host::send(&target, "timer", &json(j!({ "key": key }).to_string()));
        }
    }

    fn recover(
        _req: chanhost_plugin::types::RecoverRequest,
    ) -> Result<(), chanhost_plugin::types::Rejection> {
        Ok(())
    }

    fn message(target: Instance, event: String, data: Payload, _ack: Option<u64>) {
        let body: Value = serde_json::from_str(&data.json).unwrap_or(Value::Null);
        let reply = |ev: &str, v: Value| host::send(&target, ev, &json(v.to_string()));
        match event.as_str() {
            "echo" => reply("echo", body),
            "join" => {
                host::join(&target, str_of(&body, "room"));
                reply("joined", j!({"room": str_of(&body, "room")}));
            }
            "leave" => {
                host::leave(&target, str_of(&body, "room"));
                reply("left", j!({"room": str_of(&body, "room")}));
            }
            "broadcast" => {
                let except =
                    (body.get("exceptSelf") == Some(&Value::Bool(true))).then(|| target.clone());
                let data = body.get("data").cloned().unwrap_or(Value::Null).to_string();
                host::broadcast(
                    str_of(&body, "room"),
                    str_of(&body, "event"),
                    &json(data),
                    except.as_ref(),
                );
            }
            "whoami" => {
                let who = match host::connection_identity(target.connection) {
                    Some(i) => j!({
                        "connection": target.connection,
                        "userId": i.user_id,
                        "claims": serde_json::from_str::<Value>(&i.claims).unwrap_or(Value::Null),
                    }),
                    None => j!({"connection": target.connection, "userId": null}),
                };
                reply("whoami", who);
            }
            "config" => {
                let cfg = CONFIG.with(|c| c.borrow().clone());
                reply("config", serde_json::from_str(&cfg).unwrap_or(Value::Null));
            }
            "end" => host::end_instance(&target),
            "close" => host::close_connection(target.connection, str_of(&body, "reason")),
            "badjson" => {
                host::send(&target, "bad", &json("{not json"));
                reply("after-badjson", Value::Null);
            }
            "attr" => {
                let values = strings(body.get("values"));
                host::set_attribute(target.connection, str_of(&body, "name"), &values);
                reply("attr-set", Value::Null);
            }
            "attr-update" => {
                let (add, remove) = (strings(body.get("add")), strings(body.get("remove")));
                host::update_attribute(target.connection, str_of(&body, "name"), &add, &remove);
                reply("attr-set", Value::Null);
            }
            "fbroadcast" => {
                let conditions: Vec<Condition> = body
                    .get("conditions")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .map(|c| Condition {
                                attribute: str_of(c, "attribute").to_owned(),
                                keys: strings(c.get("keys")),
                                exclude: c.get("exclude") == Some(&Value::Bool(true)),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let data = body.get("data").cloned().unwrap_or(Value::Null).to_string();
                host::broadcast_filtered(
                    str_of(&body, "room"),
                    str_of(&body, "event"),
                    &json(data),
                    None,
                    &conditions,
                );
            }
            "fetch" => {
                let id = get(str_of(&body, "url"));
                FETCHES.with(|f| f.borrow_mut().insert(id, Waiter::Message(target.clone())));
            }
            "timer" => {
                let key = str_of(&body, "key").to_owned();
                let ms = body.get("ms").and_then(Value::as_u64).unwrap_or(0) as u32;
                TIMERS.with(|t| t.borrow_mut().insert(key.clone(), target.clone()));
                host::set_timer(&key, ms);
            }
            "cancel-timer" => host::cancel_timer(str_of(&body, "key")),
            "online" => reply("online", j!(host::online_users())),
            "kv-incr" => {
                let delta = body.get("delta").and_then(Value::as_i64).unwrap_or(1);
                reply("kv-incr", j!(host::kv_incr(str_of(&body, "key"), delta)));
            }
            "poke" => {
                let conn = body.get("connection").and_then(Value::as_u64).unwrap_or(0);
                host::send(&instance(conn, str_of(&body, "id")), "poked", &json("true"));
                reply("poked-sent", Value::Null);
            }
            _ => {}
        }
    }

    fn disconnect(target: Instance, reason: DisconnectReason) {
        let reason = match reason {
            DisconnectReason::Client => "client",
            DisconnectReason::ConnectionClosed => "connection-closed",
            DisconnectReason::Replaced => "replaced",
            DisconnectReason::Server => "server",
            DisconnectReason::ConnectionLost => "connection-lost",
        };
        let data = j!({"connection": target.connection, "id": target.id, "reason": reason});
        host::broadcast("probe-log", "disconnected", &json(data.to_string()), None);
    }

    fn event(_room: String, _event: String, _data: Payload) {}

    fn frame(connection: u64, kind: String, body: String) {
        let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let data = j!({"connection": connection, "kind": kind, "body": body});
        host::broadcast("probe-log", "frame", &json(data.to_string()), None);
    }
}

export!(Probe);
