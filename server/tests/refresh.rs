//! Refreshing a token over the open connection (`refresh`) and reading a
//! topic's retained messages without subscribing (`history`), over real sockets.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use crosswire_shared::{close_code, ErrorCode, ServerFrame};
use serde_json::{json, Value};

fn token(claims: Value) -> String {
    token_with(SECRET, &claims)
}

/// A token for `sub` until `exp` that may subscribe and publish anywhere.
fn open_token(sub: &str, exp: u64) -> String {
    token(json!({"sub": sub, "exp": exp, "subscribe": ["*"], "publish": ["*"]}))
}

async fn connect_with(addr: SocketAddr, token: &str) -> Client {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/_ws?token={token}"))
        .await
        .expect("the token is accepted");
    let mut client = Client { ws, peer: String::new() };
    match client.recv().await {
        ServerFrame::Welcome { peer, .. } => client.peer = peer,
        other => panic!("expected welcome, got {other:?}"),
    }
    client
}

/// Sends `refresh` and returns the answer.
async fn refresh(client: &mut Client, token: &str, id: u64) -> ServerFrame {
    client.send(json!({"type": "refresh", "token": token, "id": id})).await;
    client.recv().await
}

#[tokio::test(start_paused = true)]
async fn a_refreshed_token_moves_the_expiry_without_dropping_anything() {
    let server = start_pubsub(auth_config()).await;
    let addr = server.local_addr();
    let short = |sub: &str| open_token(sub, now() + 20);
    let mut alice = connect_with(addr, &short("alice")).await;
    // The control: the same kind of token, never refreshed.
    let mut bob = connect_with(addr, &short("bob")).await;
    let mut carol = connect_with(addr, &open_token("carol", now() + 3600)).await;
    alice.subscribe("room").await;
    carol.publish("room", json!(1), 1).await;
    assert_eq!(message_data(&alice.recv().await).0, 1);

    let exp = now() + 3600;
    let answer = refresh(&mut alice, &open_token("alice", exp), 7).await;
    assert!(matches!(answer, ServerFrame::Refreshed { id: Some(7), exp: Some(e) } if e == exp), "{answer:?}");

    // Paused time: the clock jumps past the first token's expiry. Bob's
    // connection ends with 4001; Alice's stays, still subscribed.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let close = bob.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), close_code::UNAUTHORIZED);
    alice.ping(1).await;
    carol.publish("room", json!(2), 2).await;
    assert_eq!(message_data(&alice.recv().await).0, 2, "no resubscribe was needed");
}

#[tokio::test]
async fn a_bad_refresh_is_refused_and_the_old_token_stays() {
    let server = start_pubsub(auth_config()).await;
    let addr = server.local_addr();
    let mut alice = connect_with(addr, &open_token("alice", now() + 3600)).await;
    let expired = token(json!({"sub": "alice", "exp": now() - 3600}));
    let someone_else = token(json!({"sub": "mallory", "exp": now() + 3600}));
    for (bad, id) in [("garbage", 1), (expired.as_str(), 2), (someone_else.as_str(), 3)] {
        match refresh(&mut alice, bad, id).await {
            ServerFrame::Error { code: ErrorCode::Unauthorized, id: Some(got), message, .. } => {
                assert_eq!(got, id, "{message}");
            }
            other => panic!("expected unauthorized, got {other:?}"),
        }
    }
    assert!(
        matches!(refresh(&mut alice, &someone_else, 4).await, ServerFrame::Error { message, .. } if message.contains("another user"))
    );
    // Still connected, with the old token's rights.
    alice.subscribe("anything").await;
    alice.assert_quiet().await;
}

#[tokio::test]
async fn narrower_permissions_end_the_subscriptions_they_no_longer_allow() {
    let server = start_pubsub(auth_config()).await;
    let addr = server.local_addr();
    let mut alice = connect_with(addr, &open_token("alice", now() + 3600)).await;
    alice.subscribe("chat:a").await;
    alice.subscribe("admin:x").await;
    let narrow = token(json!({"sub": "alice", "exp": now() + 7200, "subscribe": ["chat:*"], "publish": ["chat:*"]}));
    alice.send(json!({"type": "refresh", "token": narrow, "id": 5})).await;
    match alice.recv().await {
        ServerFrame::Error { code: ErrorCode::Forbidden, topic: Some(t), .. } => assert_eq!(t.as_str(), "admin:x"),
        other => panic!("expected the revoked subscription, got {other:?}"),
    }
    assert!(matches!(alice.recv().await, ServerFrame::Refreshed { id: Some(5), .. }));
    // The new permissions apply to what follows.
    alice.send(json!({"type": "publish", "topic": "admin:x", "data": 1, "ack": 9})).await;
    assert!(matches!(alice.recv().await, ServerFrame::Error { code: ErrorCode::Forbidden, ack: Some(9), .. }));
    let mut bob = connect_with(addr, &open_token("bob", now() + 3600)).await;
    bob.publish("admin:x", json!("secret"), 1).await;
    bob.publish("chat:a", json!("hello"), 2).await;
    let (seq, _, data) = message_data(&alice.recv().await);
    assert_eq!((seq, data), (1, json!("hello")), "admin:x is no longer delivered");
}

/// Reads the `forbidden` errors of a refresh up to its `refreshed`; returns
/// the topics they name, sorted.
async fn revoked_until_refreshed(client: &mut Client, id: u64) -> Vec<String> {
    let mut revoked = Vec::new();
    loop {
        match client.recv().await {
            ServerFrame::Error { code: ErrorCode::Forbidden, topic: Some(t), .. } => {
                revoked.push(t.as_str().to_owned())
            }
            ServerFrame::Refreshed { id: Some(got), .. } if got == id => break,
            other => panic!("expected forbidden errors then refreshed, got {other:?}"),
        }
    }
    revoked.sort();
    revoked
}

#[tokio::test]
async fn a_refresh_to_a_token_without_claims_ends_what_the_defaults_do_not_allow() {
    let mut config = auth_config();
    config.jwt_default_subscribe = vec![crosswire_shared::TopicPattern::new("chat:*").unwrap()];
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    let mut alice = connect_with(addr, &open_token("alice", now() + 3600)).await;
    for topic in ["chat:a", "admin:x", "news"] {
        alice.subscribe(topic).await;
    }
    let bare = token(json!({"sub": "alice", "exp": now() + 7200}));
    alice.send(json!({"type": "refresh", "token": bare, "id": 1})).await;
    assert_eq!(revoked_until_refreshed(&mut alice, 1).await, ["admin:x", "news"]);
    let topics = server.handle().peers().into_iter().find(|p| p.id == alice.peer).unwrap().topics;
    assert_eq!(topics.iter().map(|t| t.as_str()).collect::<Vec<_>>(), ["chat:a"]);
    // No default publish: the bare token publishes nowhere, not even where it reads.
    alice.send(json!({"type": "publish", "topic": "chat:a", "data": 1, "ack": 2})).await;
    assert!(matches!(alice.recv().await, ServerFrame::Error { code: ErrorCode::Forbidden, ack: Some(2), .. }));

    // Without defaults, a bare token keeps nothing.
    let server = start_pubsub(auth_config()).await;
    let mut bob = connect_with(server.local_addr(), &open_token("bob", now() + 3600)).await;
    bob.subscribe("chat:a").await;
    bob.subscribe("admin:x").await;
    bob.send(json!({"type": "refresh", "token": token(json!({"sub": "bob", "exp": now() + 7200})), "id": 3})).await;
    assert_eq!(revoked_until_refreshed(&mut bob, 3).await, ["admin:x", "chat:a"]);
    assert!(server.handle().peers()[0].topics.is_empty());
}

#[tokio::test]
async fn without_auth_a_refresh_is_answered_without_expiry() {
    let server = start_pubsub(config()).await;
    let mut client = Client::connect(server.local_addr()).await;
    assert!(matches!(refresh(&mut client, "anything", 3).await, ServerFrame::Refreshed { id: Some(3), exp: None }));
}

fn history_seqs(frame: &ServerFrame) -> (String, u64, Vec<u64>) {
    match frame {
        ServerFrame::History { epoch, seq, messages, .. } => {
            (epoch.clone(), *seq, messages.iter().map(|m| m.seq).collect())
        }
        other => panic!("expected history, got {other:?}"),
    }
}

#[tokio::test]
async fn history_returns_retained_messages_without_subscribing() {
    let server = start_pubsub(config()).await;
    let addr = server.local_addr();
    let mut publisher = Client::connect(addr).await;
    // History is kept once someone holds the topic's epoch.
    publisher.subscribe("news").await;
    for i in 1..=5 {
        publisher.publish("news", json!({ "n": i }), i).await;
    }
    let mut reader = Client::connect(addr).await;
    reader.send(json!({"type": "history", "topic": "news", "limit": 2, "id": 1})).await;
    let latest = reader.recv().await;
    let (epoch, seq, seqs) = history_seqs(&latest);
    assert_eq!((seq, seqs), (5, vec![4, 5]), "without since: the latest");
    let ServerFrame::History { id, messages, topic, .. } = &latest else { unreachable!() };
    assert_eq!((*id, topic.as_str()), (Some(1), "news"));
    assert_eq!(messages[1].from, publisher.peer);
    assert_eq!(messages[1].data.get(), r#"{"n":5}"#);

    reader
        .send(json!({"type": "history", "topic": "news", "since": {"epoch": epoch, "seq": 1}, "limit": 3, "id": 2}))
        .await;
    assert_eq!(history_seqs(&reader.recv().await).2, vec![2, 3, 4], "after since: the oldest first");
    reader.send(json!({"type": "history", "topic": "news", "since": {"epoch": epoch, "seq": 5}, "id": 3})).await;
    assert_eq!(history_seqs(&reader.recv().await).2, Vec::<u64>::new(), "nothing newer");

    // Reading is not subscribing: later publishes do not reach the reader.
    publisher.publish("news", json!(6), 6).await;
    reader.assert_quiet().await;
    // An unknown topic has an empty history and is not created by asking.
    reader.send(json!({"type": "history", "topic": "nothing-here", "id": 4})).await;
    assert_eq!(history_seqs(&reader.recv().await), (String::new(), 0, vec![]));
}

#[tokio::test]
async fn history_that_no_longer_reaches_is_an_error() {
    let mut config = config();
    config.history_size = 3;
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    let mut publisher = Client::connect(addr).await;
    publisher.subscribe("feed").await;
    for i in 1..=6 {
        publisher.publish("feed", json!(i), i).await;
    }
    let mut reader = Client::connect(addr).await;
    reader.send(json!({"type": "history", "topic": "feed", "id": 8})).await;
    let (epoch, _, seqs) = history_seqs(&reader.recv().await);
    assert_eq!(seqs, vec![4, 5, 6], "only three are kept");
    for since in [json!({"epoch": epoch, "seq": 1}), json!({"epoch": "another", "seq": 5})] {
        reader.send(json!({"type": "history", "topic": "feed", "since": since, "id": 9})).await;
        match reader.recv().await {
            ServerFrame::Error { code: ErrorCode::HistoryUnavailable, id: Some(9), topic: Some(t), .. } => {
                assert_eq!(t.as_str(), "feed")
            }
            other => panic!("expected history_unavailable, got {other:?}"),
        }
    }
    reader.send(json!({"type": "history", "topic": "feed", "since": {"epoch": epoch, "seq": 3}, "id": 10})).await;
    assert_eq!(history_seqs(&reader.recv().await).2, vec![4, 5, 6], "the window still reaches seq 3");
}

#[tokio::test]
async fn history_needs_the_subscribe_permission() {
    let server = start_pubsub(auth_config()).await;
    let addr = server.local_addr();
    let limited = token(json!({"sub": "alice", "exp": now() + 3600, "subscribe": ["chat:*"]}));
    let mut alice = connect_with(addr, &limited).await;
    alice.send(json!({"type": "history", "topic": "admin:log", "id": 4})).await;
    assert!(matches!(alice.recv().await, ServerFrame::Error { code: ErrorCode::Forbidden, id: Some(4), .. }));
    alice.send(json!({"type": "history", "topic": "chat:a", "id": 5})).await;
    assert!(matches!(alice.recv().await, ServerFrame::History { id: Some(5), .. }));
}

#[tokio::test]
async fn subscribing_again_without_presence_stops_join_and_leave_events() {
    // What the client does when its last presence watcher of a topic goes.
    let server = start_pubsub(config()).await;
    let addr = server.local_addr();
    let mut watcher = Client::connect(addr).await;
    watcher.send(json!({"type": "subscribe", "topic": "room", "presence": true})).await;
    assert!(matches!(watcher.recv().await, ServerFrame::Subscribed { .. }));
    let mut other = Client::connect(addr).await;
    other.subscribe("room").await;
    assert!(matches!(watcher.recv().await, ServerFrame::Join { .. }));
    watcher.send(json!({"type": "subscribe", "topic": "room"})).await;
    assert!(matches!(watcher.recv().await, ServerFrame::Subscribed { .. }));
    let mut third = Client::connect(addr).await;
    third.subscribe("room").await;
    other.send(json!({"type": "unsubscribe", "topic": "room"})).await;
    assert!(matches!(other.recv().await, ServerFrame::Unsubscribed { .. }));
    watcher.assert_quiet().await;
    // Still subscribed to the messages themselves.
    third.publish("room", json!("still here"), 1).await;
    assert_eq!(message_data(&watcher.recv().await).2, json!("still here"));
}
