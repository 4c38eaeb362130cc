//! Socket.IO: any text decodes or errors, never panics; a decoded event's
//! arguments are a JSON array; a decoded binary packet's placeholders always
//! name exactly its attachments; a namespace is never longer than the bound.
#![no_main]

use chanhost_fuzz::socketio::{count_placeholders, decode, MAX_NAMESPACE_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = decode(s) {
        assert!(p.nsp.len() <= MAX_NAMESPACE_BYTES);
        let n = match (&p.data, &p.event) {
            (_, Some(ev)) => {
                let args: serde_json::Value =
                    serde_json::from_str(&ev.args).expect("event arguments are JSON");
                assert!(args.is_array());
                count_placeholders(&args)
            }
            (Some(data), None) => count_placeholders(data),
            (None, None) => 0,
        };
        assert_eq!(n, p.attachments);
    }
});
