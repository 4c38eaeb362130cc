//! The Engine.IO layer with a fake of the layer above: a handler that
//! echoes each message back, so what a client receives is the engine's
//! doing alone (handshake, polling payloads, where a response ends, close
//! and noop packets, refusals).

use std::sync::atomic::AtomicUsize;

use axum::body::Body;
use axum::http::Request;
use tower::ServiceExt;

use super::*;

#[derive(Default)]
struct Echo {
    next: std::sync::atomic::AtomicU64,
    opened: AtomicUsize,
    closed: AtomicUsize,
}

#[derive(Debug, thiserror::Error)]
#[error("the fake refuses {0}")]
struct Refuse(String);

impl Handler for Echo {
    type Socket = ();
    type Error = Refuse;
    const PROTOCOL: Protocol = Protocol::SocketIo;

    fn connection_id(&self) -> ConnId {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
    fn socket(&self, _opening: &Opening) {}
    fn opened(&self, _session: &Arc<Session<Self>>) {
        self.opened.fetch_add(1, Ordering::SeqCst);
    }
    async fn on_message(&self, session: &Arc<Session<Self>>, text: String) -> Result<(), Refuse> {
        match text.as_str() {
            "refuse" => Err(Refuse(text)),
            // One packet written alone, then one more.
            "alone" => {
                session.conn.push(Outbound::Ended("reply".into()));
                session.conn.push(Outbound::Text("4after".into()));
                Ok(())
            }
            _ => {
                session.conn.push(Outbound::Text(format!("4{text}")));
                Ok(())
            }
        }
    }
    async fn on_binary(&self, session: &Arc<Session<Self>>, data: Vec<u8>) -> Result<(), Refuse> {
        session.conn.push(Outbound::Binary(data));
        Ok(())
    }
    fn render(&self, _session: &Session<Self>, item: Outbound, into: &mut Vec<EioOut>) {
        match item {
            Outbound::Text(t) => into.push(EioOut::Text(t)),
            Outbound::Binary(b) => into.push(EioOut::Binary(b)),
            Outbound::Ended(what) => into.push(EioOut::Text(format!("4{what}"))),
            _ => {}
        }
    }
    fn closing(&self, session: &Session<Self>) {
        session.conn.push(Outbound::Text("4bye".into()));
    }
    fn closed(&self, _session: &Session<Self>, _why: &str) {
        self.closed.fetch_add(1, Ordering::SeqCst);
    }
}

fn server() -> Arc<EngineServer<Echo>> {
    let metrics = Arc::new(Metrics::default());
    EngineServer::new(
        Echo::default(),
        EngineOptions {
            ping_interval: Duration::from_secs(25),
            ping_timeout: Duration::from_secs(20),
            upgrade_timeout: Duration::from_secs(10),
            packet_gap: Duration::from_millis(1),
            max_payload: 1000,
            cors_origins: Vec::new(),
            queue: QueueLimits::default(),
            body: crate::server::BodyReader {
                timeout: Duration::from_secs(5),
                metrics: metrics.clone(),
            },
            admission: Admission::new(100, 0, Vec::new()),
            metrics,
            shutdown: CancellationToken::new(),
        },
    )
}

async fn call(
    server: &Arc<EngineServer<Echo>>,
    method: &str,
    query: &str,
    body: &str,
) -> (u16, String) {
    let s = server.clone();
    let app = axum::Router::new().route(
        "/engine.io/",
        axum::routing::any(move |req: Request<Body>| handle(s.clone(), req)),
    );
    let req = Request::builder()
        .method(method)
        .uri(format!("/engine.io/?EIO=4&{query}"))
        .body(Body::from(body.to_owned()))
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn open(server: &Arc<EngineServer<Echo>>) -> String {
    let (status, body) = call(server, "GET", "transport=polling", "").await;
    assert_eq!(status, 200);
    let open: serde_json::Value = serde_json::from_str(body.strip_prefix('0').unwrap()).unwrap();
    assert_eq!(open["upgrades"], serde_json::json!(["websocket"]));
    assert_eq!(open["pingInterval"], 25000);
    assert_eq!(open["maxPayload"], 1000);
    open["sid"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_polling_session_carries_messages_both_ways_through_the_handler() {
    let server = server();
    let sid = open(&server).await;
    assert_eq!(server.handler().opened.load(Ordering::SeqCst), 1);
    let q = format!("transport=polling&sid={sid}");
    assert_eq!(call(&server, "POST", &q, "4a\x1e4b\x1ebAQI=").await.1, "ok");
    assert_eq!(call(&server, "GET", &q, "").await.1, "4a\x1e4b\x1ebAQI=");
}

#[tokio::test]
async fn the_packets_of_one_item_share_a_poll_response() {
    let server = server();
    let sid = open(&server).await;
    let q = format!("transport=polling&sid={sid}");
    call(&server, "POST", &q, "4before\x1e4alone").await;
    assert_eq!(
        call(&server, "GET", &q, "").await.1,
        "4before\x1e4reply\x1e4after"
    );
}

#[tokio::test]
async fn a_handler_error_ends_the_session_with_400_and_the_sid_is_forgotten() {
    let server = server();
    let sid = open(&server).await;
    let q = format!("transport=polling&sid={sid}");
    assert_eq!(call(&server, "POST", &q, "4refuse").await.0, 400);
    assert_eq!(server.handler().closed.load(Ordering::SeqCst), 1);
    let (status, body) = call(&server, "GET", &q, "").await;
    assert_eq!(
        (status, body.as_str()),
        (400, r#"{"code":1,"message":"Session ID unknown"}"#)
    );
    assert_eq!(server.session_count(), 0);
}

#[tokio::test]
async fn a_client_close_answers_a_waiting_poll_with_a_noop() {
    let server = server();
    let sid = open(&server).await;
    let q = format!("transport=polling&sid={sid}");
    let waiting = tokio::spawn({
        let (server, q) = (server.clone(), q.clone());
        async move { call(&server, "GET", &q, "").await }
    });
    // The poll is waiting once it holds the queue.
    let session = server.session(&sid).unwrap();
    while session.rx.try_lock().is_ok() {
        tokio::task::yield_now().await;
    }
    assert_eq!(call(&server, "POST", &q, "1").await.1, "ok");
    assert_eq!(waiting.await.unwrap(), (200, "6".to_owned()));
    assert_eq!(call(&server, "GET", &q, "").await.0, 400);
}

#[tokio::test]
async fn a_server_close_says_goodbye_then_sends_the_close_packet_alone() {
    let server = server();
    let sid = open(&server).await;
    let q = format!("transport=polling&sid={sid}");
    let session = server.session(&sid).unwrap();
    session.conn.request_close(1000, "done");
    assert_eq!(call(&server, "GET", &q, "").await.1, "4bye");
    assert_eq!(call(&server, "GET", &q, "").await.1, "1");
    assert_eq!(server.handler().closed.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn refusals_carry_the_reference_servers_codes() {
    let server = server();
    let (status, body) = call(&server, "GET", "transport=tobi", "").await;
    assert_eq!(
        (status, body.as_str()),
        (400, r#"{"code":0,"message":"Transport unknown"}"#)
    );
    let (status, _) = call(&server, "POST", "transport=polling", "").await;
    assert_eq!(status, 400);
    let sid = open(&server).await;
    let (status, _) = call(&server, "PUT", &format!("transport=polling&sid={sid}"), "").await;
    assert_eq!(status, 400);
}

#[test]
fn a_poll_splits_before_a_close() {
    let t = |s: &str| EioOut::Text(s.into());
    let mut out = vec![t("a"), t("b"), t("1"), t("c")];
    assert_eq!(split_poll(&mut out, "1"), vec![t("1"), t("c")]);
    assert_eq!(out, vec![t("a"), t("b")]);
    let mut out = vec![t("1"), t("b")];
    assert!(split_poll(&mut out, "1").is_empty());
    assert_eq!(out, vec![t("1")]);
}

#[test]
fn what_waits_for_a_later_turn_is_bounded_like_the_queue() {
    let bound = QueueLimits {
        frames: 2,
        bytes: 10,
    };
    let mut later = Later::default();
    later
        .push(EioOut::Text("abcd".into()), false, bound)
        .unwrap();
    later.push(EioOut::Binary(vec![0; 4]), true, bound).unwrap();
    assert_eq!(
        later.push(EioOut::Text("x".into()), false, bound),
        Err(QueueFull),
        "two frames wait already"
    );
    let (p, own_turn) = later.pop().unwrap();
    assert_eq!((p, own_turn), (EioOut::Text("abcd".into()), false));
    assert_eq!(later.bytes, 4);
    assert_eq!(
        later.push(EioOut::Text("1234567".into()), false, bound),
        Err(QueueFull),
        "11 bytes"
    );
    later.unpop(EioOut::Text("abcd".into()), false);
    assert_eq!(later.bytes, 8);
}
