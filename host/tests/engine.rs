//! The Engine.IO session through its whole life, in process: a polling
//! handshake, a namespace connected over polling, the upgrade to WebSocket
//! while a poll waits (the waiting poll gets a noop), the session carried
//! on over WebSocket, and polling refused afterwards. Requests are raw
//! HTTP/1.1 over TCP, the WebSocket is tungstenite's client.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// One request on its own connection; the status and the body.
async fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("a response within 10 s")
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

#[tokio::test]
async fn a_polling_session_connects_upgrades_and_carries_on_over_websocket() {
    let (_node, addr, journal) = host().await;
    let (status, open) = http(addr, "GET", "/socket.io/?EIO=4&transport=polling", "").await;
    assert_eq!(status, 200);
    let open: serde_json::Value = serde_json::from_str(open.strip_prefix('0').unwrap()).unwrap();
    let sid = open["sid"].as_str().unwrap().to_owned();
    assert_eq!(open["upgrades"], serde_json::json!(["websocket"]));
    let poll = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");

    assert_eq!(
        http(addr, "POST", &poll, "40/rec,").await,
        (200, "ok".into())
    );
    // Over polling the reply and the plugin's connect-time emit share one
    // payload, the reply first.
    let (_, payload) = http(addr, "GET", &poll, "").await;
    let packets: Vec<&str> = payload.split('\x1e').collect();
    assert!(packets[0].starts_with(r#"40/rec,{"sid":""#), "{payload}");
    assert_eq!(packets[1..], [r#"42/rec,["hello",1]"#]);

    // A poll waits while the WebSocket probes.
    let waiting = tokio::spawn({
        let poll = poll.clone();
        async move { http(addr, "GET", &poll, "").await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut c = ws(
        addr,
        &format!("/socket.io/?EIO=4&transport=websocket&sid={sid}"),
    )
    .await;
    c.send(Message::text("2probe")).await.unwrap();
    assert_eq!(next_text(&mut c).await, "3probe");
    assert_eq!(waiting.await.unwrap(), (200, "6".into()));
    c.send(Message::text("5")).await.unwrap();

    c.send(Message::text(r#"42/rec,["echo",3]"#)).await.unwrap();
    assert_eq!(next_text(&mut c).await, r#"42/rec,["echo",[3]]"#);
    journal.saw("message /rec echo [3]").await;
    let (status, _) = http(addr, "GET", &poll, "").await;
    assert_eq!(status, 400, "polling is over once upgraded");

    drop(c);
    journal.saw("disconnect /rec connection-closed").await;
}
