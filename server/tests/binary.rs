//! The `crosswire-server` binary itself: flags, the address line on stdout,
//! and a graceful stop: SIGTERM (a rolling restart) closes peers with 1012,
//! SIGINT (Ctrl-C) with 1001.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use crosswire_shared::close_code;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

/// Runs the binary, connects one peer, sends `signal`, and returns the close
/// code the peer got; asserts the process then exits cleanly.
async fn close_code_on(signal: &str) -> u16 {
    let mut child = Command::new(env!("CARGO_BIN_EXE_crosswire-server"))
        .args(["--port", "0", "--heartbeat-ms", "60000"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let base = line.trim().strip_prefix("crosswire listening on http://").expect(&line).to_owned();

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{base}/_ws")).await.unwrap();
    let welcome = ws.next().await.unwrap().unwrap();
    assert!(welcome.to_text().unwrap().contains(r#""heartbeat_ms":60000"#), "{welcome}");

    let status = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("closed in time") {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    drop(ws);
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(exit.success(), "exit status {exit}");
    u16::from(close.expect("a close code").code)
}

#[tokio::test]
async fn sigterm_closes_peers_with_1012_and_exits_cleanly() {
    assert_eq!(close_code_on("-TERM").await, close_code::SERVICE_RESTART);
}

#[tokio::test]
async fn sigint_closes_peers_with_1001_and_exits_cleanly() {
    assert_eq!(close_code_on("-INT").await, close_code::GOING_AWAY);
}

#[test]
fn bad_flags_are_refused_with_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_crosswire-server")).args(["--path", "no-slash"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must start with '/'"));
    let out =
        Command::new(env!("CARGO_BIN_EXE_crosswire-server")).env("CROSSWIRE_JWT_SECRET", "short").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 16 bytes"));
}

#[test]
fn the_config_file_is_read_and_its_errors_name_the_key() {
    let dir = std::env::temp_dir().join(format!("crosswire-binary-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("crosswire.toml");
    std::fs::write(&path, "path = \"no-slash\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_crosswire-server")).arg("--config").arg(&path).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must start with '/'"), "the file's value is used");
    std::fs::write(&path, "no-such-flag = 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_crosswire-server")).env("CROSSWIRE_CONFIG", &path).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown key `no-such-flag`") && stderr.contains(path.to_str().unwrap()), "{stderr}");
}
