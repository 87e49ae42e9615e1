//! Graceful shutdown: every peer gets close 1001, and shutdown finishes.

mod common;

use common::*;
use crosswire_shared::close_code;

#[tokio::test]
async fn shutdown_closes_every_peer_with_1001() {
    let server = start_pubsub(config()).await;
    let addr = server.local_addr();
    let mut clients = vec![];
    for _ in 0..5 {
        let mut c = Client::connect(addr).await;
        c.subscribe("t").await;
        clients.push(c);
    }
    let readers: Vec<_> = clients.into_iter().map(|mut c| tokio::spawn(async move { c.closed().await })).collect();
    tokio::time::timeout(WAIT, server.shutdown()).await.expect("shutdown finishes within its grace");
    for r in readers {
        let frame = r.await.unwrap().expect("a close frame");
        assert_eq!(u16::from(frame.code), close_code::GOING_AWAY);
    }
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn shutdown_is_bounded_by_the_grace_period_when_peers_never_answer() {
    let mut config = config();
    config.shutdown_grace = std::time::Duration::from_secs(3);
    let server = start_pubsub(config).await;
    // A peer that never reads, so never answers the close.
    let _mute = Client::connect(server.local_addr()).await;
    let started = tokio::time::Instant::now();
    server.shutdown().await;
    assert!(started.elapsed() <= std::time::Duration::from_secs(3));
}
