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
//! 5. presence churn: one peer joins and leaves a room 10 watchers read.

use std::{
    net::SocketAddr,
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
use tokio::net::{TcpSocket, TcpStream};
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

/// Connects, retrying while the server answers 429 (its per-address connect
/// rate): the soak paces itself as a real client would.
async fn connect(addr: SocketAddr, small_buffer: bool) -> anyhow::Result<Ws> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let socket = TcpSocket::new_v4()?;
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(cli.addr.ip().is_loopback(), "the soak only targets loopback addresses");
    let baseline = rss_kib(cli.pid).context("cannot read the server's RSS")?;
    println!("| phase | what the clients did and got | server RSS peak (MiB) | after (MiB) |");
    println!("|---|---|---|---|");
    println!("| start | a fresh server | {:.1} | |", baseline as f64 / 1024.0);

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
        "| idle | {} idle connections opened in {connect_secs:.1} s (paced by the per-address connect rate), kept open to the end | {:.1} | {:.1} |",
        cli.idle,
        peak as f64 / 1024.0,
        after as f64 / 1024.0
    );

    macro_rules! phase {
        ($name:expr, $run:expr) => {{
            let probe = RssProbe::start(cli.pid);
            let what = $run.await?;
            let peak = probe.finish();
            // Give the server a moment to drop what the phase left behind.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let after = rss_kib(cli.pid).unwrap_or(0);
            println!("| {} | {} | {:.1} | {:.1} |", $name, what, peak as f64 / 1024.0, after as f64 / 1024.0);
        }};
    }
    phase!("topic churn", phase_topic_churn(cli.addr, cli.seconds));
    phase!("fresh-topic flood", phase_fresh_flood(cli.addr, cli.seconds));
    phase!("retained flood", phase_retained_flood(cli.addr, cli.seconds));
    phase!("stalled readers", phase_stalled_readers(cli.addr, cli.seconds));
    phase!("presence churn", phase_presence_churn(cli.addr, cli.seconds));

    drop(idle);
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("| end | every soak connection closed | | {:.1} |", rss_kib(cli.pid).unwrap_or(0) as f64 / 1024.0);
    Ok(())
}
