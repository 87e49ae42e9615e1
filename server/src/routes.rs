//! Request routing for one HTTP connection: `/healthz`, the WebSocket path
//! (handshake, the `upgrade` hook, then the hand-off to [`crate::connection`]),
//! and the static files.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;
use tower_http::services::fs::ServeFileSystemResponseBody;

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

/// A connection's place under `max_connections` and the per-address limits,
/// released when dropped. A connection from a trusted proxy has no address
/// slot: each WebSocket upgrade on it takes one for the client it names.
#[derive(Debug)]
pub(crate) struct ConnSlot {
    pub(crate) _permit: OwnedSemaphorePermit,
    pub(crate) _ip: Option<IpSlot>,
}

/// The body of every response: in memory, or a file streamed from disk.
pub(crate) type RouteBody = Either<Full<Bytes>, ServeFileSystemResponseBody>;

/// A plain-text response, the shape of every error this server answers with.
pub fn text_response(status: StatusCode, text: impl Into<String>) -> HttpResponse {
    let mut res = Response::new(Full::new(Bytes::from(text.into())));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    res
}

pub(crate) async fn route<H: Hooks>(
    req: Request<Incoming>,
    ctx: Arc<ConnCtx<H>>,
) -> Result<Response<RouteBody>, Infallible> {
    if let Err(rejection) = ctx.state.origins.check_host(req.uri(), req.headers()) {
        tracing::debug!(remote = %ctx.remote, host = ?req.headers().get(header::HOST), "host refused");
        return Ok(rejection.response().map(Either::Left));
    }
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
        return Ok(statics::serve(dir, req).await);
    } else {
        text_response(StatusCode::NOT_FOUND, "not found\n")
    };
    Ok(res.map(Either::Left))
}

/// The WebSocket path, checked in this order: the Origin (403), the
/// `upgrade` hook (auth: 401 or whatever it answers), the handshake rules,
/// then the 101. Auth comes before the handshake rules so that a plain GET
/// carrying a token learns whether it is accepted: browsers hide the status
/// of a refused WebSocket handshake, and the client probes with such a GET.
async fn websocket<H: Hooks>(req: Request<Incoming>, ctx: &Arc<ConnCtx<H>>) -> HttpResponse {
    if let Err(rejection) = ctx.state.origins.check_origin(req.uri(), req.headers()) {
        tracing::debug!(remote = %ctx.remote, origin = ?req.headers().get(header::ORIGIN), "origin refused");
        return rejection.response();
    }
    // From a trusted proxy, the client it names is subject to the per-address
    // limits here, once per WebSocket, as a direct client is at accept time.
    let (client, ip_slot) = if ctx.state.per_ip.trusts(ctx.remote.ip()) {
        let ip = ctx.state.per_ip.client_ip(ctx.remote.ip(), req.headers());
        match ctx.state.per_ip.try_acquire(ip) {
            Ok(slot) => (SocketAddr::new(ip, 0), Some(slot)),
            Err(rejection) => {
                tracing::debug!(remote = %ctx.remote, client = %ip, %rejection, "address refused");
                return rejection.response();
            }
        }
    } else {
        (ctx.remote, None)
    };
    let allow_origin = req.headers().get(header::ORIGIN).cloned();
    let mut res = upgrade(req, ctx, client, ip_slot).await;
    // The client's probe is a cross-origin fetch in development: let it read the status.
    if let Some(origin) = allow_origin {
        res.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        res.headers_mut().insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    res
}

/// `client` is the address hooks and the peer list see: behind a trusted
/// proxy, the one it names (port 0: proxies do not pass the port on).
async fn upgrade<H: Hooks>(
    mut req: Request<Incoming>,
    ctx: &Arc<ConnCtx<H>>,
    client: SocketAddr,
    ip_slot: Option<IpSlot>,
) -> HttpResponse {
    let upgrade_req = UpgradeRequest {
        method: req.method().clone(),
        uri: req.uri().clone(),
        headers: req.headers().clone(),
        remote_addr: client,
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
    let (outbox, outbox_rx) = Outbox::new(state.config.outbox_bounds(), Arc::clone(&state.queue_budget));
    let user = ctx.hooks.user(&context);
    let core = state.register_peer(client, outbox, user);
    let peer = Peer::new(core, context, Arc::clone(&state));
    let on_upgrade = hyper::upgrade::on(&mut req);
    let hooks = Arc::clone(&ctx.hooks);
    let shutdown = state.shutdown.clone();
    let slot = Arc::clone(&ctx.slot);
    // hyper sends the 101 only once this handler returns, so the socket is
    // taken over in a task of its own.
    shutdown.clone().spawn(async move {
        let _slot = slot;
        let _ip_slot = ip_slot;
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
