//! Built-in authentication, per-topic permissions, the Origin check and the
//! per-peer and per-address limits, over real sockets.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use crosswire_shared::{close_code, ErrorCode, ServerFrame, TopicPattern};
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Message};

fn token(sub: &str, extra: Value) -> String {
    let mut claims = json!({"sub": sub, "exp": now() + 3600});
    claims.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    token_with(SECRET, &claims)
}

/// Connects with `request` customisations; returns the HTTP status of a refusal.
async fn try_connect(addr: SocketAddr, query: &str, headers: &[(&str, &str)]) -> Result<Client, u16> {
    let mut req = format!("ws://{addr}/_ws{query}").into_client_request().unwrap();
    for (k, v) in headers {
        let name = http::HeaderName::from_bytes(k.as_bytes()).unwrap();
        req.headers_mut().insert(name, v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => {
            let mut client = Client { ws, peer: String::new() };
            if let ServerFrame::Welcome { peer, .. } = client.recv().await {
                client.peer = peer;
            }
            Ok(client)
        }
        Err(tungstenite::Error::Http(res)) => Err(res.status().as_u16()),
        Err(e) => panic!("unexpected connect error {e}"),
    }
}

#[tokio::test]
async fn bad_tokens_get_401_before_any_upgrade() {
    let server = start_pubsub(auth_config()).await;
    let addr = server.local_addr();
    let expired = token_with(SECRET, &json!({"sub": "u", "exp": now() - 3600}));
    let wrong_key = token_with("another-secret-0123456789", &json!({"sub": "u", "exp": now() + 3600}));
    let no_sub = token_with(SECRET, &json!({"exp": now() + 3600}));
    for query in ["", "?token=", "?token=not.a.jwt", "?token=garbage"] {
        assert_eq!(try_connect(addr, query, &[]).await.err(), Some(401), "{query}");
    }
    for bad in [&expired, &wrong_key, &no_sub] {
        assert_eq!(try_connect(addr, &format!("?token={bad}"), &[]).await.err(), Some(401));
    }
    assert_eq!(try_connect(addr, "", &[("authorization", &format!("Bearer {expired}"))]).await.err(), Some(401));
}

#[tokio::test]
async fn a_valid_token_works_from_query_header_or_cookie() {
    let server = start_pubsub(auth_config()).await;
    let addr = server.local_addr();
    let t = token("alice", json!({}));
    let _query = try_connect(addr, &format!("?token={t}"), &[]).await.unwrap();
    let _header = try_connect(addr, "", &[("authorization", &format!("Bearer {t}"))]).await.unwrap();
    let _cookie = try_connect(addr, "", &[("cookie", &format!("theme=dark; crosswire_token={t}"))]).await.unwrap();
    let peers = server.handle().peers();
    assert_eq!(peers.len(), 3);
    assert!(peers.iter().all(|p| p.user.as_deref() == Some("alice")));
}

#[tokio::test]
async fn a_plain_get_probe_learns_401_or_426() {
    let server = start_pubsub(auth_config()).await;
    let addr = server.local_addr();
    let probe = |query: String| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let req = format!(
            "GET /_ws{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://localhost:8080\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.to_ascii_lowercase()
    };
    let refused = probe("?token=bad".into()).await;
    assert!(refused.starts_with("http/1.1 401"), "{refused}");
    assert!(refused.contains("access-control-allow-origin: http://localhost:8080"), "{refused}");
    assert!(refused.contains("www-authenticate: bearer"));
    let accepted = probe(format!("?token={}", token("bob", json!({})))).await;
    assert!(accepted.starts_with("http/1.1 426"), "{accepted}");
}

#[tokio::test]
async fn topic_permissions_from_claims() {
    let server = start_pubsub(auth_config()).await;
    let addr = server.local_addr();
    let limited = token("carol", json!({"subscribe": ["chat:*"], "publish": ["chat:general"]}));
    let mut carol = try_connect(addr, &format!("?token={limited}"), &[]).await.unwrap();
    let root = token("root", json!({"subscribe": ["*"], "publish": ["*"]}));
    let mut admin = try_connect(addr, &format!("?token={root}"), &[]).await.unwrap();
    admin.subscribe("chat:general").await;
    admin.subscribe("admin").await;

    carol.subscribe("chat:random").await;
    carol.send(json!({"type": "subscribe", "topic": "admin"})).await;
    match carol.recv().await {
        ServerFrame::Error { code, topic, .. } => {
            assert_eq!(code, ErrorCode::Forbidden);
            assert_eq!(topic.unwrap().as_str(), "admin");
        }
        other => panic!("expected forbidden, got {other:?}"),
    }
    // The denied subscribe changed nothing: carol hears nothing from "admin".
    admin.publish("admin", json!("secret"), 1).await;
    carol.assert_quiet().await;
    assert_eq!(server.handle().peers().iter().find(|p| p.id == carol.peer).unwrap().topics.len(), 1);

    assert_eq!(carol.publish("chat:general", json!("hi"), 1).await, 1);
    assert_eq!(message_data(&admin.recv().await).2, json!("hi"));
    carol.send(json!({"type": "publish", "topic": "chat:random", "data": "nope", "ack": 2})).await;
    match carol.recv().await {
        ServerFrame::Error { code, ack, .. } => assert_eq!((code, ack), (ErrorCode::Forbidden, Some(2))),
        other => panic!("expected forbidden, got {other:?}"),
    }
    carol.send(json!({"type": "presence", "topic": "admin"})).await;
    assert!(matches!(carol.recv().await, ServerFrame::Error { code: ErrorCode::Forbidden, .. }));
    // Presence shows user ids.
    carol.send(json!({"type": "presence", "topic": "chat:general"})).await;
    match carol.recv().await {
        ServerFrame::Presence { peers, .. } => assert_eq!(peers[0].user.as_deref(), Some("root")),
        other => panic!("expected presence, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn an_expiring_token_closes_the_connection_with_4001() {
    let server = start_pubsub(auth_config()).await;
    let short = token_with(SECRET, &json!({"sub": "dave", "exp": now() + 20}));
    let mut dave = try_connect(server.local_addr(), &format!("?token={short}"), &[]).await.unwrap();
    // Paused time: the clock jumps; the server's expiry timer fires.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let close = dave.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), close_code::UNAUTHORIZED);
}

#[tokio::test]
async fn foreign_origins_get_403() {
    let mut config = config();
    config.allowed_origins = vec!["https://app.example".into()];
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    assert_eq!(try_connect(addr, "", &[("origin", "https://evil.example")]).await.err(), Some(403));
    assert!(try_connect(addr, "", &[("origin", "https://app.example")]).await.is_ok());
    assert!(try_connect(addr, "", &[("origin", "http://localhost:8080")]).await.is_ok());
    assert!(try_connect(addr, "", &[("origin", &format!("http://{addr}"))]).await.is_ok(), "same origin");
    assert!(try_connect(addr, "", &[]).await.is_ok(), "no Origin: not a browser");
}

#[tokio::test]
async fn per_peer_topic_limit() {
    let mut config = config();
    config.max_topics_per_peer = 2;
    let server = start_pubsub(config).await;
    let mut c = Client::connect(server.local_addr()).await;
    c.subscribe("a").await;
    c.subscribe("b").await;
    c.subscribe("a").await; // already subscribed: still fine
    c.send(json!({"type": "subscribe", "topic": "c"})).await;
    assert!(matches!(c.recv().await, ServerFrame::Error { code: ErrorCode::TooManyTopics, .. }));
    c.send(json!({"type": "unsubscribe", "topic": "a"})).await;
    c.recv().await;
    c.subscribe("c").await;
}

#[tokio::test]
async fn per_address_connection_limit_gets_429() {
    let mut config = config();
    config.max_connections_per_ip = 2;
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    let _a = Client::connect(addr).await;
    let b = Client::connect(addr).await;
    assert_eq!(try_connect(addr, "", &[]).await.err(), Some(429));
    drop(b);
    // The slot frees once the server has seen the close.
    for _ in 0..100 {
        if try_connect(addr, "", &[]).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the freed slot was never reusable");
}

#[tokio::test]
async fn publish_rate_limit() {
    let mut config = config();
    config.publish_rate = 1;
    config.publish_burst = 3;
    let server = start_pubsub(config).await;
    let mut c = Client::connect(server.local_addr()).await;
    for ack in 1..=5u64 {
        c.ws.send(Message::text(json!({"type": "publish", "topic": "t", "data": ack, "ack": ack}).to_string()))
            .await
            .unwrap();
    }
    let mut acks = vec![];
    let mut limited = vec![];
    for _ in 0..5 {
        match c.recv().await {
            ServerFrame::Ack { ack, .. } => acks.push(ack),
            ServerFrame::Error { code: ErrorCode::RateLimited, ack, message, .. } => {
                assert!(message.contains("retry in"), "{message}");
                limited.push(ack.unwrap());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((acks, limited), (vec![1, 2, 3], vec![4, 5]));
}

/// Expects `error` `forbidden` (for `topic`) as the next frame.
async fn forbidden(client: &mut Client, topic: &str) {
    match client.recv().await {
        ServerFrame::Error { code: ErrorCode::Forbidden, topic: Some(t), .. } => assert_eq!(t.as_str(), topic),
        other => panic!("expected forbidden for {topic}, got {other:?}"),
    }
}

/// Tries every topic operation on `topic`: subscribe, publish, history and
/// presence; returns after the last answer.
async fn try_everything(client: &mut Client, topic: &str) -> Vec<ServerFrame> {
    client.send(json!({"type": "subscribe", "topic": topic})).await;
    client.send(json!({"type": "publish", "topic": topic, "data": "x", "ack": 1})).await;
    client.send(json!({"type": "history", "topic": topic, "id": 2})).await;
    client.send(json!({"type": "presence", "topic": topic, "id": 3})).await;
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(client.recv().await);
    }
    answers
}

fn all_forbidden(answers: &[ServerFrame]) -> bool {
    answers.iter().all(|a| matches!(a, ServerFrame::Error { code: ErrorCode::Forbidden, .. }))
}

#[tokio::test]
async fn a_token_without_topic_claims_grants_no_topic() {
    let server = start_pubsub(auth_config()).await;
    let addr = server.local_addr();
    // A token signed with the same secret for some other purpose: sub and exp only.
    let bare = token_with(SECRET, &json!({"sub": "mallory", "exp": now() + 3600}));
    let mut mallory = try_connect(addr, &format!("?token={bare}"), &[]).await.expect("a valid token connects");
    let mut root =
        try_connect(addr, &format!("?token={}", token("root", json!({"subscribe": ["*"]}))), &[]).await.unwrap();
    root.subscribe("admin:secret").await;
    let answers = try_everything(&mut mallory, "admin:secret").await;
    assert!(all_forbidden(&answers), "{answers:?}");
    for topic in ["chat:x", "anything"] {
        let answers = try_everything(&mut mallory, topic).await;
        assert!(all_forbidden(&answers), "{topic}: {answers:?}");
    }
    // The server's own accounting: mallory holds no topic, and nothing was published.
    let peers = server.handle().peers();
    assert!(peers.iter().find(|p| p.id == mallory.peer).unwrap().topics.is_empty());
    root.assert_quiet().await;
    assert_eq!(
        server.handle().metrics_text().lines().find(|l| l.starts_with("crosswire_publishes_total ")),
        Some("crosswire_publishes_total 0")
    );
}

#[tokio::test]
async fn default_patterns_open_topics_to_tokens_without_the_claim() {
    let mut config = auth_config();
    config.jwt_default_subscribe = vec![TopicPattern::new("chat:*").unwrap()];
    config.jwt_default_publish = vec![TopicPattern::new("chat:lobby").unwrap()];
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    let bare = token_with(SECRET, &json!({"sub": "ann", "exp": now() + 3600}));
    let mut ann = try_connect(addr, &format!("?token={bare}"), &[]).await.unwrap();
    ann.subscribe("chat:x").await;
    ann.publish("chat:lobby", json!("hi"), 1).await;
    let answers = try_everything(&mut ann, "admin:secret").await;
    assert!(all_forbidden(&answers), "{answers:?}");
    ann.send(json!({"type": "publish", "topic": "chat:x", "data": 1, "ack": 2})).await;
    forbidden(&mut ann, "chat:x").await;

    // A claim present replaces the default (it does not add to it); the
    // other, absent, still gets its default.
    let own = token("ben", json!({"subscribe": ["news:*"]}));
    let mut ben = try_connect(addr, &format!("?token={own}"), &[]).await.unwrap();
    ben.subscribe("news:a").await;
    ben.send(json!({"type": "subscribe", "topic": "chat:x"})).await;
    forbidden(&mut ben, "chat:x").await;
    ben.publish("chat:lobby", json!("hello"), 1).await;
    let narrowed = token("cy", json!({"subscribe": [], "publish": []}));
    let mut cy = try_connect(addr, &format!("?token={narrowed}"), &[]).await.unwrap();
    let answers = try_everything(&mut cy, "chat:lobby").await;
    assert!(all_forbidden(&answers), "an empty claim narrows below the defaults: {answers:?}");

    let topics = |id: &str| server.handle().peers().into_iter().find(|p| p.id == id).unwrap().topics;
    assert_eq!(topics(&ann.peer).iter().map(|t| t.as_str()).collect::<Vec<_>>(), ["chat:x"]);
    assert_eq!(topics(&ben.peer).iter().map(|t| t.as_str()).collect::<Vec<_>>(), ["news:a"]);
    assert!(topics(&cy.peer).is_empty());
}

#[tokio::test]
async fn default_patterns_without_a_secret_are_a_config_error() {
    let mut config = config();
    config.jwt_default_subscribe = vec![TopicPattern::new("chat:*").unwrap()];
    let Err(err) = crosswire_server::Server::new(config.clone(), crosswire_server::PubSub::new(&config)).bind().await
    else {
        panic!("defaults without a secret bound a server");
    };
    assert!(err.to_string().contains("jwt_default_subscribe (--jwt-default-subscribe) needs a JWT secret"), "{err}");
}

#[tokio::test]
async fn null_topic_claims_grant_nothing() {
    let server = start_pubsub(auth_config()).await;
    let addr = server.local_addr();
    for claim in ["subscribe", "publish"] {
        let t = token("mallory", json!({ claim: null }));
        assert_eq!(try_connect(addr, &format!("?token={t}"), &[]).await.err(), Some(401), "{claim}: null");
    }
    // An empty list is a valid token that allows no topic.
    let none = token("nobody", json!({"subscribe": [], "publish": []}));
    let mut c = try_connect(addr, &format!("?token={none}"), &[]).await.unwrap();
    c.send(json!({"type": "subscribe", "topic": "t"})).await;
    assert!(matches!(c.recv().await, ServerFrame::Error { code: ErrorCode::Forbidden, .. }));
}

#[tokio::test]
async fn not_before_is_checked_with_the_expiry_leeway() {
    let server = start_pubsub(auth_config()).await;
    let addr = server.local_addr();
    let early = token("eve", json!({"nbf": now() + 120}));
    assert_eq!(try_connect(addr, &format!("?token={early}"), &[]).await.err(), Some(401));
    // Issuer clocks a little ahead are tolerated, as for exp.
    let slightly = token("eve", json!({"nbf": now() + 2}));
    assert!(try_connect(addr, &format!("?token={slightly}"), &[]).await.is_ok());
    let past = token("eve", json!({"nbf": now() - 60}));
    assert!(try_connect(addr, &format!("?token={past}"), &[]).await.is_ok());
}

#[tokio::test]
async fn an_expected_audience_is_required() {
    let mut config = auth_config();
    config.jwt_audience = Some("crosswire".into());
    let server = start_pubsub(config).await;
    let addr = server.local_addr();
    for claims in [json!({}), json!({"aud": "billing"}), json!({"aud": ["billing"]})] {
        let t = token("frank", claims.clone());
        assert_eq!(try_connect(addr, &format!("?token={t}"), &[]).await.err(), Some(401), "{claims}");
    }
    for claims in [json!({"aud": "crosswire"}), json!({"aud": ["billing", "crosswire"]})] {
        let t = token("frank", claims.clone());
        assert!(try_connect(addr, &format!("?token={t}"), &[]).await.is_ok(), "{claims}");
    }
    // Without an expected audience, a token meant for another service is refused.
    let server = start_pubsub(auth_config()).await;
    let t = token("frank", json!({"aud": "billing"}));
    assert_eq!(try_connect(server.local_addr(), &format!("?token={t}"), &[]).await.err(), Some(401));
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let server = start_pubsub(auth_config()).await;
    let addr = server.local_addr();
    let t = token("grace", json!({}));
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let value = format!("{scheme} {t}");
        assert!(try_connect(addr, "", &[("authorization", &value)]).await.is_ok(), "{scheme}");
    }
    assert_eq!(try_connect(addr, "", &[("authorization", &format!("Basic {t}"))]).await.err(), Some(401));
}
