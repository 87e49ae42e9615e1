//! The accept loop: one task per TCP connection, at most `max_connections` at
//! once, each served by hyper with upgrades enabled and shut down gracefully.
//! Connections over a limit are answered without hyper, by a bounded number of
//! short-lived tasks (at most [`crate::state::MAX_REFUSALS_IN_FLIGHT`], each at most [`REFUSAL_TIMEOUT`]).

use std::{io, sync::Arc, time::Duration};

use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::OwnedSemaphorePermit,
};

use crate::{
    hooks::Hooks,
    limits::IpRejection,
    metrics::Rejection,
    routes::{self, ConnCtx},
    service::{self, ConnSlot, WebSocketService},
    state::ServerState,
    write_timeout::WriteTimeout,
};

/// How long a refused connection may take to read its answer and hang up.
/// Short: under a flood every refusal holds a descriptor for this long.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);
/// What a refused client may send before the server hangs up anyway.
const REFUSAL_DRAIN_BYTES: usize = 16 * 1024;

/// The accept loop of a standalone server: a socket, and the service its
/// WebSocket path goes to.
pub(crate) struct Acceptor<H> {
    pub(crate) listener: TcpListener,
    pub(crate) state: Arc<ServerState>,
    pub(crate) service: WebSocketService<H>,
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

impl<H: Hooks> Acceptor<H> {
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
                service: self.service.clone(),
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
        self.state.metrics.rejected(match &refusal {
            Refusal::Full => Rejection::TooManyConnections,
            Refusal::Address(rejection) => service::ip_rejection(rejection),
        });
        match Arc::clone(&self.state.refusals).try_acquire_owned() {
            Ok(permit) => {
                self.state.shutdown.spawn(refuse(stream, refusal, permit));
            }
            Err(_) => drop(stream),
        }
    }
}

async fn serve_http<H: Hooks>(stream: TcpStream, ctx: Arc<ConnCtx<H>>) {
    let shutdown = ctx.service.state.shutdown.clone();
    let remote = ctx.remote;
    let io = WriteTimeout::new(stream, Some(ctx.service.state.config.write_timeout));
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
