//! Each handshake rule over a real socket: raw HTTP requests in, status and
//! headers out. Plus `/healthz`, 404s, the static files, and the 503 at the
//! connection limit.

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Sends one raw HTTP/1.1 request and returns the response head and body.
async fn raw(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    // The server closes after the response ("Connection: close" below, or a 101).
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_owned())
}

fn upgrade_request(method: &str, headers: &[(&str, &str)]) -> String {
    let mut req = format!("{method} /_ws HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req + "\r\n"
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn good_but(skip: &str, replace: Option<(&'static str, &'static str)>) -> Vec<(&'static str, &'static str)> {
    let mut h: Vec<(&str, &str)> =
        vec![("Upgrade", "websocket"), ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13")];
    h.retain(|(k, _)| *k != skip);
    h.extend(replace);
    h
}

#[tokio::test]
async fn each_rejection_has_its_status() {
    let server = start_pubsub(config()).await;
    let addr = server.local_addr();
    // `Connection: close` is always sent by the helper, so an upgrade needs it as a token list.
    // (method, headers, expected status, a header the answer must carry)
    type Case = (&'static str, Vec<(&'static str, &'static str)>, u16, Option<&'static str>);
    let cases: Vec<Case> = vec![
        ("POST", good_but("", None), 405, Some("allow: get")),
        ("GET", vec![], 426, Some("upgrade: websocket")),
        ("GET", good_but("Upgrade", Some(("Upgrade", "h2c"))), 400, None),
        ("GET", good_but("Sec-WebSocket-Key", None), 400, None),
        ("GET", good_but("Sec-WebSocket-Key", Some(("Sec-WebSocket-Key", "c2hvcnQ="))), 400, None),
        ("GET", good_but("Sec-WebSocket-Key", Some(("Sec-WebSocket-Key", "%%%"))), 400, None),
        (
            "GET",
            good_but("Sec-WebSocket-Version", Some(("Sec-WebSocket-Version", "8"))),
            426,
            Some("sec-websocket-version: 13"),
        ),
        ("GET", good_but("Sec-WebSocket-Version", None), 426, Some("sec-websocket-version: 13")),
    ];
    for (method, headers, status, header) in cases {
        let req = upgrade_request(method, &headers).replace("Connection: close", "Connection: close, Upgrade");
        let (got, head, body) = raw(addr, &req).await;
        assert_eq!(got, status, "{method} {headers:?}: {head}");
        if let Some(h) = header {
            assert!(head.contains(h), "{method} {headers:?} lacks {h}: {head}");
        }
        assert!(!body.is_empty(), "every rejection explains itself");
    }
    // A Connection header without the upgrade token.
    let (got, _, body) = raw(addr, &upgrade_request("GET", &good_but("", None))).await;
    assert_eq!(got, 400);
    assert!(body.contains("Connection"), "{body}");
}

#[tokio::test]
async fn accept_key_is_correct() {
    let server = start_pubsub(config()).await;
    let req =
        upgrade_request("GET", &good_but("", None)).replace("Connection: close", "Connection: keep-alive, Upgrade");
    let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "connection closed before the 101");
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    // RFC 6455's own example key and answer.
    assert!(head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
    assert!(head.contains("upgrade: websocket"));
}

#[tokio::test]
async fn healthz_and_unknown_paths() {
    let server = start_pubsub(config()).await;
    let (status, _, body) =
        raw(server.local_addr(), "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _, _) =
        raw(server.local_addr(), "GET /nope HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn static_files_are_served_without_escaping_the_root() {
    let dir = std::env::temp_dir().join(format!("crosswire-static-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("assets")).unwrap();
    std::fs::write(dir.join("index.html"), "<h1>demo</h1>").unwrap();
    std::fs::write(dir.join("assets/app.wasm"), [0u8, 97, 115, 109]).unwrap();
    let mut config = config();
    config.static_dir = Some(dir.clone());
    let server = start_pubsub(config).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let (status, head, body) = raw(server.local_addr(), &get("/")).await;
    assert_eq!((status, body.as_str()), (200, "<h1>demo</h1>"));
    assert!(head.contains("content-type: text/html"));
    let (status, head, _) = raw(server.local_addr(), &get("/assets/app.wasm")).await;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: application/wasm"));
    // Client-side routes fall back to the app; missing assets do not.
    assert_eq!(raw(server.local_addr(), &get("/some/route")).await.0, 200);
    assert_eq!(raw(server.local_addr(), &get("/missing.js")).await.0, 404);
    assert_eq!(raw(server.local_addr(), &get("/../../etc/passwd")).await.0, 400);
    assert_eq!(raw(server.local_addr(), &get("/%2e%2e/etc/passwd")).await.0, 400);
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn over_the_connection_limit_gets_503() {
    let mut config = config();
    config.max_connections = 1;
    let server = start_pubsub(config).await;
    let _first = Client::connect(server.local_addr()).await;
    let (status, head, body) = raw(server.local_addr(), "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_eq!(status, 503, "{head}");
    assert!(body.contains("connection limit"));
}
