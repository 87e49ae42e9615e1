//! `crosswire-bench`: a load generator for protocol v1 pub/sub servers.
//!
//! It connects `--subscribers` WebSockets (in batches of `--connect-batch`),
//! subscribes each to one of `--topics` topics (round robin) and waits for
//! every `subscribed`; then `--publishers` further connections publish
//! `--messages` messages each, round robin over the topics, either as fast as
//! an in-flight window allows (`--rate 0`) or at a fixed total `--rate`.
//! Every published `data` is `{"t":<send time, ns>,"pad":"x…"}`; subscribers
//! run in the same process, so `receive time - t` is the end-to-end latency on
//! one monotonic clock.
//!
//! It reports fan-out deliveries per second, publishes per second, latency
//! percentiles and every error it saw (lost deliveries, `error` frames,
//! out-of-order seqs, closed connections). It measures; it asserts nothing.
//! See `docs/BENCHMARKS.md` for the method and `scripts/bench.sh` for the
//! scenarios.

mod hist;
mod proc_stat;

use std::{
    borrow::Cow,
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::Parser;
use crosswire_shared::{ClientFrame, ServerFrame, Topic};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::{
    net::TcpStream,
    sync::{mpsc, watch, Notify, Semaphore},
    task::JoinHandle,
};
use tokio_tungstenite::{
    tungstenite::{protocol::WebSocketConfig, Message},
    MaybeTlsStream, WebSocketStream,
};

use crate::hist::Histogram;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Each connection's read buffer.
const READ_BUFFER: usize = 8 * 1024;

/// Load generator for protocol v1 pub/sub servers (crosswire, or the Bun
/// comparison server in bench/bun). Measures; asserts nothing.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
struct Cli {
    /// WebSocket URL of the server under test.
    #[arg(long, default_value = "ws://127.0.0.1:3000/_ws")]
    url: String,
    /// Where the publishers connect, when not to `--url` (which the
    /// subscribers use): another node of a cluster, so that every delivery
    /// crosses the broker between them.
    #[arg(long)]
    publish_url: Option<String>,
    /// A name for this run in the report (e.g. the server's).
    #[arg(long, default_value = "")]
    label: String,
    /// Subscriber connections, spread round robin over the topics.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Publisher connections (not subscribed to anything).
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Messages each publisher publishes in the measured phase.
    #[arg(long, default_value_t = 1000)]
    messages: u64,
    /// Size in bytes of each published `data` JSON value (at least about 30).
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    /// Topics (`bench.0`, `bench.1`, …); each publisher cycles through them.
    #[arg(long, default_value_t = 1)]
    topics: usize,
    /// Total publishes per second across all publishers; 0 publishes as fast
    /// as the in-flight window allows.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// With `--rate 0`: messages per publisher that may be published but not
    /// yet received by all their subscribers (a global bound of window ×
    /// publishers × subscribers-per-topic deliveries), so that the server's
    /// queues stay bounded and the run measures sustained throughput.
    #[arg(long, default_value_t = 64)]
    window: u64,
    /// Time limit for the measured publishing phase, in seconds.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// How long to wait, after the last publish, for the last deliveries (seconds).
    #[arg(long, default_value_t = 5.0)]
    drain_timeout: f64,
    /// Unmeasured messages each publisher publishes first (JIT and allocator warm-up).
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 50)]
    connect_batch: usize,
    /// Time limit for connecting and subscribing everyone, in seconds.
    #[arg(long, default_value_t = 60.0)]
    connect_timeout: f64,
    /// Tokio worker threads of the load generator (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// The server's process id, to report its CPU use during the measured phase.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// `KEY=VALUE` recorded as is under `meta` in the JSON report (repeatable),
    /// e.g. the machine's load before the run.
    #[arg(long, value_parser = parse_meta)]
    meta: Vec<(String, String)>,
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// Where the run is; tasks wait on it through a watch channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Connecting,
    Warmup,
    Measure,
    Stop,
}

/// State every task shares.
struct Shared {
    base: Instant,
    topics: Vec<String>,
    /// Subscribers of each topic: the deliveries one publish to it owes.
    fanout: Vec<u64>,
    /// Deliveries owed for everything published so far (warm-up included).
    owed: AtomicU64,
    /// Deliveries owed for the measured publishes only.
    owed_measured: AtomicU64,
    /// Deliveries received so far (warm-up included).
    delivered: AtomicU64,
    /// Woken every `notify_every` deliveries, for publishers waiting on the window.
    progress: Notify,
    notify_every: u64,
    phase: watch::Sender<Phase>,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn outstanding(&self) -> u64 {
        self.owed.load(Ordering::Acquire).saturating_sub(self.delivered.load(Ordering::Acquire))
    }

    fn delivered_one(&self) {
        let n = self.delivered.fetch_add(1, Ordering::AcqRel) + 1;
        if n % self.notify_every == 0 {
            self.progress.notify_waiters();
        }
    }

    /// Waits until at most `bound` deliveries are outstanding; false if
    /// `deadline` came first.
    async fn wait_window(&self, bound: u64, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.outstanding() <= bound {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::select! {
                _ = notified => {}
                // A backstop: deliveries may stop short of the next notification.
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
    }

    async fn wait_phase(&self, phase: Phase) {
        let mut rx = self.phase.subscribe();
        let _ = rx.wait_for(|p| *p >= phase).await;
    }
}

/// The fields of a server frame the load generator looks at, borrowed.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    seq: Option<u64>,
    data: Option<Stamp>,
    #[serde(borrow)]
    code: Option<Cow<'a, str>>,
}

/// The published `data`: its send time and whether it is a warm-up message.
#[derive(Deserialize)]
struct Stamp {
    t: u64,
    #[serde(default)]
    w: bool,
}

/// The message frame's `seq`, `data.t` and `data.w`, read straight off the
/// text when it has the layout both servers write (`{"type":"message",…,
/// "seq":N,…,"data":{"t":T,…}}`): a full JSON parse of every delivery would
/// cost the load generator CPU the server under test could have used.
/// `None` means "parse it properly".
fn fast_message(text: &str) -> Option<(u64, u64, bool)> {
    fn digits(s: &str) -> Option<(u64, &str)> {
        let end = s.bytes().position(|b| !b.is_ascii_digit()).unwrap_or(s.len());
        Some((s[..end].parse().ok()?, &s[end..]))
    }
    let rest = text.strip_prefix(r#"{"type":"message","#)?;
    const SEQ: &str = r#","seq":"#;
    let (seq, rest) = digits(&rest[rest.find(SEQ)? + SEQ.len()..])?;
    const DATA: &str = r#","data":{"t":"#;
    let (t, rest) = digits(&rest[rest.find(DATA)? + DATA.len()..])?;
    Some((seq, t, rest.starts_with(r#","w":true"#)))
}

/// Opens a connection and reads its `welcome`.
async fn open(url: &str) -> anyhow::Result<Ws> {
    // tungstenite zero-fills the free part of its read buffer before every
    // read: its 128 KiB default would make that the load generator's top cost.
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    match next_frame(&mut ws).await? {
        ServerFrame::Welcome { .. } => Ok(ws),
        other => bail!("expected welcome, got {other:?}"),
    }
}

/// The next protocol frame, skipping WebSocket control frames.
async fn next_frame(ws: &mut Ws) -> anyhow::Result<ServerFrame> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                return ServerFrame::decode(&text).map_err(|e| anyhow::anyhow!("undecodable frame {text:?}: {e:?}"))
            }
            Some(Ok(Message::Close(frame))) => bail!("closed by the server: {frame:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("connection ended"),
        }
    }
}

/// Connects and subscribes one subscriber.
async fn open_subscriber(url: &str, topic: &str) -> anyhow::Result<Ws> {
    let mut ws = open(url).await?;
    let topic = Topic::new(topic).map_err(|e| anyhow::anyhow!("{e}"))?;
    let frame = ClientFrame::Subscribe { topic, since: None, presence: false };
    ws.send(Message::text(frame.encode())).await?;
    loop {
        match next_frame(&mut ws).await? {
            ServerFrame::Subscribed { .. } => return Ok(ws),
            ServerFrame::Error { code, message, .. } => bail!("subscribe refused: {code:?}: {message}"),
            _ => continue,
        }
    }
}

/// What one subscriber saw.
struct SubReport {
    latency: Histogram,
    received: u64,
    warmup_received: u64,
    last_recv_ns: u64,
    seq_errors: u64,
    error_frames: BTreeMap<String, u64>,
    unparsed: u64,
    closed: Option<String>,
}

async fn subscriber(
    shared: Arc<Shared>,
    url: String,
    topic: usize,
    gate: Arc<Semaphore>,
    ready: mpsc::UnboundedSender<anyhow::Result<()>>,
) -> SubReport {
    let mut report = SubReport {
        latency: Histogram::new(),
        received: 0,
        warmup_received: 0,
        last_recv_ns: 0,
        seq_errors: 0,
        error_frames: BTreeMap::new(),
        unparsed: 0,
        closed: None,
    };
    let permit = gate.acquire_owned().await;
    let mut ws = match open_subscriber(&url, &shared.topics[topic]).await {
        Ok(ws) => ws,
        Err(e) => {
            let _ = ready.send(Err(e));
            return report;
        }
    };
    drop(permit);
    let _ = ready.send(Ok(()));
    let mut phase = shared.phase.subscribe();
    let mut last_seq = 0u64;
    loop {
        tokio::select! {
            biased;
            next = ws.next() => match next {
                Some(Ok(Message::Text(text))) => {
                    let now = shared.now_ns();
                    let parsed = match fast_message(&text) {
                        Some((seq, t, w)) => Ok(Incoming {
                            ty: Cow::Borrowed("message"), seq: Some(seq), data: Some(Stamp { t, w }), code: None,
                        }),
                        None => serde_json::from_str::<Incoming<'_>>(&text),
                    };
                    match parsed {
                        Ok(Incoming { ty, seq, data, code }) => match &*ty {
                            "message" => {
                                let seq = seq.unwrap_or(0);
                                if seq <= last_seq {
                                    report.seq_errors += 1;
                                }
                                last_seq = seq;
                                match data {
                                    Some(Stamp { w: true, .. }) => report.warmup_received += 1,
                                    Some(Stamp { t, .. }) => {
                                        report.latency.record(now.saturating_sub(t));
                                        report.received += 1;
                                        report.last_recv_ns = now;
                                    }
                                    None => report.unparsed += 1,
                                }
                                shared.delivered_one();
                            }
                            "error" => {
                                *report.error_frames.entry(code.unwrap_or_default().into_owned()).or_default() += 1
                            }
                            _ => {}
                        },
                        Err(_) => report.unparsed += 1,
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    report.closed = Some(format!("closed by the server: {frame:?}"));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    report.closed = Some(e.to_string());
                    break;
                }
                None => {
                    report.closed = Some("connection ended".to_owned());
                    break;
                }
            },
            _ = phase.wait_for(|p| *p == Phase::Stop) => break,
        }
    }
    report
}

/// What one publisher did.
struct PubReport {
    sent: u64,
    acks: u64,
    error_frames: BTreeMap<String, u64>,
    closed: Option<String>,
}

/// The publisher's reading half: counts `ack`s and `error`s until the run stops.
async fn publisher_reader(
    shared: Arc<Shared>,
    mut stream: futures_util::stream::SplitStream<Ws>,
) -> (u64, BTreeMap<String, u64>, Option<String>) {
    let mut acks = 0;
    let mut errors = BTreeMap::new();
    let mut phase = shared.phase.subscribe();
    let closed = loop {
        tokio::select! {
            biased;
            next = stream.next() => match next {
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<Incoming<'_>>(&text) {
                    Ok(f) if f.ty == "ack" => acks += 1,
                    Ok(f) if f.ty == "error" => *errors.entry(f.code.unwrap_or_default().into_owned()).or_default() += 1,
                    Ok(_) => {}
                    Err(_) => *errors.entry("unparsed".to_owned()).or_default() += 1,
                },
                Some(Ok(Message::Close(frame))) => break Some(format!("closed by the server: {frame:?}")),
                Some(Ok(_)) => {}
                Some(Err(e)) => break Some(e.to_string()),
                None => break Some("connection ended".to_owned()),
            },
            _ = phase.wait_for(|p| *p == Phase::Stop) => break None,
        }
    };
    (acks, errors, closed)
}

/// The publish frame for one message, its `data` padded to about `payload_bytes`.
fn publish_frame(topic: &str, t: u64, warmup: bool, pad: &str, ack: u64) -> String {
    let w = if warmup { r#","w":true"# } else { "" };
    format!(r#"{{"type":"publish","topic":"{topic}","data":{{"t":{t}{w},"pad":"{pad}"}},"ack":{ack}}}"#)
}

/// Settings every publisher shares.
struct PubPlan {
    url: String,
    index: usize,
    publishers: usize,
    messages: u64,
    warmup: u64,
    pad: String,
    /// Seconds between two publishes of this publisher; 0 for the window mode.
    interval: f64,
    /// Outstanding deliveries allowed in window mode.
    bound: u64,
    duration: Duration,
}

/// How a publisher's sending went: messages sent and the time of the last.
struct SendDone {
    sent: u64,
    last_send_ns: u64,
}

async fn publisher(
    shared: Arc<Shared>,
    plan: PubPlan,
    gate: Arc<Semaphore>,
    ready: mpsc::UnboundedSender<anyhow::Result<()>>,
    done: mpsc::UnboundedSender<SendDone>,
) -> PubReport {
    let permit = gate.acquire_owned().await;
    let ws = match open(&plan.url).await {
        Ok(ws) => ws,
        Err(e) => {
            let _ = ready.send(Err(e));
            let _ = done.send(SendDone { sent: 0, last_send_ns: 0 });
            return PubReport { sent: 0, acks: 0, error_frames: BTreeMap::new(), closed: None };
        }
    };
    drop(permit);
    let (mut sink, stream) = ws.split();
    let reader = tokio::spawn(publisher_reader(Arc::clone(&shared), stream));
    let _ = ready.send(Ok(()));

    let topics = shared.topics.len();
    let mut ack = 0u64;
    let mut write_error = None;
    // Round robin over the topics, each publisher starting at its own.
    let topic_of = |m: u64| (plan.index + m as usize) % topics;

    shared.wait_phase(Phase::Warmup).await;
    let warmup_deadline = tokio::time::Instant::now() + plan.duration;
    for m in 0..plan.warmup {
        let k = topic_of(m);
        if !shared.wait_window(plan.bound.saturating_sub(shared.fanout[k]), warmup_deadline).await {
            break;
        }
        shared.owed.fetch_add(shared.fanout[k], Ordering::AcqRel);
        ack += 1;
        let frame = publish_frame(&shared.topics[k], shared.now_ns(), true, &plan.pad, ack);
        if let Err(e) = sink.send(Message::text(frame)).await {
            write_error = Some(e.to_string());
            break;
        }
    }
    let _ = done.send(SendDone { sent: plan.warmup, last_send_ns: 0 });

    shared.wait_phase(Phase::Measure).await;
    let start = tokio::time::Instant::now();
    let deadline = start + plan.duration;
    let mut sent = 0;
    let mut last_send_ns = 0;
    let mut unflushed = 0;
    // Spread the publishers' schedules over one interval.
    let offset = plan.interval * plan.index as f64 / plan.publishers as f64;
    for m in 0..plan.messages {
        if write_error.is_some() {
            break;
        }
        let k = topic_of(plan.warmup + m);
        if plan.interval > 0.0 {
            let due = start + Duration::from_secs_f64(offset + plan.interval * m as f64);
            if due >= deadline {
                break;
            }
            if due > tokio::time::Instant::now() {
                if unflushed > 0 {
                    if let Err(e) = sink.flush().await {
                        write_error = Some(e.to_string());
                        break;
                    }
                    unflushed = 0;
                }
                tokio::time::sleep_until(due).await;
            }
        } else {
            if shared.outstanding() + shared.fanout[k] > plan.bound && unflushed > 0 {
                if let Err(e) = sink.flush().await {
                    write_error = Some(e.to_string());
                    break;
                }
                unflushed = 0;
            }
            if !shared.wait_window(plan.bound.saturating_sub(shared.fanout[k]), deadline).await {
                break;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        shared.owed.fetch_add(shared.fanout[k], Ordering::AcqRel);
        shared.owed_measured.fetch_add(shared.fanout[k], Ordering::AcqRel);
        ack += 1;
        let now = shared.now_ns();
        let frame = publish_frame(&shared.topics[k], now, false, &plan.pad, ack);
        if let Err(e) = sink.feed(Message::text(frame)).await {
            write_error = Some(e.to_string());
            break;
        }
        sent += 1;
        last_send_ns = now;
        unflushed += 1;
        if unflushed >= 16 || plan.interval > 0.0 {
            if let Err(e) = sink.flush().await {
                write_error = Some(e.to_string());
                break;
            }
            unflushed = 0;
        }
    }
    if write_error.is_none() {
        if let Err(e) = sink.flush().await {
            write_error = Some(e.to_string());
        }
    }
    let _ = done.send(SendDone { sent, last_send_ns });
    let (acks, error_frames, closed) = reader.await.unwrap_or_else(|e| (0, BTreeMap::new(), Some(e.to_string())));
    PubReport { sent, acks, error_frames, closed: write_error.or(closed) }
}

/// Waits until every owed delivery arrived or `timeout` passed; true if all arrived.
async fn drain(shared: &Shared, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if shared.outstanding() == 0 {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let threads = match cli.threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
        n => n,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?;
    runtime.block_on(run(cli, threads))
}

async fn run(cli: Cli, threads: usize) -> anyhow::Result<()> {
    let (shared, bound) = plan(&cli)?;
    // `{"t":1234567890123,"pad":""}` is 29 bytes; the pad makes up the rest.
    let pad = "x".repeat(cli.payload_bytes.saturating_sub(29));
    let load_at_start = proc_stat::loadavg();

    let gate = Arc::new(Semaphore::new(cli.connect_batch.max(1)));
    let (ready_tx, ready_rx) = mpsc::unbounded_channel();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let connect_started = Instant::now();
    let subs: Vec<JoinHandle<SubReport>> = (0..cli.subscribers)
        .map(|i| {
            let task =
                subscriber(Arc::clone(&shared), cli.url.clone(), i % cli.topics, Arc::clone(&gate), ready_tx.clone());
            tokio::spawn(task)
        })
        .collect();
    let pubs: Vec<JoinHandle<PubReport>> = (0..cli.publishers)
        .map(|index| {
            let plan = PubPlan {
                url: cli.publish_url.clone().unwrap_or_else(|| cli.url.clone()),
                index,
                publishers: cli.publishers,
                messages: cli.messages,
                warmup: cli.warmup,
                pad: pad.clone(),
                interval: if cli.rate > 0.0 { cli.publishers as f64 / cli.rate } else { 0.0 },
                bound,
                duration: Duration::from_secs_f64(cli.duration),
            };
            tokio::spawn(publisher(Arc::clone(&shared), plan, Arc::clone(&gate), ready_tx.clone(), done_tx.clone()))
        })
        .collect();
    drop((ready_tx, done_tx));
    await_connections(&cli, &shared, ready_rx).await?;
    let connect_secs = connect_started.elapsed().as_secs_f64();
    eprintln!("[{}] {} connections set up in {connect_secs:.2}s", cli.label, cli.subscribers + cli.publishers);

    // Warm-up: publish, then wait for every warm-up delivery.
    let _ = shared.phase.send(Phase::Warmup);
    for _ in 0..cli.publishers {
        done_rx.recv().await;
    }
    let warmup_complete = drain(&shared, Duration::from_secs_f64(cli.drain_timeout)).await;

    // Measured phase.
    let cpu_server_0 = cli.server_pid.and_then(proc_stat::cpu_ticks);
    let cpu_self_0 = proc_stat::self_cpu_ticks();
    let t0 = shared.now_ns();
    let _ = shared.phase.send(Phase::Measure);
    let mut last_send_ns = t0;
    let mut sent_total = 0;
    for _ in 0..cli.publishers {
        if let Some(d) = done_rx.recv().await {
            sent_total += d.sent;
            last_send_ns = last_send_ns.max(d.last_send_ns);
        }
    }
    let complete = drain(&shared, Duration::from_secs_f64(cli.drain_timeout)).await;
    let t_end = shared.now_ns();
    let cpu_server_1 = cli.server_pid.and_then(proc_stat::cpu_ticks);
    let cpu_self_1 = proc_stat::self_cpu_ticks();
    let _ = shared.phase.send(Phase::Stop);

    let run = Measured {
        load_at_start,
        connect_secs,
        warmup_complete,
        complete,
        t0,
        t_end,
        last_send_ns,
        sent_total,
        owed: shared.owed_measured.load(Ordering::Acquire),
        cpu_server: (cpu_server_0, cpu_server_1),
        cpu_self: (cpu_self_0, cpu_self_1),
    };
    let subs = SubTotals::collect(subs, t0).await?;
    let pubs = PubTotals::collect(pubs, cli.messages).await?;
    report(&cli, threads, &run, &subs, &pubs)
}

/// Checks the parameters and sets up the state every task shares; also
/// returns the bound on deliveries in flight the publishers keep to.
fn plan(cli: &Cli) -> anyhow::Result<(Arc<Shared>, u64)> {
    if cli.subscribers == 0 || cli.publishers == 0 || cli.topics == 0 {
        bail!("--subscribers, --publishers and --topics must be positive");
    }
    if cli.topics > cli.subscribers {
        bail!("--topics must not exceed --subscribers (every topic needs a subscriber)");
    }
    let topics: Vec<String> = (0..cli.topics).map(|k| format!("bench.{k}")).collect();
    let mut fanout = vec![0u64; cli.topics];
    for i in 0..cli.subscribers {
        fanout[i % cli.topics] += 1;
    }
    let max_fanout = fanout.iter().copied().max().unwrap_or(1);
    let bound = cli.window.max(1) * cli.publishers as u64 * max_fanout;
    let (phase, _) = watch::channel(Phase::Connecting);
    let shared = Arc::new(Shared {
        base: Instant::now(),
        topics,
        fanout,
        owed: AtomicU64::new(0),
        owed_measured: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        progress: Notify::new(),
        notify_every: (bound / 8).clamp(1, 4096),
        phase,
    });
    Ok((shared, bound))
}

/// Waits until every connection is set up, within `--connect-timeout`;
/// stops every task otherwise.
async fn await_connections(
    cli: &Cli,
    shared: &Shared,
    mut ready_rx: mpsc::UnboundedReceiver<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let connections = cli.subscribers + cli.publishers;
    let connected = tokio::time::timeout(Duration::from_secs_f64(cli.connect_timeout), async {
        for _ in 0..connections {
            match ready_rx.recv().await {
                Some(Ok(())) => {}
                Some(Err(e)) => return Err(e),
                None => bail!("a connection task ended early"),
            }
        }
        Ok(())
    })
    .await;
    match connected {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            let _ = shared.phase.send(Phase::Stop);
            Err(e.context("setting up connections"))
        }
        Err(_) => {
            let _ = shared.phase.send(Phase::Stop);
            bail!("connecting {connections} connections took longer than {}s", cli.connect_timeout);
        }
    }
}

/// What the measured phase saw, besides the tasks' own reports.
struct Measured {
    load_at_start: Option<[f64; 3]>,
    connect_secs: f64,
    warmup_complete: bool,
    complete: bool,
    t0: u64,
    t_end: u64,
    last_send_ns: u64,
    sent_total: u64,
    /// Deliveries owed for the measured publishes.
    owed: u64,
    cpu_server: (Option<u64>, Option<u64>),
    cpu_self: (Option<u64>, Option<u64>),
}

/// Every subscriber's report, summed.
struct SubTotals {
    latency: Histogram,
    received: u64,
    warmup_received: u64,
    last_recv_ns: u64,
    seq_errors: u64,
    unparsed: u64,
    error_frames: BTreeMap<String, u64>,
    closed: BTreeMap<String, u64>,
}

impl SubTotals {
    async fn collect(subs: Vec<JoinHandle<SubReport>>, t0: u64) -> anyhow::Result<Self> {
        let mut t = Self {
            latency: Histogram::new(),
            received: 0,
            warmup_received: 0,
            last_recv_ns: t0,
            seq_errors: 0,
            unparsed: 0,
            error_frames: BTreeMap::new(),
            closed: BTreeMap::new(),
        };
        for task in subs {
            let r = task.await.context("subscriber task")?;
            t.latency.merge(&r.latency);
            t.received += r.received;
            t.warmup_received += r.warmup_received;
            t.last_recv_ns = t.last_recv_ns.max(r.last_recv_ns);
            t.seq_errors += r.seq_errors;
            t.unparsed += r.unparsed;
            for (code, n) in r.error_frames {
                *t.error_frames.entry(code).or_default() += n;
            }
            if let Some(why) = r.closed {
                *t.closed.entry(why).or_default() += 1;
            }
        }
        Ok(t)
    }
}

/// Every publisher's report, summed.
struct PubTotals {
    acks: u64,
    error_frames: BTreeMap<String, u64>,
    closed: BTreeMap<String, u64>,
}

impl PubTotals {
    async fn collect(pubs: Vec<JoinHandle<PubReport>>, messages: u64) -> anyhow::Result<Self> {
        let mut t = Self { acks: 0, error_frames: BTreeMap::new(), closed: BTreeMap::new() };
        for task in pubs {
            let r = task.await.context("publisher task")?;
            t.acks += r.acks;
            debug_assert!(r.sent <= messages);
            for (code, n) in r.error_frames {
                *t.error_frames.entry(code).or_default() += n;
            }
            if let Some(why) = r.closed {
                *t.closed.entry(format!("publisher: {why}")).or_default() += 1;
            }
        }
        Ok(t)
    }
}

/// Prints the summary line (and the errors, if any) and writes the JSON report.
fn report(cli: &Cli, threads: usize, run: &Measured, subs: &SubTotals, pubs: &PubTotals) -> anyhow::Result<()> {
    let (owed, received, sent_total, t0) = (run.owed, subs.received, run.sent_total, run.t0);
    let (latency, seq_errors, unparsed) = (&subs.latency, subs.seq_errors, subs.unparsed);
    let (error_frames, pub_errors) = (&subs.error_frames, &pubs.error_frames);
    let mut closed = subs.closed.clone();
    closed.extend(pubs.closed.iter().map(|(k, v)| (k.clone(), *v)));
    let lost = owed.saturating_sub(received);
    let send_secs = (run.last_send_ns.saturating_sub(t0)) as f64 / 1e9;
    let recv_secs = (subs.last_recv_ns.saturating_sub(t0)) as f64 / 1e9;
    let window_secs = (run.t_end - t0) as f64 / 1e9;
    let per_sec = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let cpu = |(a, b): (Option<u64>, Option<u64>)| match (a, b) {
        (Some(a), Some(b)) if window_secs > 0.0 => {
            Some((b - a) as f64 / proc_stat::TICKS_PER_SEC / window_secs * 100.0)
        }
        _ => None,
    };
    let us = |ns: u64| ns as f64 / 1000.0;
    let report = json!({
        "label": cli.label,
        "url": cli.url,
        "publish_url": cli.publish_url.as_deref().unwrap_or(&cli.url),
        "params": {
            "subscribers": cli.subscribers, "publishers": cli.publishers, "messages": cli.messages,
            "payload_bytes": cli.payload_bytes, "topics": cli.topics, "rate": cli.rate, "window": cli.window,
            "duration_s": cli.duration, "warmup": cli.warmup, "loadgen_threads": threads,
        },
        "loadavg_at_start": run.load_at_start,
        "meta": cli.meta.iter().cloned().collect::<BTreeMap<_, _>>(),
        "connect_s": run.connect_secs,
        "warmup_complete": run.warmup_complete,
        "warmup_received": subs.warmup_received,
        "published": sent_total,
        "acks": pubs.acks,
        "deliveries_owed": owed,
        "delivered": received,
        "lost": lost,
        "complete": run.complete,
        "publish_secs": send_secs,
        "deliver_secs": recv_secs,
        "publishes_per_s": per_sec(sent_total, send_secs),
        "deliveries_per_s": per_sec(received, recv_secs),
        "latency_us": {
            "min": us(latency.min()), "mean": us(latency.mean()),
            "p50": us(latency.quantile(0.50)), "p90": us(latency.quantile(0.90)),
            "p99": us(latency.quantile(0.99)), "p999": us(latency.quantile(0.999)),
            "max": us(latency.max()), "count": latency.count(),
        },
        "errors": {
            "lost": lost,
            "seq_out_of_order": seq_errors,
            "unparsed": unparsed,
            "subscriber_error_frames": error_frames,
            "publisher_error_frames": pub_errors,
            "closed_connections": closed,
        },
        "cpu_percent": { "server": cpu(run.cpu_server), "loadgen": cpu(run.cpu_self) },
    });
    let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}%"));
    println!(
        "[{label}] published {sent_total} ({pps:.0}/s), delivered {received}/{owed} ({dps:.0}/s), lost {lost}, \
         latency p50 {p50:.0}us p99 {p99:.0}us max {max:.0}us, cpu server {cs} loadgen {cl}",
        label = cli.label,
        pps = per_sec(sent_total, send_secs),
        dps = per_sec(received, recv_secs),
        p50 = us(latency.quantile(0.5)),
        p99 = us(latency.quantile(0.99)),
        max = us(latency.max()),
        cs = f(cpu(run.cpu_server)),
        cl = f(cpu(run.cpu_self)),
    );
    let bad = seq_errors + unparsed + error_frames.values().sum::<u64>() + pub_errors.values().sum::<u64>();
    if lost > 0 || bad > 0 || !closed.is_empty() {
        println!(
            "[{}] errors: lost {lost}, out-of-order {seq_errors}, unparsed {unparsed}, error frames {:?} / {:?}, closed {:?}",
            cli.label, error_frames, pub_errors, closed
        );
    }
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_path_reads_both_servers_frames() {
        let cw =
            r#"{"type":"message","topic":"bench.0","seq":12,"from":"0a1b2c3d4e5f","data":{"t":987654321,"pad":"xx"}}"#;
        assert_eq!(fast_message(cw), Some((12, 987654321, false)));
        let warm =
            r#"{"type":"message","topic":"bench.3","seq":1,"from":"000000000001","data":{"t":5,"w":true,"pad":""}}"#;
        assert_eq!(fast_message(warm), Some((1, 5, true)));
        assert_eq!(fast_message(r#"{"type":"ack","ack":1,"seq":2}"#), None);
        assert_eq!(fast_message(r#"{"type":"message","topic":"a","seq":1,"from":"p","data":7}"#), None);
    }

    #[test]
    fn publish_frames_are_protocol_frames() {
        let text = publish_frame("bench.0", 42, true, "xxxx", 7);
        let ClientFrame::Publish { topic, data, ack } = ClientFrame::decode(&text).unwrap() else { panic!() };
        assert_eq!((topic.as_str(), data.get(), ack), ("bench.0", r#"{"t":42,"w":true,"pad":"xxxx"}"#, Some(7)));
    }
}
