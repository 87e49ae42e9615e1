//! The Redis engine's own rules, on two in-process nodes sharing a private
//! redis-server: cross-node delivery with the publisher's ack first,
//! recovery on the other node, `engine_unavailable` while Redis is down, and
//! a node's catch-up after its pub/sub connection dropped.

mod common;

use common::{redis::RedisServer, *};
use crosswire_server::RunningServer;
use crosswire_shared::{ErrorCode, ServerFrame, Since};
use serde_json::json;

async fn node(redis: &RedisServer) -> RunningServer {
    let server = start_pubsub(redis.config()).await;
    let handle = server.handle();
    wait_until("the node subscribed to Redis", || handle.engine_ready()).await;
    server
}

fn subscribed(frame: ServerFrame) -> (String, u64, bool) {
    match frame {
        ServerFrame::Subscribed { epoch, seq, recovered, .. } => (epoch, seq, recovered),
        other => panic!("expected subscribed, got {other:?}"),
    }
}

fn seq_of(frame: &ServerFrame) -> u64 {
    match frame {
        ServerFrame::Message { seq, .. } => *seq,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_cross_nodes_in_order_and_recover_on_another_node() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis).await, node(&redis).await);
    let mut sub = Client::connect(a.local_addr()).await;
    let (epoch, seq, _) = subscribed(sub.subscribe("room").await);
    assert_eq!(seq, 0);
    let mut publisher = Client::connect(b.local_addr()).await;
    // The publisher on B is subscribed too: its acks come before later messages.
    publisher.subscribe("room").await;
    for i in 1..=20 {
        assert_eq!(publisher.publish("room", json!(i), i).await, i);
    }
    for i in 1..=20 {
        assert_eq!(seq_of(&sub.recv().await), i);
    }
    // Gone from A after seq 20; 10 more published; back on B with `since`.
    drop(sub);
    for i in 21..=30 {
        assert_eq!(publisher.publish("room", json!(i), i).await, i);
    }
    let mut back = Client::connect(b.local_addr()).await;
    back.send(json!({"type": "subscribe", "topic": "room", "since": Since { epoch: epoch.clone(), seq: 20 }})).await;
    let (again, top, recovered) = subscribed(back.recv().await);
    assert_eq!((again.as_str(), top, recovered), (epoch.as_str(), 30, true));
    for i in 21..=30 {
        assert_eq!(seq_of(&back.recv().await), i);
    }
    back.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_publishes_keeps_subscribers_and_resets_lost_history() {
    let mut redis = RedisServer::start().await;
    let (a, b) = (node(&redis).await, node(&redis).await);
    let mut sub = Client::connect(a.local_addr()).await;
    let (epoch, ..) = subscribed(sub.subscribe("news").await);
    let mut publisher = Client::connect(b.local_addr()).await;
    assert_eq!(publisher.publish("news", json!("before"), 1).await, 1);
    assert_eq!(seq_of(&sub.recv().await), 1);

    redis.kill();
    let (ha, hb) = (a.handle(), b.handle());
    wait_until("both nodes see Redis gone", || !ha.engine_ready() && !hb.engine_ready()).await;
    publisher.send(json!({"type": "publish", "topic": "news", "data": "lost", "ack": 2})).await;
    match publisher.recv().await {
        ServerFrame::Error { code: ErrorCode::EngineUnavailable, ack: Some(2), .. } => {}
        other => panic!("expected engine_unavailable, got {other:?}"),
    }
    sub.assert_quiet().await;

    // Back without persistence: the topic's history is gone, its epoch too.
    redis.restart().await;
    wait_until("both nodes back on Redis", || ha.engine_ready() && hb.engine_ready()).await;
    assert_eq!(publisher.publish("news", json!("after"), 3).await, 1);
    let (new_epoch, seq, recovered) = subscribed(sub.recv().await);
    assert_ne!(new_epoch, epoch);
    assert_eq!((seq, recovered), (0, false));
    assert_eq!(seq_of(&sub.recv().await), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_subscription_catches_up_from_history() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis).await, node(&redis).await);
    let mut sub = Client::connect(a.local_addr()).await;
    sub.subscribe("feed").await;
    let mut publisher = Client::connect(b.local_addr()).await;
    assert_eq!(publisher.publish("feed", json!(1), 1).await, 1);
    assert_eq!(seq_of(&sub.recv().await), 1);
    // Cut every pub/sub connection; publish while they are down.
    let ha = a.handle();
    redis.kill_pubsub_clients();
    for i in 2..=40 {
        assert_eq!(publisher.publish("feed", json!(i), i).await, i);
    }
    wait_until("node A subscribed again", || ha.engine_ready()).await;
    for i in 41..=50 {
        assert_eq!(publisher.publish("feed", json!(i), i).await, i);
    }
    for i in 2..=50 {
        assert_eq!(seq_of(&sub.recv().await), i, "every message once, in order");
    }
    sub.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_with_since_racing_publishes_on_another_node_neither_loses_nor_duplicates() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis).await, node(&redis).await);
    let mut probe = Client::connect(a.local_addr()).await;
    let (epoch, ..) = subscribed(probe.subscribe("race").await);
    drop(probe);
    // Publishers on B run while subscribers on A come in with `since`
    // at whatever seq they last saw; each must then see every later seq once.
    const TOTAL: u64 = 600;
    let b_addr = b.local_addr();
    let publishers: Vec<_> = (0..2)
        .map(|p| {
            tokio::spawn(async move {
                let mut client = Client::connect(b_addr).await;
                for i in 0..TOTAL / 2 {
                    client.send(json!({"type": "publish", "topic": "race", "data": [p, i]})).await;
                }
                client.assert_quiet().await;
            })
        })
        .collect();
    let mut since = 0;
    for round in 0..6 {
        let mut sub = Client::connect(a.local_addr()).await;
        sub.send(json!({"type": "subscribe", "topic": "race", "since": Since { epoch: epoch.clone(), seq: since }}))
            .await;
        let (_, top, recovered) = subscribed(sub.recv().await);
        assert!(recovered, "round {round}: within the window");
        // Read up to a seq past what was current, then leave and come back.
        let until = (top + 20).min(TOTAL);
        let mut next = since + 1;
        while next <= until {
            assert_eq!(seq_of(&sub.recv().await), next, "round {round}");
            next += 1;
        }
        since = until;
    }
    for p in publishers {
        p.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_acknowledged_messages_gives_the_topic_a_new_epoch() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis).await, node(&redis).await);
    let mut sub = Client::connect(a.local_addr()).await;
    let (epoch, ..) = subscribed(sub.subscribe("ledger").await);
    let mut publisher = Client::connect(b.local_addr()).await;
    for i in 1..=10 {
        assert_eq!(publisher.publish("ledger", json!(i), i).await, i);
        assert_eq!(seq_of(&sub.recv().await), i);
    }
    // What a crash with `appendfsync everysec` can leave: the seq went back,
    // in the same epoch. Handing out seqs 6..10 again would be a silent loss.
    redis.command(&["HSET", "cw:{ledger}:m", "seq", "5"]);
    redis.kill_pubsub_clients();
    let (renewed, seq, recovered) = subscribed(sub.recv().await);
    assert_ne!(renewed, epoch, "a new epoch");
    assert_eq!((seq, recovered), (5, false));
    assert_eq!(publisher.publish("ledger", json!(11), 11).await, 6);
    assert_eq!(seq_of(&sub.recv().await), 6);
    sub.assert_quiet().await;
}

/// crossws-style hooks: every peer subscribes to `raw` on open.
struct RawRoom;

impl crosswire_server::Hooks for RawRoom {
    type Context = ();

    async fn upgrade(&self, _: &crosswire_server::UpgradeRequest) -> Result<(), crosswire_server::HttpResponse> {
        Ok(())
    }

    async fn open(&self, peer: &crosswire_server::Peer<()>) {
        peer.subscribe(&"raw".parse().unwrap()).unwrap();
        peer.send("subscribed").unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_text_and_binary_messages_reach_the_other_nodes() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    let redis = RedisServer::start().await;
    let a = start_with(redis.config(), RawRoom).await;
    let b = start_with(redis.config(), RawRoom).await;
    let (ha, hb) = (a.handle(), b.handle());
    wait_until("both nodes subscribed to Redis", || ha.engine_ready() && hb.engine_ready()).await;
    let mut on_b = connect_raw(b.local_addr()).await;
    let next = async |ws: &mut tokio_tungstenite::WebSocketStream<_>| loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("a frame within the wait").unwrap().unwrap() {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => break other,
        }
    };
    assert_eq!(next(&mut on_b).await, Message::text("subscribed"));
    let topic = "raw".parse().unwrap();
    // Delivered on A (nobody there), carried to B by Redis, back to back:
    // raw messages carry no seq, so their order is the engine's to keep.
    let sent: Vec<Message> = (0..300)
        .map(|i| match i % 3 {
            0 => Message::binary(vec![0xff, 0x00, b'\n', 0x80, (i % 256) as u8]),
            _ => Message::text(format!("hello {i}")),
        })
        .collect();
    for message in &sent {
        let message = match message {
            Message::Text(t) => crosswire_server::Message::from(t.as_str()),
            Message::Binary(b) => crosswire_server::Message::binary(b.to_vec()),
            other => unreachable!("only text and binary are sent: {other:?}"),
        };
        assert_eq!(ha.publish(&topic, message), 0);
    }
    for expected in sent {
        assert_eq!(next(&mut on_b).await, expected);
    }
}
