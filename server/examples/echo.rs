//! Echoes every text and binary message verbatim; the WebSocket conformance
//! suite (Autobahn|Testsuite, `scripts/autobahn.sh`) runs against it. Messages
//! up to 16 MiB are accepted, because the suite sends messages that large.
//!
//! `cargo run -p crosswire-server --example echo -- --port 9001`

use clap::Parser;
use crosswire_server::{shutdown_signal, Args, Hooks, HttpResponse, Message, Peer, Server, UpgradeRequest};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

struct Echo;

impl Hooks for Echo {
    type Context = ();

    async fn upgrade(&self, _request: &UpgradeRequest) -> Result<(), HttpResponse> {
        Ok(())
    }

    async fn message(&self, peer: &Peer<()>, message: Message) {
        let _ = peer.send(message);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let mut config = crosswire_server::parse_cli::<Cli>()?.args.into_config()?;
    config.max_message_size = 16 * 1024 * 1024;
    config.max_queue_bytes = 64 * 1024 * 1024;
    // Room for the suite's bursts of many small messages.
    config.outbound_queue = 65_536;
    let server = Server::new(config, Echo).bind().await?;
    // Before the address goes out: whoever reads it may signal at once.
    let signal = shutdown_signal();
    println!("echo listening on ws://{}/_ws", server.local_addr());
    server.run_until(signal).await;
    Ok(())
}
