//! The `crosswire-server` binary: protocol v1 pub/sub over WebSocket, plus
//! the demo app's static files when given `--static dist`.

use crosswire_server::{parse_cli, stop_signal, Args, PubSub, Server};
use tracing_subscriber::EnvFilter;

/// crosswire: WebSocket pub/sub server.
#[derive(Debug, clap::Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let config = parse_cli::<Cli>()?.args.into_config()?;
    let server = Server::new(config.clone(), PubSub::new(&config)).bind().await?;
    // Before the address goes out: whoever reads it may signal at once.
    // SIGTERM is a restart (peers get 1012 and move to another node), Ctrl-C a stop (1001).
    let signal = stop_signal();
    // One line on stdout, so scripts (and tests using port 0) learn the address.
    println!("crosswire listening on http://{}", server.local_addr());
    server.run_until_stop(signal).await;
    Ok(())
}
