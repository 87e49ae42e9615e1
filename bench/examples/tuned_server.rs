//! The `crosswire-server` binary with extra knobs for performance experiments:
//! the same flags, plus the `ServerConfig` field it has no flag for
//! (tungstenite's read buffer size; the write buffer has `--write-buffer-bytes`). Used to measure what a default would change
//! before proposing it (see docs/BENCHMARKS.md):
//!
//! ```text
//! cargo run --release -p crosswire-bench --example tuned_server -- --port 0 --read-buffer-size 65536
//! ```

use clap::Parser;
use crosswire_server::{shutdown_signal, Args, PubSub, Server, ServerConfig};
use tracing_subscriber::EnvFilter;

/// crosswire-server with tunable socket buffers.
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    args: Args,
    /// tungstenite's read buffer per connection.
    #[arg(long, default_value_t = ServerConfig::default().read_buffer_size)]
    read_buffer_size: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut config = cli.args.into_config()?;
    config.read_buffer_size = cli.read_buffer_size;
    let server = Server::new(config.clone(), PubSub::new(&config)).bind().await?;
    println!("crosswire listening on http://{}", server.local_addr());
    server.run_until(shutdown_signal()).await;
    Ok(())
}
