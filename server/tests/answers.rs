//! Every byte queued for a peer counts, answers too, and a peer that asks
//! faster than it reads is slowed down, not given a bigger queue: tried as
//! an attacker would, over real sockets, asserting on the server's own
//! accounting (`ServerHandle::peers`, `queued_bytes`).

mod common;

use std::time::Duration;

use common::*;
use crosswire_server::{RunningServer, ServerConfig, ServerHandle};
use crosswire_shared::{ErrorCode, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// Answer bytes at which the server stops reading a peer (`outbox::ANSWER_LIMIT`).
const ANSWER_LIMIT: usize = 64 * 1024;

/// Bytes of retained frames a replay queues at a time (`topics::REPLAY_PAGE`).
const REPLAY_PAGE: usize = 256 * 1024;

/// The server-wide credit one queue may hold above what it counts: credit
/// goes in 16 KiB chunks and back once two are idle.
const SLACK: usize = 3 * 16 * 1024;

/// A server whose peers are dropped only when they really stop (a loaded
/// machine must not turn a paused test client into a write timeout).
async fn server(config: ServerConfig) -> (RunningServer, ServerHandle) {
    let config = ServerConfig { write_timeout: Duration::from_secs(120), ..config };
    let server = start_pubsub(config).await;
    let handle = server.handle();
    (server, handle)
}

/// The most bytes (its own, and the server's in all) queued for `peer` as
/// sampled now; both must stay within `bound`.
fn sample(handle: &ServerHandle, peer: &str, bound: usize, max: &mut usize) {
    let own = handle.peers().into_iter().find(|p| p.id == peer).map_or(0, |p| p.queued_bytes.max(p.answer_bytes));
    *max = (*max).max(own);
    assert!(own <= bound, "{own} bytes queued for the peer, over {bound}");
    let all = handle.queued_bytes();
    assert!(all <= bound + SLACK, "{all} bytes queued server-wide, over {bound} and the credit slack");
}

/// The peer's answer bytes now.
fn answers(handle: &ServerHandle, peer: &str) -> usize {
    handle.peers().into_iter().find(|p| p.id == peer).map_or(0, |p| p.answer_bytes)
}

/// Samples the server's accounting until `done` (every 2 ms, at most the
/// wait): the bound is checked at every sample.
async fn sample_until(
    handle: &ServerHandle,
    peer: &str,
    bound: usize,
    what: &str,
    mut done: impl FnMut(&ServerHandle) -> bool,
) -> usize {
    let mut max = 0;
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    loop {
        sample(handle, peer, bound, &mut max);
        if done(handle) {
            return max;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A connection that writes pings as fast as the socket takes them and
/// reads nothing: the server stops reading it once its pongs back up, and
/// holds the limit and one pong, not a pong per ping. Once it reads, every
/// pong comes, in order.
#[tokio::test]
async fn a_ping_flood_that_does_not_read_holds_the_answer_limit() {
    let (server, handle) = server(config()).await;
    let addr = server.local_addr();
    let running = tokio::spawn(server.run_until(std::future::pending()));
    let client = connect_small_buffer(addr).await;
    let peer = client.peer.clone();
    let (mut sink, mut stream) = client.ws.split();
    const PINGS: u64 = 400_000;
    let writer = tokio::spawn(async move {
        for id in 1..=PINGS {
            sink.feed(Message::text(format!(r#"{{"type":"ping","id":{id}}}"#))).await.expect("send");
        }
        sink.flush().await.expect("flush");
        sink
    });
    let bound = ANSWER_LIMIT + 64;
    // The server fills the socket with pongs, then stops reading.
    let max = sample_until(&handle, &peer, bound, "the pongs back up", |h| answers(h, &peer) >= ANSWER_LIMIT).await;
    assert!(max >= ANSWER_LIMIT);
    // And stays there, however much more the client has written.
    for _ in 0..200 {
        let mut max = 0;
        sample(&handle, &peer, bound, &mut max);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    // Reading now: every pong, in order, none lost.
    let mut next = 1;
    while next <= PINGS {
        let frame = tokio::time::timeout(WAIT, stream.next()).await.expect("a frame").expect("open").expect("ok");
        let Message::Text(text) = frame else { continue };
        match ServerFrame::decode(&text).unwrap() {
            ServerFrame::Pong { id: Some(id) } => {
                assert_eq!(id, next, "pongs in order");
                next += 1;
            }
            other => panic!("expected a pong, got {other:?}"),
        }
        if next % 4096 == 0 {
            let mut max = 0;
            sample(&handle, &peer, bound, &mut max);
        }
    }
    drop(writer.await.unwrap());
    running.abort();
}

/// `unsubscribe` + `subscribe` from seq 0 again and again on a topic with
/// 4 MB of history, without reading: one replay is in flight at a time,
/// queued a page at a time as the socket drains, so the server holds a page
/// and the answer limit, not a copy of the history per resubscribe. Once
/// the client reads, every replay is complete and in order.
#[tokio::test]
async fn a_resubscribe_flood_holds_one_page_of_one_replay() {
    let (server, handle) = server(config()).await;
    let addr = server.local_addr();
    let running = tokio::spawn(server.run_until(std::future::pending()));
    // A topic retains history while someone holds it: the publisher does
    // (and is not sent its own messages).
    let mut publisher = Client::connect(addr).await;
    publisher.subscribe("big").await;
    const MESSAGES: u64 = 70;
    flood(&mut publisher, "big", MESSAGES, 60_000).await;
    assert!(handle.history_bytes() >= 4_000_000);

    let mut client = connect_small_buffer(addr).await;
    let ServerFrame::Subscribed { epoch, seq, .. } = client.subscribe("big").await else { unreachable!() };
    assert_eq!(seq, MESSAGES);
    let peer = client.peer.clone();
    const RESUBSCRIBES: usize = 10;
    for _ in 0..RESUBSCRIBES {
        client.send(json!({"type": "unsubscribe", "topic": "big"})).await;
        client.send(json!({"type": "subscribe", "topic": "big", "since": {"epoch": epoch, "seq": 0}})).await;
    }
    let bound = ANSWER_LIMIT + REPLAY_PAGE + 60_000 + 1024;
    let max = sample_until(&handle, &peer, bound, "the replay backs up", |h| answers(h, &peer) >= ANSWER_LIMIT).await;
    assert!(max >= ANSWER_LIMIT);
    for _ in 0..200 {
        let mut max = 0;
        sample(&handle, &peer, bound, &mut max);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    for round in 0..RESUBSCRIBES {
        assert!(matches!(client.recv().await, ServerFrame::Unsubscribed { .. }), "round {round}");
        match client.recv().await {
            ServerFrame::Subscribed { recovered: true, seq, .. } => assert_eq!(seq, MESSAGES),
            other => panic!("round {round}: expected a recovered subscribe, got {other:?}"),
        }
        for expected in 1..=MESSAGES {
            let frame = client.recv().await;
            let (seq, _, data) = message_data(&frame);
            assert_eq!((seq, data["i"].as_u64()), (expected, Some(expected)), "round {round}: complete, in order");
        }
        let mut max = 0;
        sample(&handle, &peer, bound, &mut max);
    }
    client.assert_quiet().await;
    running.abort();
}

/// A replay to a peer that never reads: the write timeout drops it even
/// while its replay waits for the socket, and everything it held goes back.
#[tokio::test]
async fn a_replay_to_a_peer_that_never_reads_ends_with_the_write_timeout() {
    let config = ServerConfig { write_timeout: Duration::from_millis(500), ..config() };
    let server = start_pubsub(config).await;
    let handle = server.handle();
    let addr = server.local_addr();
    let running = tokio::spawn(server.run_until(std::future::pending()));
    let mut publisher = Client::connect(addr).await;
    publisher.subscribe("big").await;
    flood(&mut publisher, "big", 70, 60_000).await;
    let ServerFrame::Subscribed { epoch, .. } = publisher.subscribe("big").await else { unreachable!() };

    let mut client = connect_small_buffer(addr).await;
    let peer = client.peer.clone();
    client.send(json!({"type": "subscribe", "topic": "big", "since": {"epoch": epoch, "seq": 0}})).await;
    wait_until("the replay backs up", || answers(&handle, &peer) >= ANSWER_LIMIT).await;
    wait_until("the stalled peer is dropped", || handle.peers().iter().all(|p| p.id != peer)).await;
    publisher.assert_quiet().await;
    wait_until("its credit is given back", || handle.queued_bytes() == 0).await;
    drop(client);
    running.abort();
}

/// `history` on a topic of 100 × 60 KB, reading promptly: the asker is
/// never cut, each answer is within `--max-history-answer-bytes` and says
/// where the rest follows, and following `next` gives all 100 once, in order.
#[tokio::test]
async fn a_large_history_is_answered_in_pages() {
    let (server, handle) = server(config()).await;
    let addr = server.local_addr();
    let running = tokio::spawn(server.run_until(std::future::pending()));
    let mut publisher = Client::connect(addr).await;
    publisher.subscribe("h").await;
    const MESSAGES: u64 = 100;
    flood(&mut publisher, "h", MESSAGES, 60_000).await;
    let cap = ServerConfig::default().max_history_answer_bytes;

    let mut asker = Client::connect(addr).await;
    asker.send(json!({"type": "history", "topic": "h", "id": 1})).await;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let text = asker.recv_text().await;
        assert!(text.len() <= cap, "an answer of {} bytes, over the cap of {cap}", text.len());
        let ServerFrame::History { id, epoch, seq, messages, next, .. } = ServerFrame::decode(&text).unwrap() else {
            panic!("expected a history answer, got {text:.200}")
        };
        assert_eq!((id, seq), (Some(pages + 1), MESSAGES));
        assert!(!messages.is_empty());
        seen.extend(messages.iter().map(|m| m.seq));
        pages += 1;
        match next {
            Some(next) => {
                assert_eq!(Some(&next), seen.last(), "the next page follows the last message");
                let since = json!({"epoch": epoch, "seq": next});
                asker.send(json!({"type": "history", "topic": "h", "since": since, "id": pages + 1})).await;
            }
            None => break,
        }
    }
    assert!(pages >= 6, "{pages} pages of at most {cap} bytes for 6 MB");
    assert_eq!(seen, (1..=MESSAGES).collect::<Vec<_>>(), "all of them, once, in order");
    assert!(handle.peers().iter().all(|p| !p.closing), "nobody was cut");
    asker.assert_quiet().await;
    running.abort();
}

/// A `history` flood without reading: past the churn budget the requests
/// are refused (`rate_limited`), and what is answered backs up only to the
/// answer limit (and one answer).
#[tokio::test]
async fn a_history_flood_is_rate_limited_and_bounded() {
    let config = ServerConfig { subscribe_rate: 50, subscribe_burst: 200, ..config() };
    let (server, handle) = server(config).await;
    let addr = server.local_addr();
    let running = tokio::spawn(server.run_until(std::future::pending()));
    let mut publisher = Client::connect(addr).await;
    publisher.subscribe("h").await;
    const MESSAGES: u64 = 20;
    flood(&mut publisher, "h", MESSAGES, 1000).await;

    let client = connect_small_buffer(addr).await;
    let peer = client.peer.clone();
    let (mut sink, mut stream) = client.ws.split();
    const REQUESTS: u64 = 2000;
    let writer = tokio::spawn(async move {
        for id in 1..=REQUESTS {
            let ask = json!({"type": "history", "topic": "h", "id": id}).to_string();
            sink.feed(Message::text(ask)).await.expect("send");
        }
        sink.flush().await.expect("flush");
        sink
    });
    // One answer: 20 messages of about 1 KB.
    let bound = ANSWER_LIMIT + 24 * 1024;
    sample_until(&handle, &peer, bound, "the answers back up", |h| answers(h, &peer) >= ANSWER_LIMIT).await;

    let (mut answered, mut limited) = (0, 0);
    for _ in 0..REQUESTS {
        let frame = tokio::time::timeout(WAIT, stream.next()).await.expect("a frame").expect("open").expect("ok");
        let Message::Text(text) = frame else { continue };
        match ServerFrame::decode(&text).unwrap() {
            ServerFrame::History { messages, .. } => {
                assert_eq!(messages.len() as u64, MESSAGES);
                answered += 1;
            }
            ServerFrame::Error { code: ErrorCode::RateLimited, id: Some(_), .. } => limited += 1,
            other => panic!("expected history or rate_limited, got {other:?}"),
        }
        let mut max = 0;
        sample(&handle, &peer, bound, &mut max);
    }
    assert_eq!(answered + limited, REQUESTS);
    assert!(limited > 0, "the flood was rate-limited");
    assert!(answered >= 200, "the burst was answered");
    drop(writer.await.unwrap());
    running.abort();
}

/// `refresh` (a token's verification) takes from the churn budget, as
/// `history` does; `ping` takes from none (its answer is all it costs, and
/// answers are bounded by the peer's turn).
#[tokio::test]
async fn refresh_is_rate_limited_and_ping_is_not() {
    let config = ServerConfig { subscribe_rate: 0, subscribe_burst: 2, ..config() };
    let (server, _handle) = server(config).await;
    let addr = server.local_addr();
    let running = tokio::spawn(server.run_until(std::future::pending()));
    let mut client = Client::connect(addr).await;
    for id in 1..=3 {
        client.send(json!({"type": "refresh", "token": "t.k.n", "id": id})).await;
    }
    assert!(matches!(client.recv().await, ServerFrame::Refreshed { id: Some(1), .. }));
    assert!(matches!(client.recv().await, ServerFrame::Refreshed { id: Some(2), .. }));
    match client.recv().await {
        ServerFrame::Error { code: ErrorCode::RateLimited, id: Some(3), .. } => {}
        other => panic!("expected rate_limited for request 3, got {other:?}"),
    }
    for id in 1..=500 {
        client.ping(id).await;
    }
    running.abort();
}
