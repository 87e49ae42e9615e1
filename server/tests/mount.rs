//! The WebSocket endpoint mounted in a plain hyper app's own `service_fn`,
//! next to the app's routes, on the app's own listener: the same protocol and
//! per-peer behaviour as the standalone server, with the limits the
//! standalone listener applies per connection applied per WebSocket.

mod common;

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use common::{closed, config, connect_with, message_data, stalled_and_flooded, wait_until, Client};
use crosswire_server::{text_response, Endpoint, PubSub, RemoteAddr, Server, ServerConfig};
use crosswire_shared::{close_code, ServerFrame};
use http::StatusCode;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// A hyper app of its own: `/_ws` goes to crosswire, anything else to the app.
async fn start_app(config: ServerConfig) -> (SocketAddr, Endpoint<PubSub>) {
    let endpoint = Server::new(config.clone(), PubSub::new(&config)).endpoint().expect("valid config");
    let service = endpoint.service();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, remote)) = listener.accept().await else { return };
            let service = service.clone();
            tokio::spawn(async move {
                let app = service_fn(move |mut req: Request<Incoming>| {
                    let service = service.clone();
                    async move {
                        if req.uri().path() == "/_ws" {
                            req.extensions_mut().insert(RemoteAddr(remote));
                            service.oneshot(req).await
                        } else {
                            Ok::<_, Infallible>(text_response(StatusCode::OK, "the app's own route\n"))
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
async fn the_protocol_runs_behind_the_apps_own_listener() {
    let (addr, endpoint) = start_app(config()).await;
    let (status, _, body) =
        common::http_raw(addr, "GET /elsewhere HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n").await;
    assert_eq!((status, body.as_str()), (200, "the app's own route\n"));

    let mut a = Client::connect(addr).await;
    let mut b = Client::connect(addr).await;
    a.subscribe("room").await;
    b.send(json!({"type": "subscribe", "topic": "room", "presence": true})).await;
    assert!(matches!(b.recv().await, ServerFrame::Subscribed { .. }));
    assert_eq!(b.publish("room", json!("hi"), 1).await, 1);
    assert_eq!(message_data(&a.recv().await), (1, b.peer.clone(), json!("hi")));

    let handle = endpoint.handle();
    assert_eq!(handle.publish_data(&"room".parse().unwrap(), &json!("from the app")).await.unwrap(), 2);
    assert_eq!(message_data(&a.recv().await).2, json!("from the app"));
    let peers = handle.peers();
    assert_eq!(peers.len(), 2);
    assert!(peers.iter().all(|p| p.remote_addr.ip().is_loopback() && p.remote_addr.port() != 0), "{peers:?}");

    endpoint.shutdown().await;
    assert_eq!(closed(&mut a.ws).await.map(|f| u16::from(f.code)), Some(close_code::GOING_AWAY));
}

#[tokio::test]
async fn the_endpoint_checks_origin_and_counts_websockets_against_max_connections() {
    let (addr, endpoint) = start_app(ServerConfig { max_connections: 1, ..config() }).await;
    assert_eq!(connect_with(addr, "", &[("origin", "https://evil.example")]).await.err(), Some(403));
    assert_eq!(connect_with(addr, "", &[("host", "evil.example")]).await.err(), Some(421));

    let first = Client::connect(addr).await;
    assert_eq!(connect_with(addr, "", &[]).await.err(), Some(503), "one WebSocket is the cap");
    drop(first);
    let handle = endpoint.handle();
    wait_until("the first peer is gone", || handle.peers().is_empty()).await;
    let mut again = Client::connect(addr).await;
    again.ping(1).await;
}

#[tokio::test]
async fn per_address_limits_apply_per_websocket_when_the_address_is_known() {
    let limited = ServerConfig { connect_rate_per_ip: 1, connect_burst_per_ip: 1, ..config() };
    let (addr, _endpoint) = start_app(limited).await;
    let _first = Client::connect(addr).await;
    assert_eq!(connect_with(addr, "", &[]).await.err(), Some(429));
}

/// The app's listener has no write timeout of crosswire's: the endpoint puts
/// one around the upgraded socket, so a peer that stops reading is dropped
/// although its queue never reaches a bound, as on the standalone server.
#[tokio::test]
async fn a_mounted_peer_that_takes_no_bytes_is_dropped_after_the_write_timeout() {
    let config =
        ServerConfig { write_timeout: Duration::from_millis(300), max_queue_bytes: 64 * 1024 * 1024, ..config() };
    let (addr, endpoint) = start_app(config).await;
    let handle = endpoint.handle();
    // 200 x 60 KB: more than loopback's socket buffers hold, far less than the
    // queue's bounds.
    let (stalled, publisher) = stalled_and_flooded(addr, 200, 60 * 1024).await;
    wait_until("the stalled peer is dropped", || handle.peers().iter().all(|p| p.id != stalled.peer)).await;
    assert!(handle.peers().iter().any(|p| p.id == publisher.peer), "the publisher stays");
}
