//! Graceful shutdown that reaches every task crosswire starts.
//!
//! A token, a tracker and a table of abort handles: every task is spawned
//! through [`ShutdownHandles::spawn`], so the tracker (tokio-util's
//! `TaskTracker`) knows it; `graceful` (a `CancellationToken`) asks each to
//! finish (peers get their 1001, or 1012 for a restart: see
//! [`ShutdownKind`]); when the grace period is over, every task still in the
//! table is aborted, and one spawned after that is aborted as it starts. A
//! token, unlike a broadcast channel, also answers a task that starts
//! listening after it fired.
//!
//! The end of the grace period is not a second token every task polls: a
//! task polled `abort.cancelled()` at each of its wake-ups, and that took
//! the lock of the one waiter list every task shared (a tenth of the
//! instructions of a subscriber's wake-up, and contended across workers).
//! The table costs a lock when a task starts and one when it ends.
//!
//! Connections do not watch `graceful` themselves: polling it at every
//! wake-up takes a lock every peer shares. The server tells every peer it
//! has registered once the token is cancelled ([`ShutdownController::signal`],
//! then each peer's queue is closed), and a connection checks the token once
//! when it starts: a connection whose upgrade was in flight when the signal
//! came still gets its 1001, instead of never hearing of the shutdown and
//! holding the drain for the whole grace period.

use std::{
    collections::{hash_map::Entry, HashMap},
    future::Future,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
    time::Duration,
};

use crosswire_shared::close_code;
use tokio::task::{AbortHandle, Id, JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Why a server stops, which tells its peers where to reconnect.
///
/// A library-initiated shutdown ([`crate::RunningServer::shutdown`],
/// [`crate::Endpoint::shutdown`]) is [`GoingAway`](Self::GoingAway): the
/// service itself may be gone, so clients back off. The binary treats SIGTERM
/// as [`Restart`](Self::Restart) (what an orchestrator sends in a rolling
/// deploy: other nodes are up) and SIGINT (Ctrl-C) as `GoingAway`; see
/// [`stop_signal`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShutdownKind {
    /// Peers get 1001 (going away) and reconnect with their usual backoff.
    #[default]
    GoingAway,
    /// Peers get 1012 (service restart) and reconnect at once (jittered),
    /// to another node, recovering what they missed.
    Restart,
}

impl ShutdownKind {
    /// The close code and reason each peer gets.
    pub(crate) fn close_frame(self) -> (u16, &'static str) {
        match self {
            Self::GoingAway => (close_code::GOING_AWAY, "server shutting down"),
            Self::Restart => (close_code::SERVICE_RESTART, "server restarting"),
        }
    }
}

/// What every task needs to take part in shutdown. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct ShutdownHandles {
    graceful: CancellationToken,
    running: Arc<Running>,
    tracker: TaskTracker,
    /// Set once, before `graceful` fires, so every task that hears the
    /// shutdown reads why.
    kind: Arc<OnceLock<ShutdownKind>>,
}

impl ShutdownHandles {
    /// Whether shutdown was asked for: the server is draining.
    pub(crate) fn is_draining(&self) -> bool {
        self.graceful.is_cancelled()
    }

    /// Why the server stops; `GoingAway` until it was told.
    pub(crate) fn kind(&self) -> ShutdownKind {
        self.kind.get().copied().unwrap_or_default()
    }

    /// Resolves once shutdown was asked for; at once if it already was.
    pub(crate) async fn cancelled(&self) {
        self.graceful.cancelled().await;
    }

    /// The token that shutdown cancels first: for tasks that are not spawned
    /// through [`spawn`](Self::spawn) (an engine's), to stop with it.
    pub(crate) fn token(&self) -> CancellationToken {
        self.graceful.clone()
    }

    /// Spawns a task the shutdown waits for, and aborts if it is still
    /// running when the grace period is over.
    pub(crate) fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let running = Arc::clone(&self.running);
        // Boxed: an async block keeps room for a future it captured even after
        // moving it into its state, so the task would hold `task` twice (a
        // peer's connection future is about 0.8 KB, and every idle peer holds one).
        let task = Box::pin(task);
        let handle = self.tracker.spawn(async move {
            let _ended = Ended { running, id: tokio::task::id() };
            task.await
        });
        self.running.started(handle.id(), handle.abort_handle());
        handle
    }
}

/// The tasks running now, by id, to abort at the end of the grace period.
#[derive(Debug, Default)]
struct Running {
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    tasks: HashMap<Id, Slot>,
    /// Set once the grace period is over: a task that starts is aborted.
    aborting: bool,
}

#[derive(Debug)]
enum Slot {
    /// The spawner put its handle in before the task ended.
    Running(AbortHandle),
    /// The task ended before its spawner put its handle in.
    Ended,
}

impl Running {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // Each step under the lock leaves the table whole.
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The spawner's half: the task may have ended (and said so) already.
    fn started(&self, id: Id, abort: AbortHandle) {
        self.meet(id, Slot::Running(abort));
    }

    /// The task's half, when it ends (or is aborted, or dropped).
    fn ended(&self, id: Id) {
        self.meet(id, Slot::Ended);
    }

    /// Whichever half comes second takes the task out of the table.
    fn meet(&self, id: Id, half: Slot) {
        let mut table = self.lock();
        if table.aborting {
            // (The table is not kept once aborting: a task aborted before its
            // first poll never says it ended.)
            if let Slot::Running(abort) = half {
                abort.abort();
            }
            return;
        }
        match table.tasks.entry(id) {
            Entry::Occupied(first) => {
                first.remove();
            }
            Entry::Vacant(slot) => {
                slot.insert(half);
            }
        }
    }

    /// Aborts every task running now and every one that starts from now on;
    /// says how many were running.
    fn abort_all(&self) -> usize {
        let mut table = self.lock();
        table.aborting = true;
        let mut aborted = 0;
        for (_, slot) in table.tasks.drain() {
            if let Slot::Running(abort) = slot {
                abort.abort();
                aborted += 1;
            }
        }
        aborted
    }
}

/// Takes a task out of the table however its future goes: run to the end,
/// aborted, or dropped with the runtime.
struct Ended {
    running: Arc<Running>,
    id: Id,
}

impl Drop for Ended {
    fn drop(&mut self) {
        self.running.ended(self.id);
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
                running: Arc::default(),
                tracker: TaskTracker::new(),
                kind: Arc::new(OnceLock::new()),
            },
        }
    }

    pub(crate) fn handles(&self) -> ShutdownHandles {
        self.handles.clone()
    }

    /// Tells every task to stop (for `kind`), without waiting: once this
    /// returns, whoever starts checks [`ShutdownHandles::is_draining`] and
    /// hears of it.
    pub(crate) fn signal(&self, kind: ShutdownKind) {
        let _ = self.handles.kind.set(kind);
        self.handles.graceful.cancel();
    }

    /// Tells every task to stop (for `kind`) and waits for them, at most
    /// `grace`; then ends the rest. When this returns, no task spawned through
    /// the handles runs.
    pub(crate) async fn drain(self, grace: Duration, kind: ShutdownKind) -> Drained {
        let ShutdownHandles { graceful, running, tracker, kind: told } = self.handles;
        let _ = told.set(kind);
        graceful.cancel();
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_ok() {
            return Drained { aborted: 0 };
        }
        let aborted = running.abort_all();
        // Each task is dropped at its next poll, which the abort brings at
        // once: this wait is short whatever the tasks were doing.
        tracker.wait().await;
        Drained { aborted }
    }
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM: what a server binary
/// passes to [`crate::RunningServer::run_until`]. Use [`stop_signal`] to tell
/// the two apart (a rolling restart from a stop).
///
/// The handlers are installed when this is called, not when the future is
/// first polled: a binary calls it before announcing its address, so a
/// SIGTERM sent right after never meets the default action (an abrupt exit
/// with no close frame for anyone). Call it inside the tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    let signal = stop_signal();
    async move {
        signal.await;
    }
}

/// Resolves on SIGTERM with [`ShutdownKind::Restart`] (an orchestrator
/// replacing this node: peers get 1012 and move to another node at once) and
/// on SIGINT (Ctrl-C) with [`ShutdownKind::GoingAway`] (peers get 1001): what
/// a server binary passes to [`crate::RunningServer::run_until_stop`]. Off
/// Unix only Ctrl-C is heard.
///
/// As with [`shutdown_signal`], the handlers are installed when this is
/// called. Call it inside the tokio runtime.
pub fn stop_signal() -> impl Future<Output = ShutdownKind> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut streams: Vec<_> =
            [(SignalKind::interrupt(), ShutdownKind::GoingAway), (SignalKind::terminate(), ShutdownKind::Restart)]
                .into_iter()
                .filter_map(|(signal_kind, kind)| match signal(signal_kind) {
                    Ok(stream) => Some((stream, kind)),
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
            let kinds: Vec<ShutdownKind> = streams.iter().map(|(_, kind)| *kind).collect();
            let any = futures_util::future::select_all(streams.iter_mut().map(|(s, _)| Box::pin(s.recv())));
            let (_, index, _) = any.await;
            kinds[index]
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
            ShutdownKind::GoingAway
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_len(handles: &ShutdownHandles) -> usize {
        handles.running.lock().tasks.len()
    }

    #[tokio::test]
    async fn a_task_leaves_the_table_when_it_ends_whichever_half_comes_first() {
        let controller = ShutdownController::new();
        let handles = controller.handles();
        // Its spawner first (a current-thread runtime polls it only later).
        handles.spawn(async {}).await.unwrap();
        assert_eq!(table_len(&handles), 0);
        // The task first: its end leaves a mark that the spawner's half clears.
        let task = tokio::spawn(std::future::pending::<()>());
        handles.running.ended(task.id());
        handles.running.started(task.id(), task.abort_handle());
        assert_eq!(table_len(&handles), 0);
        task.abort();
    }

    #[tokio::test]
    async fn the_end_of_the_grace_period_aborts_what_runs_and_what_starts_after() {
        let controller = ShutdownController::new();
        let handles = controller.handles();
        let running = handles.spawn(std::future::pending::<()>());
        tokio::task::yield_now().await;
        let drained = controller.drain(Duration::ZERO, ShutdownKind::GoingAway).await;
        assert_eq!(drained, Drained { aborted: 1 });
        assert!(running.await.unwrap_err().is_cancelled());
        let late = handles.spawn(std::future::pending::<()>());
        assert!(late.await.unwrap_err().is_cancelled(), "a task started after the abort ends at once");
        assert_eq!(table_len(&handles), 0);
    }
}
