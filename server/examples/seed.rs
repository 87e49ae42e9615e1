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
};
use crosswire_shared::Topic;

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
        let text = String::from_utf8_lossy(message.as_bytes()).into_owned();
        tracing::info!(peer = %peer, %text, "msg");
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
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let config = Cli::parse().args.into_config()?;
    let server = Server::new(config, Seed { test: Topic::new("test")? }).bind().await?;
    println!("seed listening on ws://{}/_ws", server.local_addr());
    server.run_until(shutdown_signal()).await;
    Ok(())
}
