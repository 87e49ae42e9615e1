//! Recovery as a property: random publishes interleaved with random drops and
//! reconnects of random subscribers, over real sockets. Every subscriber must
//! end with exactly the published sequence of each of its topics whenever its
//! gap stayed inside the history window, and must have been told
//! `recovered:false` exactly when it did not. Every test runs on both
//! engines: `memory::…` and `redis::…` (a private redis-server of its own).

mod common;

use std::collections::{BTreeMap, HashMap};

use common::{redis::Engine, *};
use crosswire_shared::{ServerFrame, Since};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;

const HISTORY: usize = 12;
const TOPICS: [&str; 3] = ["alpha", "beta", "gamma"];

struct Sub {
    client: Option<Client>,
    topics: Vec<&'static str>,
    /// Per topic: epoch and every seq received, in arrival order.
    seen: HashMap<&'static str, (String, Vec<u64>)>,
    /// Messages queued for this connection but not read yet.
    unread: usize,
    /// Per topic: the seq ranges lost to unrecoverable gaps.
    lost: HashMap<&'static str, Vec<(u64, u64)>>,
}

impl Sub {
    async fn read_one(&mut self) {
        let frame = self.client.as_mut().unwrap().recv().await;
        let (topic, seq) = match &frame {
            ServerFrame::Message { topic, seq, .. } => (topic.as_str(), *seq),
            other => panic!("expected a message, got {other:?}"),
        };
        let topic = TOPICS.into_iter().find(|t| *t == topic).unwrap();
        self.seen.get_mut(topic).unwrap().1.push(seq);
    }

    async fn drain(&mut self) {
        while self.unread > 0 {
            self.read_one().await;
            self.unread -= 1;
        }
    }

    /// (Re)subscribes every topic, with `since` where it has one; returns how
    /// many replayed messages to expect per topic.
    async fn subscribe_all(&mut self, addr: std::net::SocketAddr, current: &BTreeMap<&str, u64>) {
        let mut client = Client::connect(addr).await;
        for topic in self.topics.clone() {
            let since = self
                .seen
                .get(topic)
                .map(|(epoch, seqs)| Since { epoch: epoch.clone(), seq: seqs.last().copied().unwrap_or(0) });
            client.send(json!({"type": "subscribe", "topic": topic, "since": since})).await;
            let (epoch, seq, recovered) = match client.recv().await {
                ServerFrame::Subscribed { epoch, seq, recovered, .. } => (epoch, seq, recovered),
                other => panic!("expected subscribed, got {other:?}"),
            };
            assert_eq!(seq, current[topic], "subscribed reports the topic's last seq");
            let entry = self.seen.entry(topic).or_insert_with(|| (epoch.clone(), vec![]));
            let last = entry.1.last().copied().unwrap_or(0);
            let missed = (seq - last) as usize;
            match since {
                Some(_) => {
                    let expected = missed <= HISTORY;
                    assert_eq!(recovered, expected, "{topic}: missed {missed}, window {HISTORY}");
                    if recovered {
                        // Exactly the missed messages, in order, right now.
                        for _ in 0..missed {
                            let frame = client.recv().await;
                            match frame {
                                ServerFrame::Message { seq, topic: t, .. } if t.as_str() == topic => entry.1.push(seq),
                                other => panic!("expected replay of {topic}, got {other:?}"),
                            }
                        }
                    } else {
                        self.lost.entry(topic).or_default().push((last + 1, seq));
                    }
                }
                None => assert!(!recovered),
            }
        }
        self.client = Some(client);
    }
}

async fn run(engine: &Engine, seed: u64, steps: usize) -> (usize, usize) {
    let mut config = engine.config();
    config.history_size = HISTORY;
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut publisher = Client::connect(addr).await;
    let mut current: BTreeMap<&str, u64> = TOPICS.iter().map(|t| (*t, 0)).collect();
    let mut subs = vec![];
    for _ in 0..5 {
        let topics: Vec<_> = TOPICS.into_iter().filter(|_| rng.random_bool(0.6)).collect();
        let mut sub = Sub { client: None, topics, seen: HashMap::new(), unread: 0, lost: HashMap::new() };
        sub.subscribe_all(addr, &current).await;
        subs.push(sub);
    }
    let (mut recoveries, mut gaps) = (0, 0);
    for step in 0..steps {
        let roll = rng.random_range(0..100);
        if roll < 70 {
            let topic = TOPICS[rng.random_range(0..TOPICS.len())];
            let seq = publisher.publish(topic, json!({"step": step}), step as u64).await;
            *current.get_mut(topic).unwrap() += 1;
            assert_eq!(seq, current[topic]);
            for sub in subs.iter_mut().filter(|s| s.client.is_some() && s.topics.contains(&topic)) {
                sub.unread += 1;
            }
        } else if roll < 80 {
            let pick = rng.random_range(0..subs.len());
            let sub = &mut subs[pick];
            if sub.client.is_some() {
                sub.drain().await;
            }
        } else if roll < 90 {
            // Drop a connection abruptly, possibly with messages still unread.
            let pick = rng.random_range(0..subs.len());
            let sub = &mut subs[pick];
            if let Some(client) = sub.client.take() {
                let keep = rng.random_range(0..=sub.unread);
                sub.client = Some(client);
                for _ in 0..keep {
                    sub.read_one().await;
                }
                sub.unread = 0;
                drop(sub.client.take());
            }
        } else {
            let pick = rng.random_range(0..subs.len());
            let sub = &mut subs[pick];
            if sub.client.is_none() {
                let before: usize = sub.lost.values().map(Vec::len).sum();
                sub.subscribe_all(addr, &current).await;
                let after: usize = sub.lost.values().map(Vec::len).sum();
                let with_since = sub.topics.iter().filter(|t| sub.seen.contains_key(*t)).count();
                gaps += after - before;
                recoveries += with_since - (after - before);
            }
        }
    }
    // Bring everyone back and read everything.
    for sub in &mut subs {
        if sub.client.is_none() {
            let before: usize = sub.lost.values().map(Vec::len).sum();
            sub.subscribe_all(addr, &current).await;
            gaps += sub.lost.values().map(Vec::len).sum::<usize>() - before;
        }
        sub.drain().await;
        sub.client.as_mut().unwrap().assert_quiet().await;
    }
    for (i, sub) in subs.iter().enumerate() {
        for topic in &sub.topics {
            let seqs = &sub.seen[topic].1;
            let lost = sub.lost.get(topic).cloned().unwrap_or_default();
            let expected: Vec<u64> =
                (1..=current[topic]).filter(|s| !lost.iter().any(|(a, b)| (a..=b).contains(&s))).collect();
            assert_eq!(seqs, &expected, "seed {seed}, subscriber {i}, topic {topic}: exact, ordered, no duplicates");
            if lost.is_empty() {
                assert_eq!(seqs.len() as u64, current[topic], "nothing lost inside the window");
            }
        }
    }
    (recoveries, gaps)
}

async fn no_message_is_lost_or_duplicated_across_reconnects(engine: Engine) {
    let (mut recoveries, mut gaps) = (0, 0);
    let mut engine = engine;
    for seed in [1, 2, 3, 4, 5, 6] {
        let (r, g) = run(&engine, seed, 400).await;
        recoveries += r;
        gaps += g;
        // Each seed starts from no topics at all: with Redis, a Redis of its own.
        if seed < 6 {
            engine = engine.fresh().await;
        }
    }
    // The seeds exercise both outcomes, or the property proved nothing.
    assert!(recoveries > 10, "recovered resubscribes: {recoveries}");
    assert!(gaps > 0, "unrecoverable gaps: {gaps}");
}

async fn publishes_during_the_replay_are_neither_lost_nor_duplicated(engine: Engine) {
    let mut config = engine.config();
    config.history_size = 200;
    // The subscriber reads nothing until both publishers are done.
    config.outbound_queue = 512;
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    let mut sub = Client::connect(addr).await;
    let epoch = match sub.subscribe("busy").await {
        ServerFrame::Subscribed { epoch, .. } => epoch,
        _ => unreachable!(),
    };
    drop(sub);
    let mut publisher = Client::connect(addr).await;
    for i in 1..=150u64 {
        publisher.send(json!({"type": "publish", "topic": "busy", "data": i})).await;
    }
    publisher.ping(0).await;
    // Resubscribe while a second publisher keeps publishing concurrently.
    let mut other = Client::connect(addr).await;
    let background = tokio::spawn(async move {
        for i in 151..=300u64 {
            other.send(json!({"type": "publish", "topic": "busy", "data": i})).await;
        }
        other.ping(1).await;
    });
    let mut sub = Client::connect(addr).await;
    sub.send(json!({"type": "subscribe", "topic": "busy", "since": {"epoch": epoch, "seq": 0}})).await;
    assert!(matches!(sub.recv().await, ServerFrame::Subscribed { recovered: true, .. }));
    background.await.unwrap();
    let mut seqs = vec![];
    for _ in 0..300 {
        seqs.push(message_data(&sub.recv().await).0);
    }
    assert_eq!(seqs, (1..=300).collect::<Vec<_>>());
    sub.assert_quiet().await;
}

/// A client behind on many busy topics resubscribes to all of them with
/// `since` at once (as the browser client does on reconnect): it gets every
/// missed message of each, in order, with `recovered:true`, and is not cut
/// as a slow consumer for it. The replay is what it asked for, not a backlog.
async fn recovery_is_exact_for_every_topic_at_once(engine: Engine) {
    const TOPICS: u64 = 10;
    const MISSED: u64 = 150;
    let mut config = engine.config();
    // Far less than one topic's replay, let alone ten.
    config.outbound_queue = 64;
    config.max_queue_bytes = 256 * 1024;
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    let topic = |t: u64| format!("room{t}");
    let mut sub = Client::connect(addr).await;
    let mut epochs = vec![];
    for t in 0..TOPICS {
        match sub.subscribe(&topic(t)).await {
            ServerFrame::Subscribed { epoch, .. } => epochs.push(epoch),
            _ => unreachable!(),
        }
    }
    drop(sub);
    let mut publisher = Client::connect(addr).await;
    let blob = "r".repeat(8 * 1024);
    for i in 1..=MISSED {
        for t in 0..TOPICS {
            publisher.send(json!({"type": "publish", "topic": topic(t), "data": {"i": i, "blob": blob}})).await;
        }
    }
    publisher.ping(0).await;
    // 10 x 150 x 8 KiB = 12 MiB of replay, all requested before reading any.
    let mut back = Client::connect(addr).await;
    for (t, epoch) in epochs.iter().enumerate() {
        back.send(json!({"type": "subscribe", "topic": topic(t as u64), "since": {"epoch": epoch, "seq": 0}})).await;
    }
    let mut seqs: Vec<Vec<u64>> = vec![vec![]; TOPICS as usize];
    let mut recovered = 0;
    while recovered < TOPICS || seqs.iter().any(|s| (s.len() as u64) < MISSED) {
        match back.recv().await {
            ServerFrame::Subscribed { recovered: r, seq, .. } => {
                assert!(r, "every topic's history still holds all it missed");
                assert_eq!(seq, MISSED);
                recovered += 1;
            }
            ServerFrame::Message { topic, seq, .. } => {
                let t: usize = topic.as_str().trim_start_matches("room").parse().unwrap();
                seqs[t].push(seq);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    for (t, s) in seqs.iter().enumerate() {
        assert_eq!(s, &(1..=MISSED).collect::<Vec<_>>(), "topic {t}: exact and in order");
    }
    back.assert_quiet().await;
    assert!(server.handle().peers().iter().all(|p| !p.closing), "nobody was cut for recovering");
}

/// Subscribing again with `since` while subscribed replays what is retained
/// after `since` (as a fresh subscribe would), then live messages go on: a
/// client that saw a gap it did not cause recovers it this way, and drops
/// the replayed seqs it already has.
async fn subscribing_again_with_since_replays_after_it(engine: Engine) {
    let server = start_pubsub(engine.config()).await;
    let addr = server.local_addr();
    let mut sub = Client::connect(addr).await;
    let epoch = match sub.subscribe("t").await {
        ServerFrame::Subscribed { epoch, .. } => epoch,
        _ => unreachable!(),
    };
    let mut publisher = Client::connect(addr).await;
    for i in 1..=5 {
        publisher.publish("t", json!(i), i).await;
    }
    for expected in 1..=5 {
        assert_eq!(message_data(&sub.recv().await).0, expected);
    }
    sub.send(json!({"type": "subscribe", "topic": "t", "since": {"epoch": epoch, "seq": 2}})).await;
    match sub.recv().await {
        ServerFrame::Subscribed { recovered, seq, .. } => assert_eq!((recovered, seq), (true, 5)),
        other => panic!("expected subscribed, got {other:?}"),
    }
    for expected in 3..=5 {
        assert_eq!(message_data(&sub.recv().await).0, expected, "the replay");
    }
    publisher.publish("t", json!(6), 6).await;
    assert_eq!(message_data(&sub.recv().await).0, 6, "still subscribed, once");
    sub.assert_quiet().await;
    let peers = server.handle().peers();
    assert_eq!(peers.iter().find(|p| p.id == sub.peer).unwrap().topics.len(), 1);
}

/// A publisher's ack is queued before any later message of the topic, so a
/// client can always tell its own seq (never echoed live) from a gap.
async fn the_ack_comes_before_any_later_message(engine: Engine) {
    let server = start_pubsub(engine.config()).await;
    let addr = server.local_addr();
    let mut a = Client::connect(addr).await;
    a.subscribe("t").await;
    let mut b = Client::connect(addr).await;
    b.subscribe("t").await;
    // Both publish as fast as they can; each must see a gapless sequence of
    // the other's messages and its own acks, in seq order.
    for i in 0..200u64 {
        a.send(json!({"type": "publish", "topic": "t", "data": i, "ack": i})).await;
        b.send(json!({"type": "publish", "topic": "t", "data": i, "ack": i})).await;
    }
    for client in [&mut a, &mut b] {
        let mut seen = vec![];
        while seen.len() < 400 {
            match client.recv().await {
                ServerFrame::Message { seq, .. } | ServerFrame::Ack { seq, .. } => seen.push(seq),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seen, (1..=400).collect::<Vec<_>>(), "acks and messages interleave in seq order");
    }
}

crate::on_both_engines!(
    no_message_is_lost_or_duplicated_across_reconnects,
    publishes_during_the_replay_are_neither_lost_nor_duplicated,
    recovery_is_exact_for_every_topic_at_once,
    subscribing_again_with_since_replays_after_it,
    the_ack_comes_before_any_later_message(flavor = "multi_thread", worker_threads = 2),
);
