//! Misskey: any client frame parses or errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = chanhost_fuzz::misskey::parse(s);
    }
});
