//! `crosswire-idle`: opens `--connections` WebSockets to a server on
//! loopback, `--connect-batch` handshakes at a time, and keeps them idle.
//! Reports how long connecting all took (connects/s) and the server's RSS
//! growth per connection (from `/proc/<pid>/status`, sampled before the
//! first connect and after every connection has been idle for `--settle`
//! seconds). Run by `scripts/bench.sh` (scenario `idle`). It measures; it
//! asserts nothing.

use std::{net::SocketAddr, path::PathBuf, time::Duration, time::Instant};

use anyhow::Context as _;
use clap::Parser;
use futures_util::{stream, StreamExt};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::{client_async_with_config, tungstenite::protocol::WebSocketConfig, WebSocketStream};

/// Idle connections against a WebSocket server on loopback.
#[derive(Debug, Parser)]
struct Cli {
    /// The server's address (loopback only).
    #[arg(long)]
    addr: SocketAddr,
    /// The WebSocket path.
    #[arg(long, default_value = "/_ws")]
    path: String,
    /// The server's process id, for its RSS.
    #[arg(long)]
    pid: u32,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 64)]
    connect_batch: usize,
    /// Seconds every connection stays idle before the RSS is read.
    #[arg(long, default_value_t = 3.0)]
    settle: f64,
    /// A name for this run in the report.
    #[arg(long, default_value = "")]
    label: String,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Resident set size of `pid` in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("no VmRSS value")?.parse()?)
}

async fn connect(cli: &Cli) -> anyhow::Result<WebSocketStream<TcpStream>> {
    let tcp = TcpStream::connect(cli.addr).await?;
    let url = format!("ws://{}{}", cli.addr, cli.path);
    // The client side's buffers are not what is measured: keep them small so
    // ten thousand connections fit in the load generator too.
    let config = WebSocketConfig::default().read_buffer_size(1024).write_buffer_size(0);
    let (ws, _) = client_async_with_config(url, tcp, Some(config)).await?;
    Ok(ws)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(cli.addr.ip().is_loopback(), "loopback only");
    let before = rss_kib(cli.pid)?;
    let started = Instant::now();
    let results: Vec<_> = stream::iter(0..cli.connections)
        .map(|_| connect(&cli))
        .buffer_unordered(cli.connect_batch.max(1))
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let failed = results.iter().filter(|r| r.is_err()).count();
    if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
        eprintln!("first connect error: {e:#}");
    }
    let held: Vec<_> = results.into_iter().filter_map(Result::ok).collect();
    // Idle means idle: nothing is read or written while the server settles.
    tokio::time::sleep(Duration::from_secs_f64(cli.settle)).await;
    let after = rss_kib(cli.pid)?;
    let open = held.len();
    let per_connection = if open > 0 { (after.saturating_sub(before) as f64 * 1024.0) / open as f64 } else { 0.0 };
    let report = json!({
        "label": cli.label,
        "connections": open,
        "failed": failed,
        "connect_seconds": elapsed,
        "connects_per_s": open as f64 / elapsed,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "rss_bytes_per_connection": per_connection,
    });
    println!(
        "{}: {open} connections ({failed} failed) in {elapsed:.2} s ({:.0}/s); server RSS {before} -> {after} KiB, {:.0} bytes per connection",
        cli.label,
        open as f64 / elapsed,
        per_connection
    );
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    drop(held);
    Ok(())
}
