//! A socket wrapper that fails a write the peer has not taken a byte of for
//! the write timeout: what drops a peer (WebSocket or plain HTTP) whose socket
//! stopped draining, whether or not its queue ever filled. The listener wraps
//! every accepted stream in it; a [`crate::WebSocketService`] mounted behind
//! someone else's listener wraps the upgraded socket instead.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Sleep,
};

/// A socket whose writes fail once one has been pending for `limit`: hyper
/// has a timeout for reading request headers but none for writing, so a
/// client that stops reading would otherwise hold its connection (and the
/// response it is not reading) forever.
pub(crate) struct WriteTimeout<S> {
    inner: S,
    /// `None`: a pass-through (the stream below already has a timeout).
    limit: Option<Duration>,
    /// Created at the first stall and reset at later ones, so a connection
    /// under steady backpressure does not allocate a timer per stall; boxed
    /// because `Sleep` is `!Unpin`.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether `timer` runs for the current stall.
    armed: bool,
}

impl<S> WriteTimeout<S> {
    pub(crate) fn new(inner: S, limit: Option<Duration>) -> Self {
        Self { inner, limit, timer: None, armed: false }
    }

    /// Turns a `Pending` write into an error once it has lasted `limit`.
    fn check<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        let Some(limit) = self.limit else { return poll };
        if poll.is_ready() {
            // Progress: the next stall gets a fresh allowance.
            self.armed = false;
            return poll;
        }
        let deadline = tokio::time::Instant::now() + limit;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            timer.as_mut().reset(deadline);
            self.armed = true;
        }
        ready!(timer.as_mut().poll(cx));
        self.armed = false;
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the peer has not read for the write timeout")))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_write_pending_past_the_limit_fails() {
        // A duplex pipe with a 16-byte buffer nobody reads: writes block.
        let (client, _server) = tokio::io::duplex(16);
        let mut io = WriteTimeout::new(client, Some(Duration::from_secs(10)));
        io.write_all(&[0; 16]).await.unwrap();
        let started = tokio::time::Instant::now();
        let err = io.write_all(&[0; 16]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_but_moving_reader_is_not_cut_off() {
        let (client, mut server) = tokio::io::duplex(16);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let mut total = 0;
            while total < 16 * 5 {
                tokio::time::sleep(Duration::from_secs(6)).await;
                total += server.read(&mut buf).await.unwrap();
            }
        });
        let mut io = WriteTimeout::new(client, Some(Duration::from_secs(10)));
        for _ in 0..5 {
            io.write_all(&[0; 16]).await.expect("each write moves within the limit");
        }
        reader.await.unwrap();
    }
}
