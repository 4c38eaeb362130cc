//! A packed Misskey note as the timelines see it, and the per-viewer rules
//! turned into conditions the host evaluates natively for each member.
//!
//! Viewers' relations live in the user attribute set `rel` (see
//! [`crate::relations`]; the set's name and the `f:` key come from the
//! SDK's `conventions`, which the host reads too): `me:<id>`,
//! `f:<followee>`, `fr:<followee with replies>`, `m:<muted>`, `rm:<renote-muted>`, `b:<blocker of me>`,
//! `fc:<followed channel>`, `mc:<muted channel>`; and `mi`, the muted
//! instance hosts. A rule like "the viewer is the author or follows them"
//! becomes one condition: `rel` contains any of `me:<a>`, `f:<a>`.

pub use chanhost_plugin::conventions::{follows_key, RELATIONS_SET as REL};
use chanhost_plugin::types::Condition;
use serde_json::Value;

pub const MUTED_INSTANCES: &str = "mi";

/// `rel` contains at least one of `keys`.
pub fn any_of(keys: Vec<String>) -> Condition {
    Condition {
        attribute: REL.into(),
        keys,
        exclude: false,
    }
}

/// `attribute` contains none of `keys`.
pub fn none_of(attribute: &str, keys: Vec<String>) -> Condition {
    Condition {
        attribute: attribute.into(),
        keys,
        exclude: true,
    }
}

pub fn key(prefix: &str, id: &str) -> String {
    format!("{prefix}:{id}")
}

fn present(v: &Value, k: &str) -> bool {
    v.get(k).is_some_and(|x| !x.is_null())
}

pub fn str_of<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

/// A non-null embedded note (`reply`, `renote`).
pub fn sub<'a>(n: &'a Value, k: &str) -> Option<&'a Value> {
    n.get(k).filter(|v| v.is_object())
}

pub fn user_id(n: &Value) -> &str {
    str_of(n, "userId")
        .or_else(|| n.get("user").and_then(|u| str_of(u, "id")))
        .unwrap_or("")
}

/// The author's host; None for a local user.
pub fn host(n: &Value) -> Option<&str> {
    n.get("user").and_then(|u| str_of(u, "host"))
}

pub fn visibility(n: &Value) -> &str {
    str_of(n, "visibility").unwrap_or("public")
}

pub fn requires_signin(n: &Value) -> bool {
    n.get("user")
        .and_then(|u| u.get("requireSigninToViewContents"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

pub fn has_files(n: &Value) -> bool {
    n.get("fileIds")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
}

/// Misskey's `isRenotePacked(note) && !isQuotePacked(note)`.
pub fn is_pure_renote(n: &Value) -> bool {
    present(n, "renoteId")
        && !(present(n, "text")
            || present(n, "cw")
            || present(n, "replyId")
            || present(n, "poll")
            || has_files(n))
}

fn ids(v: Option<&Value>) -> impl Iterator<Item = &str> {
    v.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

/// Who the note concerns beyond its author (Misskey's `isUserRelated`):
/// the author, the replied-to and the renoted user.
fn related_users(n: &Value) -> Vec<&str> {
    let a = user_id(n);
    let mut v = vec![a];
    let reply = str_of(n, "replyUserId").or_else(|| sub(n, "reply").map(user_id));
    let renote = str_of(n, "renoteUserId").or_else(|| sub(n, "renote").map(user_id));
    for u in [reply, renote].into_iter().flatten() {
        if u != a && !u.is_empty() && !v.contains(&u) {
            v.push(u);
        }
    }
    v
}

/// Misskey's `isNoteMutedOrBlocked` as conditions: muted or blocking
/// users, renote mutes, muted channels (but `own_channel`), muted
/// instances.
pub fn not_muted(n: &Value, own_channel: Option<&str>) -> Vec<Condition> {
    let mut keys = Vec::new();
    for u in related_users(n) {
        keys.push(key("m", u));
        keys.push(key("b", u));
    }
    if is_pure_renote(n) {
        keys.push(key("rm", user_id(n)));
    }
    let renote = sub(n, "renote");
    let channels = [
        str_of(n, "channelId"),
        renote.and_then(|r| str_of(r, "channelId")),
    ];
    for c in channels.into_iter().flatten() {
        if Some(c) != own_channel && !keys.contains(&key("mc", c)) {
            keys.push(key("mc", c));
        }
    }
    let hosts: Vec<String> = [Some(n), sub(n, "reply"), renote]
        .into_iter()
        .flatten()
        .filter_map(host)
        .map(str::to_owned)
        .collect();
    let mut out = vec![none_of(REL, keys)];
    if !hosts.is_empty() {
        out.push(none_of(MUTED_INSTANCES, hosts));
    }
    out
}

/// Misskey's `isNoteVisibleForMe` for a signed-in viewer: None when every
/// viewer may see it, else the keys of which the viewer's `rel` must hold one.
pub fn visible_keys(n: &Value) -> Option<Vec<String>> {
    let a = user_id(n);
    match visibility(n) {
        "specified" => {
            let mut k = vec![key("me", a)];
            k.extend(ids(n.get("visibleUserIds")).map(|u| key("me", u)));
            Some(k)
        }
        "followers" => {
            let mut k = vec![key("me", a), follows_key(a)];
            if let Some(r) = sub(n, "reply") {
                k.push(key("me", user_id(r)));
            }
            k.extend(ids(n.get("mentions")).map(|u| key("me", u)));
            Some(k)
        }
        _ => None,
    }
}

/// Whether an anonymous viewer may see the note's content.
fn anonymous_sees(n: &Value) -> bool {
    !requires_signin(n) && !matches!(visibility(n), "specified" | "followers")
}

/// Misskey's `hideNote`.
fn hide(n: &mut Value) {
    if let Some(o) = n.as_object_mut() {
        o.remove("visibleUserIds");
        o.remove("poll");
        o.insert("fileIds".into(), Value::Array(vec![]));
        o.insert("files".into(), Value::Array(vec![]));
        o.insert("text".into(), Value::Null);
        o.insert("cw".into(), Value::Null);
        o.insert("isHidden".into(), Value::Bool(true));
    }
}

/// The note and its renote chain.
fn chain(n: &Value) -> Vec<&Value> {
    let mut v = vec![n];
    while let Some(r) = sub(v[v.len() - 1], "renote") {
        if v.len() > 8 {
            break;
        }
        v.push(r);
    }
    v
}

fn hidden_copy(n: &Value, hidden: &[usize]) -> Value {
    let mut c = n.clone();
    let mut cur = &mut c;
    for i in 0.. {
        if hidden.contains(&i) {
            hide(cur);
        }
        match cur.get_mut("renote") {
            Some(r) if r.is_object() => cur = r,
            _ => break,
        }
    }
    c
}

/// One form of the note and the viewers it goes to.
pub struct Variant {
    /// None: the note as published.
    pub note: Option<Value>,
    pub conditions: Vec<Condition>,
}

/// Misskey's `NoteStreamingHidingService.filter`, per viewer kind: the
/// forms of the note to send (with the conditions picking their viewers).
/// A note whose renote chain the viewer may not fully see gets its hidden
/// parts blanked, or is dropped when a pure renote is involved.
/// The note itself must already be visible to the viewers (every channel
/// checks that first); only its renote chain is examined here.
pub fn variants(n: &Value, signed_in: bool) -> Vec<Variant> {
    let chain = chain(n);
    let pure_involved = chain.iter().any(|x| is_pure_renote(x));
    if !signed_in {
        let hidden: Vec<usize> = (1..chain.len())
            .filter(|&i| !anonymous_sees(chain[i]))
            .collect();
        if hidden.is_empty() {
            return vec![Variant {
                note: None,
                conditions: vec![],
            }];
        }
        if pure_involved {
            return vec![];
        }
        return vec![Variant {
            note: Some(hidden_copy(n, &hidden)),
            conditions: vec![],
        }];
    }
    let hideable: Vec<(usize, Vec<String>)> = chain
        .iter()
        .enumerate()
        .skip(1)
        .filter_map(|(i, x)| visible_keys(x).map(|k| (i, k)))
        .collect();
    if hideable.is_empty() {
        return vec![Variant {
            note: None,
            conditions: vec![],
        }];
    }
    if pure_involved || hideable.len() > 3 {
        return vec![Variant {
            note: None,
            conditions: hideable.into_iter().map(|(_, k)| any_of(k)).collect(),
        }];
    }
    (0u32..(1 << hideable.len()))
        .map(|mask| {
            let mut hidden = Vec::new();
            let conditions = hideable
                .iter()
                .enumerate()
                .map(|(bit, (i, k))| {
                    if mask & (1 << bit) != 0 {
                        hidden.push(*i);
                        none_of(REL, k.clone())
                    } else {
                        any_of(k.clone())
                    }
                })
                .collect();
            Variant {
                note: (!hidden.is_empty()).then(|| hidden_copy(n, &hidden)),
                conditions,
            }
        })
        .collect()
}

/// Lower-cased hashtags of a note.
pub fn tags(n: &Value) -> Vec<String> {
    ids(n.get("tags")).map(str::to_lowercase).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renotes_and_quotes() {
        assert!(is_pure_renote(&json!({"renoteId": "r", "text": null})));
        assert!(!is_pure_renote(&json!({"renoteId": "r", "text": "q"})));
        assert!(!is_pure_renote(&json!({"renoteId": "r", "fileIds": ["f"]})));
        assert!(!is_pure_renote(&json!({"renoteId": null})));
    }

    #[test]
    fn mutes_cover_related_users_hosts_and_renote_mutes() {
        let n = json!({"userId": "a", "user": {"host": "x.example"}, "renoteId": "r",
            "renote": {"userId": "b", "user": {"host": null}, "channelId": "c1"}});
        let c = not_muted(&n, None);
        assert_eq!(c[0].keys, vec!["m:a", "b:a", "m:b", "b:b", "rm:a", "mc:c1"]);
        assert!(c[0].exclude);
        assert_eq!(c[1].keys, vec!["x.example"]);
        assert_eq!(not_muted(&n, Some("c1"))[0].keys.len(), 5);
    }

    #[test]
    fn hidden_renote_chain_forms() {
        // A quote of a followers-only note: viewers who may see it get it
        // whole, the others a blanked inner note.
        let n = json!({"userId": "a", "text": "q", "renoteId": "r", "visibility": "public",
            "renote": {"userId": "b", "text": "secret", "visibility": "followers", "fileIds": ["f"]}});
        let v = variants(&n, true);
        assert_eq!(v.len(), 2);
        assert!(v[0].note.is_none());
        assert_eq!(v[0].conditions[0].keys, vec!["me:b", "f:b"]);
        let hidden = v[1].note.as_ref().unwrap();
        assert_eq!(hidden["renote"]["text"], Value::Null);
        assert_eq!(hidden["renote"]["isHidden"], true);
        assert_eq!(hidden["text"], "q");
        assert!(v[1].conditions[0].exclude);
        // Anonymous viewers always get the blanked form.
        let a = variants(&n, false);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].note.as_ref().unwrap()["renote"]["isHidden"], true);
        // A pure renote of it: only those who may see it, never blanked.
        let p = json!({"userId": "a", "renoteId": "r", "renote": n["renote"].clone()});
        let v = variants(&p, true);
        assert_eq!(v.len(), 1);
        assert!(v[0].note.is_none() && !v[0].conditions[0].exclude);
        assert!(variants(&p, false).is_empty());
    }
}
