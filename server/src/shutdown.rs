//! Graceful shutdown that reaches every task crosswire starts.
//!
//! Two tokens and a tracker (tokio-util's `CancellationToken` and
//! `TaskTracker`): every task is spawned through [`ShutdownHandles::spawn`],
//! so the tracker knows it; `graceful` asks each to finish (peers get their
//! 1001); when the grace period is over, `abort` ends whatever still runs at
//! its next poll. A token, unlike a broadcast channel, also answers a task
//! that starts listening after it fired: a connection whose upgrade was in
//! flight when the signal came still gets its 1001, instead of never hearing
//! of the shutdown and holding the drain for the whole grace period.

use std::{future::Future, time::Duration};

use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// What every task needs to take part in shutdown. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct ShutdownHandles {
    graceful: CancellationToken,
    abort: CancellationToken,
    tracker: TaskTracker,
}

impl ShutdownHandles {
    /// Resolves once shutdown was asked for; at once if it already was.
    pub(crate) async fn cancelled(&self) {
        self.graceful.cancelled().await;
    }

    /// The token that shutdown cancels first: for tasks that are not spawned
    /// through [`spawn`](Self::spawn) (an engine's), to stop with it.
    pub(crate) fn token(&self) -> CancellationToken {
        self.graceful.clone()
    }

    /// Spawns a task the shutdown waits for, and ends (its output `None`) if
    /// it is still running when the grace period is over.
    pub(crate) fn spawn<F>(&self, task: F) -> JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let abort = self.abort.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                biased;
                _ = abort.cancelled() => None,
                output = task => Some(output),
            }
        })
    }
}

/// The server's end: asks every task to stop and waits for them.
#[derive(Debug)]
pub(crate) struct ShutdownController {
    handles: ShutdownHandles,
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Drained {
    /// Tasks still running when the grace period was over, then ended.
    pub(crate) aborted: usize,
}

impl ShutdownController {
    pub(crate) fn new() -> Self {
        Self {
            handles: ShutdownHandles {
                graceful: CancellationToken::new(),
                abort: CancellationToken::new(),
                tracker: TaskTracker::new(),
            },
        }
    }

    pub(crate) fn handles(&self) -> ShutdownHandles {
        self.handles.clone()
    }

    /// Tells every task to stop and waits for them, at most `grace`; then ends
    /// the rest. When this returns, no task spawned through the handles runs.
    pub(crate) async fn drain(self, grace: Duration) -> Drained {
        let ShutdownHandles { graceful, abort, tracker } = self.handles;
        graceful.cancel();
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_ok() {
            return Drained { aborted: 0 };
        }
        let aborted = tracker.len();
        abort.cancel();
        // Each task is dropped at its next poll, which the token's wake-up
        // brings at once: this wait is short whatever the tasks were doing.
        tracker.wait().await;
        Drained { aborted }
    }
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM: what a server binary
/// passes to [`crate::RunningServer::run_until`].
///
/// The handlers are installed when this is called, not when the future is
/// first polled: a binary calls it before announcing its address, so a
/// SIGTERM sent right after never meets the default action (an abrupt exit
/// with no 1001 for anyone). Call it inside the tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut streams: Vec<_> = [SignalKind::interrupt(), SignalKind::terminate()]
            .into_iter()
            .filter_map(|kind| match signal(kind) {
                Ok(stream) => Some(stream),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for a shutdown signal");
                    None
                }
            })
            .collect();
        async move {
            if streams.is_empty() {
                return std::future::pending().await;
            }
            let any = futures_util::future::select_all(streams.iter_mut().map(|s| Box::pin(s.recv())));
            any.await;
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
