//! One peer's outbound queue: bounded in frames and in bytes, never waited on
//! by a publisher, and overtaken by a close.
//!
//! A leaf module: `peer` and `topics` both push into it, `connection`'s write
//! loop drains it.
//!
//! Publishers never wait on it: a push takes a short lock, appends, and wakes
//! the write loop only when the queue was empty. A peer that stops reading can
//! fill its own queue but never make a publisher (or any other peer) wait.
//! (A plain `VecDeque` under a lock: tokio's bounded channel cost a quarter
//! of the fan-out CPU in profiles, mostly in its permit bookkeeping.)
//!
//! The lock is a spin lock that yields its thread while it waits, not a std
//! mutex: it is taken once per delivery, and std's unlock is an atomic swap
//! (it must learn whether a waiter sleeps), where this one's is a plain
//! store. In a chat room's profile the two atomics of std's lock and unlock
//! were 20% of the server's CPU; 19 ns a pair against 12 here. What it holds
//! the lock for is a few instructions (a push, a swap of two deques), so a
//! waiter yields rarely and briefly; it is never held across an `.await`.
//!
//! Every byte queued counts: live traffic, and the answers (`subscribed`,
//! `pong`, acks, errors, `history`) and replayed messages a peer asked for.
//! They differ in what happens when there are too many. A live push over
//! the bounds cuts the peer (below). An answer is never refused for its
//! size; instead, once a peer's answers queued and unwritten reach
//! [`ANSWER_LIMIT`], its connection stops reading it and stops handing its
//! messages to the hooks until they drain ([`OutboxReceiver::answers_full`],
//! [`Outbox::drained`]): a peer that asks faster than it reads is slowed
//! down, and holds about that limit plus one answer (a hook's worth: what
//! one request causes), not a queue as long as its asking.
//!
//! The one rule recovery depends on: **once a push has been refused, the peer
//! receives no further message frame.** A refused push closes the queue for
//! good, drops what it still holds and asks for the close frame (1013) to go
//! next. Otherwise the write loop would drain a few frames, the queue would
//! accept later ones again, and the client would see `…818, 820…`: a hole it
//! has no way to tell from a normal sequence.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use crosswire_shared::close_code;
use futures_util::task::AtomicWaker;
use spin::{
    mutex::{SpinMutex, SpinMutexGuard},
    relax::Yield,
};
use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};

use crate::frame::Frame;

/// Why a frame could not be queued for a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The peer's outbound queue was full: the peer is being closed as a slow consumer (1013).
    #[error("the peer's outbound queue is full; it is being closed as a slow consumer")]
    QueueFull,
    /// The peer's connection is closing or has ended.
    #[error("the peer's connection is closed")]
    Closed,
}

/// How much one queue may hold before its peer counts as slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounds {
    /// Live frames.
    pub(crate) frames: usize,
    /// Payload bytes, live and answers together: a live push that would
    /// pass it cuts the peer.
    pub(crate) bytes: usize,
}

/// Answer bytes (queued, or taken and not yet written) at which a peer's
/// connection stops reading it, until they drain below: what a peer that
/// asks without reading holds, plus the one answer that crossed it.
pub(crate) const ANSWER_LIMIT: usize = 64 * 1024;

/// Bytes queued across every peer of a server, as credit each queue
/// reserves in chunks: the per-peer bound alone would let ten thousand
/// backed-up peers hold ten thousand times it. A chunk at a time keeps the
/// shared counter off the per-frame path. It counts what each queue holds,
/// so a frame queued for many peers counts for each (it is stored once):
/// the budget errs on the safe side. Answers reserve from it too, but are
/// never refused: past the limit they take their credit anyway, so the
/// budget can be overshot by what peers' answers may hold each (about
/// [`ANSWER_LIMIT`] plus one answer), while every live push is refused.
#[derive(Debug)]
pub(crate) struct QueueBudget {
    reserved: AtomicUsize,
    limit: usize,
}

/// The unit of credit a queue takes from the [`QueueBudget`].
const CHUNK: usize = 16 * 1024;

impl QueueBudget {
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { reserved: AtomicUsize::new(0), limit })
    }

    /// Bytes reserved by every queue now (at most the limit, but for answers).
    pub(crate) fn reserved(&self) -> usize {
        self.reserved.load(Ordering::Relaxed)
    }

    fn reserve(&self, bytes: usize) -> bool {
        self.reserved
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |r| r.checked_add(bytes).filter(|&n| n <= self.limit))
            .is_ok()
    }

    /// Reserves `bytes` whatever the limit (for answers, which are never refused).
    fn force(&self, bytes: usize) {
        self.reserved.fetch_add(bytes, Ordering::AcqRel);
    }

    fn release(&self, bytes: usize) {
        self.reserved.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// How the server wants a connection to end.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Closing {
    pub(crate) frame: CloseFrame,
    /// Whether what is still queued goes out before the close frame. The
    /// server's own verdicts (slow consumer, expired token, shutdown) drop it:
    /// the close must reach the peer promptly, and nothing may follow a
    /// refused frame. A hook's `peer.close()` keeps it ("goodbye", then close).
    pub(crate) flush: bool,
}

/// The sending side of one peer's queue. Cheap to clone; the write loop's
/// receiver ends once every clone is gone.
#[derive(Debug)]
pub(crate) struct Outbox {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: SpinMutex<State, Yield>,
    /// The connection's task, woken when the queue goes from empty to not, a
    /// close is asked for, or the last sender goes. One slot, re-armed at
    /// every poll, rather than a `Notify` and a `watch` per queue: their
    /// waiter lists took a lock to register and another to drop at every
    /// wake-up of every peer (10% of the fan-out's CPU in perf).
    waker: AtomicWaker,
    /// A close was asked for (what [`State::closing`] says, readable without the lock).
    closing: AtomicBool,
    /// Whether frames may be queued: set with the first frame into an empty
    /// queue, cleared when a take empties it, both under the lock. Read
    /// without it: a connection that has just written its batch finds the
    /// queue still empty at the cost of a load, not of the lock (a frame
    /// pushed after the load wakes it, as into any empty queue).
    has_frames: AtomicBool,
    /// The answers queued and unwritten are at [`ANSWER_LIMIT`] or above
    /// (what [`State::answers_full`] says, readable without the lock).
    answers_full: AtomicBool,
    /// Whoever waits for the answers to drain ([`Outbox::drained`]: a replay
    /// about to queue its next page), woken when they go below the limit or
    /// the queue closes.
    drained: AtomicWaker,
    bounds: Bounds,
    budget: Arc<QueueBudget>,
    /// Live `Outbox` clones.
    senders: AtomicUsize,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Queued>,
    /// Frames of live traffic, and payload bytes of everything (live and
    /// answers), queued or taken by the write loop and not yet written:
    /// what the bounds hold.
    live_frames: usize,
    bytes: usize,
    /// The answers' part of `bytes`.
    answer_bytes: usize,
    /// The part of those the last take handed to the write loop. The loop
    /// takes again only once all of it is written, so the next take (or
    /// [`OutboxReceiver::poll_take`] finding nothing) settles it. Counting
    /// it lets the loop take the whole queue at once, by swapping deques,
    /// without a peer that stops reading holding twice its bound.
    taken_frames: usize,
    taken_bytes: usize,
    taken_answers: usize,
    /// `answer_bytes` is at [`ANSWER_LIMIT`] or above.
    answers_full: bool,
    /// Credit this queue holds from the server-wide budget (whole chunks).
    reserved: usize,
    /// Set by the first refused push, a close request or the write loop's
    /// end: nothing is queued after it.
    refusing: bool,
    /// How the server wants the connection to end, once it does.
    closing: Option<Closing>,
}

/// A frame in a peer's queue, marked with whether it counts as live traffic.
/// The write loop's batch holds the same type, so a whole queue can change
/// hands by swapping the two deques.
#[derive(Debug)]
pub(crate) struct Queued {
    pub(crate) frame: Frame,
    /// The payload bytes it counts for while queued, live or answer (4 GiB at most; it is
    /// the same figure both ways), kept here so that taking a batch never
    /// reads the frames themselves: a backlog's frames are long out of the
    /// cache, and reading each one's header was 9% of a chat room's CPU.
    counted: u32,
    /// The live messages it counts for toward the bounds: one for a frame,
    /// more for a run of them (see [`Outbox::push_run`]), none for what is
    /// not live traffic (an answer counts its bytes only). A live frame with
    /// an empty payload still counts.
    messages: u32,
}

/// The write loop's own frames (a ping, pongs, the close or its echo):
/// counted nowhere (the connection bounds them itself).
impl From<Frame> for Queued {
    fn from(frame: Frame) -> Self {
        Self { frame, counted: 0, messages: 0 }
    }
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self { shared: Arc::clone(&self.shared) }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.waker.wake();
        }
    }
}

impl Outbox {
    /// A queue whose live traffic is held to `bounds`, and with every other
    /// queue of the server to `budget`.
    pub(crate) fn new(bounds: Bounds, budget: Arc<QueueBudget>) -> (Self, OutboxReceiver) {
        let shared = Arc::new(Shared {
            state: SpinMutex::new(State::default()),
            waker: AtomicWaker::new(),
            closing: AtomicBool::new(false),
            has_frames: AtomicBool::new(false),
            answers_full: AtomicBool::new(false),
            drained: AtomicWaker::new(),
            bounds,
            budget,
            senders: AtomicUsize::new(1),
        });
        let rx = OutboxReceiver { frames: FrameReceiver { shared: Arc::clone(&shared), unsettled: false } };
        (Self { shared }, rx)
    }

    /// Queues live traffic (a publish, a hook's `send`) within the bounds; a
    /// push over them closes the peer as a slow consumer.
    pub(crate) fn push(&self, frame: Frame) -> Result<(), SendError> {
        let counted = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        self.enqueue(Queued { frame, counted, messages: 1 })
    }

    /// Queues `messages` live frames made one run by [`Frame::concat`],
    /// `bytes` of payload in all: bounded as that many pushes would be, and
    /// one entry to queue and to write.
    pub(crate) fn push_run(&self, run: Frame, messages: usize, bytes: usize) -> Result<(), SendError> {
        let counted = u32::try_from(bytes).unwrap_or(u32::MAX);
        let messages = u32::try_from(messages).unwrap_or(u32::MAX);
        self.enqueue(Queued { frame: run, counted, messages })
    }

    /// Queues an answer (`subscribed`, an ack, an error, `history`) or a
    /// replayed message: counted in the queue's bytes and the server's
    /// budget like live traffic, but never refused for its size, and never
    /// a reason to cut the peer. What bounds them is the peer's turn: once
    /// its answers reach [`ANSWER_LIMIT`] its connection asks nothing more
    /// of it until they drain, and a replay waits for them to drain between
    /// pages.
    pub(crate) fn push_reserved(&self, frame: Frame) -> Result<(), SendError> {
        let counted = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        self.enqueue(Queued { frame, counted, messages: 0 })
    }

    fn enqueue(&self, queued: Queued) -> Result<(), SendError> {
        let mut st = self.shared.lock();
        if st.refusing {
            return Err(SendError::Closed);
        }
        let len = queued.counted as usize;
        if queued.messages > 0 {
            let bounds = self.shared.bounds;
            let messages = queued.messages as usize;
            if st.live_frames + messages > bounds.frames || st.bytes + len > bounds.bytes {
                drop(st);
                self.close_now(close_code::SLOW_CONSUMER, "slow consumer: outbound queue full");
                return Err(SendError::QueueFull);
            }
            let short = (st.bytes + len).saturating_sub(st.reserved);
            if short > 0 {
                let chunk = short.div_ceil(CHUNK) * CHUNK;
                if !self.shared.budget.reserve(chunk) {
                    drop(st);
                    self.close_now(close_code::SLOW_CONSUMER, "slow consumer: the server's queue budget is spent");
                    return Err(SendError::QueueFull);
                }
                st.reserved += chunk;
            }
            st.live_frames += messages;
            st.bytes += len;
        } else if len > 0 {
            // An answer: counted, never refused (see `push_reserved`).
            let short = (st.bytes + len).saturating_sub(st.reserved);
            if short > 0 {
                let chunk = short.div_ceil(CHUNK) * CHUNK;
                if !self.shared.budget.reserve(chunk) {
                    self.shared.budget.force(chunk);
                }
                st.reserved += chunk;
            }
            st.bytes += len;
            st.answer_bytes += len;
            if !st.answers_full && st.answer_bytes >= ANSWER_LIMIT {
                st.answers_full = true;
                self.shared.answers_full.store(true, Ordering::Release);
            }
        }
        let was_empty = st.frames.is_empty();
        st.frames.push_back(queued);
        if was_empty {
            self.shared.has_frames.store(true, Ordering::Release);
        }
        drop(st);
        if was_empty {
            self.shared.waker.wake();
        }
        Ok(())
    }

    /// Whether a close has been asked for.
    pub(crate) fn is_closing(&self) -> bool {
        self.shared.closing.load(Ordering::Acquire)
    }

    /// Closes after the frames already queued (a hook's `peer.close()`).
    pub(crate) fn close(&self, code: u16, reason: &str) {
        self.request_close(code, reason, true);
    }

    /// Closes now: what is queued is dropped and the close frame goes next
    /// (the server's verdicts: slow consumer, expired token, shutdown, …).
    pub(crate) fn close_now(&self, code: u16, reason: &str) {
        self.request_close(code, reason, false);
    }

    /// The first request wins, except that a later "now" still drops what a
    /// graceful close would have flushed: the server's verdict overrides.
    fn request_close(&self, code: u16, reason: &str, flush: bool) {
        let changed = {
            let mut st = self.shared.lock();
            st.refusing = true;
            if !flush {
                self.shared.clear(&mut st);
            }
            match &mut st.closing {
                None => {
                    let frame = CloseFrame { code: CloseCode::from(code), reason: reason.to_owned().into() };
                    st.closing = Some(Closing { frame, flush });
                    self.shared.closing.store(true, Ordering::Release);
                    true
                }
                Some(existing) if existing.flush && !flush => {
                    existing.flush = false;
                    true
                }
                Some(_) => false,
            }
        };
        if changed {
            self.shared.waker.wake();
        }
    }

    /// What is queued now (or taken and not yet written): live frames, and
    /// bytes of live traffic and answers together.
    pub(crate) fn backlog(&self) -> Bounds {
        let st = self.shared.lock();
        Bounds { frames: st.live_frames, bytes: st.bytes }
    }

    /// The answers' part of [`Self::backlog`]'s bytes.
    pub(crate) fn answer_bytes(&self) -> usize {
        self.shared.lock().answer_bytes
    }

    /// Payload bytes the queue can still take before a live push would cut
    /// the peer: what an answer the peer asks for should stay within.
    pub(crate) fn room(&self) -> usize {
        self.shared.bounds.bytes.saturating_sub(self.shared.lock().bytes)
    }

    /// Whether the answers queued and unwritten are at [`ANSWER_LIMIT`] or
    /// above: the connection asks nothing more of the peer until they drain.
    #[cfg(test)]
    pub(crate) fn answers_full(&self) -> bool {
        self.shared.answers_full.load(Ordering::Acquire)
    }

    /// Waits until the answers queued and unwritten are below
    /// [`ANSWER_LIMIT`], or the queue is closing. Woken by the write loop's
    /// take that settles them (or by the close): the task is registered
    /// before the flag is read, and the flag is cleared before the wake-up.
    pub(crate) async fn drained(&self) {
        std::future::poll_fn(|cx| {
            let shared = &*self.shared;
            shared.drained.register(cx.waker());
            if !shared.answers_full.load(Ordering::Acquire) || shared.closing.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }
}

impl State {
    /// Moves up to `max` frames, oldest first, to the end of `into`, once
    /// what the last take handed out is settled as written.
    fn take(&mut self, into: &mut VecDeque<Queued>, max: usize, budget: &QueueBudget) -> usize {
        self.live_frames -= std::mem::take(&mut self.taken_frames);
        self.bytes -= std::mem::take(&mut self.taken_bytes);
        let answers = std::mem::take(&mut self.taken_answers);
        if answers > 0 {
            self.answer_bytes -= answers;
        }
        let n = self.frames.len().min(max);
        if n > 0 && n == self.frames.len() && into.is_empty() {
            // The usual case: all of it. The two deques trade places, so no
            // frame is moved one by one (reading a long backlog's entries
            // was 8% of a chat room's CPU) and neither side allocates.
            std::mem::swap(into, &mut self.frames);
            self.taken_frames = self.live_frames;
            self.taken_bytes = self.bytes;
            self.taken_answers = self.answer_bytes;
        } else {
            for q in self.frames.drain(..n) {
                self.taken_frames += q.messages as usize;
                self.taken_bytes += q.counted as usize;
                if q.messages == 0 {
                    self.taken_answers += q.counted as usize;
                }
                into.push_back(q);
            }
        }
        // Credit goes back once two chunks are idle (not at every batch),
        // and all of it once nothing is queued or unwritten: idle peers
        // hold none (the write loop settles its last batch as it goes idle).
        let keep = self.bytes.div_ceil(CHUNK) * CHUNK;
        if self.reserved >= keep + 2 * CHUNK || (keep == 0 && self.reserved > 0) {
            budget.release(self.reserved - keep);
            self.reserved = keep;
        }
        n
    }

    /// Whether the last take handed out anything counted, not yet settled.
    fn is_unsettled(&self) -> bool {
        (self.taken_frames | self.taken_bytes) != 0
    }

    /// Drops everything queued and gives back its credit.
    fn clear(&mut self, budget: &QueueBudget) {
        self.frames.clear();
        self.live_frames = 0;
        self.bytes = 0;
        self.answer_bytes = 0;
        self.taken_frames = 0;
        self.taken_bytes = 0;
        self.taken_answers = 0;
        budget.release(std::mem::take(&mut self.reserved));
    }

    /// Whether settling has just brought the answers below [`ANSWER_LIMIT`]
    /// (clearing the mark; the caller publishes it and wakes the waiter).
    fn answers_drained(&mut self) -> bool {
        let drained = self.answers_full && self.answer_bytes < ANSWER_LIMIT;
        if drained {
            self.answers_full = false;
        }
        drained
    }
}

impl Shared {
    /// [`State::take`], and `has_frames` cleared when it empties the queue.
    /// Also publishes the answers' draining and wakes whoever waits for it.
    fn take(&self, st: &mut State, into: &mut VecDeque<Queued>, max: usize) -> usize {
        let n = st.take(into, max, &self.budget);
        if st.frames.is_empty() {
            self.has_frames.store(false, Ordering::Release);
        }
        if st.answers_full && st.answers_drained() {
            self.wake_drained();
        }
        n
    }

    /// [`State::clear`], and the answers' waiter told.
    fn clear(&self, st: &mut State) {
        st.clear(&self.budget);
        if std::mem::take(&mut st.answers_full) {
            self.wake_drained();
        }
    }

    #[cold]
    #[inline(never)]
    fn wake_drained(&self) {
        self.answers_full.store(false, Ordering::Release);
        self.drained.wake();
    }

    fn lock(&self) -> SpinMutexGuard<'_, State> {
        // No poisoning: every step under this lock leaves the queue
        // consistent, and a panic in one (a bug) releases it on unwinding.
        self.state.lock()
    }
}

/// The write loop's end of an [`Outbox`].
pub(crate) struct OutboxReceiver {
    pub(crate) frames: FrameReceiver,
}

/// Why the queue woke its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// A close was asked for.
    Close,
    /// Frames are queued.
    Frames,
    /// Every sender is gone and nothing is queued.
    Ended,
}

impl OutboxReceiver {
    /// [`Outbox::answers_full`], from the connection's side.
    pub(crate) fn answers_full(&self) -> bool {
        self.frames.shared.answers_full.load(Ordering::Acquire)
    }

    /// How the server wants the connection to end, if it has asked yet.
    pub(crate) fn closing(&self) -> Option<Closing> {
        self.frames.shared.lock().closing.clone()
    }

    /// Ready once a close is asked for; either way the task is registered
    /// for this queue's next wake-up (a close, a frame into an empty queue,
    /// the last sender going). No lock: a batch in flight asks at every poll.
    pub(crate) fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let shared = &*self.frames.shared;
        shared.waker.register(cx.waker());
        if shared.closing.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Moves up to `max` queued frames to the end of `into` and says
    /// [`Wake::Frames`] if any were queued; otherwise ready once a close is
    /// asked for or every sender is gone. Looking and taking are one lock: a
    /// wake-up for frames costs the connection this and the write. The task
    /// is registered before the state is read under the lock, and every
    /// change wakes after making it under that lock: no wake-up is lost in
    /// between.
    pub(crate) fn poll_take(&mut self, cx: &mut Context<'_>, into: &mut VecDeque<Queued>, max: usize) -> Poll<Wake> {
        let shared = &*self.frames.shared;
        shared.waker.register(cx.waker());
        if !self.frames.unsettled
            && !shared.has_frames.load(Ordering::Acquire)
            && !shared.closing.load(Ordering::Acquire)
            && shared.senders.load(Ordering::Acquire) > 0
        {
            return Poll::Pending;
        }
        let mut st = shared.lock();
        if st.closing.is_some() {
            return Poll::Ready(Wake::Close);
        }
        let n = shared.take(&mut st, into, max);
        self.frames.unsettled = st.is_unsettled();
        if n > 0 {
            return Poll::Ready(Wake::Frames);
        }
        if shared.senders.load(Ordering::Acquire) == 0 {
            return Poll::Ready(Wake::Ended);
        }
        Poll::Pending
    }
}

/// The queue's receiving end.
pub(crate) struct FrameReceiver {
    shared: Arc<Shared>,
    /// Whether the last take handed out frames the queue still counts (see
    /// [`State::taken_frames`]): then finding the queue empty takes the lock
    /// once more, to settle them, give back their credit, and (answers) let
    /// a paused peer be read again.
    unsettled: bool,
}

impl Drop for FrameReceiver {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.refusing = true;
        self.shared.clear(&mut st);
    }
}

impl FrameReceiver {
    /// Moves up to `max` queued frames, oldest first, to the end of `into`
    /// under one lock, once what the last take handed out is settled as
    /// written (the write loop takes again only then). Returns how many it moved.
    pub(crate) fn take(&mut self, into: &mut VecDeque<Queued>, max: usize) -> usize {
        let mut st = self.shared.lock();
        let n = self.shared.take(&mut st, into, max);
        self.unsettled = st.is_unsettled();
        n
    }

    /// Gives back the capacity a burst left behind, if nothing is queued.
    /// Called when the connection is idle (at its heartbeat), not after every
    /// batch: a queue that flows would grow again from nothing at each burst
    /// (reallocating was 12% of a chat room's instructions).
    pub(crate) fn release_idle(&mut self) {
        shrink_idle(&mut self.shared.lock().frames);
    }
}

#[cfg(test)]
impl FrameReceiver {
    /// The next frame if one is queued now.
    pub(crate) fn try_recv(&mut self) -> Option<Frame> {
        let mut one = VecDeque::new();
        self.take(&mut one, 1);
        one.pop_front().map(|q| q.frame)
    }
}

/// The queue capacity a peer keeps after a burst once it is idle.
const IDLE_CAPACITY: usize = 16;

/// Gives back the capacity a burst left in `deque`, once it is empty, down
/// to nothing above [`IDLE_CAPACITY`]: what a peer's queue, its write batch
/// and its read inbox keep while it is idle.
pub(crate) fn shrink_idle<T>(deque: &mut VecDeque<T>) {
    if deque.is_empty() && deque.capacity() > IDLE_CAPACITY {
        *deque = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Frame {
        Frame::text(n.to_string())
    }

    fn bounds(frames: usize) -> Bounds {
        Bounds { frames, bytes: usize::MAX }
    }

    fn unlimited() -> Arc<QueueBudget> {
        QueueBudget::new(usize::MAX)
    }

    /// What the write loop does: takes everything queued, writes it, and
    /// takes again (which settles what it wrote).
    fn drain(rx: &mut OutboxReceiver) -> Vec<String> {
        let mut taken = VecDeque::new();
        rx.frames.take(&mut taken, usize::MAX);
        let written = taken.iter().map(|q| q.frame.to_text().unwrap().to_owned()).collect();
        assert_eq!(rx.frames.take(&mut VecDeque::new(), usize::MAX), 0);
        written
    }

    /// The write loop takes the whole queue at once; what it took counts
    /// toward the bounds until it comes back for more, or finds nothing.
    #[tokio::test]
    async fn frames_taken_count_until_the_write_loop_comes_back() {
        let budget = QueueBudget::new(usize::MAX);
        let (outbox, mut rx) = Outbox::new(bounds(2), Arc::clone(&budget));
        outbox.push(text(1)).unwrap();
        outbox.push(text(2)).unwrap();
        let mut batch = VecDeque::new();
        let wake = std::future::poll_fn(|cx| rx.poll_take(cx, &mut batch, usize::MAX)).await;
        assert_eq!((wake, batch.len()), (Wake::Frames, 2));
        assert_eq!(outbox.backlog(), Bounds { frames: 2, bytes: 2 }, "taken, not written yet");
        assert_eq!(budget.reserved(), CHUNK);
        // Written: the loop finds the queue empty, and settles the batch.
        batch.clear();
        assert!(std::future::poll_fn(|cx| Poll::Ready(rx.poll_take(cx, &mut batch, usize::MAX))).await.is_pending());
        assert_eq!(outbox.backlog(), Bounds { frames: 0, bytes: 0 });
        assert_eq!(budget.reserved(), 0, "an idle peer holds no credit");
        assert!(outbox.push(text(3)).is_ok() && outbox.push(text(4)).is_ok());

        // A peer that stops reading holds its bound, not twice it.
        let (outbox, mut rx) = Outbox::new(bounds(2), unlimited());
        outbox.push(text(1)).unwrap();
        outbox.push(text(2)).unwrap();
        assert_eq!(rx.frames.take(&mut VecDeque::new(), usize::MAX), 2);
        assert_eq!(outbox.push(text(3)), Err(SendError::QueueFull));
    }

    fn close_code_of(rx: &OutboxReceiver) -> Option<u16> {
        rx.closing().map(|c| u16::from(c.frame.code))
    }

    #[test]
    fn a_refused_push_drops_the_queue_and_refuses_everything_after() {
        let (outbox, mut rx) = Outbox::new(bounds(2), unlimited());
        assert!(outbox.push(text(1)).is_ok());
        assert!(outbox.push(text(2)).is_ok());
        assert_eq!(outbox.push(text(3)), Err(SendError::QueueFull));
        assert_eq!(close_code_of(&rx), Some(close_code::SLOW_CONSUMER));
        // The write loop draining would make room, but nothing is queued any more.
        assert!(drain(&mut rx).is_empty(), "queued frames are dropped: the close goes next");
        assert_eq!(outbox.push(text(4)), Err(SendError::Closed));
        assert_eq!(outbox.push_reserved(text(5)), Err(SendError::Closed));
        assert!(drain(&mut rx).is_empty());
        assert_eq!(outbox.backlog(), Bounds { frames: 0, bytes: 0 });
    }

    #[test]
    fn the_byte_bound_counts_payloads() {
        let (outbox, _rx) = Outbox::new(Bounds { frames: 100, bytes: 10 }, unlimited());
        assert!(outbox.push(Frame::text("12345")).is_ok());
        assert!(outbox.push(Frame::text("12345")).is_ok());
        assert_eq!(outbox.backlog(), Bounds { frames: 2, bytes: 10 });
        assert_eq!(outbox.push(Frame::text("1")), Err(SendError::QueueFull));
    }

    /// Answers and replays count in the queue's bytes and the server's
    /// budget, are never refused for it, and past [`ANSWER_LIMIT`] mark the
    /// queue full of answers until the write loop has written them.
    #[test]
    fn answers_and_replays_count_but_are_never_refused() {
        let budget = QueueBudget::new(2 * CHUNK);
        let (outbox, mut rx) = Outbox::new(Bounds { frames: 2, bytes: 100 }, Arc::clone(&budget));
        for n in 0..1000 {
            assert!(outbox.push_reserved(text(n)).is_ok(), "an answer is never refused");
        }
        // "0".."999": 10 + 180 + 2700 bytes.
        let answers = 2890;
        assert_eq!(outbox.backlog(), Bounds { frames: 0, bytes: answers }, "counted, not as live frames");
        assert_eq!(outbox.answer_bytes(), answers);
        assert_eq!(budget.reserved(), CHUNK);
        assert_eq!(outbox.room(), 0);
        // Every byte counts: a live push past the bytes bound cuts the peer.
        assert_eq!(outbox.push(text(1000)), Err(SendError::QueueFull));
        assert_eq!(budget.reserved(), 0, "its credit went back");

        // Past the server-wide budget an answer takes its credit anyway.
        let (outbox, mut rx2) = Outbox::new(bounds(2), Arc::clone(&budget));
        let big = Frame::text("x".repeat(5 * CHUNK));
        assert!(outbox.push_reserved(big.clone()).is_ok());
        assert_eq!(budget.reserved(), 5 * CHUNK, "over the budget of two chunks");
        assert!(outbox.answers_full(), "past the answer limit");
        assert_eq!(outbox.push(text(1)), Err(SendError::QueueFull), "a live push is refused");
        assert_eq!(budget.reserved(), 0);
        assert!(!outbox.answers_full(), "a cut queue holds nothing");
        drain(&mut rx);
        drain(&mut rx2);

        // In order with live traffic, and marked full until written.
        let (outbox, mut rx) = Outbox::new(bounds(4), unlimited());
        outbox.push_reserved(big.clone()).unwrap();
        outbox.push(text(1)).unwrap();
        assert!(outbox.answers_full() && rx.answers_full());
        let mut taken = VecDeque::new();
        assert_eq!(rx.frames.take(&mut taken, usize::MAX), 2);
        assert_eq!(taken[1].frame.to_text(), Ok("1"), "in order, answer first");
        assert!(outbox.answers_full(), "taken is not written");
        assert_eq!(outbox.answer_bytes(), 5 * CHUNK);
        assert_eq!(rx.frames.take(&mut VecDeque::new(), usize::MAX), 0);
        assert!(!outbox.answers_full(), "written: settled by the next take");
        assert_eq!(outbox.backlog(), Bounds { frames: 0, bytes: 0 });
        assert_eq!(outbox.answer_bytes(), 0);
    }

    /// A replay waiting for the answers to drain is woken by the take that
    /// settles them, and by a close.
    #[tokio::test]
    async fn a_waiter_for_the_answers_is_woken_when_they_drain() {
        let (outbox, mut rx) = Outbox::new(bounds(4), unlimited());
        outbox.drained().await; // nothing queued: at once
        outbox.push_reserved(Frame::text("x".repeat(ANSWER_LIMIT))).unwrap();
        let waiter = outbox.clone();
        let waiting = tokio::spawn(async move { waiter.drained().await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let mut taken = VecDeque::new();
        rx.frames.take(&mut taken, usize::MAX);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "taken, not yet written");
        rx.frames.take(&mut VecDeque::new(), usize::MAX);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();

        outbox.push_reserved(Frame::text("x".repeat(ANSWER_LIMIT))).unwrap();
        let waiter = outbox.clone();
        let waiting = tokio::spawn(async move { waiter.drained().await });
        tokio::task::yield_now().await;
        outbox.close_now(close_code::SLOW_CONSUMER, "cut");
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();
    }

    #[test]
    fn a_graceful_close_keeps_what_is_queued_and_a_verdict_drops_it() {
        let (outbox, mut rx) = Outbox::new(bounds(8), unlimited());
        outbox.push(text(1)).unwrap();
        outbox.close(1000, "bye");
        assert_eq!(outbox.push(text(2)), Err(SendError::Closed), "nothing after a close");
        assert_eq!(rx.closing().map(|c| c.flush), Some(true));
        assert_eq!(drain(&mut rx), ["1"]);

        let (outbox, mut rx) = Outbox::new(bounds(8), unlimited());
        outbox.push(text(1)).unwrap();
        outbox.close(1000, "bye");
        outbox.close_now(close_code::GOING_AWAY, "shutdown");
        let closing = rx.closing().unwrap();
        assert_eq!(u16::from(closing.frame.code), 1000, "the first reason stays");
        assert!(!closing.flush, "but the verdict drops the queue");
        assert!(drain(&mut rx).is_empty());
    }

    #[test]
    fn queues_share_the_server_wide_budget_and_give_it_back() {
        let budget = QueueBudget::new(4 * CHUNK);
        let big = || Frame::text("x".repeat(CHUNK));
        let (a, mut arx) = Outbox::new(bounds(100), Arc::clone(&budget));
        let (b, brx) = Outbox::new(bounds(100), Arc::clone(&budget));
        for _ in 0..3 {
            a.push(big()).unwrap();
        }
        assert_eq!(budget.reserved(), 3 * CHUNK);
        b.push(big()).unwrap();
        assert_eq!(b.push(big()), Err(SendError::QueueFull), "the budget is spent: the pusher is cut");
        assert_eq!(budget.reserved(), 3 * CHUNK, "the cut queue gave its credit back");
        // Draining gives credit back too, so the budget is never lost.
        drain(&mut arx);
        assert_eq!(budget.reserved(), 0);
        drop(brx);
        let (c, _crx) = Outbox::new(bounds(100), Arc::clone(&budget));
        for _ in 0..4 {
            c.push(big()).unwrap();
        }
    }

    /// What the connection waits for: the next wake-up, with the frames it took.
    async fn wake(rx: &mut OutboxReceiver) -> (Wake, Vec<String>) {
        let mut taken = VecDeque::new();
        let wake = std::future::poll_fn(|cx| rx.poll_take(cx, &mut taken, usize::MAX)).await;
        (wake, taken.iter().map(|q| q.frame.to_text().unwrap().to_owned()).collect())
    }

    #[tokio::test]
    async fn the_receiver_wakes_for_frames_and_ends_with_the_last_sender() {
        let (outbox, mut rx) = Outbox::new(bounds(4), unlimited());
        let second = outbox.clone();
        let reader = tokio::spawn(async move {
            let mut got = vec![];
            loop {
                match wake(&mut rx).await {
                    (Wake::Frames, frames) => got.extend(frames),
                    (end, frames) => {
                        assert!(frames.is_empty());
                        assert_eq!(end, Wake::Ended);
                        return got;
                    }
                }
            }
        });
        tokio::task::yield_now().await;
        outbox.push(text(1)).unwrap();
        second.push(text(2)).unwrap();
        drop(outbox);
        tokio::task::yield_now().await;
        second.push(text(3)).unwrap();
        drop(second);
        assert_eq!(reader.await.unwrap(), ["1", "2", "3"]);
    }

    #[tokio::test]
    async fn the_receiver_ends_when_every_sender_is_gone() {
        let (outbox, mut rx) = Outbox::new(bounds(4), unlimited());
        let clone = outbox.clone();
        clone.push(text(7)).unwrap();
        drop(outbox);
        drop(clone);
        assert_eq!(wake(&mut rx).await, (Wake::Frames, vec!["7".to_owned()]));
        assert_eq!(wake(&mut rx).await, (Wake::Ended, vec![]));
    }

    #[tokio::test]
    async fn a_close_request_wakes_the_receiver_even_while_it_takes_no_frames() {
        let (outbox, mut rx) = Outbox::new(bounds(4), unlimited());
        let waiting = tokio::spawn(async move {
            std::future::poll_fn(|cx| rx.poll_close(cx)).await;
            let code = rx.closing().map(|c| u16::from(c.frame.code));
            (wake(&mut rx).await, code)
        });
        tokio::task::yield_now().await;
        outbox.push(text(1)).unwrap();
        outbox.close_now(close_code::SLOW_CONSUMER, "slow");
        assert_eq!(waiting.await.unwrap(), ((Wake::Close, vec![]), Some(close_code::SLOW_CONSUMER)));
        assert!(outbox.is_closing());
    }

    #[tokio::test]
    async fn a_push_after_the_receiver_is_gone_fails() {
        let (outbox, rx) = Outbox::new(bounds(4), unlimited());
        drop(rx);
        assert_eq!(outbox.push(text(1)), Err(SendError::Closed));
    }
}
