//! A signed-in user's relations, read from the Misskey API once per user
//! on this node and kept in the host as the user attribute sets `rel` and
//! `mi` (see [`crate::note`] for the keys), shared by all the user's
//! connections. Misskey's own events keep them current: the `internal`
//! stream of current Misskey (`follow`, `mute`, `blockingCreated`,
//! `followChannel`, `updateUserProfile`, ...), and the per-user
//! `user:<id>` stream of older versions (`follow`, `unfollow`, `mute`,
//! `unmute`, `followChannel`, `unfollowChannel`, `updateUserProfile`).
//!
//! Misskey publishes nothing for some changes (a mute, a renote mute, in
//! 2025.x), so each user's relations are also read again periodically
//! (`relations_refresh_s`, per user, spread over time), and at once when
//! Misskey says the user changed (`internal localUserUpdated`,
//! `mainStream meUpdated`). A load reads `i` (unless the connection's
//! claims are its answer), `users/following`, `mute/list`,
//! `renote-mute/list` and `channels/followed`, 100 items a page, all at
//! once and without holding up the plugin's other calls (`fetch`): a
//! connect that needs them is deferred until they are in. A refresh
//! applies the difference to what the previous load read, so keys that
//! only events bring stay.
//!
//! What the API cannot tell — who blocks the user, which channels they
//! mute — starts empty and is filled by those events alone.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};

use chanhost_plugin::types::{ConnectRequest, HttpResponse};
use chanhost_plugin::{host, log_info, log_warn};
use serde_json::{json, Value};

use crate::note::{follows_key, key, str_of, MUTED_INSTANCES, REL};
use misskey_api::{ApiError, Backend};

/// Default period of the per-user refresh, in seconds.
pub const DEFAULT_REFRESH_S: u64 = 120;
/// Most pages read from one list endpoint (100 items each).
const MAX_PAGES: usize = 100;

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

/// One piece of a user's relations, read from one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Me,
    Following,
    Mutes,
    RenoteMutes,
    Channels,
}

impl Part {
    const LISTS: [Part; 4] = [
        Part::Following,
        Part::Mutes,
        Part::RenoteMutes,
        Part::Channels,
    ];

    fn endpoint(self) -> &'static str {
        match self {
            Part::Me => "i",
            Part::Following => "users/following",
            Part::Mutes => "mute/list",
            Part::RenoteMutes => "renote-mute/list",
            Part::Channels => "channels/followed",
        }
    }

    fn params(self, user: &str, until: Option<&str>) -> Value {
        let mut p = match self {
            Part::Me => return json!({}),
            Part::Following => json!({ "userId": user }),
            _ => json!({}),
        };
        p["limit"] = json!(100);
        if let Some(u) = until {
            p["untilId"] = json!(u);
        }
        p
    }
}

/// A load of one user's relations in progress.
struct Load {
    token: String,
    /// `i`'s answer (or the claims that are it).
    me: Option<Value>,
    /// Items read so far, by list.
    items: Vec<(Part, Vec<Value>)>,
    /// Requests not answered yet.
    outstanding: usize,
    error: Option<String>,
    /// Deferred connects waiting for it (none for a refresh).
    waiting: Vec<ConnectRequest>,
}

/// What a fetch was for.
enum Pending {
    /// A page of a load: user, list, page.
    Load(String, Part, usize),
    /// Whether a new follow includes replies (`users/show` with the
    /// follower's token): follower, followee.
    Replies(String, String),
}

/// A finished load: the connects that waited for it, and why it failed.
pub struct Finished {
    pub user: String,
    pub waiting: Vec<ConnectRequest>,
    pub error: Option<String>,
}

struct Relations {
    backend: Option<Backend>,
    refresh_ms: u64,
    loads: HashMap<String, Load>,
    /// The request behind each fetch id.
    fetches: HashMap<u64, Pending>,
    /// What each user's last load read (a refresh applies the difference).
    loaded: HashMap<String, BTreeSet<String>>,
}

thread_local! {
    static RELATIONS: RefCell<Relations> = RefCell::new(Relations {
        backend: None,
        refresh_ms: DEFAULT_REFRESH_S * 1000,
        loads: HashMap::new(),
        fetches: HashMap::new(),
        loaded: HashMap::new(),
    });
}

fn with<R>(f: impl FnOnce(&mut Relations) -> R) -> R {
    RELATIONS.with(|r| f(&mut r.borrow_mut()))
}

/// From `init`: the backend and the refresh period (`relations_refresh_s`;
/// 0 turns the periodic refresh off).
pub fn configure(backend: Option<Backend>, refresh_s: u64) {
    with(|r| {
        r.backend = backend;
        r.refresh_ms = refresh_s.saturating_mul(1000);
    });
}

/// Whether `connect` must wait for a load of this user's relations.
pub fn must_load(user: &str, credential: Option<&str>) -> bool {
    credential.is_some() && with(|r| r.backend.is_some()) && !host::has_user_attribute(user, REL)
}

/// A user without a backend to ask (or without a token): the base keys.
pub fn ensure_base(user: &str) {
    if host::has_user_attribute(user, REL) {
        return;
    }
    host::set_user_attribute(user, REL, &base(user));
    crate::listen(&format!("user:{user}"));
}

/// Starts loading a user's relations (or joins the load in progress);
/// `waiting` is answered when it is done. `me` is the user as Misskey's
/// `i` answers it, when the connection's claims are that answer.
pub fn load(user: &str, token: &str, me: &Value, waiting: Option<ConnectRequest>) {
    let started = with(|r| {
        if let Some(l) = r.loads.get_mut(user) {
            l.waiting.extend(waiting);
            return false;
        }
        let me = me.get("mutedInstances").is_some().then(|| me.clone());
        r.loads.insert(
            user.to_owned(),
            Load {
                token: token.to_owned(),
                me,
                items: Vec::new(),
                outstanding: 0,
                error: None,
                waiting: waiting.into_iter().collect(),
            },
        );
        true
    });
    if !started {
        return;
    }
    let need_me = with(|r| r.loads.get(user).is_some_and(|l| l.me.is_none()));
    if need_me {
        request(user, Part::Me, 0, None);
    }
    for part in Part::LISTS {
        request(user, part, 0, None);
    }
}

/// Sends one request of a load.
fn request(user: &str, part: Part, page: usize, until: Option<&str>) {
    with(|r| {
        let (Some(b), Some(l)) = (r.backend.clone(), r.loads.get_mut(user)) else {
            return;
        };
        l.outstanding += 1;
        let id = b.start(part.endpoint(), Some(&l.token), part.params(user, until));
        r.fetches
            .insert(id, Pending::Load(user.to_owned(), part, page));
    })
}

/// Reads a load again for a user with connections here, unless one runs.
pub fn refresh(user: &str) {
    if !host::has_user_attribute(user, REL) || with(|r| r.loads.contains_key(user)) {
        return;
    }
    if let Some(token) = host::kv_get(&crate::token_key(user)) {
        load(user, &token, &Value::Null, None);
    }
}

/// The timer of a user's periodic refresh.
fn timer_key(user: &str) -> String {
    format!("refresh:{user}")
}

/// A timer is due: true if it was a refresh's.
pub fn on_timer(key: &str) -> bool {
    let Some(user) = key.strip_prefix("refresh:") else {
        return false;
    };
    if host::has_user_attribute(user, REL) {
        refresh(user);
    } else {
        forget(user);
    }
    true
}

/// A deferred connect's client left (or its time ran out): the load goes
/// on for the user's other connects, without it.
pub fn drop_waiting(target: &chanhost_plugin::types::Instance) {
    with(|r| {
        for l in r.loads.values_mut() {
            l.waiting
                .retain(|w| (w.target.connection, &w.target.id) != (target.connection, &target.id));
        }
    });
}

/// The user has no connection here any more.
pub fn forget(user: &str) {
    with(|r| r.loaded.remove(user));
    host::cancel_timer(&timer_key(user));
}

/// The next refresh: one period after this one, the first spread over
/// the second half of a period by the user id, so users who connected
/// together (a restart) are not refreshed together.
fn schedule(user: &str, first: bool) {
    let period = with(|r| r.refresh_ms);
    if period == 0 {
        return;
    }
    let delay = if first {
        let h = user.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        period / 2 + (h % (period / 2).max(1))
    } else {
        period
    };
    host::set_timer(&timer_key(user), delay.min(u64::from(u32::MAX)) as u32);
}

/// An answer to one of the loads' requests: `Some` when it finished a load.
pub fn on_fetched(id: u64, response: &Result<HttpResponse, String>) -> Option<Finished> {
    let (user, part, page) = match with(|r| r.fetches.remove(&id))? {
        Pending::Load(user, part, page) => (user, part, page),
        Pending::Replies(follower, followee) => {
            match Backend::answer("users/show", response) {
                Ok(u) if u.get("withReplies").and_then(Value::as_bool) == Some(true) => {
                    update(Some(&follower), &[key("fr", &followee)], &[]);
                }
                Ok(_) => {}
                Err(e) => log_info(&format!("follow of {followee} by {follower}: {e}")),
            }
            return None;
        }
    };
    let answer = Backend::answer(part.endpoint(), response);
    let mut next_until = None;
    with(|r| {
        let l = r.loads.get_mut(&user)?;
        l.outstanding -= 1;
        match (part, answer) {
            (Part::Me, Ok(me)) => l.me = Some(me),
            (_, Ok(Value::Array(items))) => {
                let full = items.len() >= 100 && page + 1 < MAX_PAGES;
                next_until = items
                    .last()
                    .and_then(|v| v.get("id"))
                    .and_then(Value::as_str)
                    .filter(|_| full)
                    .map(str::to_owned);
                match l.items.iter_mut().find(|(p, _)| *p == part) {
                    Some((_, v)) => v.extend(items),
                    None => l.items.push((part, items)),
                }
            }
            (_, Ok(other)) => {
                l.error = Some(format!(
                    "{}: expected an array, got {other}",
                    part.endpoint()
                ))
            }
            // An app token without the permission to read a list does
            // without it (Misskey itself reads them from its database).
            (p, Err(e)) if p != Part::Me && p != Part::Following && e.is_permission_denied() => {
                log_info(&format!("user {user}: {e}; going on without it"));
            }
            (_, Err(e)) => l.error = Some(describe(&e)),
        }
        Some(())
    })?;
    if let Some(until) = next_until {
        request(&user, part, page + 1, Some(&until));
        return None;
    }
    if with(|r| r.loads.get(&user).is_some_and(|l| l.outstanding > 0)) {
        return None;
    }
    let load = with(|r| r.loads.remove(&user))?;
    let first = !load.waiting.is_empty() || !with(|r| r.loaded.contains_key(&user));
    match &load.error {
        Some(e) if load.waiting.is_empty() => {
            log_warn(&format!("cannot refresh the relations of user {user}: {e}"));
            schedule(&user, false);
        }
        Some(_) => {}
        None => {
            apply(&user, &load);
            schedule(&user, first);
        }
    }
    Some(Finished {
        user,
        waiting: load.waiting,
        error: load.error,
    })
}

fn describe(e: &ApiError) -> String {
    e.to_string()
}

/// Writes what a load read into the host's sets.
fn apply(user: &str, load: &Load) {
    let list = |part: Part| -> &[Value] {
        load.items
            .iter()
            .find(|(p, _)| *p == part)
            .map_or(&[], |(_, v)| v.as_slice())
    };
    let mut keys = base(user);
    for f in list(Part::Following) {
        let Some(id) = str_of(f, "followeeId") else {
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
    keys.extend(ids_of(list(Part::Mutes), "muteeId").map(|u| key("m", &u)));
    keys.extend(ids_of(list(Part::RenoteMutes), "muteeId").map(|u| key("rm", &u)));
    keys.extend(ids_of(list(Part::Channels), "id").map(|c| key("fc", &c)));
    let new: BTreeSet<String> = keys.into_iter().collect();
    let muted_instances =
        misskey_api::strings(load.me.as_ref().and_then(|m| m.get("mutedInstances")));
    let old = with(|r| r.loaded.insert(user.to_owned(), new.clone()));
    if !host::has_user_attribute(user, REL) {
        host::set_user_attribute(user, REL, &new.iter().cloned().collect::<Vec<_>>());
    } else {
        // Only what this load changed: keys events brought stay.
        let old = old.unwrap_or_default();
        let add: Vec<String> = new.difference(&old).cloned().collect();
        let remove: Vec<String> = old.difference(&new).cloned().collect();
        if !add.is_empty() || !remove.is_empty() {
            host::update_user_attribute(user, REL, &add, &remove);
        }
    }
    host::set_user_attribute(user, MUTED_INSTANCES, &muted_instances);
    crate::listen(&format!("user:{user}"));
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
    on_internal(kind, &internal);
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
/// (`users/show`, whose `withReplies` is the follower's setting), without
/// waiting. `localUserUpdated` reads the user's relations again.
pub fn on_internal(kind: &str, body: &Value) {
    let s = |k: &str| str_of(body, k);
    match kind {
        "follow" => {
            let (Some(follower), Some(f)) = (s("followerId"), s("followeeId")) else {
                return;
            };
            if !host::has_user_attribute(follower, REL) {
                return;
            }
            update(Some(follower), &[follows_key(f)], &[]);
            let token = host::kv_get(&crate::token_key(follower));
            with(|r| {
                if let (Some(b), Some(t)) = (r.backend.clone(), token) {
                    let id = b.start("users/show", Some(&t), json!({ "userId": f }));
                    r.fetches
                        .insert(id, Pending::Replies(follower.to_owned(), f.to_owned()));
                }
            });
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
        "localUserUpdated" => {
            if let Some(u) = s("id") {
                refresh(u);
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
