//! The `seed` example reproduces the reference article's handler message for
//! message. The real example binary (built by `cargo test`) is run on port 0.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

struct Seed {
    child: Child,
    url: String,
}

impl Drop for Seed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_seed() -> Seed {
    // Integration tests live in target/<profile>/deps; examples beside it.
    let exe = std::env::current_exe().unwrap();
    let examples = exe.parent().unwrap().parent().unwrap().join("examples").join("seed");
    assert!(examples.exists(), "cargo test builds the seed example at {}", examples.display());
    let mut child = Command::new(examples)
        .args(["--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("seed starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(url.starts_with("ws://127.0.0.1:") && url.ends_with("/_ws"), "{line}");
    Seed { child, url }
}

async fn next_text(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap() {
            Message::Text(t) => return t.to_string(),
            _ => continue,
        }
    }
}

#[tokio::test]
async fn seed_says_exactly_what_the_article_says() {
    let seed = start_seed();
    let (mut a, _) = tokio_tungstenite::connect_async(&seed.url).await.unwrap();
    assert_eq!(next_text(&mut a).await, "You have connected successfully!");

    let (mut b, _) = tokio_tungstenite::connect_async(&seed.url).await.unwrap();
    assert_eq!(next_text(&mut b).await, "You have connected successfully!");
    // a is subscribed to "test", so it hears b arrive; b's id is in the text.
    let joined = next_text(&mut a).await;
    let b_id = joined.strip_prefix("User ").and_then(|s| s.strip_suffix(" has connected!")).expect(&joined).to_owned();
    assert!(!b_id.is_empty());

    b.send(Message::text("hi there")).await.unwrap();
    assert_eq!(next_text(&mut b).await, "Hello to you!");
    assert_eq!(next_text(&mut a).await, "hi there");

    a.send(Message::text("and hello back")).await.unwrap();
    assert_eq!(next_text(&mut a).await, "Hello to you!");
    assert_eq!(next_text(&mut b).await, "and hello back");

    b.close(None).await.unwrap();
    assert_eq!(next_text(&mut a).await, format!("User {b_id} has disconnected!"));
}
