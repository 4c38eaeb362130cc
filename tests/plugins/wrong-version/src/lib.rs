//! A component built against `chanhost:plugin@0.9.0`, which this host does
//! not implement: loading and `chanhost check` must refuse it clearly.

wit_bindgen::generate!({ world: "plugin", path: "wit" });

struct Plugin;

impl exports::chanhost::plugin::channel::Guest for Plugin {
    fn describe() -> String {
        chanhost::plugin::host::log("describe");
        "0.9.0".into()
    }
}

export!(Plugin);
