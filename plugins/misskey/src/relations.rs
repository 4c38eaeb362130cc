//! A signed-in user's relations, read from the Misskey API once per user
//! on this node and kept in the host as the user attribute sets `rel` and
//! `mi` (see [`crate::note`] for the keys), shared by all the user's
//! connections. Misskey's own events keep them current: the `internal`
//! stream of current Misskey (`follow`, `mute`, `blockingCreated`,
//! `followChannel`, `updateUserProfile`, ...), and the per-user
//! `user:<id>` stream of older versions (`follow`, `unfollow`, `mute`,
//! `unmute`, `followChannel`, `unfollowChannel`, `updateUserProfile`).
//!
//! What the API cannot tell — who blocks the user, which channels they
//! mute — starts empty and is filled by those events alone.

use chanhost_plugin::{host, log_info};
use serde_json::{json, Value};

use crate::note::{follows_key, key, str_of, MUTED_INSTANCES, REL};
use misskey_api::Backend;

/// The keys every signed-in viewer carries.
fn base(user: &str) -> Vec<String> {
    vec![key("me", user), "@user".into()]
}

fn ids_of<'a>(items: &'a [Value], field: &'a str) -> impl Iterator<Item = String> + 'a {
    let field = field.to_owned();
    items
        .iter()
        .filter_map(move |v| str_of(v, &field).map(str::to_owned))
}

/// Loads the user's relations unless the host already holds them.
/// `me` is the user as Misskey's `i` answers it, when the connection's
/// claims are that answer.
pub fn ensure(
    backend: Option<&Backend>,
    user: &str,
    credential: Option<&str>,
    me: &Value,
) -> Result<(), String> {
    if host::has_user_attribute(user, REL) {
        return Ok(());
    }
    let mut keys = base(user);
    let mut muted_instances = Vec::new();
    if let (Some(b), Some(token)) = (backend, credential) {
        let fetched;
        let me = if me.get("mutedInstances").is_some() {
            me
        } else {
            fetched = b.call("i", Some(token), json!({}))?;
            &fetched
        };
        muted_instances = misskey_api::strings(me.get("mutedInstances"));
        let following = b
            .all("users/following", token, json!({ "userId": user }))
            .map_err(|e| e.to_string())?;
        for f in following {
            let Some(id) = str_of(&f, "followeeId") else {
                continue;
            };
            let with_replies = f
                .get("withReplies")
                .or_else(|| f.get("followee").and_then(|u| u.get("withReplies")))
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if with_replies {
                keys.push(key("fr", id));
            }
            keys.push(follows_key(id));
        }
        // An app token without the permission to read a list does without
        // it (Misskey itself reads them from its database).
        let list = |endpoint: &str| match b.all(endpoint, token, json!({})) {
            Ok(v) => Ok(v),
            Err(e) if e.is_permission_denied() => {
                log_info(&format!("user {user}: {e}; going on without it"));
                Ok(Vec::new())
            }
            Err(e) => Err(e.to_string()),
        };
        keys.extend(ids_of(&list("mute/list")?, "muteeId").map(|u| key("m", &u)));
        keys.extend(ids_of(&list("renote-mute/list")?, "muteeId").map(|u| key("rm", &u)));
        keys.extend(ids_of(&list("channels/followed")?, "id").map(|c| key("fc", &c)));
    }
    host::set_user_attribute(user, REL, &keys);
    host::set_user_attribute(user, MUTED_INSTANCES, &muted_instances);
    crate::listen(&format!("user:{user}"));
    Ok(())
}

/// An event of the `user:<id>` stream (Misskey before the `internal`
/// stream): the body is the packed user, channel or profile concerned.
pub fn on_user_event(user: &str, kind: &str, body: &Value) {
    if !host::has_user_attribute(user, REL) {
        // No connection of this user here any more.
        crate::unlisten(&format!("user:{user}"));
        return;
    }
    let id = str_of(body, "id");
    let internal = match (kind, id) {
        ("follow" | "unfollow", Some(id)) => json!({ "followerId": user, "followeeId": id }),
        ("mute" | "unmute", Some(id)) => json!({ "muterId": user, "muteeId": id }),
        ("followChannel" | "unfollowChannel", Some(id)) => {
            json!({ "userId": user, "channelId": id })
        }
        ("updateUserProfile", _) => {
            json!({ "userId": user, "mutedInstances": body.get("mutedInstances").cloned().unwrap_or(Value::Null) })
        }
        _ => return,
    };
    on_internal(None, kind, &internal);
}

fn update(user: Option<&str>, add: &[String], remove: &[String]) {
    if let Some(u) = user {
        host::update_user_attribute(u, REL, add, remove);
    }
}

/// Applies one of Misskey's `internal` events to the users it concerns
/// (users without a connection here are skipped by the host).
///
/// A follow does not say whether it includes replies; for a follower with a
/// connection here, the followee is looked up with the follower's token
/// (`users/show`, whose `withReplies` is the follower's setting).
pub fn on_internal(backend: Option<&Backend>, kind: &str, body: &Value) {
    let s = |k: &str| str_of(body, k);
    match kind {
        "follow" => {
            let (Some(follower), Some(f)) = (s("followerId"), s("followeeId")) else {
                return;
            };
            if !host::has_user_attribute(follower, REL) {
                return;
            }
            let mut add = vec![follows_key(f)];
            let token = host::kv_get(&crate::token_key(follower));
            if let (Some(b), Some(t)) = (backend, token) {
                match b.call("users/show", Some(&t), json!({ "userId": f })) {
                    Ok(u) if u.get("withReplies").and_then(Value::as_bool) == Some(true) => {
                        add.push(key("fr", f));
                    }
                    Ok(_) => {}
                    Err(e) => log_info(&format!("follow of {f} by {follower}: {e}")),
                }
            }
            update(Some(follower), &add, &[]);
        }
        "unfollow" => {
            if let Some(f) = s("followeeId") {
                update(s("followerId"), &[], &[follows_key(f), key("fr", f)]);
            }
        }
        "mute" | "unmute" => {
            if let Some(m) = s("muteeId") {
                let k = [key("m", m)];
                let (add, remove): (&[String], &[String]) =
                    if kind == "mute" { (&k, &[]) } else { (&[], &k) };
                update(s("muterId"), add, remove);
            }
        }
        "blockingCreated" | "blockingDeleted" => {
            if let Some(b) = s("blockerId") {
                let k = [key("b", b)];
                let (add, remove): (&[String], &[String]) = if kind == "blockingCreated" {
                    (&k, &[])
                } else {
                    (&[], &k)
                };
                update(s("blockeeId"), add, remove);
            }
        }
        "followChannel" | "unfollowChannel" | "muteChannel" | "unmuteChannel" => {
            if let Some(c) = s("channelId") {
                let prefix = if kind.ends_with("followChannel") {
                    "fc"
                } else {
                    "mc"
                };
                let k = [key(prefix, c)];
                let adding = !kind.starts_with("un");
                let (add, remove): (&[String], &[String]) =
                    if adding { (&k, &[]) } else { (&[], &k) };
                update(s("userId"), add, remove);
            }
        }
        "updateUserProfile" => {
            if let (Some(u), Some(list)) = (
                s("userId"),
                body.get("mutedInstances").and_then(Value::as_array),
            ) {
                if host::has_user_attribute(u, REL) {
                    let hosts: Vec<String> = list
                        .iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect();
                    host::set_user_attribute(u, MUTED_INSTANCES, &hosts);
                }
            }
        }
        _ => {}
    }
}
