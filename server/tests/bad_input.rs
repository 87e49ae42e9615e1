//! Whatever a client sends, it gets a clear `error` frame, its connection
//! stays open, and nobody else notices.

mod common;

use common::*;
use crosswire_shared::{ErrorCode, ServerFrame};
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

async fn expect_error(client: &mut Client, code: ErrorCode) -> ServerFrame {
    let frame = client.recv().await;
    match &frame {
        ServerFrame::Error { code: c, message, .. } => {
            assert_eq!(*c, code, "{message}");
            assert!(!message.is_empty());
        }
        other => panic!("expected error {code}, got {other:?}"),
    }
    frame
}

#[tokio::test]
async fn every_bad_frame_gets_an_error_and_the_connection_stays_open() {
    let server = start_pubsub(config()).await;
    let addr = server.local_addr();
    let mut bystander = Client::connect(addr).await;
    bystander.subscribe("room").await;
    let mut bad = Client::connect(addr).await;
    bad.subscribe("room").await;

    let long_topic = "a".repeat(256);
    let cases: Vec<(String, ErrorCode)> = vec![
        ("not json".into(), ErrorCode::BadRequest),
        ("".into(), ErrorCode::BadRequest),
        ("{".into(), ErrorCode::BadRequest),
        ("[1,2]".into(), ErrorCode::BadRequest),
        ("null".into(), ErrorCode::BadRequest),
        (r#"{"topic":"room"}"#.into(), ErrorCode::BadRequest),
        (r#"{"type":"teleport"}"#.into(), ErrorCode::BadRequest),
        (r#"{"type":42}"#.into(), ErrorCode::BadRequest),
        (r#"{"type":"subscribe"}"#.into(), ErrorCode::BadRequest),
        (r#"{"type":"publish","topic":"room"}"#.into(), ErrorCode::BadRequest),
        (r#"{"type":"publish","topic":"room","data":1,"ack":"x"}"#.into(), ErrorCode::BadRequest),
        (r#"{"type":"subscribe","topic":""}"#.into(), ErrorCode::InvalidTopic),
        (r#"{"type":"subscribe","topic":"has space"}"#.into(), ErrorCode::InvalidTopic),
        (r#"{"type":"subscribe","topic":"emoji🙂"}"#.into(), ErrorCode::InvalidTopic),
        (format!(r#"{{"type":"subscribe","topic":"{long_topic}"}}"#), ErrorCode::InvalidTopic),
        (r#"{"type":"subscribe","topic":7}"#.into(), ErrorCode::BadRequest),
        (r#"{"type":"subscribe","topic":"ok","since":"yesterday"}"#.into(), ErrorCode::BadRequest),
        ("{\"type\":\"ping\",\"id\":1e400}".into(), ErrorCode::BadRequest),
    ];
    for (text, code) in cases {
        bad.send_text(&text).await;
        expect_error(&mut bad, code).await;
    }
    // Binary frames are not protocol v1.
    bad.ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    expect_error(&mut bad, ErrorCode::BadRequest).await;

    // Still open and still subscribed; the bystander saw nothing of it.
    bad.ping(1).await;
    bystander.assert_quiet().await;
    bystander.publish("room", json!("still here"), 1).await;
    assert_eq!(message_data(&bad.recv().await).2, json!("still here"));
}

#[tokio::test]
async fn errors_answering_a_publish_carry_its_ack_and_topic() {
    let server = start_pubsub(config()).await;
    let mut c = Client::connect(server.local_addr()).await;
    c.send_text(r#"{"type":"publish","topic":"bad topic","data":1,"ack":9}"#).await;
    match expect_error(&mut c, ErrorCode::InvalidTopic).await {
        ServerFrame::Error { ack, .. } => assert_eq!(ack, Some(9)),
        _ => unreachable!(),
    }
    c.send_text(r#"{"type":"publish","topic":"fine","ack":10}"#).await;
    match expect_error(&mut c, ErrorCode::BadRequest).await {
        ServerFrame::Error { ack, topic, .. } => {
            assert_eq!(ack, Some(10));
            assert_eq!(topic.unwrap().as_str(), "fine");
        }
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn unknown_fields_are_ignored_and_any_json_data_passes_verbatim() {
    let server = start_pubsub(config()).await;
    let addr = server.local_addr();
    let (mut a, mut b) = (Client::connect(addr).await, Client::connect(addr).await);
    a.send_text(r#"{"type":"subscribe","topic":"t","future_field":{"x":1}}"#).await;
    assert!(matches!(a.recv().await, ServerFrame::Subscribed { .. }));
    for data in [r#"null"#, r#"[1,"two",{"3":4.50}]"#, r#""str""#, r#"{ "spaced" : true }"#] {
        b.send_text(&format!(r#"{{"type":"publish","topic":"t","data":{data}}}"#)).await;
        let text = a.recv_text().await;
        assert!(text.ends_with(&format!(r#""data":{data}}}"#)), "{text}");
    }
}
