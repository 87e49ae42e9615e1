//! Operations endpoints over real sockets: `/metrics` (every family, and the
//! counters moving with what happens), `/healthz`, `/readyz` (503 once the
//! node drains), and the restart close (1012) a rolling deploy relies on.

mod common;

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use common::*;
use crosswire_server::{Endpoint, PubSub, RemoteAddr, Server, ServerConfig, ServerHandle, ShutdownKind};
use crosswire_shared::close_code;
use http::StatusCode;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tower::ServiceExt;

async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    http_raw(addr, &format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")).await
}

/// The value of the sample `series` (name and labels, exactly as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn value(handle: &ServerHandle, series: &str) -> f64 {
    let text = handle.metrics_text();
    sample(&text, series).unwrap_or_else(|| panic!("{series} missing from\n{text}"))
}

#[tokio::test]
async fn metrics_expose_every_family_in_the_prometheus_text_format() {
    let server = start_pubsub(config()).await;
    let (status, head, body) = get(server.local_addr(), "/metrics").await;
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("content-type: text/plain; version=0.0.4"), "{head}");
    for family in [
        "crosswire_connections",
        "crosswire_upgrades_rejected_total",
        "crosswire_topics",
        "crosswire_publishes_total",
        "crosswire_deliveries_total",
        "crosswire_slow_consumer_closes_total",
        "crosswire_write_timeout_closes_total",
        "crosswire_queue_bytes",
        "crosswire_history_bytes",
        "crosswire_engine_round_trip_seconds",
        "crosswire_build_info",
    ] {
        assert!(body.contains(&format!("# TYPE {family} ")), "{family} missing from\n{body}");
    }
    let version = format!("crosswire_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
    assert_eq!(sample(&body, &version), Some(1.0), "{body}");
}

#[tokio::test]
async fn counters_and_levels_follow_publishes_and_connections() {
    let server = start_pubsub(config()).await;
    let (addr, handle) = (server.local_addr(), server.handle());
    let mut a = Client::connect(addr).await;
    let mut b = Client::connect(addr).await;
    let mut c = Client::connect(addr).await;
    a.subscribe("room").await;
    b.subscribe("room").await;
    c.publish("room", json!({"text": "hi"}), 1).await;
    a.recv().await;
    b.recv().await;
    // Counted once the fan-out returns, which the frames can overtake.
    wait_until("the publish is counted", || value(&handle, "crosswire_publishes_total") == 1.0).await;
    let (_, _, body) = get(addr, "/metrics").await;
    assert_eq!(sample(&body, "crosswire_publishes_total"), Some(1.0), "{body}");
    assert_eq!(sample(&body, "crosswire_deliveries_total"), Some(2.0), "{body}");
    assert_eq!(sample(&body, "crosswire_connections"), Some(3.0), "{body}");
    assert_eq!(sample(&body, "crosswire_topics"), Some(1.0), "{body}");
    assert!(sample(&body, "crosswire_history_bytes").is_some_and(|b| b > 0.0), "{body}");

    handle.publish_data(&"room".parse().unwrap(), &json!("from the server")).await.unwrap();
    assert_eq!(value(&handle, "crosswire_publishes_total"), 2.0);
    assert_eq!(value(&handle, "crosswire_deliveries_total"), 4.0);
    drop(c);
    wait_until("the closed peer leaves the gauge", || value(&handle, "crosswire_connections") == 2.0).await;
}

#[tokio::test]
async fn refused_upgrades_are_counted_by_reason() {
    let server = start_pubsub(auth_config()).await;
    let (addr, handle) = (server.local_addr(), server.handle());
    let reason = |r: &str| value(&handle, &format!("crosswire_upgrades_rejected_total{{reason=\"{r}\"}}"));
    assert_eq!(reason("origin"), 0.0);

    assert_eq!(connect_with(addr, "", &[("origin", "https://evil.example")]).await.err(), Some(403));
    assert_eq!(reason("origin"), 1.0);
    // No token where one is required.
    assert_eq!(connect_with(addr, "", &[]).await.err(), Some(401));
    assert_eq!(reason("auth"), 1.0);
    // A plain GET with a valid token passes the hook, then fails the handshake rules.
    let token = token_with(SECRET, &json!({"sub": "u", "exp": now() + 600}));
    let (status, _, _) = get(addr, &format!("/_ws?token={token}")).await;
    assert_eq!(status, 426);
    assert_eq!(reason("bad_handshake"), 1.0);
    let (status, _, _) =
        http_raw(addr, "GET /_ws HTTP/1.1\r\nhost: attacker.example\r\nconnection: close\r\n\r\n").await;
    assert_eq!(status, 421);
    assert_eq!(reason("host"), 1.0);
    assert_eq!(reason("draining"), 0.0);
}

#[tokio::test]
async fn connections_refused_at_accept_are_counted() {
    let server = start_pubsub(ServerConfig { max_connections: 1, ..config() }).await;
    let (addr, handle) = (server.local_addr(), server.handle());
    let _only = Client::connect(addr).await;
    let (status, _, _) = get(addr, "/metrics").await;
    assert_eq!(status, 503);
    assert_eq!(value(&handle, "crosswire_upgrades_rejected_total{reason=\"too_many_connections\"}"), 1.0);
}

#[tokio::test]
async fn slow_consumer_and_write_timeout_closes_are_counted() {
    let config = ServerConfig { outbound_queue: 32, write_timeout: Duration::from_secs(120), ..config() };
    let server = start_pubsub(config).await;
    let (addr, handle) = (server.local_addr(), server.handle());
    // 1000 x 16 KiB: far beyond what the kernel buffers for a peer that
    // reads nothing (loopback send buffers grow to megabytes), so its queue
    // must overflow, however fast the server writes.
    let (mut slow, _publisher) = stalled_and_flooded(addr, 1000, 16 * 1024).await;
    wait_until("the slow peer is cut", || cut(&handle, &slow.peer)).await;
    let (_, close) = seqs_until_close(&mut slow, "t").await;
    assert_eq!(close.map(|c| u16::from(c.code)), Some(close_code::SLOW_CONSUMER));
    wait_until("the 1013 is counted", || value(&handle, "crosswire_slow_consumer_closes_total") == 1.0).await;
    assert_eq!(value(&handle, "crosswire_write_timeout_closes_total"), 0.0);

    // A socket that takes no bytes at all: dropped after the write timeout.
    let config = ServerConfig {
        write_timeout: Duration::from_millis(300),
        max_queue_bytes: 64 * 1024 * 1024,
        ..common::config()
    };
    let server = start_pubsub(config).await;
    let (addr, handle) = (server.local_addr(), server.handle());
    let (stalled, _publisher) = stalled_and_flooded(addr, 300, 32 * 1024).await;
    wait_until("the stalled peer is dropped", || handle.peers().iter().all(|p| p.id != stalled.peer)).await;
    assert_eq!(value(&handle, "crosswire_write_timeout_closes_total"), 1.0);
}

#[tokio::test]
async fn healthz_and_readyz_answer_while_serving() {
    let server = start_pubsub(config()).await;
    let addr = server.local_addr();
    assert_eq!(get(addr, "/healthz").await.0, 200);
    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert!(server.handle().is_ready());
}

/// Draining: not ready from the moment the stop begins, and every peer gets
/// 1012 for a restart.
#[tokio::test]
async fn a_restart_marks_the_node_not_ready_and_closes_peers_with_1012() {
    let server = start_pubsub(config()).await;
    let (addr, handle) = (server.local_addr(), server.handle());
    let mut clients = vec![];
    for _ in 0..3 {
        let mut c = Client::connect(addr).await;
        c.subscribe("t").await;
        clients.push(c);
    }
    let readers: Vec<_> = clients.into_iter().map(|mut c| tokio::spawn(async move { c.closed().await })).collect();
    let stop = tokio::spawn(server.stop(ShutdownKind::Restart));
    wait_until("the node reports not ready", || !handle.is_ready()).await;
    for r in readers {
        let frame = r.await.unwrap().expect("a close frame");
        assert_eq!(u16::from(frame.code), close_code::SERVICE_RESTART);
        assert_eq!(frame.reason, "server restarting");
    }
    tokio::time::timeout(WAIT, stop).await.expect("the stop finishes").unwrap();
    assert!(!handle.is_ready());
}

/// An app of its own serving the endpoint at `/_ws` and the operations
/// endpoints from the handle, as the README's library section shows.
async fn start_app() -> (SocketAddr, Endpoint<PubSub>) {
    let config = config();
    let endpoint = Server::new(config.clone(), PubSub::new(&config)).endpoint().expect("valid config");
    let (service, handle) = (endpoint.service(), endpoint.handle());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, remote)) = listener.accept().await else { return };
            let (service, handle) = (service.clone(), handle.clone());
            tokio::spawn(async move {
                let app = service_fn(move |mut req: Request<Incoming>| {
                    let (service, handle) = (service.clone(), handle.clone());
                    async move {
                        match req.uri().path() {
                            "/_ws" => {
                                req.extensions_mut().insert(RemoteAddr(remote));
                                service.oneshot(req).await
                            }
                            "/readyz" if handle.is_ready() => {
                                Ok(crosswire_server::text_response(StatusCode::OK, "ready\n"))
                            }
                            "/readyz" => {
                                Ok(crosswire_server::text_response(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"))
                            }
                            _ => Ok::<_, Infallible>(crosswire_server::text_response(
                                StatusCode::OK,
                                handle.metrics_text(),
                            )),
                        }
                    }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), app).with_upgrades().await;
            });
        }
    });
    (addr, endpoint)
}

#[tokio::test]
async fn a_mounted_endpoint_goes_unready_and_refuses_upgrades_while_it_drains() {
    let (addr, endpoint) = start_app().await;
    let handle = endpoint.handle();
    assert_eq!(get(addr, "/readyz").await.0, 200);
    let mut peer = Client::connect(addr).await;
    let stop = tokio::spawn(endpoint.stop(ShutdownKind::Restart));
    wait_until("the endpoint reports not ready", || !handle.is_ready()).await;
    // The app's listener still serves: its probe sees the 503.
    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!((status, body.as_str()), (503, "not ready\n"));
    // A new WebSocket is sent elsewhere instead of being opened to be closed.
    assert_eq!(connect_with(addr, "", &[]).await.err(), Some(503));
    assert_eq!(value(&handle, "crosswire_upgrades_rejected_total{reason=\"draining\"}"), 1.0);
    // It asks to be retried, and ends its connection (`http_raw` reads to the end).
    let (status, head, _) = http_raw(
        addr,
        "GET /_ws HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert_eq!(status, 503);
    assert!(head.contains("retry-after: 1") && head.contains("connection: close"), "{head}");
    let (_, _, body) = get(addr, "/metrics").await;
    assert_eq!(sample(&body, "crosswire_upgrades_rejected_total{reason=\"draining\"}"), Some(2.0), "{body}");
    let frame = peer.closed().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), close_code::SERVICE_RESTART);
    tokio::time::timeout(WAIT, stop).await.expect("the stop finishes").unwrap();
}
