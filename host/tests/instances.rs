//! The instance life cycle through both protocol sessions, in process: a
//! host served on a loopback port with a native plugin that records every
//! hook it is called with, and WebSocket clients speaking Misskey and
//! Engine.IO / Socket.IO frames. What a client receives and what the plugin
//! is told are asserted together, so the sequence (open, replace, refuse,
//! limit, client and connection ends) is pinned however the sessions are
//! built.

mod common;

use common::*;
use std::time::Duration;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

fn connect(id: &str, params: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"type": "connect", "body": {"channel": "rec", "id": id, "params": params, "pong": true}})
}

#[tokio::test]
async fn a_misskey_instance_opens_talks_and_ends() {
    let (_node, addr, journal) = host().await;
    let mut c = ws(addr, "/streaming").await;
    send(&mut c, connect("a", serde_json::json!({"x": 1}))).await;
    // `connected` first (Misskey subscribes and answers in one step), then
    // what reached the instance while its plugin decided.
    assert_eq!(
        next_text(&mut c).await,
        r#"{"type":"connected","body":{"id":"a"}}"#
    );
    assert_eq!(
        next_text(&mut c).await,
        r#"{"type":"channel","body":{"id":"a","type":"hello","body":1}}"#
    );
    send(
        &mut c,
        serde_json::json!({"type": "ch", "body": {"id": "a", "type": "echo", "body": [2]}}),
    )
    .await;
    assert_eq!(
        next_text(&mut c).await,
        r#"{"type":"channel","body":{"id":"a","type":"echo","body":[2]}}"#
    );
    send(
        &mut c,
        serde_json::json!({"type": "disconnect", "body": {"id": "a"}}),
    )
    .await;
    journal.saw("disconnect a client").await;
    assert_eq!(
        journal.lines(),
        [
            "connect a {\"x\":1}",
            "message a echo [2]",
            "disconnect a client"
        ]
    );
}

#[tokio::test]
async fn a_reused_id_replaces_a_refusal_rolls_back_and_the_limit_holds() {
    let (node, addr, journal) = host().await;
    let mut c = ws(addr, "/streaming").await;
    send(&mut c, connect("a", serde_json::json!({}))).await;
    assert!(next_text(&mut c).await.contains("connected"));
    assert!(next_text(&mut c).await.contains("hello"));
    // The same id again: the old instance is told it was replaced first.
    send(&mut c, connect("a", serde_json::json!({"v": 2}))).await;
    assert!(next_text(&mut c).await.contains("connected"));
    assert!(next_text(&mut c).await.contains("hello"));
    journal.saw("connect a {\"v\":2}").await;
    let lines = journal.lines();
    let replaced = lines
        .iter()
        .position(|l| l == "disconnect a replaced")
        .unwrap();
    let second = lines
        .iter()
        .position(|l| l == "connect a {\"v\":2}")
        .unwrap();
    assert!(replaced < second, "{lines:?}");
    // A refused connect leaves no instance behind (and no `connected`).
    send(&mut c, connect("r", serde_json::json!({"refuse": true}))).await;
    journal.saw("connect r {\"refuse\":true}").await;
    // The limit (3 here) counts open instances only: b and c fit, d not.
    for id in ["b", "c", "d"] {
        send(&mut c, connect(id, serde_json::json!({}))).await;
    }
    for _ in 0..4 {
        let t = next_text(&mut c).await;
        assert!(!t.contains("\"r\"") && !t.contains("\"d\""), "{t}");
    }
    journal.saw("connect c {}").await;
    // Frames are handled in order: an echo on `a` after `d` proves `d` was
    // decided (ignored) before it.
    send(
        &mut c,
        serde_json::json!({"type": "ch", "body": {"id": "a", "type": "echo", "body": 0}}),
    )
    .await;
    assert!(next_text(&mut c).await.contains("\"echo\""));
    assert!(!journal.lines().iter().any(|l| l.starts_with("connect d")));
    let m = node.render_metrics();
    assert!(m.contains("\nchanhost_channel_instances 3\n"), "{m}");
    // The client goes: every open instance is told, none twice.
    drop(c);
    for id in ["a", "b", "c"] {
        journal
            .saw(&format!("disconnect {id} connection-closed"))
            .await;
    }
    let ends = journal
        .lines()
        .iter()
        .filter(|l| l.ends_with("connection-closed"))
        .count();
    assert_eq!(ends, 3);
    tokio::time::timeout(Duration::from_secs(5), async {
        while !node
            .render_metrics()
            .contains("\nchanhost_channel_instances 0\n")
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the instance gauge comes back to 0");
}

#[tokio::test]
async fn a_socketio_namespace_opens_after_its_reply_and_ends_with_the_session() {
    let (_node, addr, journal) = host().await;
    let mut c = ws(addr, "/socket.io/?EIO=4&transport=websocket").await;
    assert!(next_text(&mut c).await.starts_with("0{"));
    c.send(Message::text("40/nope,")).await.unwrap();
    assert_eq!(
        next_text(&mut c).await,
        r#"44/nope,{"message":"Invalid namespace"}"#
    );
    c.send(Message::text(r#"40/rec,{"refuse":true}"#))
        .await
        .unwrap();
    assert_eq!(next_text(&mut c).await, r#"44/rec,{"message":"refused"}"#);
    c.send(Message::text(r#"40/rec,{"k":1}"#)).await.unwrap();
    let reply = next_text(&mut c).await;
    assert!(reply.starts_with(r#"40/rec,{"sid":""#), "{reply}");
    // The plugin's emit during its connect is held until after the reply.
    assert_eq!(next_text(&mut c).await, r#"42/rec,["hello",1]"#);
    c.send(Message::text(r#"42/rec,["echo",3]"#)).await.unwrap();
    assert_eq!(next_text(&mut c).await, r#"42/rec,["echo",[3]]"#);
    c.send(Message::text("41/rec,")).await.unwrap();
    journal.saw("disconnect /rec client").await;
    // A second socket on the namespace, then the transport goes.
    c.send(Message::text("40/rec,")).await.unwrap();
    assert!(next_text(&mut c).await.starts_with("40/rec,"));
    drop(c);
    journal.saw("disconnect /rec connection-closed").await;
}
