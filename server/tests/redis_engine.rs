//! The Redis engine's own rules, on two in-process nodes sharing a private
//! redis-server: cross-node delivery with the publisher's ack first,
//! recovery on the other node, `engine_unavailable` while Redis is down, and
//! a node's catch-up after its pub/sub connection dropped. And what the
//! memory engine enforces, enforced with Redis too, against a client that
//! tries: bulk history reads that cannot starve publishes, `--max-topics`,
//! no key for a topic nobody holds, and a Redis that refuses writes.

mod common;

use std::sync::Arc;

use common::{redis::RedisServer, *};
use crosswire_server::{Engine as _, PubSub, Publication, ReadLimit, RedisEngine, RunningServer, Server, ServerConfig};
use crosswire_shared::{ErrorCode, RawValue, ServerFrame, Since, Topic};
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

/// A node on `config` (pointed at a Redis), once subscribed to it.
async fn node_with(config: ServerConfig) -> RunningServer {
    let server = start_pubsub(config).await;
    let handle = server.handle();
    wait_until("the node subscribed to Redis", || handle.engine_ready()).await;
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_history_reads_do_not_starve_publishes_on_other_topics() {
    // What one node reading a large history ten times at once did to its
    // single Redis connection: every command behind 600 MB of replies timed
    // out, and unrelated publishes failed with `engine_unavailable`.
    const MESSAGES: usize = 1_000;
    const SIZE: usize = 60 * 1024;
    const READERS: usize = 10;
    let redis = RedisServer::start().await;
    let config = ServerConfig { history_size: MESSAGES, history_memory_bytes: 2 * MESSAGES * SIZE, ..redis.config() };
    let engine = Arc::new(RedisEngine::new(&redis.url(), &config).unwrap());
    let server = Server::new(config.clone(), PubSub::new(&config))
        .with_engine(engine.clone())
        .bind()
        .await
        .expect("server binds");
    let handle = server.handle();
    wait_until("the node subscribed to Redis", || handle.engine_ready()).await;
    // Given an epoch as a subscriber's read gives it, then filled: 60 MB.
    let archive: Topic = "archive".parse().unwrap();
    engine.read(&archive, None, ReadLimit { messages: 0, bytes: 0 }, true).await.unwrap();
    let data = RawValue::from_string(format!("\"{}\"", "x".repeat(SIZE - 2))).unwrap();
    for i in 1..=MESSAGES as u64 {
        let publication = Publication { from: "filler", data: &data, ack: None, at: tokio::time::Instant::now() };
        assert_eq!(engine.publish(&archive, publication).await, Ok(i));
    }

    // Paged on the Redis side whatever the bound: a bound across pages
    // from a `since` is kept, with where the rest follows; a message larger
    // than the bound is read alone.
    let epoch = engine.read(&archive, None, ReadLimit { messages: 0, bytes: 0 }, false).await.unwrap().epoch;
    let since = Since { epoch: epoch.to_string(), seq: 10 };
    let three_mib = ReadLimit { messages: MESSAGES, bytes: 3 << 20 };
    let page = engine.read(&archive, Some(&since), three_mib, false).await.unwrap();
    let bytes: usize = page.messages.iter().map(|(_, frame)| frame.len()).sum();
    assert!(bytes <= 3 << 20 && bytes + SIZE + 100 > 3 << 20, "as much as fits: {bytes}");
    assert!(page.messages.iter().map(|(seq, _)| *seq).eq(11..11 + page.messages.len() as u64));
    assert_eq!(page.next(), Some(10 + page.messages.len() as u64));
    let one = engine.read(&archive, Some(&since), ReadLimit { messages: MESSAGES, bytes: 1 }, false).await.unwrap();
    assert_eq!(one.messages.len(), 1);
    assert_eq!(one.next(), Some(11));

    let mut subscriber = Client::connect(server.local_addr()).await;
    subscriber.subscribe("chat").await;
    let mut publisher = Client::connect(server.local_addr()).await;
    let all = ReadLimit { messages: MESSAGES, bytes: 2 * MESSAGES * SIZE };
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let (engine, archive) = (engine.clone(), archive.clone());
            tokio::spawn(async move {
                let history = engine.read(&archive, None, all, false).await.expect("a bulk read is answered");
                assert!(history.messages.iter().map(|(seq, _)| *seq).eq(1..=MESSAGES as u64), "the whole history");
                history.messages.iter().map(|(_, frame)| frame.len()).sum::<usize>()
            })
        })
        .collect();
    // Publishes to another topic, one after the other, for as long as the
    // reads go on: each must be acked (`publish` fails on any other answer).
    let mut acked = 0;
    loop {
        acked += 1;
        assert_eq!(publisher.publish("chat", json!(acked), acked).await, acked);
        if readers.iter().all(|reader| reader.is_finished()) {
            break;
        }
    }
    let mut read = 0;
    for reader in readers {
        read += reader.await.unwrap();
    }
    assert!(read >= READERS * MESSAGES * SIZE);
    for seq in 1..=acked {
        assert_eq!(seq_of(&subscriber.recv().await), seq);
    }
    eprintln!("{READERS} bulk reads of {} MB each; {acked} publishes acked meanwhile", read / READERS / 1_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_topics_bounds_the_topics_a_node_holds() {
    let redis = RedisServer::start().await;
    let server = node_with(ServerConfig { max_topics: 10, ..redis.config() }).await;
    let handle = server.handle();
    let mut client = Client::connect(server.local_addr()).await;
    let subscribe = async |client: &mut Client, topic: &str| {
        client.send(json!({"type": "subscribe", "topic": topic})).await;
        match client.recv().await {
            ServerFrame::Subscribed { .. } => true,
            ServerFrame::Error { code: ErrorCode::TopicLimit, topic: Some(t), .. } if t.as_str() == topic => false,
            other => panic!("expected subscribed or topic_limit for {topic}, got {other:?}"),
        }
    };
    let mut taken = 0;
    for i in 0..50 {
        taken += usize::from(subscribe(&mut client, &format!("fresh-{i}")).await);
    }
    assert_eq!(taken, 10, "10 taken, 40 refused");
    assert_eq!(handle.topic_count(), 10);
    // Letting go of one makes room for one.
    client.send(json!({"type": "unsubscribe", "topic": "fresh-0"})).await;
    assert!(matches!(client.recv().await, ServerFrame::Unsubscribed { .. }));
    assert!(subscribe(&mut client, "fresh-new").await);
    assert!(!subscribe(&mut client, "fresh-newer").await);
    assert_eq!(handle.topic_count(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_where_nobody_holds_the_topic_writes_no_key() {
    let redis = RedisServer::start().await;
    let server = node(&redis).await;
    let mut sub = Client::connect(server.local_addr()).await;
    let (epoch, ..) = subscribed(sub.subscribe("kept").await);
    let mut publisher = Client::connect(server.local_addr()).await;
    for i in 1..=5 {
        assert_eq!(publisher.publish("kept", json!(i), i).await, i);
        assert_eq!(seq_of(&sub.recv().await), i);
    }
    let before = redis.dbsize();
    for i in 0..300 {
        let seq = publisher.publish(&format!("nobody-{i}"), json!(i), 100 + i).await;
        assert_eq!(seq, 0, "acked without a seq: nobody holds an epoch of it");
    }
    let after = redis.dbsize();
    assert_eq!(after, before, "300 publishes to topics nobody holds add no key");
    eprintln!("keys in Redis: {before} before 300 publishes to topics nobody holds, {after} after");
    // A topic someone held still retains, and recovers.
    drop(sub);
    for i in 6..=10 {
        assert_eq!(publisher.publish("kept", json!(i), i).await, i);
    }
    let mut back = Client::connect(server.local_addr()).await;
    back.send(json!({"type": "subscribe", "topic": "kept", "since": Since { epoch: epoch.clone(), seq: 5 }})).await;
    assert_eq!(subscribed(back.recv().await), (epoch, 10, true));
    for i in 6..=10 {
        assert_eq!(seq_of(&back.recv().await), i);
    }
    back.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_topic_whose_keys_redis_lost_resets_its_subscribers() {
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis).await, node(&redis).await);
    let mut sub = Client::connect(a.local_addr()).await;
    let (epoch, ..) = subscribed(sub.subscribe("evicted").await);
    let mut publisher = Client::connect(b.local_addr()).await;
    for i in 1..=3 {
        assert_eq!(publisher.publish("evicted", json!(i), i).await, i);
        assert_eq!(seq_of(&sub.recv().await), i);
    }
    // What an eviction (or an expiry while the node could not renew it)
    // does: the topic's state is gone while A's subscriber holds it.
    redis.command(&["DEL", "cw:{evicted}:m"]);
    assert_eq!(publisher.publish("evicted", json!("lost"), 4).await, 0, "no state: no seq");
    let (renewed, seq, recovered) = subscribed(sub.recv().await);
    assert_ne!(renewed, epoch);
    assert_eq!((seq, recovered), (0, false), "told, not a silent gap");
    for i in 1..=3 {
        assert_eq!(publisher.publish("evicted", json!(i), 4 + i).await, i);
        assert_eq!(seq_of(&sub.recv().await), i);
    }
    // The history list alone gone: a `since` into it is not recovered, and
    // the list's bytes start again from what the next publish retains.
    redis.command(&["DEL", "cw:{evicted}:h"]);
    let mut back = Client::connect(b.local_addr()).await;
    back.send(json!({"type": "subscribe", "topic": "evicted", "since": Since { epoch: renewed.clone(), seq: 1 }}))
        .await;
    assert_eq!(subscribed(back.recv().await), (renewed.clone(), 3, false));
    assert_eq!(publisher.publish("evicted", json!(4), 8).await, 4);
    let entry = redis.command(&["LINDEX", "cw:{evicted}:h", "0"]);
    assert_eq!(redis.command(&["HGET", "cw:{evicted}:m", "bytes"]), entry.len().to_string());
    assert_eq!(seq_of(&sub.recv().await), 4);
    assert_eq!(seq_of(&back.recv().await), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_refusing_writes_fails_publishes_clearly_and_writes_nothing() {
    const MAXMEMORY: &str = "16777216";
    let redis = RedisServer::start_configured(&["--maxmemory", MAXMEMORY, "--maxmemory-policy", "noeviction"]).await;
    let server = node(&redis).await;
    let handle = server.handle();
    let mut sub = Client::connect(server.local_addr()).await;
    sub.subscribe("ledger").await;
    let mut publisher = Client::connect(server.local_addr()).await;
    for i in 1..=3 {
        assert_eq!(publisher.publish("ledger", json!(i), i).await, i);
        assert_eq!(seq_of(&sub.recv().await), i);
    }
    // One value past `maxmemory`: Redis refuses every write that may grow it.
    redis.command(&["SETRANGE", "filler", MAXMEMORY, "x"]);
    publisher.send(json!({"type": "publish", "topic": "ledger", "data": "refused", "ack": 4})).await;
    match publisher.recv().await {
        ServerFrame::Error { code: ErrorCode::EngineUnavailable, ack: Some(4), message, .. } => {
            assert!(message.contains("maxmemory"), "says why: {message}");
        }
        other => panic!("expected engine_unavailable, got {other:?}"),
    }
    // Nothing half-written: neither the seq nor the history moved.
    assert_eq!(redis.command(&["HGET", "cw:{ledger}:m", "seq"]), "3");
    assert_eq!(redis.command(&["LLEN", "cw:{ledger}:h"]), ":3");
    assert!(handle.engine_ready(), "the node stays ready");
    // A topic nobody holds needs no write: still acked.
    assert_eq!(publisher.publish("nobody", json!(5), 5).await, 0);
    sub.assert_quiet().await;
    // Memory freed: publishes go on where they stopped.
    redis.command(&["DEL", "filler"]);
    assert_eq!(publisher.publish("ledger", json!(4), 6).await, 4);
    assert_eq!(seq_of(&sub.recv().await), 4);
    assert!(handle.engine_ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_larger_than_a_page_arrives_whole_and_in_order() {
    // 2.4 MB missed while the pub/sub connection was down: read back (and a
    // `since` replayed) page by page, each page at most 1 MiB.
    let redis = RedisServer::start().await;
    let (a, b) = (node(&redis).await, node(&redis).await);
    let mut sub = Client::connect(a.local_addr()).await;
    let (epoch, ..) = subscribed(sub.subscribe("large").await);
    let mut publisher = Client::connect(b.local_addr()).await;
    let data = "y".repeat(40_000);
    assert_eq!(publisher.publish("large", json!(data), 1).await, 1);
    assert_eq!(seq_of(&sub.recv().await), 1);
    redis.kill_pubsub_clients();
    for i in 2..=60 {
        assert_eq!(publisher.publish("large", json!(data), i).await, i);
    }
    let ha = a.handle();
    wait_until("node A subscribed again", || ha.engine_ready()).await;
    for i in 2..=60 {
        assert_eq!(seq_of(&sub.recv().await), i, "every message once, in order");
    }
    sub.assert_quiet().await;
    let mut back = Client::connect(a.local_addr()).await;
    back.send(json!({"type": "subscribe", "topic": "large", "since": Since { epoch: epoch.clone(), seq: 0 }})).await;
    assert_eq!(subscribed(back.recv().await), (epoch, 60, true));
    for i in 1..=60 {
        assert_eq!(seq_of(&back.recv().await), i);
    }
    back.assert_quiet().await;
}
