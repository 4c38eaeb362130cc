//! `POST /api/rooms/join|leave`: any body parses or is refused, never
//! panics; what parses names exactly one of a user or a connection.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = chanhost_fuzz::publish::parse_rooms(data) {
        assert!(b.user.is_some() != b.connection.is_some());
        assert!(b.rooms.iter().all(|r| !r.is_empty()));
    }
});
