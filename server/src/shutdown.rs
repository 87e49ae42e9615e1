//! Graceful shutdown signalling, after mini-redis: every connection task holds
//! a [`Shutdown`] (a broadcast receiver) and a clone of an mpsc sender. The
//! server broadcasts once to ask everyone to stop, then waits until every
//! sender clone is dropped, which happens exactly when every task has ended.

use tokio::sync::{broadcast, mpsc};

/// Listens for the server's shutdown broadcast.
#[derive(Debug)]
pub(crate) struct Shutdown {
    is_shutdown: bool,
    notify: broadcast::Receiver<()>,
}

impl Shutdown {
    pub(crate) fn new(notify: broadcast::Receiver<()>) -> Self {
        Self { is_shutdown: false, notify }
    }

    /// Resolves once shutdown was requested; at once if it already was.
    pub(crate) async fn recv(&mut self) {
        if self.is_shutdown {
            return;
        }
        // Lagged or closed both mean the sender spoke or went away: either way, stop.
        let _ = self.notify.recv().await;
        self.is_shutdown = true;
    }
}

/// The two ends the server keeps: one to announce shutdown, one to learn when
/// every task holding a [`DrainGuard`] has finished.
#[derive(Debug)]
pub(crate) struct ShutdownController {
    notify: broadcast::Sender<()>,
    guard: Option<mpsc::Sender<()>>,
    drained: mpsc::Receiver<()>,
}

/// Held by a task for as long as shutdown must wait for it.
#[derive(Debug, Clone)]
pub(crate) struct DrainGuard {
    _tx: mpsc::Sender<()>,
}

impl ShutdownController {
    pub(crate) fn new() -> Self {
        let (notify, _) = broadcast::channel(1);
        let (tx, drained) = mpsc::channel(1);
        Self { notify, guard: Some(tx), drained }
    }

    pub(crate) fn guard(&self) -> DrainGuard {
        DrainGuard { _tx: self.guard.clone().expect("guards are handed out before draining") }
    }

    /// Tells every task to stop, then waits until all of them have.
    pub(crate) async fn drain(mut self) {
        let _ = self.notify.send(());
        self.guard = None;
        // Never receives a value: returns `None` once the last guard is dropped.
        let _ = self.drained.recv().await;
    }
}

/// What a task needs to take part in shutdown: a way to hear it, and a guard
/// that keeps the drain waiting for it. Cloned into every connection.
#[derive(Debug, Clone)]
pub(crate) struct ShutdownHandles {
    notify: broadcast::Sender<()>,
    guard: DrainGuard,
}

impl ShutdownHandles {
    pub(crate) fn split(&self) -> (Shutdown, DrainGuard) {
        (Shutdown::new(self.notify.subscribe()), self.guard.clone())
    }
}

impl ShutdownController {
    pub(crate) fn handles(&self) -> ShutdownHandles {
        ShutdownHandles { notify: self.notify.clone(), guard: self.guard() }
    }
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM: what a server binary
/// passes to [`crate::RunningServer::run_until`].
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
