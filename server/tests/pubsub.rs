//! Protocol v1 pub/sub semantics over real sockets, on both engines: every
//! test runs as `memory::…` (the embedded engine) and as `redis::…` (a
//! private redis-server of its own).

mod common;

use common::{redis::Engine, *};
use crosswire_shared::{ServerFrame, Topic};
use serde_json::json;

async fn welcome_then_subscribed_with_epoch_and_seq(engine: Engine) {
    let server = start_pubsub(engine.config()).await;
    let mut a = Client::connect(server.local_addr()).await;
    assert!(!a.peer.is_empty());
    match a.subscribe("room").await {
        ServerFrame::Subscribed { seq, recovered, epoch, .. } => {
            assert_eq!(seq, 0);
            assert!(!recovered);
            assert!(!epoch.is_empty());
        }
        _ => unreachable!(),
    }
}

async fn publish_reaches_others_but_not_the_sender(engine: Engine) {
    let server = start_pubsub(engine.config()).await;
    let addr = server.local_addr();
    let (mut a, mut b, mut c) = (Client::connect(addr).await, Client::connect(addr).await, Client::connect(addr).await);
    a.subscribe("room").await;
    b.subscribe("room").await;
    // c is not subscribed, and publishes anyway (allowed, as in crossws).
    let seq = c.publish("room", json!({"hello": "from c"}), 1).await;
    assert_eq!(seq, 1);
    for client in [&mut a, &mut b] {
        let (seq, from, data) = message_data(&client.recv().await);
        assert_eq!((seq, from.as_str(), data), (1, c.peer.as_str(), json!({"hello": "from c"})));
    }
    // a publishes: b gets it, a does not.
    assert_eq!(a.publish("room", json!("from a"), 2).await, 2);
    assert_eq!(message_data(&b.recv().await).2, json!("from a"));
    a.assert_quiet().await;
    c.assert_quiet().await;
}

async fn each_subscriber_sees_seq_order(engine: Engine) {
    let server = start_pubsub(engine.config()).await;
    let addr = server.local_addr();
    let mut subs = vec![];
    for _ in 0..3 {
        let mut s = Client::connect(addr).await;
        s.subscribe("ordered").await;
        subs.push(s);
    }
    let (mut p1, mut p2) = (Client::connect(addr).await, Client::connect(addr).await);
    for i in 0..100u64 {
        let p = if i % 2 == 0 { &mut p1 } else { &mut p2 };
        p.send(json!({"type": "publish", "topic": "ordered", "data": i})).await;
    }
    for s in &mut subs {
        let seqs: Vec<u64> = {
            let mut v = vec![];
            for _ in 0..100 {
                v.push(message_data(&s.recv().await).0);
            }
            v
        };
        assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
    }
}

async fn subscribe_is_idempotent_and_unsubscribe_stops_delivery(engine: Engine) {
    let server = start_pubsub(engine.config()).await;
    let addr = server.local_addr();
    let (mut a, mut b) = (Client::connect(addr).await, Client::connect(addr).await);
    a.subscribe("t").await;
    a.subscribe("t").await;
    b.publish("t", json!(1), 1).await;
    assert_eq!(message_data(&a.recv().await).2, json!(1));
    a.assert_quiet().await; // delivered once, not twice
    a.send(json!({"type": "unsubscribe", "topic": "t"})).await;
    assert!(matches!(a.recv().await, ServerFrame::Unsubscribed { topic } if topic.as_str() == "t"));
    b.publish("t", json!(2), 2).await;
    a.assert_quiet().await;
    // Unsubscribing again is harmless.
    a.send(json!({"type": "unsubscribe", "topic": "t"})).await;
    assert!(matches!(a.recv().await, ServerFrame::Unsubscribed { .. }));
}

async fn ping_pong_with_and_without_id(engine: Engine) {
    let server = start_pubsub(engine.config()).await;
    let mut a = Client::connect(server.local_addr()).await;
    a.ping(42).await;
    a.send(json!({"type": "ping"})).await;
    assert_eq!(a.recv_json().await, json!({"type": "pong"}));
}

async fn server_handle_publishes_and_lists_peers(engine: Engine) {
    let server = start_pubsub(engine.config()).await;
    let handle = server.handle();
    let mut a = Client::connect(server.local_addr()).await;
    a.subscribe("news").await;
    let topic = Topic::new("news").unwrap();
    assert_eq!(handle.publish_data(&topic, &json!({"headline": "hi"})).await.unwrap(), 1);
    let (seq, from, data) = message_data(&a.recv().await);
    assert_eq!((seq, from.as_str(), data), (1, "server", json!({"headline": "hi"})));
    let peers = handle.peers();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].id, a.peer);
    assert_eq!(peers[0].topics, vec![topic.clone()]);
    assert!(handle.disconnect(&a.peer, 4000, "bye"));
    let close = a.closed().await.expect("close frame");
    assert_eq!((u16::from(close.code), close.reason.as_str()), (4000, "bye"));
}

async fn empty_topics_are_cleaned_up(engine: Engine) {
    let mut config = engine.config();
    config.history_size = 0;
    let server = start_pubsub(config).await;
    let handle = server.handle();
    let mut a = Client::connect(server.local_addr()).await;
    a.subscribe("x").await;
    a.subscribe("y").await;
    assert_eq!(handle.topic_count(), 2);
    a.send(json!({"type": "unsubscribe", "topic": "x"})).await;
    a.recv().await;
    assert_eq!(handle.topic_count(), 1);
    drop(a);
    // The disconnect is processed by the server asynchronously: poll its state.
    for _ in 0..200 {
        if handle.topic_count() == 0 && handle.peers().is_empty() {
            return;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("topic y was not cleaned up after its only subscriber left");
}

async fn presence_lists_subscribers_and_streams_join_leave(engine: Engine) {
    let server = start_pubsub(engine.config()).await;
    let addr = server.local_addr();
    let (mut a, mut b) = (Client::connect(addr).await, Client::connect(addr).await);
    a.send(json!({"type": "subscribe", "topic": "room", "presence": true})).await;
    assert!(matches!(a.recv().await, ServerFrame::Subscribed { .. }));
    b.subscribe("room").await;
    match a.recv().await {
        ServerFrame::Join { who, .. } => assert_eq!(who.peer, b.peer),
        other => panic!("expected join, got {other:?}"),
    }
    a.send(json!({"type": "presence", "topic": "room", "id": 7})).await;
    match a.recv().await {
        ServerFrame::Presence { id, peers, .. } => {
            assert_eq!(id, Some(7));
            let mut expected = vec![a.peer.clone(), b.peer.clone()];
            expected.sort();
            assert_eq!(peers.into_iter().map(|p| p.peer).collect::<Vec<_>>(), expected);
        }
        other => panic!("expected presence, got {other:?}"),
    }
    drop(b);
    match a.recv().await {
        ServerFrame::Leave { who, .. } => assert!(!who.peer.is_empty()),
        other => panic!("expected leave, got {other:?}"),
    }
}

crate::on_both_engines!(
    welcome_then_subscribed_with_epoch_and_seq,
    publish_reaches_others_but_not_the_sender,
    each_subscriber_sees_seq_order,
    subscribe_is_idempotent_and_unsubscribe_stops_delivery,
    ping_pong_with_and_without_id,
    server_handle_publishes_and_lists_peers,
    empty_topics_are_cleaned_up,
    presence_lists_subscribers_and_streams_join_leave,
);
