//! Any text a client (or server) sends must decode to a frame or to a clear
//! error, never panic; and what decodes must re-encode to something that
//! decodes to the same frame.
#![no_main]

use crosswire_shared::{ClientFrame, ServerFrame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(frame) = ClientFrame::decode(text) {
        let again = ClientFrame::decode(&frame.encode()).expect("an encoded frame decodes");
        assert_eq!(again.encode(), frame.encode());
    }
    if let Ok(frame) = ServerFrame::decode(text) {
        let again = ServerFrame::decode(&frame.encode()).expect("an encoded frame decodes");
        assert_eq!(again.encode(), frame.encode());
    }
});
