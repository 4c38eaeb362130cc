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
            (_, Some(ev)) => match serde_json::from_str::<serde_json::Value>(&ev.args) {
                Ok(args) => {
                    assert!(args.is_array());
                    count_placeholders(&args)
                }
                // Numbers past f64's range are valid JSON (JavaScript reads
                // Infinity) that serde's tree refuses; only a plain event,
                // which holds no placeholder, carries them.
                Err(_) => {
                    let _: Vec<&serde_json::value::RawValue> =
                        serde_json::from_str(&ev.args).expect("event arguments are a JSON array");
                    0
                }
            },
            (Some(data), None) => count_placeholders(data),
            (None, None) => 0,
        };
        assert_eq!(n, p.attachments);
    }
});
