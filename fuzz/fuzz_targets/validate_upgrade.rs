//! The handshake validator gets arbitrary methods and header values and must
//! answer with an accept key or a rejection (whose response builds), never panic.
#![no_main]

use crosswire_server::handshake::validate_upgrade;
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 6] = ["upgrade", "connection", "sec-websocket-key", "sec-websocket-version", "origin", "host"];

fuzz_target!(|data: &[u8]| {
    // The first byte picks the method; the rest is split into header values on NUL.
    let Some((&m, rest)) = data.split_first() else { return };
    let method = ["GET", "POST", "PUT", "HEAD", "OPTIONS", "get"][m as usize % 6];
    let mut builder = http::Request::builder().method(method).uri("/_ws");
    for (i, value) in rest.split(|&b| b == 0).enumerate() {
        let Ok(value) = http::HeaderValue::from_bytes(value) else { continue };
        builder = builder.header(NAMES[i % NAMES.len()], value);
    }
    let Ok(request) = builder.body(()) else { return };
    match validate_upgrade(&request) {
        Ok(accept) => assert_eq!(accept.response().status(), http::StatusCode::SWITCHING_PROTOCOLS),
        Err(rejection) => assert_eq!(rejection.response().status(), rejection.status()),
    }
});
