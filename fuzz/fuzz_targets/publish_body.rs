//! `POST /api/publish`: any body parses or is refused, never panics; what
//! parses names a non-empty room and event, and its data is JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(items) = chanhost_fuzz::publish::parse_publish(data) {
        for it in items {
            assert!(!it.room.is_empty() && !it.event.is_empty());
            assert!(serde_json::from_str::<serde::de::IgnoredAny>(it.data).is_ok());
        }
    }
});
