//! The WebSocket endpoint as a [`tower::Service`]: what an axum or hyper app
//! mounts, and what the standalone listener routes its WebSocket path to.
//!
//! A request goes through the Origin check, the `upgrade` hook, then the
//! handshake rules ([`crate::handshake`]); once accepted, the peer is
//! registered and its connection ([`crate::connection`]) runs in a task of
//! its own, spawned through the server's shutdown handles.
//!
//! Mounted behind someone else's listener, the service does itself what the
//! standalone listener does at accept time, for WebSockets only: the `Host`
//! check, the server-wide connection cap (`max_connections`, counted in
//! WebSockets), the per-address limits (when the app tells the service the
//! client's address with a [`RemoteAddr`] request extension) and the write
//! timeout (wrapped around the upgraded socket). The app's own routes and
//! its HTTP connections are the app's to bound.

use std::{
    convert::Infallible,
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{header, HeaderValue, Request, StatusCode};
use tokio::sync::OwnedSemaphorePermit;

use crate::{
    connection, handshake,
    hooks::{Hooks, UpgradeRequest},
    limits::{IpRejection, IpSlot},
    metrics::Rejection,
    outbox::Outbox,
    peer::Peer,
    response::{text_response, HttpResponse},
    state::{self, ServerState},
};

/// The client's address, as the app that mounts a [`WebSocketService`] tells
/// it: insert it into each request's extensions (from axum's `ConnectInfo`,
/// or the address hyper's accept loop got). Without it the per-address
/// limits do not apply and hooks see `0.0.0.0:0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteAddr(pub SocketAddr);

/// The WebSocket endpoint as a `tower::Service<http::Request<B>>`, for any
/// body type `B`: mount it in an axum router with
/// `any_service(service)`, or call it from a hyper `service_fn`. Every clone
/// shares the server's topics, peers and shutdown (see [`crate::Endpoint`]).
///
/// The connection it is called on must have been served by hyper with
/// upgrades enabled (`serve_connection(..).with_upgrades()`, which axum's
/// `serve` does).
pub struct WebSocketService<H> {
    pub(crate) state: Arc<ServerState>,
    pub(crate) hooks: Arc<H>,
}

impl<H> Clone for WebSocketService<H> {
    fn clone(&self) -> Self {
        Self { state: Arc::clone(&self.state), hooks: Arc::clone(&self.hooks) }
    }
}

impl<H> std::fmt::Debug for WebSocketService<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocketService").field("path", &self.state.config.path).finish_non_exhaustive()
    }
}

/// Where a request came from, and what it already holds of the limits.
pub(crate) struct Conn {
    /// The socket's peer address, when known.
    pub(crate) remote: Option<SocketAddr>,
    /// The standalone listener's slot: the connection was counted (and its
    /// address checked, unless it is a trusted proxy) at accept time.
    pub(crate) accepted: Option<Arc<ConnSlot>>,
}

/// A connection's place under `max_connections` and the per-address limits,
/// released when dropped. A connection from a trusted proxy has no address
/// slot: each WebSocket upgrade on it takes one for the client it names.
#[derive(Debug)]
pub(crate) struct ConnSlot {
    pub(crate) _permit: OwnedSemaphorePermit,
    pub(crate) _ip: Option<IpSlot>,
}

/// What a WebSocket holds of the limits for its whole life. Its
/// connection's future keeps it: a direct client of the standalone listener
/// (whose limits were applied at accept time) holds a pointer, anyone else
/// a box.
enum Held {
    Accepted { _slot: Arc<ConnSlot> },
    Limits { _limits: Box<HeldLimits> },
}

/// What a WebSocket took under the limits other than at accept time.
struct HeldLimits {
    _accepted: Option<Arc<ConnSlot>>,
    _permit: Option<OwnedSemaphorePermit>,
    _ip: Option<IpSlot>,
}

impl<H: Hooks> WebSocketService<H> {
    /// Serves one request to the WebSocket path, checked in this order:
    /// draining (503), the Origin (403), the limits not applied at accept time (503, 429), the
    /// `upgrade` hook (auth: 401 or whatever it answers), the handshake rules,
    /// then the 101. Auth comes before the handshake rules so that a plain GET
    /// carrying a token learns whether it is accepted: browsers hide the status
    /// of a refused WebSocket handshake, and the client probes with such a GET.
    pub(crate) async fn serve<B>(&self, req: Request<B>, conn: Conn) -> HttpResponse {
        let state = &self.state;
        let remote = conn.remote.unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
        // A request read before the shutdown but reaching here after it: its
        // peer would be closed at once, so it is sent to another node instead.
        if state.shutdown.is_draining() {
            state.metrics.rejected(Rejection::Draining);
            let mut res = text_response(StatusCode::SERVICE_UNAVAILABLE, "server is shutting down; retry\n");
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
            // The standalone listener leaves a connection whose upgrade was
            // being decided to finish by itself (see `ConnCtx::upgrading`):
            // without an upgrade, only this ends it before the grace period.
            res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return res;
        }
        if let Err(rejection) = state.origins.check_origin(req.uri(), req.headers()) {
            tracing::debug!(%remote, origin = ?req.headers().get(header::ORIGIN), "origin refused");
            state.metrics.rejected(Rejection::Origin);
            return rejection.response();
        }
        let (client, held) = match self.admit(&req, &conn, remote) {
            Ok(admitted) => admitted,
            Err(response) => return response,
        };
        let allow_origin = req.headers().get(header::ORIGIN).cloned();
        let mut res = self.upgrade(req, client, held).await;
        // The client's probe is a cross-origin fetch in development: let it read the status.
        if let Some(origin) = allow_origin {
            res.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            res.headers_mut().insert(header::VARY, HeaderValue::from_static("Origin"));
        }
        res
    }

    /// Applies the limits not applied at accept time; returns the client's
    /// address and what the WebSocket holds of the limits.
    #[allow(clippy::result_large_err)]
    fn admit<B>(&self, req: &Request<B>, conn: &Conn, remote: SocketAddr) -> Result<(SocketAddr, Held), HttpResponse> {
        let state = &self.state;
        let permit = match conn.accepted {
            Some(_) => None,
            None => match Arc::clone(&state.limit).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    state.metrics.rejected(Rejection::TooManyConnections);
                    let mut res = text_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server is at its connection limit; retry later\n",
                    );
                    res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
                    return Err(res);
                }
            },
        };
        // From a trusted proxy, the client it names is subject to the
        // per-address limits here, once per WebSocket, as a direct client of
        // the standalone listener is at accept time; behind a foreign
        // listener, every client is, when its address is known.
        let checked_at_accept = conn.accepted.is_some() && !state.per_ip.trusts(remote.ip());
        let (client, ip) = match conn.remote {
            Some(_) if !checked_at_accept => {
                let trusted = state.per_ip.trusts(remote.ip());
                let ip = if trusted { state.per_ip.client_ip(remote.ip(), req.headers()) } else { remote.ip() };
                match state.per_ip.try_acquire(ip) {
                    Ok(slot) => (if trusted { SocketAddr::new(ip, 0) } else { remote }, Some(slot)),
                    Err(rejection) => {
                        tracing::debug!(%remote, client = %ip, %rejection, "address refused");
                        state.metrics.rejected(ip_rejection(&rejection));
                        return Err(rejection.response());
                    }
                }
            }
            _ => (remote, None),
        };
        let held = match (&conn.accepted, permit, ip) {
            (Some(accepted), None, None) => Held::Accepted { _slot: Arc::clone(accepted) },
            (accepted, permit, ip) => {
                Held::Limits { _limits: Box::new(HeldLimits { _accepted: accepted.clone(), _permit: permit, _ip: ip }) }
            }
        };
        Ok((client, held))
    }

    /// `client` is the address hooks and the peer list see: behind a trusted
    /// proxy, the one it names (port 0: proxies do not pass the port on).
    async fn upgrade<B>(&self, mut req: Request<B>, client: SocketAddr, held: Held) -> HttpResponse {
        // The hook gets the request's own method, URI and headers, moved
        // rather than cloned (a header map is two allocations and a copy of
        // every entry); the handshake rules then read them from there, and
        // the request keeps only what hyper's upgrade needs, its extensions.
        let upgrade_req = UpgradeRequest {
            method: std::mem::take(req.method_mut()),
            uri: std::mem::take(req.uri_mut()),
            headers: std::mem::take(req.headers_mut()),
            remote_addr: client,
        };
        let context = match self.hooks.upgrade(&upgrade_req).await {
            Ok(context) => context,
            Err(response) => {
                self.state.metrics.rejected(Rejection::Auth);
                return response;
            }
        };
        let accept = match handshake::validate_parts(&upgrade_req.method, &upgrade_req.headers) {
            Ok(accept) => accept,
            Err(rejection) => {
                tracing::debug!(remote = %client, %rejection, "upgrade rejected");
                self.state.metrics.rejected(Rejection::BadHandshake);
                return rejection.response();
            }
        };
        let state = Arc::clone(&self.state);
        let (outbox, outbox_rx) = Outbox::new(state::outbox_bounds(&state.config), Arc::clone(&state.queue_budget));
        let core = state.register_peer(client, outbox);
        let peer = Peer::new(core, context, Arc::clone(&state));
        let on_upgrade = hyper::upgrade::on(&mut req);
        let hooks = Arc::clone(&self.hooks);
        // hyper sends the 101 only once this handler returns, so the socket is
        // taken over in a task of its own. Behind the standalone listener the
        // stream has its write timeout already; any other gets one there.
        self.state.shutdown.spawn(connection::serve(state, hooks, on_upgrade, peer, outbox_rx, held));
        accept.response()
    }
}

/// The metrics' name for an address refused its connection.
pub(crate) fn ip_rejection(rejection: &IpRejection) -> Rejection {
    match rejection {
        IpRejection::Rate { .. } => Rejection::RateLimited,
        IpRejection::Count => Rejection::TooManyConnectionsPerIp,
    }
}

impl<H: Hooks, B: Send + 'static> tower::Service<Request<B>> for WebSocketService<H> {
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let remote = req.extensions().get::<RemoteAddr>().map(|r| r.0);
            // The standalone listener checks every request's Host; here only
            // this endpoint's requests reach us.
            if let Err(rejection) = this.state.origins.check_host(req.uri(), req.headers()) {
                tracing::debug!(?remote, host = ?req.headers().get(header::HOST), "host refused");
                this.state.metrics.rejected(Rejection::Host);
                return Ok(rejection.response());
            }
            Ok(this.serve(req, Conn { remote, accepted: None }).await)
        })
    }
}
