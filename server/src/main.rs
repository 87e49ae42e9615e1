//! The `crosswire-server` binary: protocol v1 pub/sub over WebSocket, plus
//! the demo app's static files when given `--static dist`.

use crosswire_server::{parse_cli, stop_signal, Args, PubSub, Server, ServerConfig};
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
    log_access(&config);
    let server = Server::new(config.clone(), PubSub::new(&config)).bind().await?;
    // Before the address goes out: whoever reads it may signal at once.
    // SIGTERM is a restart (peers get 1012 and move to another node), Ctrl-C a stop (1001).
    let signal = stop_signal();
    // One line on stdout, so scripts (and tests using port 0) learn the address.
    println!("crosswire listening on http://{}", server.local_addr());
    server.run_until_stop(signal).await;
    Ok(())
}

/// Who may use which topics, said once at start: an open server should be
/// open on purpose.
fn log_access(config: &ServerConfig) {
    if config.jwt_secret.is_none() {
        tracing::warn!("no --jwt-secret: every client may subscribe and publish to every topic");
        return;
    }
    let list = |patterns: &[crosswire_server::protocol::TopicPattern]| {
        patterns.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(",")
    };
    tracing::info!(
        default_subscribe = %list(&config.jwt_default_subscribe),
        default_publish = %list(&config.jwt_default_publish),
        "JWT authentication on: a token without a subscribe or publish claim gets the defaults (--jwt-default-subscribe, \
         --jwt-default-publish; empty: no topic)"
    );
}
