//! A cluster: several crosswire nodes (real processes of the binary) on one
//! private `redis-server`, and what its users must be able to count on when
//! nodes, Redis, or the connection between them fail. Every wait is for a
//! condition, bounded by a deadline; nothing sleeps in place of an event.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{
    redis::{Node, RedisServer},
    *,
};
use crosswire_shared::{ErrorCode, ServerFrame};
use serde_json::{json, Value};
use tokio::time::Instant;

/// How long a publish may take to be refused while Redis is down: the
/// issue's "a few seconds", never a hang.
const REFUSED_WITHIN: Duration = Duration::from_secs(5);

/// How long a node may take to find Redis again after it came back
/// (reconnecting with backoff) and act on it.
const BACK_WITHIN: Duration = Duration::from_secs(15);

/// The presence TTL the test nodes run with (`NODE_FLAGS`).
const PRESENCE_TTL: Duration = Duration::from_millis(1500);

async fn start_nodes(redis: &RedisServer, count: usize) -> Vec<Node> {
    let mut nodes = vec![];
    for _ in 0..count {
        nodes.push(Node::start(&redis.url(), &[]).await);
    }
    nodes
}

/// Subscribes; returns the topic's epoch and last seq.
async fn subscribe(client: &mut Client, topic: &str) -> (String, u64) {
    match client.subscribe(topic).await {
        ServerFrame::Subscribed { epoch, seq, recovered, .. } => {
            assert!(!recovered, "a subscribe without since recovers nothing");
            (epoch, seq)
        }
        _ => unreachable!(),
    }
}

/// Subscribes with `since`; returns the epoch, the last seq and `recovered`.
async fn subscribe_since(client: &mut Client, topic: &str, epoch: &str, seq: u64) -> (String, u64, bool) {
    client.send(json!({"type": "subscribe", "topic": topic, "since": {"epoch": epoch, "seq": seq}})).await;
    match client.recv().await {
        ServerFrame::Subscribed { topic: t, epoch, seq, recovered } if t.as_str() == topic => (epoch, seq, recovered),
        other => panic!("expected subscribed to {topic}, got {other:?}"),
    }
}

/// The next `count` frames, each a message of `topic`: their seqs and data.
async fn messages(client: &mut Client, topic: &str, count: u64) -> Vec<(u64, Value)> {
    let mut got = vec![];
    while (got.len() as u64) < count {
        match client.recv().await {
            ServerFrame::Message { topic: t, seq, data, .. } if t.as_str() == topic => {
                got.push((seq, serde_json::from_str(data.get()).unwrap()));
            }
            other => panic!("expected message {} of {topic}, got {other:?}", got.len() + 1),
        }
    }
    got
}

fn seqs(messages: &[(u64, Value)]) -> Vec<u64> {
    messages.iter().map(|(seq, _)| *seq).collect()
}

/// Publishes once with ack id `ack` and expects `engine_unavailable` for it,
/// within [`REFUSED_WITHIN`].
async fn publish_refused(client: &mut Client, topic: &str, ack: u64) {
    client.send(json!({"type": "publish", "topic": topic, "data": "while redis is down", "ack": ack})).await;
    match client.recv_within(REFUSED_WITHIN).await {
        ServerFrame::Error { code: ErrorCode::EngineUnavailable, ack: Some(a), .. } if a == ack => {}
        other => panic!("expected engine_unavailable for ack {ack}, got {other:?}"),
    }
}

/// Publishes, again while the node answers `engine_unavailable` (it has not
/// found Redis again yet), until acked within [`BACK_WITHIN`]; returns the seq.
async fn publish_when_up(client: &mut Client, topic: &str, data: Value, ack: u64) -> u64 {
    let deadline = Instant::now() + BACK_WITHIN;
    loop {
        client.send(json!({"type": "publish", "topic": topic, "data": data, "ack": ack})).await;
        match client.recv_within(BACK_WITHIN).await {
            ServerFrame::Ack { ack: a, seq } if a == ack => return seq,
            ServerFrame::Error { code: ErrorCode::EngineUnavailable, ack: Some(a), .. } if a == ack => {
                assert!(Instant::now() < deadline, "the node did not find Redis again within {BACK_WITHIN:?}");
                // The poll interval of a retry, not a wait for an event.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("expected ack {ack} or engine_unavailable, got {other:?}"),
        }
    }
}

/// Asks for `topic`'s presence list; returns its peer ids (in the server's
/// order). Join and leave events arriving meanwhile are skipped.
async fn presence(client: &mut Client, topic: &str, id: u64) -> Vec<String> {
    client.send(json!({"type": "presence", "topic": topic, "id": id})).await;
    loop {
        match client.recv().await {
            ServerFrame::Presence { id: Some(i), peers, .. } if i == id => {
                return peers.into_iter().map(|p| p.peer.to_string()).collect()
            }
            ServerFrame::Join { .. } | ServerFrame::Leave { .. } => continue,
            other => panic!("expected presence {id}, got {other:?}"),
        }
    }
}

/// Asks for `topic`'s presence list until it is `expected`, within `within`:
/// another node's join or leave reaches this node's list asynchronously.
async fn presence_becomes(client: &mut Client, topic: &str, expected: &[String], within: Duration, what: &str) {
    let started = Instant::now();
    let mut id = 0;
    loop {
        id += 1;
        let peers = presence(client, topic, id).await;
        if peers == expected {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{what}: after {} ms presence lists {peers:?}, not {expected:?}",
            started.elapsed().as_millis()
        );
        // The poll interval, not a wait for an event.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sorted(mut peers: Vec<String>) -> Vec<String> {
    peers.sort();
    peers
}

/// Six publishers, two on each of three nodes, publish at once, each
/// pipelining its publishes. Seqs are handed out once each, gapless across
/// the cluster, each publisher's in the order it published, and its acks
/// arrive in that order too; every
/// subscriber on every node gets every message exactly once, in seq order,
/// each carrying what its publisher sent under that seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_is_exactly_once_and_in_seq_order_under_publishers_on_every_node() {
    const PER_PUBLISHER: u64 = 100;
    let redis = RedisServer::start().await;
    let nodes = start_nodes(&redis, 3).await;
    let mut subs = vec![];
    let mut epochs = vec![];
    for node in &nodes {
        for _ in 0..2 {
            let mut sub = Client::connect(node.addr()).await;
            let (epoch, seq) = subscribe(&mut sub, "fan").await;
            assert_eq!(seq, 0);
            epochs.push(epoch);
            subs.push(sub);
        }
    }
    assert!(epochs.iter().all(|e| *e == epochs[0]), "one epoch on every node: {epochs:?}");

    let mut publishers = vec![];
    for node in &nodes {
        for _ in 0..2 {
            let addr = node.addr();
            let id = publishers.len();
            publishers.push(tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                for i in 1..=PER_PUBLISHER {
                    client.send(json!({"type": "publish", "topic": "fan", "data": {"p": id, "i": i}, "ack": i})).await;
                }
                // (ack id, seq) in arrival order.
                let mut acks = vec![];
                for i in 1..=PER_PUBLISHER {
                    match client.recv().await {
                        ServerFrame::Ack { ack, seq } => acks.push((ack, seq)),
                        other => panic!("publisher {id}: expected ack {i}, got {other:?}"),
                    }
                }
                acks
            }));
        }
    }
    // seq -> what was published under it.
    let mut published = BTreeMap::new();
    for (id, publisher) in publishers.into_iter().enumerate() {
        let acks = publisher.await.unwrap();
        let arrived: Vec<u64> = acks.iter().map(|(ack, _)| *ack).collect();
        let order: Vec<u64> = (1..=PER_PUBLISHER).collect();
        assert_eq!(arrived, order, "publisher {id}: acks arrive in the order of its publishes");
        let seqs: Vec<u64> = acks.iter().map(|(_, seq)| *seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "publisher {id}: its seqs follow its publishing order: {acks:?}");
        for (i, seq) in seqs.into_iter().enumerate() {
            let previous = published.insert(seq, json!({"p": id, "i": i as u64 + 1}));
            assert!(previous.is_none(), "seq {seq} handed out twice");
        }
    }
    let total = 6 * PER_PUBLISHER;
    assert_eq!(published.keys().copied().collect::<Vec<_>>(), (1..=total).collect::<Vec<_>>(), "gapless seqs");

    for (k, sub) in subs.iter_mut().enumerate() {
        let got = messages(sub, "fan", total).await;
        assert_contiguous(&seqs(&got), 1, &format!("subscriber {k} (node {})", k / 2));
        for (seq, data) in &got {
            assert_eq!(data, &published[seq], "subscriber {k}: seq {seq} carries what was published under it");
        }
        // Nothing after them: none came twice.
        sub.assert_quiet().await;
    }
}

/// Publishers subscribed to their topic, on two nodes, publishing at once:
/// each sees one sequence 1..=N, its own acks and the other's messages
/// interleaved in seq order. An ack comes before any later message, also
/// when the later message was published on another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribed_publishers_on_two_nodes_see_acks_and_messages_in_seq_order() {
    const EACH: u64 = 200;
    let redis = RedisServer::start().await;
    let nodes = start_nodes(&redis, 2).await;
    let mut clients = vec![];
    for node in &nodes {
        let mut client = Client::connect(node.addr()).await;
        subscribe(&mut client, "t").await;
        clients.push(client);
    }
    for i in 1..=EACH {
        for client in &mut clients {
            client.send(json!({"type": "publish", "topic": "t", "data": i, "ack": i})).await;
        }
    }
    for (n, client) in clients.iter_mut().enumerate() {
        let mut seen = vec![];
        while (seen.len() as u64) < 2 * EACH {
            match client.recv().await {
                ServerFrame::Message { seq, .. } | ServerFrame::Ack { seq, .. } => seen.push(seq),
                other => panic!("node {n}: unexpected {other:?}"),
            }
        }
        assert_contiguous(&seen, 1, &format!("node {n}: acks and messages"));
        client.assert_quiet().await;
    }
}

/// A subscriber's node dies by SIGKILL: the client reconnects to another
/// node with its `since` and gets exactly the messages published meanwhile,
/// `recovered:true`; so does a node started after the death, which never
/// held the topic in memory: recovery reads Redis.
#[tokio::test]
async fn a_client_of_a_killed_node_recovers_every_message_on_another() {
    let redis = RedisServer::start().await;
    let mut nodes = start_nodes(&redis, 2).await;
    let (a, b) = (nodes[0].addr(), nodes[1].addr());
    let mut sub = Client::connect(a).await;
    let (epoch, _) = subscribe(&mut sub, "t").await;
    let mut publisher = Client::connect(b).await;
    for i in 1..=10 {
        assert_eq!(publisher.publish("t", json!(i), i).await, i);
    }
    assert_eq!(seqs(&messages(&mut sub, "t", 10).await), (1..=10).collect::<Vec<_>>());

    nodes[0].kill9();
    assert!(sub.closed().await.is_none(), "a SIGKILLed node says no goodbye");
    for i in 11..=25 {
        assert_eq!(publisher.publish("t", json!(i), i).await, i);
    }

    let mut back = Client::connect(b).await;
    assert_eq!(subscribe_since(&mut back, "t", &epoch, 10).await, (epoch.clone(), 25, true));
    let got = messages(&mut back, "t", 15).await;
    assert_eq!(got, (11..=25).map(|i| (i, json!(i))).collect::<Vec<_>>(), "exactly the missed messages");
    back.assert_quiet().await;

    let fresh = Node::start(&redis.url(), &[]).await;
    let mut other = Client::connect(fresh.addr()).await;
    assert_eq!(subscribe_since(&mut other, "t", &epoch, 5).await, (epoch, 25, true));
    assert_eq!(seqs(&messages(&mut other, "t", 20).await), (6..=25).collect::<Vec<_>>());
    other.assert_quiet().await;
}

/// Redis dies and comes back empty (no persistence). While it is down, a
/// publish on any node is refused with `engine_unavailable` (its ack id
/// named) and subscribers stay connected. Once it is back, every node tells
/// its subscribers of the topic that its history is gone: an unsolicited
/// `subscribed` with one new epoch and `recovered:false`; publishing goes on
/// from there, and an old `since` is answered `recovered:false`.
#[tokio::test]
async fn redis_restarted_without_persistence_resets_subscribers_to_a_new_epoch() {
    let mut redis = RedisServer::start().await;
    let nodes = start_nodes(&redis, 2).await;
    let (a, b) = (nodes[0].addr(), nodes[1].addr());
    let mut subs = [Client::connect(a).await, Client::connect(b).await];
    let mut epochs = vec![];
    for sub in &mut subs {
        epochs.push(subscribe(sub, "t").await.0);
    }
    assert_eq!(epochs[0], epochs[1]);
    let epoch = epochs.remove(0);
    let mut publisher = Client::connect(b).await;
    for i in 1..=5 {
        publisher.publish("t", json!(i), i).await;
    }
    for sub in &mut subs {
        assert_eq!(seqs(&messages(sub, "t", 5).await), vec![1, 2, 3, 4, 5]);
    }

    redis.kill();
    publish_refused(&mut publisher, "t", 100).await;
    let mut publisher_a = Client::connect(a).await;
    publish_refused(&mut publisher_a, "t", 101).await;
    for sub in &mut subs {
        sub.assert_quiet().await;
    }

    redis.restart().await;
    let mut resets = vec![];
    for (n, sub) in subs.iter_mut().enumerate() {
        match sub.recv_within(BACK_WITHIN).await {
            ServerFrame::Subscribed { topic, epoch: new, seq, recovered } => {
                assert_eq!(topic.as_str(), "t");
                assert_ne!(new, epoch, "node {n}: the history is gone, so is its epoch");
                assert!(!recovered, "node {n}: nothing could be recovered");
                resets.push((new, seq));
            }
            other => panic!("node {n}: expected an unsolicited subscribed, got {other:?}"),
        }
    }
    assert_eq!(resets[0], resets[1], "one new epoch (and seq) on every node");
    let (new_epoch, reset_seq) = resets.remove(0);

    let seq = publish_when_up(&mut publisher, "t", json!("after"), 200).await;
    assert_eq!(seq, reset_seq + 1, "seqs go on without a gap from the reset");
    for sub in &mut subs {
        assert_eq!(messages(sub, "t", 1).await, vec![(seq, json!("after"))]);
        sub.assert_quiet().await;
    }
    for addr in [a, b] {
        let mut late = Client::connect(addr).await;
        assert_eq!(subscribe_since(&mut late, "t", &epoch, 5).await, (new_epoch.clone(), seq, false));
        late.assert_quiet().await;
    }
}

/// `GET /readyz`'s status.
async fn readyz(addr: std::net::SocketAddr) -> u16 {
    http_raw(addr, "GET /readyz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n").await.0
}

/// Waits (bounded) until `/readyz` answers `status`.
async fn readyz_becomes(addr: std::net::SocketAddr, status: u16, within: Duration, what: &str) {
    let started = Instant::now();
    loop {
        let now = readyz(addr).await;
        if now == status {
            return;
        }
        assert!(started.elapsed() < within, "{what}: /readyz still answers {now}, not {status}");
        // The poll interval, not a wait for an event.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A node that cannot reach Redis is not ready (a balancer stops sending it
/// clients) yet keeps its subscribers; once Redis is back it is ready again.
#[tokio::test]
async fn readyz_answers_503_while_redis_is_unreachable() {
    let mut redis = RedisServer::start().await;
    let nodes = start_nodes(&redis, 1).await;
    let addr = nodes[0].addr();
    readyz_becomes(addr, 200, WAIT, "with Redis up").await;
    let mut sub = Client::connect(addr).await;
    subscribe(&mut sub, "t").await;
    redis.kill();
    readyz_becomes(addr, 503, REFUSED_WITHIN, "with Redis down").await;
    sub.assert_quiet_tolerating_presence().await;
    redis.restart().await;
    readyz_becomes(addr, 200, BACK_WITHIN, "with Redis back").await;
}

/// Redis dies and comes back from its append-only file: nothing is lost.
/// The epoch stays, seqs go on without a gap, live subscribers get no reset,
/// and a client that left before the outage recovers exactly on another node.
#[tokio::test]
async fn redis_restarted_with_persistence_loses_nothing() {
    let mut redis = RedisServer::start_persistent().await;
    let nodes = start_nodes(&redis, 2).await;
    let (a, b) = (nodes[0].addr(), nodes[1].addr());
    let mut sub = Client::connect(a).await;
    let (epoch, _) = subscribe(&mut sub, "t").await;
    let mut leaver = Client::connect(a).await;
    assert_eq!(subscribe(&mut leaver, "t").await.0, epoch);
    let mut publisher = Client::connect(b).await;
    for i in 1..=5 {
        publisher.publish("t", json!(i), i).await;
    }
    assert_eq!(seqs(&messages(&mut sub, "t", 5).await), vec![1, 2, 3, 4, 5]);
    assert_eq!(seqs(&messages(&mut leaver, "t", 3).await), vec![1, 2, 3]);
    drop(leaver);

    redis.kill();
    // Proves the node saw the outage; the refused publish took no seq.
    publish_refused(&mut publisher, "t", 100).await;
    redis.restart().await;

    assert_eq!(publish_when_up(&mut publisher, "t", json!(6), 6).await, 6, "no seq lost or reused");
    assert_eq!(messages(&mut sub, "t", 1).await, vec![(6, json!(6))], "no reset, nothing missed, nothing twice");
    sub.assert_quiet().await;
    let mut back = Client::connect(b).await;
    assert_eq!(subscribe_since(&mut back, "t", &epoch, 3).await, (epoch, 6, true));
    assert_eq!(messages(&mut back, "t", 3).await, (4..=6).map(|i| (i, json!(i))).collect::<Vec<_>>());
    back.assert_quiet().await;
}

/// Every node's Redis pub/sub connection (how it hears other nodes'
/// publications) is closed, again and again, each time right before a burst
/// of publishes: whatever a node missed while reconnecting it reads back
/// from Redis history, so its subscribers get every message, in order,
/// none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_whose_pubsub_connection_drops_catch_up_from_history() {
    const ROUNDS: u64 = 8;
    const BURST: u64 = 25;
    let redis = RedisServer::start().await;
    let nodes = start_nodes(&redis, 2).await;
    let mut subs = vec![];
    for node in &nodes {
        let mut sub = Client::connect(node.addr()).await;
        subscribe(&mut sub, "t").await;
        subs.push(sub);
    }
    let mut publisher = Client::connect(nodes[1].addr()).await;
    let mut next = 1;
    for round in 0..ROUNDS {
        // Each node has its pub/sub connection again (from the round before),
        // so that this round's kill cuts every one of them.
        let deadline = Instant::now() + BACK_WITHIN;
        while redis.pubsub_clients() < nodes.len() {
            assert!(Instant::now() < deadline, "round {round}: the nodes did not resubscribe to Redis");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(redis.kill_pubsub_clients() >= nodes.len() as u64, "round {round}");
        for _ in 0..BURST {
            publisher.send(json!({"type": "publish", "topic": "t", "data": next, "ack": next})).await;
            next += 1;
        }
        for ack in next - BURST..next {
            match publisher.recv().await {
                ServerFrame::Ack { ack: a, seq } => assert_eq!((a, seq), (ack, ack)),
                other => panic!("round {round}: expected ack {ack}, got {other:?}"),
            }
        }
    }
    let total = ROUNDS * BURST;
    for (n, sub) in subs.iter_mut().enumerate() {
        let got = messages(sub, "t", total).await;
        assert_eq!(got, (1..=total).map(|i| (i, json!(i))).collect::<Vec<_>>(), "node {n}: exact and in order");
        sub.assert_quiet().await;
    }
}

/// Presence spans the cluster: a list asked on any node names the topic's
/// subscribers on every node, joins and leaves reach other nodes, and the
/// peers of a node killed with SIGKILL (which could not say goodbye) drop
/// out of the lists within the presence TTL.
#[tokio::test]
async fn presence_is_cluster_wide_and_a_killed_nodes_peers_expire() {
    let redis = RedisServer::start().await;
    let mut nodes = start_nodes(&redis, 3).await;
    let mut watcher = Client::connect(nodes[0].addr()).await;
    watcher.send(json!({"type": "subscribe", "topic": "room", "presence": true})).await;
    assert!(matches!(watcher.recv().await, ServerFrame::Subscribed { .. }));
    let mut on_b = Client::connect(nodes[1].addr()).await;
    on_b.subscribe("room").await;
    let mut on_c = Client::connect(nodes[2].addr()).await;
    on_c.subscribe("room").await;
    // Two joins from two other nodes: in either order, since nothing orders
    // what two nodes publish.
    let mut joined = vec![];
    for _ in 0..2 {
        match watcher.recv().await {
            ServerFrame::Join { topic, who } if topic.as_str() == "room" => joined.push(who.peer),
            other => panic!("expected a join from another node, got {other:?}"),
        }
    }
    assert_eq!(sorted(joined), sorted(vec![on_b.peer.clone(), on_c.peer.clone()]));
    let everyone = sorted(vec![watcher.peer.clone(), on_b.peer.clone(), on_c.peer.clone()]);
    assert_eq!(everyone.windows(2).filter(|w| w[0] == w[1]).count(), 0, "peer ids are unique across nodes");
    for (n, client) in [&mut watcher, &mut on_b, &mut on_c].into_iter().enumerate() {
        presence_becomes(client, "room", &everyone, WAIT, &format!("the list asked on node {n}")).await;
    }

    let b_peer = on_b.peer.clone();
    drop(on_b);
    match watcher.recv().await {
        ServerFrame::Leave { topic, who } => assert_eq!((topic.as_str(), who.peer), ("room", b_peer)),
        other => panic!("expected the leave from node b, got {other:?}"),
    }
    let left = sorted(vec![watcher.peer.clone(), on_c.peer.clone()]);
    presence_becomes(&mut watcher, "room", &left, WAIT, "after the leave").await;

    nodes[2].kill9();
    // The TTL plus room for a loaded machine; a node that keeps dead peers
    // forever fails here rather than passing late.
    let only = [watcher.peer.clone()];
    presence_becomes(&mut watcher, "room", &only, PRESENCE_TTL + Duration::from_secs(5), "after the kill").await;
}

/// One peer's joins and leaves reach another node in the order they
/// happened, however fast they follow each other: the list there ends
/// without it, and no late join brings it back.
#[tokio::test]
async fn a_peers_joins_and_leaves_reach_other_nodes_in_order() {
    let redis = RedisServer::start().await;
    let nodes = start_nodes(&redis, 2).await;
    let mut watcher = Client::connect(nodes[0].addr()).await;
    watcher.send(json!({"type": "subscribe", "topic": "room", "presence": true})).await;
    assert!(matches!(watcher.recv().await, ServerFrame::Subscribed { .. }));
    let mut flicker = Client::connect(nodes[1].addr()).await;
    const TIMES: usize = 20;
    // Back to back, without waiting for the answers: the node sees the
    // frames one after the other, as fast as the socket brings them.
    for _ in 0..TIMES {
        flicker.send(json!({"type": "subscribe", "topic": "room"})).await;
        flicker.send(json!({"type": "unsubscribe", "topic": "room"})).await;
    }
    for i in 0..2 * TIMES {
        match watcher.recv().await {
            ServerFrame::Join { who, .. } if i % 2 == 0 => assert_eq!(who.peer, flicker.peer, "join {i}"),
            ServerFrame::Leave { who, .. } if i % 2 == 1 => assert_eq!(who.peer, flicker.peer, "leave {i}"),
            other => panic!("event {i} of the alternating joins and leaves: got {other:?}"),
        }
    }
    let only = [watcher.peer.clone()];
    presence_becomes(&mut watcher, "room", &only, WAIT, "after the last leave").await;
}

/// A rolling restart: SIGTERM closes a node's peers with 1012 (service
/// restart) and the node exits cleanly; the client reconnects to another
/// node with its `since` and, with what it got before the close, has every
/// message published before and during its move: in order, none twice.
#[tokio::test]
async fn rolling_restart_closes_with_1012_and_the_client_loses_nothing() {
    let redis = RedisServer::start().await;
    let mut nodes = start_nodes(&redis, 2).await;
    let b = nodes[1].addr();
    let mut sub = Client::connect(nodes[0].addr()).await;
    let (epoch, _) = subscribe(&mut sub, "t").await;
    let mut publisher = Client::connect(b).await;
    for i in 1..=50 {
        publisher.publish("t", json!(i), i).await;
    }

    nodes[0].sigterm();
    let (before, close) = seqs_until_close(&mut sub, "t").await;
    let close = close.expect("a close frame");
    assert_eq!(u16::from(close.code), 1012, "service restart: {close:?}");
    assert_contiguous(&before, 1, "before the close");
    let status = nodes[0].wait_exit().await;
    assert!(status.success(), "the draining node exits cleanly: {status}");
    for i in 51..=80 {
        publisher.publish("t", json!(i), i).await;
    }

    let last = before.last().copied().unwrap_or(0);
    let mut back = Client::connect(b).await;
    assert_eq!(subscribe_since(&mut back, "t", &epoch, last).await, (epoch, 80, true));
    let got = messages(&mut back, "t", 80 - last).await;
    assert_eq!(got, (last + 1..=80).map(|i| (i, json!(i))).collect::<Vec<_>>());
    back.assert_quiet().await;
}

/// The harness the tests above stand on: a private Redis keeps what it
/// acknowledged across a SIGKILL and restart only with persistence, comes
/// back on the same port, and leaves no directory behind.
#[tokio::test]
async fn the_test_redis_keeps_data_across_a_restart_only_with_persistence() {
    for persistent in [false, true] {
        let mut redis = if persistent { RedisServer::start_persistent().await } else { RedisServer::start().await };
        let (port, dir) = (redis.port(), redis.dir().to_owned());
        assert_eq!(redis.command(&["SET", "k", "v"]), "+OK");
        redis.kill();
        redis.restart().await;
        assert_eq!(redis.port(), port);
        let expected = if persistent { "v" } else { "$-1" };
        // A missing key is the null bulk string, `$-1`, which reply() returns as its line.
        assert_eq!(redis.command(&["GET", "k"]), expected, "persistent: {persistent}");
        drop(redis);
        assert!(!dir.exists(), "{dir:?} is deleted with its server");
    }
}
