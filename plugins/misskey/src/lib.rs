//! Misskey's note channels as one plugin: `main`, `homeTimeline`,
//! `localTimeline`, `hybridTimeline`, `globalTimeline`, `userList`,
//! `hashtag`, `roleTimeline`, `antenna` and `channel`, with Misskey's
//! params, credential rules and filters.
//!
//! How it stays fast: every note from `notesStream` costs one call of this
//! plugin, whatever the number of subscribers. Instances join bucket rooms
//! named after their channel and params (`mk:gtl:u:r1f0`, ...); for each
//! note the plugin decides which buckets may get it and broadcasts it there
//! with conditions over the viewers' relations (`rel`, `mi`: user attribute
//! sets loaded from the Misskey API, see [`relations`]), which the host
//! evaluates natively per member. Where Misskey blanks parts of a note a
//! viewer may not see, each form of the note goes to the viewers it suits.
//!
//! Configuration (`[plugins.misskey]`): `backend`, the Misskey origin whose
//! API answers for users' relations, lists, antennas and roles (also listed
//! in `allow_http`). Without it, signed-in viewers have no relations (no
//! follows, mutes or blocks) and `userList`/`antenna` cannot be opened.
//! `relations_refresh_s` (default 120, 0 = off): how often each signed-in
//! user's relations are read again (see [`relations`]).

mod held;
mod note;
mod relations;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use chanhost_plugin::types::{
    Condition, ConnectRequest, DisconnectReason, HttpResponse, Instance, Manifest, Payload,
    Rejection,
};
use chanhost_plugin::{export, host, json, log_warn, Event, Guest};
use serde_json::{json, Value};

use misskey_api::{channel, Backend};
use note::{any_of, follows_key, key, none_of, str_of, sub, user_id, MUTED_INSTANCES, REL};

const NOTES: &str = "notesStream";
const INTERNAL: &str = "internal";

/// What an instance subscribed to, for clean-up when it ends.
#[derive(Clone)]
enum Sub {
    List(String),
    Tag(String),
    Main(String),
    Role(String),
    Antenna(String),
    Other,
}

#[derive(Default)]
struct State {
    backend: Option<Backend>,
    /// Open user lists and their members (kept in the key-value store too).
    lists: BTreeMap<String, Vec<String>>,
    /// Hashtag queries by their room key.
    tags: BTreeMap<String, Vec<Vec<String>>>,
    /// Roles with a timeline open, and whether they are explorable.
    roles: BTreeMap<String, bool>,
    /// Open instances: what they subscribed to and their user.
    subs: HashMap<(u64, String), (Sub, Option<String>)>,
    /// The default role policies (Misskey's `meta`), for viewers whose
    /// claims carry none.
    base_policies: Option<Value>,
    /// Rooms listened to beyond `notesStream` and `internal`.
    listens: BTreeSet<String>,
    /// Deferred connects waiting for an API answer, by fetch id.
    lookups: HashMap<u64, (ConnectRequest, &'static str)>,
    /// Requests nothing waits for (their endpoint, to log a failure).
    unawaited: HashMap<u64, String>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

fn with<R>(f: impl FnOnce(&mut State) -> R) -> R {
    STATE.with(|s| f(&mut s.borrow_mut()))
}

fn load<T: serde::de::DeserializeOwned + Default>(k: &str) -> T {
    host::kv_get(k)
        .and_then(|v| serde_json::from_str(&v).ok())
        .unwrap_or_default()
}

fn save<T: serde::Serialize>(k: &str, v: &T) {
    host::kv_set(k, &serde_json::to_string(v).unwrap_or_default());
}

/// Listens to a room for as long as something here needs it. Such listens
/// are kept in the store and renewed by `init`, so they survive a hot
/// reload and a rebuild (which keep only the listens made in `init`).
pub(crate) fn listen(room: &str) {
    with(|s| {
        if s.listens.insert(room.to_owned()) {
            host::listen(room);
            save("_listens", &s.listens);
        }
    })
}

/// Stops a listen made with [`listen`].
pub(crate) fn unlisten(room: &str) {
    with(|s| {
        if s.listens.remove(room) {
            save("_listens", &s.listens);
        }
    });
    host::unlisten(room);
}

fn reject(message: impl Into<String>) -> Rejection {
    Rejection {
        message: message.into(),
        data: None,
    }
}

/// JavaScript `!!(value ?? default)`.
fn flag(params: &Value, name: &str, default: bool) -> bool {
    match params.get(name) {
        None | Some(Value::Null) => default,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0 && !f.is_nan()),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

fn bit(b: bool) -> char {
    if b {
        '1'
    } else {
        '0'
    }
}

fn viewer(signed_in: bool) -> char {
    if signed_in {
        'u'
    } else {
        'a'
    }
}

/// A role policy of the viewer: from Misskey's `i` answer in the claims,
/// else the instance's default policies (Misskey's `meta`, read once and
/// kept current by `policiesUpdated`); allowed when neither is known.
fn policy(
    backend: Option<&Backend>,
    claims: &Value,
    name: &str,
    looked_up: Option<&LookedUp>,
) -> Result<bool, Refusal> {
    let own = claims.get("policies").and_then(|p| p.get(name));
    if let Some(v) = own.and_then(Value::as_bool) {
        return Ok(v);
    }
    let mut base = with(|s| s.base_policies.clone());
    if base.is_none() && backend.is_some() {
        match lookup(looked_up, "meta", None, json!({ "detail": true }))? {
            Ok(meta) => {
                base = meta.get("policies").cloned();
                with(|s| s.base_policies.clone_from(&base));
                if let Some(p) = &base {
                    save("_policies", p);
                }
            }
            Err(e) => log_warn(&format!("cannot read the default policies: {e}")),
        }
    }
    Ok(base
        .as_ref()
        .and_then(|p| p.get(name))
        .and_then(Value::as_bool)
        .unwrap_or(true))
}

/// Why an open did not complete now.
enum Refusal {
    /// Refused (Misskey: silently).
    Reject(Rejection),
    /// It needs an API answer first: asked without waiting, the connect
    /// deferred until the answer comes (see `Misskey::answer_connect`).
    Lookup {
        endpoint: &'static str,
        token: Option<String>,
        body: Value,
    },
}

impl From<Rejection> for Refusal {
    fn from(r: Rejection) -> Self {
        Refusal::Reject(r)
    }
}

/// An API answer an open asked for: the endpoint and what it said.
type LookedUp = (&'static str, Result<Value, String>);

/// The answer of `endpoint` if the open already has it, else the lookup
/// to make first.
fn lookup(
    looked_up: Option<&LookedUp>,
    endpoint: &'static str,
    token: Option<&str>,
    body: Value,
) -> Result<Result<Value, String>, Refusal> {
    match looked_up {
        Some((e, answer)) if *e == endpoint => Ok(answer.clone()),
        _ => Err(Refusal::Lookup {
            endpoint,
            token: token.map(str::to_owned),
            body,
        }),
    }
}

/// The forms of a note for one viewer kind: the text (None: as
/// published) and the conditions picking its viewers.
type Forms = Vec<(Option<String>, Vec<Condition>)>;

/// A note on its way to the timelines, with its forms per viewer kind
/// computed once.
struct Outgoing<'a> {
    note: &'a Value,
    raw: &'a str,
    forms: [Option<Forms>; 2],
}

impl<'a> Outgoing<'a> {
    fn new(note: &'a Value, raw: &'a str) -> Self {
        Self {
            note,
            raw,
            forms: [None, None],
        }
    }

    /// Sends the note to a bucket room if anyone is in it: each form with
    /// `conditions` plus the form's own.
    fn deliver(&mut self, room: &str, signed_in: bool, conditions: Vec<Condition>) {
        if host::room_size(room) == 0 {
            return;
        }
        let note = self.note;
        let forms = self.forms[usize::from(signed_in)].get_or_insert_with(|| {
            note::variants(note, signed_in)
                .into_iter()
                .map(|v| (v.note.map(|n| n.to_string()), v.conditions))
                .collect()
        });
        for (text, extra) in forms.iter() {
            let mut all = conditions.clone();
            all.extend(extra.iter().cloned());
            let payload = json(text.as_deref().unwrap_or(self.raw));
            host::broadcast_filtered(room, "note", &payload, None, &all);
        }
    }
}

/// Conditions for a signed-in viewer: the note is visible to them.
fn visible(n: &Value, conds: &mut Vec<Condition>) {
    if let Some(k) = note::visible_keys(n) {
        conds.push(any_of(k));
    }
}

/// Misskey's reply rule for viewers who do not want every reply: the reply
/// is to them, by them, or to the author themself — or they follow the
/// author with replies (home and hybrid timelines then also require a
/// followers-only replied-to note to be visible to them; the local timeline
/// does not).
fn relevant_reply(n: &Value, conds: &mut Vec<Condition>, check_followers: bool) {
    let Some(reply) = sub(n, "reply") else { return };
    let (a, r) = (user_id(n), user_id(reply));
    if r == a {
        return;
    }
    conds.push(any_of(vec![key("fr", a), key("me", r), key("me", a)]));
    if check_followers && note::visibility(reply) == "followers" {
        conds.push(any_of(vec![follows_key(r), key("me", r), key("me", a)]));
    }
}

/// A followers-only note replied to must be visible to the viewer.
fn followers_reply_visible(reply: &Value, conds: &mut Vec<Condition>) {
    if note::visibility(reply) == "followers" {
        let r = user_id(reply);
        conds.push(any_of(vec![follows_key(r), key("me", r)]));
    }
}

/// The (withRenotes, withFiles) buckets a note may go to: a pure renote
/// only where renotes are wanted, a note without files only where files
/// are not required.
fn buckets(pure: bool, files: bool) -> impl Iterator<Item = (bool, bool)> {
    [(false, false), (false, true), (true, false), (true, true)]
        .into_iter()
        .filter(move |&(r, f)| (r || !pure) && (!f || files))
}

fn signin_required(n: &Value) -> bool {
    note::requires_signin(n)
        || sub(n, "renote").is_some_and(note::requires_signin)
        || sub(n, "reply").is_some_and(note::requires_signin)
}

fn route_note(state: &mut State, n: &Value, raw: &str) {
    let mut out = Outgoing::new(n, raw);
    let a = user_id(n);
    let public = note::visibility(n) == "public";
    let in_channel = str_of(n, "channelId");
    let local = note::host(n).is_none();
    let pure = note::is_pure_renote(n);
    let files = note::has_files(n);
    let signin = signin_required(n);
    let muted = note::not_muted(n, None);
    let renote_reply = sub(n, "renote").and_then(|r| sub(r, "reply"));
    let viewers: &[bool] = if signin { &[true] } else { &[false, true] };

    // globalTimeline and localTimeline: public notes outside channels.
    if public && in_channel.is_none() {
        for &u in viewers {
            for (r, f) in buckets(pure, files) {
                let base = if u { muted.clone() } else { vec![] };
                out.deliver(
                    &format!("mk:gtl:{}:r{}f{}", viewer(u), bit(r), bit(f)),
                    u,
                    base.clone(),
                );
                if !local {
                    continue;
                }
                for p in [false, true] {
                    let mut c = base.clone();
                    if u && !p {
                        relevant_reply(n, &mut c, false);
                    }
                    out.deliver(
                        &format!("mk:ltl:{}:r{}p{}f{}", viewer(u), bit(r), bit(p), bit(f)),
                        u,
                        c,
                    );
                }
            }
        }
    }

    // homeTimeline and hybridTimeline (signed-in viewers).
    for (r, f) in buckets(pure, files) {
        let mut base = Vec::new();
        visible(n, &mut base);
        if pure && r {
            if let Some(rr) = renote_reply {
                followers_reply_visible(rr, &mut base);
            }
        }
        base.extend(muted.iter().cloned());
        let source = match in_channel {
            Some(c) => Some(vec![key("fc", c)]),
            None => Some(vec![key("me", a), follows_key(a)]),
        };
        let mut home = base.clone();
        home.extend(source.clone().map(any_of));
        relevant_reply(n, &mut home, true);
        out.deliver(&format!("mk:home:r{}f{}", bit(r), bit(f)), true, home);
        for p in [false, true] {
            let mut c = base.clone();
            let open_local = in_channel.is_none() && local && public;
            if !open_local {
                c.extend(source.clone().map(any_of));
            }
            match (p, sub(n, "reply")) {
                (true, Some(reply)) => followers_reply_visible(reply, &mut c),
                (false, Some(_)) => relevant_reply(n, &mut c, true),
                _ => {}
            }
            out.deliver(
                &format!("mk:htl:r{}p{}f{}", bit(r), bit(p), bit(f)),
                true,
                c,
            );
        }
    }

    // userList: notes of the list's members outside channels.
    if in_channel.is_none() {
        let mut gone = Vec::new();
        for (id, members) in &state.lists {
            if !members.iter().any(|m| m == a) {
                continue;
            }
            let rooms: Vec<String> = list_rooms(id);
            if rooms.iter().all(|r| host::room_size(r) == 0) {
                gone.push(id.clone());
                continue;
            }
            for (r, f) in buckets(pure, files) {
                let mut c = Vec::new();
                visible(n, &mut c);
                if let Some(reply) = sub(n, "reply") {
                    let ru = user_id(reply);
                    if ru != a {
                        c.push(any_of(vec![key("me", ru), key("me", a)]));
                    }
                }
                c.extend(muted.iter().cloned());
                out.deliver(&format!("mk:list:{id}:r{}f{}", bit(r), bit(f)), true, c);
            }
        }
        for id in gone {
            state.lists.remove(&id);
            save("_lists", &state.lists);
        }
    }

    // hashtag: an OR of AND groups over the note's tags.
    let tags = note::tags(n);
    if !tags.is_empty() {
        let mut gone = Vec::new();
        for (qkey, q) in &state.tags {
            if !q.iter().any(|g| g.iter().all(|t| tags.contains(t))) {
                continue;
            }
            if tag_rooms(qkey).iter().all(|r| host::room_size(r) == 0) {
                gone.push(qkey.clone());
                continue;
            }
            for &u in viewers {
                let mut c = Vec::new();
                if u {
                    visible(n, &mut c);
                    c.extend(muted.iter().cloned());
                } else if note::visible_keys(n).is_some() {
                    continue;
                }
                out.deliver(&format!("mk:tag:{}:{qkey}", viewer(u)), u, c);
            }
        }
        for q in gone {
            state.tags.remove(&q);
            save("_tags", &state.tags);
        }
    }

    // channel: the channel's notes.
    if let Some(cid) = in_channel {
        let muted_here = note::not_muted(n, Some(cid));
        for &u in viewers {
            let mut c = Vec::new();
            if u {
                visible(n, &mut c);
                c.extend(muted_here.iter().cloned());
            } else if note::visible_keys(n).is_some() {
                continue;
            }
            out.deliver(&format!("mk:channel:{cid}:{}", viewer(u)), u, c);
        }
    }
}

fn tag_rooms(qkey: &str) -> [String; 2] {
    [format!("mk:tag:a:{qkey}"), format!("mk:tag:u:{qkey}")]
}

fn list_rooms(id: &str) -> Vec<String> {
    ["r0f0", "r0f1", "r1f0", "r1f1"]
        .iter()
        .map(|b| format!("mk:list:{id}:{b}"))
        .collect()
}

/// Starts packing a note Misskey published hidden (`isHidden`) again for
/// the user through the API, as Misskey's main channel does.
fn pack_hidden(backend: Option<&Backend>, user: &str, note: &Value) -> Option<u64> {
    if note.get("isHidden").and_then(Value::as_bool) != Some(true) {
        return None;
    }
    let (b, token, id) = (
        backend?,
        host::kv_get(&token_key(user))?,
        str_of(note, "id")?,
    );
    Some(b.start("notes/show", Some(&token), json!({ "noteId": id })))
}

/// `mainStream:<user>`: notifications and mentions from muted users or
/// instances are dropped and hidden notes packed for the user (without
/// waiting: see [`held`]), as Misskey's main channel does.
fn route_main(backend: Option<&Backend>, user: &str, kind: &str, data: &Payload) {
    let room = format!("mk:main:{user}");
    if host::room_size(&room) == 0 {
        unlisten(&format!("mainStream:{user}"));
        return;
    }
    if kind == "meUpdated" {
        // The profile changed (muted instances, ...): read it again.
        relations::refresh(user);
    }
    let body: Value = serde_json::from_str(&data.json).unwrap_or(Value::Null);
    let (pack, at) = match kind {
        "notification" => (
            body.get("note").and_then(|n| pack_hidden(backend, user, n)),
            Some("note"),
        ),
        "mention" => (pack_hidden(backend, user, &body), None),
        _ => (None, None),
    };
    let event = held::Event::Main {
        user: user.to_owned(),
        kind: kind.to_owned(),
        body,
        at,
    };
    deliver_ready(held::push(&room, pack, event));
}

/// Delivers events whose notes are packed (or needed no packing), in order.
fn deliver_ready(ready: held::Ready) {
    for (event, packed) in ready {
        match event {
            held::Event::Main {
                user,
                kind,
                mut body,
                at,
            } => {
                match packed {
                    Some(Ok(n)) => match at {
                        Some(field) => body[field] = n,
                        None => body = n,
                    },
                    // Delivered as published, as before the repack.
                    Some(Err(e)) => log_warn(&format!("cannot repack a note for {user}: {e}")),
                    None => {}
                }
                deliver_main(&user, &kind, &body);
            }
            held::Event::Antenna { antenna, note } => match packed {
                Some(Err(e)) => log_warn(&format!("antenna {antenna}: cannot pack a note: {e}")),
                Some(Ok(n)) => deliver_antenna(&antenna, &n),
                None => deliver_antenna(&antenna, &note),
            },
        }
    }
}

/// A main-stream event to the user's `main` instances, filtered by their
/// mutes and muted instances.
fn deliver_main(user: &str, kind: &str, body: &Value) {
    let room = format!("mk:main:{user}");
    let mut conds = Vec::new();
    match kind {
        "notification" => {
            if let Some(h) = body.get("user").and_then(|u| str_of(u, "host")) {
                conds.push(none_of(MUTED_INSTANCES, vec![h.to_owned()]));
            }
            if let Some(u) = str_of(body, "userId") {
                conds.push(none_of(REL, vec![key("m", u)]));
            }
        }
        "mention" => {
            let hosts: Vec<String> = [Some(body), sub(body, "reply"), sub(body, "renote")]
                .into_iter()
                .flatten()
                .filter_map(note::host)
                .map(str::to_owned)
                .collect();
            if !hosts.is_empty() {
                conds.push(none_of(MUTED_INSTANCES, hosts));
            }
            conds.push(none_of(REL, vec![key("m", user_id(body))]));
        }
        _ => {}
    }
    host::broadcast_filtered(&room, kind, &json(body.to_string()), None, &conds);
}

fn role_rooms(id: &str) -> [String; 2] {
    [format!("mk:role:{id}:a"), format!("mk:role:{id}:u")]
}

/// `roleTimelineStream:<role>`: public notes of the role's members while
/// the role is explorable; other events pass unchanged.
fn route_role(explorable: bool, role: &str, kind: &str, data: &Payload) {
    let rooms = role_rooms(role);
    if rooms.iter().all(|r| host::room_size(r) == 0) {
        unlisten(&format!("roleTimelineStream:{role}"));
        return;
    }
    if kind != "note" {
        for r in &rooms {
            host::broadcast(r, kind, data, None);
        }
        return;
    }
    if !explorable {
        return;
    }
    let Ok(n) = serde_json::from_str::<Value>(&data.json) else {
        return;
    };
    if note::visibility(&n) != "public" {
        return;
    }
    let mut out = Outgoing::new(&n, &data.json);
    let signin = signin_required(&n);
    if !signin {
        out.deliver(&rooms[0], false, vec![]);
    }
    out.deliver(&rooms[1], true, note::not_muted(&n, None));
}

/// `antennaStream:<antenna>`: Misskey publishes the bare note record; it is
/// packed for the antenna's owner through the API (without waiting: see
/// [`held`]), then filtered.
fn route_antenna(backend: Option<&Backend>, antenna: &str, kind: &str, data: &Payload) {
    let room = format!("mk:antenna:{antenna}");
    let token_key = format!("_antenna:{antenna}");
    if host::room_size(&room) == 0 {
        unlisten(&format!("antennaStream:{antenna}"));
        host::kv_delete(&token_key);
        return;
    }
    if kind != "note" {
        host::broadcast(&room, kind, data, None);
        return;
    }
    let Ok(n) = serde_json::from_str::<Value>(&data.json) else {
        return;
    };
    let mut pack = None;
    if n.get("user").is_none() {
        let (Some(b), Some(token), Some(id)) =
            (backend, host::kv_get(&token_key), str_of(&n, "id"))
        else {
            return;
        };
        pack = Some(b.start("notes/show", Some(&token), json!({ "noteId": id })));
    }
    let event = held::Event::Antenna {
        antenna: antenna.to_owned(),
        note: n,
    };
    deliver_ready(held::push(&room, pack, event));
}

/// An antenna's packed note to its instances, with Misskey's filters.
fn deliver_antenna(antenna: &str, n: &Value) {
    let room = format!("mk:antenna:{antenna}");
    let raw = n.to_string();
    let mut c = Vec::new();
    visible(n, &mut c);
    c.extend(note::not_muted(n, None));
    Outgoing::new(n, &raw).deliver(&room, true, c);
}

/// Misskey's `normalizeForSearch`: NFKC, then lower case.
fn normalize_tag(tag: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    tag.nfkc().collect::<String>().to_lowercase()
}

/// Validates a hashtag query: a non-empty list of non-empty lists of strings.
fn hashtag_query(params: &Value) -> Option<Vec<Vec<String>>> {
    let groups = params.get("q")?.as_array()?;
    groups
        .iter()
        .map(|g| {
            let g = g.as_array().filter(|g| !g.is_empty())?;
            g.iter()
                .map(|t| t.as_str().map(normalize_tag))
                .collect::<Option<Vec<String>>>()
        })
        .collect()
}

struct Misskey;

impl Misskey {
    /// Opens an instance whose user's relations are in, with the API
    /// answer it asked for, if any.
    fn accept(req: &ConnectRequest, looked_up: Option<&LookedUp>) -> Result<(), Refusal> {
        let sub = Self::open(req, looked_up)?;
        let user = req.identity.as_ref().map(|i| i.user_id.clone());
        with(|s| {
            s.subs
                .insert((req.target.connection, req.target.id.clone()), (sub, user))
        });
        Ok(())
    }

    /// Answers a connect now (`Some`), or starts the API lookup it needs
    /// and answers it later (`None`: deferred, see `fetched`).
    fn answer_connect(
        req: ConnectRequest,
        looked_up: Option<LookedUp>,
        deferred: bool,
    ) -> Option<Result<(), Rejection>> {
        match Self::accept(&req, looked_up.as_ref()) {
            Ok(()) => Some(Ok(())),
            Err(Refusal::Reject(r)) => Some(Err(r)),
            Err(Refusal::Lookup {
                endpoint,
                token,
                body,
            }) => {
                let backend = with(|s| s.backend.clone())?;
                if !deferred {
                    host::defer_connect(&req.target);
                }
                let id = backend.start(endpoint, token.as_deref(), body);
                with(|s| s.lookups.insert(id, (req, endpoint)));
                None
            }
        }
    }

    fn open(req: &ConnectRequest, looked_up: Option<&LookedUp>) -> Result<Sub, Refusal> {
        let params: Value = serde_json::from_str(&req.params).unwrap_or(Value::Null);
        let params = if params.is_object() {
            params
        } else {
            json!({})
        };
        let me = req.identity.as_ref().map(|i| i.user_id.clone());
        let claims: Value = req
            .identity
            .as_ref()
            .and_then(|i| serde_json::from_str(&i.claims).ok())
            .unwrap_or(Value::Null);
        let backend = with(|s| s.backend.clone());
        let credential = req.credential.as_deref();
        if let Some(u) = &me {
            // Loaded already when there is a backend to ask (see `connect`).
            relations::ensure_base(u);
        }
        let signed_in = me.is_some();
        let v = viewer(signed_in);
        let renotes = bit(flag(&params, "withRenotes", true));
        let files = bit(flag(&params, "withFiles", false));
        let replies = bit(flag(&params, "withReplies", false));
        let user = || {
            me.clone()
                .ok_or_else(|| reject("this channel needs a signed-in user"))
        };
        let param = |name: &str| {
            params
                .get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| reject(format!("param `{name}` must be a string")))
        };
        let join = |room: String| host::join(&req.target, &room);
        match req.channel.as_str() {
            "main" => {
                let u = user()?;
                join(format!("mk:main:{u}"));
                listen(&format!("mainStream:{u}"));
                return Ok(Sub::Main(u));
            }
            "homeTimeline" => {
                user()?;
                join(format!("mk:home:r{renotes}f{files}"));
            }
            "localTimeline" | "hybridTimeline" => {
                if !policy(backend.as_ref(), &claims, "ltlAvailable", looked_up)? {
                    return Err(reject("the local timeline is disabled for this user").into());
                }
                if req.channel == "localTimeline" {
                    join(format!("mk:ltl:{v}:r{renotes}p{replies}f{files}"));
                } else {
                    user()?;
                    join(format!("mk:htl:r{renotes}p{replies}f{files}"));
                }
            }
            "globalTimeline" => {
                if !policy(backend.as_ref(), &claims, "gtlAvailable", looked_up)? {
                    return Err(reject("the global timeline is disabled for this user").into());
                }
                join(format!("mk:gtl:{v}:r{renotes}f{files}"));
            }
            "userList" => {
                user()?;
                let id = param("listId")?;
                let (Some(_), Some(token)) = (&backend, credential) else {
                    return Err(
                        reject("userList needs the Misskey backend and a Misskey token").into(),
                    );
                };
                let body = json!({ "listId": id });
                let list = lookup(looked_up, "users/lists/show", Some(token), body)?
                    .map_err(|e| reject(format!("no such list: {e}")))?;
                let members = misskey_api::strings(list.get("userIds"));
                with(|s| {
                    s.lists.insert(id.clone(), members);
                    save("_lists", &s.lists);
                });
                join(format!("mk:list:{id}:r{renotes}f{files}"));
                join(format!("userListStream:{id}"));
                return Ok(Sub::List(id));
            }
            "hashtag" => {
                let q = hashtag_query(&params)
                    .ok_or_else(|| reject("param `q` must be a list of lists of tags"))?;
                let qkey = serde_json::to_string(&q).unwrap_or_default();
                with(|s| {
                    if s.tags.insert(qkey.clone(), q).is_none() {
                        save("_tags", &s.tags);
                    }
                });
                join(format!("mk:tag:{v}:{qkey}"));
                return Ok(Sub::Tag(qkey));
            }
            "roleTimeline" => {
                let id = param("roleId")?;
                if backend.is_some() {
                    let role = lookup(looked_up, "roles/show", None, json!({ "roleId": id }))?
                        .map_err(|e| reject(format!("no such role: {e}")))?;
                    let explorable = role
                        .get("isExplorable")
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
                    with(|s| {
                        s.roles.insert(id.clone(), explorable);
                        save("_roles", &s.roles);
                    });
                    if !explorable {
                        return Err(reject("the role's timeline is not public").into());
                    }
                }
                join(format!("mk:role:{id}:{v}"));
                listen(&format!("roleTimelineStream:{id}"));
                return Ok(Sub::Role(id));
            }
            "antenna" => {
                user()?;
                let id = param("antennaId")?;
                let (Some(_), Some(token)) = (&backend, credential) else {
                    return Err(
                        reject("antenna needs the Misskey backend and a Misskey token").into(),
                    );
                };
                let body = json!({ "antennaId": id });
                lookup(looked_up, "antennas/show", Some(token), body)?
                    .map_err(|e| reject(format!("no such antenna: {e}")))?;
                host::kv_set(&format!("_antenna:{id}"), token);
                join(format!("mk:antenna:{id}"));
                listen(&format!("antennaStream:{id}"));
                return Ok(Sub::Antenna(id));
            }
            "channel" => {
                let id = param("channelId")?;
                join(format!("mk:channel:{id}:{v}"));
            }
            other => return Err(reject(format!("unknown channel {other}")).into()),
        }
        Ok(Sub::Other)
    }
}

impl Guest for Misskey {
    fn describe() -> Manifest {
        Manifest {
            version: env!("CARGO_PKG_VERSION").into(),
            channels: vec![
                channel("main", true, true),
                channel("homeTimeline", true, false),
                channel("localTimeline", false, false),
                channel("hybridTimeline", true, false),
                channel("globalTimeline", false, false),
                channel("userList", true, false),
                channel("hashtag", false, false),
                channel("roleTimeline", false, false),
                channel("antenna", true, false),
                channel("channel", false, false),
            ],
            namespaces: vec![],
            frames: vec!["readNotification".into()],
        }
    }

    fn init(config: String) -> Result<(), String> {
        let config: Value = serde_json::from_str(&config).map_err(|e| e.to_string())?;
        let backend = misskey_api::backend_from_config(&config)?;
        let refresh = match config.get("relations_refresh_s") {
            None => relations::DEFAULT_REFRESH_S,
            Some(v) => v
                .as_u64()
                .ok_or("`relations_refresh_s` must be a whole number of seconds")?,
        };
        relations::configure(backend.clone(), refresh);
        with(|s| {
            s.backend = backend;
            s.lists = load("_lists");
            s.tags = load("_tags");
            s.roles = load("_roles");
            s.listens = load("_listens");
            s.base_policies = host::kv_get("_policies").and_then(|p| serde_json::from_str(&p).ok());
            for room in &s.listens {
                host::listen(room);
            }
        });
        host::listen(NOTES);
        host::listen(INTERNAL);
        Ok(())
    }

    /// A signed-in user whose relations are not here yet: the connect
    /// waits for them (deferred), while the plugin's other calls go on.
    fn connect(req: ConnectRequest) -> Result<(), Rejection> {
        let user = req.identity.as_ref().map(|i| i.user_id.clone());
        if let (Some(u), Some(t)) = (&user, &req.credential) {
            // For calls made later on the user's behalf.
            host::kv_set(&token_key(u), t);
            if relations::must_load(u, Some(t)) {
                let claims: Value = req
                    .identity
                    .as_ref()
                    .and_then(|i| serde_json::from_str(&i.claims).ok())
                    .unwrap_or(Value::Null);
                host::defer_connect(&req.target);
                let (u, t) = (u.clone(), t.to_string());
                relations::load(&u, &t, &claims, Some(req));
                return Ok(());
            }
        }
        Self::answer_connect(req, None, false).unwrap_or(Ok(()))
    }

    fn fetched(id: u64, response: Result<HttpResponse, String>) {
        if let Some((req, endpoint)) = with(|s| s.lookups.remove(&id)) {
            let answer = Backend::answer(endpoint, &response).map_err(|e| e.to_string());
            let target = req.target.clone();
            if let Some(r) = Self::answer_connect(req, Some((endpoint, answer)), true) {
                host::settle_connect(&target, r.as_ref().map(|_| ()));
            }
            return;
        }
        if let Some(what) = with(|s| s.unawaited.remove(&id)) {
            if let Err(e) = Backend::answer(&what, &response) {
                log_warn(&e.to_string());
            }
            return;
        }
        if let Some(ready) = held::answered(id, &response) {
            deliver_ready(ready);
            return;
        }
        let Some(done) = relations::on_fetched(id, &response) else {
            return;
        };
        for req in done.waiting {
            let target = req.target.clone();
            let answer = match &done.error {
                Some(e) => {
                    log_warn(&format!(
                        "cannot load the relations of user {}: {e}",
                        done.user
                    ));
                    Some(Err(reject(format!(
                        "the relations of user {} are unavailable",
                        done.user
                    ))))
                }
                None => Self::answer_connect(req, None, true),
            };
            if let Some(r) = answer {
                host::settle_connect(&target, r.as_ref().map(|_| ()));
            }
        }
    }

    fn timer(key: String) {
        relations::on_timer(&key);
    }

    /// Misskey channels are not Socket.IO sockets: never recovered.
    fn recover(
        _req: chanhost_plugin::types::RecoverRequest,
    ) -> Result<(), chanhost_plugin::types::Rejection> {
        Ok(())
    }

    fn message(_target: Instance, _event: String, _data: Payload, _ack: Option<u64>) {}

    /// Lets go of what nobody here needs any more: list and hashtag queries,
    /// listens, kept tokens.
    fn disconnect(target: Instance, _reason: DisconnectReason) {
        let Some((sub, user)) = with(|s| s.subs.remove(&(target.connection, target.id.clone())))
        else {
            // A connect still waiting for relations or a lookup: it waits
            // no more.
            relations::drop_waiting(&target);
            with(|s| {
                s.lookups.retain(|_, (r, _)| {
                    (r.target.connection, &r.target.id) != (target.connection, &target.id)
                })
            });
            return;
        };
        let empty = |rooms: &[String]| rooms.iter().all(|r| host::room_size(r) == 0);
        match sub {
            Sub::List(id) if empty(&list_rooms(&id)) => with(|s| {
                s.lists.remove(&id);
                save("_lists", &s.lists);
            }),
            Sub::Tag(q) if empty(&tag_rooms(&q)) => with(|s| {
                s.tags.remove(&q);
                save("_tags", &s.tags);
            }),
            Sub::Main(u) if empty(&[format!("mk:main:{u}")]) => {
                unlisten(&format!("mainStream:{u}"))
            }
            Sub::Role(id) if empty(&role_rooms(&id)) => {
                unlisten(&format!("roleTimelineStream:{id}"))
            }
            Sub::Antenna(id) if empty(&[format!("mk:antenna:{id}")]) => {
                unlisten(&format!("antennaStream:{id}"));
                host::kv_delete(&format!("_antenna:{id}"));
            }
            _ => {}
        }
        if let Some(u) = user {
            if !host::has_user_attribute(&u, REL) {
                unlisten(&format!("user:{u}"));
                host::kv_delete(&token_key(&u));
                relations::forget(&u);
            }
        }
    }

    /// Notes, the stream every timeline hangs on, are read in place from
    /// the batch the host gives; the other rooms' events go to `event`.
    fn on_event(e: Event<'_>) {
        if e.room == NOTES {
            if let Ok(n) = serde_json::from_str::<Value>(e.data) {
                with(|s| route_note(s, &n, e.data));
            }
        } else {
            Self::event(e.room.to_owned(), e.event.to_owned(), json(e.data));
        }
    }

    fn event(room: String, event: String, data: Payload) {
        if room == INTERNAL {
            let body: Value = serde_json::from_str(&data.json).unwrap_or(Value::Null);
            relations::on_internal(&event, &body);
            with(|s| on_internal(s, &event, &body));
        } else if let Some(user) = room.strip_prefix("user:") {
            let body: Value = serde_json::from_str(&data.json).unwrap_or(Value::Null);
            relations::on_user_event(user, &event, &body);
        } else if let Some(user) = room.strip_prefix("mainStream:") {
            let backend = with(|s| s.backend.clone());
            route_main(backend.as_ref(), user, &event, &data);
        } else if let Some(role) = room.strip_prefix("roleTimelineStream:") {
            let explorable = with(|s| s.roles.get(role).copied().unwrap_or(true));
            route_role(explorable, role, &event, &data);
        } else if let Some(antenna) = room.strip_prefix("antennaStream:") {
            let backend = with(|s| s.backend.clone());
            route_antenna(backend.as_ref(), antenna, &event, &data);
        }
    }

    /// `readNotification`: Misskey marks all the user's notifications read.
    fn frame(connection: u64, kind: String, _body: String) {
        if kind != "readNotification" {
            return;
        }
        let Some(user) = host::connection_identity(connection) else {
            return;
        };
        let (Some(b), Some(token)) = (
            with(|s| s.backend.clone()),
            host::kv_get(&token_key(&user.user_id)),
        ) else {
            return;
        };
        // Not waited for; a failure is logged when the answer comes.
        let id = b.start("notifications/mark-all-as-read", Some(&token), json!({}));
        with(|s| {
            s.unawaited
                .insert(id, "notifications/mark-all-as-read".into());
        });
    }
}

/// Where a user's Misskey token is kept for calls made later on their
/// behalf (a private key of the plugin's store).
pub(crate) fn token_key(user: &str) -> String {
    format!("_token:{user}")
}

/// `internal` events about lists and roles.
fn on_internal(state: &mut State, kind: &str, body: &Value) {
    match kind {
        "userListMemberAdded" | "userListMemberRemoved" => {
            let (Some(list), Some(member)) = (str_of(body, "userListId"), str_of(body, "memberId"))
            else {
                return;
            };
            if let Some(m) = state.lists.get_mut(list) {
                m.retain(|x| x != member);
                if kind == "userListMemberAdded" {
                    m.push(member.to_owned());
                }
                save("_lists", &state.lists);
            }
        }
        "policiesUpdated" if body.is_object() => {
            state.base_policies = Some(body.clone());
            save("_policies", body);
        }
        "roleUpdated" | "roleDeleted" => {
            let Some(id) = str_of(body, "id") else { return };
            if let Some(e) = state.roles.get_mut(id) {
                *e = kind == "roleUpdated"
                    && body
                        .get("isExplorable")
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
                save("_roles", &state.roles);
            }
        }
        _ => {}
    }
}

export!(Misskey);

#[cfg(test)]
mod tests {
    use super::buckets;

    #[test]
    fn buckets_follow_renotes_and_files() {
        let all: Vec<_> = buckets(false, true).collect();
        assert_eq!(all.len(), 4);
        assert_eq!(
            buckets(true, false).collect::<Vec<_>>(),
            vec![(true, false)],
            "a pure renote without files: only withRenotes, not withFiles"
        );
        assert_eq!(
            buckets(false, false).collect::<Vec<_>>(),
            vec![(false, false), (true, false)]
        );
    }
}
