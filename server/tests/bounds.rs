//! Memory stays bounded whatever clients do, asserted through the server's
//! own accounting (topic count, retained history bytes, queue bytes), not RSS.

mod common;

use std::time::Duration;

use common::*;
use crosswire_shared::{ErrorCode, ServerFrame};
use serde_json::json;

/// Subscribe/unsubscribe churn over fresh names: the topic count never
/// passes the cap, and while the churner's old topics are idle, new ones
/// take their place instead of being refused.
#[tokio::test]
async fn topic_churn_stays_under_the_topic_cap() {
    let mut config = config();
    config.max_topics = 64;
    let server = start_pubsub(config).await;
    let handle = server.handle();
    let mut churner = Client::connect(server.local_addr()).await;
    for n in 0..2000 {
        let topic = format!("churn{n}");
        churner.subscribe(&topic).await;
        churner.send(json!({"type": "unsubscribe", "topic": topic})).await;
        assert!(matches!(churner.recv().await, ServerFrame::Unsubscribed { .. }));
        assert!(handle.topic_count() <= 64, "{} topics", handle.topic_count());
    }
}

/// When every topic has a subscriber, one more is refused with a clear
/// `topic_limit`, for a subscribe and for a publish, and the connection stays.
#[tokio::test]
async fn a_new_topic_past_the_cap_is_refused_with_topic_limit() {
    let mut config = config();
    config.max_topics = 8;
    let server = start_pubsub(config).await;
    let mut holder = Client::connect(server.local_addr()).await;
    for n in 0..8 {
        holder.subscribe(&format!("held{n}")).await;
    }
    holder.send(json!({"type": "subscribe", "topic": "one-more"})).await;
    match holder.recv().await {
        ServerFrame::Error { code, topic, .. } => {
            assert_eq!(code, ErrorCode::TopicLimit);
            assert_eq!(topic.unwrap().as_str(), "one-more");
        }
        other => panic!("expected topic_limit, got {other:?}"),
    }
    holder.send(json!({"type": "publish", "topic": "another", "data": 1, "ack": 5})).await;
    match holder.recv().await {
        ServerFrame::Error { code, ack, .. } => assert_eq!((code, ack), (ErrorCode::TopicLimit, Some(5))),
        other => panic!("expected topic_limit, got {other:?}"),
    }
    holder.assert_quiet().await;
    assert_eq!(server.handle().topic_count(), 8);
}

/// Publishing floods to topics: retained history never passes its budget,
/// and a client asking for what was evicted is told `recovered:false`.
#[tokio::test]
async fn retained_history_stays_under_its_budget() {
    let mut config = config();
    config.history_memory_bytes = 512 * 1024;
    let server = start_pubsub(config).await;
    let handle = server.handle();
    let addr = server.local_addr();
    let mut epochs = vec![];
    let mut sub = Client::connect(addr).await;
    for t in 0..8 {
        match sub.subscribe(&format!("room{t}")).await {
            ServerFrame::Subscribed { epoch, .. } => epochs.push(epoch),
            _ => unreachable!(),
        }
    }
    drop(sub);
    let mut publisher = Client::connect(addr).await;
    let blob = "h".repeat(30 * 1024);
    for i in 0..200u64 {
        let topic = format!("room{}", i % 8);
        publisher.send(json!({"type": "publish", "topic": topic, "data": {"i": i, "blob": blob}})).await;
        if i % 20 == 19 {
            publisher.ping(i).await;
            assert!(handle.history_bytes() <= 512 * 1024, "{} bytes retained", handle.history_bytes());
        }
    }
    publisher.ping(0).await;
    assert!(handle.history_bytes() <= 512 * 1024);
    // 6 MB were published, 512 KiB are kept: recovering from the start cannot work.
    let mut back = Client::connect(addr).await;
    back.send(json!({"type": "subscribe", "topic": "room0", "since": {"epoch": epochs[0], "seq": 0}})).await;
    match back.recv().await {
        ServerFrame::Subscribed { recovered, seq, .. } => assert_eq!((recovered, seq), (false, 25)),
        other => panic!("expected subscribed, got {other:?}"),
    }
    back.assert_quiet().await;
}

/// Subscribe/unsubscribe/presence requests have their own rate limit,
/// answered `rate_limited`; the connection stays open.
#[tokio::test]
async fn churn_is_rate_limited() {
    let mut config = config();
    config.subscribe_rate = 1;
    config.subscribe_burst = 5;
    let server = start_pubsub(config).await;
    let mut churner = Client::connect(server.local_addr()).await;
    for n in 0..5 {
        churner.subscribe(&format!("t{n}")).await;
    }
    churner.send(json!({"type": "subscribe", "topic": "t5"})).await;
    match churner.recv().await {
        ServerFrame::Error { code, topic, .. } => {
            assert_eq!(code, ErrorCode::RateLimited);
            assert_eq!(topic.unwrap().as_str(), "t5");
        }
        other => panic!("expected rate_limited, got {other:?}"),
    }
    churner.send(json!({"type": "presence", "topic": "t0", "id": 1})).await;
    assert!(matches!(churner.recv().await, ServerFrame::Error { code: ErrorCode::RateLimited, .. }));
    churner.assert_quiet().await;
}

/// A peer churning a room with ten presence watchers reading normally: the
/// watchers get a bounded number of events (then a snapshot), and none of
/// them is cut as a slow consumer.
#[tokio::test]
async fn presence_churn_does_not_cut_the_watchers() {
    let mut config = config();
    config.outbound_queue = 64;
    let server = start_pubsub(config).await;
    let handle = server.handle();
    let addr = server.local_addr();
    let mut watchers = vec![];
    for _ in 0..10 {
        let mut w = Client::connect(addr).await;
        w.send(json!({"type": "subscribe", "topic": "room", "presence": true})).await;
        assert!(matches!(w.recv().await, ServerFrame::Subscribed { .. }));
        watchers.push(w);
    }
    let mut churner = Client::connect(addr).await;
    for _ in 0..300 {
        churner.subscribe("room").await;
        churner.send(json!({"type": "unsubscribe", "topic": "room"})).await;
        assert!(matches!(churner.recv().await, ServerFrame::Unsubscribed { .. }));
    }
    for w in &mut watchers {
        w.assert_quiet_tolerating_presence().await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(handle.peers().iter().all(|p| !p.closing), "no watcher was cut");
    assert_eq!(handle.peers().len(), 11);
}

/// Many backed-up peers cannot together hold more than the server-wide
/// queue budget, whatever each one's own bound allows.
#[tokio::test]
async fn backed_up_peers_share_one_queue_budget() {
    let mut config = config();
    config.max_queue_bytes = 4 * 1024 * 1024;
    config.max_total_queue_bytes = 1024 * 1024;
    config.write_timeout = Duration::from_secs(120);
    let server = start_pubsub(config).await;
    let handle = server.handle();
    let addr = server.local_addr();
    let mut stalled = vec![];
    for _ in 0..8 {
        let mut s = connect_small_buffer(addr).await;
        s.subscribe("firehose").await;
        stalled.push(s);
    }
    let mut publisher = Client::connect(addr).await;
    let blob = "q".repeat(16 * 1024);
    for i in 0..400u64 {
        publisher.send(json!({"type": "publish", "topic": "firehose", "data": {"i": i, "blob": blob}})).await;
        if i % 20 == 19 {
            publisher.ping(i).await;
            assert!(handle.queued_bytes() <= 1024 * 1024, "{} bytes queued", handle.queued_bytes());
        }
    }
    publisher.ping(0).await;
    wait_until("every stalled peer was cut", || stalled.iter().all(|s| cut(&handle, &s.peer))).await;
    for s in &mut stalled {
        let (seqs, close) = seqs_until_close(s, "firehose").await;
        assert_contiguous(&seqs, 1, "a peer cut by the shared budget");
        assert_eq!(close.map(|c| u16::from(c.code)), Some(crosswire_shared::close_code::SLOW_CONSUMER));
    }
    wait_until("their credit was given back", || handle.queued_bytes() == 0).await;
}
