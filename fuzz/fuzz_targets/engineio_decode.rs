//! Engine.IO: any text, as a WebSocket frame or a polling payload, decodes
//! or errors, and what decodes re-encodes to something that decodes the same.
#![no_main]

use chanhost_fuzz::engineio::{decode_payload, Packet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = Packet::decode_text(s) {
        assert_eq!(Packet::decode_text(&p.encode()).as_ref(), Ok(&p));
    }
    let _ = decode_payload(s);
});
