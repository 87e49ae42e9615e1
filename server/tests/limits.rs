//! The message size limit (counted across fragments) and the heartbeat.

mod common;

use std::time::Duration;

use common::*;
use crosswire_shared::{close_code, ErrorCode, ServerFrame};
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::{
    protocol::frame::{coding::OpCode, Frame},
    Message,
};

fn small_limit() -> crosswire_server::ServerConfig {
    let mut config = config();
    config.max_message_size = 1024;
    config
}

#[tokio::test]
async fn oversize_message_gets_too_large_then_close_1009() {
    let server = start_pubsub(small_limit()).await;
    let addr = server.local_addr();
    let mut bystander = Client::connect(addr).await;
    let mut c = Client::connect(addr).await;
    // Just under the limit is fine.
    let fits = format!(r#"{{"type":"publish","topic":"t","data":"{}"}}"#, "x".repeat(1000 - 40));
    assert!(fits.len() <= 1024);
    c.send_text(&fits).await;
    c.ping(1).await;
    c.send_text(&format!(r#"{{"type":"publish","topic":"t","data":"{}"}}"#, "x".repeat(2000))).await;
    match c.recv().await {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::TooLarge),
        other => panic!("expected too_large, got {other:?}"),
    }
    let close = c.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), close_code::MESSAGE_TOO_BIG);
    bystander.ping(2).await;
}

#[tokio::test]
async fn the_limit_counts_across_fragments() {
    let server = start_pubsub(small_limit()).await;
    let mut c = connect_raw(server.local_addr()).await;
    // Three 600-byte fragments: each under the limit, together over it.
    let part = vec![b'x'; 600];
    c.send(Message::Frame(Frame::message(part.clone(), OpCode::Data(tungstenite_data_text()), false))).await.unwrap();
    c.send(Message::Frame(Frame::message(part.clone(), OpCode::Data(continue_op()), false))).await.unwrap();
    c.send(Message::Frame(Frame::message(part, OpCode::Data(continue_op()), true))).await.unwrap();
    let close = closed(&mut c).await.expect("a close frame");
    assert_eq!(u16::from(close.code), close_code::MESSAGE_TOO_BIG);
}

fn tungstenite_data_text() -> tokio_tungstenite::tungstenite::protocol::frame::coding::Data {
    tokio_tungstenite::tungstenite::protocol::frame::coding::Data::Text
}

fn continue_op() -> tokio_tungstenite::tungstenite::protocol::frame::coding::Data {
    tokio_tungstenite::tungstenite::protocol::frame::coding::Data::Continue
}

#[tokio::test(start_paused = true)]
async fn silent_peers_are_closed_after_two_heartbeats() {
    let mut config = config();
    config.heartbeat = Duration::from_secs(10);
    let server = start_pubsub(config).await;
    let mut silent = Client::connect(server.local_addr()).await;
    let welcome_heartbeat = {
        let _ = &mut silent;
        // Re-read what the server announced: clients ping at this interval.
        let mut other = Client::connect(server.local_addr()).await;
        other.send(json!({"type":"ping","id":1})).await;
        other.recv().await;
        10_000
    };
    assert_eq!(welcome_heartbeat, 10_000);
    // Paused time: this jumps the clock without waiting. The client does not
    // read meanwhile, so it answers no ping.
    tokio::time::sleep(Duration::from_secs(25)).await;
    let close = silent.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), close_code::HEARTBEAT_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn peers_that_answer_pings_stay_connected() {
    let mut config = config();
    config.heartbeat = Duration::from_secs(10);
    let server = start_pubsub(config).await;
    let mut live = Client::connect(server.local_addr()).await;
    // Reading answers the server's pings (tungstenite replies automatically).
    for i in 0..10 {
        let _ = tokio::time::timeout(Duration::from_secs(5), live.recv_text()).await;
        live.ping(i).await;
    }
    assert_eq!(server.handle().peers().len(), 1);
}

/// Many pings in one read: every one is answered, in order (more than the
/// pongs the server holds at once, so the rest waits for them to go out).
#[tokio::test]
async fn every_ping_gets_its_pong_in_order() {
    let server = start_pubsub(config()).await;
    let mut client = Client::connect(server.local_addr()).await;
    for i in 0..40u8 {
        client.ws.feed(Message::Ping(vec![i; usize::from(i)].into())).await.unwrap();
    }
    client.ws.flush().await.unwrap();
    let mut next = 0u8;
    while next < 40 {
        let msg = tokio::time::timeout(Duration::from_secs(10), futures_util::StreamExt::next(&mut client.ws))
            .await
            .expect("pongs within the wait")
            .expect("stream open")
            .expect("no error");
        if let Message::Pong(payload) = msg {
            assert_eq!(&payload[..], &vec![next; usize::from(next)][..], "pong {next}");
            next += 1;
        }
    }
}
