//! The handler from the reference article ("Websockets with TanStack Start"),
//! reproduced with crosswire's hooks:
//!
//! ```ts
//! open(peer)        { peer.publish("test", `User ${peer} has connected!`);
//!                     peer.send("You have connected successfully!"); peer.subscribe("test"); }
//! message(peer, msg){ peer.publish("test", msg.text()); peer.send("Hello to you!"); }
//! close(peer)       { peer.publish("test", `User ${peer} has disconnected!`); }
//! ```
//!
//! `cargo run -p crosswire-server --example seed -- --port 3000`, then connect to
//! `ws://localhost:3000/_ws`.

use clap::Parser;
use crosswire_server::{
    shutdown_signal, Args, CloseDetails, Hooks, HttpResponse, Message, Peer, PeerError, Server, UpgradeRequest,
    Utf8Bytes,
};
use crosswire_shared::Topic;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

struct Seed {
    test: Topic,
}

impl Hooks for Seed {
    type Context = ();

    async fn upgrade(&self, _request: &UpgradeRequest) -> Result<(), HttpResponse> {
        Ok(())
    }

    async fn open(&self, peer: &Peer<()>) {
        peer.publish(&self.test, format!("User {peer} has connected!"));
        let _ = peer.send("You have connected successfully!");
        if let Err(e) = peer.subscribe(&self.test) {
            tracing::warn!(peer = %peer, error = %e, "cannot subscribe");
        }
    }

    async fn message(&self, peer: &Peer<()>, message: Message) {
        // `msg.text()`: text as it came (shared, not copied), binary as UTF-8.
        let text: Utf8Bytes = match message {
            Message::Text(text) => text,
            Message::Binary(data) => String::from_utf8_lossy(&data).into_owned().into(),
        };
        // Per message: debug, or a busy room writes more log than it relays.
        tracing::debug!(peer = %peer, %text, "msg");
        peer.publish(&self.test, text);
        let _ = peer.send("Hello to you!");
    }

    async fn close(&self, peer: &Peer<()>, details: CloseDetails) {
        peer.publish(&self.test, format!("User {peer} has disconnected!"));
        tracing::info!(peer = %peer, reason = %details.reason, "close");
    }

    async fn error(&self, peer: &Peer<()>, error: &PeerError) {
        tracing::info!(peer = %peer, %error, "error");
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let config = crosswire_server::parse_cli::<Cli>()?.args.into_config()?;
    let server = Server::new(config, Seed { test: Topic::new("test")? }).bind().await?;
    // Before the address goes out: whoever reads it may signal at once.
    let signal = shutdown_signal();
    println!("seed listening on ws://{}/_ws", server.local_addr());
    server.run_until(signal).await;
    Ok(())
}
