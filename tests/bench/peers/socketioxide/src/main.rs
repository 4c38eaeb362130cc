//! The socketioxide peer of the benchmarks: the same broadcast server as
//! chanhost's `bench` plugin (namespace `/`, CONNECT auth `{room}` joins it,
//! `publish {room, data}` goes to the room as `message data`).
//! usage: bench-socketioxide PORT

use serde::Deserialize;
use serde_json::Value;
use socketioxide::extract::{Data, SocketRef};
use socketioxide::SocketIo;

#[derive(Deserialize)]
struct Auth {
    room: Option<String>,
}

#[derive(Deserialize)]
struct Publish {
    room: String,
    data: Value,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(3002);
    let (layer, io) = SocketIo::builder().build_layer();
    io.ns("/", async |socket: SocketRef, Data(auth): Data<Auth>| {
        if let Some(room) = auth.room {
            socket.join(room);
        }
        socket.on("publish", async |socket: SocketRef, Data(p): Data<Publish>| {
            let _ = socket.within(p.room).emit("message", &p.data).await;
        });
    });
    let app = axum::Router::new().layer(layer);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on 127.0.0.1:{port}");
    axum::serve(listener, app).await?;
    Ok(())
}
