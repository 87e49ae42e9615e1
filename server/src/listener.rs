//! The accept loop: one task per TCP connection, at most `max_connections` at
//! once, each served by hyper with upgrades enabled and shut down gracefully.
//! Connections over a limit are answered without hyper, by a bounded number of
//! short-lived tasks (at most [`MAX_REFUSALS_IN_FLIGHT`], each at most [`REFUSAL_TIMEOUT`]).

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};

use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::OwnedSemaphorePermit,
    time::Sleep,
};

use crate::{
    hooks::Hooks,
    limits::IpRejection,
    routes::{self, ConnCtx, ConnSlot},
    ServerState,
};

/// How long a refused connection may take to read its answer and hang up.
/// Short: under a flood every refusal holds a descriptor for this long.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);
/// Refusals answered at once; past this a refused connection is closed
/// unanswered, so a flood of them costs neither memory nor descriptors.
pub(crate) const MAX_REFUSALS_IN_FLIGHT: usize = 256;
/// What a refused client may send before the server hangs up anyway.
const REFUSAL_DRAIN_BYTES: usize = 16 * 1024;

pub(crate) struct Listener<H> {
    pub(crate) listener: TcpListener,
    pub(crate) state: Arc<ServerState>,
    pub(crate) hooks: Arc<H>,
}

/// Why a connection was refused at accept time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Refusal {
    /// `max_connections` are open.
    #[error("server is at its connection limit; retry later")]
    Full,
    /// The client's address is over one of its limits.
    #[error(transparent)]
    Address(#[from] IpRejection),
}

impl Refusal {
    /// The whole response, written straight to the socket: no request is
    /// parsed, so a refusal costs one write however slow the client is.
    fn response(&self) -> String {
        let (status, retry_after) = match self {
            Self::Full => ("503 Service Unavailable", 1),
            Self::Address(rejection) => ("429 Too Many Requests", rejection.retry_after_secs()),
        };
        let body = format!("{self}\n");
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\
             retry-after: {retry_after}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    }
}

impl<H: Hooks> Listener<H> {
    pub(crate) async fn run(self) {
        let shutdown = self.state.shutdown.clone();
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                _ = shutdown.cancelled() => return,
            };
            let (stream, remote) = match accepted {
                Ok(pair) => {
                    backoff = Duration::from_millis(5);
                    pair
                }
                Err(e) => {
                    // Usually out of file descriptors: wait for some to free up
                    // instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let Ok(permit) = Arc::clone(&self.state.limit).try_acquire_owned() else {
                self.refuse(stream, Refusal::Full);
                continue;
            };
            // Behind a trusted proxy the client is named in the request, so its
            // address is checked per request (routes) rather than here.
            let ip_slot = if self.state.per_ip.trusts(remote.ip()) {
                None
            } else {
                match self.state.per_ip.try_acquire(remote.ip()) {
                    Ok(slot) => Some(slot),
                    Err(rejection) => {
                        self.refuse(stream, rejection.into());
                        continue;
                    }
                }
            };
            let ctx = Arc::new(ConnCtx {
                state: Arc::clone(&self.state),
                hooks: Arc::clone(&self.hooks),
                remote,
                slot: Arc::new(ConnSlot { _permit: permit, _ip: ip_slot }),
                upgrading: Default::default(),
            });
            shutdown.spawn(serve_http(stream, ctx));
        }
    }

    fn refuse(&self, stream: TcpStream, refusal: Refusal) {
        // Debug, not warn: a flood would otherwise turn into a log flood.
        tracing::debug!(remote = ?stream.peer_addr().ok(), %refusal, "connection refused");
        match Arc::clone(&self.state.refusals).try_acquire_owned() {
            Ok(permit) => {
                self.state.shutdown.spawn(refuse(stream, refusal, permit));
            }
            Err(_) => drop(stream),
        }
    }
}

async fn serve_http<H: Hooks>(stream: TcpStream, ctx: Arc<ConnCtx<H>>) {
    let shutdown = ctx.state.shutdown.clone();
    let remote = ctx.remote;
    let io = WriteTimeout::new(stream, ctx.state.config.write_timeout);
    let this = Arc::clone(&ctx);
    let service = service_fn(move |req| routes::route(req, Arc::clone(&this)));
    let conn = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = shutdown.cancelled() => {
            // Finish the request in flight, then close; an upgrade in flight
            // completes as an upgrade (see `ConnCtx::upgrading`).
            if !ctx.upgrading.load(std::sync::atomic::Ordering::SeqCst) {
                conn.as_mut().graceful_shutdown();
            }
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%remote, error = %e, "http connection error");
    }
}

/// Answers a connection over a limit and closes it, all within
/// [`REFUSAL_TIMEOUT`]. The answer goes out before the request is read; what
/// the client sends is then read and dropped until it hangs up, because
/// closing a socket with unread input resets it, and a reset can destroy the
/// answer before the client reads it.
async fn refuse(mut stream: TcpStream, refusal: Refusal, _permit: OwnedSemaphorePermit) {
    let answer = async {
        stream.write_all(refusal.response().as_bytes()).await?;
        stream.shutdown().await?;
        let mut buf = [0u8; 1024];
        let mut drained = 0;
        while drained < REFUSAL_DRAIN_BYTES {
            match stream.read(&mut buf).await? {
                0 => break,
                n => drained += n,
            }
        }
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, answer).await;
}

/// A socket whose writes fail once one has been pending for `limit`: hyper
/// has a timeout for reading request headers but none for writing, so a
/// client that stops reading would otherwise hold its connection (and the
/// response it is not reading) forever.
pub(crate) struct WriteTimeout<S> {
    inner: S,
    limit: Duration,
    /// Created at the first stall and reset at later ones, so a connection
    /// under steady backpressure does not allocate a timer per stall; boxed
    /// because `Sleep` is `!Unpin`.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether `timer` runs for the current stall.
    armed: bool,
}

impl<S> WriteTimeout<S> {
    pub(crate) fn new(inner: S, limit: Duration) -> Self {
        Self { inner, limit, timer: None, armed: false }
    }

    /// Turns a `Pending` write into an error once it has lasted `limit`.
    fn check<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            // Progress: the next stall gets a fresh allowance.
            self.armed = false;
            return poll;
        }
        let deadline = tokio::time::Instant::now() + self.limit;
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

    #[tokio::test(start_paused = true)]
    async fn a_write_pending_past_the_limit_fails() {
        // A duplex pipe with a 16-byte buffer nobody reads: writes block.
        let (client, _server) = tokio::io::duplex(16);
        let mut io = WriteTimeout::new(client, Duration::from_secs(10));
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
        let mut io = WriteTimeout::new(client, Duration::from_secs(10));
        for _ in 0..5 {
            io.write_all(&[0; 16]).await.expect("each write moves within the limit");
        }
        reader.await.unwrap();
    }
}
