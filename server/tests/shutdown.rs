//! Graceful shutdown: every peer gets close 1001, and shutdown finishes.

mod common;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use common::*;
use crosswire_server::{Hooks, HttpResponse, Peer, UpgradeRequest};
use crosswire_shared::close_code;
use futures_util::SinkExt;

#[tokio::test]
async fn shutdown_closes_every_peer_with_1001() {
    let server = start_pubsub(config()).await;
    let addr = server.local_addr();
    let mut clients = vec![];
    for _ in 0..5 {
        let mut c = Client::connect(addr).await;
        c.subscribe("t").await;
        clients.push(c);
    }
    let readers: Vec<_> = clients.into_iter().map(|mut c| tokio::spawn(async move { c.closed().await })).collect();
    tokio::time::timeout(WAIT, server.shutdown()).await.expect("shutdown finishes within its grace");
    for r in readers {
        let frame = r.await.unwrap().expect("a close frame");
        assert_eq!(u16::from(frame.code), close_code::GOING_AWAY);
    }
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn shutdown_is_bounded_by_the_grace_period_when_peers_never_answer() {
    let mut config = config();
    config.shutdown_grace = Duration::from_secs(3);
    let server = start_pubsub(config).await;
    // A peer that never reads, so never answers the close.
    let _mute = Client::connect(server.local_addr()).await;
    let started = tokio::time::Instant::now();
    server.shutdown().await;
    assert!(started.elapsed() <= Duration::from_secs(3));
}

/// Hooks whose `upgrade` waits for the test's go-ahead, so the shutdown
/// signal can come while an upgrade is in flight; and whose `message` hook
/// never returns, holding a guard that tells when its task was ended.
struct Gated {
    entered: Arc<tokio::sync::Notify>,
    release: Arc<tokio::sync::Notify>,
    dropped: Arc<AtomicBool>,
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Hooks for Gated {
    type Context = ();

    async fn upgrade(&self, request: &UpgradeRequest) -> Result<(), HttpResponse> {
        if request.query_param("gate").is_some() {
            self.entered.notify_one();
            self.release.notified().await;
        }
        Ok(())
    }

    async fn message(&self, _peer: &Peer<()>, _message: crosswire_server::Message) {
        let _guard = SetOnDrop(Arc::clone(&self.dropped));
        self.entered.notify_one();
        std::future::pending::<()>().await;
    }
}

fn gated() -> (Gated, Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>, Arc<AtomicBool>) {
    let entered = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let dropped = Arc::new(AtomicBool::new(false));
    let hooks = Gated { entered: Arc::clone(&entered), release: Arc::clone(&release), dropped: Arc::clone(&dropped) };
    (hooks, entered, release, dropped)
}

/// A connection whose upgrade is in flight when the signal comes still gets
/// its 1001, and the shutdown does not wait out its grace period for it.
#[tokio::test]
async fn an_upgrade_in_flight_at_shutdown_gets_1001() {
    let mut config = config();
    config.shutdown_grace = Duration::from_secs(60);
    let (hooks, entered, release, _) = gated();
    let server = start_with(config, hooks).await;
    let addr = server.local_addr();
    let connecting =
        tokio::spawn(async move { tokio_tungstenite::connect_async(format!("ws://{addr}/_ws?gate=1")).await });
    entered.notified().await;
    let shutdown = tokio::spawn(server.shutdown());
    // Let the shutdown signal go out before the upgrade completes.
    tokio::task::yield_now().await;
    release.notify_one();
    let (mut ws, _) = connecting.await.unwrap().expect("the request in flight completes");
    let frame = closed(&mut ws).await.expect("a close frame");
    assert_eq!(u16::from(frame.code), close_code::GOING_AWAY);
    tokio::time::timeout(WAIT, shutdown).await.expect("shutdown does not wait out its grace").unwrap();
}

/// After the grace period, whatever still runs is ended: `shutdown()`
/// returns with no task of the server's left, even one stuck in a hook.
#[tokio::test(start_paused = true)]
async fn after_the_grace_period_no_task_is_left_running() {
    let mut config = config();
    config.shutdown_grace = Duration::from_secs(2);
    let (hooks, entered, _, dropped) = gated();
    let server = start_with(config, hooks).await;
    let mut client = connect_raw(server.local_addr()).await;
    client.send(tokio_tungstenite::tungstenite::Message::text("never answered")).await.unwrap();
    // The hook is stuck; its peer's task can never finish by itself.
    entered.notified().await;
    let started = tokio::time::Instant::now();
    server.shutdown().await;
    assert!(started.elapsed() <= Duration::from_secs(3), "bounded by the grace period");
    assert!(dropped.load(Ordering::SeqCst), "the stuck hook's task was ended, not left running");
}

/// A peer with a full queue behind a stalled socket still gets its 1001
/// promptly: the shutdown's close overtakes the queue.
#[tokio::test]
async fn shutdown_closes_a_backed_up_peer_with_1001() {
    let mut config = config();
    config.write_timeout = Duration::from_secs(120);
    config.shutdown_grace = Duration::from_secs(60);
    config.max_queue_bytes = 64 * 1024 * 1024;
    let server = start_pubsub(config).await;
    let handle = server.handle();
    let addr = server.local_addr();
    let (mut slow, _publisher) = stalled_and_flooded(addr, 300, 32 * 1024).await;
    wait_until("frames wait behind the stalled socket", || backed_up(&handle, &slow.peer)).await;
    let shutdown = tokio::spawn(server.shutdown());
    let (seqs, close) = seqs_until_close(&mut slow, "t").await;
    assert_contiguous(&seqs, 1, "before the shutdown");
    assert_eq!(close.map(|c| u16::from(c.code)), Some(close_code::GOING_AWAY));
    tokio::time::timeout(WAIT, shutdown).await.expect("shutdown finishes").unwrap();
}
