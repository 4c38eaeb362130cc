//! The socketioxide peer of the benchmarks: the same broadcast server as
//! chanhost's `bench` plugin (namespace `/`, CONNECT auth `{room}` joins it,
//! `publish {room, data}` goes to the room as `message data`).
//! usage: bench-socketioxide PORT [REDIS_URL]
//! With REDIS_URL, the server is one node of a cluster on
//! `socketioxide-redis` (its `redis` driver), as its docs set it up.

use serde::Deserialize;
use serde_json::Value;
use socketioxide::adapter::Adapter;
use socketioxide::extract::{Data, SocketRef};
use socketioxide::layer::SocketIoLayer;
use socketioxide::SocketIo;
use socketioxide_redis::drivers::redis::redis_client as redis;
use socketioxide_redis::{RedisAdapter, RedisAdapterCtr};

#[derive(Deserialize)]
struct Auth {
    room: Option<String>,
}

#[derive(Deserialize)]
struct Publish {
    room: String,
    data: Value,
}

async fn on_connect<A: Adapter>(socket: SocketRef<A>, Data(auth): Data<Auth>) {
    if let Some(room) = auth.room {
        socket.join(room);
    }
    socket.on(
        "publish",
        async |socket: SocketRef<A>, Data(p): Data<Publish>| {
            let _ = socket.within(p.room).emit("message", &p.data).await;
        },
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(3002);
    match args.next() {
        None => {
            let (layer, io) = SocketIo::builder().build_layer();
            io.ns("/", on_connect);
            serve(layer, port).await
        }
        Some(url) => {
            // The adapter's redis driver needs RESP3 (push messages).
            let client = redis::Client::open(format!("{url}?protocol=resp3"))?;
            let adapter = RedisAdapterCtr::new_with_redis(&client).await?;
            let (layer, io) = SocketIo::builder()
                .with_adapter::<RedisAdapter<_>>(adapter)
                .build_layer();
            io.ns("/", on_connect).await?;
            serve(layer, port).await
        }
    }
}

async fn serve<A: Adapter>(
    layer: SocketIoLayer<A>,
    port: u16,
) -> Result<(), Box<dyn std::error::Error>> {
    let app = axum::Router::new().layer(layer);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on 127.0.0.1:{port}");
    axum::serve(listener, app).await?;
    Ok(())
}
