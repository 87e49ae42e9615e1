//! `chat`: the `seed` example's chat room as a load (issue 12's first
//! scenario). `--clients` WebSockets join the room; in every round each
//! sends `--per-round` text messages, pipelined, and the round ends once
//! every client has received every other client's messages (relayed by the
//! server to all members but the sender) and a `Hello to you!` per message
//! it sent. Reports messages received per second and the server's CPU
//! (from `/proc/<pid>/stat`). Run by `scripts/bench.sh` (scenario `chat`)
//! against `seed` and bench/bun/seed.ts. It measures; it asserts nothing.
//!
//! With `--typed` the same room speaks protocol v1 to `crosswire-server`:
//! each member subscribes to `test`, publishes `data` with an `ack`, and
//! counts the `message` frames of the others and its own `ack`s (the
//! typed twin of the reply): the same deliveries, with seqs and history,
//! so the two servers' cost per delivery compare (issue 12: the typed
//! protocol at most 1.5x the seed example's).

#[path = "../proc_stat.rs"]
#[allow(dead_code, unreachable_pub)]
mod proc_stat;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::Parser;
use crosswire_shared::{ClientFrame, RawValue, ServerFrame, Topic};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::{net::TcpStream, sync::Barrier};
use tokio_tungstenite::{client_async, tungstenite::Message};

/// The seed example's chat room, as a benchmark.
#[derive(Debug, Parser)]
struct Cli {
    /// The server's address (loopback only).
    #[arg(long)]
    addr: SocketAddr,
    /// The server's process id, for its CPU time.
    #[arg(long)]
    pid: Option<u32>,
    /// Members of the room.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Messages each member sends per round.
    #[arg(long, default_value_t = 50)]
    per_round: usize,
    /// Rounds measured (one more, unmeasured, comes first).
    #[arg(long, default_value_t = 200)]
    rounds: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    /// A name for this run in the report.
    #[arg(long, default_value = "")]
    label: String,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Speak protocol v1 (against `crosswire-server`) instead of raw text.
    #[arg(long)]
    typed: bool,
}

/// What a member counts of what it receives.
enum Received {
    /// Another member's message, sent in this round.
    Relayed(usize),
    /// The answer to one of its own (`Hello to you!`, or an `ack`).
    Reply,
    /// Anything else: join notices, `subscribed`, pings.
    Other,
}

/// Sorts one text frame.
fn classify(typed: bool, text: &str) -> anyhow::Result<Received> {
    if !typed {
        return Ok(match text {
            "Hello to you!" => Received::Reply,
            t => round_of(t).map_or(Received::Other, Received::Relayed),
        });
    }
    match ServerFrame::decode(text).map_err(|e| anyhow::anyhow!("undecodable frame {text:?}: {e:?}"))? {
        ServerFrame::Message { data, .. } => {
            let text: String = serde_json::from_str(data.get())?;
            round_of(&text).map(Received::Relayed).with_context(|| format!("not a member's message: {text:?}"))
        }
        ServerFrame::Ack { .. } => Ok(Received::Reply),
        ServerFrame::Error { code, message, .. } => bail!("error frame: {code:?}: {message}"),
        _ => Ok(Received::Other),
    }
}

/// The round a member's message (`m<member>.<round>.<i>`) was sent in.
fn round_of(text: &str) -> Option<usize> {
    text.strip_prefix('m')?.split('.').nth(1)?.parse().ok()
}

/// Runs one member: `rounds + 1` rounds; returns the messages it received
/// in the measured ones.
async fn member(cli: Arc<Cli>, me: usize, start: Arc<Barrier>, rounds: Arc<Barrier>) -> anyhow::Result<u64> {
    let tcp = TcpStream::connect(cli.addr).await?;
    // As browsers do (and the load generator's other scenarios): a member's
    // small writes are not held back for the ACK of its last ones (Nagle).
    tcp.set_nodelay(true)?;
    let (ws, _) = client_async(format!("ws://{}/_ws", cli.addr), tcp).await?;
    let (mut tx, mut rx) = ws.split();
    let room = Topic::new("test").map_err(|e| anyhow::anyhow!("{e}"))?;
    if cli.typed {
        tx.send(Message::text(ClientFrame::Subscribe { topic: room.clone(), since: None, presence: false }.encode()))
            .await?;
        loop {
            let Some(message) = rx.next().await else { bail!("member {me}: the server closed the connection") };
            if let Message::Text(t) = message? {
                if let ServerFrame::Subscribed { .. } = ServerFrame::decode(&t).map_err(|e| anyhow::anyhow!("{e:?}"))? {
                    break;
                }
            }
        }
    }
    // Everyone is in the room before anyone speaks; join notices that
    // arrive later are told apart by their text and not counted.
    start.wait().await;
    let others = cli.clients - 1;
    let mut received = 0;
    for round in 0..=cli.rounds {
        for i in 0..cli.per_round {
            let text = format!("m{me}.{round}.{i}");
            let text = if cli.typed {
                let data = RawValue::from_string(serde_json::to_string(&text)?)?;
                ClientFrame::Publish { topic: room.clone(), data, ack: Some(i as u64) }.encode()
            } else {
                text
            };
            tx.feed(Message::text(text)).await?;
        }
        tx.flush().await?;
        // The warm-up round waits for the replies only: until its first
        // reply a member may not be in the room yet (the server's `open`
        // subscribes it after the handshake is answered), and may miss some
        // of the warm-up's messages. Late ones are told apart by their round.
        let relays_owed = if round == 0 { 0 } else { others * cli.per_round };
        let (mut relayed, mut hellos) = (0, 0);
        while relayed < relays_owed || hellos < cli.per_round {
            let Some(message) = rx.next().await else { bail!("member {me}: the server closed the connection") };
            match message? {
                Message::Text(t) => match classify(cli.typed, &t)? {
                    Received::Relayed(r) if r == round => relayed += 1,
                    Received::Relayed(_) => {}
                    Received::Reply => hellos += 1,
                    Received::Other => {}
                },
                Message::Ping(_) | Message::Pong(_) => {}
                other => bail!("member {me}: unexpected {other:?}"),
            }
        }
        if round > 0 {
            received += (relayed + hellos) as u64;
        }
        rounds.wait().await;
    }
    Ok(received)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Arc::new(Cli::parse());
    anyhow::ensure!(cli.addr.ip().is_loopback(), "loopback only");
    anyhow::ensure!(cli.clients >= 2, "a room needs two members");
    let start = Arc::new(Barrier::new(cli.clients + 1));
    let rounds = Arc::new(Barrier::new(cli.clients + 1));
    let members: Vec<_> = (0..cli.clients)
        .map(|me| tokio::spawn(member(Arc::clone(&cli), me, Arc::clone(&start), Arc::clone(&rounds))))
        .collect();
    let deadline = Duration::from_secs_f64(cli.timeout);
    tokio::time::timeout(deadline, start.wait()).await.context("connecting timed out")?;
    // The first round warms up; the clock and the CPU counter start after it.
    tokio::time::timeout(deadline, rounds.wait()).await.context("the warm-up round timed out")?;
    let cpu_before = cli.pid.and_then(proc_stat::cpu_ticks);
    let started = Instant::now();
    for _ in 0..cli.rounds {
        tokio::time::timeout(deadline, rounds.wait()).await.context("a round timed out")?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = cli.pid.and_then(proc_stat::cpu_ticks);
    let mut received = 0;
    for m in members {
        received += m.await??;
    }
    let server_cpu = match (cpu_before, cpu_after) {
        (Some(a), Some(b)) => Some(100.0 * (b - a) as f64 / proc_stat::TICKS_PER_SEC / elapsed),
        _ => None,
    };
    let rate = received as f64 / elapsed;
    println!(
        "{}: {received} messages in {elapsed:.2} s: {:.2} M/s, server CPU {}",
        cli.label,
        rate / 1e6,
        server_cpu.map_or("-".to_owned(), |c| format!("{c:.0}%"))
    );
    if let Some(path) = &cli.json {
        let report = json!({
            "label": cli.label,
            "clients": cli.clients,
            "per_round": cli.per_round,
            "rounds": cli.rounds,
            "seconds": elapsed,
            // Named as the load generator's field, so the tables treat a
            // received chat message as a delivery.
            "deliveries_per_s": rate,
            "cpu_percent": { "server": server_cpu },
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}
