//! The `axum` example serves its own route, a `dist/` directory and
//! crosswire's `/_ws` from one port. The real example binary (built by
//! `cargo test`) is run on port 0.

mod common;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use common::{http_raw, message_data, Client};
use serde_json::json;

struct App {
    child: Child,
    addr: SocketAddr,
    dist: PathBuf,
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::remove_dir_all(&self.dist).ok();
    }
}

fn start_app() -> App {
    let dist = std::env::temp_dir().join(format!("crosswire-axum-dist-{}", std::process::id()));
    std::fs::create_dir_all(&dist).unwrap();
    std::fs::write(dist.join("index.html"), "<h1>demo</h1>").unwrap();
    // Integration tests live in target/<profile>/deps; examples beside it.
    let exe = std::env::current_exe().unwrap();
    let example = exe.parent().unwrap().parent().unwrap().join("examples").join("axum");
    assert!(example.exists(), "cargo test builds the axum example at {}", example.display());
    let mut child = Command::new(example)
        .args(["--port", "0", "--static"])
        .arg(&dist)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the example starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_owned();
    let addr = url.strip_prefix("http://").unwrap_or_else(|| panic!("an address on stdout: {line}")).parse().unwrap();
    App { child, addr, dist }
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) =
        http_raw(addr, &format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")).await;
    (status, body)
}

#[tokio::test]
async fn one_port_serves_the_apps_route_the_dist_and_the_websocket() {
    let app = start_app();
    assert_eq!(get(app.addr, "/api/hello").await, (200, "hello from the app\n".to_owned()));
    assert_eq!(get(app.addr, "/index.html").await, (200, "<h1>demo</h1>".to_owned()));

    let mut a = Client::connect(app.addr).await;
    let mut b = Client::connect(app.addr).await;
    a.subscribe("room").await;
    assert_eq!(b.publish("room", json!({"text": "hi"}), 7).await, 1);
    assert_eq!(message_data(&a.recv().await), (1, b.peer.clone(), json!({"text": "hi"})));
    // The WebSocket path answers a plain GET with the handshake's verdict, as standalone.
    assert_eq!(get(app.addr, "/_ws").await.0, 426);
    // The operations endpoints, served by the app from the endpoint's handle.
    assert_eq!(get(app.addr, "/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(get(app.addr, "/readyz").await, (200, "ready\n".to_owned()));
    let (status, metrics) = get(app.addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.lines().any(|l| l == "crosswire_publishes_total 1"), "{metrics}");
    assert!(metrics.lines().any(|l| l == "crosswire_upgrades_rejected_total{reason=\"bad_handshake\"} 1"), "{metrics}");
}
