//! A subscriber that stops reading must never slow the publisher or the other
//! subscribers. When its backlog passes the bounds it is closed with 1013:
//! the close frame reaches it, and nothing it received before has a gap. A
//! burst the server itself allowed is not a slow consumer, and a socket that
//! takes no bytes at all is dropped after the write timeout.

mod common;

use std::time::Duration;

use common::*;
use crosswire_shared::{close_code, ServerFrame};
use serde_json::json;

#[tokio::test]
async fn a_slow_consumer_is_cut_off_and_nobody_else_waits() {
    let mut config = config();
    config.outbound_queue = 64;
    config.history_size = 16;
    // The slow reader starts reading only once everything is published: its
    // close frame must still be there, however long that takes here.
    config.write_timeout = Duration::from_secs(120);
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    let handle = server.handle();
    let mut slow = connect_small_buffer(addr).await;
    slow.subscribe("firehose").await;
    let mut fast = Client::connect(addr).await;
    fast.subscribe("firehose").await;
    let mut publisher = Client::connect(addr).await;

    // 1000 x 16 KiB: far beyond what the kernel buffers for the slow peer,
    // so its queue must overflow while it reads nothing.
    let blob = "x".repeat(16 * 1024);
    const N: u64 = 1000;
    let fast_reader = tokio::spawn(async move {
        let mut seqs = Vec::with_capacity(N as usize);
        for _ in 0..N {
            seqs.push(message_data(&fast.recv().await).0);
        }
        fast
    });
    for i in 1..=N {
        // Every publish is acknowledged promptly: the publisher never waits on the slow peer.
        assert_eq!(publisher.publish("firehose", json!({ "i": i, "blob": blob }), i).await, i);
    }
    let mut fast = fast_reader.await.unwrap();
    fast.assert_quiet().await;

    // The slow one now reads: a gapless prefix of the topic, then its close.
    let (seqs, close) = seqs_until_close(&mut slow, "firehose").await;
    assert!((seqs.len() as u64) < N, "the slow consumer was cut off before the end ({} of {N})", seqs.len());
    assert_contiguous(&seqs, 1, "what the slow consumer got before its close");
    let close = close.expect("the close frame reaches the cut peer");
    assert_eq!(u16::from(close.code), close_code::SLOW_CONSUMER);
    wait_until("the slow peer is gone", || handle.peers().len() == 2).await;
    assert!(handle.peers().iter().all(|p| p.id != slow.peer), "the others stay");
}

/// The `…818, 820…` case: once a push to a full queue fails, the write loop
/// draining a few frames must not let later ones in, or the cut peer gets a
/// frame after a hole and recovers from after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_peer_receives_no_message_after_the_refused_one() {
    let mut config = config();
    config.write_timeout = Duration::from_secs(120);
    config.outbound_queue = 32;
    let server = start_pubsub(config).await;
    let handle = server.handle();
    let addr = server.local_addr();
    let mut slow = connect_small_buffer(addr).await;
    slow.subscribe("t").await;
    let mut publisher = Client::connect(addr).await;
    let blob = "z".repeat(4000);
    let mut published = 0u64;
    // Until a push is refused.
    while !cut(&handle, &slow.peer) {
        published += 1;
        assert!(published < 100_000, "the slow peer was never cut");
        publisher.publish("t", json!({"i": published, "blob": blob}), published).await;
    }
    // The peer reads a little (its queue drains a few frames), and more is published.
    for _ in 0..3 {
        let _ = slow.recv().await;
    }
    for _ in 0..200 {
        published += 1;
        publisher.publish("t", json!({"i": published, "blob": blob}), published).await;
    }
    let (seqs, close) = seqs_until_close(&mut slow, "t").await;
    let seqs: Vec<u64> = (1..=3).chain(seqs).collect();
    assert!((seqs.len() as u64) < published, "cut before the end ({} of {published})", seqs.len());
    assert_contiguous(&seqs, 1, "a cut peer's messages");
    assert_eq!(close.map(|c| u16::from(c.code)), Some(close_code::SLOW_CONSUMER));
}

/// Two publishers each sending 100 messages (inside the default publish
/// burst of 200) to two subscribers reading as fast as they can: a burst the
/// server allowed sitting in a queue for a moment is not a slow consumer.
#[tokio::test]
async fn a_burst_within_the_publish_limits_cuts_nobody() {
    let config = crosswire_server::ServerConfig { addr: "127.0.0.1:0".parse().unwrap(), ..Default::default() };
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    let mut readers = vec![];
    for _ in 0..2 {
        let mut sub = Client::connect(addr).await;
        sub.subscribe("room").await;
        readers.push(tokio::spawn(async move {
            let mut seqs = vec![];
            for _ in 0..200 {
                seqs.push(message_data(&sub.recv().await).0);
            }
            sub.assert_quiet().await;
            seqs
        }));
    }
    let mut publishers = vec![];
    for p in 0..2u64 {
        let mut publisher = Client::connect(addr).await;
        publishers.push(tokio::spawn(async move {
            for i in 0..100 {
                publisher.send(json!({"type": "publish", "topic": "room", "data": {"p": p, "i": i}})).await;
            }
            publisher.assert_quiet().await;
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    for r in readers {
        let seqs = r.await.unwrap();
        assert_contiguous(&seqs, 1, "a healthy subscriber under a burst");
    }
    assert!(server.handle().peers().iter().all(|p| !p.closing));
}

#[tokio::test]
async fn a_queue_is_bounded_in_bytes() {
    let mut config = config();
    config.max_queue_bytes = 100 * 1024;
    config.write_timeout = Duration::from_secs(120);
    let server = start_pubsub(config).await;
    let handle = server.handle();
    let addr = server.local_addr();
    let mut slow = connect_small_buffer(addr).await;
    slow.subscribe("big").await;
    let mut publisher = Client::connect(addr).await;
    let blob = "b".repeat(60 * 1024);
    // Few frames, many bytes: the frame bound (4096) is nowhere near.
    let mut published = 0;
    while !cut(&handle, &slow.peer) {
        published += 1;
        assert!(published < 2000, "the byte bound never cut the peer");
        publisher.publish("big", json!(blob), published).await;
        let max = handle.peers().iter().map(|p| p.queued_bytes).max().unwrap_or(0);
        assert!(max <= 100 * 1024, "a queue held {max} bytes");
    }
    let (seqs, close) = seqs_until_close(&mut slow, "big").await;
    assert_contiguous(&seqs, 1, "the byte-bounded peer");
    assert_eq!(close.map(|c| u16::from(c.code)), Some(close_code::SLOW_CONSUMER));
}

/// A peer whose socket takes no bytes is dropped after the write timeout,
/// even when its queue never reaches a bound: it would otherwise hold its
/// connection slot and its queued frames forever.
#[tokio::test]
async fn a_socket_that_takes_no_bytes_is_dropped_after_the_write_timeout() {
    let mut config = config();
    config.write_timeout = Duration::from_millis(300);
    config.max_queue_bytes = 64 * 1024 * 1024;
    let server = start_pubsub(config).await;
    let handle = server.handle();
    let addr = server.local_addr();
    // 200 x 60 KB: more than loopback's socket buffers hold, far less than the
    // queue's bounds.
    let (stalled, publisher) = stalled_and_flooded(addr, 200, 60 * 1024).await;
    wait_until("the stalled peer is dropped", || handle.peers().iter().all(|p| p.id != stalled.peer)).await;
    assert!(handle.peers().iter().any(|p| p.id == publisher.peer), "the publisher stays");
    drop(stalled);
}

#[tokio::test]
async fn a_slow_consumer_reconnects_and_recovers_what_it_missed() {
    let mut config = config();
    config.outbound_queue = 32;
    config.history_size = 256;
    config.write_timeout = Duration::from_secs(120);
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    let handle = server.handle();
    let mut slow = connect_small_buffer(addr).await;
    let epoch = match slow.subscribe("feed").await {
        ServerFrame::Subscribed { epoch, .. } => epoch,
        _ => unreachable!(),
    };
    let mut publisher = Client::connect(addr).await;
    let blob = "y".repeat(16 * 1024);
    // Publish until the server gives up on the slow peer, then stop.
    let mut published = 0u64;
    while !cut(&handle, &slow.peer) {
        published += 1;
        publisher.publish("feed", json!({ "blob": blob }), published).await;
        assert!(published < 100_000, "the slow consumer was never cut off");
    }
    // It reads what reached it before the cut, in order, then the close.
    let (seqs, close) = seqs_until_close(&mut slow, "feed").await;
    assert_contiguous(&seqs, 1, "before the cut");
    assert_eq!(close.map(|c| u16::from(c.code)), Some(close_code::SLOW_CONSUMER));
    let last = seqs.last().copied().unwrap_or(0);
    assert!(last < published, "it missed something ({last} of {published})");
    // Reconnect with `since` and get exactly the rest.
    let mut back = Client::connect(addr).await;
    back.send(json!({"type": "subscribe", "topic": "feed", "since": {"epoch": epoch, "seq": last}})).await;
    match back.recv().await {
        ServerFrame::Subscribed { recovered, seq, .. } => {
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

/// A `message` hook that sends far more than the peer's queue holds, a
/// little at a time, and takes long doing it.
struct Chatty;

impl crosswire_server::Hooks for Chatty {
    type Context = ();

    async fn upgrade(&self, _: &crosswire_server::UpgradeRequest) -> Result<(), crosswire_server::HttpResponse> {
        Ok(())
    }

    async fn message(&self, peer: &crosswire_server::Peer<()>, _: crosswire_server::Message) {
        for i in 0..200 {
            peer.send(i.to_string()).expect("the queue drains while the hook runs");
            if i % 4 == 3 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        peer.send("done").expect("still open");
    }
}

/// The hook runs on the peer's own task, and writes go on while it runs: a
/// slow hook does not make its own peer a slow consumer.
#[tokio::test]
async fn writes_go_on_while_a_hook_runs() {
    let mut config = config();
    config.outbound_queue = 8;
    let server = start_with(config, Chatty).await;
    let mut ws = connect_raw(server.local_addr()).await;
    futures_util::SinkExt::send(&mut ws, tokio_tungstenite::tungstenite::Message::text("go")).await.unwrap();
    let mut client = Client { ws, peer: String::new() };
    for i in 0..200 {
        assert_eq!(client.recv_text().await, i.to_string());
    }
    assert_eq!(client.recv_text().await, "done");
}
