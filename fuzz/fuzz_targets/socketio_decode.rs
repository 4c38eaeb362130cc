//! Socket.IO: any text decodes or errors, never panics; a decoded binary
//! packet's placeholders always name exactly its attachments.
#![no_main]

use chanhost_fuzz::socketio::{count_placeholders, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(p) = decode(s) {
        let n = p.data.as_ref().map_or(0, count_placeholders);
        assert_eq!(n, p.attachments);
    }
});
