//! What the in-process integration tests share: a host served on a
//! loopback port with a native plugin that records every hook it is called
//! with, and WebSocket helpers.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use chanhost::config::Config;
use chanhost::node::Node;
use chanhost::plugin::native::{NativeHost, NativePlugin};
use chanhost::plugin::{
    ChannelSpec, ConnectRequest, DisconnectReason, InstanceRef, Manifest, Payload, Rejection,
};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use tokio_tungstenite::tungstenite::Message;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What the plugin was told, one line per hook call.
#[derive(Clone, Default)]
pub struct Journal(Arc<Mutex<Vec<String>>>);

impl Journal {
    pub fn push(&self, line: String) {
        self.0.lock().push(line);
    }

    /// Waits until a line equal to `line` was recorded.
    pub async fn saw(&self, line: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.0.lock().iter().any(|l| l == line) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the plugin never saw {line:?}; it saw {:?}",
                self.0.lock()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lock().clone()
    }
}

/// Serves Misskey channel `rec` and namespace `/rec`; refuses a connect
/// whose params (or auth) have `"refuse": true`; on connect emits `hello`
/// to the instance; echoes `echo` messages.
pub struct Recorder(pub Journal);

pub fn reason(r: DisconnectReason) -> &'static str {
    match r {
        DisconnectReason::Client => "client",
        DisconnectReason::ConnectionClosed => "connection-closed",
        DisconnectReason::Replaced => "replaced",
        DisconnectReason::Server => "server",
        DisconnectReason::ConnectionLost => "connection-lost",
    }
}

impl NativePlugin for Recorder {
    fn describe(&self) -> Manifest {
        Manifest {
            version: "recorder-1".into(),
            channels: vec![ChannelSpec {
                name: "rec".into(),
                requires_user: false,
                shared: false,
            }],
            namespaces: vec!["/rec".into()],
            frames: vec![],
        }
    }

    fn connect(&mut self, host: &NativeHost<'_>, req: ConnectRequest) -> Result<(), Rejection> {
        self.0
            .push(format!("connect {} {}", req.target.id, req.params));
        if req.params.contains("\"refuse\":true") {
            return Err(Rejection {
                message: "refused".into(),
                data: None,
            });
        }
        host.services
            .send(host.plugin, req.target, "hello", Payload::json("1"));
        Ok(())
    }

    fn message(
        &mut self,
        host: &NativeHost<'_>,
        target: InstanceRef,
        event: &str,
        data: Payload,
        _ack: Option<u64>,
    ) {
        self.0
            .push(format!("message {} {event} {}", target.id, data.json));
        if event == "echo" {
            host.services.send(host.plugin, target, "echo", data);
        }
    }

    fn disconnect(&mut self, _host: &NativeHost<'_>, target: InstanceRef, r: DisconnectReason) {
        self.0
            .push(format!("disconnect {} {}", target.id, reason(r)));
    }
}

/// A host with the recorder, served on a free loopback port.
pub async fn host() -> (Arc<Node>, std::net::SocketAddr, Journal) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_plugins(dir.path());
    config.misskey.max_channels = 3;
    let node = Node::new(config).unwrap();
    let journal = Journal::default();
    node.plugins()
        .add_native("recorder", Box::new(Recorder(journal.clone())))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = node.clone();
    tokio::spawn(async move {
        let _dir = dir;
        chanhost::server::serve(served, listener, Duration::from_secs(1)).await
    });
    (node, addr, journal)
}

pub async fn ws(addr: std::net::SocketAddr, path: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}{path}"))
        .await
        .unwrap();
    ws
}

/// The next text frame (within 5 s).
pub async fn next_text(ws: &mut Ws) -> String {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame within 5 s")
            .expect("the stream is open")
            .unwrap();
        if let Message::Text(t) = m {
            return t.to_string();
        }
    }
}

pub async fn send(ws: &mut Ws, v: serde_json::Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}
