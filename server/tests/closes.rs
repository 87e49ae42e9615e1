//! Closes say why: every close the server decides on reaches the client as a
//! close frame with its code (never a bare TCP drop, 1006), and once the
//! server has decided, it acts on nothing more the peer sends.

mod common;

use std::time::Duration;

use common::*;
use crosswire_shared::{close_code, ErrorCode, ServerFrame};
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::{
    protocol::frame::{
        coding::{Data, OpCode},
        Frame,
    },
    Message,
};

/// A 1 MiB text message sent as a hundred fragments, far over the 64 KiB
/// limit: the client gets `too_large`, then the 1009 close frame, not a reset
/// (the server stops parsing at the limit, but drains the rest before it
/// lets the socket go).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_fragmented_message_closes_with_1009() {
    let server = start_pubsub(config()).await;
    let mut client = Client::connect(server.local_addr()).await;
    let fragment = "f".repeat(10 * 1024);
    for i in 0..100 {
        let opcode = if i == 0 { OpCode::Data(Data::Text) } else { OpCode::Data(Data::Continue) };
        let frame = Frame::message(fragment.clone().into_bytes(), opcode, i == 99);
        // The server may close while fragments are still going out.
        if client.ws.send(Message::Frame(frame)).await.is_err() {
            break;
        }
    }
    match client.recv().await {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::TooLarge),
        other => panic!("expected too_large, got {other:?}"),
    }
    let close = client.closed().await.expect("a close frame, not a dropped connection");
    assert_eq!(u16::from(close.code), close_code::MESSAGE_TOO_BIG);
}

/// Same, with an unfragmented message.
#[tokio::test]
async fn an_oversized_message_closes_with_1009() {
    let server = start_pubsub(config()).await;
    let mut client = Client::connect(server.local_addr()).await;
    let big = json!({"type": "publish", "topic": "t", "data": "x".repeat(100 * 1024)});
    let _ = client.ws.send(Message::text(big.to_string())).await;
    assert!(matches!(client.recv().await, ServerFrame::Error { code: ErrorCode::TooLarge, .. }));
    let close = client.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), close_code::MESSAGE_TOO_BIG);
}

/// Once the server has decided to close a peer (here: its token expired),
/// what it sends is read but not acted on: an expired token publishes nothing.
#[tokio::test]
async fn an_expired_token_publishes_nothing_more() {
    let server = start_pubsub(auth_config()).await;
    let handle = server.handle();
    let addr = server.local_addr();
    let now = now();
    let mint = |sub: &str, exp: u64| {
        token_with(SECRET, &json!({"sub": sub, "exp": exp, "subscribe": ["news"], "publish": ["news"]}))
    };
    let connect = |token: String| async move {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/_ws?token={token}")).await.unwrap();
        let mut client = Client { ws, peer: String::new() };
        if let ServerFrame::Welcome { peer, .. } = client.recv().await {
            client.peer = peer;
        }
        client
    };
    let mut reader = connect(mint("reader", now + 3600)).await;
    reader.subscribe("news").await;
    // Expires within two seconds (exp has one-second resolution).
    let mut expiring = connect(mint("expiring", now + 2)).await;
    wait_until("the token expired", || cut(&handle, &expiring.peer)).await;
    // Sent before the client reads the close: they reach the server after its verdict.
    for i in 0..10 {
        expiring.send(json!({"type": "publish", "topic": "news", "data": i, "ack": i})).await;
    }
    let (_, close) = seqs_until_close(&mut expiring, "news").await;
    assert_eq!(close.map(|c| u16::from(c.code)), Some(close_code::UNAUTHORIZED));
    // Its frames were read before its close reply: once it is gone, all were handled.
    wait_until("the expired peer is gone", || handle.peers().iter().all(|p| p.id != expiring.peer)).await;
    reader.assert_quiet().await;
}

/// A peer cut while much is queued for it gets the close frame next: the
/// queue is dropped, not flushed first (which would take as long as the peer
/// takes to read it, and end in a timeout and 1006).
#[tokio::test]
async fn a_disconnect_overtakes_the_queue() {
    let mut config = config();
    config.write_timeout = Duration::from_secs(120);
    config.max_queue_bytes = 64 * 1024 * 1024;
    let server = start_pubsub(config).await;
    let handle = server.handle();
    let addr = server.local_addr();
    let (mut slow, _publisher) = stalled_and_flooded(addr, 500, 32 * 1024).await;
    wait_until("frames are queued behind the stalled socket", || backed_up(&handle, &slow.peer)).await;
    assert!(handle.disconnect(&slow.peer, 4000, "kicked"));
    let (seqs, close) = seqs_until_close(&mut slow, "t").await;
    assert!(seqs.len() < 500, "the queue was dropped, not flushed ({} of 500)", seqs.len());
    assert_contiguous(&seqs, 1, "before the close");
    let close = close.expect("the close frame");
    assert_eq!((u16::from(close.code), close.reason.as_str()), (4000, "kicked"));
}
