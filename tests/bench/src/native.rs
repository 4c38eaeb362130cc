//! The broadcast server of the benchmarks as a native plugin of an
//! embedded host (`chanhost-bench serve-native`): the same contract and the
//! same logic as the `bench` WebAssembly plugin (tests/plugins/bench), so
//! the upstream scenario measures what running the plugin as WebAssembly
//! costs end to end.

use std::path::PathBuf;

use anyhow::{Context, Result};
use chanhost::config::{Config, EnvOverrides, Overrides};
use chanhost::node::Node;
use chanhost::plugin::native::{NativeHost, NativePlugin};
use chanhost::plugin::{ChannelSpec, ConnectRequest, InstanceRef, Manifest, Payload, Rejection};
use serde_json::Value;

#[path = "../../plugins/bench/src/publish.rs"]
mod publish;

use publish::publish;

struct Bench;

impl NativePlugin for Bench {
    fn describe(&self) -> Manifest {
        Manifest {
            version: "bench-native-1".into(),
            channels: vec![ChannelSpec {
                name: "bench".into(),
                requires_user: false,
                shared: false,
            }],
            namespaces: vec!["/".into()],
            frames: vec![],
        }
    }

    fn connect(&mut self, host: &NativeHost<'_>, req: ConnectRequest) -> Result<(), Rejection> {
        let params: Value = serde_json::from_str(&req.params).unwrap_or(Value::Null);
        if let Some(room) = params.get("room").and_then(Value::as_str) {
            host.services.join(host.plugin, req.target, room);
        }
        Ok(())
    }

    fn message(
        &mut self,
        host: &NativeHost<'_>,
        _target: InstanceRef,
        event: &str,
        data: Payload,
        _ack: Option<u64>,
    ) {
        if event != "publish" {
            return;
        }
        if let Some((room, data)) = publish(&data.json) {
            host.services.broadcast(
                host.plugin,
                &room,
                "message",
                Payload::json(data),
                None,
                Vec::new(),
                false,
            );
        }
    }
}

/// Serves the native `bench` plugin on `listen` until SIGINT or SIGTERM.
/// Its plugins folder is an empty one of its own under the temporary
/// directory, shared by every `serve-native` and never written to.
pub async fn serve(listen: String) -> Result<()> {
    let dir: PathBuf = std::env::temp_dir().join("chanhost-bench-native");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let flags = Overrides {
        listen: Some(listen),
        plugins: Some(dir),
    };
    let config = Config::load(None, &flags, &EnvOverrides::default())?;
    let node = Node::new(config)?;
    node.plugins().add_native("bench", Box::new(Bench)).await?;
    chanhost::cli::serve_node(node).await
}

#[cfg(test)]
mod tests {
    use super::publish;

    #[test]
    fn reads_room_and_passes_data_as_text() {
        let misskey = r#"{"data":{"t":1,"p":"x"},"room":"fan","extra":[1,{"a":2}]}"#;
        let (room, data) = publish(misskey).expect("object form");
        assert_eq!((&*room, data), ("fan", r#"{"t":1,"p":"x"}"#));

        let socketio = r#" [{"room":"r\u00e9","data":[1, 2]}, "ignored", {"more":true}]"#;
        let (room, data) = publish(socketio).expect("argument array");
        assert_eq!((&*room, data), ("ré", "[1, 2]"));
    }

    #[test]
    fn refuses_what_is_not_a_publish() {
        for bad in [
            "",
            "[]",
            r#"{"room":"fan"}"#,
            r#"{"data":1}"#,
            r#"{"room":7,"data":1}"#,
            r#"[{"room":"fan"}]"#,
            r#"["first",{"room":"fan","data":1}]"#,
            r#"{"room":"fan","data":1"#,
            r#"[{"room":"fan","data":1},"#,
        ] {
            assert!(publish(bad).is_none(), "{bad:?} was read as a publish");
        }
    }
}
