//! Helpers shared by the integration tests: a real server on 127.0.0.1:0 and
//! a protocol-speaking WebSocket client over a real socket.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod redis;

use std::{net::SocketAddr, time::Duration};

use crosswire_server::{Hooks, PubSub, RunningServer, Server, ServerConfig};
use crosswire_shared::ServerFrame;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    tungstenite::{protocol::CloseFrame, Message},
    MaybeTlsStream, WebSocketStream,
};

/// How long a test waits for something that should happen at once; a bound
/// against hanging, never a delay the test relies on.
pub const WAIT: Duration = Duration::from_secs(10);

/// The HS256 secret of [`auth_config`].
pub const SECRET: &str = "test-secret-0123456789";

/// [`config`] with built-in JWT authentication on, keyed with [`SECRET`].
pub fn auth_config() -> ServerConfig {
    ServerConfig { jwt_secret: Some(SECRET.into()), ..config() }
}

/// Seconds since the Unix epoch, as JWT `exp`/`nbf` count them.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// An HS256 token for `claims`, signed with `secret`.
pub fn token_with(secret: &str, claims: &Value) -> String {
    use jsonwebtoken::{encode, EncodingKey, Header};
    encode(&Header::default(), claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

pub fn config() -> ServerConfig {
    ServerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        // Tests that are not about the rate limit publish as fast as they can.
        publish_rate: 1_000_000,
        publish_burst: 1_000_000,
        subscribe_rate: 1_000_000,
        subscribe_burst: 1_000_000,
        ..ServerConfig::default()
    }
}

pub async fn start_with<H: Hooks>(config: ServerConfig, hooks: H) -> RunningServer {
    Server::new(config, hooks).bind().await.expect("server binds")
}

pub async fn start_pubsub(config: ServerConfig) -> RunningServer {
    let hooks = PubSub::new(&config);
    start_with(config, hooks).await
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub peer: String,
}

pub async fn connect_raw(addr: SocketAddr) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/_ws")).await.expect("connects");
    ws
}

impl Client {
    /// Connects and reads the `welcome` frame.
    pub async fn connect(addr: SocketAddr) -> Client {
        let ws = connect_raw(addr).await;
        let mut client = Client { ws, peer: String::new() };
        match client.recv().await {
            ServerFrame::Welcome { peer, version, .. } => {
                assert_eq!(version, 1);
                client.peer = peer;
            }
            other => panic!("expected welcome, got {other:?}"),
        }
        client
    }

    pub async fn send(&mut self, value: Value) {
        self.ws.send(Message::text(value.to_string())).await.expect("send");
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// The next protocol frame (skipping pings).
    pub async fn recv(&mut self) -> ServerFrame {
        let text = self.recv_text().await;
        ServerFrame::decode(&text).unwrap_or_else(|e| panic!("undecodable frame {text}: {e}"))
    }

    pub async fn recv_json(&mut self) -> Value {
        serde_json::from_str(&self.recv_text().await).unwrap()
    }

    pub async fn recv_text(&mut self) -> String {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame within the wait")
                .expect("stream open")
                .expect("no error");
            match msg {
                Message::Text(t) => return t.to_string(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected text, got {other:?}"),
            }
        }
    }

    /// The next protocol frame (skipping pings), waiting at most `within`:
    /// for what follows a slow event (a reconnect to Redis with backoff).
    pub async fn recv_within(&mut self, within: Duration) -> ServerFrame {
        loop {
            let msg = tokio::time::timeout(within, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("a frame within {within:?}"))
                .expect("stream open")
                .expect("no error");
            match msg {
                Message::Text(t) => {
                    return ServerFrame::decode(&t).unwrap_or_else(|e| panic!("undecodable frame {t}: {e}"))
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected text, got {other:?}"),
            }
        }
    }

    /// Waits for the connection to end and returns the close frame, if any.
    pub async fn closed(&mut self) -> Option<CloseFrame> {
        closed(&mut self.ws).await
    }

    pub async fn subscribe(&mut self, topic: &str) -> ServerFrame {
        self.send(json!({"type": "subscribe", "topic": topic})).await;
        let frame = self.recv().await;
        assert!(matches!(&frame, ServerFrame::Subscribed { topic: t, .. } if t.as_str() == topic), "{frame:?}");
        frame
    }

    /// Publishes with an ack id and returns the seq from the ack.
    pub async fn publish(&mut self, topic: &str, data: Value, ack: u64) -> u64 {
        self.send(json!({"type": "publish", "topic": topic, "data": data, "ack": ack})).await;
        match self.recv().await {
            ServerFrame::Ack { ack: a, seq } if a == ack => seq,
            other => panic!("expected ack {ack}, got {other:?}"),
        }
    }

    /// Round-trips a ping: proves the connection is open and that everything
    /// sent before it was processed.
    pub async fn ping(&mut self, id: u64) {
        self.send(json!({"type": "ping", "id": id})).await;
        match self.recv().await {
            ServerFrame::Pong { id: Some(i) } if i == id => {}
            other => panic!("expected pong {id}, got {other:?}"),
        }
    }

    /// Reads presence frames (join/leave/snapshots) until a ping round trip
    /// completes; panics on anything else. Returns how many there were.
    pub async fn assert_quiet_tolerating_presence(&mut self) -> usize {
        self.send(json!({"type": "ping", "id": u64::MAX})).await;
        let mut presence = 0;
        loop {
            match self.recv().await {
                ServerFrame::Pong { id: Some(u64::MAX) } => return presence,
                ServerFrame::Join { .. } | ServerFrame::Leave { .. } | ServerFrame::Presence { .. } => presence += 1,
                other => panic!("expected presence frames then pong, got {other:?}"),
            }
        }
    }

    /// Asserts nothing is waiting on this connection (after a ping round trip).
    pub async fn assert_quiet(&mut self) {
        self.ping(u64::MAX).await;
    }
}

pub async fn closed(ws: &mut WebSocketStream<MaybeTlsStream<TcpStream>>) -> Option<CloseFrame> {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("closes within the wait") {
            Some(Ok(Message::Close(frame))) => return frame,
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

pub fn message_data(frame: &ServerFrame) -> (u64, String, Value) {
    match frame {
        ServerFrame::Message { seq, from, data, .. } => (*seq, from.clone(), serde_json::from_str(data.get()).unwrap()),
        other => panic!("expected message, got {other:?}"),
    }
}

/// Connects to `/_ws{query}` with extra request headers; a refusal gives its HTTP status.
pub async fn connect_with(addr: SocketAddr, query: &str, headers: &[(&str, &str)]) -> Result<Client, u16> {
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Error};
    let mut req = format!("ws://{addr}/_ws{query}").into_client_request().unwrap();
    for (k, v) in headers {
        let name = http::HeaderName::from_bytes(k.as_bytes()).unwrap();
        req.headers_mut().insert(name, v.parse().unwrap());
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req)).await.expect("answered within the wait") {
        Ok((ws, _)) => {
            let mut client = Client { ws, peer: String::new() };
            if let ServerFrame::Welcome { peer, .. } = client.recv().await {
                client.peer = peer;
            }
            Ok(client)
        }
        Err(Error::Http(res)) => Err(res.status().as_u16()),
        Err(e) => panic!("unexpected connect error {e}"),
    }
}

/// Sends one raw HTTP/1.1 request (which should ask for `Connection: close`)
/// and returns the status, the lowercased head and the body.
pub async fn http_raw(addr: SocketAddr, request: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut buf)).await.expect("the server closes within the wait").ok();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// Publishes `count` messages of about `bytes` bytes each to `topic`
/// (`{"i": 1.., "blob": "…"}`, no acks), then waits until the server has
/// handled them all (a ping round trip).
pub async fn flood(publisher: &mut Client, topic: &str, count: u64, bytes: usize) {
    let blob = "x".repeat(bytes);
    for i in 1..=count {
        publisher.send(json!({"type": "publish", "topic": topic, "data": {"i": i, "blob": blob}})).await;
    }
    publisher.ping(count).await;
}

/// Whether frames wait in peer `id`'s queue (its socket is not taking them).
pub fn backed_up(handle: &crosswire_server::ServerHandle, id: &str) -> bool {
    handle.peers().iter().any(|p| p.id == id && p.queued_frames > 0)
}

/// Whether the server has decided to close peer `id`: it is closing, or
/// already gone (a close it decided on can complete, and the peer leave the
/// list, before a busy test gets to look).
pub fn cut(handle: &crosswire_server::ServerHandle, id: &str) -> bool {
    handle.peers().iter().find(|p| p.id == id).is_none_or(|p| p.closing)
}

/// Waits until `condition` holds, polling the server's own state; panics
/// with `what` after [`WAIT`]. For state that settles asynchronously (a peer
/// count after a close): reading it right away races on a loaded machine.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A protocol client whose socket has a tiny receive buffer, so that a peer
/// that stops reading backs up into the server quickly.
pub async fn connect_small_buffer(addr: SocketAddr) -> Client {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    connect_socket(addr, socket, "").await
}

/// A protocol client over `socket` (set up as the test needs: bound to
/// another loopback address, a small buffer), to `/_ws{query}`.
pub async fn connect_socket(addr: SocketAddr, socket: tokio::net::TcpSocket, query: &str) -> Client {
    let stream = socket.connect(addr).await.expect("connects");
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/_ws{query}"), MaybeTlsStream::Plain(stream))
        .await
        .expect("upgrades");
    let mut client = Client { ws, peer: String::new() };
    match client.recv().await {
        ServerFrame::Welcome { peer, .. } => client.peer = peer,
        other => panic!("expected welcome, got {other:?}"),
    }
    client
}

/// A subscriber of `t` whose socket takes almost nothing (a small receive
/// buffer it never reads), and a publisher that has flooded `t` with `count`
/// messages of `bytes` (the publisher's ping round trip proves every one was
/// handled).
pub async fn stalled_and_flooded(addr: SocketAddr, count: u64, bytes: usize) -> (Client, Client) {
    let mut stalled = connect_small_buffer(addr).await;
    stalled.subscribe("t").await;
    let mut publisher = Client::connect(addr).await;
    flood(&mut publisher, "t", count, bytes).await;
    (stalled, publisher)
}

/// Reads until the connection ends: the seqs of every `message` frame of
/// `topic` in arrival order, and the close frame (`None` when the connection
/// dropped without one).
pub async fn seqs_until_close(client: &mut Client, topic: &str) -> (Vec<u64>, Option<CloseFrame>) {
    let mut seqs = vec![];
    loop {
        match tokio::time::timeout(WAIT, client.ws.next()).await.expect("ends within the wait") {
            Some(Ok(Message::Text(t))) => {
                if let Ok(ServerFrame::Message { topic: t, seq, .. }) = ServerFrame::decode(&t) {
                    if t.as_str() == topic {
                        seqs.push(seq);
                    }
                }
            }
            Some(Ok(Message::Close(frame))) => return (seqs, frame),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (seqs, None),
        }
    }
}

/// Asserts `seqs` is exactly `first..first + len`: in order, no gap, no duplicate.
pub fn assert_contiguous(seqs: &[u64], first: u64, what: &str) {
    let expected: Vec<u64> = (first..first + seqs.len() as u64).collect();
    if seqs != expected {
        let gap = seqs.windows(2).find(|w| w[1] != w[0] + 1);
        panic!("{what}: not contiguous from {first} ({} frames); first break: {gap:?}", seqs.len());
    }
}
