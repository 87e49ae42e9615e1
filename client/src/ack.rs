//! Single-use futures for the server's answer to a request: a publish with
//! `ack`, a `history` request.

use std::{
    cell::RefCell,
    future::Future,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll, Waker},
};

use crate::{ClientError, History};

/// The outcome of a publish with `ack`: the seq the server gave the message.
pub type AckResult = Result<u64, ClientError>;

/// Resolves to the seq the server assigned to a published message, or to why
/// it was not acknowledged ([`ClientError::Server`], [`ClientError::AckTimeout`],
/// [`ClientError::Disconnected`], [`ClientError::QueueOverflow`],
/// [`ClientError::Ended`], [`ClientError::Closed`]). It always resolves
/// within the ack timeout, counted from the publish call.
///
/// Dropping the future is fine: the publish still goes out.
pub type AckFuture = Reply<u64>;

/// Resolves to a topic's retained messages, or to why not
/// ([`ClientError::Server`] with `history_unavailable` or `forbidden`,
/// [`ClientError::RequestTimeout`], [`ClientError::Ended`], [`ClientError::Closed`]).
pub type HistoryFuture = Reply<History>;

struct Slot<T> {
    result: Option<Result<T, ClientError>>,
    waker: Option<Waker>,
    done: bool,
}

/// A single-use future for the server's answer to one request.
#[must_use = "futures do nothing unless awaited; drop it to ignore the answer"]
pub struct Reply<T> {
    slot: Rc<RefCell<Slot<T>>>,
}

/// The sending half of a [`Reply`].
pub(crate) struct ReplySender<T> {
    slot: Rc<RefCell<Slot<T>>>,
}

/// A connected sender and future.
pub(crate) fn channel<T>() -> (ReplySender<T>, Reply<T>) {
    let slot = Rc::new(RefCell::new(Slot { result: None, waker: None, done: false }));
    (ReplySender { slot: slot.clone() }, Reply { slot })
}

impl<T> Reply<T> {
    /// A future that is already resolved, for errors found before sending.
    pub fn ready(result: Result<T, ClientError>) -> Self {
        let (tx, rx) = channel();
        tx.send(result);
        rx
    }
}

impl<T> ReplySender<T> {
    /// Resolves the future; later calls are ignored.
    pub(crate) fn send(self, result: Result<T, ClientError>) {
        let waker = {
            let mut slot = self.slot.borrow_mut();
            if slot.done {
                return;
            }
            slot.done = true;
            slot.result = Some(result);
            slot.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Drop for ReplySender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut slot = self.slot.borrow_mut();
            if slot.done {
                return;
            }
            slot.done = true;
            slot.result = Some(Err(ClientError::Closed));
            slot.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Future for Reply<T> {
    type Output = Result<T, ClientError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut slot = self.slot.borrow_mut();
        match slot.result.take() {
            Some(r) => Poll::Ready(r),
            None if slot.done => Poll::Ready(Err(ClientError::Closed)),
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl<T> std::fmt::Debug for Reply<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply").field("done", &self.slot.borrow().done).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    struct Flag(std::sync::atomic::AtomicBool);
    impl Wake for Flag {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn poll(f: &mut AckFuture, flag: &std::sync::Arc<Flag>) -> Poll<AckResult> {
        let waker = Waker::from(flag.clone());
        Pin::new(f).poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn resolves_once_and_wakes() {
        let flag = std::sync::Arc::new(Flag(Default::default()));
        let (tx, mut rx) = channel();
        assert!(poll(&mut rx, &flag).is_pending());
        tx.send(Ok(7));
        assert!(flag.0.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(poll(&mut rx, &flag), Poll::Ready(Ok(7)));
    }

    #[test]
    fn a_dropped_sender_means_closed() {
        let flag = std::sync::Arc::new(Flag(Default::default()));
        let (tx, mut rx) = channel();
        drop(tx);
        assert_eq!(poll(&mut rx, &flag), Poll::Ready(Err(ClientError::Closed)));
        let mut ready = AckFuture::ready(Err(ClientError::AckTimeout(5)));
        assert_eq!(poll(&mut ready, &flag), Poll::Ready(Err(ClientError::AckTimeout(5))));
    }
}
