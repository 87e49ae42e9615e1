//! `crosswire-soak`: a bounded abuse run against a crosswire server on
//! loopback, reporting the server's RSS over time (from `/proc/<pid>/status`)
//! and what each attack got. Run by `scripts/soak.sh`; the figures go in
//! docs/RELIABILITY.md. It measures; it asserts nothing.
//!
//! Phases, each `--seconds` long, all while `--idle` idle connections stay open:
//! 1. topic churn: subscribe and unsubscribe fresh topic names, pipelined;
//! 2. publish flood to fresh topics nobody subscribed to (8 connections, 60 KB);
//! 3. publish flood to topics whose only subscriber left (history is retained);
//! 4. stalled readers: 50 subscribers with a 4 KiB receive buffer never read
//!    while a topic is flooded with 8 KB messages;
//! 5. presence churn: one peer joins and leaves a room 10 watchers read;
//! 6. slow-reading ping flooder: one connection sends `ping` as fast as its
//!    socket takes them and reads for 0.3 s every 4 s (so the write timeout
//!    never fires);
//! 7. replay flooder: the same reader sends `unsubscribe` + `subscribe` with
//!    `since` seq 0 on a topic with about 4 MB of history;
//! 8. history flooder: the same reader asks for the `history` of a topic of
//!    100 × 60 KB, while 8 prompt readers page through the same history;
//! 9. topic hog: one address opens 100 connections subscribing each to 100
//!    fresh topics, while a client from another address (127.0.0.2)
//!    subscribes to fresh topics of its own and pings.
//!
//! Besides the RSS, each phase reports the peak of the server's own
//! accounting, scraped from `/metrics`: the bytes queued for peers
//! (`crosswire_queue_bytes`) and the topics that exist.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use crosswire_shared::ServerFrame;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use tokio_tungstenite::{tungstenite::Message, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Bounded abuse run against a crosswire server on loopback.
#[derive(Debug, Parser)]
struct Cli {
    /// The server's address (loopback only).
    #[arg(long)]
    addr: SocketAddr,
    /// The server's process id, for its RSS.
    #[arg(long)]
    pid: u32,
    /// Seconds per phase.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Idle connections held open during the whole run.
    #[arg(long, default_value_t = 3000)]
    idle: usize,
}

/// Resident set size of `pid` in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Samples the server's RSS every 250 ms while a phase runs.
struct RssProbe {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssProbe {
    fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(rss_kib(pid).unwrap_or(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (Arc::clone(&peak), Arc::clone(&stop));
        tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                if let Some(rss) = rss_kib(pid) {
                    p.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        Self { peak, stop }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.peak.load(Ordering::Relaxed)
    }
}

/// One gauge of the server's `/metrics`, read over a plain HTTP/1.1 request.
async fn gauge(addr: SocketAddr, name: &str) -> Option<u64> {
    let mut stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await.ok()?.ok()?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_string(&mut body)).await.ok()?.ok()?;
    let line = body.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?;
    line.rsplit(' ').next()?.parse::<f64>().ok().map(|v| v as u64)
}

/// Samples the server's own accounting (queued bytes, topics) every 250 ms
/// while a phase runs: what the bounds hold, beside what RSS shows.
struct AccountingProbe {
    queue_peak: Arc<AtomicU64>,
    topics_peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl AccountingProbe {
    fn start(addr: SocketAddr) -> Self {
        let (queue_peak, topics_peak) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let (q, t, s) = (Arc::clone(&queue_peak), Arc::clone(&topics_peak), Arc::clone(&stop));
        tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                if let Some(bytes) = gauge(addr, "crosswire_queue_bytes").await {
                    q.fetch_max(bytes, Ordering::Relaxed);
                }
                if let Some(topics) = gauge(addr, "crosswire_topics").await {
                    t.fetch_max(topics, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        Self { queue_peak, topics_peak, stop }
    }

    /// The peaks: queued MiB, topics.
    fn finish(self) -> (f64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        (self.queue_peak.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0), self.topics_peak.load(Ordering::Relaxed))
    }
}

/// Connects, retrying while the server answers 429 (its per-address connect
/// rate): the soak paces itself as a real client would.
async fn connect(addr: SocketAddr, small_buffer: bool) -> anyhow::Result<Ws> {
    connect_from(addr, None, small_buffer).await
}

/// [`connect`] from the loopback address `from` (127.0.0.2, …): another
/// client address, as the server's per-address limits see it.
async fn connect_from(addr: SocketAddr, from: Option<IpAddr>, small_buffer: bool) -> anyhow::Result<Ws> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let socket = TcpSocket::new_v4()?;
        if let Some(from) = from {
            socket.bind(SocketAddr::new(from, 0))?;
        }
        if small_buffer {
            socket.set_recv_buffer_size(4096)?;
        }
        let stream = socket.connect(addr).await?;
        match tokio_tungstenite::client_async(format!("ws://{addr}/_ws"), MaybeTlsStream::Plain(stream)).await {
            Ok((mut ws, _)) => {
                // The welcome frame.
                ws.next().await.context("no welcome")??;
                return Ok(ws);
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(res))
                if res.status() == 429 && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn send(ws: &mut Ws, value: serde_json::Value) -> anyhow::Result<()> {
    ws.send(Message::text(value.to_string())).await?;
    Ok(())
}

/// What the server answered during a phase, by kind.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    ok: u64,
    errors: std::collections::BTreeMap<String, u64>,
}

impl Tally {
    fn frame(&mut self, text: &str) {
        match ServerFrame::decode(text) {
            Ok(ServerFrame::Error { code, .. }) => *self.errors.entry(code.to_string()).or_default() += 1,
            Ok(_) => self.ok += 1,
            Err(_) => *self.errors.entry("undecodable".into()).or_default() += 1,
        }
    }

    fn summary(&self) -> String {
        let errors: Vec<String> = self.errors.iter().map(|(k, v)| format!("{v} `{k}`")).collect();
        format!(
            "{} sent, {} answered ok, errors: {}",
            self.sent,
            self.ok,
            if errors.is_empty() { "none".into() } else { errors.join(", ") }
        )
    }
}

/// Sends frames made by `make` for `seconds`, reading answers as they come,
/// with at most 256 unanswered at a time.
async fn pipeline(
    ws: &mut Ws,
    seconds: u64,
    mut make: impl FnMut(u64) -> serde_json::Value,
    answers_per_frame: u64,
) -> Tally {
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut tally = Tally::default();
    let mut n = 0;
    let mut received = 0;
    while Instant::now() < end {
        while tally.sent * answers_per_frame - received < 256 && Instant::now() < end {
            if send(ws, make(n)).await.is_err() {
                return tally;
            }
            n += 1;
            tally.sent += 1;
        }
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                received += 1;
                tally.frame(&t);
            }
            Ok(Some(Ok(_))) => {}
            _ => {
                *tally.errors.entry("connection ended".into()).or_default() += 1;
                return tally;
            }
        }
    }
    tally
}

async fn phase_topic_churn(addr: SocketAddr, seconds: u64) -> anyhow::Result<String> {
    let mut ws = connect(addr, false).await?;
    let mut topic = 0;
    let tally = pipeline(
        &mut ws,
        seconds,
        |n| {
            // Alternate: subscribe a fresh name, then unsubscribe it.
            if n % 2 == 0 {
                topic += 1;
                json!({"type": "subscribe", "topic": format!("churn.{topic}")})
            } else {
                json!({"type": "unsubscribe", "topic": format!("churn.{topic}")})
            }
        },
        1,
    )
    .await;
    Ok(format!("subscribe/unsubscribe of fresh names from one connection: {}", tally.summary()))
}

async fn flood(
    addr: SocketAddr,
    seconds: u64,
    topics: impl Fn(u64, u64) -> String + Send + Sync + 'static,
) -> anyhow::Result<Vec<Tally>> {
    let topics = Arc::new(topics);
    let blob = Arc::new("f".repeat(60_000));
    let mut tasks = vec![];
    for c in 0..8u64 {
        let mut ws = connect(addr, false).await?;
        let (topics, blob) = (Arc::clone(&topics), Arc::clone(&blob));
        tasks.push(tokio::spawn(async move {
            pipeline(
                &mut ws,
                seconds,
                |n| json!({"type": "publish", "topic": topics(c, n), "data": &*blob, "ack": n}),
                1,
            )
            .await
        }));
    }
    let mut tallies = vec![];
    for t in tasks {
        tallies.push(t.await?);
    }
    Ok(tallies)
}

fn sum(tallies: &[Tally]) -> Tally {
    let mut total = Tally::default();
    for t in tallies {
        total.sent += t.sent;
        total.ok += t.ok;
        for (k, v) in &t.errors {
            *total.errors.entry(k.clone()).or_default() += v;
        }
    }
    total
}

async fn phase_fresh_flood(addr: SocketAddr, seconds: u64) -> anyhow::Result<String> {
    let tallies = flood(addr, seconds, |c, n| format!("fresh.{c}.{n}")).await?;
    let total = sum(&tallies);
    let mb = total.ok * 60_000 / 1_000_000;
    Ok(format!("8 connections publishing 60 KB to fresh topics (~{mb} MB accepted): {}", total.summary()))
}

async fn phase_retained_flood(addr: SocketAddr, seconds: u64) -> anyhow::Result<String> {
    // Hand out 500 epochs, then leave: everything published to them is retained.
    let mut sub = connect(addr, false).await?;
    for t in 0..500 {
        send(&mut sub, json!({"type": "subscribe", "topic": format!("kept.{t}")})).await?;
    }
    for _ in 0..500 {
        sub.next().await.context("subscribed")??;
    }
    drop(sub);
    let tallies = flood(addr, seconds, |c, n| format!("kept.{}", (c * 7919 + n) % 500)).await?;
    let total = sum(&tallies);
    let mb = total.ok * 60_000 / 1_000_000;
    Ok(format!(
        "8 connections publishing 60 KB to 500 topics whose subscriber left (~{mb} MB accepted, all retainable): {}",
        total.summary()
    ))
}

async fn phase_stalled_readers(addr: SocketAddr, seconds: u64) -> anyhow::Result<String> {
    let mut stalled = vec![];
    for _ in 0..50 {
        let mut ws = connect(addr, true).await?;
        send(&mut ws, json!({"type": "subscribe", "topic": "firehose"})).await?;
        stalled.push(ws);
    }
    let mut publisher = connect(addr, false).await?;
    let blob = "s".repeat(8_000);
    let tally = pipeline(
        &mut publisher,
        seconds,
        |n| json!({"type": "publish", "topic": "firehose", "data": &blob, "ack": n}),
        1,
    )
    .await;
    // Now read what each stalled socket got: a prefix, then how it ended.
    let mut endings = std::collections::BTreeMap::<String, u64>::new();
    for mut ws in stalled {
        let ending = loop {
            match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
                Ok(Some(Ok(Message::Close(Some(frame))))) => break format!("close {}", u16::from(frame.code)),
                Ok(Some(Ok(Message::Close(None)))) => break "close without code".to_owned(),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_))) | Ok(None) => break "dropped (no close frame)".to_owned(),
                Err(_) => break "still open".to_owned(),
            }
        };
        *endings.entry(ending).or_default() += 1;
    }
    let endings: Vec<String> = endings.iter().map(|(k, v)| format!("{v} {k}")).collect();
    Ok(format!(
        "50 subscribers with a 4 KiB receive buffer that never read, while 8 KB messages flood their topic: publisher {}; the stalled readers: {}",
        tally.summary(),
        endings.join(", ")
    ))
}

async fn phase_presence_churn(addr: SocketAddr, seconds: u64) -> anyhow::Result<String> {
    let received = Arc::new(AtomicU64::new(0));
    let mut watchers = vec![];
    for _ in 0..10 {
        let mut ws = connect(addr, false).await?;
        send(&mut ws, json!({"type": "subscribe", "topic": "room", "presence": true})).await?;
        let received = Arc::clone(&received);
        watchers.push(tokio::spawn(async move {
            // Reads normally until the connection ends or the phase is over.
            let end = Instant::now() + Duration::from_secs(seconds + 5);
            while Instant::now() < end {
                match tokio::time::timeout(Duration::from_secs(1), ws.next()).await {
                    Ok(Some(Ok(Message::Text(_)))) => {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Some(Ok(Message::Close(frame)))) => return format!("cut: {frame:?}"),
                    Ok(Some(Ok(_))) | Err(_) => {}
                    Ok(Some(Err(_))) | Ok(None) => return "dropped".to_owned(),
                }
            }
            "still connected".to_owned()
        }));
    }
    let mut churner = connect(addr, false).await?;
    let tally = pipeline(
        &mut churner,
        seconds,
        |n| {
            if n % 2 == 0 {
                json!({"type": "subscribe", "topic": "room"})
            } else {
                json!({"type": "unsubscribe", "topic": "room"})
            }
        },
        1,
    )
    .await;
    let mut states = std::collections::BTreeMap::<String, u64>::new();
    for w in watchers {
        *states.entry(w.await?).or_default() += 1;
    }
    let states: Vec<String> = states.iter().map(|(k, v)| format!("{v} {k}")).collect();
    Ok(format!(
        "one peer joining and leaving a room as fast as it can: {}; 10 watchers received {} frames and are: {}",
        tally.summary(),
        received.load(Ordering::Relaxed),
        states.join(", ")
    ))
}

/// A client that asks as fast as its socket takes its frames and reads for
/// 0.3 s every 4 s: never silent long enough for the write timeout, never
/// reading as fast as it asks. Runs `seconds`; returns what it sent, what
/// it read (by kind), and how the connection ended.
async fn slow_asker(
    addr: SocketAddr,
    seconds: u64,
    make: impl Fn(u64) -> Vec<serde_json::Value> + Send + 'static,
) -> anyhow::Result<String> {
    let ws = connect(addr, true).await?;
    let (mut sink, mut stream) = ws.split();
    let end = Instant::now() + Duration::from_secs(seconds);
    let writer = tokio::spawn(async move {
        let mut sent = 0u64;
        let mut n = 0;
        while Instant::now() < end {
            for frame in make(n) {
                match tokio::time::timeout_at(end.into(), sink.send(Message::text(frame.to_string()))).await {
                    Ok(Ok(())) => sent += 1,
                    Ok(Err(_)) => return (sent, "the server closed the connection"),
                    Err(_) => return (sent, "still writing at the end"),
                }
            }
            n += 1;
        }
        (sent, "done")
    });
    let mut tally = Tally::default();
    let mut ended = None;
    while Instant::now() < end && ended.is_none() {
        let read_until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < read_until {
            match tokio::time::timeout_at(read_until.into(), stream.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => tally.frame(&t),
                Ok(Some(Ok(Message::Close(frame)))) => {
                    ended = Some(format!("closed by the server: {:?}", frame.map(|f| u16::from(f.code))));
                    break;
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_))) | Ok(None) => {
                    ended = Some("dropped".to_owned());
                    break;
                }
                Err(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(3700).min(end.saturating_duration_since(Instant::now()))).await;
    }
    let (sent, writing) = writer.await?;
    tally.sent = sent;
    Ok(format!("{}; writer: {writing}; connection: {}", tally.summary(), ended.unwrap_or_else(|| "open".to_owned())))
}

async fn phase_ping_flood(addr: SocketAddr, seconds: u64) -> anyhow::Result<String> {
    let what = slow_asker(addr, seconds, |n| vec![json!({"type": "ping", "id": n})]).await?;
    Ok(format!("one connection sending `ping` as fast as its socket takes them, reading 0.3 s every 4 s: {what}"))
}

/// Fills `topic` with `count` messages of 60 KB, retained (a subscriber holds
/// the epoch); returns the subscriber, which keeps holding it, and the epoch.
async fn fill_history(addr: SocketAddr, topic: &str, count: u64) -> anyhow::Result<(Ws, String)> {
    let mut holder = connect(addr, false).await?;
    send(&mut holder, json!({"type": "subscribe", "topic": topic})).await?;
    let epoch = loop {
        let Some(Ok(Message::Text(t))) = holder.next().await else { anyhow::bail!("no subscribed") };
        if let Ok(ServerFrame::Subscribed { epoch, .. }) = ServerFrame::decode(&t) {
            break epoch;
        }
    };
    let mut publisher = connect(addr, false).await?;
    let blob = "h".repeat(60_000);
    let mut acked = 0;
    for n in 0..count {
        send(&mut publisher, json!({"type": "publish", "topic": topic, "data": &blob, "ack": n})).await?;
    }
    while acked < count {
        match tokio::time::timeout(Duration::from_secs(10), publisher.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => match ServerFrame::decode(&t) {
                Ok(ServerFrame::Ack { .. }) => acked += 1,
                // Rate-limited: that one is not retained; ask again later.
                Ok(ServerFrame::Error { .. }) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    send(&mut publisher, json!({"type": "publish", "topic": topic, "data": &blob, "ack": 0})).await?;
                }
                _ => {}
            },
            _ => anyhow::bail!("the history publisher was cut off"),
        }
    }
    // The holder reads what it was sent, so it is not cut as slow meanwhile.
    let drain =
        async { while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_millis(200), holder.next()).await {} };
    drain.await;
    Ok((holder, epoch))
}

async fn phase_replay_flood(addr: SocketAddr, seconds: u64) -> anyhow::Result<String> {
    let (_holder, epoch) = fill_history(addr, "replayed", 70).await?;
    let what = slow_asker(addr, seconds, move |_| {
        vec![
            json!({"type": "unsubscribe", "topic": "replayed"}),
            json!({"type": "subscribe", "topic": "replayed", "since": {"epoch": &epoch, "seq": 0}}),
        ]
    })
    .await?;
    Ok(format!(
        "one connection resubscribing with `since` seq 0 to a topic of 70 × 60 KB of history, reading 0.3 s every 4 s: {what}"
    ))
}

async fn phase_history_flood(addr: SocketAddr, seconds: u64) -> anyhow::Result<String> {
    let (_holder, _epoch) = fill_history(addr, "paged", 100).await?;
    // Prompt readers page through it with `next` the whole phase.
    let pages = Arc::new(AtomicU64::new(0));
    let mut readers = vec![];
    for r in 0..8u64 {
        let mut ws = connect(addr, false).await?;
        let pages = Arc::clone(&pages);
        readers.push(tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(seconds);
            let mut since: Option<serde_json::Value> = None;
            let mut id = r * 1_000_000;
            while Instant::now() < end {
                id += 1;
                let mut ask = json!({"type": "history", "topic": "paged", "id": id});
                if let Some(since) = &since {
                    ask["since"] = since.clone();
                }
                if send(&mut ws, ask).await.is_err() {
                    return "dropped".to_owned();
                }
                let answer = loop {
                    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                        Ok(Some(Ok(Message::Text(t)))) => {
                            let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
                            if v["id"] == id {
                                break v;
                            }
                        }
                        Ok(Some(Ok(Message::Close(frame)))) => {
                            return format!("closed {:?}", frame.map(|f| u16::from(f.code)))
                        }
                        Ok(Some(Ok(_))) => {}
                        _ => return "dropped".to_owned(),
                    }
                };
                if answer["type"] == "error" {
                    // Rate-limited: wait for a token, as a client would.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                pages.fetch_add(1, Ordering::Relaxed);
                since = answer
                    .get("next")
                    .and_then(|n| n.as_u64())
                    .map(|next| json!({"epoch": answer["epoch"], "seq": next}));
            }
            "still connected".to_owned()
        }));
    }
    let what = slow_asker(addr, seconds, |n| vec![json!({"type": "history", "topic": "paged", "id": n})]).await?;
    let mut states = std::collections::BTreeMap::<String, u64>::new();
    for r in readers {
        *states.entry(r.await?).or_default() += 1;
    }
    let states: Vec<String> = states.iter().map(|(k, v)| format!("{v} {k}")).collect();
    Ok(format!(
        "one connection asking for the `history` of a topic of 100 × 60 KB as fast as its socket takes, reading 0.3 s every 4 s: {what}; 8 prompt readers paging through it got {} pages and are: {}",
        pages.load(Ordering::Relaxed),
        states.join(", ")
    ))
}

async fn phase_topic_hog(addr: SocketAddr, seconds: u64) -> anyhow::Result<String> {
    // The hog: 100 connections from 127.0.0.1, each subscribing to 100 fresh topics.
    let mut hogs = vec![];
    let hog_tally = Arc::new(std::sync::Mutex::new(Tally::default()));
    for c in 0..100u64 {
        let mut ws = connect(addr, false).await?;
        let tally = Arc::clone(&hog_tally);
        hogs.push(tokio::spawn(async move {
            for t in 0..100u64 {
                if send(&mut ws, json!({"type": "subscribe", "topic": format!("hog.{c}.{t}")})).await.is_err() {
                    break;
                }
                tally.lock().unwrap().sent += 1;
            }
            let end = Instant::now() + Duration::from_secs(seconds);
            while let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout_at(end.into(), ws.next()).await {
                tally.lock().unwrap().frame(&t);
            }
            ws
        }));
    }
    // Meanwhile another address subscribes to fresh topics and pings.
    let other: IpAddr = "127.0.0.2".parse()?;
    let mut ws = connect_from(addr, Some(other), false).await?;
    let end = Instant::now() + Duration::from_secs(seconds);
    let (mut topics, mut refused, mut pings) = (0u64, 0u64, vec![]);
    let mut n = 0;
    while Instant::now() < end {
        n += 1;
        send(&mut ws, json!({"type": "subscribe", "topic": format!("own.{n}")})).await?;
        let sent = Instant::now();
        send(&mut ws, json!({"type": "ping", "id": n})).await?;
        loop {
            let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(Duration::from_secs(15), ws.next()).await else {
                anyhow::bail!("the other address's client was cut off");
            };
            match ServerFrame::decode(&t) {
                Ok(ServerFrame::Subscribed { .. }) => topics += 1,
                Ok(ServerFrame::Error { .. }) => refused += 1,
                Ok(ServerFrame::Pong { .. }) => {
                    pings.push(sent.elapsed());
                    break;
                }
                _ => {}
            }
        }
        if topics + refused >= 50 {
            send(&mut ws, json!({"type": "unsubscribe", "topic": format!("own.{}", n - 49)})).await?;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut kept = vec![];
    for h in hogs {
        kept.push(h.await?);
    }
    pings.sort();
    let pct = |p: f64| pings.get(((pings.len() as f64 * p) as usize).min(pings.len().saturating_sub(1))).copied();
    let ms = |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.1} ms", d.as_secs_f64() * 1000.0));
    let hog = hog_tally.lock().unwrap().summary();
    Ok(format!(
        "100 connections from 127.0.0.1 subscribing each to 100 fresh topics: {hog}; meanwhile 127.0.0.2 subscribed to {topics} fresh topics ({refused} refused), ping p50 {} / max {}",
        ms(pct(0.5)),
        ms(pings.last().copied())
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(cli.addr.ip().is_loopback(), "the soak only targets loopback addresses");
    let baseline = rss_kib(cli.pid).context("cannot read the server's RSS")?;
    println!("| phase | what the clients did and got | server RSS peak (MiB) | after (MiB) | queued peak (MiB) | topics peak |");
    println!("|---|---|---|---|---|---|");
    println!("| start | a fresh server | {:.1} | | | |", baseline as f64 / 1024.0);

    let probe = RssProbe::start(cli.pid);
    let started = Instant::now();
    let mut idle = Vec::with_capacity(cli.idle);
    for _ in 0..cli.idle {
        idle.push(connect(cli.addr, false).await?);
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let peak = probe.finish();
    let after = rss_kib(cli.pid).unwrap_or(0);
    println!(
        "| idle | {} idle connections opened in {connect_secs:.1} s (paced by the per-address connect rate), kept open to the end | {:.1} | {:.1} | | |",
        cli.idle,
        peak as f64 / 1024.0,
        after as f64 / 1024.0
    );

    macro_rules! phase {
        ($name:expr, $run:expr) => {{
            let probe = RssProbe::start(cli.pid);
            let accounting = AccountingProbe::start(cli.addr);
            let what = $run.await?;
            let peak = probe.finish();
            let (queued, topics) = accounting.finish();
            // Give the server a moment to drop what the phase left behind.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let after = rss_kib(cli.pid).unwrap_or(0);
            println!(
                "| {} | {} | {:.1} | {:.1} | {queued:.1} | {topics} |",
                $name,
                what,
                peak as f64 / 1024.0,
                after as f64 / 1024.0
            );
        }};
    }
    phase!("topic churn", phase_topic_churn(cli.addr, cli.seconds));
    phase!("fresh-topic flood", phase_fresh_flood(cli.addr, cli.seconds));
    phase!("retained flood", phase_retained_flood(cli.addr, cli.seconds));
    phase!("stalled readers", phase_stalled_readers(cli.addr, cli.seconds));
    phase!("presence churn", phase_presence_churn(cli.addr, cli.seconds));
    phase!("slow ping flooder", phase_ping_flood(cli.addr, cli.seconds));
    phase!("replay flooder", phase_replay_flood(cli.addr, cli.seconds));
    phase!("history flooder", phase_history_flood(cli.addr, cli.seconds));
    phase!("topic hog", phase_topic_hog(cli.addr, cli.seconds));

    drop(idle);
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("| end | every soak connection closed | | {:.1} | | |", rss_kib(cli.pid).unwrap_or(0) as f64 / 1024.0);
    Ok(())
}
