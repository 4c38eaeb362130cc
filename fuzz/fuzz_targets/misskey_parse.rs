//! Misskey: any client frame parses or errors, never panics; the ids and
//! channel names of what parses are within their bounds.
#![no_main]

use chanhost_fuzz::misskey::{parse, ClientFrame, MAX_CHANNEL_BYTES, MAX_ID_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match parse(s) {
        Ok(ClientFrame::Connect { channel, id, .. }) => {
            assert!(channel.len() <= MAX_CHANNEL_BYTES && id.len() <= MAX_ID_BYTES);
        }
        Ok(
            ClientFrame::Disconnect { id }
            | ClientFrame::SubNote { id }
            | ClientFrame::UnsubNote { id }
            | ClientFrame::Channel { id, .. },
        ) => assert!(id.len() <= MAX_ID_BYTES),
        _ => {}
    }
});
