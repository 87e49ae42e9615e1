//! The `crosswire-server` binary with extra knobs for performance experiments:
//! the same flags, plus the `Config` fields it has no flag for (tungstenite's
//! write and read buffer sizes). Used to measure what a default would change
//! before proposing it (see docs/BENCHMARKS.md):
//!
//! ```text
//! cargo run --release -p crosswire-bench --example tuned_server -- --port 0 --write-buffer-size 131072
//! ```

use clap::Parser;
use crosswire_server::{shutdown_signal, Args, PubSub, Server};

/// crosswire-server with tunable socket buffers.
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    args: Args,
    /// Bytes tungstenite gathers before writing to the socket (server default 16 KiB).
    #[arg(long, default_value_t = 16 * 1024)]
    write_buffer_size: usize,
    /// tungstenite's read buffer per connection (server default 16 KiB).
    #[arg(long, default_value_t = 16 * 1024)]
    read_buffer_size: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config = cli.args.into_config()?;
    config.write_buffer_size = cli.write_buffer_size;
    config.read_buffer_size = cli.read_buffer_size;
    let server = Server::new(config.clone(), PubSub::new(&config)).bind().await?;
    println!("crosswire listening on http://{}", server.local_addr());
    server.run_until(shutdown_signal()).await;
    Ok(())
}
