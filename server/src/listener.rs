//! The accept loop: one task per TCP connection, at most `max_connections` at
//! once, each served by hyper with upgrades enabled and shut down gracefully.

use std::{sync::Arc, time::Duration};

use http::StatusCode;
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::{
    hooks::Hooks,
    routes::{self, text_response, ConnCtx, ConnSlot},
    ServerState,
};

/// How long a connection over the limit is given to read its 503.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Listener<H> {
    pub(crate) listener: TcpListener,
    pub(crate) state: Arc<ServerState>,
    pub(crate) hooks: Arc<H>,
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
                tracing::warn!(%remote, "connection limit reached; answering 503");
                shutdown.spawn(refuse(
                    stream,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server is at its connection limit; retry later\n",
                ));
                continue;
            };
            let Some(ip_slot) = self.state.per_ip.try_acquire(remote.ip()) else {
                tracing::warn!(%remote, "per-address connection limit reached; answering 429");
                shutdown.spawn(refuse(
                    stream,
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many connections from your address; retry later\n",
                ));
                continue;
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
}

async fn serve_http<H: Hooks>(stream: TcpStream, ctx: Arc<ConnCtx<H>>) {
    let shutdown = ctx.state.shutdown.clone();
    let remote = ctx.remote;
    let this = Arc::clone(&ctx);
    let service = service_fn(move |req| routes::route(req, Arc::clone(&this)));
    let conn = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(stream), service)
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

/// Answers every request on a connection over a limit with `status`, then closes it.
async fn refuse(stream: TcpStream, status: StatusCode, text: &'static str) {
    let service = service_fn(move |_req| async move {
        let mut res = text_response(status, text);
        res.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        Ok::<_, std::convert::Infallible>(res)
    });
    let conn = http1::Builder::new().keep_alive(false).serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, conn).await;
}
