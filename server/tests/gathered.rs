//! A connection's poll gathers what it publishes to one topic, message
//! after message, into one run that each subscriber gets written at once. Over
//! real sockets nothing of that shows but the cost: every subscriber gets
//! every message whole, once and in order, and a hook's sends to other
//! peers keep their place among its publishes.

mod common;

use std::sync::Mutex;

use common::*;
use crosswire_server::{Hooks, HttpResponse, Message, Peer, UpgradeRequest};
use crosswire_shared::{ServerFrame, Topic};
use futures_util::SinkExt;
use serde_json::json;

/// Publishes to two topics, several messages per read, from one client:
/// subscribers of either or both get each topic's messages in seq order,
/// and those of both get them in the order they were published.
#[tokio::test]
async fn a_burst_read_in_one_poll_reaches_every_subscriber_whole_and_in_order() {
    let server = start_pubsub(config()).await;
    let mut publisher = Client::connect(server.local_addr()).await;
    let mut only_t = Client::connect(server.local_addr()).await;
    only_t.subscribe("t").await;
    let mut both = Client::connect(server.local_addr()).await;
    both.subscribe("t").await;
    both.subscribe("u").await;

    // 300 publishes in a few writes: many of them are read, and published,
    // in one poll of the publisher's connection.
    let mut published = Vec::new();
    for n in 0..300u64 {
        let topic = if n % 7 == 3 { "u" } else { "t" };
        let frame = json!({"type": "publish", "topic": topic, "data": {"n": n, "pad": "x".repeat(40)}, "ack": n});
        publisher.ws.feed(tokio_tungstenite::tungstenite::Message::text(frame.to_string())).await.unwrap();
        published.push((topic, n));
    }
    publisher.ws.flush().await.unwrap();
    for n in 0..300u64 {
        match publisher.recv().await {
            ServerFrame::Ack { ack, .. } => assert_eq!(ack, n, "acks in order"),
            other => panic!("expected an ack, got {other:?}"),
        }
    }

    let mut next_seq = std::collections::HashMap::new();
    for (topic, n) in published.iter().copied() {
        let (seq, t, data) = topic_seq_data(&both.recv().await);
        assert_eq!((t.as_str(), data["n"].as_u64()), (topic, Some(n)), "both topics, in publish order");
        let expected = next_seq.entry(topic).or_insert(1u64);
        assert_eq!(seq, *expected, "{topic}'s seqs without a gap");
        *expected += 1;
    }
    for (n, seq) in published.iter().filter(|(topic, _)| *topic == "t").map(|(_, n)| *n).zip(1u64..) {
        let (got_seq, t, data) = topic_seq_data(&only_t.recv().await);
        assert_eq!((got_seq, t.as_str(), data["n"].as_u64()), (seq, "t", Some(n)));
    }
    both.assert_quiet().await;
    only_t.assert_quiet().await;
}

fn topic_seq_data(frame: &ServerFrame) -> (u64, String, serde_json::Value) {
    match frame {
        ServerFrame::Message { topic, seq, data, .. } => {
            (*seq, topic.to_string(), serde_json::from_str(data.get()).unwrap())
        }
        other => panic!("expected a message, got {other:?}"),
    }
}

/// Raw hooks: every peer joins `room`; a peer saying "burst" publishes 20
/// messages, sends "between" to every other peer, and publishes 20 more, all
/// in one `message` hook, so in one gathering poll.
#[derive(Default)]
struct Room {
    peers: Mutex<Vec<Peer<()>>>,
}

impl Hooks for Room {
    type Context = ();

    async fn upgrade(&self, _: &UpgradeRequest) -> Result<(), HttpResponse> {
        Ok(())
    }

    async fn open(&self, peer: &Peer<()>) {
        peer.subscribe(&Topic::new("room").unwrap()).expect("subscribes");
        self.peers.lock().unwrap().push(peer.clone());
        peer.send("ready").expect("open");
    }

    async fn message(&self, peer: &Peer<()>, _: Message) {
        let room = Topic::new("room").unwrap();
        for n in 0..20 {
            peer.publish(&room, n.to_string());
        }
        let others: Vec<Peer<()>> =
            self.peers.lock().unwrap().iter().filter(|p| p.id() != peer.id()).cloned().collect();
        for other in others {
            other.send("between").expect("open");
        }
        for n in 20..40 {
            peer.publish(&room, n.to_string());
        }
        peer.send("done").expect("open");
    }
}

#[tokio::test]
async fn a_hooks_send_to_another_peer_keeps_its_place_among_its_publishes() {
    let server = start_with(config(), Room::default()).await;
    let mut listener = Client { ws: connect_raw(server.local_addr()).await, peer: String::new() };
    assert_eq!(listener.recv_text().await, "ready");
    let mut speaker = Client { ws: connect_raw(server.local_addr()).await, peer: String::new() };
    assert_eq!(speaker.recv_text().await, "ready");
    speaker.send_text("burst").await;
    assert_eq!(speaker.recv_text().await, "done", "the speaker gets none of its own publishes");
    let mut expected: Vec<String> = (0..20).map(|n| n.to_string()).collect();
    expected.push("between".into());
    expected.extend((20..40).map(|n| n.to_string()));
    for want in expected {
        assert_eq!(listener.recv_text().await, want);
    }
}
