//! A subscriber that stops reading must never slow the publisher or the other
//! subscribers; when its queue overflows it is closed with 1013.

mod common;

use common::*;
use crosswire_shared::close_code;
use serde_json::json;

#[tokio::test]
async fn a_slow_consumer_is_cut_off_and_nobody_else_waits() {
    let mut config = config();
    config.outbound_queue = 64;
    config.history_size = 16;
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    let mut slow = Client::connect(addr).await;
    slow.subscribe("firehose").await;
    let mut fast = Client::connect(addr).await;
    fast.subscribe("firehose").await;
    let mut publisher = Client::connect(addr).await;

    // 4000 x 16 KiB = 64 MiB: far beyond what the kernel buffers for the
    // slow peer, so its queue must overflow while it reads nothing.
    let blob = "x".repeat(16 * 1024);
    const N: u64 = 4000;
    let fast_reader = tokio::spawn(async move {
        let mut seqs = Vec::with_capacity(N as usize);
        for _ in 0..N {
            seqs.push(message_data(&fast.recv().await).0);
        }
        seqs
    });
    for i in 1..=N {
        // Every publish is acknowledged promptly: the publisher never waits on the slow peer.
        assert_eq!(publisher.publish("firehose", json!({ "i": i, "blob": blob }), i).await, i);
    }
    let seqs = fast_reader.await.unwrap();
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>(), "the fast subscriber got everything in order");

    // The slow one now reads: what made it into the kernel buffers, then the end.
    let mut received = 0u64;
    let close = loop {
        match tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut slow.ws)).await.expect("ends") {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(_))) => received += 1,
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    assert!(received < N, "the slow consumer was cut off before the end ({received} of {N})");
    if let Some(frame) = close {
        assert_eq!(u16::from(frame.code), close_code::SLOW_CONSUMER);
    }
    assert_eq!(server.handle().peers().len(), 2, "the slow peer is gone, the others stay");
}

#[tokio::test]
async fn a_slow_consumer_reconnects_and_recovers_what_it_missed() {
    let mut config = config();
    config.outbound_queue = 32;
    config.history_size = 256;
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    let handle = server.handle();
    let mut slow = Client::connect(addr).await;
    let epoch = match slow.subscribe("feed").await {
        crosswire_shared::ServerFrame::Subscribed { epoch, .. } => epoch,
        _ => unreachable!(),
    };
    let mut publisher = Client::connect(addr).await;
    let blob = "y".repeat(16 * 1024);
    // Publish until the server gives up on the slow peer, then stop.
    let mut published = 0u64;
    while !handle.peers().iter().any(|p| p.id == slow.peer && p.closing) {
        published += 1;
        publisher.publish("feed", json!({ "blob": blob }), published).await;
        assert!(published < 100_000, "the slow consumer was never cut off");
    }
    // It reads what reached it before the cut, in order.
    let mut last = 0;
    loop {
        match tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut slow.ws)).await.expect("ends") {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                let (seq, _, _) = message_data(&crosswire_shared::ServerFrame::decode(&t).unwrap());
                assert_eq!(seq, last + 1);
                last = seq;
            }
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) | Some(Err(_)) | None => break,
            Some(Ok(_)) => {}
        }
    }
    assert!(last < published, "it missed something ({last} of {published})");
    // Reconnect with `since` and get exactly the rest.
    let mut back = Client::connect(addr).await;
    back.send(json!({"type": "subscribe", "topic": "feed", "since": {"epoch": epoch, "seq": last}})).await;
    match back.recv().await {
        crosswire_shared::ServerFrame::Subscribed { recovered, seq, .. } => {
            assert!(recovered, "lag of {} within a window of 256", published - last);
            assert_eq!(seq, published);
        }
        other => panic!("expected subscribed, got {other:?}"),
    }
    for expected in last + 1..=published {
        assert_eq!(message_data(&back.recv().await).0, expected);
    }
    back.assert_quiet().await;
}
