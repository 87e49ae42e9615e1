//! The standalone server's routes on one HTTP connection: the `Host` check,
//! then the WebSocket path (handed to the [`WebSocketService`]), the
//! operations endpoints (`/healthz`, `/readyz`, `/metrics`), and the static
//! files. The operations paths are taken before the static files, so a file
//! of the same name cannot hide them from a probe.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;

use crate::{
    hooks::Hooks,
    metrics::{self, Rejection},
    response::text_response,
    service::{Conn, ConnSlot, WebSocketService},
    statics::{self, RouteBody},
};

/// One accepted connection, as every request on it sees it.
pub(crate) struct ConnCtx<H> {
    pub(crate) service: WebSocketService<H>,
    pub(crate) remote: SocketAddr,
    /// The connection's place under the connection limits, carried over into
    /// the WebSocket task when the connection upgrades.
    pub(crate) slot: Arc<ConnSlot>,
    /// Set while a request to the WebSocket path is being decided. A graceful
    /// HTTP shutdown would turn its 101 into `Connection: close` and fail the
    /// upgrade; instead it completes, and the new peer hears the shutdown
    /// (the token answers late listeners too) and gets its 1001.
    pub(crate) upgrading: std::sync::atomic::AtomicBool,
}

pub(crate) async fn route<H: Hooks>(
    req: Request<Incoming>,
    ctx: Arc<ConnCtx<H>>,
) -> Result<Response<RouteBody>, Infallible> {
    let state = &ctx.service.state;
    if let Err(rejection) = state.origins.check_host(req.uri(), req.headers()) {
        tracing::debug!(remote = %ctx.remote, host = ?req.headers().get(header::HOST), "host refused");
        if req.uri().path() == state.config.path {
            state.metrics.rejected(Rejection::Host);
        }
        return Ok(rejection.response().map(Either::Left));
    }
    let path = req.uri().path();
    let res = if path == state.config.path {
        ctx.upgrading.store(true, std::sync::atomic::Ordering::SeqCst);
        let conn = Conn { remote: Some(ctx.remote), accepted: Some(Arc::clone(&ctx.slot)) };
        let res = ctx.service.serve(req, conn).await;
        ctx.upgrading.store(false, std::sync::atomic::Ordering::SeqCst);
        res
    } else if path == "/healthz" {
        // Alive: this answer itself is the proof.
        text_response(StatusCode::OK, "ok\n")
    } else if path == "/readyz" {
        match state.is_ready() {
            true => text_response(StatusCode::OK, "ready\n"),
            false => text_response(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        }
    } else if path == "/metrics" {
        let mut res = text_response(StatusCode::OK, state.metrics_text());
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(metrics::CONTENT_TYPE));
        res
    } else if let (Some(dir), true) = (&state.config.static_dir, matches!(*req.method(), Method::GET | Method::HEAD)) {
        return Ok(statics::serve(dir, req).await);
    } else {
        text_response(StatusCode::NOT_FOUND, "not found\n")
    };
    Ok(res.map(Either::Left))
}
