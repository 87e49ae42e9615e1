//! Access control that fails closed, over real sockets: the Host check
//! against DNS rebinding, origins compared by scheme, host and port, the
//! per-address connect rate (and its defaults, which let a load test through),
//! trusted proxies, refusals that do not linger, and the write timeout of
//! plain HTTP connections.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use crosswire_server::ProxyHeader;
use futures_util::future::join_all;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn upgrade(host: &str, origin: Option<&str>) -> String {
    let origin = origin.map(|o| format!("Origin: {o}\r\n")).unwrap_or_default();
    format!(
        "GET /_ws HTTP/1.1\r\nHost: {host}\r\n{origin}Connection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// The status line of the answer to `request` (the connection may stay open
/// after a 101, so only the head is read).
async fn status_of(addr: SocketAddr, request: &str) -> (u16, String) {
    status_of_bytes(addr, request.as_bytes()).await
}

/// The status and the whole lowercased answer to a raw request that asks for
/// `Connection: close`.
async fn answer_to_bytes(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut buf))
        .await
        .expect("answered and closed within the wait")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    (text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0), text)
}

/// [`status_of`] a request given as raw bytes, which need not be UTF-8.
async fn status_of_bytes(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk)).await.expect("an answer").unwrap();
        assert!(n > 0, "closed before a response head: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
    // Read the rest of a short text body too, if the server closes after it.
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    (text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0), text)
}

#[tokio::test]
async fn on_loopback_a_foreign_host_is_refused() {
    let server = start_pubsub(config()).await;
    let addr = server.local_addr();
    let port = addr.port();
    // A page on evil.example, resolved to 127.0.0.1: same-origin with itself.
    let evil = format!("evil.example:{port}");
    let (status, text) = status_of(addr, &upgrade(&evil, Some(&format!("http://{evil}")))).await;
    assert_eq!(status, 421, "{text}");
    assert!(text.contains("host"), "a text body says why: {text}");
    let healthz = format!("GET /healthz HTTP/1.1\r\nHost: {evil}\r\nConnection: close\r\n\r\n");
    assert_eq!(http_raw(addr, &healthz).await.0, 421);
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), "app.localhost".into(), "[::1]".into()] {
        let (status, text) = status_of(addr, &upgrade(&host, None)).await;
        assert_eq!(status, 101, "{host}: {text}");
    }
    // Browser origins on loopback still work (trunk serve on :8080).
    assert_eq!(status_of(addr, &upgrade("127.0.0.1", Some("http://localhost:8080"))).await.0, 101);
}

#[tokio::test]
async fn allowed_hosts_extend_or_disable_the_host_check() {
    let mut config = config();
    config.allowed_hosts = vec!["dev.example".into()];
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    assert_eq!(status_of(addr, &upgrade("dev.example:3000", None)).await.0, 101);
    assert_eq!(status_of(addr, &upgrade("localhost", None)).await.0, 101);
    assert_eq!(status_of(addr, &upgrade("evil.example", None)).await.0, 421);

    let mut config = common::config();
    config.allowed_hosts = vec!["*".into()];
    let server = start_pubsub(config).await;
    assert_eq!(status_of(server.local_addr(), &upgrade("evil.example", None)).await.0, 101);
}

#[tokio::test]
async fn allowed_origins_compare_scheme_host_and_port() {
    let mut config = config();
    config.allowed_origins = vec!["https://app.example:443".into()];
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    assert!(connect_with(addr, "", &[("origin", "https://app.example")]).await.is_ok(), "default port");
    assert_eq!(connect_with(addr, "", &[("origin", "http://app.example")]).await.err(), Some(403), "scheme");
    assert_eq!(connect_with(addr, "", &[("origin", "https://app.example:8443")]).await.err(), Some(403), "port");
    assert_eq!(connect_with(addr, "", &[("origin", "https://app.example.evil")]).await.err(), Some(403));
    assert_eq!(connect_with(addr, "", &[("origin", "null")]).await.err(), Some(403));
}

#[tokio::test]
async fn a_bad_allowed_origin_is_a_config_error() {
    let mut config = config();
    config.allowed_origins = vec!["app.example".into()];
    assert!(crosswire_server::Server::new(config.clone(), crosswire_server::PubSub::new(&config))
        .bind()
        .await
        .is_err());
}

#[tokio::test]
async fn a_thousand_connections_from_one_address_with_default_flags() {
    // Only the publish rate differs from the defaults, and it plays no part here.
    let server = start_pubsub(config()).await;
    let addr = server.local_addr();
    const N: usize = 1100;
    let mut clients = Vec::with_capacity(N);
    for _ in 0..N / 100 {
        let batch = join_all((0..100).map(|_| connect_with(addr, "", &[]))).await;
        for (i, result) in batch.into_iter().enumerate() {
            let client =
                result.unwrap_or_else(|status| panic!("connection {} refused with {status}", clients.len() + i));
            clients.push(client);
        }
    }
    assert_eq!(server.handle().peers().len(), N);
}

#[tokio::test]
async fn an_address_over_its_connect_rate_gets_429() {
    let mut config = config();
    config.connect_rate_per_ip = 1;
    config.connect_burst_per_ip = 5;
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    let mut open = Vec::new();
    for _ in 0..5 {
        open.push(connect_with(addr, "", &[]).await.expect("within the burst"));
    }
    let (status, head, body) = http_raw(addr, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_eq!(status, 429, "{head}");
    assert!(head.contains("retry-after: "), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(body.contains("too many new connections"), "{body}");
    // A rate, not a count: closing connections gives no new ones.
    drop(open);
    assert_eq!(connect_with(addr, "", &[]).await.err(), Some(429));
}

#[tokio::test]
async fn refusals_are_answered_at_once_and_do_not_linger() {
    let mut config = config();
    config.max_connections = 1;
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    let handle = server.handle();
    let _first = Client::connect(addr).await;
    // Clients that send nothing: the answer must not wait for a request.
    let mut refused = Vec::new();
    for _ in 0..300 {
        refused.push(TcpStream::connect(addr).await.unwrap());
        assert!(handle.refusals_in_flight() <= 256, "refusal tasks are bounded");
    }
    let mut answered = 0;
    for stream in &mut refused {
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut buf)).await.expect("closed within the wait").ok();
        let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
        if !text.is_empty() {
            assert!(text.starts_with("http/1.1 503"), "{text}");
            assert!(text.contains("connection: close") && text.contains("retry-after: 1"), "{text}");
            answered += 1;
        }
    }
    assert!(answered >= 256, "the first refusals are all answered ({answered})");
    drop(refused);
    wait_until("the refusal tasks ended", || handle.refusals_in_flight() == 0).await;
}

#[tokio::test]
async fn a_trusted_proxy_names_the_client() {
    let mut config = config();
    config.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    config.connect_rate_per_ip = 1;
    config.connect_burst_per_ip = 2;
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    let xff = |ip: &'static str| [("x-forwarded-for", ip)];
    let _a = connect_with(addr, "", &xff("198.51.100.1, 203.0.113.9")).await.unwrap();
    let _b = connect_with(addr, "", &xff("203.0.113.9")).await.unwrap();
    assert_eq!(connect_with(addr, "", &xff("203.0.113.9")).await.err(), Some(429), "that client's rate");
    let _c = connect_with(addr, "", &xff("203.0.113.10")).await.expect("another client");
    let _d = connect_with(addr, "", &xff("2001:db8::1")).await.unwrap();
    let remotes: Vec<String> = server.handle().peers().iter().map(|p| p.remote_addr.ip().to_string()).collect();
    for ip in ["203.0.113.9", "203.0.113.10", "2001:db8::1"] {
        assert!(remotes.iter().any(|r| r == ip), "{ip} in {remotes:?}");
    }
}

#[tokio::test]
async fn ipv6_clients_are_limited_per_64() {
    let mut config = config();
    config.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    config.trusted_proxy_header = ProxyHeader::Forwarded;
    config.max_connections_per_ip = 1;
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    let fwd = |f: &'static str| [("forwarded", f)];
    let _a = connect_with(addr, "", &fwd("for=\"[2001:db8:0:1::1]\"")).await.unwrap();
    assert_eq!(connect_with(addr, "", &fwd("for=\"[2001:db8:0:1::ffff]\"")).await.err(), Some(429), "same /64");
    let _b = connect_with(addr, "", &fwd("for=\"[2001:db8:0:2::1]\"")).await.expect("another /64");
}

/// Behind a proxy that sets one forwarding header and passes the other on as
/// the client wrote it, a client rotating its own copy of the other header
/// gets no new address: the per-address count holds.
async fn the_other_forwarding_header_picks_no_address(header: ProxyHeader) {
    let mut config = config();
    config.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    config.max_connections_per_ip = 2;
    config.trusted_proxy_header = header;
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    let (proxy_says, client_says): (_, fn(usize) -> String) = match header {
        ProxyHeader::XForwardedFor => {
            (("x-forwarded-for", "203.0.113.9".to_owned()), |i| format!("for=198.51.100.{i}"))
        }
        _ => (("forwarded", "for=203.0.113.9".to_owned()), |i| format!("198.51.100.{i}")),
    };
    let other = match header {
        ProxyHeader::XForwardedFor => "forwarded",
        _ => "x-forwarded-for",
    };
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 1..=6 {
        let mine = client_says(i);
        match connect_with(addr, "", &[(proxy_says.0, &proxy_says.1), (other, &mine)]).await {
            Ok(client) => accepted.push(client),
            Err(status) => {
                assert_eq!(status, 429, "connection {i}");
                refused += 1;
            }
        }
    }
    assert_eq!((accepted.len(), refused), (2, 4), "{header}");
    let remotes: Vec<String> = server.handle().peers().iter().map(|p| p.remote_addr.ip().to_string()).collect();
    assert_eq!(remotes, ["203.0.113.9", "203.0.113.9"], "every peer counted under the address the proxy named");
    let metrics = server.handle().metrics_text();
    assert!(
        metrics.contains("crosswire_upgrades_rejected_total{reason=\"too_many_connections_per_ip\"} 4"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_client_cannot_pick_its_address_with_its_own_forwarded_header() {
    the_other_forwarding_header_picks_no_address(ProxyHeader::XForwardedFor).await;
}

#[tokio::test]
async fn a_client_cannot_pick_its_address_with_its_own_x_forwarded_for_header() {
    the_other_forwarding_header_picks_no_address(ProxyHeader::Forwarded).await;
}

#[tokio::test]
async fn a_host_outside_ascii_is_refused_with_400() {
    let mut config = config();
    config.allowed_hosts = vec!["localhost".into()];
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    let port = addr.port();
    let hosts: [Vec<u8>; 3] = [
        [b"127.0.0.1\xff:".as_slice(), port.to_string().as_bytes()].concat(),
        format!("\u{2113}ocalhost:{port}").into_bytes(),
        // A fullwidth dot: the name of an allowed host to a reader, not to the check.
        format!("localhost\u{ff0e}:{port}").into_bytes(),
    ];
    for host in &hosts {
        let upgrade = [
            b"GET /_ws HTTP/1.1\r\nHost: ".as_slice(),
            host,
            format!("\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                .as_bytes(),
        ]
        .concat();
        let (status, text) = status_of_bytes(addr, &upgrade).await;
        assert_eq!(status, 400, "{:?}: {text}", String::from_utf8_lossy(host));
        let healthz = [b"GET /healthz HTTP/1.1\r\nHost: ".as_slice(), host, b"\r\nConnection: close\r\n\r\n"].concat();
        let (status, text) = answer_to_bytes(addr, &healthz).await;
        assert_eq!(status, 400, "{text}");
        assert!(text.contains("host header must be one ascii host"), "a text body says why: {text}");
    }
    // Two Hosts: which one is meant depends on who reads them.
    let two = format!("GET /_ws HTTP/1.1\r\nHost: localhost:{port}\r\nHost: evil.example\r\nConnection: close\r\n\r\n");
    assert_eq!(answer_to_bytes(addr, two.as_bytes()).await.0, 400);
    assert!(server.handle().peers().is_empty());
    // Counted under the Host check, once per WebSocket request.
    let metrics = server.handle().metrics_text();
    assert!(metrics.contains("crosswire_upgrades_rejected_total{reason=\"host\"} 4"), "{metrics}");
    // A good Host still gets through.
    assert_eq!(status_of(addr, &upgrade(&format!("localhost:{port}"), None)).await.0, 101);
}

#[tokio::test]
async fn a_loopback_origin_must_be_http_or_https() {
    let server = start_pubsub(config()).await;
    let addr = server.local_addr();
    let mut allowing = config();
    allowing.addr = "0.0.0.0:0".parse().unwrap();
    allowing.allow_loopback_origins = true;
    let told = start_pubsub(allowing).await;
    let told_addr: SocketAddr = format!("127.0.0.1:{}", told.local_addr().port()).parse().unwrap();
    for addr in [addr, told_addr] {
        let host = format!("127.0.0.1:{}", addr.port());
        for bad in ["foo://127.0.0.1:1", "file://", "chrome-extension://127.0.0.1", format!("foo://{host}").as_str()] {
            let (status, text) = status_of(addr, &upgrade(&host, Some(bad))).await;
            assert_eq!(status, 403, "{bad}: {text}");
        }
        for good in ["http://localhost:8080", "https://127.0.0.1", format!("http://{host}").as_str()] {
            let (status, text) = status_of(addr, &upgrade(&host, Some(good))).await;
            assert_eq!(status, 101, "{good}: {text}");
        }
    }
}

#[tokio::test]
async fn untrusted_peers_cannot_choose_their_address() {
    let mut config = config();
    config.connect_rate_per_ip = 1;
    config.connect_burst_per_ip = 1;
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    let _a = connect_with(addr, "", &[("x-forwarded-for", "203.0.113.1")]).await.unwrap();
    assert_eq!(connect_with(addr, "", &[("x-forwarded-for", "203.0.113.2")]).await.err(), Some(429));
    assert!(server.handle().peers().iter().all(|p| p.remote_addr.ip().is_loopback()));
}

#[tokio::test]
async fn a_client_that_stops_reading_a_response_is_dropped() {
    let dir = std::env::temp_dir().join(format!("crosswire-write-timeout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Far more than the socket buffers on both ends hold.
    std::fs::write(dir.join("big.bin"), vec![7u8; 32 << 20]).unwrap();
    let mut config = config();
    config.static_dir = Some(dir.clone());
    config.max_connections = 1;
    config.write_timeout = Duration::from_millis(300);
    let server = start_pubsub(config).await;
    let addr = server.local_addr();

    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(addr).await.unwrap();
    stalled.write_all(b"GET /big.bin HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    // The one connection slot is taken until the server gives up on the
    // stalled reader; then a new connection gets through.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, _, _) =
            http_raw(addr, "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(tokio::time::Instant::now() < deadline, "the stalled connection was never dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(stalled);
    std::fs::remove_dir_all(dir).ok();
}
