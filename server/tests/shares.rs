//! Fair shares of the topic table, tried as an attacker would: one address
//! (many connections), or one user (many addresses), grabbing fresh topics,
//! and what another address can still do meanwhile. Second addresses are
//! other loopback addresses (127.0.0.2, …), which the server on 127.0.0.1
//! accepts; every assertion is on the server's own accounting.

mod common;

use std::net::{IpAddr, SocketAddr};

use common::*;
use crosswire_server::{Hooks, HttpResponse, Message, Peer, ServerConfig, ServerHandle, UpgradeRequest};
use crosswire_shared::{ErrorCode, ServerFrame, Topic};
use serde_json::json;
use tokio_tungstenite::MaybeTlsStream;

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// A protocol client whose connection comes from `from` (a loopback
/// address), to `/_ws{query}`.
async fn connect_from(addr: SocketAddr, from: IpAddr, query: &str) -> Client {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).expect("binds a loopback address");
    connect_socket(addr, socket, query).await
}

/// Subscribes to `topic`: `Ok` once subscribed, or the error frame's code and message.
async fn try_subscribe(client: &mut Client, topic: &str) -> Result<(), (ErrorCode, String)> {
    client.send(json!({"type": "subscribe", "topic": topic})).await;
    match client.recv().await {
        ServerFrame::Subscribed { topic: t, .. } if t.as_str() == topic => Ok(()),
        ServerFrame::Error { code, message, topic: Some(t), .. } if t.as_str() == topic => Err((code, message)),
        other => panic!("expected subscribed or error for {topic}, got {other:?}"),
    }
}

fn shares_config(max_topics: usize, share: usize) -> ServerConfig {
    ServerConfig { max_topics, max_topics_per_ip: share, ..config() }
}

async fn settled(handle: &ServerHandle, from: IpAddr, held: usize) {
    wait_until(&format!("{from} holds {held} topics"), || handle.topics_held_by_ip(from) == held).await;
}

/// One address with many connections subscribing to fresh topics is
/// refused at its share (a topic held by several of its connections
/// counting once); another address then creates its first topics; the
/// share comes back on unsubscribe, on a failed subscribe, and on disconnect.
#[tokio::test]
async fn one_address_is_held_to_its_share_and_another_still_creates_topics() {
    let server = start_pubsub(ServerConfig { max_topics_per_peer: 4, ..shares_config(100, 10) }).await;
    let (addr, handle) = (server.local_addr(), server.handle());
    let mut grabbers = Vec::new();
    let mut refused = Vec::new();
    for c in 0..5 {
        let mut client = connect_from(addr, ip(1), "").await;
        for n in 0..4 {
            if let Err(e) = try_subscribe(&mut client, &format!("grab{c}-{n}")).await {
                refused.push(e);
            }
        }
        grabbers.push(client);
    }
    assert_eq!(handle.topics_held_by_ip(ip(1)), 10);
    assert_eq!(refused.len(), 10);
    for (code, message) in &refused {
        assert_eq!(*code, ErrorCode::TopicLimit);
        assert_eq!(message, "this address holds as many topics as one address may (10)");
    }
    // A topic the address holds already costs it nothing more.
    let mut again = connect_from(addr, ip(1), "").await;
    try_subscribe(&mut again, "grab0-0").await.unwrap();
    assert_eq!(handle.topics_held_by_ip(ip(1)), 10);

    let mut other = connect_from(addr, ip(2), "").await;
    for n in 0..3 {
        try_subscribe(&mut other, &format!("mine{n}")).await.unwrap();
    }
    assert_eq!(handle.topics_held_by_ip(ip(2)), 3);

    // Unsubscribing gives a topic back, unless another connection of the
    // address still holds it.
    grabbers[0].send(json!({"type": "unsubscribe", "topic": "grab0-0"})).await;
    grabbers[0].recv().await;
    assert_eq!(handle.topics_held_by_ip(ip(1)), 10, "`again` still holds grab0-0");
    grabbers[0].send(json!({"type": "unsubscribe", "topic": "grab0-1"})).await;
    grabbers[0].recv().await;
    assert_eq!(handle.topics_held_by_ip(ip(1)), 9);
    try_subscribe(&mut grabbers[4], "grab-late").await.unwrap();
    assert_eq!(handle.topics_held_by_ip(ip(1)), 10);

    // Leaving gives back everything.
    drop(grabbers);
    drop(again);
    settled(&handle, ip(1), 0).await;
    assert_eq!(handle.topics_held_by_ip(ip(2)), 3, "another address's topics are its own");
    drop(other);
    settled(&handle, ip(2), 0).await;
    wait_until("every peer is gone", || handle.peers().is_empty()).await;
}

/// A subscribe the engine refuses (the table is full of held topics) after
/// the share was counted gives it back.
#[tokio::test]
async fn a_subscribe_the_engine_refuses_takes_nothing_of_the_share() {
    let server = start_pubsub(shares_config(4, 3)).await;
    let (addr, handle) = (server.local_addr(), server.handle());
    let mut holder = connect_from(addr, ip(2), "").await;
    for n in 0..3 {
        try_subscribe(&mut holder, &format!("held{n}")).await.unwrap();
    }
    let mut client = connect_from(addr, ip(3), "").await;
    try_subscribe(&mut client, "mine").await.unwrap();
    assert_eq!(handle.topic_count(), 4);
    let (code, message) = try_subscribe(&mut client, "one-more").await.unwrap_err();
    assert_eq!(code, ErrorCode::TopicLimit);
    assert!(message.contains("the server holds as many topics as it may (4)"), "{message}");
    assert_eq!(handle.topics_held_by_ip(ip(3)), 1, "the refused topic was given back");
    // Once one is idle, the same subscribe succeeds, counted once.
    holder.send(json!({"type": "unsubscribe", "topic": "held0"})).await;
    holder.recv().await;
    try_subscribe(&mut client, "one-more").await.unwrap();
    assert_eq!((handle.topics_held_by_ip(ip(3)), handle.topic_count()), (2, 4));
}

/// One address holding all it may and publishing to fresh topics as fast as
/// it can (each creating a topic at the cap) does not keep another address
/// from creating its first topics.
#[tokio::test]
async fn publishing_to_fresh_topics_at_the_cap_does_not_starve_another_address() {
    let cap = 40;
    let server = start_pubsub(shares_config(cap, 10)).await;
    let (addr, handle) = (server.local_addr(), server.handle());
    let mut hog = connect_from(addr, ip(1), "").await;
    for n in 0..10 {
        try_subscribe(&mut hog, &format!("hog{n}")).await.unwrap();
    }
    assert!(try_subscribe(&mut hog, "hog-more").await.is_err());
    // Fill the rest of the table with idle topics first, then keep creating.
    let flood = tokio::spawn(async move {
        for n in 0..2_000 {
            hog.send(json!({"type": "publish", "topic": format!("fresh{n}"), "data": n})).await;
        }
        hog.ping(1).await;
        hog
    });
    wait_until("the table is full", || handle.topic_count() == cap).await;
    let mut other = connect_from(addr, ip(2), "").await;
    for n in 0..5 {
        try_subscribe(&mut other, &format!("first{n}")).await.unwrap();
        assert!(handle.topic_count() <= cap);
    }
    let mut hog = flood.await.unwrap();
    assert!(handle.topic_count() <= cap, "{} topics", handle.topic_count());
    assert_eq!((handle.topics_held_by_ip(ip(1)), handle.topics_held_by_ip(ip(2))), (10, 5));
    // The hog's flood was served, not refused: each fresh topic took an idle one's place.
    hog.publish("fresh-last", json!(1), 7).await;
}

/// With JWT, one user connecting from several addresses is held to the
/// share too; another user from the same addresses is not held to its share.
#[tokio::test]
async fn one_user_from_several_addresses_is_held_to_the_share() {
    let server = start_pubsub(ServerConfig { max_topics_per_ip: 4, ..auth_config() }).await;
    let (addr, handle) = (server.local_addr(), server.handle());
    let token =
        |sub: &str| token_with(SECRET, &json!({"sub": sub, "exp": now() + 3600, "subscribe": ["*"], "publish": ["*"]}));
    let mallory = format!("?token={}", token("mallory"));
    let mut refused = Vec::new();
    let mut clients = Vec::new();
    for a in 1..=3 {
        let mut client = connect_from(addr, ip(a), &mallory).await;
        for n in 0..2 {
            if let Err(e) = try_subscribe(&mut client, &format!("m{a}-{n}")).await {
                refused.push(e);
            }
        }
        clients.push(client);
    }
    assert_eq!(handle.topics_held_by_user("mallory"), 4);
    assert_eq!(
        refused,
        vec![(ErrorCode::TopicLimit, "this user holds as many topics as one user may (4)".to_owned()); 2]
    );
    assert_eq!(handle.topics_held_by_ip(ip(3)), 0, "the refused subscribes left no address share taken");
    let mut alice = connect_from(addr, ip(1), &format!("?token={}", token("alice"))).await;
    try_subscribe(&mut alice, "a0").await.unwrap();
    assert_eq!((handle.topics_held_by_user("alice"), handle.topics_held_by_ip(ip(1))), (1, 3));
    drop(clients);
    wait_until("mallory's topics are given back", || handle.topics_held_by_user("mallory") == 0).await;
    assert_eq!(handle.topics_held_by_user("alice"), 1);
}

/// Raw hooks: a text `sub NAME` subscribes with [`Peer::subscribe`], `unsub
/// NAME` leaves; the answer is `ok`, `already`, `left` or the error.
struct RawSubscriber;

impl Hooks for RawSubscriber {
    type Context = ();

    async fn upgrade(&self, _: &UpgradeRequest) -> Result<(), HttpResponse> {
        Ok(())
    }

    async fn message(&self, peer: &Peer<()>, message: Message) {
        let Message::Text(text) = message else { return };
        let answer = match text.split_once(' ') {
            Some(("sub", name)) => match peer.subscribe(&Topic::new(name).unwrap()) {
                Ok(true) => "ok".to_owned(),
                Ok(false) => "already".to_owned(),
                Err(e) => e.to_string(),
            },
            Some(("unsub", name)) => {
                peer.unsubscribe(&Topic::new(name).unwrap());
                "left".to_owned()
            }
            _ => "?".to_owned(),
        };
        let _ = peer.send(answer);
    }
}

async fn ask(client: &mut Client, what: &str) -> String {
    client.send_text(what).await;
    client.recv_text().await
}

/// The hooks API's own `Peer::subscribe` is held to the share as well.
#[tokio::test]
async fn raw_subscribes_of_the_hooks_api_are_held_to_the_share() {
    let server = start_with(shares_config(100, 2), RawSubscriber).await;
    let (addr, handle) = (server.local_addr(), server.handle());
    let raw = |from| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(from, 0)).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let (ws, _) =
            tokio_tungstenite::client_async(format!("ws://{addr}/_ws"), MaybeTlsStream::Plain(stream)).await.unwrap();
        Client { ws, peer: String::new() }
    };
    let (mut a, mut b) = (raw(ip(1)).await, raw(ip(1)).await);
    assert_eq!(ask(&mut a, "sub t1").await, "ok");
    assert_eq!(ask(&mut b, "sub t1").await, "ok");
    assert_eq!(ask(&mut a, "sub t1").await, "already");
    assert_eq!(ask(&mut b, "sub t2").await, "ok");
    assert_eq!(ask(&mut a, "sub t3").await, "this address holds as many topics as one address may (2)");
    assert_eq!(handle.topics_held_by_ip(ip(1)), 2);
    assert_eq!(ask(&mut b, "unsub t2").await, "left");
    assert_eq!(ask(&mut a, "sub t3").await, "ok");
    let mut c = raw(ip(2)).await;
    assert_eq!(ask(&mut c, "sub t4").await, "ok");
    drop((a, b));
    settled(&handle, ip(1), 0).await;
    assert_eq!(handle.topics_held_by_ip(ip(2)), 1);
}

/// Behind a trusted proxy, the share is the forwarded client's, not the
/// proxy's: two clients through one proxy each have their own.
#[tokio::test]
async fn behind_a_trusted_proxy_the_share_is_the_forwarded_clients() {
    let config = ServerConfig { trusted_proxies: vec!["127.0.0.1/32".parse().unwrap()], ..shares_config(100, 2) };
    let server = start_pubsub(config).await;
    let (addr, handle) = (server.local_addr(), server.handle());
    let client: IpAddr = "203.0.113.7".parse().unwrap();
    let neighbour: IpAddr = "203.0.113.8".parse().unwrap();
    let mut a = connect_with(addr, "", &[("x-forwarded-for", "203.0.113.7")]).await.unwrap();
    let mut b = connect_with(addr, "", &[("x-forwarded-for", "203.0.113.7")]).await.unwrap();
    try_subscribe(&mut a, "a1").await.unwrap();
    try_subscribe(&mut b, "b1").await.unwrap();
    let (code, message) = try_subscribe(&mut a, "a2").await.unwrap_err();
    assert_eq!(
        (code, message.as_str()),
        (ErrorCode::TopicLimit, "this address holds as many topics as one address may (2)")
    );
    let mut c = connect_with(addr, "", &[("x-forwarded-for", "203.0.113.8")]).await.unwrap();
    try_subscribe(&mut c, "c1").await.unwrap();
    try_subscribe(&mut c, "c2").await.unwrap();
    assert_eq!((handle.topics_held_by_ip(client), handle.topics_held_by_ip(neighbour)), (2, 2));
    assert_eq!(handle.topics_held_by_ip(ip(1)), 0, "the proxy's own address holds nothing");
}
