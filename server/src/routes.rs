//! Request routing for one HTTP connection: `/healthz`, the WebSocket path
//! (handshake, the `upgrade` hook, then the hand-off to [`crate::connection`]),
//! and the static files.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;

use crate::limits::IpSlot;

use crate::{
    connection, handshake,
    hooks::{Hooks, UpgradeRequest},
    outbox::Outbox,
    statics, HttpResponse, Peer, ServerState,
};

/// What every request on one TCP connection shares.
pub(crate) struct ConnCtx<H> {
    pub(crate) state: Arc<ServerState>,
    pub(crate) hooks: Arc<H>,
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

/// A connection's place under `max_connections` and `max_connections_per_ip`,
/// released when dropped.
#[derive(Debug)]
pub(crate) struct ConnSlot {
    pub(crate) _permit: OwnedSemaphorePermit,
    pub(crate) _ip: IpSlot,
}

/// A plain-text response, the shape of every error this server answers with.
pub fn text_response(status: StatusCode, text: impl Into<String>) -> HttpResponse {
    let mut res = Response::new(Full::new(Bytes::from(text.into())));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    res
}

pub(crate) async fn route<H: Hooks>(req: Request<Incoming>, ctx: Arc<ConnCtx<H>>) -> Result<HttpResponse, Infallible> {
    let path = req.uri().path();
    let res = if path == ctx.state.config.path {
        ctx.upgrading.store(true, std::sync::atomic::Ordering::SeqCst);
        let res = websocket(req, &ctx).await;
        ctx.upgrading.store(false, std::sync::atomic::Ordering::SeqCst);
        res
    } else if path == "/healthz" {
        text_response(StatusCode::OK, "ok\n")
    } else if let (Some(dir), true) =
        (&ctx.state.config.static_dir, matches!(*req.method(), Method::GET | Method::HEAD))
    {
        statics::serve(dir, path, req.method() == Method::HEAD).await
    } else {
        text_response(StatusCode::NOT_FOUND, "not found\n")
    };
    Ok(res)
}

/// The WebSocket path, checked in this order: the Origin (403), the
/// `upgrade` hook (auth: 401 or whatever it answers), the handshake rules,
/// then the 101. Auth comes before the handshake rules so that a plain GET
/// carrying a token learns whether it is accepted: browsers hide the status
/// of a refused WebSocket handshake, and the client probes with such a GET.
async fn websocket<H: Hooks>(req: Request<Incoming>, ctx: &Arc<ConnCtx<H>>) -> HttpResponse {
    if !ctx.state.origins.allows(req.headers()) {
        tracing::debug!(remote = %ctx.remote, origin = ?req.headers().get(header::ORIGIN), "origin refused");
        return text_response(StatusCode::FORBIDDEN, "this origin may not connect\n");
    }
    let allow_origin = req.headers().get(header::ORIGIN).cloned();
    let mut res = upgrade(req, ctx).await;
    // The client's probe is a cross-origin fetch in development: let it read the status.
    if let Some(origin) = allow_origin {
        res.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        res.headers_mut().insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    res
}

async fn upgrade<H: Hooks>(mut req: Request<Incoming>, ctx: &Arc<ConnCtx<H>>) -> HttpResponse {
    let upgrade_req = UpgradeRequest {
        method: req.method().clone(),
        uri: req.uri().clone(),
        headers: req.headers().clone(),
        remote_addr: ctx.remote,
    };
    let context = match ctx.hooks.upgrade(&upgrade_req).await {
        Ok(context) => context,
        Err(response) => return response,
    };
    let accept = match handshake::validate_upgrade(&req) {
        Ok(accept) => accept,
        Err(rejection) => {
            tracing::debug!(remote = %ctx.remote, %rejection, "upgrade rejected");
            return rejection.response();
        }
    };
    let state = Arc::clone(&ctx.state);
    let (outbox, outbox_rx) = Outbox::new(state.config.outbox_bounds());
    let user = ctx.hooks.user(&context);
    let core = state.register_peer(ctx.remote, outbox, user);
    let peer = Peer::new(core, context, Arc::clone(&state));
    let on_upgrade = hyper::upgrade::on(&mut req);
    let hooks = Arc::clone(&ctx.hooks);
    let shutdown = state.shutdown.clone();
    let slot = Arc::clone(&ctx.slot);
    // hyper sends the 101 only once this handler returns, so the socket is
    // taken over in a task of its own.
    shutdown.clone().spawn(async move {
        let _slot = slot;
        match on_upgrade.await {
            Ok(upgraded) => connection::serve(state, hooks, upgraded, peer, outbox_rx, shutdown).await,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed after the 101");
                state.unregister_peer(peer.id());
            }
        }
    });
    accept.response()
}
